"""The GPU tier a replica registers is the KV cache vLLM allocated, not the configured estimate."""

from types import SimpleNamespace

from workers.engine import cache_tokens
from workers.engine_deployment import registered_capacity


def test_the_cache_holds_its_blocks_less_vllms_null_block():
    assert cache_tokens(SimpleNamespace(num_gpu_blocks=641, block_size=16)) == 640 * 16
    assert cache_tokens(SimpleNamespace(num_gpu_blocks=None, block_size=16)) is None  # not started yet


def test_a_replica_registers_the_engines_real_cache_over_the_estimate():
    estimate = {"gpu_tokens": 18_724, "dram_tokens": 500_000}  # e.g. from cpu_kv_cache_gib on a GPU node
    assert registered_capacity(estimate, 1_203_200, "r1") == {"gpu_tokens": 1_203_200, "dram_tokens": 500_000}
    assert registered_capacity(estimate, 18_724, "r1") is estimate
    assert registered_capacity(estimate, None, "r1") is estimate  # the engine reports none: keep the estimate
