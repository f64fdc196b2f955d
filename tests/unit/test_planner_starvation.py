"""The planner's anti-starvation rule: a request that has waited ``starvation_age_s``
goes first and holds a GPU tier, so no request waits past a bound while capacity
exists. Driven like the controller drives the planner (event, plan, apply, a 1 s
tick), on a fake clock, with integrity checked after every step."""

from __future__ import annotations

import heapq
import itertools

import pytest

from controller.policy import PlannerConfig
from tests.support import PolicyDriver

CALL_S = 10.0  # every call runs this long
TICK_S = 1.0
SMALL = (250, 50)  # prompt, max output: 300 of the 1000-token GPU tier
BIG = (850, 50)  # 900: needs the tier nearly empty


def _run(config: PlannerConfig, horizon: float = 600.0, every: float = 4.0) -> dict[str, float | None]:
    """Small new sessions arrive every ``every`` s (one call each, then they close),
    the big one at 1 s. Returns each request's wait from arrival to admission (None:
    never admitted)."""
    driver = PolicyDriver.make({"r0": (1000, 0)}, config=config)
    state = driver.state
    order = itertools.count()
    events: list[tuple[float, int, str, str]] = []
    sizes: dict[str, tuple[int, int]] = {"big": BIG}
    heapq.heappush(events, (1.0, next(order), "arrive", "big"))
    for k in range(int(horizon / every)):
        sizes[f"s{k}"] = SMALL
        heapq.heappush(events, (k * every, next(order), "arrive", f"s{k}"))
    for k in range(int(horizon / TICK_S)):
        heapq.heappush(events, (k * TICK_S + 0.5, next(order), "tick", ""))
    arrived: dict[str, float] = {}
    waits: dict[str, float | None] = dict.fromkeys(sizes)
    while events:
        now, _, kind, sid = heapq.heappop(events)
        driver.clock.now = now
        if kind == "arrive":
            state.open_session(sid, now)
            state.request_arrived(sid, now, *sizes[sid])
            arrived[sid] = now
        elif kind == "done":
            prompt, out = sizes[sid]
            state.call_finished(sid, now, prompt + out)
            state.close_session(sid, now)
        for admit in driver.step().admits:
            waits[admit.session_id] = now - arrived[admit.session_id]
            heapq.heappush(events, (now + CALL_S, next(order), "done", admit.session_id))
    return waits


def test_without_the_rule_smaller_requests_backfill_and_the_large_one_starves():
    waits = _run(PlannerConfig(starvation_age_s=None))
    # Admitted only once the small ones stopped coming (600 s): until then a small call
    # always runs, and each freed slot goes to the next small request.
    assert waits["big"] is not None and waits["big"] > 600.0 - 1.0
    assert all(w is not None for s, w in waits.items() if s != "big" and int(s[1:]) < 140)


@pytest.mark.parametrize("age", [15.0, 30.0, 60.0])
def test_no_request_waits_past_its_age_plus_one_call_while_capacity_exists(age):
    waits = _run(PlannerConfig(starvation_age_s=age))
    bound = age + CALL_S + TICK_S  # held tier: running calls end, nothing younger starts
    assert waits["big"] is not None and waits["big"] <= bound
    served = [w for s, w in waits.items() if w is not None]
    assert len(served) >= len(waits) - 3  # only the last arrivals may still wait at the end
    assert max(served) <= bound


def test_the_age_must_be_positive():
    with pytest.raises(ValueError, match="starvation_age_s"):
        PlannerConfig(starvation_age_s=0.0)
