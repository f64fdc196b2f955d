"""Regenerate the committed Python stubs of Lull's contracts.

    python -m proto.generate [--out DIR]

Runs ``grpc_tools.protoc`` in-process over every ``proto/*.proto`` with the repository
root as the only import root, so ``.proto`` files import each other as
``proto/tiers.proto`` and the generated modules import each other as
``proto.tiers_pb2``: the stubs work from the repository root with no ``sys.path``
tricks. Writes ``*_pb2.py``, ``*_pb2_grpc.py`` and ``*_pb2.pyi`` into DIR (default:
this folder). The output depends only on the ``.proto`` files and the grpcio-tools
version (pinned to 1.78.0 in pyproject.toml), which is what lets a test check
that the committed stubs are current.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parent
GENERATED_SUFFIXES: tuple[str, ...] = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi")


def proto_files() -> list[Path]:
    return sorted(PROTO_DIR.glob("*.proto"))


def is_generated(path: Path) -> bool:
    return path.is_file() and path.name.endswith(GENERATED_SUFFIXES)


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs of every ``.proto`` into ``out_dir``; return the files written.

    Stale generated files in ``out_dir`` (of a ``.proto`` since removed) are deleted,
    so the folder holds exactly the current contracts.
    """
    # Imported here so that `import proto` and the generated stubs never need
    # grpcio-tools, only the grpcio and protobuf runtimes.
    from grpc_tools import protoc

    protos = proto_files()
    if not protos:
        raise FileNotFoundError(f"no .proto files in {PROTO_DIR}")
    # protoc mirrors the import path under its output root (proto/x_pb2.py), so it
    # writes into a scratch root and the files are flattened into out_dir.
    with tempfile.TemporaryDirectory(prefix="lull-protoc-") as scratch:
        well_known = resources.files("grpc_tools") / "_proto"
        args = [
            "grpc_tools.protoc",
            f"-I{REPO_ROOT}",
            f"-I{well_known}",
            f"--python_out={scratch}",
            f"--pyi_out={scratch}",
            f"--grpc_python_out={scratch}",
            *(str(path.relative_to(REPO_ROOT)) for path in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {[p.name for p in protos]} (see stderr)")
        produced = sorted((Path(scratch) / PROTO_DIR.name).iterdir())
        out_dir.mkdir(parents=True, exist_ok=True)
        for stale in out_dir.iterdir():
            if is_generated(stale):
                stale.unlink()
        written = []
        for path in produced:
            target = out_dir / path.name
            shutil.copyfile(path, target)
            written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proto.generate",
        description="Regenerate the Python gRPC stubs of Lull's .proto contracts.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=PROTO_DIR,
        help=f"folder to write the stubs into (default: {PROTO_DIR})",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out.resolve()):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
