"""The tier planner on small scripted scenarios, driven like the controller drives
it (event, plan, apply) with integrity checked after every step."""

import pytest

from controller.policy import (
    Location,
    MoveReason,
    Phase,
    PlannerConfig,
    ReplicaSpec,
    StaleDecision,
    Tier,
    UnknownSession,
)
from tests.support import PolicyDriver

MORI = {"a": 0.1, "b": 0.4, "c": 0.6, "d": 0.9}


def gpu_residents(driver: PolicyDriver, replica: str = "r0") -> set[str]:
    return set(driver.state.residents[Location(Tier.GPU, replica)])


@pytest.mark.parametrize(("slots", "kept"), [(2, {"a", "b"}), (3, {"a", "b", "c"})])
def test_mori_example_capacity_cut_splits_by_idleness(slots, kept):
    driver = PolicyDriver.make({"r0": (400, 1000)})
    driver.sessions_with_idleness(MORI, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=slots * 100, dram_tokens=1000))
    plan = driver.step()
    assert gpu_residents(driver) == kept
    assert [m.session_id for m in plan.moves] == sorted(set(MORI) - kept, key=lambda s: -MORI[s])
    assert all(m.reason is MoveReason.OVERFLOW and m.dst.tier is Tier.DRAM for m in plan.moves)


@pytest.mark.parametrize(("slots", "kept"), [(2, {"a", "b"}), (3, {"a", "b", "c"})])
def test_mori_example_promotion_and_displacement(slots, kept):
    """All four return with a request while GPU holds others more idle than them."""
    driver = PolicyDriver.make({"r0": (400, 1000)})
    driver.sessions_with_idleness(MORI, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=1000))
    driver.step()
    assert gpu_residents(driver) == set()
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=slots * 100, dram_tokens=1000))
    for session_id in MORI:
        driver.state.request_arrived(session_id, driver.clock.now, 50, 50)
    plan = driver.step()
    assert gpu_residents(driver) == kept
    assert {a.session_id for a in plan.admits} == kept
    assert [a.session_id for a in plan.admits] == sorted(kept, key=MORI.get), "lowest ι first"
    assert {g.session_id for g in plan.gates} == set(MORI) - kept


def test_a_request_displaces_the_most_idle_tool_session_a_prefetch_only_idler_ones():
    driver = PolicyDriver.make({"r0": (400, 1000)})
    driver.sessions_with_idleness(MORI, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=200, dram_tokens=1000))
    driver.step()  # c and d go to DRAM
    driver.state.request_arrived("c", driver.clock.now, 90, 10)
    plan = driver.step()
    # a and b are less idle than c, but c has a request waiting: b, the idler of the
    # two in a tool call, makes room.
    assert [(m.session_id, m.reason) for m in plan.moves] == [
        ("b", MoveReason.DISPLACED), ("c", MoveReason.PROMOTE)]
    assert [a.session_id for a in plan.admits] == ["c"]
    assert gpu_residents(driver) == {"a", "c"}
    driver.state.tool_call_finished("d", driver.clock.now)
    plan = driver.step()
    # d's prefetch has no request: a is less idle than d and c runs, so d waits in DRAM.
    assert not plan.moves and not plan.gates
    assert driver.tier_of("d") == "DRAM@r0"


def test_displacement_takes_most_idle_first_and_all_or_nothing():
    driver = PolicyDriver.make({"r0": (300, 1000)})
    driver.sessions_with_idleness({"x": 0.5, "y": 0.7, "z": 0.9}, tokens=100)
    driver.state.open_session("new", driver.clock.now)
    driver.state.request_arrived("new", driver.clock.now, 100, 100)  # needs 200
    plan = driver.step()
    assert [(m.session_id, m.reason) for m in plan.moves[:2]] == [
        ("z", MoveReason.DISPLACED),
        ("y", MoveReason.DISPLACED),
    ]
    assert gpu_residents(driver) == {"x", "new"}
    driver.state.open_session("huge", driver.clock.now)
    driver.state.request_arrived("huge", driver.clock.now, 250, 50)
    plan = driver.step()
    assert not plan.moves, "x alone cannot make room for 300: nothing may move"
    assert [g.session_id for g in plan.gates] == ["huge"]


