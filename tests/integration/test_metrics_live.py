"""Metrics of a running platform: the Serve app of `controller.assembly:build_app` (gateway, one
vLLM-on-CPU engine replica, controller actor, node agent) with a real Redis, every
process writing to one prometheus_client multiprocess directory, and the node agent
serving it merged on the metrics port. Traffic drives every tier (the GPU tier is
shrunk to two sessions through the controller so that sessions are demoted, gated
and promoted), then the endpoint is scraped over HTTP."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import openai
import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from controller.assembly.settings import kv_bytes_per_token
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE
from proto.telemetry.metrics import series_names
from proto.telemetry.vllm_metrics import vllm_series_names
from tests.promql import parse
from workers.redis_server import free_port
from workers.tiny_model import ensure_tiny_model
from tests.integration.live_platform import serve_platform

KEY = "sk-metrics-test"
ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "platform" / "grafana").glob("*.json"))
GPU_TOKENS = 480  # two sessions of SESSION_TOKENS + output fit; a third displaces one
SESSION_WORDS = 90  # about 200 prompt tokens with the chat template


def dashboard_queries() -> list[tuple[str, str]]:
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        out += [(f"{path.stem} / {p['title']}", t["expr"]) for p in dashboard["panels"] for t in p["targets"]]
    return out


class Platform:
    def __init__(self, port: int, metrics_port: int, metrics_dir: str):
        self.port, self.metrics_port, self.metrics_dir = port, metrics_port, metrics_dir
        self.client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def scrape(self) -> dict[str, list]:
        """Sample name -> samples of the node's metrics endpoint."""
        with urllib.request.urlopen(self.metrics_url, timeout=30) as response:
            text = response.read().decode()
        samples: dict[str, list] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples.setdefault(sample.name, []).append(sample)
        return samples

    def controller(self):
        return ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)

    def chat(self, session: str, text: str, stream: bool = False):
        messages = [{"role": "user", "content": text}]
        headers = {"x-session-id": session}
        if not stream:
            return self.client.chat.completions.create(model="lull", messages=messages, max_tokens=8,
                                                       extra_headers=headers)
        return list(self.client.chat.completions.create(model="lull", messages=messages, max_tokens=8, stream=True,
                                                        extra_headers=headers))

    def tool_call(self, session: str, started: bool) -> None:
        which = "started" if started else "finished"
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/sessions/{session}/tool_call_{which}",
                                         method="POST", headers={"authorization": f"Bearer {KEY}"})
        urllib.request.urlopen(request, timeout=30).read()


@pytest.fixture(scope="module")
def platform():
    metrics_dir = tempfile.mkdtemp(prefix="lull-metrics-prom-")
    port, metrics_port = free_port(), free_port()
    env = {"LULL_API_KEYS": f"acme:{KEY}", "LULL_ENGINE__MAX_MODEL_LEN": "1024", "LULL_GATEWAY__GATE_TIMEOUT_S": "30",
           "LULL_TELEMETRY__METRICS_PORT": str(metrics_port), "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    args = {"replicas": {"initial": 1}, "cluster": {"engine_cpus": 1.0},
            "gateway": {"default_max_tokens": 8, "grpc_port": 0}}
    try:
        with serve_platform(env, args, port=port):
            yield Platform(port, metrics_port, metrics_dir)
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)


def shrink_gpu_tier(platform: Platform) -> None:
    """Give the replica's GPU tier room for two sessions (vLLM's cache stays 1 GiB: the
    controller's books are what admission follows)."""
    actor = platform.controller()
    replica = ray.get(actor.replicas.remote())[0]  # registering again changes a replica's capacity
    ray.get(actor.register_replica.remote(**{**replica, "gpu_tokens": GPU_TOKENS}))


def drive_traffic(platform: Platform) -> None:
    """Sessions that fill the GPU tier, are demoted to DRAM during their tool calls, and come back gated until promoted; streamed and plain calls."""
    shrink_gpu_tier(platform)
    sessions = [f"tiered-{i}" for i in range(4)]
    for i, session in enumerate(sessions):
        platform.chat(session, f"session {i} reads the repository. " + "word " * SESSION_WORDS, stream=bool(i % 2))
        platform.tool_call(session, started=True)
        time.sleep(0.2)  # the tool call runs; idleness grows
    for i, session in enumerate(sessions):  # each returns; the ones demoted are gated, then promoted
        platform.tool_call(session, started=False)
        platform.chat(session, f"session {i} reads the repository. " + "word " * SESSION_WORDS + " and now the tests",
                      stream=not i % 2)
        platform.tool_call(session, started=True)
    for i in range(3):  # one-offs, and a bad request for a non-200 code
        platform.chat(f"oneoff-{i}", "def main(): pass", stream=True)
    with pytest.raises(openai.BadRequestError):
        platform.chat("too-long", "word " * 2000)
    abort_a_move(platform)


