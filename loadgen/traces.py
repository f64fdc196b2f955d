"""Real agent traces: load a folder of them into typed, immutable sessions and LLM calls
(``loadgen.trace_model``), read by a registered trace format (``claude-code``, the
default: ``loadgen.claude_code_traces``). A session alternates LLM calls with gaps: tool
calls, or a human's turn."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import loadgen.claude_code_traces  # noqa: F401  (registers the claude-code format)
from loadgen.trace_model import TRACE_FORMATS, BlockIds, GapKind, TraceCall, TraceReader, TraceSession

__all__ = ["BlockIds", "DEFAULT_TRACE_DIR", "GapKind", "TRACE_DIR_ENV", "TraceCall", "TraceSession", "clear_cache",
           "load_sessions", "resolve_trace_dir", "trace_files"]

TRACE_DIR_ENV = "LULL_TRACE_DIR"
_HOW_TO_POINT = f"pass another folder (--dir, or the trace_dir argument) or set {TRACE_DIR_ENV}"
_REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE_DIR = _REPO_ROOT.parent / "shared" / "traces" / "claude-code"


def resolve_trace_dir(trace_dir: str | os.PathLike[str] | None = None) -> Path:
    """The trace folder: the argument, else $LULL_TRACE_DIR, else the shared split."""
    chosen = trace_dir if trace_dir is not None else os.environ.get(TRACE_DIR_ENV) or DEFAULT_TRACE_DIR
    path = Path(chosen).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"trace folder {path} does not exist; {_HOW_TO_POINT}")
    return path


def trace_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".json", ".json.gz")) and p.is_file())
    if not files:
        raise FileNotFoundError(f"trace folder {folder} holds no .json or .json.gz files; {_HOW_TO_POINT}")
    return files


def load_sessions(
    trace_dir: str | os.PathLike[str] | None = None,
    *,
    limit: int | None = None,
    trace_format: str = "claude-code",
) -> list[TraceSession]:
    """All sessions of a trace folder, sub-agents included, sorted by session id.

    ``limit`` keeps the first N files by name (each a main agent and its sub-agents).
    Results are cached per folder, keyed by the files' names, sizes and mtimes, so a
    second load in one process costs only a directory listing.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be an integer >= 1 or None, got {limit!r}")
    reader = TRACE_FORMATS.get(trace_format)
    files = trace_files(resolve_trace_dir(trace_dir))[:limit]
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return list(_load_files(stamp, trace_format, reader))


@functools.lru_cache(maxsize=8)
def _load_files(
    stamp: tuple[tuple[str, int, int], ...], trace_format: str, reader: TraceReader
) -> tuple[TraceSession, ...]:
    sessions: dict[str, TraceSession] = {}
    for name, _, _ in stamp:
        for session in reader(Path(name)):
            if session.session_id in sessions:
                raise ValueError(f"{name}: session id {session.session_id!r} occurs twice in the folder")
            sessions[session.session_id] = session
    return tuple(sessions[key] for key in sorted(sessions))


def clear_cache() -> None:
    _load_files.cache_clear()
