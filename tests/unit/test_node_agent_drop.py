"""The node agent drops a GPU-tier session whose DRAM copy is gone, and the engine's hold
on it is released all the same (a real ``NodeAgent`` over a real ``DramStore`` in a tmp dir;
the engine's side is its control file, read as the KV connector reads it)."""

from __future__ import annotations

import pytest

from controller.cli.bench.chaos_faults import fill
from proto.tiers import Tier
from tests.support import mounted_tmpfs
from workers.dram_store import DramStore
from workers.node_agent import MoveKind, NodeAgent, Refused


def control_lines(folder, replica: str) -> list[str]:
    path = folder / "engines" / replica / "control.log"
    return path.read_text().splitlines() if path.exists() else []


def test_a_drop_of_a_gpu_session_without_a_dram_copy_still_releases_the_engines_hold(tmp_path):
    agent = NodeAgent("n1", DramStore(tmp_path, 1 << 20), None, dram_dir=str(tmp_path))
    agent.prepare("m1", "s1", MoveKind.DROP, Tier.GPU, Tier.WAITING, "r1", lease_s=5, now=0.0)
    assert agent.complete("m1", now=1.0) == ("committed", Tier.WAITING)
    assert control_lines(tmp_path, "r1") == ["release s1"]


def test_a_demotion_without_a_dram_copy_is_still_refused(tmp_path):
    agent = NodeAgent("n1", DramStore(tmp_path, 1 << 20), None, dram_dir=str(tmp_path))
    with pytest.raises(Refused) as refused:
        agent.prepare("m1", "s1", MoveKind.DEMOTE, Tier.GPU, Tier.DRAM, "r1", lease_s=5, now=0.0)
    assert refused.value.reason == "REFUSAL_REASON_SOURCE_NOT_FOUND" and control_lines(tmp_path, "r1") == []


@pytest.fixture
def full_tmpfs(tmp_path):
    """A real 1 MiB tmpfs for the node's DRAM folder (needs the right to mount: skipped where there is none)."""
    with mounted_tmpfs(tmp_path / "shm", "1m") as root:
        yield root


def test_a_demotion_that_cannot_commit_on_a_full_tmpfs_aborts_whole_and_a_later_one_commits(full_tmpfs):
    """The engine's release line and the index's label are the commit's last writes; on a full
    tmpfs the move is answered "aborted" and undone (the undo, refused by the full tmpfs too,
    on the next call), so the controller keeps the session where it was and tries again. It
    was left half-done and unanswered: popped from the agent's moves, neither committed nor
    aborted, its copy pinned for good."""
    store = DramStore(full_tmpfs, 1 << 19)
    agent = NodeAgent("n1", store, None, dram_dir=str(full_tmpfs))
    store.put_session("s1", tenant="t", replica="r1", label="gpu", tokens=32, block_hashes=["b1"],
                      blocks={"b1": b"k" * 1000})  # the engine's write-through
    agent.prepare("m1", "s1", MoveKind.DEMOTE, Tier.GPU, Tier.DRAM, "r1", lease_s=5, now=0.0)
    fill(full_tmpfs / "filler")  # until no page is left
    assert agent.complete("m1", now=1.0) == ("aborted", Tier.GPU)
    assert control_lines(full_tmpfs, "r1") == []  # the engine keeps its hold: the session stays on the GPU tier
    (full_tmpfs / "filler").unlink()
    agent.expire(now=2.0)  # any later call first retries the undo the full tmpfs refused
    assert store.session("s1").label == "gpu"
    agent.prepare("m2", "s1", MoveKind.DEMOTE, Tier.GPU, Tier.DRAM, "r1", lease_s=5, now=2.0)
    assert agent.complete("m2", now=3.0) == ("committed", Tier.DRAM)
    assert control_lines(full_tmpfs, "r1") == ["release s1"] and store.session("s1").label == "dram"
    store.check_integrity()


def test_a_move_prepared_on_a_full_tmpfs_is_refused_for_capacity_and_a_later_one_is_prepared(full_tmpfs):
    """Pinning the copy writes the index; on a full tmpfs sqlite answers "database or disk is
    full", which reached the controller as an UNKNOWN gRPC error. It is a refusal now (the
    tier has no room), and nothing changed: once there is room the same move is prepared."""
    store = DramStore(full_tmpfs, 1 << 19)
    agent = NodeAgent("n1", store, None, dram_dir=str(full_tmpfs))
    store.put_session("s1", tenant="t", replica="r1", label="gpu", tokens=32, block_hashes=["b1"],
                      blocks={"b1": b"k" * 1000})
    fill(full_tmpfs / "filler")
    with pytest.raises(Refused) as refused:
        agent.prepare("m1", "s1", MoveKind.DEMOTE, Tier.GPU, Tier.DRAM, "r1", lease_s=5, now=0.0)
    assert refused.value.reason == "REFUSAL_REASON_INSUFFICIENT_CAPACITY" and "refused a write" in str(refused.value)
    assert store.session("s1").label == "gpu" and not agent.moves
    (full_tmpfs / "filler").unlink()
    agent.prepare("m2", "s1", MoveKind.DEMOTE, Tier.GPU, Tier.DRAM, "r1", lease_s=5, now=1.0)
    assert agent.complete("m2", now=2.0) == ("committed", Tier.DRAM)
