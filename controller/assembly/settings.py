"""What `build_app` takes beyond `LullConfig` (Serve passes them as the app's args), and the
engine settings every replica gets."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proto.config import GIB, LullConfig


@dataclass(frozen=True)
class PlatformSettings:
    """What `build_app` takes beyond `LullConfig` (Serve passes them as the app's args)."""

    replicas: int = 1  # engine replicas at launch
    min_replicas: int | None = None  # the autoscaler's bounds; None: replicas. min < max turns it on
    max_replicas: int | None = None
    engine_num_cpus: float = 1.0  # Ray CPUs per engine replica (fractional to pack CPU replicas)
    gateway_num_cpus: float = 0.25  # Ray CPUs of the gateway replica
    cpu_kv_cache_gib: float | None = None  # per-replica KV cache on cpu; None: engine.cpu_kv_cache_space_gib
    dram_dir: str = "/dev/shm/lull-dram"  # the node's DRAM tier (tmpfs)
    default_max_tokens: int = 256  # output tokens when a client sets no max_tokens
    model_path: str | None = None  # None: model.path, else the embedded tiny model
    policy: str | None = None  # the controller's policy; None: policy.name
    redis_url: str | None = None  # the shared tier; None: tiers.redis_url
    grpc_port: int | None = None  # the gRPC SessionService; None: gateway.grpc_port, 0: off
    gpu_tier_tokens: int | None = None  # the controller's GPU-tier budget per replica; None: the engine's whole cache
    gpu_node_selector: str | None = None  # on Kubernetes: the GPU worker group's nodes, to cap the autoscaler
    gpus_per_replica: int = 1
    gpus_per_pod: int = 1

    def __post_init__(self):
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas}")
        if not 1 <= self.bounds[0] <= self.replicas <= self.bounds[1] <= 1024:
            raise ValueError(f"need 1 <= min_replicas <= replicas <= max_replicas <= 1024; got "
                             f"{self.min_replicas}, {self.replicas}, {self.max_replicas}")
        if not 0 < self.engine_num_cpus <= 64 or not 0 <= self.gateway_num_cpus <= 64:
            raise ValueError("engine_num_cpus must be in (0, 64] and gateway_num_cpus in [0, 64]")
        if self.cpu_kv_cache_gib is not None and self.cpu_kv_cache_gib <= 0:
            raise ValueError(f"cpu_kv_cache_gib must be positive, got {self.cpu_kv_cache_gib}")
        if self.gpu_tier_tokens is not None and self.gpu_tier_tokens < 1:
            raise ValueError(f"gpu_tier_tokens must be >= 1, got {self.gpu_tier_tokens}")
        if self.grpc_port is not None and not 0 <= self.grpc_port <= 65535:
            raise ValueError(f"grpc_port must be in [0, 65535], got {self.grpc_port}")
        if not 1 <= self.gpus_per_replica <= self.gpus_per_pod <= 64:
            raise ValueError(f"need 1 <= gpus_per_replica <= gpus_per_pod <= 64; got {self.gpus_per_replica}, "
                             f"{self.gpus_per_pod}")
        if self.default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {self.default_max_tokens}")

    @property
    def bounds(self) -> tuple[int, int]:
        """The engine replica count's (min, max)."""
        return (self.replicas if self.min_replicas is None else self.min_replicas,
                self.replicas if self.max_replicas is None else self.max_replicas)

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> PlatformSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(args) - known
        if unknown:
            raise ValueError(f"unknown app args {sorted(unknown)}; valid: {sorted(known)}")
        return cls(**args)


def model_dir(settings: PlatformSettings, config: LullConfig) -> str:
    if settings.model_path or config.model.path:
        return str(settings.model_path or config.model.path)
    from workers.tiny_model import ensure_tiny_model

    return str(ensure_tiny_model())


def kv_bytes_per_token(model: str, dtype_bytes: int = 4) -> int:
    """K and V of every layer for one token, from the model's config.json."""
    cfg = json.loads((Path(model) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    return 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim * dtype_bytes


def engine_settings(settings: PlatformSettings, config: LullConfig) -> dict:
    """`EngineSettings` fields for every replica (each sets its own replica_id)."""
    return dict(model=model_dir(settings, config), device=config.model.device, dtype="float32",
                max_model_len=config.engine.max_model_len, max_num_seqs=config.engine.max_num_seqs,
                cpu_kv_cache_gib=settings.cpu_kv_cache_gib or config.engine.cpu_kv_cache_space_gib,
                gpu_memory_utilization=config.engine.gpu_memory_utilization,
                dram_dir=settings.dram_dir, dram_capacity_bytes=int(config.tiers.dram_capacity_gib * GIB) or 1,
                served_model_name=config.model.served_name)
