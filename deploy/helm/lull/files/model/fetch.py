"""Download an hf:// model into the model cache, once: the init container of every Ray pod
runs this (deploy/helm/lull/templates/_model.tpl). A pod that finds the files there skips;
the head and gateway pods fetch only the config and tokenizer files (LULL_MODEL_FILES=metadata).
Pods that start together share huggingface_hub's per-file locks in the cache folder."""

import os
import sys
from pathlib import Path

METADATA = ["*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]

folder = Path(os.environ["LULL_MODEL_DIR"])
full = os.environ.get("LULL_MODEL_FILES", "all") == "all"
marker = folder / (".lull-complete" if full else ".lull-metadata")
if marker.exists() or (folder / ".lull-complete").exists():
    print(f"model already in {folder}")
    sys.exit(0)
from fnmatch import fnmatch  # noqa: E402  (imports not needed to skip)

from huggingface_hub import HfApi, snapshot_download  # noqa: E402

repo, revision = os.environ["LULL_MODEL_REPO"], os.environ["LULL_MODEL_REVISION"]
try:
    # The listing first: snapshot_download returns a non-empty local_dir as it is when the
    # Hub cannot be reached, which would pass a half-filled folder for a complete one.
    wanted = [f for f in HfApi().list_repo_files(repo, revision=revision)
              if full or any(fnmatch(f, pattern) for pattern in METADATA)]
    snapshot_download(repo, revision=revision, local_dir=folder, allow_patterns=None if full else METADATA)
    missing = [f for f in wanted if not (folder / f).is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} files did not arrive, e.g. {missing[0]}")
except Exception as error:  # the message, not a traceback: what to fix is in it
    sys.exit(f"cannot download hf://{repo}@{revision} into {folder}: {error} (gated model? set "
             f"modelCache.hfTokenSecret to a Secret with key hf-token)")
marker.touch()
print(f"model downloaded into {folder}")
