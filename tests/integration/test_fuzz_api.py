"""Bad input at volume, from several tenants at once: Hypothesis against the live gateway's
REST and gRPC APIs and a node agent's gRPC.

One platform (the Serve app of `controller.assembly:build_app`, one vLLM-on-CPU engine
replica, its node agent, a real Redis) takes malformed JSON, wrong types, huge numbers,
unicode, missing fields, random headers and session ids on every endpoint, random and
malformed gRPC messages, and raw bytes that are no protobuf at all. Each example carries
one input per tenant (three tenants, one of them under a rate quota), sent concurrently;
each tenant's inputs name the other tenants' session ids. Required: no 5xx (REST) and no
INTERNAL/UNKNOWN/UNAVAILABLE (gRPC); a canary keeps being served while the fuzz runs;
each tenant's session opened before the fuzz is still there, as it was, and gives the
same greedy output after it. The node agent (`fuzz_node_agent`) is fuzzed with its
token and without it. The inputs tried and the status histograms are printed and
recorded as test properties (`fuzz_rest_inputs`, `fuzz_grpc_inputs`, `fuzz_agent_inputs`).
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proto import session_pb2 as spb
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE
from tests.integration.fuzz_node_agent import fuzz_node_agent
from tests.integration.fuzz_session_grpc import (SERVICE, RESPONSE, auth_metadata, generate_request, send_grpc,
                                                 unary_requests)
from tests.integration.live_platform import serve_platform
from tests.support import INTERNAL_TOKEN

PORT, GRPC_PORT = 8767, 9767
KEY = "sk-fuzz-test"
KEYS = {"acme": KEY, "beta": "sk-fuzz-beta", "gamma": "sk-fuzz-gamma"}  # gamma: under a rate quota
BYSTANDERS = {tenant: f"by-{tenant}-{uuid.uuid4().hex[:8]}" for tenant in KEYS}
REST_EXAMPLES = int(os.environ.get("LULL_FUZZ_REST_EXAMPLES", "800"))
GRPC_EXAMPLES = int(os.environ.get("LULL_FUZZ_GRPC_EXAMPLES", "400"))
RAW_EXAMPLES = int(os.environ.get("LULL_FUZZ_RAW_EXAMPLES", "400"))
AGENT_EXAMPLES = int(os.environ.get("LULL_FUZZ_AGENT_EXAMPLES", "300"))
AGENT_RAW_EXAMPLES = int(os.environ.get("LULL_FUZZ_AGENT_RAW_EXAMPLES", "200"))

BAD_GRPC = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DATA_LOSS, grpc.StatusCode.UNIMPLEMENTED}
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), print_blob=True)


@pytest.fixture(scope="module")
def platform():
    env = {"LULL_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()), "LULL_ENGINE__MAX_MODEL_LEN": "512",
           "LULL_GATEWAY__GATE_TIMEOUT_S": "30"}
    args = {"replicas": {"initial": 1}, "gateway": {"default_max_tokens": 3, "grpc_port": GRPC_PORT},
            "auth": {"quotas": {"gamma": {"requests_per_second": 4}}}}
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


def good_completion(session: str, prompt: list[int], max_tokens: int = 6, key: str = KEY) -> list[int]:
    body = json.dumps({"model": "lull", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    for _ in range(10):  # a tenant under a rate quota may have spent this second's calls
        status, data = send("POST", "/v1/completions", body, {"authorization": f"Bearer {key}".encode(),
                                                              "content-type": b"application/json",
                                                              "x-session-id": session.encode()})
        if status != 429:
            break
        time.sleep(1.0)
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


def others(tenant: str) -> list[str]:
    """The session ids of the other tenants' bystanders: a tenant's inputs name them."""
    return [sid for owner, sid in BYSTANDERS.items() if owner != tenant]


@st.composite
def rest_case(draw, tenant: str):
    key, names = KEYS[tenant], ["fz-a", "fz-b", "fz-c", *others(tenant)]
    method, path, structured = draw(st.sampled_from(ENDPOINTS))
    if draw(st.integers(0, 19)) == 0:
        method = draw(st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]))
    sid = draw(st.sampled_from(names) | header_text)
    path = path.replace("{sid}", urllib.parse.quote(sid, safe="") or "x")
    body = draw(body_bytes(structured if structured is not None else json_values))
    headers: dict[str, bytes] = {}
    auth = draw(st.integers(0, 9))
    if auth < 7:
        headers["authorization"] = f"Bearer {key}".encode()
    elif auth < 9:
        headers["authorization"] = draw(header_text).encode("utf-8", "surrogatepass")
    if draw(st.booleans()):
        headers["x-session-id"] = draw(st.sampled_from(names) | header_text).encode(
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


def rest_state(tenant: str) -> dict:
    """What another tenant could change of the tenant's bystander session: that it is open, its KV."""
    status, data = send("GET", f"/v1/sessions/{BYSTANDERS[tenant]}", None,
                        {"authorization": f"Bearer {KEYS[tenant]}".encode()})
    assert status == 200, (tenant, status, data[:300])
    state = json.loads(data)["state"]
    return {"kv_tokens": state["kv_tokens"], "closing": state["closing"]}


