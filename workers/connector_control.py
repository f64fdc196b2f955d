"""How the node agent and the benchmarks talk to a replica's KV connector (`workers.kv_connector`)
without importing it: each replica has a folder, ``<dram_dir>/engines/<replica id>``, where
the connector reads a control file of lines the agent appends (``release <session>``: free
its held GPU blocks; ``shared <session>``: its KV in DRAM came from the shared tier) and
writes its counters (``stats.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from proto.names import path_safe_id

CONTROL_LOG = "control.log"
STATS_FILE = "stats.json"


def engine_dir(dram_dir: Path | str, replica_id: str) -> Path:
    """The folder of one replica's control file and stats: a replica id that could leave
    ``dram_dir/engines`` (`..`, `/`) is a ValueError, whoever passes it."""
    return Path(dram_dir) / "engines" / path_safe_id("replica id", replica_id)


def release_sessions(dram_dir: Path | str, replica_id: str, sessions: list[str]) -> None:
    """Tell a replica's connector to free these sessions' held GPU blocks (called by the node agent)."""
    _control(dram_dir, replica_id, "release", sessions)


def staged_from_shared(dram_dir: Path | str, replica_id: str, sessions: list[str]) -> None:
    """Tell a replica's connector that these sessions' KV in DRAM came from the shared tier
    (called by the node agent), so that its next load of them counts as a shared-tier load."""
    _control(dram_dir, replica_id, "shared", sessions)


def _control(dram_dir: Path | str, replica_id: str, verb: str, sessions: list[str]) -> None:
    folder = engine_dir(dram_dir, replica_id)
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / CONTROL_LOG).open("a") as f:
        f.write("".join(f"{verb} {s}\n" for s in sessions))


def read_connector_stats(dram_dir: Path | str, replica_id: str) -> dict[str, int]:
    path = engine_dir(dram_dir, replica_id) / STATS_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def read_all_connector_stats(dram_dir: Path | str) -> dict[str, dict]:
    """Every replica's counters under a node's DRAM tier folder, by replica id."""
    engines = Path(dram_dir) / "engines"
    found = {}
    for path in sorted(engines.glob(f"*/{STATS_FILE}")) if engines.is_dir() else []:
        try:
            found[path.parent.name] = json.loads(path.read_text())
        except (OSError, ValueError):  # replaced between the listing and the read: skip it this time
            continue
    return found
