"""A session's calls over its life: calls that share a session take turns, a caller that
leaves withdraws its call, and an idle session expires.

The same set-up as test_live_controller.py: real node agents behind real gRPC, the real
``LiveController`` and ``GrpcMover``, a ``FakeClock``; only the engine's write-through is
done by hand (``tests.support.Engine``), since no engine runs here.
"""

from __future__ import annotations

import asyncio

import pytest

from controller.policy import Location, Phase, Tier
from controller.runtime import GateTimeout, GrpcMover, LiveController, SessionClosed
from controller.runtime.actor import Controller
from tests.support import FakeClock
from tests.unit.test_live_controller import GPU, DRAM, controller, gated, plane, run, s1_running, where  # noqa: F401

GPU_R1 = Location(Tier.GPU, "r1")


async def queued(ctl: LiveController, session_id: str, prompt: int, max_tokens: int = 50, timeout_s: float = 5):
    """Start a call of a session whose previous call runs or waits; returns its task once it queues."""
    before = ctl.snapshot()["queued"]
    task = asyncio.create_task(ctl.admit(session_id, "t", prompt, max_tokens, timeout_s))
    await asyncio.sleep(0)
    assert not task.done() and ctl.snapshot()["queued"] == before + 1
    ctl.check_integrity()
    return task


def test_a_second_call_of_a_running_session_waits_for_the_first_then_runs_in_order(plane):
    _, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_running(addresses)  # s1's first call runs: 250 of 300
        second = await queued(ctl, "s1", 240, 20)
        third = await queued(ctl, "s1", 260, 20)
        assert ctl.state.get("s1").request.need_tokens == 250  # the books hold the first call only
        clock.advance(2.0)
        engines["r1"].finish(ctl, "s1", 230)
        admitted = await second
        assert admitted.replica_id == "r1" and not third.done()
        record = ctl.state.get("s1")
        assert record.phase is Phase.LLM and record.footprint == 260 and ctl.snapshot()["queued"] == 1
        ctl.check_integrity()
        engines["r1"].finish(ctl, "s1", 250)
        assert (await third).replica_id == "r1" and ctl.state.get("s1").footprint == 280
        ctl.check_integrity()

    run(scenario)


def test_a_call_queued_behind_a_gated_one_times_out_with_its_reason_and_leaves_no_trace(plane):
    _, addresses, engines = plane

    async def scenario():
        ctl, _ = await s1_running(addresses)
        first = await gated(ctl, "s2", 150)
        with pytest.raises(GateTimeout, match="waiting for the session's previous call to end"):
            await ctl.admit("s2", "t", 160, 50, timeout_s=0.05)
        assert ctl.snapshot()["queued"] == 0 and ctl.state.get("s2").phase is Phase.GATED
        ctl.check_integrity()
        engines["r1"].finish(ctl, "s1", 240)
        assert (await first).replica_id == "r1"
        ctl.check_integrity()

    run(scenario)


def test_closing_a_session_fails_its_queued_calls_and_a_later_call_opens_it_afresh(plane):
    _, addresses, engines = plane

    async def scenario():
        ctl, _ = await s1_running(addresses)
        waiting = await queued(ctl, "s1", 100)
        ctl.close_session("s1")  # while its call runs: released once the call ends
        with pytest.raises(SessionClosed):
            await waiting
        later = await queued(ctl, "s1", 100)  # the close is not carried out yet: it waits for it
        engines["r1"].finish(ctl, "s1", 240)
        admitted = await later
        record = ctl.state.get("s1")
        assert admitted.replica_id == "r1" and not record.closing and record.history.calls_completed == 0
        ctl.check_integrity()

    run(scenario)


def test_a_cancelled_gated_call_withdraws_and_the_gpu_tier_returns_to_its_baseline(plane):
    _, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_running(addresses)  # the GPU tier is full: s1 holds 250 of 300
        baseline = ctl.state.used[GPU_R1]
        waiting = await gated(ctl, "s2", 150)
        behind = await queued(ctl, "s2", 150)  # a second caller of s2 queues behind the first
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        ctl.check_integrity()
        behind.cancel()
        with pytest.raises(asyncio.CancelledError):
            await behind
        assert ctl.snapshot()["gated"] == 0 and ctl.snapshot()["queued"] == 0
        assert ctl.state.get("s2").phase is Phase.TOOL and "s2" not in ctl.state.attention
        clock.advance(1.0)
        engines["r1"].finish(ctl, "s1", 240)  # capacity frees; nobody waits for it
        await ctl.quiesce()
        assert ctl.state.used[GPU_R1] == 240 and ctl.state.residents[GPU_R1] == {"s1"}
        ctl.check_integrity()
        assert (await ctl.admit("s2", "t", 150, 50, timeout_s=1)).replica_id == "r1"  # the same session, again
        ctl.check_integrity()
        assert ctl.state.used[GPU_R1] <= baseline

    run(scenario)


