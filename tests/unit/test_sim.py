"""The simulator end to end: engine timing, conservation, the infinite-HBM bound,
and the ``lull sim`` command."""

from __future__ import annotations

import json

import pytest

from controller.cli import main
from loadgen.sim.cost_model import CostModel, get_profile
from loadgen.sim.engine import Engine, Seq
from loadgen.sim.simulator import SimConfig, Simulation, summarize
from loadgen.sim.workload import build_workload, scripted_workload
from loadgen.traces import load_sessions

COST = CostModel(get_profile("h200-80g", "qwen2.5-7b"))
POLICIES = ["lull", "mori", "vllm-lru", "lru-offload", "continuum", "thunderagent", "ta-offload", "infinite-hbm"]


def test_engine_times_one_call_as_prefill_then_decode_steps():
    events: list = []
    engine = Engine("r0", COST, lambda at, action: events.append((at, action)))
    times = {}
    engine.add(Seq("a", 1000, 0, 5, 0.0, lambda t: times.setdefault("first", t),
                   lambda t: times.setdefault("done", t)), 0.0)
    while events:
        events.sort(key=lambda e: e[0])
        at, action = events.pop(0)
        action(at)
    prefill = COST.step_time(1000, 0, 0)
    assert times["first"] == pytest.approx(prefill)
    decode = sum(COST.step_time(0, 1, 1001 + i) for i in range(4))
    assert times["done"] == pytest.approx(prefill + decode, rel=1e-3)


def _scripted():
    # Four sessions that together hold more KV than the 6,000-token GPU tier.
    sessions = []
    for i in range(4):
        calls, context = [], 0
        for j in range(6):
            tokens_in = context + 400 + 50 * i
            calls.append((0.0 if j == 0 else 0.5 + 7.0 * (i % 2) * j, tokens_in, 20 + j, context))
            context = tokens_in + 20 + j
        sessions.append(calls)
    return scripted_workload(sessions)


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_exactly_once_in_a_drained_run(policy):
    workload = _scripted()
    config = SimConfig(policy, 2, 2, 30.0, gpu_tokens=6000, dram_tokens=4000, seed=1, drain=True)
    sim = Simulation(config, workload, COST)
    metrics = sim.run()
    assert metrics.issued == metrics.completed > 0
    assert len(metrics.ttft) == metrics.completed
    assert not sim._pending
    assert all(not e.running for e in sim.engines.values())
    assert metrics.output_tokens == metrics.issued_output_tokens
    assert metrics.reuse_hit_tokens + metrics.recompute_tokens == metrics.issued_reuse_tokens
    if hasattr(sim.policy, "state"):
        sim.policy.tick(sim.now + 5.0)  # mori releases closed sessions on its tick
        sim.policy.state.check_integrity()
        assert not sim.policy.state.sessions  # every session closed and released


@pytest.fixture(scope="module")
def small_trace_workload():
    sessions = load_sessions(limit=12)
    return build_workload(sessions, context_window=32_768, seed=3, token_scale=0.1)


def test_infinite_hbm_bounds_the_others(small_trace_workload):
    records = {}
    for policy in POLICIES:
        config = SimConfig(policy, 6, 1, 900.0, gpu_tokens=40_000, dram_tokens=40_000, seed=3)
        sim = Simulation(config, small_trace_workload, COST)
        records[policy] = summarize(config, sim.run(), sim)
    best = records["infinite-hbm"]
    assert best["recompute_tokens"] == 0
    for policy, record in records.items():
        assert best["output_tokens_per_s"] >= record["output_tokens_per_s"] * 0.999, policy
    assert records["vllm-lru"]["recompute_tokens"] > 0  # the capacity binds


def test_cli_writes_json_and_report(tmp_path):
    out = tmp_path / "sim.json"
    report = tmp_path / "report"
    code = main(["sim", "--compare", "lull,mori,vllm-lru,lru-offload,infinite-hbm", "--profile", "h200-80g",
                 "--model", "qwen2.5-7b", "--programs", "2,3", "--replicas", "1", "--cpu-ratio", "1",
                 "--duration", "120", "--trace-limit", "4", "--seed", "2", "--token-scale", "0.5",
                 "--json", str(out), "--report", str(report)])
    assert code == 0
    records = json.loads(out.read_text())
    assert len(records) == 10
    for record in records:
        assert record["simulated"] is True
        for key in ("policy", "profile", "programs_per_replica", "replicas", "duration_s",
                    "output_tokens_per_s", "requests_per_s", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s",
                    "recompute_tokens", "bytes_hbm_dram", "bytes_dram_shared", "occupancy",
                    "ttft_censored_mean_s", "calls_past_gate_timeout", "programs_zero_progress",
                    "program_output_p10", "program_output_p50", "jain_fairness", "memory"):
            assert key in record
        assert len(record["occupancy"]["t_s"]) == len(record["occupancy"]["gpu_tokens"]) > 10
    text = (report / "report.md").read_text()
    assert "simulated" in text and "Cost model" in text and "| mori |" in text
    assert "censored TTFT" in text and "Jain" in text and "given as DRAM" in text
    assert (report / "occupancy.png").stat().st_size > 0
    assert (report / "sweep.png").stat().st_size > 0


def test_unknown_policy_is_a_one_line_error(tmp_path, capsys):
    code = main(["sim", "--compare", "nope", "--profile", "h200-80g", "--model", "qwen2.5-7b",
                 "--programs", "1", "--duration", "10", "--json", str(tmp_path / "x.json")])
    assert code == 2
    assert "unknown simulator policy 'nope'" in capsys.readouterr().err
