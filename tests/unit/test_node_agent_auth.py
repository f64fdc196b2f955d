"""The node agent's gRPC is closed to callers without the internal token, listens on one
address, and refuses ids that could name a path outside the DRAM tier's folder.

A real ``NodeAgent`` over a real ``DramStore`` (tmp dir) behind its real gRPC server on
127.0.0.1; calls through real channels, with and without the token."""

from __future__ import annotations

import socket

import grpc
import pytest

from proto import node_agent_pb2 as pb
from proto import node_agent_pb2_grpc as pb_grpc
from proto import tiers_pb2
from proto.config import ConfigError
from proto.config_secrets import internal_token
from proto.internal_auth import blocking_agent_channel, token_metadata
from tests.support import INTERNAL_TOKEN
from workers.dram_store import DramStore, node_dram_dir
from workers.connector_control import release_sessions
from workers.node_agent import NodeAgent
from workers.node_agent_service import serve

ENV = {"LULL_INTERNAL_TOKEN": INTERNAL_TOKEN}


@pytest.fixture
def agent(tmp_path):
    folder = tmp_path / "dram" / "node-1"
    store = DramStore(folder, 1 << 20)
    store.put_session("s1", tenant="t", replica="r1", label="dram", tokens=32, block_hashes=["b1"],
                      blocks={"b1": b"x" * 64})
    node = NodeAgent("node-1", store, None, dram_dir=str(folder))
    server, port, _ = serve(node, 0, "127.0.0.1", token=INTERNAL_TOKEN)
    yield node, f"127.0.0.1:{port}", tmp_path
    server.stop(None)


def demote(move_id="m1", session="s1", replica="r1"):
    return pb.PrepareMoveRequest(
        move_id=move_id, session_id=session, kind=pb.MOVE_KIND_DEMOTE, lease_s=5,
        src=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_GPU, replica_id=replica),
        dst=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_DRAM, replica_id=replica))


def every_call(stub, **kw):
    return [lambda: stub.Health(pb.HealthRequest(), timeout=5, **kw),
            lambda: stub.ReportOccupancy(pb.ReportOccupancyRequest(), timeout=5, **kw),
            lambda: list(stub.StreamOccupancy(pb.ReportOccupancyRequest(), timeout=5, **kw)),
            lambda: stub.PrepareMove(demote(), timeout=5, **kw),
            lambda: stub.CompleteMove(pb.CompleteMoveRequest(move_id="m1"), timeout=5, **kw),
            lambda: stub.AbortMove(pb.AbortMoveRequest(move_id="m1"), timeout=5, **kw)]


@pytest.mark.parametrize("metadata", [None, token_metadata("wrong-token-of-enough-length"),
                                      (("authorization", INTERNAL_TOKEN),)], ids=["none", "wrong", "not-bearer"])
def test_a_call_without_the_token_is_unauthenticated_and_changes_nothing(agent, metadata):
    node, address, _ = agent
    with grpc.insecure_channel(address) as channel:
        for call in every_call(pb_grpc.NodeAgentServiceStub(channel), metadata=metadata):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert INTERNAL_TOKEN not in (refused.value.details() or "")
    assert node.dram.session("s1").label == "dram" and not node.moves and not node.finished


def test_a_call_with_the_token_is_served(agent):
    node, address, _ = agent
    with blocking_agent_channel(address, ENV) as channel:
        stub = pb_grpc.NodeAgentServiceStub(channel)
        assert stub.Health(pb.HealthRequest(), timeout=5).node_id == "node-1"
        assert [s.session_id for s in stub.ReportOccupancy(pb.ReportOccupancyRequest(), timeout=5).sessions] == ["s1"]


@pytest.mark.parametrize("replica", ["..", ".", "../../etc", "r1/../../x", "a" * 129, "r 1"])
def test_a_replica_id_that_could_leave_the_dram_folder_is_an_invalid_argument(agent, replica):
    node, address, root = agent
    before = sorted(root.rglob("*"))
    with blocking_agent_channel(address, ENV) as channel:
        stub = pb_grpc.NodeAgentServiceStub(channel)
        for src, dst in ((replica, ""), ("", replica)):
            request = demote(replica="")
            request.src.replica_id, request.dst.replica_id = src, dst
            with pytest.raises(grpc.RpcError) as bad:
                stub.PrepareMove(request, timeout=5)
            assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "replica_id" in bad.value.details()
    assert sorted(root.rglob("*")) == before and not node.moves


