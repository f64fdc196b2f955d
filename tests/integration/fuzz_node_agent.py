"""Hypothesis strategies and the run that fuzzes a node agent's gRPC (NodeAgentService).

Random and malformed messages of every method, and raw bytes that are no protobuf at
all, with the internal token (most calls), with a wrong one and with none. Required of
the agent: no INTERNAL/UNKNOWN/UNAVAILABLE/DATA_LOSS/UNIMPLEMENTED status; every call
without the token UNAUTHENTICATED; still serving afterwards. Sessions the fuzz may name
with the token are its own (``fuzz/...`` and random ids): a token holder is the
controller, and may move what it names; the protected sessions (other tenants') are
named only without the token, where they must stay untouched.
"""

from __future__ import annotations

from collections import Counter

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import node_agent_pb2 as pb
from proto import tiers_pb2
from proto.internal_auth import token_metadata

SERVICE = "/lull.v1.NodeAgentService/"
BAD_AGENT = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)
REQUEST = {"ReportOccupancy": pb.ReportOccupancyRequest, "StreamOccupancy": pb.ReportOccupancyRequest,
           "PrepareMove": pb.PrepareMoveRequest, "CompleteMove": pb.CompleteMoveRequest,
           "AbortMove": pb.AbortMoveRequest, "Health": pb.HealthRequest}
RESPONSE = {"ReportOccupancy": pb.OccupancyReport, "StreamOccupancy": pb.OccupancyReport,
            "PrepareMove": pb.PrepareMoveResponse, "CompleteMove": pb.CompleteMoveResponse,
            "AbortMove": pb.AbortMoveResponse, "Health": pb.HealthResponse}

ids = st.sampled_from(["fuzz/s1", "fuzz/s2", "fz-m1", "fz-m2", "r0", "", ".", "..", "../x", "a/b/c"]) | \
    st.text(max_size=40) | st.just("m" * 200)
tiers = st.sampled_from(list(tiers_pb2.Tier.values())) | st.integers(-5, 2**31 - 1)
location = st.builds(lambda tier, replica: tiers_pb2.KvLocation(tier=tier, replica_id=replica), tiers, ids)


def _prepare(fields: dict) -> pb.PrepareMoveRequest:
    return pb.PrepareMoveRequest(**fields)


messages = st.one_of(
    st.builds(lambda c, n: ("ReportOccupancy", pb.ReportOccupancyRequest(capacities_only=c, max_sessions_per_chunk=n)),
              st.booleans(), st.integers(0, 2**32 - 1)),
    st.builds(lambda c, n: ("StreamOccupancy", pb.ReportOccupancyRequest(capacities_only=c, max_sessions_per_chunk=n)),
              st.booleans(), st.integers(0, 2**32 - 1)),
    st.builds(lambda fields: ("PrepareMove", _prepare(fields)), st.fixed_dictionaries({}, optional={
        "move_id": ids, "session_id": ids, "kind": st.integers(-3, 2**31 - 1) | st.sampled_from([1, 2, 3]),
        "src": location, "dst": location, "kv_bytes": st.integers(0, 2**64 - 1),
        "lease_s": st.floats(allow_nan=True, allow_infinity=True)})),
    st.builds(lambda m: ("CompleteMove", pb.CompleteMoveRequest(move_id=m)), ids),
    st.builds(lambda m, r: ("AbortMove", pb.AbortMoveRequest(move_id=m, reason=r)), ids, st.text(max_size=20)),
    st.just(("Health", pb.HealthRequest())),
)


def credentials(token: str):
    """Call metadata: the token (6 in 8), a wrong one, none, or a malformed header."""
    return st.sampled_from([token_metadata(token)] * 6 + [token_metadata("wrong-token-of-enough-length"), ()]) | \
        st.builds(lambda v: (("authorization", v),), st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                                              max_size=30))


def call_code(channel, method: str, message, metadata, raw: bool = False) -> grpc.StatusCode:
    serialize = None if raw else type(message).SerializeToString
    try:
        if method == "StreamOccupancy":
            stream = channel.unary_stream(SERVICE + method, request_serializer=serialize,
                                          response_deserializer=None if raw else RESPONSE[method].FromString)
            list(stream(message, metadata=metadata, timeout=30))
        else:
            unary = channel.unary_unary(SERVICE + method, request_serializer=serialize,
                                        response_deserializer=None if raw else RESPONSE[method].FromString)
            unary(message, metadata=metadata, timeout=30)
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def fuzz_node_agent(address: str, token: str, examples: int, raw_examples: int,
                    protected: list[str]) -> tuple[Counter, list[str]]:
    """Fuzz the agent at ``address``; returns the status histogram and the problems found.
    ``protected``: session keys named only without the token (they must come to no harm)."""
    counts: Counter = Counter()
    problems: list[str] = []
    good = token_metadata(token)

    def check(what: str, code: grpc.StatusCode, metadata, detail) -> None:
        counts[f"code_{code.name}"] += 1
        if code in BAD_AGENT or (metadata != good and code is not grpc.StatusCode.UNAUTHENTICATED):
            problems.append(f"{what} metadata={metadata!r}: {detail!r:.300} -> {code}")

    with grpc.insecure_channel(address) as channel:
        @settings(FUZZ, max_examples=examples)
        @given(request=messages, metadata=credentials(token), victim=st.sampled_from(protected or [""]))
        def fuzz_messages(request, metadata, victim):
            method, message = request
            if metadata != good and victim and hasattr(message, "session_id"):
                message.session_id = victim  # another tenant's session, named by a caller without the token
            counts["agent_messages"] += 1
            check(method, call_code(channel, method, message, metadata), metadata, message)

        @settings(FUZZ, max_examples=raw_examples)
        @given(method=st.sampled_from(list(REQUEST)), raw=st.binary(max_size=300), metadata=credentials(token))
        def fuzz_raw_bytes(method, raw, metadata):
            counts["agent_raw_bytes"] += 1
            check(method, call_code(channel, method, raw, metadata, raw=True), metadata, raw)

        fuzz_messages()
        fuzz_raw_bytes()
        health = channel.unary_unary(SERVICE + "Health", request_serializer=pb.HealthRequest.SerializeToString,
                                     response_deserializer=pb.HealthResponse.FromString)
        counts["alive_after"] = int(bool(health(pb.HealthRequest(), metadata=good, timeout=30).node_id))
    return counts, problems
