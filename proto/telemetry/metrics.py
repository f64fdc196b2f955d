"""Lull's metric catalogue and the node's metrics endpoint.

Every Lull process on a node (gateway, controller, engine replicas, node agent)
writes its metrics to the node's ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client
multiprocess mode, as vLLM does); the node agent serves the merged registry, Lull's
``lull:*`` beside vLLM's ``vllm:*``, on ``telemetry.metrics_port`` at ``/metrics``.
Dashboards and alert rules may name only the metrics listed here (the tests check).

Writers must set ``PROMETHEUS_MULTIPROC_DIR`` before importing prometheus_client:
it picks its value storage at import. ``make_metrics`` creates a missing directory;
one it cannot use (or an unset variable) leaves the process's metrics in memory,
said once in the log, rather than failing on the first value written.
"""

from __future__ import annotations

import functools
import logging
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

Kind = Literal["counter", "gauge", "histogram"]

TIERS = ("gpu", "dram", "shared", "waiting")
MOVE_KINDS = ("demote", "promote", "drop", "drain")  # the node agent's MoveKind values + drain
IDLENESS_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0)
PLAN_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    # Gauges only: how values from several processes merge. "mostrecent" suits a
    # value one process owns per label set (the controller, one node agent);
    # "livesum" one that every process of a kind contributes to.
    multiprocess_mode: str | None = None
    buckets: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.name.startswith("lull:"):
            raise ValueError(f"{self.name}: Lull's metrics start with 'lull:'")
        if (self.kind == "gauge") != (self.multiprocess_mode is not None):
            raise ValueError(f"{self.name}: a multiprocess_mode is required for gauges and only for them")
        if (self.kind == "histogram") != (self.buckets is not None):
            raise ValueError(f"{self.name}: buckets are required for histograms and only for them")

    def series_names(self) -> frozenset[str]:
        return exposed_series(self.name, self.kind)


