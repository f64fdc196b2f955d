"""The planner is the only policy: the node agent's DRAM writes against a real ``DramStore``
and a real Redis shared tier, without an engine.

A promotion from the shared tier is a write the controller ordered: when the DRAM tier
is full it may let go of redundant copies (GPU-tier sessions' write-throughs, label
"gpu"), never a copy the controller books in DRAM (label "dram"); if that is not
enough the move is refused in-band and nothing changes.
"""

from __future__ import annotations

import hashlib
import time

import pytest

from proto.tiers import Tier
from workers.dram_store import DramStore
from workers.node_agent import MoveKind, NodeAgent, Refused
from workers.redis_server import LocalRedis
from workers.shared_tier import SharedTier

BLOCK = 1000  # bytes per block
CAPACITY = 6 * BLOCK  # the DRAM tier: six blocks


@pytest.fixture(scope="module")
def redis_server():
    with LocalRedis("16mb") as local:
        yield local


@pytest.fixture
def node(tmp_path, redis_server):
    shared = SharedTier(redis_server.url, 1 << 20, namespace=f"rule-{time.monotonic_ns()}")
    agent = NodeAgent("n1", DramStore(tmp_path, CAPACITY), shared, dram_dir=str(tmp_path))
    yield agent
    shared.close()


def chain(session: str, blocks: int) -> dict[str, bytes]:
    return {hashlib.sha1(f"{session}:{i}".encode()).hexdigest(): bytes([i]) * BLOCK for i in range(blocks)}


def write_through(agent: NodeAgent, session: str, blocks: int, label: str) -> None:
    data = chain(session, blocks)
    agent.dram.put_session(session, tenant="t", replica="r1", label=label, tokens=32 * blocks,
                           block_hashes=list(data), blocks=data)


def in_shared(agent: NodeAgent, session: str, blocks: int) -> None:
    data = chain(session, blocks)
    agent.shared.put_session(session, "t", list(data), data, 32 * blocks)


def promote(agent: NodeAgent, session: str, dst: Tier = Tier.DRAM) -> None:
    now = time.monotonic()
    agent.prepare(f"m-{session}", session, MoveKind.PROMOTE, Tier.SHARED, dst, "r1", 30, now)
    assert agent.complete(f"m-{session}", now) == ("committed", dst)


def tiers(agent: NodeAgent) -> dict[str, Tier]:
    return {place.session_id: place.tier for place in agent.places()}


def test_promotion_into_a_full_dram_tier_drops_a_redundant_copy_only(node):
    write_through(node, "booked", 3, "dram")
    write_through(node, "copy", 2, "gpu")
    write_through(node, "fresh-copy", 1, "gpu")
    in_shared(node, "back", 2)
    promote(node, "back")  # needs 2 blocks, 0 free: the least recently written redundant copy goes
    assert tiers(node) == {"booked": Tier.DRAM, "fresh-copy": Tier.GPU, "back": Tier.DRAM}
    assert node.dram.session("back").label == "dram" and node.shared.get_session("back") is None
    node.dram.check_integrity()
    node.shared.check_integrity()


def test_promotion_to_gpu_stages_through_dram_under_the_same_rule(node):
    write_through(node, "booked", 4, "dram")
    write_through(node, "copy", 2, "gpu")
    in_shared(node, "back", 2)
    promote(node, "back", Tier.GPU)
    assert tiers(node) == {"booked": Tier.DRAM, "back": Tier.GPU}
    node.dram.check_integrity()


def test_promotion_that_would_need_a_booked_copy_is_refused_and_changes_nothing(node):
    write_through(node, "booked", 4, "dram")
    write_through(node, "copy", 1, "gpu")
    in_shared(node, "back", 3)  # 3 blocks; only 1 free + 1 redundant
    with pytest.raises(Refused) as refused:
        node.prepare("m-back", "back", MoveKind.PROMOTE, Tier.SHARED, Tier.DRAM, "r1", 30, time.monotonic())
    assert refused.value.reason == "REFUSAL_REASON_INSUFFICIENT_CAPACITY"
    assert refused.value.available_bytes == BLOCK
    assert tiers(node) == {"booked": Tier.DRAM, "copy": Tier.GPU}  # the redundant copy was not dropped for nothing
    assert node.shared.get_session("back") is not None and not node.moves
    node.dram.check_integrity()
    node.shared.check_integrity()


def test_demotion_relabels_with_the_tier_vocabulary(node):
    write_through(node, "s", 2, "gpu")
    now = time.monotonic()
    node.prepare("m-s", "s", MoveKind.DEMOTE, Tier.GPU, Tier.DRAM, "r1", 30, now)
    assert node.dram.session("s").label == "pinned" and tiers(node) == {"s": Tier.GPU}  # reported at its source
    node.complete("m-s", now)
    assert node.dram.session("s").label == Tier.DRAM.label and tiers(node) == {"s": Tier.DRAM}
    assert node.dram.redundant_copies() == []  # now a booked copy: nothing may drop it
