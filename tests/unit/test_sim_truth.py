"""The simulator tells the truth (issue 15): context windows and compaction, the engine
refusing what vLLM refuses, max_tokens reservations, starvation metrics, equal memory
and links that carry one copy at a time."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from loadgen.sim.cost_model import CostModel, Link, get_profile
from loadgen.sim.engine import ContextWindowExceeded, Engine, Seq
from loadgen.sim.metrics import jain_index, starvation
from loadgen.sim.policies import POLICIES, Cluster, LinkQueue
from loadgen.sim.simulator import SimConfig, Simulation, summarize
from loadgen.sim.workload import CallSpec, build_workload, scripted_workload
from loadgen.traces import load_sessions

COST = CostModel(get_profile("h200-80g", "qwen2.5-7b"))  # a 32,768-token window


@pytest.fixture(scope="module")
def sessions():
    return load_sessions(limit=12)


def test_calls_above_the_window_are_compacted_and_the_share_is_reported(sessions):
    workload = build_workload(sessions, context_window=32_768, seed=0, max_tokens=8192)
    calls = [c for s in workload.sessions for c in s.calls]
    assert calls and all(c.reserve_tokens <= 32_768 for c in calls)
    assert all(c.output_tokens <= c.max_tokens for c in calls)
    # The real traces run far past 32k: most calls of these sessions exceed it.
    assert workload.calls_over_window > workload.calls // 2
    assert workload.calls_compacted >= workload.calls_over_window
    assert f"{workload.calls_over_window:,} of {workload.calls:,} calls" in workload.notes
    wide = build_workload(sessions, context_window=131_072, seed=0)
    assert wide.calls_over_window < workload.calls_over_window


def test_without_max_tokens_the_reservation_is_the_exact_output_an_oracle(sessions):
    workload = build_workload(sessions, context_window=32_768, seed=0, max_tokens=None)
    calls = [c for s in workload.sessions for c in s.calls]
    assert all(c.reserve_tokens == c.need_tokens for c in calls)
    assert "oracle" in workload.notes


def test_the_engine_refuses_a_call_vllm_would_refuse():
    engine = Engine("r0", COST, lambda at, action: None)
    too_long = Seq("a", 30_000, 0, 10, 0.0, lambda t: None, lambda t: None, max_tokens=4000)
    with pytest.raises(ContextWindowExceeded, match="34000 tokens .* context window is 32768"):
        engine.add(too_long, 0.0)
    engine.add(Seq("b", 30_000, 0, 10, 0.0, lambda t: None, lambda t: None, max_tokens=2000), 0.0)
    assert engine.running == 1


def test_the_controller_books_reserve_max_tokens_not_the_output():
    cluster = Cluster(["r0"], 10_000, 0, 0, COST, lambda *a: None)
    policy = POLICIES.get("lull")(cluster)
    policy.open("s", 0.0)
    policy.request("s", 0.0, CallSpec(0.0, 100, 10, 0, max_tokens=500))
    assert policy.state.sessions["s"].footprint == 600


@dataclass
class _Req:
    sent: float
    first_token: float | None = None
    launched: float | None = None


@dataclass
class _Runs:
    ttft: list[float] = field(default_factory=lambda: [1.0, 3.0])
    waits: list[float] = field(default_factory=lambda: [0.5, 200.0])


def test_censored_ttft_counts_open_waits_and_the_gate_timeout_counts_failures():
    # Open at the end (500 s): one never launched (sent at 0), one launched but still
    # prefilling (sent at 400), one decoding (has its first token: not open).
    pending = [_Req(0.0), _Req(400.0, launched=450.0), _Req(480.0, first_token=490.0, launched=481.0)]
    fields = starvation(_Runs(), pending, [0, 10, 10], 500.0, gate_timeout_s=120.0)
    assert fields["ttft_censored_mean_s"] == pytest.approx((1 + 3 + 500 + 100) / 4)
    assert fields["open_waits"] == 2 and fields["longest_open_wait_s"] == 500.0
    assert fields["calls_past_gate_timeout"] == 2  # the 200 s wait, and the 500 s one still open
    assert fields["programs_zero_progress"] == 1 and fields["programs"] == 3
    assert fields["jain_fairness"] == pytest.approx(400 / (3 * 200))


def test_jain_index_bounds():
    assert jain_index([5, 5, 5]) == pytest.approx(1.0)
    assert jain_index([9, 0, 0]) == pytest.approx(1 / 3)
    assert jain_index([]) == 0.0 and jain_index([0, 0]) == 0.0
    with pytest.raises(ValueError):
        jain_index([-1, 2])


def _sim(policy: str, **overrides) -> Simulation:
    config = SimConfig(policy, 1, 2, 10.0, gpu_tokens=1000, dram_tokens=500, **overrides)
    return Simulation(config, scripted_workload([[(0.0, 100, 10, 0)]]), COST)


def test_every_policy_gets_the_same_off_gpu_bytes_and_the_record_says_so():
    lull, mori = _sim("lull"), _sim("mori")
    assert (lull.cluster.dram_tokens, lull.cluster.shared_tokens) == (500, 8000)
    assert (mori.cluster.dram_tokens, mori.cluster.shared_tokens) == (500 + 4000, 0)
    assert "given as DRAM" in mori.memory and "equal memory" in mori.memory
    assert _sim("ta-offload").cluster.dram_tokens == 4500
    assert _sim("vllm-lru").memory.startswith("no off-GPU tier")
    unequal = _sim("mori", equal_memory=False)
    assert (unequal.cluster.dram_tokens, unequal.cluster.shared_tokens) == (500, 0)
    record = summarize(mori.config, mori.run(), mori)
    assert record["memory"] == mori.memory and record["capacity_tokens"]["dram_per_replica"] == 4500
    for key in ("ttft_censored_mean_s", "calls_past_gate_timeout", "programs_zero_progress",
                "program_output_p10", "jain_fairness", "context_window"):
        assert key in record


def test_a_link_carries_one_copy_at_a_time_and_the_shared_tier_link_is_cluster_wide():
    link = LinkQueue(10.0)
    assert link.book(20, 0.0) == pytest.approx(2.0)
    assert link.book(10, 1.0) == pytest.approx(3.0)  # waits for the first copy
    assert link.book(10, 5.0) == pytest.approx(6.0)  # an idle link starts at once
    cluster = Cluster(["r0", "r1"], 1000, 1000, 1000, COST, lambda *a: None)
    one = cluster.copy_done(10_000, "r0", (Link.NETWORK,), 0.0)
    two = cluster.copy_done(10_000, "r1", (Link.NETWORK,), 0.0)
    assert two == pytest.approx(2 * one)  # one shared-tier link for both replicas
    assert cluster.copy_done(10_000, "r1", (Link.PCIE,), 0.0) < one  # each replica has its own PCIe
