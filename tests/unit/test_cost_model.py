"""The simulator's cost model against hand-computed values (arithmetic in comments)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from loadgen.sim.cost_model import CostModel, Link, Profile, get_profile
from loadgen.sim.hardware import GPUS, MODELS, GiB, Registry

H100_MFU_FLOPS = 989e12 * 0.5  # peak x MFU = 4.945e14 FLOP/s
H100_MBU_BW = 3.35e12 * 0.7  # peak x MBU = 2.345e12 B/s


def model(gpu: str, name: str, **kwargs) -> CostModel:
    return CostModel(get_profile(gpu, name, **kwargs))


# --- shapes ----------------------------------------------------------------------


def test_kv_bytes_per_token_from_shape() -> None:
    # 2 (K and V) * layers * kv_heads * head_dim * 2 B (bf16)
    assert MODELS.get("qwen2.5-7b").kv_bytes_per_token == 2 * 28 * 4 * 128 * 2 == 57_344
    assert MODELS.get("llama-3.1-70b").kv_bytes_per_token == 2 * 80 * 8 * 128 * 2 == 327_680
    assert MODELS.get("qwen3-30b-a3b").kv_bytes_per_token == 2 * 48 * 4 * 128 * 2 == 98_304
    assert model("h100-80g", "qwen2.5-7b").kv_bytes(1000) == 57_344_000


@pytest.mark.parametrize(
    ("name", "per_layer", "layers", "vocab", "hidden"),
    [
        # q 3584^2 + 3584 bias, k and v 3584*512 + 512 each, o 3584^2,
        # MLP 3*3584*18944, two RMSNorms 2*3584
        ("qwen2.5-7b",
         3584 * 3584 + 3584 + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584,
         28, 152064, 3584),
        # q, o 8192^2 each; k, v 8192*1024 each; MLP 3*8192*28672; norms 2*8192
        ("llama-3.1-70b",
         2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192, 80, 128256, 8192),
        # q, o 2048*4096 each; k, v 2048*512 each; q/k norms 2*128; router 2048*128;
        # 128 experts of 3*2048*768; norms 2*2048
        ("qwen3-30b-a3b",
         2 * 2048 * 4096 + 2 * 2048 * 512 + 2 * 128 + 2048 * 128 + 128 * 3 * 2048 * 768 + 2 * 2048,
         48, 151936, 2048),
    ],
)
def test_param_counts_match_the_config_shapes(name, per_layer, layers, vocab, hidden) -> None:
    # layers + untied input embedding and LM head + final norm
    shape = MODELS.get(name)
    assert shape.params_total == per_layer * layers + 2 * vocab * hidden + hidden


def test_moe_split_recovers_one_expert() -> None:
    m = MODELS.get("qwen3-30b-a3b")
    # (total - active) / (128 - 8) must be exactly one expert's SwiGLU over 48 layers
    assert m.expert_params == 3 * 2048 * 768 * 48 == 226_492_416
    # active ~3.3B: dense body + 8 experts + both embedding tables
    assert m.body_dense_params + 8 * m.expert_params + 2 * 151936 * 2048 == m.params_active
    # the model card's "30.5B total, 3.3B activated"
    assert round(m.params_total / 1e9, 1) == 30.5 and abs(m.params_active / 1e9 - 3.3) < 0.1


# --- capacity --------------------------------------------------------------------


def test_kv_capacity_h200_80g_qwen() -> None:
    # 80 GB (MORI's cap, not GiB) x 0.9 = 72,000,000,000; weights 7,615,616,512 * 2
    # = 15,231,233,024; activations 8192 x (2 x 18944 + 4 x 3584) x 2 = 855,638,016, fp32
    # logits 256 x 152,064 x 4 = 155,713,536, runtime 1 GiB = 1,073,741,824; left
    # 54,683,673,600 / 57,344 = 953,607.6 -> 953,607 tokens
    profile = get_profile("h200-80g", "qwen2.5-7b")
    assert profile.activation_reserve_bytes == 855_638_016 + 155_713_536 + 1_073_741_824
    assert profile.kv_capacity_tokens == 953_607
    assert profile.tensor_parallel == 1


def test_context_window_is_the_models_and_yarn_is_its_own_profile() -> None:
    assert get_profile("h200-80g", "qwen2.5-7b").context_window == 32_768
    assert get_profile("h200-80g", "qwen2.5-7b-yarn").context_window == 131_072
    assert get_profile("h200-80g", "qwen3-30b-a3b").context_window == 40_960
    assert get_profile("h200-80g", "llama-3.1-70b").context_window == 131_072
    # no more than one replica's KV: vLLM would refuse such a max_model_len
    assert get_profile("cpu-small", "llama-tiny").context_window == 4096
    assert MODELS.get("qwen2.5-7b-yarn").kv_bytes_per_token == MODELS.get("qwen2.5-7b").kv_bytes_per_token


def test_kv_capacity_llama_70b_uses_four_gpus() -> None:
    # 4 x 80 GB x 0.9 = 288,000,000,000; weights 70,553,706,496 * 2 = 141,107,412,992;
    # activations 8192 x (2 x 28672 + 4 x 8192) x 2 = 1,476,395,008, logits 256 x 128,256
    # x 4 = 131,334,144, runtime 4 x 1 GiB; left 140,989,890,560 / 327,680 = 430,267.7
    profile = get_profile("h100-80g", "llama-3.1-70b")
    assert profile.tensor_parallel == 4
    assert profile.kv_capacity_tokens == 430_267
    with pytest.raises(ValueError, match="leave no KV"):  # two 80 GB GPUs hold no KV
        get_profile("h100-80g", "llama-3.1-70b", tensor_parallel=2)


def test_dram_tier_from_cpu_ratio_and_its_limit() -> None:
    profile = get_profile("h100-80g", "qwen2.5-7b", cpu_ratio=2.0)
    assert profile.dram_kv_tokens == 2 * 953_607
    # 256 GiB / (953,607 * 57,344 B) = 5.03: a ratio of 5.5 does not fit the host
    with pytest.raises(ValueError, match="reduce cpu_ratio to at most 5.03"):
        get_profile("h100-80g", "qwen2.5-7b", cpu_ratio=5.5)


def test_model_that_does_not_fit_names_the_fix() -> None:
    with pytest.raises(ValueError, match="raise tensor_parallel"):
        get_profile("h100-80g", "llama-3.1-70b", tensor_parallel=1)
    with pytest.raises(ValueError, match="raise tensor_parallel"):
        get_profile("cpu-small", "qwen2.5-7b")


# --- roofline --------------------------------------------------------------------


def test_decode_batch_one_is_memory_bound_on_weights() -> None:
    cost = model("h100-80g", "qwen2.5-7b").step_cost(0, 1, 0)
    assert not cost.compute_bound
    # weights read = all but the input-embedding table (a gather of one row):
    # (7,615,616,512 - 152,064 * 3,584) * 2 B = 14,141,238,272 B, + 57,344 B of new KV
    # = 14,141,295,616 B / 2.345e12 B/s = 6.0304 ms
    assert cost.memory_s == pytest.approx(14_141_295_616 / H100_MBU_BW, rel=1e-12)
    assert cost.total_s == pytest.approx(6.0304e-3, rel=1e-4)
    # and within 8% of the textbook weights / bandwidth
    assert cost.total_s == pytest.approx(MODELS.get("qwen2.5-7b").weight_bytes / H100_MBU_BW, rel=0.08)


def test_decode_reads_the_kv_of_every_context_token() -> None:
    cost_model = model("h100-80g", "qwen2.5-7b")
    # 64 seqs x 1000 tokens: + 64,000 * 57,344 B = 3,670,016,000 B read (memory bound)
    delta = cost_model.decode_step_time(64, 64_000) - cost_model.decode_step_time(64, 0)
    assert delta == pytest.approx(3_670_016_000 / H100_MBU_BW, rel=1e-9)


def test_big_prefill_is_compute_bound() -> None:
    cost = model("h100-80g", "qwen2.5-7b").step_cost(8192, 0, 0)
    assert cost.compute_bound
    # linear: 2 * (6,525,621,760 layer params * 8192 + 152,064 * 3,584 LM head * 1 row)
    #       = 106,916,876,910,592 FLOPs
    # attention: 4 * 28 layers * 3584 * (8192 * 8193 / 2 causal pairs) = 13,470,661,607,424
    # total 120,387,538,518,016 / 4.945e14 = 0.243453 s
    assert cost.compute_s == pytest.approx(120_387_538_518_016 / H100_MFU_FLOPS, rel=1e-12)
    # within 5% of the rule of thumb 2 * P * N / (peak * MFU) = 0.2523 s
    rule = 2 * 7_615_616_512 * 8192 / H100_MFU_FLOPS
    assert cost.total_s == pytest.approx(rule, rel=0.05)


def test_prefill_chunks_by_token_budget_and_attends_to_earlier_chunks() -> None:
    cost_model = model("h100-80g", "qwen2.5-7b")
    # 20,000 tokens = 8192 + 8192 + 3616, each chunk after the previous ones
    expected = (cost_model.step_time(8192, 0, 0, prefill_context_tokens=0)
                + cost_model.step_time(8192, 0, 0, prefill_context_tokens=8192)
                + cost_model.step_time(3616, 0, 0, prefill_context_tokens=16384))
    assert cost_model.prefill_time(20_000) == pytest.approx(expected, rel=1e-12)
    # a cached prefix makes the suffix cheaper than prefilling both, dearer than no prefix
    suffix = cost_model.prefill_time(1000, cached_tokens=50_000)
    assert cost_model.prefill_time(1000) < suffix < cost_model.prefill_time(51_000)


def test_recompute_is_a_prefill() -> None:
    for gpu, name in [("h100-80g", "qwen2.5-7b"), ("h200-80g", "qwen3-30b-a3b"),
                      ("h100-80g", "llama-3.1-70b"), ("cpu-small", "llama-tiny")]:
        cost_model = model(gpu, name)
        for tokens in (0, 1, 8192, 100_000):
            assert cost_model.recompute_time(tokens) == cost_model.prefill_time(tokens, 0)


def test_tensor_parallel_halves_per_gpu_work_and_adds_all_reduce() -> None:
    tp1 = model("h100-80g", "qwen2.5-7b", tensor_parallel=1)
    tp2 = model("h100-80g", "qwen2.5-7b", tensor_parallel=2)
    for args in [(0, 1, 0), (0, 64, 64_000), (8192, 0, 0), (4096, 32, 100_000)]:
        one, two = tp1.step_cost(*args), tp2.step_cost(*args)
        assert two.compute_s == pytest.approx(one.compute_s / 2, rel=1e-12)
        assert two.memory_s == pytest.approx(one.memory_s / 2, rel=1e-12)
        assert one.allreduce_s == 0.0
    # batch 1: 2 * 28 layers * (5 us + 2 * (1/2) * 3584 * 2 B / 450e9 B/s) = 280.89 us
    assert tp2.allreduce_time(1) == pytest.approx(2.808920e-4, rel=1e-6)
    assert tp2.step_time(0, 1, 0) == pytest.approx(tp1.step_time(0, 1, 0) / 2 + 2.808920e-4, rel=1e-6)


def test_moe_decode_reads_only_the_experts_it_touches() -> None:
    cost_model = model("h100-80g", "qwen3-30b-a3b")
    m = cost_model.model
    # one token: dense body + LM head + 8 of 128 experts = params_active - input embedding
    assert cost_model.weight_read_bytes(1) == pytest.approx(
        (3_353_032_704 - 151936 * 2048) * 2, rel=1e-12)
    # a full budget touches every expert: 1 - (120/128)^8192 ~ 1
    assert cost_model.weight_read_bytes(8192) == pytest.approx(
        (m.params_total - 151936 * 2048) * 2, rel=1e-9)
    assert cost_model.decode_step_time(1, 0) < model("h100-80g", "qwen2.5-7b").decode_step_time(1, 0)


def test_roofline_is_monotonic_in_every_input() -> None:
    for gpu, name in [("h100-80g", "qwen2.5-7b"), ("h200-80g", "qwen3-30b-a3b"),
                      ("h200-80g", "llama-3.1-70b"), ("cpu-small", "llama-tiny")]:
        cost_model = model(gpu, name)
        for context in (0, 10_000, 200_000):
            times = [cost_model.step_time(n, 0, 0, context) for n in (1, 16, 512, 4096, 8192)]
            assert times == sorted(times)
        decode = [cost_model.decode_step_time(b, b * 2000) for b in (1, 8, 64, 256)]
        assert decode == sorted(decode)
        by_context = [cost_model.decode_step_time(8, c) for c in (0, 1000, 100_000, 1_000_000)]
        assert by_context == sorted(by_context)


def test_faster_hbm_speeds_decode_but_not_compute_bound_prefill() -> None:
    h100, h200 = model("h100-80g", "qwen2.5-7b"), model("h200-80g", "qwen2.5-7b")
    # memory bound: time scales with 3.35 / 4.8
    assert h200.decode_step_time(1, 0) == pytest.approx(h100.decode_step_time(1, 0) * 3.35 / 4.8)
    assert h200.step_time(8192, 0, 0) == h100.step_time(8192, 0, 0)


# --- links -------------------------------------------------------------------------


def test_transfer_time_is_bytes_over_bandwidth() -> None:
    qwen = model("h100-80g", "qwen2.5-7b")
    assert qwen.transfer_time(1e9, Link.PCIE) == pytest.approx(1e9 / 55e9)  # 18.18 ms
    assert qwen.transfer_time(1e9, "network") == pytest.approx(1e9 / 12.5e9)  # 100 Gb/s: 80 ms
    # 10,000 tokens of KV = 573,440,000 B over PCIe = 10.43 ms
    assert qwen.kv_transfer_time(10_000, "pcie") == pytest.approx(573_440_000 / 55e9)
    # TP=4: each rank moves its quarter over its own PCIe link
    llama = model("h100-80g", "llama-3.1-70b")
    assert llama.transfer_time(1e9, "pcie") == pytest.approx(1e9 / 220e9)
    assert llama.transfer_time(1e9, "network") == pytest.approx(1e9 / 12.5e9)


# --- invalid inputs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.step_time(-1, 0, 0),
        lambda c: c.step_time(0, -1, 0),
        lambda c: c.step_time(0, 1, -5),
        lambda c: c.step_time(10, 0, 0, prefill_context_tokens=-1),
        lambda c: c.prefill_time(-10),
        lambda c: c.prefill_time(10, cached_tokens=-1),
        lambda c: c.recompute_time(-1),
        lambda c: c.kv_bytes(-1),
        lambda c: c.transfer_time(-1.0, "pcie"),
        lambda c: c.decode_step_time(0, 100),  # context without sequences
        lambda c: c.step_time(8192, 1, 100),  # 8193 tokens > budget
        lambda c: c.decode_step_time(257, 257_000),  # > max_num_seqs
    ],
)
def test_invalid_step_inputs_raise(call) -> None:
    with pytest.raises(ValueError):
        call(model("h100-80g", "qwen2.5-7b"))


def test_unknown_names_list_the_valid_choices() -> None:
    with pytest.raises(ValueError, match="valid choices: cpu-small, h100-80g, h200-80g"):
        get_profile("a100", "qwen2.5-7b")
    with pytest.raises(ValueError, match="llama-3.1-70b, llama-tiny, qwen2.5-7b, qwen2.5-7b-yarn, qwen3-30b-a3b"):
        get_profile("h100-80g", "gpt-5")
    with pytest.raises(ValueError, match="valid choices: pcie, network"):
        model("h100-80g", "qwen2.5-7b").transfer_time(1, "nvme")


def test_invalid_profiles_raise() -> None:
    with pytest.raises(ValueError, match="must divide"):
        get_profile("h100-80g", "llama-3.1-70b", tensor_parallel=3)
    with pytest.raises(ValueError, match="no GPU interconnect"):
        get_profile("cpu-small", "llama-tiny", tensor_parallel=2)
    with pytest.raises(ValueError):
        get_profile("h100-80g", "qwen2.5-7b", gpu_memory_utilization=1.5)
    with pytest.raises(ValueError):
        get_profile("h100-80g", "qwen2.5-7b", token_budget=0)
    with pytest.raises(ValueError):
        Profile(gpu=GPUS.get("h100-80g"), model=MODELS.get("qwen2.5-7b"), cpu_ratio=-1)


def test_registry_register_and_duplicates() -> None:
    registry: Registry[Callable[[], int]] = Registry("thing")

    @registry.register("seven")
    def _seven() -> int:
        return 7

    registry.register("eight", lambda: 8)
    assert registry.names() == ["eight", "seven"] and "eight" in registry and len(registry) == 2
    assert registry.get("seven")() == 7
    with pytest.raises(ValueError, match="already registered"):
        registry.register("eight", lambda: 9)


# --- documentation -------------------------------------------------------------------


def test_describe_lists_constants_and_formulas() -> None:
    text = model("h200-80g", "qwen2.5-7b").describe()
    for fragment in ("h200-80g/qwen2.5-7b", "989 TFLOP/s", "MFU 0.5", "4.8 TB/s", "MBU 0.7",
                     "PCIe 55 GB/s", "network 100 Gb/s", "57,344 B", "953,607 tokens",
                     "context window 32,768 tokens",
                     "max(compute, memory)", "no per-policy constants", "recompute = prefill"):
        assert fragment in text
    assert "CALIBRATE" in model("cpu-small", "llama-tiny").describe()
    assert GPUS.get("h200-80g").hbm_bytes == 80 * 10**9
