"""vLLM's own metrics that Lull's dashboards use, by name and type, as vLLM 0.32.0
defines them in ``vllm/v1/metrics/loggers.py`` (a test reads that file and checks
each entry). Every one carries the labels ``model_name`` and ``engine``."""

from __future__ import annotations

from typing import Literal

from proto.telemetry.metrics import exposed_series

VLLM_METRICS: dict[str, Literal["counter", "gauge", "histogram"]] = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
    "vllm:external_prefix_cache_queries": "counter",
    "vllm:external_prefix_cache_hits": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
}


def vllm_series_names() -> frozenset[str]:
    """Series names as PromQL sees them."""
    return frozenset().union(*(exposed_series(n, k) for n, k in VLLM_METRICS.items()))
