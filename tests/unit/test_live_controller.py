"""The live controller against real node agents over real gRPC, without an engine.

Each node runs a real ``NodeAgent`` with a real ``DramStore`` (in a tmp dir) behind
its real in-process gRPC server (``workers.node_agent_service.serve``); the
controller moves KV through ``GrpcMover``. What the engine's KV connector would
write through to the DRAM tier when a call finishes is stored by hand with
``DramStore.put_session`` from a second store object on the same folder, as the
engine's own process would (``Engine.finish``). The clock is a ``FakeClock``;
no sleep orders events: a test awaits the task or the planning step it depends on.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

from controller.policy import Location, Phase, Tier, UnknownSession
from controller.runtime import GateTimeout, GrpcMover, LiveController, SessionClosed
from proto import tiers_pb2
from tests.support import INTERNAL_TOKEN, Engine, FakeClock
from workers.dram_store import DramStore
from workers.node_agent import NodeAgent
from workers.node_agent_service import serve

GPU, DRAM = 300, 300  # KV tokens per replica


@pytest.fixture
def plane(tmp_path, monkeypatch):
    """Nodes n1, n2, each with one replica (r1, r2), its agent and gRPC server."""
    monkeypatch.setenv("LULL_INTERNAL_TOKEN", INTERNAL_TOKEN)  # what GrpcMover sends
    agents, servers, addresses, engines = {}, [], {}, {}
    for node, replica in (("n1", "r1"), ("n2", "r2")):
        folder = tmp_path / node
        agent = NodeAgent(node, DramStore(folder, 1 << 20), None, dram_dir=str(folder))
        server, port, _ = serve(agent, 0, host="127.0.0.1", token=INTERNAL_TOKEN)
        agents[node], addresses[node] = agent, f"127.0.0.1:{port}"
        engines[replica] = Engine(DramStore(folder, 1 << 20), replica)
        servers.append(server)
    yield agents, addresses, engines
    for server in servers:
        server.stop(None)


def unused_port() -> int:
    """A port nothing listens on (bound, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), timeout=15))


def controller(addresses, policy="lull", replicas=("r1",)):
    clock = FakeClock()
    ctl = LiveController(GrpcMover(addresses, timeout_s=5), policy=policy, clock=lambda: clock.now)
    for replica in replicas:
        ctl.add_replica(replica, "n" + replica[1:], GPU, DRAM)
    return ctl, clock


async def s1_running(addresses):
    """A controller over r1 where session s1's call runs, holding 250 of its 300 tokens."""
    ctl, clock = controller(addresses)
    await ctl.admit("s1", "t", 200, 50, timeout_s=1)
    return ctl, clock


async def s1_demoted_to_dram(addresses, engines):
    """``s1_running``, then s2 waits until s1's call ends: s1 is demoted to DRAM, and s2 runs."""
    ctl, clock = await s1_running(addresses)
    waiting = await gated(ctl, "s2", 150)
    engines["r1"].finish(ctl, "s1", 240)
    await waiting
    return ctl, clock


async def gated(ctl: LiveController, session_id: str, prompt: int, max_tokens: int = 50, timeout_s: float = 5):
    """Start a request that must wait; returns its task once it waits at the gate."""
    task = asyncio.create_task(ctl.admit(session_id, "t", prompt, max_tokens, timeout_s))
    await asyncio.sleep(0)  # one turn: the request arrives, is planned and reaches the gate
    assert not task.done() and ctl.state.get(session_id).phase is Phase.GATED
    ctl.check_integrity()
    return task


def where(ctl: LiveController, session_id: str) -> Location:
    return ctl.state.get(session_id).location


def test_admit_is_immediate_when_there_is_room(plane):
    _, addresses, _ = plane

    async def scenario():
        ctl, _ = controller(addresses)
        admission = await ctl.admit("s1", "t", 200, 50, timeout_s=1)
        assert (admission.replica_id, admission.tier_label, admission.waited_s) == ("r1", "gpu", 0.0)
        assert where(ctl, "s1") == Location(Tier.GPU, "r1") and ctl.state.get("s1").phase is Phase.LLM
        ctl.check_integrity()
        status = ctl.snapshot()
        assert status["sessions"][0]["tier"] == "gpu" and status["sessions"][0]["phase"] == "llm"
        assert {"tier": "gpu", "replica": "r1", "node": "n1", "used_tokens": 250, "capacity_tokens": GPU,
                "sessions": 1} in status["tiers"]

    run(scenario)