def exposed_series(name: str, kind: Kind) -> frozenset[str]:
    """The names a metric has in the exposition (what PromQL can select): counters
    end in _total, histograms in _bucket, _sum and _count."""
    if kind == "counter":
        return frozenset({f"{name}_total"})
    if kind == "histogram":
        return frozenset(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
    return frozenset({name})


CATALOGUE: tuple[MetricSpec, ...] = (
    # sessions
    MetricSpec("lull:sessions", "gauge", "Live sessions by the tier their KV is in (waiting: KV dropped).",
               ("tier",), multiprocess_mode="mostrecent"),
    MetricSpec("lull:sessions_expired", "counter",
               "Sessions the controller closed after policy.session_idle_ttl_s without a call; their KV left every tier.", ()),
    MetricSpec("lull:session_idleness", "histogram",
               "Idleness (tool time / (tool + LLM time), last cycles) of a session when its request arrives, by its tier then.",
               ("tier",), buckets=IDLENESS_BUCKETS),
    # tiers
    MetricSpec("lull:tier_used_bytes", "gauge", "KV bytes held in a tier, per replica (gpu) or per node (dram); shared has neither.",
               ("tier", "node", "replica"), multiprocess_mode="mostrecent"),
    MetricSpec("lull:tier_capacity_bytes", "gauge", "Capacity of a tier in bytes, labelled like lull:tier_used_bytes.",
               ("tier", "node", "replica"), multiprocess_mode="mostrecent"),
    # moves
    MetricSpec("lull:kv_moves", "counter", "KV moves between tiers, by kind (demote, promote, drop; drain for a replica drain).",
               ("kind", "src_tier", "dst_tier")),
    MetricSpec("lull:kv_move_bytes", "counter", "Bytes of KV moved between tiers.", ("kind", "src_tier", "dst_tier")),
    MetricSpec("lull:kv_move_duration_seconds", "histogram", "Time to complete one KV move (prepare to complete).",
               ("kind", "src_tier", "dst_tier"), buckets=LATENCY_BUCKETS),
    MetricSpec("lull:kv_move_failures", "counter", "KV moves aborted (rolled back).", ("kind", "src_tier", "dst_tier")),
    # gating and recompute
    MetricSpec("lull:gated_requests", "gauge", "Requests held at the gateway waiting for GPU capacity.",
               (), multiprocess_mode="livesum"),
    MetricSpec("lull:gate_wait_seconds", "histogram", "Time a request was held before it ran (outcome: admitted, timeout, closed).",
               ("outcome",), buckets=LATENCY_BUCKETS),
    MetricSpec("lull:recompute_tokens", "counter", "Prompt tokens recomputed because the session's KV had been dropped.", ()),
    # requests and latency
    MetricSpec("lull:requests", "counter", "Requests the gateway answered, by API (rest, grpc) and status code.", ("api", "code")),
    MetricSpec("lull:time_to_first_token_seconds", "histogram", "Time from arrival at the gateway to the first token, gate wait included, by the session's tier on arrival.",
               ("tier",), buckets=LATENCY_BUCKETS),
    MetricSpec("lull:time_per_output_token_seconds", "histogram", "Mean time per output token after the first, per request.",
               (), buckets=TOKEN_LATENCY_BUCKETS),
    # control plane
    MetricSpec("lull:plan_step_seconds", "histogram", "Time of one planning step of the tier policy.", (), buckets=PLAN_BUCKETS),
    MetricSpec("lull:replicas", "gauge", "Engine replicas by state (running, starting, draining).", ("state",), multiprocess_mode="mostrecent"),
    MetricSpec("lull:replicas_target", "gauge", "Engine replicas the autoscaler asks for.", (), multiprocess_mode="mostrecent"),
)

BY_NAME = {spec.name: spec for spec in CATALOGUE}


def series_names() -> frozenset[str]:
    """Every series name of Lull's catalogue, as PromQL sees them."""
    return frozenset().union(*(spec.series_names() for spec in CATALOGUE))


# registry -> its metric objects: prometheus_client refuses a name twice in one registry,
# so the gateway's REST middleware and gRPC interceptor must share one set.
_MADE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_metrics(registry=None) -> dict[str, object]:
    """prometheus_client objects for the catalogue, by name, registered in ``registry``
    (the default registry when None: in multiprocess mode values go to files).
    Idempotent per registry: a second call returns the objects of the first."""
    import prometheus_client as pc

    registry = pc.REGISTRY if registry is None else registry
    if registry in _MADE:
        return _MADE[registry]
    ensure_metrics_dir()
    made: dict[str, object] = {}
    for spec in CATALOGUE:
        common = dict(name=spec.name, documentation=spec.help, labelnames=spec.labels, registry=registry)
        if spec.kind == "counter":
            made[spec.name] = pc.Counter(**common)
        elif spec.kind == "gauge":
            made[spec.name] = pc.Gauge(**common, multiprocess_mode=spec.multiprocess_mode)
        else:
            made[spec.name] = pc.Histogram(**common, buckets=spec.buckets)
    _MADE[registry] = made
    return made


def ensure_metrics_dir() -> str | None:
    """The directory this process writes its metrics to (``PROMETHEUS_MULTIPROC_DIR``),
    created when missing; None when the process keeps them in memory instead: the
    variable is unset, or names a directory that cannot be made or written (then
    prometheus_client would fail on the first value it writes, so this switches it to
    in-memory values). Logs the outcome once per process; call before making metrics."""
    return _usable_metrics_dir(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@functools.cache
def _usable_metrics_dir(value: str | None) -> str | None:
    if value is None:
        log.info("PROMETHEUS_MULTIPROC_DIR is unset: this process's metrics stay in its memory, "
                 "and a node agent serves only its own")
        return None
    try:
        if not value:
            raise OSError("the value is empty")
        Path(value).mkdir(parents=True, exist_ok=True)
        if not os.access(value, os.W_OK | os.X_OK):
            raise PermissionError("not writable")
        return value
    except OSError as error:
        from prometheus_client import values

        values.ValueClass = values.MutexValue  # what prometheus_client uses with the variable unset
        log.warning("PROMETHEUS_MULTIPROC_DIR=%r is not a usable directory (%s): this process's metrics stay in "
                    "its memory and the node's endpoint will not show them; mount a writable directory there",
                    value, error)
        return None


def serve_node_metrics(port: int, metrics_dir: str | os.PathLike[str], addr: str = "0.0.0.0"):
    """Serve the merged metrics of every process writing to ``metrics_dir`` on
    ``http://addr:port/metrics``, from a daemon thread. Returns (server, thread);
    ``server.shutdown()`` stops it. Port 0 picks a free port (``server.server_port``)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    path = Path(metrics_dir)
    if not path.is_dir():
        raise FileNotFoundError(
            f"metrics directory {path} does not exist: create it before the node's processes "
            f"start, and set PROMETHEUS_MULTIPROC_DIR={path} for them"
        )
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(path))
    return serve_text_metrics(port, registry, addr)


def serve_text_metrics(port: int, registry, addr: str = "0.0.0.0"):
    """Serve ``registry`` on ``http://addr:port/metrics`` in the Prometheus text format,
    whatever the scraper's Accept header asks. prometheus_client's own server answers
    a Prometheus 2 scrape (which prefers OpenMetrics 1.0) with names escaped to
    underscores, ``lull_requests_total``, so no dashboard query would match; the text
    format keeps ``lull:`` and ``vllm:`` as they are. Returns (server, thread)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            if self.path.split("?")[0] not in ("/", "/metrics"):
                self.send_error(404)
                return
            body = generate_latest(registry)
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE_PLAIN_0_0_4)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per scrape is noise
            pass

    server = ThreadingHTTPServer((addr, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="metrics-http")
    thread.start()
    return server, thread


def serve_agent_metrics(port: int, registry, addr: str = "0.0.0.0"):
    """What a node agent serves on ``port``: the node's merged registry when
    ``PROMETHEUS_MULTIPROC_DIR`` names a usable directory (multiprocess mode), else only
    ``registry``. Several Ray nodes on one host share the directory and the port: the
    first agent serves the host's metrics, the others log it and serve none (their
    values are in the same directory). Returns (server, thread), or None when the port
    was taken."""
    metrics_dir = ensure_metrics_dir()
    try:
        if metrics_dir:
            return serve_node_metrics(port, metrics_dir, addr)
        return serve_text_metrics(port, registry, addr)
    except OSError as error:
        log.warning("metrics port %d is taken (%s): another node agent on this host serves %s", port, error,
                    metrics_dir or "its own metrics; set telemetry.metrics_port per node")
        return None
