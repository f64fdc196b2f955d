"""First-principles time costs for the cluster simulator.

A ``Profile`` is one replica: a GPU kind, a model, its tensor parallelism and the
engine limits (token budget, max sequences). ``CostModel(profile)`` turns it into
engine step times (a roofline over one continuous-batching step), prefill and
recompute times, and link transfer times. All methods are pure: the simulator owns
the clock and calls them.

No constant here depends on the policy being simulated: every policy is timed by the
same formulas, which ``CostModel.describe()`` prints into each report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

from loadgen.sim.hardware import GPUS, MODELS, GpuSpec, ModelShape

DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of device memory
DEFAULT_TOKEN_BUDGET = 8192  # vLLM V1's max_num_batched_tokens for online serving
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's long-standing max_num_seqs default
DEFAULT_CPU_RATIO = 1.0  # DRAM tier capacity / GPU KV capacity, per replica


class Link(str, Enum):
    """The two links KV crosses between tiers."""

    PCIE = "pcie"  # GPU HBM <-> the node's host DRAM
    NETWORK = "network"  # host DRAM <-> the shared tier (Redis / LMCache)

    @classmethod
    def parse(cls, value: Link | str) -> Link:
        try:
            return cls(value)
        except ValueError:
            choices = ", ".join(link.value for link in cls)
            raise ValueError(f"unknown link {value!r}; valid choices: {choices}") from None


def _non_negative(**values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


@dataclass(frozen=True)
class Profile:
    """One engine replica: ``tensor_parallel`` GPUs of one kind serving one model."""

    gpu: GpuSpec
    model: ModelShape
    tensor_parallel: int = 1
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # share of HBM for weights + KV
    cpu_ratio: float = DEFAULT_CPU_RATIO  # DRAM-tier KV capacity as a multiple of GPU KV capacity
    token_budget: int = DEFAULT_TOKEN_BUDGET  # max tokens (prefill + decode) in one step
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS  # max sequences in one step

    def __post_init__(self) -> None:
        tp = self.tensor_parallel
        if tp < 1:
            raise ValueError(f"tensor_parallel must be >= 1, got {tp}")
        if tp > 1 and self.gpu.nvlink_bandwidth == 0:
            raise ValueError(f"{self.gpu.name} has no GPU interconnect: use tensor_parallel=1")
        if self.model.kv_heads % tp:
            # Each rank holds kv_heads / tp heads; vLLM's replication of KV heads when
            # tp > kv_heads is not modelled.
            raise ValueError(
                f"tensor_parallel={tp} must divide {self.model.name}'s {self.model.kv_heads} KV heads"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.cpu_ratio < 0:
            raise ValueError(f"cpu_ratio must be >= 0, got {self.cpu_ratio}")
        if self.token_budget < 1 or self.max_num_seqs < 1:
            raise ValueError("token_budget and max_num_seqs must be >= 1")
        if self.kv_capacity_tokens < 1:
            usable = self.gpu.hbm_bytes * tp * self.gpu_memory_utilization
            raise ValueError(
                f"{self.model.name} weights ({self.model.weight_bytes / 1e9:.1f} GB) and activations "
                f"({self.activation_reserve_bytes / 1e9:.1f} GB) leave no KV "
                f"space in {usable / 1e9:.1f} GB on {tp} x {self.gpu.name}: raise tensor_parallel "
                f"or gpu_memory_utilization, or pick a larger GPU"
            )
        dram_limit = self.gpu.dram_bytes * tp
        if self.dram_kv_tokens * self.model.kv_bytes_per_token > dram_limit:
            most = dram_limit / (self.kv_capacity_tokens * self.model.kv_bytes_per_token)
            raise ValueError(
                f"cpu_ratio={self.cpu_ratio} needs more than the {dram_limit / 2**30:.0f} GiB of "
                f"host DRAM per replica: reduce cpu_ratio to at most {most:.2f}"
            )

    @property
    def name(self) -> str:
        return f"{self.gpu.name}/{self.model.name}"

    @property
    def context_window(self) -> int:
        """Longest prompt + output one request may hold: the model's window, and no more
        than one replica's KV (vLLM refuses to start with a max_model_len it cannot hold)."""
        return min(self.model.context_window, self.kv_capacity_tokens)

    @property
    def activation_reserve_bytes(self) -> int:
        """Device memory vLLM's profiling run finds busy besides weights and KV, whole
        replica: the peak of one full step, ``token_budget x (2 x MLP width + 4 x hidden)
        x dtype`` (gate and up projections; residual, norm, attention in/out) plus fp32
        logits of ``max_num_seqs`` rows, ``max_num_seqs x vocab x 4``; MoE's MLP width is
        top-k x expert width (the fused kernel's intermediate cache). Plus the GPU's fixed
        runtime reserve per GPU. An estimate of the order vLLM logs, not a measurement."""
        if not self.gpu.reserves_activations:
            return 0
        m = self.model
        width = m.intermediate * max(1, m.experts_per_token)
        peak = self.token_budget * (2 * width + 4 * m.hidden) * m.dtype_bytes + self.max_num_seqs * m.vocab * 4
        return peak + self.gpu.runtime_reserve_bytes * self.tensor_parallel

    @property
    def kv_capacity_tokens(self) -> int:
        """GPU KV tier: ``floor((hbm_bytes * tp * gpu_memory_utilization - weight_bytes -
        activation_reserve_bytes) / kv_bytes_per_token)``, as vLLM sizes its KV cache."""
        usable = self.gpu.hbm_bytes * self.tensor_parallel * self.gpu_memory_utilization
        free = usable - self.model.weight_bytes - self.activation_reserve_bytes
        return max(0, math.floor(free / self.model.kv_bytes_per_token))

    @property
    def dram_kv_tokens(self) -> int:
        """DRAM KV tier: ``floor(cpu_ratio * kv_capacity_tokens)``."""
        return math.floor(self.cpu_ratio * self.kv_capacity_tokens)


