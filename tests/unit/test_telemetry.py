"""controller/telemetry: the metric catalogue, the node's multiprocess metrics
endpoint, and tracing set up from OTEL_* variables with W3C propagation."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import Gauge

from proto.telemetry import tracing
from proto.telemetry.metrics import BY_NAME, CATALOGUE, MetricSpec, make_metrics, serve_node_metrics

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {
    "lull:sessions": ("tier",), "lull:session_idleness": ("tier",),
    "lull:tier_used_bytes": ("tier", "node", "replica"), "lull:tier_capacity_bytes": ("tier", "node", "replica"),
    "lull:kv_moves": ("kind", "src_tier", "dst_tier"), "lull:kv_move_bytes": ("kind", "src_tier", "dst_tier"),
    "lull:kv_move_duration_seconds": ("kind", "src_tier", "dst_tier"), "lull:gate_wait_seconds": ("outcome",),
    "lull:recompute_tokens": (), "lull:time_to_first_token_seconds": ("tier",),
    "lull:time_per_output_token_seconds": (), "lull:plan_step_seconds": (), "lull:replicas": ("state",),
}


def test_catalogue_covers_the_issue_and_is_well_formed():
    assert len(BY_NAME) == len(CATALOGUE), "duplicate metric names"
    for name, labels in REQUIRED.items():
        assert BY_NAME[name].labels == labels, name
    for spec in CATALOGUE:
        assert re.fullmatch(r"lull:[a-z_]+", spec.name) and spec.help.endswith(".")
        if spec.kind == "gauge":
            assert spec.multiprocess_mode in Gauge._MULTIPROC_MODES
    with pytest.raises(ValueError, match="lull:"):
        MetricSpec("sessions", "gauge", "x", multiprocess_mode="mostrecent")
    with pytest.raises(ValueError, match="multiprocess_mode"):
        MetricSpec("lull:x", "gauge", "x")


def test_make_metrics_registers_the_catalogue():
    registry = CollectorRegistry()
    metrics = make_metrics(registry)
    metrics["lull:kv_moves"].labels(kind="promote", src_tier="dram", dst_tier="gpu").inc()
    assert registry.get_sample_value("lull:kv_moves_total", {"kind": "promote", "src_tier": "dram", "dst_tier": "gpu"}) == 1
    assert make_metrics(registry) is metrics, "a second call must share the objects, not register them twice"


WRITER = textwrap.dedent("""
    from prometheus_client import Counter, Gauge
    from proto.telemetry.metrics import make_metrics
    m = make_metrics()
    m["lull:sessions"].labels(tier="gpu").set(7)
    m["lull:recompute_tokens"].inc(128)
    Counter("vllm:generation_tokens", "vLLM's own", ["model_name", "engine"]).labels("m", "0").inc(5)
""")


def test_node_endpoint_merges_every_process(tmp_path):
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    for _ in range(2):  # two writer processes: counters add up across them
        subprocess.run([sys.executable, "-c", WRITER], env=env, check=True, cwd=ROOT, timeout=60)
    server, thread = serve_node_metrics(0, tmp_path, addr="127.0.0.1")
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    assert re.search(r'^lull:sessions\{tier="gpu"\} 7\.0$', body, re.M), body
    assert re.search(r"^lull:recompute_tokens_total 256\.0$", body, re.M)
    assert re.search(r'^vllm:generation_tokens_total\{engine="0",model_name="m"\} 10\.0$', body, re.M)


def test_node_endpoint_needs_its_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="PROMETHEUS_MULTIPROC_DIR"):
        serve_node_metrics(0, tmp_path / "missing")


AGENT = WRITER + textwrap.dedent("""
    import logging, sys, urllib.request
    from prometheus_client import CollectorRegistry
    from proto.telemetry.metrics import serve_agent_metrics
    own = CollectorRegistry()
    make_metrics(own)["lull:kv_moves"].labels(kind="drop", src_tier="dram", dst_tier="waiting").inc()
    server, _ = serve_agent_metrics(0, own, addr="127.0.0.1")
    sys.stdout.write(urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10).read().decode())
""")


def run_agent(env: dict[str, str]) -> subprocess.CompletedProcess:
    """A writer that then serves as a node agent would, logging to stderr."""
    script = "import logging; logging.basicConfig(level=logging.INFO)\n" + AGENT
    return subprocess.run([sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin", **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_missing_metrics_dir_is_created_and_served(tmp_path):
    metrics_dir = tmp_path / "not" / "yet"
    done = run_agent({"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
    assert done.returncode == 0, done.stderr
    assert metrics_dir.is_dir() and list(metrics_dir.glob("*.db"))
    assert re.search(r"^lull:recompute_tokens_total 128\.0$", done.stdout, re.M), done.stdout


@pytest.mark.parametrize("where", ["under-a-file", "empty", "unset"])
def test_unusable_or_unset_metrics_dir_keeps_metrics_in_memory(tmp_path, where):
    (tmp_path / "file").write_text("")
    env = {"under-a-file": {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "file" / "metrics")},
           "empty": {"PROMETHEUS_MULTIPROC_DIR": ""}, "unset": {}}[where]
    done = run_agent(env)
    assert done.returncode == 0, done.stderr
    # The agent serves its own registry: its move, not the other objects' values.
    assert re.search(r'^lull:kv_moves_total\{.*kind="drop".*\} 1\.0$', done.stdout, re.M), done.stdout
    assert "lull:recompute_tokens_total 128" not in done.stdout
    said = [line for line in done.stderr.splitlines() if "PROMETHEUS_MULTIPROC_DIR" in line]
    assert len(said) == 1, done.stderr  # once per process, however many registries it makes
    assert ("is unset" if where == "unset" else "not a usable directory") in said[0]


@pytest.mark.parametrize(("env", "enabled"), [
    ({}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}, False),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
])
def test_tracing_follows_the_standard_variables(env, enabled):
    assert tracing.tracing_enabled(env) is enabled
    provider = tracing.build_provider("lull-test", env)
    assert (provider is not None) is enabled
    if provider:
        provider.shutdown()


def test_otlp_protocol_is_checked():
    with pytest.raises(ValueError, match="grpc or http/protobuf"):
        tracing.build_provider("x", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "thrift"})


def test_spans_propagate_through_traceparent():
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = tracing.build_provider("lull-test", {"OTEL_SERVICE_NAME": "lull-gateway"}, exporter=exporter)
    tracer = tracing.tracer(provider)
    with tracer.start_as_current_span(tracing.SPAN_GATEWAY) as gateway:
        with tracer.start_as_current_span(tracing.SPAN_GATE_WAIT):
            pass
        headers = tracing.inject_headers({})
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]", headers["traceparent"])
    # The engine, in another process, continues the same trace.
    context = tracing.extract_context({"TraceParent": headers["traceparent"]})
    with tracer.start_as_current_span(tracing.SPAN_ENGINE, context=context):
        pass
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {tracing.SPAN_GATEWAY, tracing.SPAN_GATE_WAIT, tracing.SPAN_ENGINE}
    trace_id = gateway.get_span_context().trace_id
    assert all(s.context.trace_id == trace_id for s in spans.values())
    assert spans[tracing.SPAN_ENGINE].parent.span_id == gateway.get_span_context().span_id
    assert spans[tracing.SPAN_GATEWAY].resource.attributes["service.name"] == "lull-gateway"
    assert tracing.extract_context({}) is not None
    provider.shutdown()
