"""The anti-starvation rule when HBM cannot hold every program's KV: a recomputed
session keeps HBM for a tenure, and KV is rebuilt one session at a time per GPU tier.

Without that, each aged request whose KV was gone displaced a session that had just
been recomputed into HBM; that one aged in turn and pushed back: nearly every call was
a recompute (``lull sim``, 1 replica x 80 programs, 128k window, simulated: 192
output tok/s, 45 M recomputed tokens; mori 534). Driven like the controller drives the
planner (event, plan, apply, a 1 s tick), on a fake clock, integrity checked each step.
"""

from __future__ import annotations

import heapq
import itertools

import pytest

from controller.policy import Location, PlannerConfig, Tier
from controller.policy.types import WAITING, Move, MoveReason
from tests.support import PolicyDriver

CALL_S, GAP_S, TICK_S = 5.0, 1.0, 1.0
PROMPT, OUT = 250, 50  # a program holds 250-300 of the 1000-token GPU tier: 3 fit
FIT, PROGRAMS = 3, 8
AGE = 15.0


def _run(age: float | None, horizon: float = 600.0) -> tuple[PolicyDriver, dict[str, list[float]]]:
    """Closed loop: each program calls, waits ``GAP_S``, calls again; no DRAM, so a
    displaced program's KV is dropped and recomputed. Displacement by ordinary requests
    is off: only the aged rule moves KV. Returns the driver and each program's waits."""
    config = PlannerConfig(starvation_age_s=age, displacement=False)
    driver = PolicyDriver.make({"r0": (1000, 0)}, config=config)
    state, order = driver.state, itertools.count()
    events: list[tuple[float, int, str, str]] = []
    waits: dict[str, list[float]] = {f"p{k}": [] for k in range(PROGRAMS)}
    for k, sid in enumerate(waits):
        state.open_session(sid, 0.0)
        heapq.heappush(events, (0.1 * k, next(order), "arrive", sid))
    for k in range(int(horizon / TICK_S)):
        heapq.heappush(events, (k * TICK_S + 0.5, next(order), "tick", ""))
    while events:
        now, _, kind, sid = heapq.heappop(events)
        driver.clock.now = now
        if kind == "arrive":
            state.request_arrived(sid, now, PROMPT, OUT)
        elif kind == "done":
            state.call_finished(sid, now, PROMPT)
            if now + GAP_S < horizon:
                heapq.heappush(events, (now + GAP_S, next(order), "arrive", sid))
        for admit in driver.step().admits:
            waits[admit.session_id].append(now - state.get(admit.session_id).request.arrived_at)
            heapq.heappush(events, (now + CALL_S, next(order), "done", admit.session_id))
    return driver, waits


def _recomputes(driver: PolicyDriver) -> int:
    return sum(1 for plan in driver.plans for move in plan.moves
               if move.reason is MoveReason.PROMOTE and move.src.tier is Tier.WAITING)


def test_aged_requests_rebuild_kv_one_at_a_time():
    driver, waits = _run(AGE)
    calls = sum(len(w) for w in waits.values())
    # The first loads, then one rebuild per tenure at most: the other calls reuse KV in
    # HBM. (Aged requests displacing every resident recomputed 190 of 326 calls.)
    assert _recomputes(driver) <= PROGRAMS + 600 / AGE
    assert _recomputes(driver) < calls / 4


def test_no_program_starves_and_waits_stay_bounded():
    _, waits = _run(AGE)
    assert all(len(w) >= 20 for w in waits.values()), {s: len(w) for s, w in waits.items()}
    # A program waits its age, then for the rebuilds queued before it, each a tenure,
    # a call and a tick at most.
    assert max(max(w) for w in waits.values()) <= AGE + (PROGRAMS - FIT) * (AGE + CALL_S + TICK_S)


def test_without_aging_programs_starve():
    _, waits = _run(None)
    assert sorted(len(w) for w in waits.values())[: PROGRAMS - FIT] == [0] * (PROGRAMS - FIT)


def _resident_and_rebuilt(dram: int) -> PolicyDriver:
    """At 100 s: "old" (400 tokens) in a tool call, and a request of "aged" (KV of 600
    tokens in DRAM, or gone with no DRAM) that needs 700; at 105 s "fresh" is recomputed
    into HBM (250 tokens after its call), so 350 are free. DRAM has ``dram`` - 600 free."""
    driver = PolicyDriver.make({"r0": (1000, dram)}, config=PlannerConfig(starvation_age_s=30.0,
                                                                         displacement=False))
    driver.sessions_with_idleness({"old": 0.5}, tokens=400)
    state, now = driver.state, driver.clock.now
    state.restore_session("aged", Location(Tier.DRAM, "r0") if dram else WAITING, 600, now)
    state.request_arrived("aged", now, 600, 100)
    assert not driver.step().admits
    driver.clock.advance(5.0)
    state.restore_session("fresh", WAITING, 200, driver.clock.now)
    driver.run_call("fresh", 200, 100, seconds=1.0, out=50)
    driver.clock.now = 130.0  # "aged" is aged; "fresh" is in its tenure until 135
    return driver


def test_an_aged_request_does_not_displace_a_session_in_its_tenure():
    driver = _resident_and_rebuilt(dram=2000)
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["aged"]
    # "fresh" is the more idle (in a tool call since 106 s): without the tenure it went first.
    assert {m.session_id for m in plan.moves if m.reason is MoveReason.DISPLACED} == {"old"}
    assert driver.tier_of("fresh") == driver.tier_of("aged")


@pytest.mark.parametrize("dram", [0, 600, 1000], ids=["kv-gone", "dram-full", "dram-short"])
def test_a_request_that_costs_a_recompute_waits_for_the_rebuild_before_it(dram):
    # Its KV is gone, or DRAM (no shared tier) has less room than its 700 tokens.
    driver = _resident_and_rebuilt(dram=dram)
    assert not driver.step().admits  # displacing "old" would make room, but "fresh" was rebuilt at 105
    driver.clock.now = 135.0
    assert [a.session_id for a in driver.step().admits] == ["aged"]


def test_the_index_finds_a_tiers_rebuilt_sessions_until_they_leave_it():
    # ``Rebuilds.tenured`` reads a tier's rebuilt sessions from the index, not its residents:
    # one filed stale (still there after it left, or missing) would change who may force.
    driver = _resident_and_rebuilt(dram=2000)
    state, gpu, dram = driver.state, Location(Tier.GPU, "r0"), Location(Tier.DRAM, "r0")
    state.index.refresh(state)
    assert [s for _, s in state.index.rebuilt_after(gpu, 100.0)] == ["fresh"]
    assert not state.index.rebuilt_after(gpu, 106.0)  # rebuilt at 105 s
    state.apply_move(Move("fresh", gpu, dram, 250, MoveReason.DISPLACED))
    state.index.refresh(state)
    assert not state.index.rebuilt_after(gpu, 100.0)
    state.index.check(state)
