"""The controller's books reconciled with what the tiers hold (``runtime.reconcile``).

Real parts, no engine: a real ``NodeAgent`` over a real ``DramStore`` (tmp dir) and a real
shared tier on a real redis-server (``LocalRedis``, with a password), behind the agent's
real gRPC server; the controller's ``LiveController`` moves through the real ``GrpcMover``.
What the engine's connector would write through is stored by hand (``tests.support.Engine``).
The controller's clock is a ``FakeClock``."""

from __future__ import annotations

import asyncio

import pytest
import redis

from controller.policy import Location, Tier
from controller.policy.types import SHARED, WAITING
from controller.runtime import GrpcMover, LiveController
from controller.runtime.reconcile import Reconciler
from tests.support import INTERNAL_TOKEN, Engine, FakeClock
from workers.dram_store import DramStore
from workers.node_agent import MoveKind, NodeAgent
from workers.node_agent_service import serve
from workers.redis_server import LocalRedis
from workers.shared_tier import SharedTier

CAPACITY = 4 << 20
DRAM1, GPU1 = Location(Tier.DRAM, "r1"), Location(Tier.GPU, "r1")


@pytest.fixture
def plane(tmp_path, monkeypatch):
    """Node n1 with replica r1: its agent (DRAM tier + shared tier on Redis) behind gRPC."""
    monkeypatch.setenv("LULL_INTERNAL_TOKEN", INTERNAL_TOKEN)
    with LocalRedis("8mb", password="recon-pass-1") as redis_server:
        shared = SharedTier(redis_server.url, CAPACITY, timeout_s=0.3)
        agent = NodeAgent("n1", DramStore(tmp_path, 1 << 20), shared, dram_dir=str(tmp_path))
        server, port, _ = serve(agent, 0, host="127.0.0.1", token=INTERNAL_TOKEN)
        try:
            yield agent, f"127.0.0.1:{port}", Engine(DramStore(tmp_path, 1 << 20), "r1"), redis_server
        finally:
            server.stop(None)
            shared.close()


def controller(address: str) -> LiveController:
    clock = FakeClock()
    ctl = LiveController(GrpcMover({"n1": address}, timeout_s=5), clock=lambda: clock.now)
    ctl.add_replica("r1", "n1", 300, 300)
    ctl.set_shared_capacity(10_000)
    return ctl


def put_shared(agent: NodeAgent, session_id: str) -> None:
    hashes = [f"{abs(hash(session_id)) % 10**12:x}", "ab"]
    agent.shared.put_session(session_id, "t", hashes, {h: b"kv" * 32 for h in hashes}, 40)


def run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), timeout=20))


def test_a_pass_recomputes_sessions_whose_copy_is_gone_and_drops_orphans(plane):
    """Booked: d-kept and d-gone in DRAM, s-kept and s-gone in the shared tier, g in the GPU
    tier (no copy needed; its write-through stays). Held, unbooked: o-dram, o-gpu (a
    write-through) on the node, o-shared and a stale copy of g in Redis. A pass books d-gone
    and s-gone as recomputed (their next call runs at once), drops the four orphans, and
    leaves the rest; a second pass finds nothing."""
    agent, address, engine, _ = plane

    async def scenario():
        ctl = controller(address)
        for session_id in ("d-kept", "o-dram"):
            engine.write_through(session_id, 40)
            agent.dram.set_label(session_id, "dram")
        engine.write_through("o-gpu", 40)
        engine.write_through("g", 40)
        for session_id in ("s-kept", "o-shared", "g"):
            put_shared(agent, session_id)
        for session_id, where in (("d-kept", DRAM1), ("d-gone", DRAM1), ("s-kept", SHARED), ("s-gone", SHARED),
                                  ("g", GPU1)):
            ctl.driver.restore(session_id, where, 40, 0.0)
        done = await Reconciler(lambda: ctl, ctl.mover).reconcile()
        assert sorted(done.lost) == ["d-gone", "s-gone"]
        assert sorted(done.orphans) == [("g", SHARED), ("o-dram", DRAM1), ("o-gpu", GPU1), ("o-shared", SHARED)]
        books = {s: r.location for s, r in ctl.state.sessions.items()}
        assert books == {"d-kept": DRAM1, "d-gone": WAITING, "s-kept": SHARED, "s-gone": WAITING, "g": GPU1}
        assert {s.session_id for s in agent.dram.sessions()} == {"d-kept", "g"}  # g's write-through stays
        assert set(agent.shared.sessions()) == {"s-kept"}
        agent.shared.check_integrity()
        ctl.check_integrity()
        again = await Reconciler(lambda: ctl, ctl.mover).reconcile()
        assert (again.lost, again.orphans) == ([], [])
        admission = await ctl.admit("s-gone", "t", 100, 20, timeout_s=1)  # recomputed: no copy to wait for
        assert admission.replica_id == "r1" and ctl.state.get("s-gone").location == GPU1

    run(scenario)


def test_the_probe_finds_a_redis_restart_and_an_outage_that_ended(plane):
    """Redis's run_id, as the agent's Health reports it, changes with a restart; the probe
    says so once. While Redis is down the probe says nothing; once it answers again, it does."""
    _, address, _, redis_server = plane

    async def scenario():
        ctl = controller(address)
        reconciler = Reconciler(lambda: ctl, ctl.mover)
        assert not await reconciler.shared_restarted()  # the first instance seen
        assert not await reconciler.shared_restarted()
        await asyncio.to_thread(redis_server.restart)
        assert await reconciler.shared_restarted()
        assert not await reconciler.shared_restarted()
        await asyncio.to_thread(redis_server.stop)
        assert not await reconciler.shared_restarted()
        await asyncio.to_thread(redis_server.start)
        assert await reconciler.shared_restarted()

    run(scenario)