def test_llm_session_moves_only_after_its_step():
    driver = PolicyDriver.make({"r0": (300, 1000)})
    driver.sessions_with_idleness({"idle": 0.9}, tokens=100)
    driver.state.open_session("busy", driver.clock.now)
    driver.state.request_arrived("busy", driver.clock.now, 100, 100)
    driver.step()
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=100, dram_tokens=1000))
    plan = driver.step()
    assert [m.session_id for m in plan.moves] == ["idle"], "the tool session goes first"
    assert driver.tier_of("busy") == "GPU@r0"  # pinned, over capacity until its step ends
    driver.clock.advance(5)
    driver.state.call_finished("busy", driver.clock.now, 150)
    plan = driver.step()
    assert [(m.session_id, m.dst.tier) for m in plan.moves] == [("busy", Tier.DRAM)]


def test_demotion_cascades_by_idleness():
    driver = PolicyDriver.make({"r0": (300, 100)}, shared=1000)
    driver.sessions_with_idleness({"a": 0.2, "b": 0.5, "c": 0.8}, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=200, dram_tokens=100))
    driver.step()
    assert driver.tier_of("c") == "DRAM@r0"
    # b is less idle than c: c is pushed to the shared tier to make room for b.
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=100, dram_tokens=100))
    plan = driver.step()
    assert [(m.session_id, str(m.dst), m.reason) for m in plan.moves] == [
        ("c", "SHARED", MoveReason.CASCADE),
        ("b", "DRAM@r0", MoveReason.OVERFLOW),
    ]
    # a is the least idle: DRAM keeps b, and a skips past it to the shared tier.
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=100))
    driver.step()
    assert (driver.tier_of("a"), driver.tier_of("b")) == ("DRAM@r0", "SHARED")


def test_shared_overflow_drops_most_idle():
    driver = PolicyDriver.make({"r0": (200, 0)}, shared=100)
    driver.sessions_with_idleness({"a": 0.2, "b": 0.8}, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=0))
    driver.step()
    assert (driver.tier_of("a"), driver.tier_of("b")) == ("SHARED", "WAITING")


def test_promotion_groups_returning_then_dropped_then_new_smallest_first():
    driver = PolicyDriver.make({"r0": (300, 100)})
    driver.sessions_with_idleness({"x": 0.9, "y": 0.5, "z": 0.1}, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=100))
    driver.step()
    # DRAM holds one: the least idle, z; the others are dropped (no shared tier).
    assert [driver.tier_of(s) for s in "xyz"] == ["WAITING", "WAITING", "DRAM@r0"]
    now = driver.clock.now
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=1000, dram_tokens=100))
    for name, prompt in (("big", 60), ("small", 10)):
        driver.state.open_session(name, now)
        driver.state.request_arrived(name, now, prompt, 10)
    for name in "xyz":
        driver.state.request_arrived(name, now, 90, 10)
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["z", "y", "x", "small", "big"]


def test_dram_promotes_on_its_own_replica_shared_goes_best_fit():
    driver = PolicyDriver.make({"r0": (90, 100), "r1": (500, 0), "r2": (150, 0)}, shared=500)
    driver.sessions_with_idleness({"s": 0.5}, tokens=100)
    assert driver.tier_of("s") == "GPU@r2", "best fit: the tightest replica that fits"
    driver.state.set_replica(ReplicaSpec("r2", gpu_tokens=0, dram_tokens=0))
    driver.step()
    assert driver.tier_of("s") == "SHARED"
    driver.state.request_arrived("s", driver.clock.now, 120, 10)
    driver.step()
    assert driver.tier_of("s") == "GPU@r1", "r0 is too small, r2 has no HBM left"

    local = PolicyDriver.make({"r0": (100, 100), "r1": (500, 0)})
    local.sessions_with_idleness({"s": 0.5}, tokens=100)
    local.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=100))
    local.step()
    assert local.tier_of("s") == "DRAM@r0"
    local.state.request_arrived("s", local.clock.now, 90, 10)
    assert local.step().gates, "DRAM KV returns to its own replica, never to r1"
    local.state.set_replica(ReplicaSpec("r0", gpu_tokens=100, dram_tokens=100))
    local.step()
    assert local.tier_of("s") == "GPU@r0"


