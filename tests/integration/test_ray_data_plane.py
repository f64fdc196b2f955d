"""The data plane on a real local Ray cluster: the LullEngine Serve deployment (vLLM on CPU),
the node agent actor behind real gRPC, and a real Redis shared tier."""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import grpc
import pytest
import ray
from ray import serve

from proto.engine_request import EngineRequest
from proto.internal_auth import blocking_agent_channel
from proto.names import ENGINE_DEPLOYMENT, node_agent_actor
from proto import node_agent_pb2 as pb
from proto import node_agent_pb2_grpc as pb_grpc
from proto import tiers_pb2
from tests.support import INTERNAL_TOKEN
from workers.engine import EngineSettings
from workers.engine_deployment import engine_app
from workers.node_agent_actor import NodeAgentActor
from workers.redis_server import LocalRedis
from workers.tiny_model import ensure_tiny_model

DRAM_CAPACITY = 32 << 20


@pytest.fixture(scope="module")
def cluster():
    dram_dir = tempfile.mkdtemp(prefix="lull-ray-dram-", dir="/dev/shm")
    redis = LocalRedis("64mb").start()
    # The agent reads LULL_INTERNAL_TOKEN from its environment, which Ray's workers inherit from here.
    old_token = os.environ.setdefault("LULL_INTERNAL_TOKEN", INTERNAL_TOKEN)
    ray.init(num_cpus=2, include_dashboard=False, namespace="lull", log_to_driver=False)
    settings = EngineSettings(model=str(ensure_tiny_model()), dram_dir=dram_dir, dtype="float32",
                              dram_capacity_bytes=DRAM_CAPACITY, max_model_len=2048)
    serve.run(engine_app(settings), name="engine", route_prefix=None)
    handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name="engine")
    node_id = ray.get_runtime_context().get_node_id()
    agent = NodeAgentActor.options(name=node_agent_actor(node_id)).remote(
        node_id, dram_dir, DRAM_CAPACITY, redis_url=redis.url, shared_capacity_bytes=32 << 20)
    channel = blocking_agent_channel(ray.get(agent.address.remote()))
    yield handle, pb_grpc.NodeAgentServiceStub(channel), agent
    channel.close()
    serve.shutdown()
    ray.shutdown()
    redis.stop()
    shutil.rmtree(dram_dir, ignore_errors=True)
    if old_token == INTERNAL_TOKEN:
        os.environ.pop("LULL_INTERNAL_TOKEN", None)


def wait_until(condition, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.1)
    raise AssertionError("timed out")


def session_in_report(stub, session_id: str):
    report = stub.ReportOccupancy(pb.ReportOccupancyRequest(), timeout=5)
    return next((s for s in report.sessions if s.session_id == session_id), None)


def test_call_demote_over_grpc_and_resume_from_dram(cluster):
    handle, stub, agent = cluster
    prompt = [(i * 37) % 800 + 30 for i in range(200)]
    first = handle.generate.remote(EngineRequest(prompt, 8, session_id="ray-1", tenant="t", tier="gpu")).result()
    replica = first["replica_id"]
    held = wait_until(lambda: session_in_report(stub, "ray-1"))
    assert held.location.tier == tiers_pb2.TIER_GPU and held.location.replica_id == replica
    assert held.kv_tokens == 192  # six full blocks of 32

    prepared = stub.PrepareMove(pb.PrepareMoveRequest(
        move_id="m1", session_id="ray-1", kind=pb.MOVE_KIND_DEMOTE, lease_s=30,
        src=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_GPU, replica_id=replica),
        dst=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_DRAM)), timeout=10)
    assert prepared.WhichOneof("outcome") == "reserved"
    done = stub.CompleteMove(pb.CompleteMoveRequest(move_id="m1"), timeout=10)
    assert done.state == pb.MOVE_STATE_COMMITTED
    assert session_in_report(stub, "ray-1").location.tier == tiers_pb2.TIER_DRAM
    metrics = ray.get(agent.metrics_text.remote())
    assert 'lull:kv_moves_total{dst_tier="dram",kind="demote",src_tier="gpu"} 1.0' in metrics
    assert 'lull:tier_capacity_bytes{node="' in metrics

    wait_until(lambda: handle.reset_prefix_cache.remote().result())  # the demotion released the held blocks
    next_prompt = prompt + first["token_ids"] + [40, 41, 42]
    resumed = handle.generate.remote(EngineRequest(next_prompt, 8, session_id="ray-1", tenant="t",
                                                   tier="dram")).result()
    assert resumed["cached_tokens"] >= 192
    chunks = list(handle.options(stream=True).stream.remote(
        EngineRequest(next_prompt, 8, session_id="ray-1b", tenant="t2", tier="dram")))
    assert [t for chunk in chunks for t in chunk] == resumed["token_ids"]  # a recompute for another tenant: same tokens
    assert chunks[-1] == [] and chunks[-1].cached_tokens == 0  # the end marker: nothing of t's KV was reused


def test_bad_inputs_get_clear_errors_and_the_plane_keeps_serving(cluster):
    handle, stub, _ = cluster
    with pytest.raises(grpc.RpcError) as bad:
        stub.PrepareMove(pb.PrepareMoveRequest(session_id="x", kind=pb.MOVE_KIND_DEMOTE, lease_s=5), timeout=5)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "move_id" in bad.value.details()
    with pytest.raises(ValueError, match="prompt_token_ids"):
        EngineRequest("not tokens")  # checked where it is built
    with pytest.raises(TypeError, match="EngineRequest"):
        handle.generate.remote({"prompt_token_ids": [7, 8, 9]}).result()
    with pytest.raises(ValueError, match="context limit"):
        handle.generate.remote(EngineRequest([5] * 3000, 4)).result()
    refused = stub.PrepareMove(pb.PrepareMoveRequest(
        move_id="m-unknown", session_id="nobody", kind=pb.MOVE_KIND_DEMOTE, lease_s=5,
        src=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_DRAM), dst=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_SHARED)))
    assert refused.refused.reason == pb.REFUSAL_REASON_SOURCE_NOT_FOUND
    ok = handle.generate.remote(EngineRequest([7, 8, 9], 2)).result()
    assert len(ok["token_ids"]) == 2
    assert "vllm:" in handle.metrics_text.remote().result()
    assert stub.Health(pb.HealthRequest(), timeout=5).status == pb.HEALTH_STATUS_SERVING