def test_a_session_that_moved_during_the_pass_is_not_judged(plane):
    """A session the planner moves while the reports are read (a report may predate the
    move) is left for the next pass, not booked as lost on a stale report."""
    agent, address, engine, _ = plane

    async def scenario():
        ctl = controller(address)
        ctl.driver.restore("d", DRAM1, 40, 0.0)
        reconciler = Reconciler(lambda: ctl, ctl.mover)
        real_report = ctl.mover.report

        async def report_then_move(node_id):
            report = await real_report(node_id)  # d has no copy yet: it looks lost
            engine.write_through("d", 40)
            agent.dram.set_label("d", "dram")
            ctl.moving.add("d")  # what LiveMechanism.move records for a move carried out now
            return report

        ctl.mover.report = report_then_move
        done = await reconciler.reconcile()
        assert done.lost == [] and ctl.state.get("d").location == DRAM1

    run(scenario)


def test_a_drop_redis_stalls_on_is_not_committed_and_the_release_retry_drops_it(plane):
    """A closed session's shared copy whose drop meets a stalled Redis (CLIENT PAUSE): the
    agent aborts the DROP instead of committing it, the controller keeps the release for
    its retry, and once Redis answers the retry drops the copy: Redis holds nothing."""
    agent, address, _, redis_server = plane

    async def scenario():
        ctl = controller(address)
        put_shared(agent, "s")
        ctl.driver.restore("s", SHARED, 40, 0.0)
        with redis.Redis.from_url(redis_server.url) as admin:
            admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")  # scripts wait; reads still answer
            try:
                ctl.close_session("s")
                await ctl.quiesce()
                assert ctl.unreleased == {"s": SHARED} and "s" not in ctl.state.sessions
                assert admin.hexists("{lull}:records", "s")  # still there: nothing committed
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
        await ctl.retry_releases()
        assert ctl.unreleased == {} and agent.shared.sessions() == {}
        agent.shared.check_integrity()

    run(scenario)


def test_a_copy_left_in_redis_by_a_stall_is_collected_by_the_next_pass(plane):
    """A demotion to the shared tier aborted while Redis stalls cannot undo its copy there:
    an orphan no session references. The session stays booked in DRAM, with its DRAM copy;
    the next pass drops the orphan, and Redis's contents match the books again."""
    agent, address, engine, redis_server = plane

    async def scenario():
        ctl = controller(address)
        engine.write_through("d", 40)
        agent.dram.set_label("d", "dram")
        ctl.driver.restore("d", DRAM1, 40, 0.0)
        agent.prepare("m1", "d", MoveKind.DEMOTE, Tier.DRAM, Tier.SHARED, "r1", lease_s=30, now=0.0)
        with redis.Redis.from_url(redis_server.url) as admin:
            admin.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
            try:
                assert agent.abort("m1", "plan changed") == "aborted"
            finally:
                admin.execute_command("CLIENT", "UNPAUSE")
        assert "d" in agent.shared.sessions()  # the orphan
        done = await Reconciler(lambda: ctl, ctl.mover).reconcile()
        assert done.orphans == [("d", SHARED)] and done.lost == []
        assert agent.shared.sessions() == {} and agent.dram.session("d") is not None
        assert ctl.state.get("d").location == DRAM1
        agent.shared.check_integrity()

    run(scenario)


async def until(condition, what: str, timeout_s: float = 5.0) -> None:
    """Wait for something a background loop does against a real server (no order to await)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_redis_restarted_empty_under_resident_sessions_every_next_call_runs_recomputed(plane):
    """The issue's end-to-end case, without an engine. s1..s3 are demoted by the planner
    into the shared tier (no DRAM tier) as s2..s4 arrive; Redis restarts empty. The
    controller's reconciliation loop (periodic passes off: only its probe can trigger one)
    books s1..s3 as recomputed, so the books' shared tier matches Redis (empty) before any
    call; then each session's next call is admitted at once, and the books match Redis after."""
    agent, address, engine, redis_server = plane

    async def scenario():
        clock = FakeClock()
        ctl = LiveController(GrpcMover({"n1": address}, timeout_s=5), clock=lambda: clock.now)
        ctl.add_replica("r1", "n1", 300, 0)
        ctl.set_shared_capacity(10_000)
        for i in range(1, 5):
            await ctl.admit(f"s{i}", "t", 200, 50, timeout_s=2)  # demotes the one before to the shared tier
            engine.finish(ctl, f"s{i}", 240)
        shared_books = lambda: {s for s, r in ctl.state.sessions.items() if r.location == SHARED}  # noqa: E731
        assert shared_books() == set(agent.shared.sessions()) == {"s1", "s2", "s3"}
        reconciler = Reconciler(lambda: ctl, ctl.mover)
        await reconciler.shared_restarted()  # the instance the loop will compare with
        loop = asyncio.create_task(reconciler.run(interval_s=0, probe_s=0.05))
        try:
            await asyncio.to_thread(redis_server.restart)
            await until(lambda: not shared_books(), "the books to drop the shared tier's sessions")
        finally:
            loop.cancel()
        assert agent.shared.sessions() == {} and {ctl.state.get(f"s{i}").location for i in (1, 2, 3)} == {WAITING}
        for i in (1, 2, 3):
            admission = await ctl.admit(f"s{i}", "t", 260, 20, timeout_s=2)
            assert admission.waited_s == 0.0 and ctl.state.get(f"s{i}").location == GPU1
            engine.finish(ctl, f"s{i}", 270)
        assert shared_books() == set(agent.shared.sessions()) == {"s1", "s2", "s4"}  # s3 runs last, in HBM
        agent.shared.check_integrity()
        ctl.check_integrity()

    run(scenario)