def test_sticky_no_moves_without_pressure():
    driver = PolicyDriver.make({"r0": (300, 300)})
    driver.sessions_with_idleness({"a": 0.9, "b": 0.1}, tokens=100)
    driver.clock.advance(10_000)
    assert not driver.step(), "ranking changed, but nothing forces a move"


def test_resident_request_grows_in_place():
    driver = PolicyDriver.make({"r0": (300, 300)})
    driver.sessions_with_idleness({"a": 0.5}, tokens=100)
    driver.state.request_arrived("a", driver.clock.now, 150, 50)
    plan = driver.step()
    assert not plan.moves and [(a.session_id, a.tokens) for a in plan.admits] == [("a", 200)]
    assert driver.state.used[Location(Tier.GPU, "r0")] == 200


def test_prefetch_on_tool_call_finished():
    driver = PolicyDriver.make({"r0": (300, 300)})
    driver.sessions_with_idleness({"a": 0.5}, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=300))
    driver.step()
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=300, dram_tokens=300))
    assert not driver.step(), "no prefetch before the client says the tool returned"
    driver.state.tool_call_finished("a", driver.clock.now)
    plan = driver.step()
    assert [(m.session_id, m.reason) for m in plan.moves] == [("a", MoveReason.PROMOTE)]
    assert not plan.admits and driver.tier_of("a") == "GPU@r0"

    off = PolicyDriver.make({"r0": (300, 300)}, config=PlannerConfig(prefetch=False))
    off.sessions_with_idleness({"a": 0.5}, tokens=100)
    off.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=300))
    off.step()
    off.state.set_replica(ReplicaSpec("r0", gpu_tokens=300, dram_tokens=300))
    off.state.tool_call_finished("a", off.clock.now)
    assert not off.step()


def test_close_releases_after_running_call():
    driver = PolicyDriver.make({"r0": (300, 300)})
    driver.state.open_session("a", 0.0)
    driver.state.request_arrived("a", 0.0, 50, 50)
    driver.step()
    driver.state.close_session("a", 1.0)
    assert not driver.step().releases, "its call runs: release waits"
    driver.state.call_finished("a", 2.0, 60)
    plan = driver.step()
    assert [r.session_id for r in plan.releases] == ["a"]
    assert "a" not in driver.state.sessions
    assert driver.state.used[Location(Tier.GPU, "r0")] == 0


def test_removed_replica_requeues_running_call():
    driver = PolicyDriver.make({"r0": (300, 300), "r1": (300, 0)})
    driver.state.open_session("a", 0.0)
    driver.state.request_arrived("a", 0.0, 50, 50)
    replica = driver.step().admits[0].replica
    assert driver.state.remove_replica(replica, 1.0) == ["a"]
    driver.clock.now = 1.0
    plan = driver.step()
    assert plan.admits and plan.admits[0].replica != replica


def test_bad_input_rejected_with_clear_errors():
    driver = PolicyDriver.make({"r0": (300, 300)})
    with pytest.raises(UnknownSession, match="unknown session 'ghost'"):
        driver.state.request_arrived("ghost", 0.0, 10, 10)
    driver.state.open_session("a", 0.0)
    with pytest.raises(ValueError, match="already open"):
        driver.state.open_session("a", 0.0)
    with pytest.raises(ValueError, match="largest replica holds 300"):
        driver.state.request_arrived("a", 0.0, 290, 20)
    with pytest.raises(ValueError, match=">= 1"):
        driver.state.request_arrived("a", 0.0, 0, 20)
    with pytest.raises(ValueError, match="capacities must be >= 0"):
        ReplicaSpec("r9", -1, 0)
    with pytest.raises(ValueError, match="displace_margin"):
        PlannerConfig(displace_margin=1.5)
    driver.state.request_arrived("a", 0.0, 10, 10)
    driver.step()
    with pytest.raises(ValueError, match=r"context_tokens must be in 1\.\.20"):
        driver.state.call_finished("a", 1.0, 21)
    driver.state.check_integrity()


