"""``lull bench``'s pure parts: the equal-capacity check on the engine's real KV cache, the
hit-source partition from the engine's and connector's counters, the per-policy memory
split, the pressure checks, and the replay's censoring at the deadline (with a scripted
in-process client standing in for the network: a real engine is the integration test's)."""

from __future__ import annotations

import asyncio

import pytest

from controller.cli.bench.live import policy_memory
from controller.cli.bench.live_platform import EngineCache, check_equal_capacity, engine_cache, engine_usage
from controller.cli.bench.live_report import hit_sources, pressure_checks, run_figures
from loadgen.conversation import TokenConversation
from loadgen.replay import CallOutcome, ReplaySettings, replay
from loadgen.sim.workload import scripted_workload

# vLLM's own line, as a replica sized by `lull up --gpu-tier-tokens 4096` (block 32) reports it.
CACHE_INFO = ('# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig\n'
              '# TYPE vllm:cache_config_info gauge\n'
              'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="129",'
              'num_gpu_blocks_override="129",enable_prefix_caching="True"} 1.0\n'
              '# HELP vllm:kv_cache_usage_perc KV-cache usage.\n# TYPE vllm:kv_cache_usage_perc gauge\n'
              'vllm:kv_cache_usage_perc{engine="0",model_name="lull"} 0.25\n')


def test_the_engine_cache_is_read_from_vllms_cache_config_info_less_its_null_block():
    cache = engine_cache(CACHE_INFO)
    assert cache == EngineCache(129, 32) and cache.tokens == 4096
    assert engine_cache("") is None and engine_usage(CACHE_INFO) == 0.25


def test_the_bench_refuses_an_engine_cache_that_differs_from_the_gpu_tier():
    assert check_equal_capacity({"r1": 4096}, {"r1": EngineCache(129, 32)}) == 4096
    with pytest.raises(ValueError, match=r"r1's KV cache holds 1,048,544 tokens .* GPU tier is 4,096.*"
                                         r"--gpu-tier-tokens"):
        check_equal_capacity({"r1": 4096}, {"r1": EngineCache(32768, 32)})
    with pytest.raises(ValueError, match="does not report its KV cache"):
        check_equal_capacity({"r1": 4096}, {"r1": None})
    with pytest.raises(ValueError, match="GPU tiers differ"):
        check_equal_capacity({"r1": 4096, "r2": 2048}, {"r1": EngineCache(129, 32), "r2": EngineCache(65, 32)})
    with pytest.raises(ValueError, match="no engine replica"):
        check_equal_capacity({}, {})


def test_hit_sources_partition_the_prompt_tokens_the_engine_prefilled():
    delta = {"vllm:prompt_tokens_by_source_total:local_compute": 300.0,
             "vllm:prompt_tokens_by_source_total:local_cache_hit": 500.0,
             "vllm:prompt_tokens_by_source_total:external_kv_transfer": 200.0,
             "connector:loaded_tokens_dram": 128.0, "connector:loaded_tokens_shared": 32.0}
    sources = hit_sources(delta)
    assert sources["prompt_tokens"] == 1000 and sources["vllm_external"] == 200
    # 40 tokens the connector promised and could not load were recomputed by vLLM.
    assert (sources["engine_cache"], sources["dram"], sources["shared"], sources["recomputed"]) == (500, 128, 32, 340)
    assert sum(sources[k] for k in ("engine_cache", "dram", "shared", "recomputed")) == sources["prompt_tokens"]


def test_turnovers_and_busy_fraction_come_from_the_counters():
    delta = {"vllm:prompt_tokens_by_source_total:local_compute": 7000.0,
             "vllm:prompt_tokens_by_source_total:local_cache_hit": 1000.0,
             "vllm:generation_tokens_total": 1000.0, "connector:busy_seconds": 8.0, "connector:busy_steps": 100.0}
    figures = run_figures(delta, duration_s=10.0, replicas=1, gpu_tokens=4000)
    assert figures["turnovers"] == pytest.approx(2.0) and figures["busy_fraction"] == pytest.approx(0.8)
    assert figures["time_spent"]["engine_steps"] == 100