def test_second_session_waits_until_the_first_is_demoted_in_its_tool_call(plane):
    agents, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_running(addresses)
        waiting = await gated(ctl, "s2", 150)  # 200 tokens; s1 holds 250 of 300 in its call
        clock.advance(3.0)
        engines["r1"].finish(ctl, "s1", 240)  # s1 goes into a tool call: s2 displaces it
        admission = await waiting
        assert admission.replica_id == "r1" and admission.waited_s == 3.0
        assert where(ctl, "s1") == Location(Tier.DRAM, "r1") and where(ctl, "s2") == Location(Tier.GPU, "r1")
        assert agents["n1"].dram.session("s1").label == "dram"  # the agent moved it: DRAM owns it now
        ctl.check_integrity()

    run(scenario)


def test_gate_timeout_says_how_long_and_why_and_withdraws_the_request(plane):
    _, addresses, engines = plane

    async def scenario():
        ctl, _ = await s1_running(addresses)
        with pytest.raises(GateTimeout, match=r"held 0\.05 s at the gate .*waiting for GPU capacity") as caught:
            await ctl.admit("s2", "t", 150, 50, timeout_s=0.05)
        assert caught.value.session_id == "s2"
        assert ctl.state.get("s2").phase is Phase.TOOL and "s2" not in ctl.state.attention
        ctl.check_integrity()
        engines["r1"].finish(ctl, "s1", 240)
        await ctl.quiesce()
        assert (await ctl.admit("s2", "t", 150, 50, timeout_s=1)).waited_s == 0.0  # the retry runs
        ctl.check_integrity()

    run(scenario)


def test_a_request_larger_than_any_replica_is_refused_before_it_opens_anything(plane):
    _, addresses, _ = plane

    async def scenario():
        ctl, _ = controller(addresses)
        with pytest.raises(ValueError, match="needs 301 KV tokens.*largest replica holds 300"):
            await ctl.admit("big", "t", 300, 1, timeout_s=1)
        assert "big" not in ctl.state.sessions
        with pytest.raises(UnknownSession):
            ctl.call_finished("nope", 10)
        with pytest.raises(UnknownSession):
            ctl.tool_call_started("nope")

    run(scenario)


def test_a_refused_move_leaves_the_books_unchanged_and_a_later_step_retries(plane):
    agents, addresses, engines = plane

    async def scenario():
        ctl, _ = await s1_running(addresses)
        engines["r1"].finish(ctl, "s1", 240, written=False)  # the write-through failed
        await ctl.quiesce()
        waiting = asyncio.create_task(ctl.admit("s2", "t", 150, 50, timeout_s=5))
        await asyncio.sleep(0)  # s2's own planning step starts: the agent refuses to demote s1
        await ctl.plan_step()  # queued behind it; refused again
        assert not waiting.done() and where(ctl, "s1") == Location(Tier.GPU, "r1")
        assert ctl.state.get("s2").phase is Phase.GATED and agents["n1"].dram.session("s1") is None
        ctl.check_integrity()
        engines["r1"].write_through("s1", 240)  # a later save got through
        await ctl.plan_step()  # the backstop tick
        assert (await waiting).replica_id == "r1" and where(ctl, "s1") == Location(Tier.DRAM, "r1")
        ctl.check_integrity()

    run(scenario)


