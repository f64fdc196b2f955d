"""``lull bench``'s decision about sessions still open before a run, from snapshots shaped
as ``LiveController.snapshot`` returns them (one is taken from a real controller)."""

from __future__ import annotations

import asyncio

import pytest

from controller.cli.bench.leftovers import DRAIN_S, LeftoverWait, decide
from controller.runtime.live import LiveController
from tests.unit.test_gateway_rest import NoMoves


def snap(*sessions: dict, ttl: float = 60.0, gated: int = 0) -> dict:
    return {"sessions": list(sessions), "gated": gated, "queued": 0, "session_ttl_s": ttl, "tiers": []}


def session(idle_s: float = 0.0, phase: str = "tool", closing: bool = False) -> dict:
    return {"session_id": "s", "phase": phase, "idle_s": idle_s, "closing": closing}


def test_empty_books_go_and_closed_sessions_are_waited_for():
    assert decide(snap()).action == "go"
    closing = decide(snap(session(closing=True), ttl=0))
    assert (closing.action, closing.wait_s) == ("wait", DRAIN_S)


def test_leftovers_under_a_short_ttl_are_waited_out_until_the_last_expires():
    plan = decide(snap(session(idle_s=50), session(idle_s=10), session(phase="llm")))
    assert plan.action == "wait" and plan.count == 3
    assert plan.wait_s == 60 + DRAIN_S  # the running one expires a whole TTL after its call
    assert "policy.session_idle_ttl_s = 60 s" in plan.message and "about 60 s" in plan.message
    assert decide(snap(session(idle_s=50), session(idle_s=10))).wait_s == 50 + DRAIN_S


@pytest.mark.parametrize("ttl, why", [(0, "never expire"), (3600, "only after 3600 s idle")])
def test_leftovers_that_would_take_too_long_are_refused_naming_the_setting(ttl, why):
    plan = decide(snap(session(idle_s=5), ttl=ttl))
    assert plan.action == "refuse" and why in plan.message
    assert "lull up --set policy.session_idle_ttl_s=60" in plan.message
    with pytest.raises(ValueError, match="policy.session_idle_ttl_s"):
        LeftoverWait().step(snap(session(), ttl=ttl), 0.0)


def test_the_wait_reports_progress_sparingly_and_gives_up_at_its_first_bound():
    wait = LeftoverWait()
    done, line = wait.step(snap(session(idle_s=30), session(idle_s=30)), 0.0)
    assert not done and "2 session(s)" in line
    assert wait.step(snap(session(idle_s=31), session(idle_s=31)), 1.0) == (False, None)  # nothing new
    assert "1 session(s)" in wait.step(snap(session(idle_s=32)), 2.0)[1]  # one expired: said at once
    assert wait.step(snap(session(idle_s=33)), 3.0)[1] is None
    assert wait.step(snap(session(idle_s=45)), 15.0)[1] is not None  # unchanged, but 10 s on
    with pytest.raises(RuntimeError, match="still open after 91 s; is another client"):
        wait.step(snap(session(idle_s=0)), 30 + DRAIN_S + 1)  # a client that keeps it busy
    assert LeftoverWait().step(snap(), 5.0) == (True, None)


def test_a_real_controllers_snapshot_carries_what_the_decision_reads():
    async def scenario():
        clock = [0.0]
        ctl = LiveController(NoMoves(), clock=lambda: clock[0], session_ttl_s=30)
        ctl.add_replica("r1", "n1", 300, 300)
        await ctl.admit("s1", "t", 10, 5, timeout_s=1)
        ctl.call_finished("s1", 12)
        clock[0] = 20.0
        return decide(ctl.snapshot())

    plan = asyncio.run(scenario())
    assert plan.action == "wait" and plan.wait_s == 10 + DRAIN_S
