"""The planner's index of waiting requests (``controller.policy.waiting``): a plan on a
large backlog tries only the requests that may fit, yet still reports every held one."""

from controller.policy import TierPlanner
from controller.policy.types import HELD_REASON
from tests.support import PolicyDriver


class CountingPlanner(TierPlanner):
    """A real planner that counts how many sessions each plan ranks (a placement try)."""

    ranked = 0

    def _promotion_key(self, view, record):
        CountingPlanner.ranked += 1
        return super()._promotion_key(view, record)


def test_a_plan_tries_only_what_may_fit_and_gates_every_held_request():
    driver = PolicyDriver.make({"r0": (1000, 0), "r1": (1000, 0)})
    driver.planner = CountingPlanner()
    for replica_load in ("big0", "big1"):  # running calls pin 900 of each GPU tier
        driver.state.open_session(replica_load, 0.0)
        driver.state.request_arrived(replica_load, 0.0, 800, 100)
    driver.step()
    backlog = [f"s{i}" for i in range(500)]
    for session_id in backlog:  # each needs 200: above the 100 left on either replica
        driver.state.open_session(session_id, 0.0)
        driver.state.request_arrived(session_id, 0.0, 150, 50)
    CountingPlanner.ranked = 0
    plan = driver.step()
    assert CountingPlanner.ranked == 0, "no held request was ranked or tried"
    assert {g.session_id for g in plan.gates} == set(backlog)
    assert all(g.reason == HELD_REASON for g in plan.gates)
    driver.state.open_session("small", 0.0)
    driver.state.request_arrived("small", 0.0, 50, 50)
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["small"] and CountingPlanner.ranked == 1
    assert len(plan.gates) == len(backlog)
    driver.clock.advance(10.0)
    driver.state.call_finished("big0", driver.clock.now, 850)  # 150 freed on r0 (its KV stays, movable)
    plan = driver.step()
    assert len(plan.admits) == 4, "freed room goes to the oldest of the backlog, by the walk's order"
    assert [a.session_id for a in plan.admits] == backlog[:4]
