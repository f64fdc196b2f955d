"""The DRAM tier's folder as files (``workers/dram_store.py``): whether its tmpfs holds the
tier, and which files are left over by writers that died."""

from __future__ import annotations

import os
from pathlib import Path

from proto.tier_capacity import dram_fit_problem

GIB = 1 << 30


def volume_problem(root: Path, capacity_bytes: int) -> str | None:
    """Why the filesystem under ``root`` cannot hold a tier of ``capacity_bytes`` with its
    headroom (``proto/tier_capacity.py``), naming the fix; None when it can."""
    stat = os.statvfs(root)
    problem = dram_fit_problem(capacity_bytes / GIB, stat.f_blocks * stat.f_frsize / GIB)
    return problem.replace("(tiers.dram_volume_gib)", f"(the filesystem under {root})") if problem else None


def orphan_files(blocks_dir: Path, indexed: set[str]) -> list[Path]:
    """Block files whose hash is not in ``indexed``, and temporary files
    (``.<hash>.<pid>.<thread>.tmp``) whose writer no longer runs. Call under the store's lock."""
    orphans = []
    for path in blocks_dir.iterdir():
        if path.name.startswith("."):
            if path.name.endswith(".tmp") and not writer_alive(path.name):
                orphans.append(path)
        elif path.name not in indexed:
            orphans.append(path)
    return orphans


def writer_alive(tmp_name: str) -> bool:
    """Whether the process a temporary file's name carries still runs (pids are per node,
    and so is the tier's folder)."""
    try:
        pid = int(tmp_name.split(".")[-3])
    except (IndexError, ValueError):
        return False  # not a name this store writes
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True
