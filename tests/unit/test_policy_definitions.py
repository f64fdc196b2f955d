"""Every policy is defined once (``controller.policy.POLICY_DEFINITIONS``) and run by one
driver: the live controller and the simulator take the same definition object, the
simulator refuses a second entry under a core name, and ``PlanDriver`` records a
decision only once its mechanism carried it out."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from controller.policy import (
    POLICY_DEFINITIONS, UNBOUNDED_TOKENS, Location, Move, NoGatePlanner, Phase, PlanDriver, PlannerConfig,
    Release, Tier, TierPlanner,
)
from controller.policy.nogate import NoGatePlanner as NoGateAtHome
from controller.runtime import LiveController
from controller.runtime.policies import LIVE_POLICIES
from loadgen.sim.cost_model import CostModel, get_profile
from loadgen.sim.driven import CorePolicy, Driven, EngineCachePolicy
from loadgen.sim.policies import POLICIES
from loadgen.sim.simulator import SimConfig, Simulation
from loadgen.sim.workload import scripted_workload

ROOT = Path(__file__).resolve().parents[2]
CORE = ("lull", "mori", "lru-offload", "vllm-lru")
COST = CostModel(get_profile("h200-80g", "qwen2.5-7b"))


def _registrations(name: str) -> list[str]:
    """Every ``<registry>.register("<name>", ...)`` call or decorator in the source."""
    found = []
    for package in ("proto", "controller", "workers", "loadgen"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "register" and node.args
                        and isinstance(node.args[0], ast.Constant) and node.args[0].value == name):
                    found.append(str(path.relative_to(ROOT)))
    return found


def test_the_core_defines_lull_mori_lru_offload_and_vllm_lru():
    assert POLICY_DEFINITIONS.names() == sorted(CORE)
    assert LIVE_POLICIES is POLICY_DEFINITIONS  # the runtime's old name, the same registry


@pytest.mark.parametrize("name", CORE)
def test_a_policy_name_is_registered_once_in_the_whole_source(name):
    assert _registrations(name) == ["controller/policy/policies.py"]


@pytest.mark.parametrize("name", CORE)
def test_live_and_simulated_policies_take_the_same_definition_object(name):
    definition = POLICY_DEFINITIONS.get(name)
    live = LiveController(mover=None, policy=name)
    config = SimConfig(name, 1, 1, 10.0, gpu_tokens=6000, dram_tokens=4000)
    sim = Simulation(config, scripted_workload([[(0.0, 100, 10, 0)]]), COST)
    assert live.policy is definition and live.driver.definition is definition
    assert POLICIES.get(name) == Driven(definition)
    assert sim.policy.driver.definition is definition
    assert isinstance(sim.policy, CorePolicy if definition.moves_kv else EngineCachePolicy)


def test_the_simulator_refuses_a_second_definition_of_a_core_policy():
    with pytest.raises(ValueError, match="'mori' is already registered"):
        POLICIES.register("mori", CorePolicy)


def test_no_gate_planner_sits_beside_the_tier_planner():
    assert NoGatePlanner is NoGateAtHome
    assert NoGatePlanner.__module__.rsplit(".", 1)[0] == TierPlanner.__module__.rsplit(".", 1)[0]


def test_the_switches_decide_the_books():
    lull, mori, lru, plain = (POLICY_DEFINITIONS.get(n) for n in CORE)
    assert (lull.tier_label, mori.tier_label, lru.tier_label, plain.tier_label) == ("gpu", "gpu", "dram", "waiting")
    assert plain.replica_spec("r1", 300, 200).gpu_tokens == UNBOUNDED_TOKENS and not plain.moves_kv
    assert lru.replica_spec("r1", 300, 200).gpu_tokens == UNBOUNDED_TOKENS
    assert lru.replica_spec("r1", 300, 200).dram_tokens == 0  # the engine's cache, not the books
    assert mori.shared_tokens(500) == 0 and lull.shared_tokens(500) == 500
    assert lru.booked_at(Location(Tier.DRAM, "r1")) == Location(Tier.GPU, "r1")
    assert mori.booked_at(Location(Tier.SHARED)) == Location(Tier.WAITING)
    config = mori.make_planner(PlannerConfig()).config
    assert (config.shared_tier, config.prefetch, config.starvation_age_s) == (False, False, None)
    assert isinstance(lru.make_planner(PlannerConfig()), NoGatePlanner)
    with pytest.raises(ValueError, match="admitted_tier must be GPU"):
        type(lull)("x", TierPlanner, True, True, True, Tier.SHARED)


class Recorder:
    """A mechanism that refuses moves while ``refuse`` is set; records what it did."""

    def __init__(self) -> None:
        self.refuse = False
        self.moves: list[Move] = []
        self.releases: list[tuple[Release, bool]] = []
        self.admits: list[tuple[str, str, Location, int, float]] = []

    async def release(self, release, free_kv):
        self.releases.append((release, free_kv))

    async def move(self, move):
        if self.refuse:
            return False
        self.moves.append(move)
        return True

    def admitted(self, admit, was, kv_tokens, now):
        self.admits.append((admit.session_id, admit.replica, was, kv_tokens, now))


def _driver(policy: str = "lull", mechanism: Recorder | None = None) -> PlanDriver:
    """One replica whose HBM holds one 610-token call; ``a`` ran one and is in a tool call."""
    driver = PlanDriver(POLICY_DEFINITIONS.get(policy), mechanism or Recorder())
    driver.add_replica("r1", 700, 1000)
    driver.open("a", 0.0)
    driver.request("a", 0.0, 600, 10)
    driver.step_now(0.0)
    driver.finished("a", 1.0, 610)
    driver.open("b", 2.0)
    return driver


def test_mori_plans_only_on_the_tick_lull_on_every_event():
    for policy, on_event in (("lull", True), ("mori", False)):
        driver = _driver(policy)
        assert driver.request("b", 2.0, 100, 10) is on_event
        assert driver.close("a", 2.0) is on_event
        assert driver.tick(3.0) is True


def test_a_refused_move_leaves_the_session_where_it_was_and_the_next_step_retries():
    mechanism = Recorder()
    driver = _driver(mechanism=mechanism)
    driver.request("b", 2.0, 600, 10)
    mechanism.refuse = True
    plan = driver.step_now(2.0)  # b needs a's HBM: a goes down to DRAM first
    assert [(m.session_id, m.dst) for m in plan.moves][0] == ("a", Location(Tier.DRAM, "r1"))
    assert driver.state.get("a").location == Location(Tier.GPU, "r1")  # refused: not booked
    assert driver.state.get("b").location.tier is Tier.WAITING and [a[0] for a in mechanism.admits] == ["a"]
    driver.state.check_integrity()
    mechanism.refuse = False
    driver.step_now(3.0)
    assert driver.state.get("a").location == Location(Tier.DRAM, "r1")
    assert mechanism.admits[-1] == ("b", "r1", Location(Tier.WAITING), 0, 3.0)
    driver.state.check_integrity()


def test_admitted_calls_start_when_the_moves_are_done():
    mechanism = Recorder()
    driver = _driver(mechanism=mechanism)
    driver.request("b", 2.0, 600, 10)
    asyncio.run(driver.step(2.0, clock=lambda: 2.5))
    assert mechanism.admits[-1][-1] == 2.5
    assert driver.state.get("b").phase is Phase.LLM


def test_a_closed_session_is_released_and_its_kv_freed_only_where_the_policy_moves_kv():
    for policy, free_kv in (("lull", True), ("lru-offload", False)):
        mechanism = Recorder()
        driver = _driver(policy, mechanism)
        driver.close("a", 2.0)
        driver.step_now(2.0)
        assert "a" not in driver.state.sessions
        assert [(r.session_id, f) for r, f in mechanism.releases] == [("a", free_kv)], policy


def test_a_step_with_a_mechanism_that_suspends_must_be_awaited():
    class Slow(Recorder):
        async def move(self, move):
            await asyncio.sleep(0)
            return True

    driver = _driver(mechanism=Slow())
    driver.request("b", 2.0, 600, 10)
    with pytest.raises(RuntimeError, match="await step"):
        driver.step_now(2.0)  # a's KV must move to DRAM first, and this mover suspends


def test_mori_runs_a_request_whose_kv_is_in_hbm_at_once_and_the_rest_at_the_tick():
    """MORI's GPU queue sends its requests straight to the engine (ThunderAgent, which
    it is built on, forwards an active program's request): only the others wait."""
    mechanism = Recorder()
    driver = _driver("mori", mechanism)
    assert driver.request("a", 3.0, 620, 10) is False  # no plan: mori plans on the tick
    assert driver.admit_resident("a", 3.0) is True  # a's 610 tokens are in HBM, +20 fits
    assert mechanism.admits[-1] == ("a", "r1", Location(Tier.GPU, "r1"), 610, 3.0)
    assert driver.state.get("a").phase is Phase.LLM
    driver.request("b", 3.0, 50, 10)
    assert driver.admit_resident("b", 3.0) is False  # b has no KV in HBM: it waits
    assert driver.state.get("b").phase is Phase.GATED
    driver.state.check_integrity()


def test_a_resident_request_that_does_not_fit_waits_and_lull_never_admits_between_plans():
    mechanism = Recorder()
    driver = _driver("mori", mechanism)
    driver.request("b", 2.0, 50, 10)
    driver.step_now(2.0)  # b takes 60 of the 90 tokens a leaves free
    assert driver.request("a", 3.0, 650, 10) is False
    assert driver.admit_resident("a", 3.0) is False  # a grows by 50: 30 are free
    assert driver.state.get("a").phase is Phase.GATED and mechanism.admits[-1][0] == "b"
    lull = _driver("lull")
    lull.request("a", 3.0, 620, 10)
    assert lull.admit_resident("a", 3.0) is False  # event-driven: its plans admit
    driver.state.check_integrity()