def get_profile(
    gpu: str,
    model: str,
    *,
    tensor_parallel: int | None = None,
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
    cpu_ratio: float = DEFAULT_CPU_RATIO,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
) -> Profile:
    """A profile by names, e.g. ``get_profile("h200-80g", "qwen2.5-7b")``. The GPU names
    are the named hardware profiles (``GPUS.names()``); ``tensor_parallel`` defaults to
    the model's deployment TP (4 for llama-3.1-70b)."""
    shape = MODELS.get(model)
    return Profile(
        gpu=GPUS.get(gpu),
        model=shape,
        tensor_parallel=shape.default_tensor_parallel if tensor_parallel is None else tensor_parallel,
        gpu_memory_utilization=gpu_memory_utilization,
        cpu_ratio=cpu_ratio,
        token_budget=token_budget,
        max_num_seqs=max_num_seqs,
    )


@dataclass(frozen=True)
class StepCost:
    """One engine step's time and the terms it came from (seconds)."""

    compute_s: float  # FLOPs per GPU / (peak_flops * mfu)
    memory_s: float  # bytes per GPU / (hbm_bandwidth * mbu)
    allreduce_s: float  # TP all-reduces, not overlapped
    overhead_s: float  # fixed per-step cost

    @property
    def total_s(self) -> float:
        return max(self.compute_s, self.memory_s) + self.allreduce_s + self.overhead_s

    @property
    def compute_bound(self) -> bool:
        return self.compute_s >= self.memory_s


