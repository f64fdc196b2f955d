"""OpenTelemetry tracing for a session's call: the gateway request, its gate wait,
the engine's generation and KV moves.

Configured only by the standard variables: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``), ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``
(``http/protobuf``, the spec's default, or ``grpc``), ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER``. With ``OTEL_SDK_DISABLED=true``,
``OTEL_TRACES_EXPORTER=none`` or no endpoint, tracing is a no-op and costs nothing.
Context crosses processes as W3C ``traceparent`` headers (the default propagator,
or ``OTEL_PROPAGATORS``).

Span attributes carry ids and sizes, never prompts or API keys.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping

from opentelemetry import propagate, trace
from opentelemetry.context import Context

SPAN_GATEWAY = "lull.gateway.request"  # one REST or gRPC call, arrival to last byte
SPAN_GATE_WAIT = "lull.gate.wait"  # held until the controller admits the session
SPAN_ENGINE = "lull.engine.generate"  # the engine replica's generation
SPAN_KV_MOVE = "lull.kv.move"  # one cross-tier move, prepare to complete or abort
SPAN_NAMES = (SPAN_GATEWAY, SPAN_GATE_WAIT, SPAN_ENGINE, SPAN_KV_MOVE)

ATTR_SESSION = "lull.session_id"
ATTR_TENANT = "lull.tenant"
ATTR_TIER = "lull.tier"
ATTR_SRC_TIER = "lull.kv.src_tier"
ATTR_DST_TIER = "lull.kv.dst_tier"
ATTR_BYTES = "lull.kv.bytes"
ATTR_REPLICA = "lull.replica"

TRACER_NAME = "lull"


def tracing_enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables ask for exported traces."""
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"))


def build_provider(service_name: str, env: Mapping[str, str] | None = None, exporter=None):
    """A TracerProvider exporting over OTLP in batches, or None when tracing is off.

    ``service_name`` applies unless ``OTEL_SERVICE_NAME`` names one. ``exporter``
    replaces the OTLP exporter (tests pass an in-memory one) and forces tracing on.
    """
    env = os.environ if env is None else env
    if exporter is None and not tracing_enabled(env):
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(env)))
    return provider


def _otlp_exporter(env: Mapping[str, str]):
    protocol = (env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf").strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be grpc or http/protobuf; got {protocol!r}")
    return OTLPSpanExporter()  # reads endpoint, headers, timeout from OTEL_* itself


def setup_tracing(service_name: str) -> bool:
    """Install the process-wide tracer provider from the environment; call once
    per process at start. Returns whether spans are exported."""
    provider = build_provider(service_name)
    if provider is None:
        return False
    trace.set_tracer_provider(provider)
    return True


def tracer(provider=None) -> trace.Tracer:
    """Lull's tracer: from ``provider``, else the global one (a no-op until set up)."""
    return trace.get_tracer(TRACER_NAME, tracer_provider=provider)


def extract_context(headers: Mapping[str, str]) -> Context:
    """The caller's trace context from incoming headers or gRPC metadata
    (``traceparent``/``tracestate``); an empty context when there is none."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return propagate.extract(lowered)


def inject_headers(carrier: MutableMapping[str, str] | None = None, context: Context | None = None) -> MutableMapping[str, str]:
    """Add ``traceparent`` (and ``tracestate``) for the current or given context to
    ``carrier``, e.g. outgoing HTTP headers or gRPC metadata; returns it."""
    carrier = {} if carrier is None else carrier
    propagate.inject(carrier, context=context)
    return carrier
