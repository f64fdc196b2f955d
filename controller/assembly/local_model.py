"""The model of a local platform (`lull up --model PATH|ID`): the folder its engines load,
had before anything starts.

- a local folder: used where it is;
- ``hf://ORG/NAME[@REVISION]`` (or a plain ``ORG/NAME[@REVISION]`` that is no local folder):
  found in Hugging Face's own cache (``HF_HUB_CACHE``, without asking the Hub), or
  downloaded once (``workers.model_fetch``, as the chart's init container does) into the
  local model cache, ``$LULL_MODEL_CACHE`` or ``~/.cache/lull/models``, at the folder
  ``proto.model_ref.local_model_dir`` names; the next `lull up` finds it there;
- ``pvc://`` is the chart's, refused here.

HF_TOKEN (gated models) is read by huggingface_hub from the environment, never by Lull.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from proto.config import ConfigError
from proto.model_ref import HF, PVC, parse_model_ref, local_model_dir
from workers.model_fetch import fetch_model

CACHE_ENV = "LULL_MODEL_CACHE"
WEIGHTS = ("*.safetensors", "*.bin", "*.pt")
_HF_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w.-]+)?")
OFFLINE_FIX = ("let it reach huggingface.co (unset HF_HUB_OFFLINE; HF_TOKEN for a gated model), or pass a local "
               "folder: lull up --model /path/to/model")


def model_cache() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lull" / "models")


def model_reference(text: str) -> str:
    """``--model``'s text as a model.path (proto/model_ref.py): a folder that exists, made
    absolute; ``hf://`` as it is; a plain ``ORG/NAME[@REVISION]`` that is no folder here as
    ``hf://``. Anything else is left for the config's check to refuse with its message."""
    text = text.strip()
    if "://" in text:
        return text
    if Path(text).expanduser().is_dir():
        return str(Path(text).expanduser().resolve())
    if _HF_ID.fullmatch(text):
        return f"hf://{text}"
    return text


def local_model(path: str, *, cache: Path | None = None, echo: Callable[[str], None] = print) -> str:
    """The local folder of model.path ``path``, downloaded first when it is an hf:// model that
    neither Hugging Face's cache nor Lull's holds. ModelFetchError names the fix offline."""
    ref = parse_model_ref(path)
    if ref.kind == PVC:
        raise ConfigError(f"model.path {path!r}: pvc:// models are the Helm chart's; locally, pass a folder or an "
                          "hf:// model")
    if ref.kind != HF:
        if not (Path(ref.name) / "config.json").is_file():
            raise ConfigError(f"model.path {path!r} is no model folder (no config.json there)")
        return ref.name
    folder = Path(local_model_dir(path, str(cache or model_cache())))
    if (found := _in_hf_cache(ref.name, ref.revision)) is not None and not (folder / ".lull-complete").exists():
        echo(f"model hf://{ref.name}@{ref.revision} found in the Hugging Face cache: {found}")
        return found
    fetch_model(ref.name, ref.revision, folder, fix=OFFLINE_FIX, echo=echo)
    return str(folder)


def _in_hf_cache(repo: str, revision: str) -> str | None:
    """The snapshot folder of ``repo`` at ``revision`` in Hugging Face's cache, if it is there
    with its config and weights (snapshot_download with local_files_only asks no server)."""
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:  # not cached (LocalEntryNotFoundError and kin): download it
        return None
    weights = any(next(Path(folder).glob(pattern), None) for pattern in WEIGHTS)
    return folder if (Path(folder) / "config.json").is_file() and weights else None
