"""Bad input at volume: Hypothesis against the live gateway's REST and gRPC APIs.

One platform (the Serve app of `controller.assembly:build_app`, one vLLM-on-CPU engine
replica, a real Redis) takes malformed JSON, wrong types, huge numbers, unicode,
missing fields, random headers and session ids on every endpoint, random and
malformed gRPC messages, and raw bytes that are no protobuf at all. Required:
no 5xx (REST) and no INTERNAL/UNKNOWN/UNAVAILABLE (gRPC); a canary keeps being
served while the fuzz runs; a session opened before the fuzz gives the same
greedy output after it. The number of inputs tried is printed and recorded as
test properties (`fuzz_rest_inputs`, `fuzz_grpc_inputs`).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import urllib.parse
import uuid
from collections import Counter

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import session_pb2 as spb
from tests.integration.live_platform import serve_platform

PORT, GRPC_PORT = 8767, 9767
KEY = "sk-fuzz-test"
REST_EXAMPLES = int(os.environ.get("LULL_FUZZ_REST_EXAMPLES", "800"))
GRPC_EXAMPLES = int(os.environ.get("LULL_FUZZ_GRPC_EXAMPLES", "400"))
RAW_EXAMPLES = int(os.environ.get("LULL_FUZZ_RAW_EXAMPLES", "400"))
SERVICE = "/lull.v1.SessionService/"
BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def platform():
    env = {"LULL_API_KEYS": f"acme:{KEY}", "LULL_ENGINE__MAX_MODEL_LEN": "512", "LULL_GATEWAY__GATE_TIMEOUT_S": "30"}
    args = {"replicas": {"initial": 1}, "gateway": {"default_max_tokens": 3, "grpc_port": GRPC_PORT}}
    with serve_platform(env, args, port=PORT, redis_maxmemory="32mb"):
        yield


# -- REST ----------------------------------------------------------------------------------

def send(method: str, path: str, body: bytes | None, headers: dict[str, bytes]) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=120)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def good_completion(session: str, prompt: list[int], max_tokens: int = 6) -> list[int]:
    body = json.dumps({"model": "lull", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    status, data = send("POST", "/v1/completions", body, {"authorization": f"Bearer {KEY}".encode(),
                                                          "content-type": b"application/json",
                                                          "x-session-id": session.encode()})
    assert status == 200, (status, data[:300])
    return json.loads(data)["choices"][0]["text"]


json_scalars = st.none() | st.booleans() | st.integers(min_value=-2**80, max_value=2**80) | \
    st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                            max_size=4), max_leaves=10)
numbers = st.one_of(st.integers(1, 3), st.integers(-2**70, 2**70), st.floats(allow_nan=True), st.booleans(),
                    st.text(max_size=5), st.none())
content = st.one_of(st.text(max_size=120), st.none(), json_values,
                    st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "x"]),
                                                    "text": st.text(max_size=40) | json_scalars}), max_size=3))
message = st.fixed_dictionaries(
    {}, optional={"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "bogus"]) | json_values,
                  "content": content, "name": json_values, "tool_calls": json_values})
common = {"model": st.sampled_from(["lull", "other"]) | json_values, "max_tokens": numbers,
          "temperature": st.floats(-1, 3) | numbers, "stream": st.booleans() | json_values,
          "stream_options": st.fixed_dictionaries({"include_usage": json_values}) | json_values,
          "session_id": st.text(max_size=20) | json_values, "user": st.text(max_size=20) | json_values,
          "n": numbers, "stop": json_values, "tools": json_values}
chat_body = st.fixed_dictionaries({}, optional={**common, "max_completion_tokens": numbers,
                                                "messages": st.lists(message, max_size=4) | json_values})
prompt = st.one_of(st.text(max_size=120), st.lists(st.integers(0, 1100), max_size=40),
                   st.lists(st.integers(-2**40, 2**70), max_size=5), json_values)
completion_body = st.fixed_dictionaries({}, optional={**common, "prompt": prompt})


@st.composite
def body_bytes(draw, structured):
    choice = draw(st.integers(0, 9))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return draw(st.none())
    value = draw(json_values) if choice == 2 else draw(structured)
    text = json.dumps(value, allow_nan=True)
    if choice == 3:  # truncated or spliced JSON
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=5))
    return text.encode("utf-8", "surrogatepass")


header_text = st.text(max_size=40) | st.sampled_from(["", " ", "a" * 300, "x/../y", "🤖", "\t", "null"])
ENDPOINTS = [("POST", "/v1/chat/completions", chat_body), ("POST", "/v1/completions", completion_body),
             ("GET", "/v1/models", None), ("GET", "/health", None), ("POST", "/v1/sessions", None),
             ("DELETE", "/v1/sessions/{sid}", None), ("GET", "/v1/sessions/{sid}", None),
             ("POST", "/v1/sessions/{sid}/tool_call_started", None),
             ("POST", "/v1/sessions/{sid}/tool_call_finished", None)]


@st.composite
def rest_case(draw):
    method, path, structured = draw(st.sampled_from(ENDPOINTS))
    if draw(st.integers(0, 19)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))
    sid = draw(st.sampled_from(["fz-a", "fz-b", "fz-c"]) | header_text)
    path = path.replace("{sid}", urllib.parse.quote(sid, safe="") or "x")
    body = draw(body_bytes(structured if structured is not None else json_values))
    headers: dict[str, bytes] = {}
    auth = draw(st.integers(0, 9))
    if auth < 7:
        headers["authorization"] = f"Bearer {KEY}".encode()
    elif auth < 9:
        headers["authorization"] = draw(header_text).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        headers["x-session-id"] = draw(st.sampled_from(["fz-a", "fz-b", "fz-c"]) | header_text).encode(
            "utf-8", "surrogatepass")
    if draw(st.booleans()):
        headers["x-claude-code-session-id"] = draw(header_text).encode("utf-8", "surrogatepass")
    headers["content-type"] = draw(st.sampled_from([b"application/json", b"text/plain", b""]))
    return method, path, body, headers


def legal_header(value: bytes) -> bool:
    return not http.client._is_illegal_header_value(value) and b"\x00" not in value


class Canary:
    """A known-good call every half second on its own session while the fuzz runs."""

    def __init__(self):
        self.failures: list[str] = []
        self.calls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.5):
            try:
                good_completion(f"canary-{uuid.uuid4().hex[:6]}", [101, 202, 303, 404], max_tokens=2)
                self.calls += 1
            except Exception as error:  # noqa: BLE001 (recorded, asserted on by the test)
                self.failures.append(repr(error)[:300])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=180)


def test_rest_fuzz_gets_no_5xx_and_leaves_other_sessions_alone(platform, record_property, capsys):
    bystander = f"bystander-{uuid.uuid4().hex}"
    prompt_ids = [(i * 37) % 900 + 20 for i in range(60)]
    before = good_completion(bystander, prompt_ids)
    counts: Counter = Counter()
    problems: list[str] = []

    @settings(FUZZ, max_examples=REST_EXAMPLES)
    @given(case=rest_case())
    def fuzz(case):
        method, path, body, headers = case
        if not all(legal_header(v) for v in headers.values()):
            counts["skipped_illegal_header"] += 1
            return
        counts["rest_inputs"] += 1
        status, data = send(method, path, body, headers)
        counts[f"status_{status}"] += 1
        if status >= 500 or b'"server_error"' in data:
            problems.append(f"{method} {path} headers={headers!r} body={body[:300]!r} -> {status} {data[:300]!r}")

    with Canary() as canary:
        fuzz()
    after = good_completion(bystander, prompt_ids)
    record_property("fuzz_rest_inputs", counts["rest_inputs"])
    with capsys.disabled():
        print(f"\nREST fuzz: {counts['rest_inputs']} inputs tried; statuses "
              f"{dict(sorted((k, v) for k, v in counts.items() if k.startswith('status')))}; "
              f"canary calls {canary.calls}")
    assert not problems, "\n".join(problems[:10])
    assert not canary.failures, canary.failures[:5]
    assert canary.calls > 0
    assert after == before  # greedy output of a session that ran before the fuzz is unchanged


# -- gRPC ------------------------------------------------------------------------------------

sid_text = st.sampled_from(["fz-g1", "fz-g2", ""]) | st.text(max_size=40) | st.just("s" * 300)
sampling = st.builds(
    lambda fields: spb.SamplingParams(**fields),
    st.fixed_dictionaries({}, optional={
        "max_tokens": st.integers(0, 3) | st.integers(0, 2**32 - 1),
        "temperature": st.floats(width=32, allow_nan=True, allow_infinity=True),
        "seed": st.integers(0, 2**64 - 1), "stop": st.lists(st.text(max_size=5), max_size=3)}))


@st.composite
def generate_request(draw):
    fields = {"session_id": draw(sid_text)}
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


unary_requests = st.one_of(
    st.builds(lambda sid, tenant, md: ("OpenSession", spb.OpenSessionRequest(session_id=sid, tenant=tenant,
                                                                             metadata=md)),
              sid_text, st.sampled_from(["", "acme", "other"]) | st.text(max_size=10),
              st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
    st.builds(lambda sid, t: ("ToolCallStarted", spb.ToolCallStartedRequest(session_id=sid, client_time_s=t)),
              sid_text, st.floats(allow_nan=True)),
    st.builds(lambda sid: ("ToolCallFinished", spb.ToolCallFinishedRequest(session_id=sid, tool_name="x")), sid_text),
    st.builds(lambda sid: ("CloseSession", spb.CloseSessionRequest(session_id=sid)), sid_text),
    st.builds(lambda sid: ("GetSessionState", spb.GetSessionStateRequest(session_id=sid)), sid_text),
)
RESPONSE = {"OpenSession": spb.OpenSessionResponse, "ToolCallStarted": spb.ToolCallStartedResponse,
            "ToolCallFinished": spb.ToolCallFinishedResponse, "CloseSession": spb.CloseSessionResponse,
            "GetSessionState": spb.SessionState}
auth_metadata = st.sampled_from([(("authorization", f"Bearer {KEY}"),)] * 6 + [(), (("authorization", "Bearer no"),)]) \
    | st.builds(lambda v: (("authorization", v),), st.text(st.characters(min_codepoint=32, max_codepoint=126),
                                                            max_size=20))


def grpc_code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def test_grpc_fuzz_gets_no_internal_errors_and_leaves_other_sessions_alone(platform, record_property, capsys):
    channel = grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}")
    auth = (("authorization", f"Bearer {KEY}"),)
    bystander = f"bystander-{uuid.uuid4().hex}"
    prompt = spb.TokenIds(ids=[(i * 13) % 700 + 30 for i in range(50)])
    generate = channel.unary_stream(SERVICE + "Generate", request_serializer=spb.GenerateRequest.SerializeToString,
                                    response_deserializer=spb.GenerateChunk.FromString)

    def greedy() -> list[int]:
        chunks = generate(spb.GenerateRequest(session_id=bystander, token_ids=prompt,
                                              sampling=spb.SamplingParams(max_tokens=6)), metadata=auth, timeout=120)
        return [t for c in chunks for t in c.token_ids]

    before = greedy()
    counts: Counter = Counter()
    problems: list[str] = []

    def check(what: str, code: grpc.StatusCode, detail) -> None:
        counts[f"code_{code.name}"] += 1
        if code in BAD_GRPC:
            problems.append(f"{what}: {detail!r} -> {code}")

    @settings(FUZZ, max_examples=GRPC_EXAMPLES)
    @given(request=generate_request() | unary_requests, metadata=auth_metadata)
    def fuzz_messages(request, metadata):
        counts["grpc_messages"] += 1
        if isinstance(request, tuple):
            name, message = request
            call = channel.unary_unary(SERVICE + name, request_serializer=type(message).SerializeToString,
                                       response_deserializer=RESPONSE[name].FromString)
            check(name, grpc_code(lambda: call(message, metadata=metadata, timeout=60)), message)
        else:
            check("Generate", grpc_code(lambda: list(generate(request, metadata=metadata, timeout=120))), request)

    @settings(FUZZ, max_examples=RAW_EXAMPLES)
    @given(method=st.sampled_from(["Generate", *RESPONSE]), raw=st.binary(max_size=300), metadata=auth_metadata)
    def fuzz_raw_bytes(method, raw, metadata):
        counts["grpc_raw_bytes"] += 1
        if method == "Generate":
            call = channel.unary_stream(SERVICE + method, request_serializer=None, response_deserializer=None)
            check(method, grpc_code(lambda: list(call(raw, metadata=metadata, timeout=120))), raw)
        else:
            call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
            check(method, grpc_code(lambda: call(raw, metadata=metadata, timeout=60)), raw)

    with Canary() as canary:
        fuzz_messages()
        fuzz_raw_bytes()
    after = greedy()
    channel.close()
    total = counts["grpc_messages"] + counts["grpc_raw_bytes"]
    record_property("fuzz_grpc_inputs", total)
    with capsys.disabled():
        print(f"\ngRPC fuzz: {total} inputs tried ({counts['grpc_messages']} messages, "
              f"{counts['grpc_raw_bytes']} raw byte strings); codes "
              f"{dict(sorted((k, v) for k, v in counts.items() if k.startswith('code')))}; canary calls {canary.calls}")
    assert not problems, "\n".join(problems[:10])
    assert not canary.failures, canary.failures[:5]
    assert after == before and len(after) == 6
