"""Where a model comes from (``model.path``) and the local folder it is read from.

Three forms:
- ``hf://ORG/NAME[@REVISION]``: a Hugging Face repository, downloaded once (on
  Kubernetes by the chart's init container, with the token from a Secret) into
  ``<models root>/hf/ORG/NAME/REVISION`` (REVISION defaults to ``main``);
- ``pvc://CLAIM[/PATH]``: a folder in a PersistentVolumeClaim, which the chart mounts
  read-only at ``<models root>/pvc/CLAIM``;
- an absolute local path: a folder already on every node (baked into the image, or a
  volume the user mounts).

A bare ``ORG/NAME`` is refused: it reads as a Hugging Face id and as a relative path
alike, and a relative path means nothing to a Ray worker with another working folder.
Pure: no I/O, so the config, the chart's tests and the engine replica agree on it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

MODELS_ROOT = "/models"  # where the Helm chart mounts the model volumes in every Ray pod
HF, PVC, LOCAL = "hf", "pvc", "local"
DEFAULT_REVISION = "main"
FORMS = "hf://ORG/NAME[@REVISION], pvc://CLAIM[/PATH] or an absolute local folder"

_HF = re.compile(r"hf://(?:([A-Za-z0-9][A-Za-z0-9._-]{0,95})/)?([A-Za-z0-9][A-Za-z0-9._-]{0,95})(?:@([A-Za-z0-9][A-Za-z0-9._-]{0,127}))?")
_PVC = re.compile(r"pvc://([a-z0-9](?:[-a-z0-9]{0,251}[a-z0-9])?)(/.*)?")


@dataclass(frozen=True)
class ModelRef:
    kind: str  # HF, PVC or LOCAL
    name: str  # HF: the repository id (ORG/NAME or NAME); PVC: the claim; LOCAL: the folder
    revision: str = ""  # HF only
    subpath: str = ""  # PVC only: the folder inside the claim, "" for its root


def parse_model_ref(text: str) -> ModelRef:
    """The reference ``text`` names; ValueError saying which forms are accepted otherwise."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a model reference must be {FORMS}; got {text!r}")
    if text.startswith("hf://"):
        match = _HF.fullmatch(text)
        if not match or ".." in text:
            raise ValueError(f"{text!r} is not hf://ORG/NAME[@REVISION] (letters, digits, '.', '_', '-')")
        org, name, revision = match.groups()
        return ModelRef(HF, f"{org}/{name}" if org else name, revision=revision or DEFAULT_REVISION)
    if text.startswith("pvc://"):
        match = _PVC.fullmatch(text)
        if not match:
            raise ValueError(f"{text!r} is not pvc://CLAIM[/PATH] (CLAIM: a Kubernetes name, lowercase)")
        parts = PurePosixPath(match.group(2) or "/").parts[1:]
        if ".." in parts:
            raise ValueError(f"{text!r}: the path inside the claim must not climb out of it ('..')")
        return ModelRef(PVC, match.group(1), subpath="/".join(parts))
    if "://" in text:
        raise ValueError(f"{text!r} has an unknown scheme; a model reference is {FORMS}")
    if not text.startswith("/"):
        hint = f" (a Hugging Face id? write hf://{text})" if re.fullmatch(r"[\w.-]+/[\w.-]+", text) else ""
        raise ValueError(f"{text!r} is not {FORMS}{hint}")
    return ModelRef(LOCAL, text)


def local_model_dir(reference: str, models_root: str = MODELS_ROOT) -> str:
    """The folder an engine loads ``reference`` from: where the chart's init container
    downloads an hf:// model, where it mounts a pvc:// claim, or the local path itself."""
    ref = parse_model_ref(reference)
    root = PurePosixPath(models_root)
    if ref.kind == HF:
        return str(root / "hf" / ref.name / ref.revision)
    if ref.kind == PVC:
        return str(root / "pvc" / ref.name / ref.subpath)
    return ref.name