@pytest.mark.parametrize("field, value", [("session_id", "acme/team/x"), ("session_id", "/x"),
                                          ("session_id", "acme/"), ("session_id", "a b"), ("session_id", ""),
                                          ("move_id", "m/1"), ("move_id", "")])
def test_ids_outside_the_protos_charset_are_invalid_arguments(agent, field, value):
    _, address, _ = agent
    request = demote()
    setattr(request, field, value)
    with blocking_agent_channel(address, ENV) as channel:
        stub = pb_grpc.NodeAgentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            stub.PrepareMove(request, timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in bad.value.details()
        with pytest.raises(grpc.RpcError) as bad:
            stub.CompleteMove(pb.CompleteMoveRequest(move_id="../m"), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_tenant_scoped_session_key_is_a_valid_session_id(agent):
    """The controller keys client sessions ``tenant/session`` (the gateway scopes them): the
    agent must move those, or no client session could ever leave the GPU tier."""
    node, address, _ = agent
    node.dram.put_session("acme/mn-grpc-0", tenant="acme", replica="r1", label="dram", tokens=32,
                          block_hashes=["b2"], blocks={"b2": b"y" * 64})
    with blocking_agent_channel(address, ENV) as channel:
        stub = pb_grpc.NodeAgentServiceStub(channel)
        stub.PrepareMove(demote(move_id="m2", session="acme/mn-grpc-0"), timeout=5)
        stub.CompleteMove(pb.CompleteMoveRequest(move_id="m2"), timeout=5)
    assert node.dram.session("acme/mn-grpc-0") is not None


def test_no_path_is_built_from_an_unsafe_replica_or_node_id(tmp_path):
    for bad in ("..", ".", "a/b", ""):
        with pytest.raises(ValueError, match="replica id"):
            release_sessions(tmp_path, bad, ["s"])
        with pytest.raises(ValueError, match="node id"):
            node_dram_dir(tmp_path, bad)
    assert list(tmp_path.iterdir()) == []


def test_the_agent_listens_only_on_the_address_it_is_given(agent):
    _, address, _ = agent
    port = int(address.rsplit(":", 1)[1])
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outward interface
        outward = probe.getsockname()[0]
    except OSError:
        outward = "127.0.0.1"
    finally:
        probe.close()
    if outward.startswith("127."):
        pytest.skip("this host has no address besides loopback")
    with pytest.raises(OSError):
        socket.create_connection((outward, port), timeout=2).close()
    socket.create_connection(("127.0.0.1", port), timeout=2).close()


@pytest.mark.parametrize("env, message", [({}, "is not set"), ({"LULL_INTERNAL_TOKEN": "short"}, "not a usable"),
                                          ({"LULL_INTERNAL_TOKEN": "has a space in it, long"}, "not a usable")])
def test_a_missing_or_weak_token_is_an_error_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message) as error:
        internal_token(env)
    assert "LULL_INTERNAL_TOKEN" in str(error.value)


def test_serve_refuses_to_start_without_a_token(tmp_path):
    node = NodeAgent("n", DramStore(tmp_path, 1 << 20), None, dram_dir=str(tmp_path))
    with pytest.raises(ValueError, match="token"):
        serve(node, 0, "127.0.0.1", token="")


@pytest.mark.parametrize("metadata, code", [(token_metadata(INTERNAL_TOKEN), grpc.StatusCode.INVALID_ARGUMENT),
                                            (None, grpc.StatusCode.UNAUTHENTICATED)], ids=["token", "none"])
def test_bytes_that_are_no_message_are_an_invalid_argument_never_internal(agent, metadata, code):
    """The fuzzer's find: gRPC answered INTERNAL for a request its parser refused, with or without the token."""
    node, address, _ = agent
    with grpc.insecure_channel(address) as channel:
        for method in ("PrepareMove", "ReportOccupancy", "AbortMove"):
            call = channel.unary_unary(f"/lull.v1.NodeAgentService/{method}")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"\xe8\xf4\xbf\x0f\xbfb\xb4\xb6", metadata=metadata, timeout=5)
            assert refused.value.code() == code
        stream = channel.unary_stream("/lull.v1.NodeAgentService/StreamOccupancy")
        with pytest.raises(grpc.RpcError) as refused:
            list(stream(b"\xff\xff\xff", metadata=metadata, timeout=5))
        assert refused.value.code() == code
    assert node.dram.session("s1").label == "dram" and not node.moves
