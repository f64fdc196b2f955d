"""`lull bench` end to end against the Serve app started as in test_gateway_e2e.py (one
vLLM-on-CPU replica whose KV cache is the GPU tier, a real Redis, the controller actor and
a node agent): two policies through the chat API (the default), switching the controller's
policy in between, with hit sources from the engine's and connector's counters; one through
the completions API with token ids and one through gRPC; and the refusal to run when the
engine's real cache differs from the GPU tier the controller books."""

from __future__ import annotations

import json

import pytest
import ray

from controller.cli import main
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE
from tests.integration.live_platform import serve_platform

PORT = 8767
TTL_S = 5  # sessions another client leaves open expire this long after their last call
GRPC_PORT = 9767
KEY = "sk-acme-bench"
GPU_TIER = 4096
SIM_KEYS = {"policy", "profile", "programs_per_replica", "replicas", "duration_s", "output_tokens_per_s",
            "requests_per_s", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "recompute_tokens", "bytes_hbm_dram",
            "bytes_dram_shared", "occupancy"}


@pytest.fixture(scope="module")
def platform():
    env = {"LULL_API_KEYS": f"acme:{KEY}", "LULL_GATEWAY__GATE_TIMEOUT_S": "60",
           "LULL_POLICY__SESSION_IDLE_TTL_S": str(TTL_S)}
    args = {"replicas": {"initial": 1}, "cluster": {"engine_cpus": 1.0}, "gateway": {"grpc_port": GRPC_PORT},
            "tiers": {"gpu_tier_tokens": GPU_TIER}}
    with serve_platform(env, args, port=PORT):
        yield ray.get_runtime_context().gcs_address


def bench(platform, tmp_path, *extra: str) -> tuple[int, list[dict]]:
    out = tmp_path / "bench.json"
    code = main(["bench", "--programs", "2", "--url", f"http://127.0.0.1:{PORT}", "--grpc-target",
                 f"127.0.0.1:{GRPC_PORT}", "--ray-address", platform, "--api-key", KEY, "--trace-limit", "40",
                 "--json", str(out), "--report", str(tmp_path / "report"), *extra])
    return code, json.loads(out.read_text()) if out.exists() else []


def test_bench_runs_two_policies_and_writes_sim_keys(platform, tmp_path):
    code, records = bench(platform, tmp_path, "--policy", "lull,lru-offload", "--duration", "12")
    assert code == 0, [r["error_samples"] for r in records]
    assert [r["policy"] for r in records] == ["lull", "lru-offload"]
    for record in records:
        assert SIM_KEYS <= record.keys() and record["profile"] == "live-cpu" and record["api"] == "chat"
        assert record["calls_failed"] == 0 and record["requests_completed"] > 0
        assert record["output_tokens_per_s"] > 0 and record["ttft_mean_s"] > 0
        assert record["occupancy"]["t_s"] and record["capacity_tokens"]["gpu_per_replica"] == GPU_TIER
        hits = record["hit_sources"]
        assert hits["prompt_tokens"] > 0 and hits["recomputed"] > 0  # every session's first call is computed
        assert sum(hits[k] for k in ("engine_cache", "dram", "shared", "recomputed")) == hits["prompt_tokens"]
    assert records[0]["hit_sources"]["engine_cache"] > 0  # a session's next call reuses its KV
    assert (tmp_path / "report" / "report.md").read_text().count("measured on this machine") >= 1


def test_bench_over_grpc(platform, tmp_path):
    code, [record] = bench(platform, tmp_path, "--policy", "mori", "--duration", "8", "--api", "grpc")
    assert code == 0, record["error_samples"]
    assert record["api"] == "grpc" and record["requests_completed"] > 0 and record["errors"] == 0


def test_bench_over_completions_with_token_ids(platform, tmp_path):
    code, [record] = bench(platform, tmp_path, "--policy", "lull", "--duration", "8", "--api", "completions")
    assert code == 0, record["error_samples"]
    assert record["api"] == "completions" and record["requests_completed"] > 0 and record["errors"] == 0


def test_bench_starts_on_a_platform_another_client_used(platform, tmp_path):
    """A client's session left open expires after policy.session_idle_ttl_s, dropped from every
    tier; the bench waits it out instead of refusing to start."""
    import openai

    from tests.integration.gateway_client import snapshot

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=KEY, max_retries=0, timeout=120)
    client.chat.completions.create(model="lull", messages=[{"role": "user", "content": "left open"}],
                                   max_tokens=2, extra_headers={"x-session-id": "left-open"})
    assert "acme/left-open" in {s["session_id"] for s in snapshot()["sessions"]}
    code, [record] = bench(platform, tmp_path, "--policy", "lull", "--duration", "6")
    assert code == 0 and record["requests_completed"] > 0, record["error_samples"]
    books = snapshot()
    assert "acme/left-open" not in {s["session_id"] for s in books["sessions"]}


def test_bench_refuses_when_the_engines_cache_differs_from_the_gpu_tier(platform, tmp_path, capsys):
    """The controller is told the replica holds one block more than its engine's cache:
    the bench must refuse to compare policies on it, naming the fix."""
    controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
    [replica] = ray.get(controller.replicas.remote())
    fields = {k: replica[k] for k in ("replica_id", "node_id", "dram_tokens", "actor_name")}
    ray.get(controller.register_replica.remote(gpu_tokens=GPU_TIER + 32, **fields))
    try:
        code, records = bench(platform, tmp_path, "--policy", "lull", "--duration", "5")
    finally:
        ray.get(controller.register_replica.remote(gpu_tokens=GPU_TIER, **fields))
    assert code == 2 and records == []
    assert f"holds {GPU_TIER:,} tokens" in capsys.readouterr().err