def test_every_policy_books_the_same_off_gpu_tokens_and_one_without_a_shared_tier_gets_them_as_dram():
    lull = policy_memory("lull", gpu=4096, store=12288, shared_fraction=0.5, replicas=2)
    mori = policy_memory("mori", gpu=4096, store=12288, shared_fraction=0.5, replicas=2)
    lru = policy_memory("lru-offload", gpu=4096, store=12288, shared_fraction=0.5, replicas=2)
    assert lull["dram_books_per_replica"] + lull["shared_books"] // 2 == mori["dram_books_per_replica"] == 8192
    assert mori["shared_books"] is None and lru["dram_books_per_replica"] is None
    assert {m["dram_store_per_replica"] for m in (lull, mori, lru)} == {12288}
    with pytest.raises(ValueError, match="no more than the GPU tier's write-through copies"):
        policy_memory("lull", gpu=4096, store=4096, shared_fraction=0.5, replicas=1)


def record(policy: str, busy: float, turnovers: float = 5.0) -> dict:
    return {"policy": policy, "busy_fraction": busy, "turnovers": turnovers, "duration_s": 45.0,
            "replicas": 1, "programs_per_replica": 12, "capacity_tokens": {"gpu_per_replica": 10240}}


def test_pressure_checks_say_which_condition_fails():
    probe = {"tokens": 3000, "recompute_s": 0.4, "hit_s": 0.05}
    checks = pressure_checks([record("lull", 0.6), record("lru-offload", 0.85)], 3000.0, probe)
    assert [ok for _, ok in checks] == [True, True, True, True]
    checks = pressure_checks([record("lull", 0.6, turnovers=1.0)], 2000.0, {**probe, "recompute_s": 0.1})
    assert [ok for _, ok in checks] == [False, False, False, False]
    assert "no lru-offload run" in checks[1][0] and "2.0x" in checks[2][0]


class SlowClient:
    """Answers each session's first call after ``first_s``, streaming ``tokens`` tokens one
    per ``token_s``; a session named in ``fail`` fails at once; the rest never answer."""

    def __init__(self, first_s: float, token_s: float, tokens: int, fail: set[str] = frozenset()):
        self.first_s, self.token_s, self.tokens, self.fail = first_s, token_s, tokens, fail
        self.closed: list[str] = []

    def conversation(self, settings, rng):
        return TokenConversation(settings.vocab, rng)

    async def call(self, session_id, prompt, max_tokens, progress=None):
        if session_id in self.fail:
            raise RuntimeError("HTTP 503")
        await asyncio.sleep(self.first_s)
        for _ in range(self.tokens):
            progress.token()
            await asyncio.sleep(self.token_s)
        return CallOutcome(self.first_s, [5] * self.tokens, 0)

    async def close_session(self, session_id):
        self.closed.append(session_id)


def settings(duration: float, programs: int = 1) -> ReplaySettings:
    return ReplaySettings(programs=programs, duration_s=duration, time_scale=0.0, max_context=200, max_output=8)


def test_a_call_without_a_first_token_at_the_deadline_is_censored_and_its_session_closed():
    work = scripted_workload([[(0.0, 40, 4, 0)]])
    result = asyncio.run(replay(work, SlowClient(first_s=10.0, token_s=0.0, tokens=1), settings(0.2)))
    summary = result.summary()
    assert summary["requests_completed"] == 0 and summary["calls_censored"] == 1 and summary["calls_failed"] == 0
    assert summary["ttft_mean_s"] == pytest.approx(0.2, abs=0.1)  # it waited the whole run, at least
    assert summary["starved_programs"] == 1 and summary["program_calls_min"] == 0
    assert summary["sessions_zero_progress"] == 1 and result.duration_s < 1.0


def test_a_call_cut_while_streaming_counts_its_first_token_and_the_tokens_it_got():
    work = scripted_workload([[(0.0, 40, 4, 0)]])
    result = asyncio.run(replay(work, SlowClient(first_s=0.05, token_s=0.05, tokens=100), settings(0.3)))
    summary = result.summary()
    assert summary["calls_cut"] == 1 and summary["calls_censored"] == 0
    assert summary["ttft_mean_s"] == pytest.approx(0.05, abs=0.04)
    assert 2 <= summary["output_tokens_per_s"] * summary["duration_s"] <= 8


def test_failed_calls_are_counted_and_censored_with_their_wait():
    work = scripted_workload([[(0.0, 40, 4, 0)], [(0.0, 40, 4, 0)]])
    client = SlowClient(first_s=0.0, token_s=0.0, tokens=2, fail={"bench-1-0"})
    summary = asyncio.run(replay(work, client, settings(0.1, programs=2))).summary()
    assert summary["calls_failed"] >= 1 and summary["errors"] >= 1 and summary["requests_completed"] >= 1
    assert "bench-1-0" in client.closed
