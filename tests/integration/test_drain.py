"""Draining a replica (``controller.runtime.drain``) against real node agents, real gRPC
and a real Redis shared tier, without an engine.

As in tests/unit/test_live_controller.py, each node runs a real ``NodeAgent`` with a
real ``DramStore`` behind its real gRPC server, and ``tests.support.Engine`` writes
KV through to the DRAM tier as the engine's connector would. The shared tier is a
real redis-server (``LocalRedis``). The controller's clock is a ``FakeClock``.
"""

from __future__ import annotations

import asyncio

import pytest

from controller.policy import Location, Phase, Tier
from controller.runtime import GrpcMover, LiveController
from controller.runtime.drain import drain_replica
from tests.support import INTERNAL_TOKEN, Engine, FakeClock
from workers.dram_store import DramStore
from workers.node_agent import NodeAgent
from workers.node_agent_service import serve
from workers.redis_server import LocalRedis
from workers.shared_tier import SharedTier

GPU, DRAM, SHARED = 300, 300, 1000  # KV tokens
TOKEN_BYTES = 8  # BLOCK_BYTES (64) per 32-token block, rounded up: shared capacity in bytes is generous


@pytest.fixture(scope="module")
def redis_server():
    with LocalRedis("16mb") as local:
        yield local


@pytest.fixture
def plane(tmp_path, redis_server, monkeypatch):
    """Nodes n1, n2 with replicas r1, r2; both agents reach the same Redis."""
    import redis

    redis.Redis.from_url(redis_server.url).flushdb()
    monkeypatch.setenv("LULL_INTERNAL_TOKEN", INTERNAL_TOKEN)  # what GrpcMover sends
    agents, servers, addresses, engines = {}, {}, {}, {}
    for node, replica in (("n1", "r1"), ("n2", "r2")):
        folder = tmp_path / node
        shared = SharedTier(redis_server.url, 1 << 20, timeout_s=1.0)
        agent = NodeAgent(node, DramStore(folder, 1 << 20), shared, dram_dir=str(folder))
        server, port, _ = serve(agent, 0, host="127.0.0.1", token=INTERNAL_TOKEN)
        agents[node], servers[node], addresses[node] = agent, server, f"127.0.0.1:{port}"
        engines[replica] = Engine(DramStore(folder, 1 << 20), replica)
    yield agents, servers, addresses, engines
    for server in servers.values():
        server.stop(None)


def controller(addresses, shared_tokens: int = SHARED, replicas=("r1", "r2")) -> tuple[LiveController, FakeClock]:
    clock = FakeClock()
    ctl = LiveController(GrpcMover(addresses, timeout_s=2), clock=lambda: clock.now)
    for replica in replicas:
        ctl.add_replica(replica, "n" + replica[1:], GPU, DRAM)
    ctl.set_shared_capacity(shared_tokens)
    return ctl, clock


def where(ctl: LiveController, session_id: str) -> Location:
    return ctl.state.get(session_id).location


def run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


async def fill_r1(ctl: LiveController, clock: FakeClock, engines) -> None:
    """s1 and s2 on r1, in tool calls, their KV in r1's HBM (80 tokens each)."""
    for session_id in ("s1", "s2"):
        admission = await ctl.admit(session_id, "t", 60, 20, timeout_s=1)
        clock.advance(1.0)
        engines[admission.replica_id].finish(ctl, session_id, 80)
    await ctl.quiesce()
    for session_id in ("s1", "s2"):
        assert ctl.state.get(session_id).location == Location(Tier.GPU, "r1"), ctl.snapshot()


def test_drain_moves_every_session_to_the_shared_tier_and_they_resume_elsewhere(plane):
    agents, _, addresses, engines = plane

    async def scenario():
        ctl, clock = controller(addresses, replicas=("r1",))
        await fill_r1(ctl, clock, engines)
        running = await ctl.admit("s3", "t", 180, 20, timeout_s=1)  # displaces s1, the most idle, to DRAM
        assert running.replica_id == "r1" and ctl.state.get("s3").phase is Phase.LLM
        assert ctl.state.get("s1").location == Location(Tier.DRAM, "r1")
        ctl.add_replica("r2", "n2", GPU, DRAM)
        draining = asyncio.create_task(drain_replica(ctl, "r1", timeout_s=10, poll_s=0.01))
        await asyncio.sleep(0.2)  # s1 and s2 leave at once; s3's call is still running
        assert not draining.done() and "r1" in ctl.draining
        assert ctl.state.get("s3").location == Location(Tier.GPU, "r1")
        assert {where(ctl, "s1"), where(ctl, "s2")} == {Location(Tier.SHARED)}
        engines["r1"].finish(ctl, "s3", 200)  # its call ends: it leaves too
        report = await draining
        assert (report.sessions, report.saved_sessions, report.lost_sessions) == (3, 3, 0)
        assert report.saved_tokens == 80 + 80 + 200 and not report.timed_out
        assert "r1" not in ctl.state.replicas and "r1" not in ctl.nodes and not ctl.draining
        for session_id in ("s1", "s2", "s3"):
            assert where(ctl, session_id) == Location(Tier.SHARED)
            assert agents["n1"].dram.session(session_id) is None  # the node's copy went to Redis
        ctl.check_integrity()
        admission = await ctl.admit("s1", "t", 90, 20, timeout_s=2)  # its next call: on r2, no recompute
        assert admission.replica_id == "r2"
        assert agents["n2"].dram.session("s1") is not None  # promoted: copied into r2's node DRAM
        ctl.check_integrity()

    run(scenario)


def test_without_room_in_the_shared_tier_the_drain_drops_the_kv_and_reports_it(plane):
    _, _, addresses, engines = plane

    async def scenario():
        ctl, clock = controller(addresses, shared_tokens=0)
        await fill_r1(ctl, clock, engines)
        report = await drain_replica(ctl, "r1", timeout_s=10, poll_s=0.01)
        assert (report.saved_sessions, report.lost_sessions, report.lost_tokens) == (0, 2, 160)
        for session_id in ("s1", "s2"):
            assert ctl.state.get(session_id).location == Location(Tier.WAITING)
        assert (await ctl.admit("s2", "t", 90, 20, timeout_s=2)).replica_id == "r2"  # recomputed there
        ctl.check_integrity()

    run(scenario)


def test_a_drain_whose_node_is_gone_gives_up_at_once_and_removes_the_replica(plane):
    _, servers, addresses, engines = plane

    async def scenario():
        ctl, clock = controller(addresses)
        await fill_r1(ctl, clock, engines)
        servers["n1"].stop(None)  # the node (and its agent) is gone: every move fails
        report = await drain_replica(ctl, "r1", timeout_s=20, poll_s=0.01)
        assert not report.timed_out and report.seconds < 10
        assert (report.saved_sessions, report.lost_sessions) == (0, 2)
        assert "r1" not in ctl.state.replicas
        ctl.check_integrity()

    run(scenario)


def test_draining_an_unknown_replica_or_with_a_bad_timeout_is_refused(plane):
    _, _, addresses, _ = plane

    async def scenario():
        ctl, _ = controller(addresses)
        with pytest.raises(ValueError, match="unknown replica 'r9'"):
            await drain_replica(ctl, "r9", timeout_s=1)
        with pytest.raises(ValueError, match="timeout_s"):
            await drain_replica(ctl, "r1", timeout_s=0)
        assert "r1" in ctl.state.replicas and not ctl.draining

    run(scenario)
