"""The computed throughput limit (``loadgen.sim.limit``): no simulated policy exceeds it,
and each of its three parts binds where it should."""

from __future__ import annotations

import pytest

from loadgen.sim.cost_model import CostModel, get_profile
from loadgen.sim.limit import throughput_limit
from loadgen.sim.policies import POLICIES
from loadgen.sim.simulator import SimConfig, Simulation, summarize
from loadgen.sim.workload import build_workload, scripted_workload
from loadgen.traces import load_sessions

QWEN = CostModel(get_profile("h200-80g", "qwen2.5-7b-yarn", cpu_ratio=2))


@pytest.fixture(scope="module")
def workload():
    return build_workload(load_sessions(limit=40), context_window=QWEN.profile.context_window, seed=3)


def simulate(policy: str, workload, programs: int, replicas: int, duration: float, cost=QWEN,
             gpu_tokens: int | None = None) -> float:
    gpu = gpu_tokens or cost.profile.kv_capacity_tokens
    config = SimConfig(policy, programs, replicas, duration, gpu, cost.profile.dram_kv_tokens)
    sim = Simulation(config, workload, cost)
    return summarize(config, sim.run(), sim)["output_tokens_per_s"]


@pytest.mark.parametrize("programs, replicas, duration, gpu_tokens", [
    (20, 1, 600.0, None),  # demand-bound
    (80, 2, 600.0, None),
    (80, 1, 900.0, 200_000),  # HBM scarce: policies part ways
])
def test_no_policy_exceeds_the_limit(workload, programs, replicas, duration, gpu_tokens):
    limit = throughput_limit(workload, QWEN, programs * replicas, replicas, duration)
    for policy in POLICIES.names():
        produced = simulate(policy, workload, programs, replicas, duration, gpu_tokens=gpu_tokens)
        assert produced <= limit.output_tokens_per_s * (1 + 1e-9), (policy, produced, limit)


def test_one_call_alone_is_bound_by_its_own_pace():
    """One program, one 1,000-token call with 100 output tokens, then another after a 50 s
    gap: in 10 s only the first can finish, and the bound is its output over the run."""
    work = scripted_workload([[(0.0, 1000, 100, 0), (50.0, 1200, 100, 1000)]])
    limit = throughput_limit(work, QWEN, programs=1, replicas=1, duration_s=10.0)
    assert limit.binding == "demand" and limit.output_tokens_per_s == pytest.approx(100 / 10.0)
    assert simulate("lull", work, 1, 1, 10.0) <= limit.output_tokens_per_s


def test_the_engines_bind_when_demand_is_unbounded():
    """Many programs of long decodes with no gaps: the engines' time, not the programs, binds,
    and more replicas raise the bound."""
    work = scripted_workload([[(0.0, 4000, 2000, 0)] * 50 for _ in range(8)])
    one = throughput_limit(work, QWEN, programs=512, replicas=1, duration_s=60.0)
    two = throughput_limit(work, QWEN, programs=512, replicas=2, duration_s=60.0)
    assert one.binding in ("compute", "memory") and two.output_tokens_per_s > one.output_tokens_per_s


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="programs >= 1"):
        throughput_limit(scripted_workload([[(0.0, 10, 1, 0)]]), QWEN, 0, 1, 10.0)
