"""The autoscaling policy (controller/autoscale/policy.py), driven by scripted load
with the shared FakeClock: scale up under pressure after the up window, hysteresis,
scale down after the down window, bounds, the gate rule, the drain choice; and a
Hypothesis property over random load sequences."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from controller.autoscale import AutoscaleSettings, Reason, ReplicaLoad, ScaleDecision, ScalerState, ScalingSnapshot, decide
from proto.config import from_dict
from tests.support import FakeClock

CAP = 1_000
SETTINGS = AutoscaleSettings(
    min_replicas=1, max_replicas=4, target_gate_wait_s=2.0, scale_up_ratio=1.5, scale_down_occupancy=0.5,
    scale_up_window_s=30.0, scale_down_window_s=300.0, cooldown_s=60.0, target_ttft_p90_s=10.0,
)
BUSY = {"gate_waits_s": (5.0, 6.0, 7.0)}  # p90 7 s > 2 s x 1.5


def loads(*used: int) -> tuple[ReplicaLoad, ...]:
    return tuple(ReplicaLoad(f"r{i}", u, CAP) for i, u in enumerate(used))


@dataclass
class Scaler:
    """Calls the policy the way the controller does: keeps its state between calls."""

    settings: AutoscaleSettings = SETTINGS
    clock: FakeClock = field(default_factory=FakeClock)
    state: ScalerState = field(default_factory=ScalerState)
    log: list[tuple[float, ScaleDecision]] = field(default_factory=list)

    def step(self, running: tuple[ReplicaLoad, ...], **snapshot) -> ScaleDecision:
        decision, self.state = decide(ScalingSnapshot(self.clock.now, running, **snapshot), self.state, self.settings)
        self.log.append((self.clock.now, decision))
        return decision

    def run(self, seconds: float, running: tuple[ReplicaLoad, ...], every: float = 5.0, **snapshot) -> list[ScaleDecision]:
        """Step every ``every`` seconds for ``seconds``, from now, with the same load."""
        out, end = [], self.clock.now + seconds
        while self.clock.now < end:
            self.clock.advance(every)
            out.append(self.step(running, **snapshot))
        return out

    def changes(self) -> list[tuple[float, ScaleDecision]]:
        return [(t, d) for t, d in self.log if d.changes]


def test_scales_up_under_gate_waits_after_the_up_window():
    scaler = Scaler()
    full = loads(CAP, CAP)
    assert scaler.step(full, **BUSY).reason is Reason.HOLD  # t=0: the window opens
    before = scaler.run(25, full, **BUSY)
    assert all(d.reason is Reason.HOLD and d.target == 2 for d in before)
    decision = scaler.run(5, full, **BUSY)[-1]
    assert scaler.clock.now == 30
    assert (decision.target, decision.drain, decision.reason) == (3, (), Reason.GATE_WAIT)
    assert "p90 gate wait 7.0 s" in decision.detail


def test_gate_waits_under_target_times_ratio_are_no_signal():
    scaler = Scaler()
    decisions = scaler.run(120, loads(CAP, CAP), gate_waits_s=(1.0, 2.9))  # p90 2.9 <= 3.0
    assert {d.reason for d in decisions} == {Reason.HOLD}


@pytest.mark.parametrize("signal, reason", [
    ({"waiting_sessions": 3}, Reason.WAITING_SET),
    ({"ttft_p90_s": 12.0}, Reason.TTFT),
])
def test_waiting_set_and_ttft_scale_up_once_they_hold_long_enough(signal, reason):
    scaler = Scaler()
    scaler.step(loads(CAP), **signal)
    decisions = scaler.run(30, loads(CAP), **signal)
    assert [d.reason for d in decisions[:-1]] == [Reason.HOLD] * 5
    assert (decisions[-1].target, decisions[-1].reason) == (2, reason)


def test_ttft_without_a_target_or_without_requests_is_no_signal():
    assert {d.reason for d in Scaler().run(120, loads(CAP), ttft_p90_s=None)} == {Reason.HOLD}
    no_target = Scaler(AutoscaleSettings(max_replicas=4, target_ttft_p90_s=None))
    assert {d.reason for d in no_target.run(120, loads(CAP), ttft_p90_s=99.0)} == {Reason.HOLD}


def test_oscillating_load_does_not_flap():
    """Pressure for 20 s, then an idle GPU tier for 20 s, for an hour: neither condition
    holds for its window, so the replica count never moves."""
    scaler = Scaler()
    for _ in range(90):
        scaler.run(20, loads(CAP, CAP), **BUSY)
        scaler.run(20, loads(10, 10))
    assert scaler.changes() == []
    assert {d.target for _, d in scaler.log} == {2}


def test_scales_down_when_underused_after_the_down_window_draining_the_cheapest():
    scaler = Scaler()
    light = loads(300, 120, 200)
    scaler.step(light)
    decisions = scaler.run(300, light)
    assert [d.reason for d in decisions[:-1]] == [Reason.HOLD] * 59
    assert (decisions[-1].target, decisions[-1].drain, decisions[-1].reason) == (2, ("r1",), Reason.UNDERUSED)


def test_drain_choice_breaks_ties_by_name_and_never_strands_tokens():
    scaler = Scaler(AutoscaleSettings(max_replicas=4, scale_down_occupancy=0.9, scale_up_window_s=1, scale_down_window_s=1))
    scaler.step(loads(50, 20, 20))
    assert scaler.run(1, loads(50, 20, 20), every=1)[-1].drain == ("r1",)
    # 80% used over two replicas: one replica could not hold 1,600 tokens, so no drain.
    stuck = Scaler(scaler.settings)
    assert {d.reason for d in stuck.run(60, loads(800, 800), every=1)} == {Reason.HOLD}


def test_never_scales_down_while_anything_is_gated():
    scaler = Scaler()
    light = loads(100, 100)
    scaler.run(290, light)
    # One gated request (waiting under the up threshold) stops the down timer ...
    gated = scaler.run(600, light, gate_waits_s=(0.5,))
    assert all(d.target == 2 and d.reason is Reason.HOLD for d in gated)
    # ... and once the gate is empty, the down window starts over.
    after = scaler.run(305, light)
    assert [d.reason for d in after].index(Reason.UNDERUSED) == len(after) - 1


def test_never_below_min_nor_above_max():
    assert {d.reason for d in Scaler().run(1_000, loads(0))[60:]} == {Reason.AT_MIN}
    at_max = Scaler().run(200, loads(CAP, CAP, CAP, CAP), **BUSY)
    assert {d.target for d in at_max} == {4} and at_max[-1].reason is Reason.AT_MAX


def test_below_min_scales_up_at_once():
    decision = Scaler(AutoscaleSettings(min_replicas=2, max_replicas=4)).step(loads())
    assert (decision.target, decision.reason) == (2, Reason.BELOW_MIN)


def test_gpu_capacity_caps_the_target_and_a_shrunk_capacity_drains_the_cheapest():
    scaler = Scaler()
    capped = scaler.run(200, loads(CAP, CAP), gpu_replica_cap=2, **BUSY)
    assert {d.target for d in capped} == {2} and capped[-1].reason is Reason.AT_MAX
    # A node left: bounds are hard, so this drains even with requests gated.
    shrunk = scaler.step(loads(CAP, 400, 900), gpu_replica_cap=1, **BUSY)
    assert (shrunk.target, shrunk.drain, shrunk.reason) == (1, ("r1", "r2"), Reason.ABOVE_MAX)
    assert Scaler().step(loads(), gpu_replica_cap=0).target == 0  # capacity outranks min


def test_starting_replicas_hold_and_the_cooldown_separates_changes():
    scaler, full, three = Scaler(), loads(CAP, CAP), loads(CAP, CAP, CAP)
    scaler.step(full, **BUSY)
    scaler.run(30, full, **BUSY)
    assert [(t, d.target) for t, d in scaler.changes()] == [(30, 3)]
    settling = scaler.run(20, full, starting=1, **BUSY)  # t = 35 .. 50
    assert {d.reason for d in settling} == {Reason.SETTLING}
    # The new replica runs from t=55 and the pressure persists: the up window starts
    # over and closes at 85, but the cooldown (60 s from t=30) holds until 90.
    after = scaler.run(35, three, **BUSY)  # t = 55 .. 85
    assert [d.reason for d in after] == [Reason.HOLD] * 6 + [Reason.COOLDOWN]
    last = scaler.run(5, three, **BUSY)[-1]
    assert (scaler.clock.now, last.target, last.reason) == (90, 4, Reason.GATE_WAIT)


def test_disabled_holds_the_count():
    scaler = Scaler(AutoscaleSettings(max_replicas=4, enabled=False))
    assert {(d.target, d.reason) for d in scaler.run(600, loads(CAP), **BUSY)} == {(1, Reason.DISABLED)}


def test_settings_come_from_the_config_and_bad_input_fails_fast():
    config = from_dict({"replicas": {"min": 2, "max": 8, "initial": 2},
                        "autoscaling": {"cooldown_s": 15, "target_ttft_p90_s": None}})
    s = AutoscaleSettings.from_config(config)
    assert (s.min_replicas, s.max_replicas, s.cooldown_s, s.target_ttft_p90_s) == (2, 8, 15, None)
    with pytest.raises(ValueError, match="unique"):
        ScalingSnapshot(0.0, (ReplicaLoad("a", 0, 1), ReplicaLoad("a", 0, 1)))
    with pytest.raises(ValueError, match="backwards"):
        decide(ScalingSnapshot(5.0, loads(0)), ScalerState(last_change_s=9.0), SETTINGS)


# --- property: random load sequences -------------------------------------------------

STEP = st.tuples(
    st.floats(1.0, 40.0),  # seconds to the next decision
    st.one_of(st.just([]), st.lists(st.floats(0.0, 20.0), max_size=4)),  # gate waits
    st.sampled_from([0, 0, 0, 2]),  # waiting sessions
    st.floats(0.0, 1.0),  # GPU tier occupancy of every replica
    st.one_of(st.none(), st.floats(0.0, 15.0)),  # p90 TTFT
    st.integers(1, 15),  # steps this load lasts
)


@settings(max_examples=150, deadline=None)
@given(
    lo=st.integers(0, 3), extra=st.integers(0, 4), cap=st.one_of(st.none(), st.integers(0, 8)),
    windows=st.tuples(st.floats(0.0, 60.0), st.floats(0.0, 200.0)), cooldown=st.floats(0.0, 120.0),
    phases=st.lists(STEP, min_size=1, max_size=30),
)
def test_random_load_keeps_bounds_and_cooldown(lo, extra, cap, windows, cooldown, phases):
    """A toy cluster follows each decision (new replicas start in one step, drained ones
    leave in one step). The target never leaves [min, min(max, cap)], changes are at
    least the cooldown apart, nothing scales down while gated, drains name running replicas."""
    up_window, down_extra = windows
    s = AutoscaleSettings(min_replicas=lo, max_replicas=lo + extra, scale_up_window_s=up_window,
                          scale_down_window_s=up_window + down_extra, cooldown_s=cooldown)
    hi = s.max_replicas if cap is None else min(s.max_replicas, cap)
    floor = min(lo, hi)
    clock, state = FakeClock(), ScalerState()
    names, serial, starting, draining, last_change = [f"r{i}" for i in range(floor)], floor, 0, 0, None
    steps = [step[:-1] for step in phases for _ in range(step[-1])]
    for dt, waits, waiting, occupancy, ttft in steps:
        clock.advance(dt)
        running = tuple(ReplicaLoad(n, int(occupancy * CAP), CAP) for n in names)
        snap = ScalingSnapshot(clock.now, running, starting, draining, tuple(waits), waiting, ttft, cap)
        decision, state = decide(snap, state, s)
        event(decision.reason.value)
        assert floor <= decision.target <= hi
        if decision.changes:
            assert last_change is None or clock.now - last_change >= cooldown
            last_change = clock.now
        # The toy cluster: last step's starting replicas run now, last step's drained ones are gone.
        names, serial = names + [f"r{serial + i}" for i in range(starting)], serial + starting
        starting, draining = max(0, decision.target - snap.replicas), len(decision.drain)
        if decision.target < snap.replicas:
            assert not waits and decision.reason is Reason.UNDERUSED
            assert set(decision.drain) <= {r.name for r in running} and len(decision.drain) == 1
            names = [n for n in names if n not in decision.drain]