class CostModel:
    """Times for one replica of ``profile``. Pure: no clock, no state beyond the profile."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.gpu = profile.gpu
        self.model = profile.model
        self.tp = profile.tensor_parallel

    # --- sizes ---------------------------------------------------------------

    def kv_bytes(self, tokens: int) -> int:
        _non_negative(tokens=tokens)
        return tokens * self.model.kv_bytes_per_token

    def weight_read_bytes(self, tokens: int) -> float:
        """Weight bytes one step streams from HBM (whole replica) when it runs ``tokens``.
        Dense: every layer weight plus the LM head (the input-embedding gather reads only
        ``tokens`` rows: ignored). MoE: the dense part, the LM head, and the experts the
        step's tokens touch; with uniform top-k routing an expert is touched with
        probability ``1 - (1 - k/E)^tokens`` (k/E at one token, ~1 from ~100 tokens)."""
        m = self.model
        params = m.body_dense_params + m.embedding_params
        if m.is_moe:
            touched = 1 - (1 - m.experts_per_token / m.num_experts) ** tokens
            params += m.num_experts * m.expert_params * touched
        return params * m.dtype_bytes

    # --- FLOPs -----------------------------------------------------------------

    def linear_flops(self, tokens: int, logit_rows: int) -> float:
        """``2 * (body_active * tokens + vocab * hidden * logit_rows)``: 2 FLOPs per
        multiply-add through the active layer weights (MoE: dense part + top-k experts),
        and the LM head only for rows that produce logits."""
        m = self.model
        body_active = m.body_dense_params + m.experts_per_token * m.expert_params
        return 2.0 * (body_active * tokens + m.embedding_params * logit_rows)

    def attention_flops(self, prefill_tokens: int, prefill_context_tokens: int,
                        decode_seqs: int, decode_context_tokens: int) -> float:
        """Score (Q.K) and value (P.V) products, 2 FLOPs per multiply-add each:
        ``4 * layers * heads * head_dim`` per (query, key) pair. A prefill chunk of n
        tokens after c cached ones is causal: n*c + n*(n+1)/2 pairs. A decoding sequence
        with context c attends to c + 1 keys (itself included)."""
        n, c = prefill_tokens, prefill_context_tokens
        pairs = n * c + n * (n + 1) / 2 + decode_context_tokens + decode_seqs
        return 4.0 * self.model.layers * self.model.q_dim * pairs

    # --- one step ----------------------------------------------------------------

    def allreduce_time(self, tokens: int) -> float:
        """TP all-reduces of one step: 2 per layer (after attention and after the MLP)
        of ``tokens * hidden * dtype`` bytes each; a ring moves ``2 (tp-1)/tp`` of that
        per GPU. ``2 * layers * (latency + 2 (tp-1)/tp * bytes / nvlink_bandwidth)``;
        0 at TP=1. Not overlapped with compute (vLLM runs them in-stream)."""
        if self.tp == 1 or tokens == 0:
            return 0.0
        message = tokens * self.model.hidden * self.model.dtype_bytes
        ring = 2 * (self.tp - 1) / self.tp * message / self.gpu.nvlink_bandwidth
        return 2 * self.model.layers * (self.gpu.allreduce_latency_s + ring)

    def step_cost(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int,
                  prefill_context_tokens: int = 0) -> StepCost:
        """The roofline terms of one continuous-batching step (see ``step_time``)."""
        _non_negative(prefill_tokens=prefill_tokens, decode_seqs=decode_seqs,
                      decode_context_tokens=decode_context_tokens,
                      prefill_context_tokens=prefill_context_tokens)
        p = self.profile
        tokens = prefill_tokens + decode_seqs
        if tokens > p.token_budget:
            raise ValueError(f"{tokens} tokens exceed the step's token_budget of {p.token_budget}")
        seqs = decode_seqs + (1 if prefill_tokens else 0)
        if seqs > p.max_num_seqs:
            raise ValueError(f"{seqs} sequences exceed max_num_seqs={p.max_num_seqs}")
        if decode_seqs == 0 and decode_context_tokens:
            raise ValueError("decode_context_tokens given without decode_seqs")
        if prefill_tokens == 0 and prefill_context_tokens:
            raise ValueError("prefill_context_tokens given without prefill_tokens")
        if tokens == 0:
            return StepCost(0.0, 0.0, 0.0, 0.0)

        flops = self.linear_flops(tokens, logit_rows=seqs) + self.attention_flops(
            prefill_tokens, prefill_context_tokens, decode_seqs, decode_context_tokens)
        # KV: read every cached token attended to (the prefill context once per chunk:
        # FlashAttention's re-reads across query tiles hit L2 and prefill is compute
        # bound anyway), write the new tokens' K and V. Activations are not counted.
        kv_bytes = self.model.kv_bytes_per_token * (
            decode_context_tokens + prefill_context_tokens + tokens)
        hbm_bytes = self.weight_read_bytes(tokens) + kv_bytes
        # TP shards weights, KV heads and FLOPs evenly over the ranks, which run in parallel.
        return StepCost(
            compute_s=flops / self.tp / (self.gpu.peak_flops * self.gpu.mfu),
            memory_s=hbm_bytes / self.tp / (self.gpu.hbm_bandwidth * self.gpu.mbu),
            allreduce_s=self.allreduce_time(tokens),
            overhead_s=self.gpu.step_overhead_s + (self.gpu.prefill_overhead_s if prefill_tokens else 0.0),
        )

    def step_time(self, prefill_tokens: int, decode_seqs: int, decode_context_tokens: int,
                  prefill_context_tokens: int = 0) -> float:
        """Seconds for one engine step that prefills ``prefill_tokens`` (one chunk, after
        ``prefill_context_tokens`` already cached for that request) and decodes one token
        for each of ``decode_seqs`` sequences holding ``decode_context_tokens`` in all.
        ``max(compute, memory) + allreduce + overhead``. Several prompts' chunks can be
        passed as one chunk: their causal term is then an upper bound."""
        return self.step_cost(prefill_tokens, decode_seqs, decode_context_tokens,
                              prefill_context_tokens).total_s

    # --- conveniences --------------------------------------------------------------

    def prefill_time(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """One request alone: ``new_tokens`` prefilled in chunks of ``token_budget`` (vLLM
        chunked prefill), each chunk attending to ``cached_tokens`` plus earlier chunks."""
        _non_negative(new_tokens=new_tokens, cached_tokens=cached_tokens)
        total, done = 0.0, 0
        while done < new_tokens:
            chunk = min(self.profile.token_budget, new_tokens - done)
            total += self.step_time(chunk, 0, 0, prefill_context_tokens=cached_tokens + done)
            done += chunk
        return total

    def decode_step_time(self, batch: int, total_context: int) -> float:
        """One decode-only step for ``batch`` sequences holding ``total_context`` tokens."""
        return self.step_time(0, batch, total_context)

    def recompute_time(self, tokens: int) -> float:
        """KV dropped from every tier costs a prefill of all of it, alone, from scratch."""
        return self.prefill_time(tokens, 0)

    def link_bandwidth(self, link: Link | str) -> float:
        """PCIe: each TP rank moves its KV-head shard over its own link, so tp x per-GPU.
        Network: one NIC share per replica."""
        if Link.parse(link) is Link.PCIE:
            return self.gpu.pcie_bandwidth * self.tp
        return self.gpu.network_bandwidth

    def transfer_time(self, nbytes: float, link: Link | str) -> float:
        """``bytes / bandwidth``; per-transfer latency and contention are not modelled."""
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        return nbytes / self.link_bandwidth(link)

    def kv_transfer_time(self, tokens: int, link: Link | str) -> float:
        return self.transfer_time(self.kv_bytes(tokens), link)

    # --- documentation ---------------------------------------------------------------

    def describe(self) -> str:
        """A markdown paragraph with every constant and formula, for the reports."""
        p, g, m = self.profile, self.gpu, self.model
        moe = (f", MoE {m.num_experts} experts top-{m.experts_per_token} "
               f"({m.expert_params:,} params per expert)" if m.is_moe else ", dense")
        return (
            f"**Cost model `{p.name}`** (TP={self.tp}; no per-policy constants). "
            f"GPU `{g.name}` ({g.notes}): peak {g.peak_flops / 1e12:g} TFLOP/s dense bf16 x "
            f"MFU {g.mfu}, HBM {g.hbm_bandwidth / 1e12:g} TB/s x MBU {g.mbu}, "
            f"{g.hbm_bytes / 1e9:g} GB HBM, PCIe {g.pcie_bandwidth / 1e9:g} GB/s per GPU "
            f"(HBM<->DRAM), network {g.network_bandwidth * 8 / 1e9:g} Gb/s per replica "
            f"(DRAM<->shared), NVLink {g.nvlink_bandwidth / 1e9:g} GB/s with "
            f"{g.allreduce_latency_s * 1e6:g} us per all-reduce, {g.dram_bytes / 2**30:g} GiB "
            f"DRAM per GPU, step overhead {g.step_overhead_s * 1e3:g} ms (+ "
            f"{g.prefill_overhead_s * 1e3:g} ms in a step with prefill). "
            f"Model `{m.name}` ({m.source}): {m.layers} layers, hidden {m.hidden}, {m.heads} "
            f"heads, {m.kv_heads} KV heads x {m.head_dim}, vocab {m.vocab}, "
            f"{m.params_total:,} params ({m.params_active:,} active{moe}), "
            f"{m.dtype_bytes} B/param. "
            f"KV bytes/token = 2 x layers x kv_heads x head_dim x dtype = "
            f"{m.kv_bytes_per_token:,} B. GPU KV capacity = (HBM x TP x "
            f"{p.gpu_memory_utilization} - weights {m.weight_bytes / 1e9:.2f} GB - activation and "
            f"runtime reserve {p.activation_reserve_bytes / 1e9:.2f} GB) / KV bytes/token "
            f"= {p.kv_capacity_tokens:,} tokens; context window {p.context_window:,} tokens "
            f"(prompt + output; longer calls are compacted by the workload, and the engine "
            f"refuses any that is not); DRAM tier = cpu_ratio {p.cpu_ratio:g} x that "
            f"= {p.dram_kv_tokens:,} tokens. "
            f"Engine step (continuous batching, <= {p.token_budget} tokens and "
            f"<= {p.max_num_seqs} seqs) = max(compute, memory) + TP all-reduce + overhead, with "
            f"compute = [2 x active layer params x tokens + 2 x vocab x hidden x logit rows + "
            f"4 x layers x heads x head_dim x attended (query, key) pairs (causal within a "
            f"prefill chunk: n x cached + n(n+1)/2)] / TP / (peak x MFU); memory = [weights read "
            f"(layers + LM head; MoE experts touched w.p. 1-(1-k/E)^tokens) + KV bytes of every "
            f"cached token attended to + KV written] / TP / (HBM bw x MBU); all-reduce = 2 x "
            f"layers x (latency + 2(TP-1)/TP x tokens x hidden x dtype / NVLink), 0 at TP=1. "
            f"Prefill runs alone in chunks of the token budget; recompute = prefill of the "
            f"whole context; transfer = bytes / link bandwidth (PCIe x TP, or network), no "
            f"latency or contention."
        )
