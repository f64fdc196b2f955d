"""Hypothesis strategies for the gRPC SessionService fuzz (tests/integration/test_fuzz_api.py),
and how one input is sent: a message of any method, or raw bytes that are no protobuf."""

from __future__ import annotations

import grpc
from hypothesis import strategies as st

from proto import session_pb2 as spb

SERVICE = "/lull.v1.SessionService/"


# max_tokens: a few, or far past the window (refused); one long generation would add a minute of CI
sampling = st.builds(
    lambda fields: spb.SamplingParams(**fields),
    st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(0, 3) | st.integers(1 << 16, 2**32 - 1),  # cheap, or refused
        "temperature": st.floats(width=32, allow_nan=True, allow_infinity=True),
        "seed": st.integers(0, 2**64 - 1), "stop": st.lists(st.text(max_size=5), max_size=3)}))


@st.composite
def generate_request(draw, sids):
    fields = {"session_id": draw(sids)}
    kind = draw(st.integers(0, 3))
    if kind == 0:
        fields["text"] = draw(st.text(max_size=100))
    elif kind == 1:
        fields["token_ids"] = spb.TokenIds(ids=draw(st.lists(st.integers(0, 1100), max_size=40)))
    elif kind == 2:
        fields["token_ids"] = spb.TokenIds(ids=draw(st.lists(st.integers(0, 2**32 - 1), max_size=8)))
    if draw(st.booleans()):
        fields["sampling"] = draw(sampling)
    return spb.GenerateRequest(**fields)


def unary_requests(sids):
    return st.one_of(
        st.builds(lambda sid, tenant, md: ("OpenSession", spb.OpenSessionRequest(session_id=sid, tenant=tenant,
                                                                                 metadata=md)),
                  sids, st.sampled_from(["", "acme", "beta", "other"]) | st.text(max_size=10),
                  st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
        st.builds(lambda sid, t: ("ToolCallStarted", spb.ToolCallStartedRequest(session_id=sid, client_time_s=t)),
                  sids, st.floats(allow_nan=True)),
        st.builds(lambda sid: ("ToolCallFinished", spb.ToolCallFinishedRequest(session_id=sid, tool_name="x")), sids),
        st.builds(lambda sid: ("CloseSession", spb.CloseSessionRequest(session_id=sid)), sids),
        st.builds(lambda sid: ("GetSessionState", spb.GetSessionStateRequest(session_id=sid)), sids),
    )


RESPONSE = {"OpenSession": spb.OpenSessionResponse, "ToolCallStarted": spb.ToolCallStartedResponse,
            "ToolCallFinished": spb.ToolCallFinishedResponse, "CloseSession": spb.CloseSessionResponse,
            "GetSessionState": spb.SessionState}


def auth_metadata(key: str):
    return st.sampled_from([(("authorization", f"Bearer {key}"),)] * 6 + [(), (("authorization", "Bearer no"),)]) \
        | st.builds(lambda v: (("authorization", v),), st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                                                max_size=20))


def grpc_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def send_grpc(channel, kind: str, request, metadata) -> grpc.StatusCode:
    if kind == "raw":
        method, raw = request
        if method == "Generate":
            stream = channel.unary_stream(SERVICE + method, request_serializer=None, response_deserializer=None)
            return grpc_code(lambda: list(stream(raw, metadata=metadata, timeout=120)))
        unary = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
        return grpc_code(lambda: unary(raw, metadata=metadata, timeout=60))
    if isinstance(request, tuple):
        name, message = request
        unary = channel.unary_unary(SERVICE + name, request_serializer=type(message).SerializeToString,
                                    response_deserializer=RESPONSE[name].FromString)
        return grpc_code(lambda: unary(message, metadata=metadata, timeout=60))
    stream = channel.unary_stream(SERVICE + "Generate", request_serializer=spb.GenerateRequest.SerializeToString,
                                  response_deserializer=spb.GenerateChunk.FromString)
    return grpc_code(lambda: list(stream(request, metadata=metadata, timeout=120)))