def rest_case_result(case) -> tuple[int, bytes] | None:
    method, path, body, headers = case
    if not all(legal_header(v) for v in headers.values()):
        return None
    return send(method, path, body, headers)


def histogram(counts: Counter, prefix: str) -> dict:
    return dict(sorted((k, v) for k, v in counts.items() if k.startswith(prefix)))


def report(record_property, capsys, name: str, inputs: int, line: str) -> None:
    """Record the inputs tried as the test property ``name`` and print ``line`` past pytest's capture."""
    record_property(name, inputs)
    with capsys.disabled():
        print(f"\n{line}")


def test_rest_fuzz_gets_no_5xx_and_leaves_other_sessions_alone(platform, record_property, capsys):
    prompt_ids = [(i * 37) % 900 + 20 for i in range(60)]
    before = {t: good_completion(BYSTANDERS[t], prompt_ids, key=k) for t, k in KEYS.items()}
    states = {t: rest_state(t) for t in KEYS}
    counts: Counter = Counter()
    problems: list[str] = []
    pool = ThreadPoolExecutor(len(KEYS))

    @settings(FUZZ, max_examples=max(1, REST_EXAMPLES // len(KEYS)))
    @given(cases=st.tuples(*(rest_case(tenant) for tenant in KEYS)))
    def fuzz(cases):
        for tenant, case, result in zip(KEYS, cases, pool.map(rest_case_result, cases)):
            if result is None:
                counts["skipped_illegal_header"] += 1
                continue
            (method, path, body, headers), (status, data) = case, result
            counts["rest_inputs"] += 1
            counts[f"status_{status}"] += 1
            if status >= 500 or b'"server_error"' in data:
                problems.append(f"{tenant}: {method} {path} headers={headers!r} body={body[:300]!r} -> "
                                f"{status} {data[:300]!r}")

    with Canary() as canary:
        fuzz()
    pool.shutdown()
    after = {t: good_completion(BYSTANDERS[t], prompt_ids, key=k) for t, k in KEYS.items()}
    report(record_property, capsys, "fuzz_rest_inputs", counts["rest_inputs"],
           f"REST fuzz: {counts['rest_inputs']} inputs tried by {len(KEYS)} tenants at once; statuses "
           f"{histogram(counts, 'status')}; canary calls {canary.calls}")
    assert not problems, "\n".join(problems[:10])
    assert not canary.failures, canary.failures[:5]
    assert canary.calls > 0
    assert {t: rest_state(t) for t in KEYS} == states, "a tenant's session was touched by another's inputs"
    assert after == before  # greedy output of each tenant's session that ran before the fuzz is unchanged


# -- gRPC ------------------------------------------------------------------------------------

def sid_text(tenant: str):
    return st.sampled_from(["fz-g1", "fz-g2", "", *others(tenant)]) | st.text(max_size=40) | st.just("s" * 300)


def tenant_inputs(tenant: str, raw: bool):
    """One tenant's gRPC input: a message, or raw bytes with the method, and its metadata."""
    sids = sid_text(tenant)
    if raw:
        request = st.tuples(st.sampled_from(["Generate", *RESPONSE]), st.binary(max_size=300)).map(lambda r: ("raw", r))
    else:
        request = (generate_request(sids) | unary_requests(sids)).map(lambda r: ("message", r))
    return st.tuples(st.just(tenant), request, auth_metadata(KEYS[tenant]))


def grpc_state(channel, tenant: str) -> tuple:
    get = channel.unary_unary(SERVICE + "GetSessionState", request_serializer=spb.GetSessionStateRequest.SerializeToString,
                              response_deserializer=spb.SessionState.FromString)
    state = get(spb.GetSessionStateRequest(session_id=BYSTANDERS[tenant]),
                metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=60)
    return state.tenant, state.kv_tokens


def test_grpc_fuzz_gets_no_internal_errors_and_leaves_other_sessions_alone(platform, record_property, capsys):
    channel = grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}")
    prompt = spb.TokenIds(ids=[(i * 13) % 700 + 30 for i in range(50)])
    generate = channel.unary_stream(SERVICE + "Generate", request_serializer=spb.GenerateRequest.SerializeToString,
                                    response_deserializer=spb.GenerateChunk.FromString)

    def greedy(tenant: str, tries: int = 10) -> list[int]:
        request = spb.GenerateRequest(session_id=BYSTANDERS[tenant], token_ids=prompt,
                                      sampling=spb.SamplingParams(max_tokens=6))
        try:
            chunks = generate(request, metadata=(("authorization", f"Bearer {KEYS[tenant]}"),), timeout=120)
            return [t for c in chunks for t in c.token_ids]
        except grpc.RpcError as error:  # a tenant under a rate quota may have spent this second's calls
            if error.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or tries == 1:
                raise
            time.sleep(1.0)
            return greedy(tenant, tries - 1)

    before = {t: greedy(t) for t in KEYS}
    states = {t: grpc_state(channel, t) for t in KEYS}
    counts: Counter = Counter()
    problems: list[str] = []
    pool = ThreadPoolExecutor(len(KEYS))

    def fuzz(inputs):
        codes = pool.map(lambda one: send_grpc(channel, *one[1], one[2]), inputs)
        for (tenant, (kind, request), metadata), code in zip(inputs, codes):
            counts[f"grpc_{kind}"] += 1
            counts[f"code_{code.name}"] += 1
            if code in BAD_GRPC:
                problems.append(f"{tenant}: {request!r:.300} metadata={metadata!r} -> {code}")

    with Canary() as canary:
        for raw, examples in ((False, GRPC_EXAMPLES), (True, RAW_EXAMPLES)):
            run = given(inputs=st.tuples(*(tenant_inputs(t, raw) for t in KEYS)))(fuzz)
            settings(FUZZ, max_examples=max(1, examples // len(KEYS)))(run)()
    pool.shutdown()
    after = {t: greedy(t) for t in KEYS}
    final_states = {t: grpc_state(channel, t) for t in KEYS}
    channel.close()
    total = counts["grpc_message"] + counts["grpc_raw"]
    report(record_property, capsys, "fuzz_grpc_inputs", total,
           f"gRPC fuzz: {total} inputs tried by {len(KEYS)} tenants at once ({counts['grpc_message']} messages, "
           f"{counts['grpc_raw']} raw byte strings); codes {histogram(counts, 'code')}; canary calls {canary.calls}")
    assert not problems, "\n".join(problems[:10])
    assert not canary.failures, canary.failures[:5]
    assert final_states == states, "a tenant's session was touched by another's inputs"
    assert after == before and all(len(tokens) == 6 for tokens in after.values())


# -- node agent --------------------------------------------------------------------------------

def test_node_agent_fuzz_gets_no_internal_errors_and_leaves_tenants_sessions_alone(platform, record_property,
                                                                                  capsys):
    import ray

    controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
    agents = ray.get(controller.launch_options.remote())["agents"]
    prompt_ids = [(i * 29) % 800 + 40 for i in range(40)]
    before = {t: good_completion(BYSTANDERS[t], prompt_ids, key=k) for t, k in KEYS.items()}
    states = {t: rest_state(t) for t in KEYS}
    protected = [f"{tenant}/{sid}" for tenant, sid in BYSTANDERS.items()]
    counts: Counter = Counter()
    problems: list[str] = []
    for address in agents.values():
        found, trouble = fuzz_node_agent(address, INTERNAL_TOKEN, AGENT_EXAMPLES, AGENT_RAW_EXAMPLES, protected)
        counts.update(found)
        problems.extend(trouble)
    total = counts["agent_messages"] + counts["agent_raw_bytes"]
    report(record_property, capsys, "fuzz_agent_inputs", total,
           f"node agent fuzz: {total} inputs tried on {len(agents)} agent(s) ({counts['agent_messages']} "
           f"messages, {counts['agent_raw_bytes']} raw byte strings); codes {histogram(counts, 'code')}")
    assert not problems, "\n".join(problems[:10])
    assert counts["alive_after"] == len(agents) >= 1
    assert {t: rest_state(t) for t in KEYS} == states, "a tenant's session was touched by the agent fuzz"
    assert {t: good_completion(BYSTANDERS[t], prompt_ids, key=k) for t, k in KEYS.items()} == before
