"""Download a Hugging Face model into a folder, once. Two callers: `lull up --model`
(controller/assembly/local_model.py, into the local model cache) and the chart's init
container (deploy/helm/lull/files/model/fetch.py, into the model volume).

A folder is complete when its marker is there (``.lull-complete``; ``.lull-metadata`` when
only the config and tokenizer were fetched, as the head and gateway pods do): such a folder
is used as it is, without asking the Hub. The file listing comes first: snapshot_download
returns a non-empty folder as it is when the Hub cannot be reached, which would pass a
half-filled folder for a complete one. The token is huggingface_hub's own (HF_TOKEN from
the environment): never read, printed or logged here.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

METADATA = ["*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]  # config and tokenizer files
COMPLETE, METADATA_ONLY = ".lull-complete", ".lull-metadata"


class ModelFetchError(ValueError):
    """The model could not be had; the message names the model, the folder, the cause and
    the fix (a ValueError: the `lull` CLI prints it as one line)."""


def is_fetched(folder: Path, full: bool = True) -> bool:
    """Whether ``folder`` holds the model (``full``: every file; else config and tokenizer)."""
    return (folder / COMPLETE).exists() or (not full and (folder / METADATA_ONLY).exists())


def fetch_model(repo: str, revision: str, folder: Path, *, fix: str, full: bool = True,
                echo: Callable[[str], None] = print) -> bool:
    """Download ``repo`` at ``revision`` into ``folder`` unless it is there already. True when
    it downloaded, False when the folder was complete. ``fix``: what the user can do when the
    download fails (the ModelFetchError's message ends with it). Progress goes to ``echo``
    and huggingface_hub's own progress bars."""
    if is_fetched(folder, full):
        echo(f"model already in {folder}")
        return False
    from fnmatch import fnmatch

    from huggingface_hub import HfApi, snapshot_download

    echo(f"downloading hf://{repo}@{revision} into {folder} ({'every file' if full else 'config and tokenizer'}) ...")
    try:
        wanted = [f for f in HfApi().list_repo_files(repo, revision=revision)
                  if full or any(fnmatch(f, pattern) for pattern in METADATA)]
        snapshot_download(repo, revision=revision, local_dir=folder, allow_patterns=None if full else METADATA)
        missing = [f for f in wanted if not (folder / f).is_file()]
        if missing:
            raise RuntimeError(f"{len(missing)} files did not arrive, e.g. {missing[0]}")
    except Exception as error:  # the message, not a traceback: what to fix is in it
        raise ModelFetchError(f"cannot download hf://{repo}@{revision} into {folder}: {_cause(error)}. "
                              f"To fix: {fix}") from None
    (folder / (COMPLETE if full else METADATA_ONLY)).touch()
    echo(f"model downloaded into {folder}")
    return True


def _cause(error: Exception) -> str:
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return f"HF_HUB_OFFLINE is set, so the Hub was not asked ({first.rstrip('.')})"
    if isinstance(error, (OSError, ConnectionError)) or "Connect" in type(error).__name__:  # httpx's ConnectError
        return f"huggingface.co cannot be reached ({first})"
    return first