def test_a_call_admitted_just_before_its_caller_left_gives_its_reservation_back(plane):
    """mori admits only on a planning step: the step admits the call, and the cancel reaches
    the caller before it resumes, as when ray.cancel races an admission."""
    _, addresses, _ = plane

    async def scenario():
        ctl, _ = controller(addresses, policy="mori")
        waiting = await gated(ctl, "s1", 100)
        await ctl.plan_step()  # admits s1 (nothing to move, so nothing yields here)
        assert ctl.state.get("s1").phase is Phase.LLM and not waiting.done()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        record = ctl.state.get("s1")
        assert (record.phase, record.location, record.context_tokens) == (Phase.TOOL, Location(Tier.WAITING), 0)
        assert ctl.state.used[GPU_R1] == 0 and record.history.is_new  # the lost call counts nowhere
        ctl.check_integrity()
        again = asyncio.create_task(ctl.admit("s1", "t", 100, 50, timeout_s=1))
        await asyncio.sleep(0)
        await ctl.plan_step()
        assert (await again).replica_id == "r1"

    run(scenario)


def test_the_gateway_reports_an_admitted_call_that_never_ran_and_the_session_keeps_its_old_kv(plane):
    """The contract for a caller that got its admission and then left: call_failed with
    started=False. A session whose KV was in the GPU tier keeps it there, as it was."""
    _, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_running(addresses)
        clock.advance(1.0)
        engines["r1"].finish(ctl, "s1", 240)
        await ctl.admit("s1", "t", 245, 50, timeout_s=1)  # the next call: 295 reserved
        assert ctl.state.used[GPU_R1] == 295
        await Controller(ctl).call_failed("s1", started=False)
        record = ctl.state.get("s1")
        assert (record.phase, record.location, record.context_tokens, ctl.state.used[GPU_R1]) == (
            Phase.TOOL, GPU_R1, 240, 240)
        ctl.check_integrity()

    run(scenario)


def test_sessions_idle_past_the_ttl_leave_every_tier_and_busy_ones_stay(plane):
    agents, addresses, engines = plane

    async def scenario():
        clock = FakeClock()
        ctl = LiveController(GrpcMover(addresses, timeout_s=5), clock=lambda: clock.now, session_ttl_s=60)
        ctl.add_replica("r1", "n1", GPU, DRAM)
        ctl.set_shared_capacity(1000)
        await ctl.admit("s1", "t", 200, 50, timeout_s=1)
        waiting = await gated(ctl, "s2", 150)
        engines["r1"].finish(ctl, "s1", 240)  # s2 displaces s1 to DRAM
        await waiting
        ctl.driver.restore("s3", Location(Tier.SHARED), 100, clock.now)  # as a restart finds one there
        clock.advance(30.0)
        engines["r1"].finish(ctl, "s2", 190)  # s2 was active 30 s later than the others
        await ctl.quiesce()
        assert {where(ctl, s).tier for s in ("s1", "s2", "s3")} == {Tier.GPU, Tier.DRAM, Tier.SHARED}
        await ctl.admit("s4", "t", 50, 10, timeout_s=1)  # s4's call runs on through the ticks
        clock.advance(40.0)  # s1 and s3: 70 s idle, s2: 40 s
        await ctl.tick()
        assert set(ctl.state.sessions) == {"s2", "s4"} and agents["n1"].dram.session("s1") is None
        clock.advance(30.0)
        await ctl.tick()
        assert set(ctl.state.sessions) == {"s4"} and agents["n1"].dram.session("s2") is None
        assert all(used == 0 for w, used in ctl.state.used.items() if w != GPU_R1)
        assert ctl.state.used[GPU_R1] == 60 and ctl.state.get("s4").phase is Phase.LLM
        ctl.check_integrity()

    run(scenario)


def test_a_session_ttl_of_zero_never_expires_and_a_negative_one_is_refused(plane):
    _, addresses, _ = plane

    async def scenario():
        ctl, clock = controller(addresses)
        await ctl.admit("s1", "t", 10, 5, timeout_s=1)
        ctl.call_finished("s1", 12)
        clock.advance(1e9)
        await ctl.tick()
        assert "s1" in ctl.state.sessions
        with pytest.raises(ValueError, match="session_ttl_s must be >= 0"):
            LiveController(ctl.mover, session_ttl_s=-1)

    run(scenario)