def abort_a_move(platform: Platform) -> None:
    """Prepare a DRAM -> shared move of a demoted session at its node agent and abort it,
    as a controller that gives up does (lull:kv_move_failures)."""
    from proto.internal_auth import blocking_agent_channel
    from proto.names import node_agent_actor
    from proto import node_agent_pb2 as pb
    from proto import node_agent_pb2_grpc, tiers_pb2

    sessions = ray.get(platform.controller().snapshot.remote())["sessions"]
    session = next(s for s in sessions if s["tier"] == "dram")
    agent = ray.get_actor(node_agent_actor(session["node"]), namespace=RAY_NAMESPACE)
    with blocking_agent_channel(ray.get(agent.address.remote())) as channel:
        stub = node_agent_pb2_grpc.NodeAgentServiceStub(channel)
        move_id = f"test-abort-{uuid.uuid4().hex}"
        prepared = stub.PrepareMove(pb.PrepareMoveRequest(
            move_id=move_id, session_id=session["session_id"], kind=pb.MOVE_KIND_DEMOTE,
            src=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_DRAM, replica_id=session["replica"], node_id=session["node"]),
            dst=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_SHARED), kv_bytes=1, lease_s=30), timeout=30)
        assert prepared.HasField("reserved"), prepared
        stub.AbortMove(pb.AbortMoveRequest(move_id=move_id, reason="the test gives the move up"), timeout=30)


@pytest.fixture(scope="module")
def scraped(platform):
    drive_traffic(platform)
    return platform.scrape()


def test_every_dashboard_query_names_only_exported_metrics(scraped):
    exported = set(scraped) | series_names() | vllm_series_names()
    for title, expr in dashboard_queries():
        unknown = parse(expr).metrics - exported
        assert not unknown, f"{title}: {expr} names {unknown}, which neither Lull nor vLLM exports"
    missing = {m for _, e in dashboard_queries() for m in parse(e).metrics} - set(scraped)
    assert not missing, f"dashboard metrics absent from the live scrape: {sorted(missing)}"


def value(scraped: dict, name: str, **labels) -> float:
    return sum(s.value for s in scraped.get(name, []) if labels.items() <= s.labels.items())


def test_core_series_have_values(scraped):
    assert value(scraped, "lull:requests_total", api="rest", code="200") >= 11
    assert value(scraped, "lull:requests_total", api="rest", code="400") >= 1
    assert value(scraped, "lull:time_to_first_token_seconds_count") >= 5  # streamed calls
    assert value(scraped, "lull:time_per_output_token_seconds_count") >= 5
    assert value(scraped, "lull:session_idleness_count") >= 4  # the returning sessions
    assert value(scraped, "lull:plan_step_seconds_count") > 0
    assert value(scraped, "lull:replicas", state="running") == 1
    assert value(scraped, "lull:replicas_target") == 1
    assert value(scraped, "lull:sessions") >= 4
    assert value(scraped, "lull:tier_capacity_bytes", tier="dram") > 0
    per_token = kv_bytes_per_token(str(ensure_tiny_model()), "float32")  # the platform's dtype (live_platform)
    assert value(scraped, "lull:tier_capacity_bytes", tier="gpu") == GPU_TOKENS * per_token
    assert value(scraped, "lull:tier_used_bytes", tier="gpu") > 0
    assert value(scraped, "lull:kv_moves_total", kind="demote") > 0  # the GPU tier overflowed
    assert value(scraped, "lull:gate_wait_seconds_count", outcome="admitted") > 0
    assert value(scraped, "lull:kv_move_failures_total", src_tier="dram", dst_tier="shared") == 1
    assert value(scraped, "vllm:prompt_tokens_total") > 0
    assert value(scraped, "vllm:generation_tokens_total") > 0
    assert value(scraped, "vllm:request_success_total") >= 11
    assert value(scraped, "vllm:num_requests_running") == 0  # mostrecent: the engine's gauge, merged