def test_stale_decision_is_refused_whole():
    driver = PolicyDriver.make({"r0": (300, 300)})
    driver.sessions_with_idleness({"a": 0.5}, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=300))
    plan = driver.planner.plan(driver.state, driver.clock.now)
    driver.state.apply(plan, driver.clock.now)
    with pytest.raises(StaleDecision):
        driver.state.apply(plan, driver.clock.now)
    driver.state.check_integrity()


def test_two_requests_growing_in_one_full_tier_do_not_wait_for_each_other():
    """Both sessions hold HBM on r1 and come back needing 32 tokens more each; together
    they do not fit. The less idle one runs: the more idle one goes to DRAM, still
    waiting, and runs after. (Before, each counted the other as immovable and both
    waited until their gate timeout.)"""
    d = PolicyDriver.make({"r1": (640, 10_000)}, shared=10_000)
    d.state.open_session("a", 0.0)
    d.state.open_session("b", 0.0)
    d.run_call("a", 292, 8, 1.0, 8)  # a holds 300 of r1's 640
    d.run_call("b", 312, 8, 1.0, 8)  # b holds 320: 620 used
    d.clock.advance(0.5)
    d.state.request_arrived("a", d.clock.now, 324, 8)  # needs 332
    d.state.request_arrived("b", d.clock.now, 344, 8)  # needs 352
    first = "a" if d.state.get("a").idleness(d.clock.now) < d.state.get("b").idleness(d.clock.now) else "b"
    second = "b" if first == "a" else "a"
    plan = d.step()
    assert [a.session_id for a in plan.admits] == [first]
    assert d.tier_of(second) == "DRAM@r1" and d.state.get(second).phase is Phase.GATED
    d.clock.advance(1.0)
    d.state.call_finished(first, d.clock.now, d.state.get(first).request.need_tokens)
    plan = d.step()
    assert [a.session_id for a in plan.admits] == [second]



def test_a_session_closed_while_its_admission_was_carried_out_is_released_when_the_call_ends():
    """Live, a close can arrive while a plan awaits its moves; the plan's admit still
    applies (the request was granted), and the call's end must then release the session:
    it used to stay booked, closing, in its tier for good."""
    driver = PolicyDriver.make({"r0": (300, 300)})
    driver.state.open_session("a", 0.0)
    driver.state.request_arrived("a", 0.0, 50, 50)
    plan = driver.planner.plan(driver.state, 0.0)  # places and admits a
    for move in plan.moves:
        driver.state.apply_move(move)  # carried out, awaited live...
    driver.state.close_session("a", 0.5)  # ... while the client left
    driver.state.apply_admit(plan.admits[0], 0.6)
    driver.state.call_finished("a", 2.0, 60)  # the call was cut: it ends
    driver.step()
    assert "a" not in driver.state.sessions


def test_a_session_closed_while_its_prefetch_was_carried_out_is_released():
    driver = PolicyDriver.make({"r0": (300, 300)})
    driver.sessions_with_idleness({"a": 0.5}, tokens=100)
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=0, dram_tokens=300))
    driver.step()  # a waits in DRAM
    driver.state.set_replica(ReplicaSpec("r0", gpu_tokens=300, dram_tokens=300))
    driver.state.tool_call_finished("a", driver.clock.now)
    plan = driver.planner.plan(driver.state, driver.clock.now)  # prefetches a
    driver.state.close_session("a", driver.clock.now)  # while the move is awaited
    for move in plan.moves:
        driver.state.apply_move(move)
    driver.step()
    assert "a" not in driver.state.sessions
