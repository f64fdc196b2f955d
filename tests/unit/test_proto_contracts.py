"""Contracts in proto/: committed stubs are current, messages round-trip, services have
the documented shape, and the stubs carry real calls over a real in-process gRPC server.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from concurrent import futures
from importlib import resources
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2

from proto import generate, node_agent_pb2, node_agent_pb2_grpc, session_pb2, tiers_pb2

# name -> (request, response, client streaming, server streaming)
SESSION_RPCS = {
    "OpenSession": ("OpenSessionRequest", "OpenSessionResponse", False, False),
    "Generate": ("GenerateRequest", "GenerateChunk", False, True),
    "ToolCallStarted": ("ToolCallStartedRequest", "ToolCallStartedResponse", False, False),
    "ToolCallFinished": ("ToolCallFinishedRequest", "ToolCallFinishedResponse", False, False),
    "CloseSession": ("CloseSessionRequest", "CloseSessionResponse", False, False),
    "GetSessionState": ("GetSessionStateRequest", "SessionState", False, False),
}
NODE_AGENT_RPCS = {
    "ReportOccupancy": ("ReportOccupancyRequest", "OccupancyReport", False, False),
    "StreamOccupancy": ("ReportOccupancyRequest", "OccupancyReport", False, True),
    "PrepareMove": ("PrepareMoveRequest", "PrepareMoveResponse", False, False),
    "CompleteMove": ("CompleteMoveRequest", "CompleteMoveResponse", False, False),
    "AbortMove": ("AbortMoveRequest", "AbortMoveResponse", False, False),
    "Health": ("HealthRequest", "HealthResponse", False, False),
}
SERVICES = [
    (session_pb2, "SessionService", SESSION_RPCS),
    (node_agent_pb2, "NodeAgentService", NODE_AGENT_RPCS),
]


# --- (1) the committed stubs are exactly what the .proto files generate ------------


def test_regenerated_stubs_are_byte_identical_to_committed(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    fresh = {path.name: path.read_bytes() for path in written}
    committed = {
        path.name: path.read_bytes()
        for path in generate.PROTO_DIR.iterdir()
        if generate.is_generated(path)
    }
    assert sorted(committed) == sorted(fresh), "run `python -m proto.generate`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale stubs {stale}: run `python -m proto.generate`"


def test_every_proto_has_all_three_stub_kinds() -> None:
    names = {path.name for path in generate.PROTO_DIR.iterdir() if generate.is_generated(path)}
    for proto in generate.proto_files():
        for suffix in generate.GENERATED_SUFFIXES:
            assert proto.stem + suffix in names


# --- (2) messages round-trip -------------------------------------------------------


def _round_trip(message):
    parsed = type(message).FromString(message.SerializeToString())
    assert parsed == message
    return parsed


def test_enum_numbers_are_the_documented_ones() -> None:
    # The wire carries numbers, so renumbering would silently remap stored state.
    assert dict(tiers_pb2.Tier.items()) == {
        "TIER_UNSPECIFIED": 0,
        "TIER_GPU": 1,
        "TIER_DRAM": 2,
        "TIER_SHARED": 3,
        "TIER_WAITING": 4,
    }
    assert dict(tiers_pb2.SessionPhase.items()) == {
        "PHASE_UNSPECIFIED": 0,
        "PHASE_LLM": 1,
        "PHASE_TOOL": 2,
        "PHASE_GATED": 3,
    }


def test_session_messages_round_trip() -> None:
    opened = _round_trip(
        session_pb2.OpenSessionRequest(
            tenant="acme", metadata={"framework": "swe-agent", "trace": "t-1"}, session_id="s-1"
        )
    )
    assert opened.HasField("session_id") and opened.metadata["trace"] == "t-1"
    assert not session_pb2.OpenSessionRequest(tenant="acme").HasField("session_id")

    request = _round_trip(
        session_pb2.GenerateRequest(
            session_id="s-1",
            token_ids=session_pb2.TokenIds(ids=[1, 2, 50_000]),
            sampling=session_pb2.SamplingParams(
                max_tokens=64, temperature=0.0, seed=7, stop=["\n\n", "</tool>"]
            ),
        )
    )
    assert request.WhichOneof("prompt") == "token_ids"
    # Temperature 0 (greedy) must stay distinguishable from "unset".
    assert request.sampling.HasField("temperature") and request.sampling.temperature == 0.0
    assert not session_pb2.SamplingParams().HasField("temperature")
    assert session_pb2.GenerateRequest(text="hi").WhichOneof("prompt") == "text"

    last = _round_trip(
        session_pb2.GenerateChunk(
            text="done",
            token_ids=[11, 12],
            finish_reason=session_pb2.FINISH_REASON_STOP,
            usage=session_pb2.Usage(
                prompt_tokens=120_000,
                completion_tokens=2,
                cached_prompt_tokens=119_872,
                kv_tier_at_arrival=tiers_pb2.TIER_DRAM,
                gate_wait_s=0.25,
            ),
        )
    )
    assert last.HasField("usage") and not session_pb2.GenerateChunk(text="x").HasField("usage")


def test_session_state_messages_round_trip() -> None:
    started = _round_trip(
        session_pb2.ToolCallStartedRequest(session_id="s-1", tool_name="bash", client_time_s=1.5e9)
    )
    assert started.HasField("client_time_s")
    assert not session_pb2.ToolCallFinishedRequest(session_id="s-1").HasField("tool_name")

    state = _round_trip(
        session_pb2.SessionState(
            session_id="s-1",
            tenant="acme",
            location=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_GPU, replica_id="r-0", node_id="n-0"),
            phase=tiers_pb2.PHASE_GATED,
            idleness=0.75,
            idleness_cycles=5,
            idleness_rank=3,
            kv_tokens=131_072,
            gate_wait_s=0.5,
            total_gate_wait_s=2.0,
        )
    )
    assert state.location.replica_id == "r-0" and state.kv_tokens == 131_072


def test_node_agent_messages_round_trip() -> None:
    gpu = tiers_pb2.KvLocation(tier=tiers_pb2.TIER_GPU, replica_id="r-0", node_id="n-0")
    dram = tiers_pb2.KvLocation(tier=tiers_pb2.TIER_DRAM, node_id="n-0")
    _round_trip(
        node_agent_pb2.OccupancyReport(
            node_id="n-0",
            agent_instance_id="a-1",
            report_seq=42,
            tiers=[
                node_agent_pb2.TierOccupancy(
                    where=dram, capacity_bytes=64 << 30, used_bytes=10 << 30, reserved_bytes=1 << 30
                )
            ],
            sessions=[
                node_agent_pb2.SessionKv(
                    session_id="s-1", location=gpu, kv_bytes=2 << 30, kv_tokens=100_000,
                    pinned_by_move_id="m-1",
                )
            ],
            prepared_move_ids=["m-1"],
        )
    )
    _round_trip(
        node_agent_pb2.PrepareMoveRequest(
            move_id="m-1", session_id="s-1", kind=node_agent_pb2.MOVE_KIND_DEMOTE,
            src=gpu, dst=dram, kv_bytes=2 << 30, lease_s=30.0,
        )
    )
    refused = _round_trip(
        node_agent_pb2.PrepareMoveResponse(
            move_id="m-1",
            refused=node_agent_pb2.Refusal(
                reason=node_agent_pb2.REFUSAL_REASON_INSUFFICIENT_CAPACITY,
                message="DRAM of n-0 has 1 GiB free, move needs 2 GiB",
                available_bytes=1 << 30,
            ),
        )
    )
    assert refused.WhichOneof("outcome") == "refused"
    reserved = node_agent_pb2.PrepareMoveResponse(
        move_id="m-1", reserved=node_agent_pb2.Reservation(reserved_bytes=0)
    )
    assert _round_trip(reserved).WhichOneof("outcome") == "reserved"
    committed = node_agent_pb2.CompleteMoveResponse(
        state=node_agent_pb2.MOVE_STATE_COMMITTED, location=dram
    )
    assert _round_trip(committed).location.tier == tiers_pb2.TIER_DRAM
    _round_trip(
        node_agent_pb2.HealthResponse(
            status=node_agent_pb2.HEALTH_STATUS_DEGRADED, node_id="n-0", agent_instance_id="a-1",
            shared_tier_reachable=False, prepared_moves=1,
        )
    )


# --- (3) services have exactly the documented rpcs, with the right shape ------------


@pytest.mark.parametrize(("module", "service_name", "expected"), SERVICES)
def test_service_has_exactly_the_documented_rpcs(module, service_name, expected) -> None:
    service = module.DESCRIPTOR.services_by_name[service_name]
    assert service.full_name == f"lull.v1.{service_name}"
    actual = {
        method.name: (
            method.input_type.name,
            method.output_type.name,
            method.client_streaming,
            method.server_streaming,
        )
        for method in service.methods
    }
    assert actual == expected


def _source_info() -> descriptor_pb2.FileDescriptorSet:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "set.pb"
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{generate.REPO_ROOT}",
                f"-I{resources.files('grpc_tools') / '_proto'}",
                "--include_source_info",
                f"--descriptor_set_out={out}",
                *(str(p.relative_to(generate.REPO_ROOT)) for p in generate.proto_files()),
            ]
        )
        assert code == 0
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def test_every_service_and_rpc_says_who_calls_and_whether_idempotent() -> None:
    # STYLE.md item 4, made executable. Path [6, s] is service s, [6, s, 2, m] its rpc m
    # (field numbers of FileDescriptorProto.service and ServiceDescriptorProto.method).
    checked = 0
    for file in _source_info().file:
        comments = {
            tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location
        }
        for s, service in enumerate(file.service):
            assert comments.get((6, s), "").strip(), f"{service.name} has no comment"
            for m, method in enumerate(service.method):
                text = comments.get((6, s, 2, m), "")
                assert "Caller" in text, f"{service.name}.{method.name}: who calls it?"
                assert "dempotent" in text or "Side-effect free" in text, (
                    f"{service.name}.{method.name}: is it idempotent?"
                )
                checked += 1
    assert checked == len(SESSION_RPCS) + len(NODE_AGENT_RPCS)


# --- (4) the stubs work end to end over a real in-process server --------------------


class ToyNodeAgent(node_agent_pb2_grpc.NodeAgentServiceServicer):
    """A DRAM tier of fixed size with two-phase reservations; CompleteMove is left to
    the generated base class, which answers UNIMPLEMENTED."""

    def __init__(self, dram_capacity_bytes: int) -> None:
        self.capacity = dram_capacity_bytes
        self.reserved: dict[str, int] = {}
        self.aborted: set[str] = set()

    def Health(self, request, context):
        return node_agent_pb2.HealthResponse(
            status=node_agent_pb2.HEALTH_STATUS_SERVING,
            node_id="n-0",
            agent_instance_id="a-1",
            shared_tier_reachable=True,
            prepared_moves=len(self.reserved),
        )

    def PrepareMove(self, request, context):
        if not request.move_id:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "move_id is required")
        dst_tier = tiers_pb2.Tier.Name(request.dst.tier)
        if request.kind == node_agent_pb2.MOVE_KIND_DROP and dst_tier != "TIER_WAITING":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a DROP must have dst.tier TIER_WAITING, got {dst_tier}",
            )
        response = node_agent_pb2.PrepareMoveResponse(move_id=request.move_id)
        free = self.capacity - sum(self.reserved.values())
        if request.move_id not in self.reserved and request.kv_bytes > free:
            response.refused.reason = node_agent_pb2.REFUSAL_REASON_INSUFFICIENT_CAPACITY
            response.refused.message = f"need {request.kv_bytes} bytes, {free} free"
            response.refused.available_bytes = free
            return response
        # A retry of a prepared id answers its existing reservation.
        self.reserved.setdefault(request.move_id, request.kv_bytes)
        response.reserved.reserved_bytes = self.reserved[request.move_id]
        response.reserved.lease_s = request.lease_s
        return response

    def AbortMove(self, request, context):
        if self.reserved.pop(request.move_id, None) is not None:
            self.aborted.add(request.move_id)
        state = (
            node_agent_pb2.MOVE_STATE_ABORTED
            if request.move_id in self.aborted
            else node_agent_pb2.MOVE_STATE_UNKNOWN
        )
        return node_agent_pb2.AbortMoveResponse(state=state)


@pytest.fixture
def agent() -> Iterator[tuple[ToyNodeAgent, node_agent_pb2_grpc.NodeAgentServiceStub]]:
    servicer = ToyNodeAgent(dram_capacity_bytes=1000)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    node_agent_pb2_grpc.add_NodeAgentServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    # An http_proxy in the environment must not capture a loopback channel.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        yield servicer, node_agent_pb2_grpc.NodeAgentServiceStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def _demote(move_id: str, kv_bytes: int) -> node_agent_pb2.PrepareMoveRequest:
    return node_agent_pb2.PrepareMoveRequest(
        move_id=move_id,
        session_id="s-1",
        kind=node_agent_pb2.MOVE_KIND_DEMOTE,
        src=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_GPU, replica_id="r-0", node_id="n-0"),
        dst=tiers_pb2.KvLocation(tier=tiers_pb2.TIER_DRAM, node_id="n-0"),
        kv_bytes=kv_bytes,
        lease_s=30.0,
    )


def test_health_over_grpc(agent) -> None:
    _, stub = agent
    health = stub.Health(node_agent_pb2.HealthRequest(), timeout=5)
    assert health.status == node_agent_pb2.HEALTH_STATUS_SERVING
    assert health.agent_instance_id == "a-1"


def test_prepare_then_abort_over_grpc(agent) -> None:
    servicer, stub = agent
    first = stub.PrepareMove(_demote("m-1", 600), timeout=5)
    assert first.WhichOneof("outcome") == "reserved" and first.reserved.reserved_bytes == 600
    assert stub.PrepareMove(_demote("m-1", 600), timeout=5) == first  # a retry

    refused = stub.PrepareMove(_demote("m-2", 600), timeout=5)
    assert refused.WhichOneof("outcome") == "refused"
    assert refused.refused.reason == node_agent_pb2.REFUSAL_REASON_INSUFFICIENT_CAPACITY
    assert refused.refused.available_bytes == 400

    for _ in range(2):  # the second abort is a no-op
        aborted = stub.AbortMove(node_agent_pb2.AbortMoveRequest(move_id="m-1"), timeout=5)
        assert aborted.state == node_agent_pb2.MOVE_STATE_ABORTED
    assert servicer.reserved == {}
    unknown = stub.AbortMove(node_agent_pb2.AbortMoveRequest(move_id="never"), timeout=5)
    assert unknown.state == node_agent_pb2.MOVE_STATE_UNKNOWN

    # The aborted reservation's room is free again.
    assert stub.PrepareMove(_demote("m-2", 600), timeout=5).WhichOneof("outcome") == "reserved"


def test_invalid_argument_reaches_the_client_with_its_message(agent) -> None:
    _, stub = agent
    with pytest.raises(grpc.RpcError) as missing_id:
        stub.PrepareMove(_demote("", 10), timeout=5)
    assert missing_id.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert missing_id.value.details() == "move_id is required"

    bad_drop = _demote("m-3", 10)
    bad_drop.kind = node_agent_pb2.MOVE_KIND_DROP
    with pytest.raises(grpc.RpcError) as wrong_dst:
        stub.PrepareMove(bad_drop, timeout=5)
    assert wrong_dst.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "TIER_WAITING" in wrong_dst.value.details() and "TIER_DRAM" in wrong_dst.value.details()


def test_unimplemented_rpc_answers_unimplemented(agent) -> None:
    _, stub = agent
    with pytest.raises(grpc.RpcError) as error:
        stub.CompleteMove(node_agent_pb2.CompleteMoveRequest(move_id="m-1"), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