def test_rebuild_from_the_agents_reports_gives_the_same_locations(plane):
    _, addresses, engines = plane

    async def scenario():
        ctl, clock = controller(addresses, replicas=("r1", "r2"))
        await ctl.admit("s1", "t", 200, 50, timeout_s=1)
        replica = (await ctl.admit("s3", "t", 100, 20, timeout_s=1)).replica_id
        waiting = await gated(ctl, "s2", 150)
        clock.advance(2.0)
        engines[replica].finish(ctl, "s3", 110)
        engines["r1"].finish(ctl, "s1", 240)
        second = (await waiting).replica_id
        clock.advance(1.0)
        engines[second].finish(ctl, "s2", 190)
        await ctl.quiesce()
        before = {s: (r.location, r.context_tokens) for s, r in ctl.state.sessions.items()}
        assert {w.tier for w, _ in before.values()} == {Tier.GPU, Tier.DRAM}  # s2 displaced one of them

        reports = [await ctl.mover.report(node) for node in ("n1", "n2")]
        assert any(kv.location.tier == tiers_pb2.TIER_DRAM for report in reports for kv in report.sessions)
        fresh, _ = controller(addresses, replicas=("r1", "r2"))
        fresh.rebuild(reports)
        after = {s: (r.location, r.context_tokens) for s, r in fresh.state.sessions.items()}
        assert after == before
        assert all(r.idleness(100.0) == 0.0 for r in fresh.state.sessions.values())  # history is lost
        fresh.check_integrity()

    run(scenario)


def test_closing_a_gated_session_fails_its_request_and_a_closed_session_frees_its_kv(plane):
    agents, addresses, engines = plane

    async def scenario():
        ctl, _ = await s1_running(addresses)
        waiting = await gated(ctl, "s2", 150)
        ctl.close_session("s2")
        with pytest.raises(SessionClosed):
            await waiting
        engines["r1"].finish(ctl, "s1", 240)
        ctl.close_session("s1")
        await ctl.quiesce()
        assert ctl.state.sessions == {} and agents["n1"].dram.session("s1") is None
        ctl.check_integrity()

    run(scenario)


def test_a_failed_release_is_retried_until_the_copy_is_gone(plane):
    """No tier drops a copy on its own, so a release that failed (an agent's blip) must be
    carried out later, or the closed session's KV holds DRAM for good."""
    agents, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_demoted_to_dram(addresses, engines)
        assert agents["n1"].dram.session("s1").label == "dram"
        real_release, calls = ctl.mover.release, []

        async def failing_once(*args):
            calls.append(args)
            if len(calls) == 1:
                raise ConnectionError("agent restarting")
            return await real_release(*args)

        ctl.mover.release = failing_once
        ctl.close_session("s1")
        await ctl.quiesce()
        assert "s1" not in ctl.state.sessions and agents["n1"].dram.session("s1") is not None
        assert ctl.unreleased == {"s1": Location(Tier.DRAM, "r1")}
        await ctl.retry_releases()
        assert len(calls) == 2 and ctl.unreleased == {} and agents["n1"].dram.session("s1") is None
        ctl.check_integrity()

    run(scenario)


def test_a_release_the_agent_did_not_commit_is_retried(plane):
    """The real mover answers False, without raising, when the agent cannot be reached (a
    restart): that release is kept and carried out once the agent is back."""
    agents, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_demoted_to_dram(addresses, engines)
        ctl.mover.set_agent("n1", f"127.0.0.1:{unused_port()}")  # n1's agent is away
        ctl.mover.timeout_s = 1.0
        ctl.close_session("s1")
        await ctl.quiesce()
        assert ctl.unreleased == {"s1": Location(Tier.DRAM, "r1")}
        await ctl.retry_releases()  # still away: kept
        assert ctl.unreleased == {"s1": Location(Tier.DRAM, "r1")} and agents["n1"].dram.session("s1") is not None
        ctl.mover.set_agent("n1", addresses["n1"])  # back
        await ctl.retry_releases()
        assert ctl.unreleased == {} and agents["n1"].dram.session("s1") is None
        ctl.check_integrity()

    run(scenario)


