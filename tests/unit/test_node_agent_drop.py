"""The node agent drops a GPU-tier session whose DRAM copy is gone, and the engine's hold
on it is released all the same (a real ``NodeAgent`` over a real ``DramStore`` in a tmp dir;
the engine's side is its control file, read as the KV connector reads it)."""

from __future__ import annotations

import pytest

from proto.tiers import Tier
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