def test_mori_waits_for_the_tick_and_has_no_shared_tier(plane):
    _, addresses, _ = plane

    async def scenario():
        ctl, _ = controller(addresses, policy="mori")
        ctl.set_shared_capacity(1000)
        assert ctl.state.capacity[Location(Tier.SHARED)] == 0
        waiting = await gated(ctl, "s1", 100)  # room enough, but mori decides only on its tick
        assert ctl.snapshot()["gated"] == 1
        await ctl.plan_step()
        assert (await waiting).tier_label == "gpu"

        lull, _ = controller(addresses)
        lull.set_shared_capacity(1000)
        assert lull.state.capacity[Location(Tier.SHARED)] == 1000
        assert (await lull.admit("s1", "t", 100, 50, timeout_s=1)).waited_s == 0.0  # at once, no tick

    run(scenario)


def test_lru_offload_admits_everything_at_once_sticky_and_moves_nothing(plane):
    agents, addresses, engines = plane

    async def scenario():
        ctl, _ = controller(addresses, policy="lru-offload", replicas=("r1", "r2"))
        first = await ctl.admit("s1", "t", 200, 50, timeout_s=1)
        assert (first.replica_id, first.tier_label) == ("r1", "dram")  # write through, then vLLM's LRU
        assert (await ctl.admit("s2", "t", 200, 50, timeout_s=1)).replica_id == "r2"  # least loaded
        assert (await ctl.admit("s3", "t", 200, 50, timeout_s=1)).replica_id == "r1"  # no gate: over HBM
        engines["r1"].finish(ctl, "s1", 240, tier_label=first.tier_label)
        again = await ctl.admit("s1", "t", 245, 50, timeout_s=1)
        assert again.replica_id == "r1" and again.waited_s == 0.0  # sticky
        assert agents["n1"].dram.session("s1").label == "gpu"  # the write-through's: the controller never moved it
        ctl.check_integrity()

    run(scenario)


def test_gate_waits_count_the_queue_now_and_the_waits_that_just_ended(plane):
    """The autoscaler's signal: a gate queue that formed and drained between two of its
    looks still shows, for ``RECENT_WAITS_S``; then it is forgotten."""
    _, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_running(addresses)
        assert ctl.gate_waits() == [0.0]  # s1's own admission, at once
        waiting = await gated(ctl, "s2", 150)
        clock.advance(2.0)
        assert sorted(ctl.gate_waits()) == [0.0, 2.0]  # s2 has waited 2 s so far
        engines["r1"].finish(ctl, "s1", 240)
        await waiting
        clock.advance(1.0)
        assert sorted(ctl.gate_waits()) == [0.0, 2.0]  # s2 left the gate after 2 s, 1 s ago
        clock.advance(10.0)
        assert ctl.gate_waits() == []

    run(scenario)


def test_with_no_replica_a_request_waits_for_one_instead_of_being_refused(plane):
    """All replicas died (or none has started yet): the request waits at the gate and
    runs on the first replica that registers; it is not refused as too large."""
    _, addresses, _ = plane

    async def scenario():
        ctl, _ = controller(addresses, replicas=())
        waiting = asyncio.create_task(ctl.admit("s1", "t", 200, 50, timeout_s=5))
        await asyncio.sleep(0.05)
        assert not waiting.done() and ctl.state.get("s1").phase is Phase.GATED
        ctl.add_replica("r1", "n1", GPU, DRAM)
        assert (await waiting).replica_id == "r1"
        with pytest.raises(GateTimeout, match="no engine replica is running"):
            ctl.remove_replica("r1")
            await ctl.admit("s2", "t", 10, 5, timeout_s=0.05)

    run(scenario)


def test_one_sessions_state_is_its_snapshot_entry_looked_up_by_key(plane, monkeypatch):
    """GetSessionState answers from the session's record, without building the snapshot
    of every session (which cost seconds of the controller's loop at 100 k sessions)."""
    _, addresses, _ = plane

    async def scenario():
        ctl, clock = await s1_running(addresses)
        for i in range(1000):
            ctl.state.open_session(f"idle-{i}", clock.now)
        entry = next(s for s in ctl.snapshot()["sessions"] if s["session_id"] == "s1")
        monkeypatch.setattr(ctl, "snapshot", lambda: pytest.fail("session_state built the whole snapshot"))
        assert ctl.session_state("s1") == entry and ctl.session_state("unknown") is None

    run(scenario)

