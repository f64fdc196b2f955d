"""Lull on two Ray nodes of this host (a head and a worker, `serve_two_node_platform`): one
vLLM-on-CPU engine replica per node, the gateway on the head, a node agent (DRAM tier) per
node, the controller actor on either node, a real Redis as the shared tier.

Clients are the official `openai` package (REST) and the gRPC stubs of proto/. The
correctness oracle is greedy decoding: every session's call must return the tokens that
the same prompt gives as a one-off call of another tenant (no KV shared: another cache
salt), computed before. A GPU-tier budget of a few hundred tokens per replica makes the
sessions move between tiers while they run.

The last test removes the worker node (its raylet and everything on it) while sessions
run on both nodes: no call fails, and the controller forgets the replica that was there.
When Ray had put the controller on the worker, it dies with it and comes back on the head
(Ray restarts it; it reads back its replicas), which the test covers as well.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest
import ray

from proto.names import GATEWAY_DEPLOYMENT, RAY_NAMESPACE, SERVE_APP, node_agent_actor
from proto import session_pb2 as spb
from proto import session_pb2_grpc
from tests.integration.gateway_client import RawHttp, check_grpc_bad_inputs, check_rest_bad_inputs, snapshot
from tests.integration.live_platform import actor_nodes, serve_two_node_platform
from workers.redis_server import free_port

PORT, GRPC_PORT = free_port(), free_port()
KEY, OTHER_KEY = "sk-acme-multinode", "sk-beta-multinode"
# Per replica. Every session below holds more than half of it, so sessions take turns in
# HBM and each call moves KV. Two sessions sharing a GPU tier must not both return needing
# to grow past it: the planner then gates both until the gate timeout (see the report of
# the change that added this module: TierPlanner never displaces a resident that waits).
GPU_TIER_TOKENS = 640
MAX_MODEL_LEN = GPU_TIER_TOKENS  # the engine's max_model_len is capped at its KV cache, the tier
raw = RawHttp(PORT, KEY)


@pytest.fixture(scope="module")
def platform():
    env = {"LULL_API_KEYS": f"acme:{KEY},beta:{OTHER_KEY}", "LULL_ENGINE__MAX_MODEL_LEN": str(MAX_MODEL_LEN),
           "LULL_GATEWAY__GATE_TIMEOUT_S": "90"}
    args = {"gateway": {"default_max_tokens": 8, "grpc_port": GRPC_PORT}, "tiers": {"gpu_tier_tokens": GPU_TIER_TOKENS}}
    with serve_two_node_platform(env, args, port=PORT) as two_nodes:
        deadline = time.monotonic() + 30
        while len(engine_replicas()) < 2:  # each engine replica registers itself once its engine is up
            assert time.monotonic() < deadline, f"the controller knows only {engine_replicas()}"
            time.sleep(0.2)
        yield two_nodes


def openai_client(key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{PORT}/v1", api_key=key, max_retries=0, timeout=180)


@pytest.fixture(scope="module")
def client(platform) -> openai.OpenAI:
    return openai_client(KEY)


@pytest.fixture(scope="module")
def stub(platform):
    with grpc.insecure_channel(f"127.0.0.1:{GRPC_PORT}") as channel:
        yield session_pb2_grpc.SessionServiceStub(channel)


# -- calls ---------------------------------------------------------------------------------------

Call = Callable[[list[int]], list[int]]  # prompt token ids -> output token ids


def ids(seed: int, n: int) -> list[int]:
    return [(i * 37 + seed * 101) % 880 + 20 for i in range(n)]


def rest_call(client: openai.OpenAI, session: str | None, max_tokens: int = 8) -> Call:
    """/v1/completions by token ids (a one-off without a session id)."""
    headers = {"x-session-id": session} if session else {}

    def call(prompt: list[int]) -> list[int]:
        done = client.completions.create(model="lull", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_headers=headers, extra_body={"return_token_ids": True})
        out = done.choices[0].token_ids
        assert done.usage.prompt_tokens == len(prompt) and done.usage.completion_tokens == len(out) <= max_tokens
        return out

    return call


def grpc_call(stub, session: str, max_tokens: int = 8) -> Call:
    def call(prompt: list[int]) -> list[int]:
        chunks = list(stub.Generate(spb.GenerateRequest(
            session_id=session, token_ids=spb.TokenIds(ids=prompt), sampling=spb.SamplingParams(max_tokens=max_tokens)),
            metadata=auth(KEY), timeout=180))
        out = [t for c in chunks for t in c.token_ids]
        assert chunks[-1].usage.prompt_tokens == len(prompt) and chunks[-1].usage.completion_tokens == len(out)
        return out

    return call


def auth(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def converse(call: Call, seed: int, turns: int, length: int, between: Callable[[], None] = lambda: None):
    """An agent's session: each turn's prompt is the previous context, its output and a tool
    result; `between` runs in the tool gap. Returns the outputs, turn by turn."""
    context, outputs = ids(seed, length), []
    for turn in range(turns):
        outputs.append(call(context))
        context = context + outputs[-1] + ids(seed * 7 + turn, 24)
        if turn < turns - 1:
            between()
    return outputs


def references(plan: dict[str, tuple[int, int, int]], max_tokens: int = 8) -> dict[str, list[list[int]]]:
    """The oracle: each planned (seed, turns, length) conversation as one-off calls of another tenant."""
    reference = rest_call(openai_client(OTHER_KEY), None, max_tokens)
    with ThreadPoolExecutor(len(plan)) as pool:
        futures = {name: pool.submit(converse, reference, *spec) for name, spec in plan.items()}
        return {name: future.result() for name, future in futures.items()}


def rest_tool_gap(session: str, gap_s: float) -> Callable[[], None]:
    def gap() -> None:
        assert raw("POST", f"/v1/sessions/{session}/tool_call_started")[0] == 200
        time.sleep(gap_s)  # the tool runs
        assert raw("POST", f"/v1/sessions/{session}/tool_call_finished")[0] == 200

    return gap


def grpc_tool_gap(stub, session: str, gap_s: float) -> Callable[[], None]:
    def gap() -> None:
        assert stub.ToolCallStarted(spb.ToolCallStartedRequest(session_id=session), metadata=auth(KEY), timeout=30).applied
        time.sleep(gap_s)
        assert stub.ToolCallFinished(spb.ToolCallFinishedRequest(session_id=session), metadata=auth(KEY),
                                     timeout=30).applied

    return gap


def placements(session_keys: set[str], seen: dict[str, set[str]], stop: threading.Event) -> None:
    """Record each session's replicas from the controller's books until `stop` (a thread)."""
    while not stop.wait(0.1):
        for s in snapshot()["sessions"]:
            if s["session_id"] in session_keys and s["replica"]:
                seen.setdefault(s["session_id"], set()).add(s["replica"])


def moves(kind: str) -> float:
    """KV moves of this kind (demote, promote, drop) committed by the node agents that are alive."""
    total = 0.0
    for node in ray.nodes():
        if node["Alive"]:
            text = ray.get(ray.get_actor(node_agent_actor(node["NodeID"]), namespace=RAY_NAMESPACE)
                           .metrics_text.remote(), timeout=30)
            total += sum(float(v) for v in re.findall(rf'lull:kv_moves_total{{[^}}]*kind="{kind}"[^}}]*}} (\S+)', text))
    return total


def engine_replicas() -> dict[str, str]:
    """Engine replica -> its node, as registered with the controller."""
    return {t["replica"]: t["node"] for t in snapshot()["tiers"] if t["tier"] == "gpu"}


# -- tests -----------------------------------------------------------------------------------------

def test_one_engine_replica_per_node_and_the_gateway_on_the_head(platform):
    replicas = engine_replicas()
    assert len(replicas) == 2 and set(replicas.values()) == {platform.head_id, platform.worker_id}, replicas
    nodes = actor_nodes()
    assert nodes[f"ServeReplica:{SERVE_APP}:{GATEWAY_DEPLOYMENT}"] == {platform.head_id}
    assert nodes["NodeAgentActor"] == {platform.head_id, platform.worker_id}


def test_concurrent_rest_and_grpc_sessions_move_between_tiers_and_stay_correct(platform, client, stub):
    plan = {f"mn-rest-{i}": (i, 3, 330 + 20 * i) for i in range(3)} | {
        f"mn-grpc-{i}": (10 + i, 3, 340 + 20 * i) for i in range(2)}
    expected = references(plan)
    demotes, promotes = moves("demote"), moves("promote")
    seen: dict[str, set[str]] = {}
    stop = threading.Event()
    watcher = threading.Thread(target=placements, args=({f"acme/{s}" for s in plan}, seen, stop))
    watcher.start()

    def run(session: str) -> list[list[int]]:
        if session.startswith("mn-rest"):
            return converse(rest_call(client, session), *plan[session], between=rest_tool_gap(session, 0.5))
        return converse(grpc_call(stub, session), *plan[session], between=grpc_tool_gap(stub, session, 0.5))

    try:
        with ThreadPoolExecutor(len(plan)) as pool:
            outputs = dict(zip(plan, pool.map(run, plan)))
    finally:
        stop.set()
        watcher.join()
    assert outputs == expected  # greedy: KV kept, moved, reloaded or recomputed gives the same tokens
    replicas = set().union(*seen.values())
    assert replicas == set(engine_replicas()), seen  # sessions ran on both nodes' replicas
    assert moves("demote") > demotes and moves("promote") > promotes  # the small GPU tier moved KV both ways


@pytest.fixture(scope="module")
def streamed(client):
    """A session's second call, streamed with usage; the first call's usage; the reference."""
    messages = [{"role": "user", "content": "List the files of the project and say what each does. " * 6}]
    first = client.chat.completions.create(model="lull", messages=messages, max_tokens=8,
                                           extra_headers={"x-session-id": "mn-stream"})
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "Now the tests."}]
    # Greedy, as vLLM samples only when asked to: its default temperature is 1.
    pieces = list(client.chat.completions.create(model="lull", messages=messages, max_tokens=8, stream=True,
                                                 temperature=0,
                                                 stream_options={"include_usage": True},
                                                 extra_headers={"x-session-id": "mn-stream"}))
    reference = openai_client(OTHER_KEY).chat.completions.create(model="lull", messages=messages, max_tokens=8,
                                                                 temperature=0)
    return pieces, first.usage, reference


def test_streamed_chat_matches_the_reference_and_ends_with_usage(streamed):
    pieces, _, reference = streamed
    text = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
    assert text == reference.choices[0].message.content
    usage = pieces[-1].usage
    assert usage.prompt_tokens == reference.usage.prompt_tokens and usage.completion_tokens == 8


def test_streamed_usage_counts_the_reused_prompt_tokens(streamed):
    pieces, first, _ = streamed
    # The first call's prompt, in whole 32-token blocks, was kept (GPU) or reloaded (DRAM, shared).
    assert pieces[-1].usage.prompt_tokens_details.cached_tokens >= first.prompt_tokens // 32 * 32 > 0


def test_a_gated_session_waits_for_capacity_then_succeeds(client):
    """Two long calls fill both replicas' GPU tier; a third session's request is held
    (gated, not refused) until one of them ends, then runs and answers correctly."""
    waiting_prompt = ids(40, 120)
    expected = rest_call(openai_client(OTHER_KEY), None)(waiting_prompt)
    long_max = GPU_TIER_TOKENS - 100 - 40  # prompt 100: the rest of the tier cannot take 128 more
    with ThreadPoolExecutor(3) as pool:
        # Seeds whose greedy output runs the whole budget (others end early, on EOS).
        hogs = [pool.submit(rest_call(client, f"mn-hog-{i}", long_max), ids(20 + i, 100)) for i in range(2)]
        deadline = time.monotonic() + 60
        while not all(f"acme/mn-hog-{i}" in phases("llm") for i in range(2)):
            assert time.monotonic() < deadline and not any(h.done() for h in hogs), "the long calls did not run"
            time.sleep(0.05)
        waiting = pool.submit(rest_call(client, "mn-gated"), waiting_prompt)
        while "acme/mn-gated" not in phases("gated"):
            assert not waiting.done(), "the request was not gated"
            time.sleep(0.05)
        assert not all(h.done() for h in hogs)  # held while both long calls run
        assert waiting.result() == expected
    assert all(len(h.result()) == long_max for h in hogs)


def phases(phase: str) -> set[str]:
    return {s["session_id"] for s in snapshot()["sessions"] if s["phase"] == phase}


def test_bad_inputs_get_4xx_and_grpc_errors_and_the_platform_keeps_serving(client, stub):
    check_rest_bad_inputs(client, raw, MAX_MODEL_LEN)
    status, _, body = raw("POST", "/v1/completions", b'{"model": "lull", "prompt": "hi", "max_tokens": -1}')
    assert status == 400 and body["error"]["param"] == "max_tokens"  # vLLM's own validation, as `vllm serve`
    status, _, body = raw("DELETE", "/v1/sessions/nobody")
    assert status == 404 and "unknown session" in body["error"]["message"]
    sid = stub.OpenSession(spb.OpenSessionRequest(), metadata=auth(KEY), timeout=30).session_id
    check_grpc_bad_inputs(GRPC_PORT, KEY, sid, MAX_MODEL_LEN)
    with pytest.raises(grpc.RpcError) as bad_temperature:
        list(stub.Generate(spb.GenerateRequest(session_id=sid, text="hi", sampling=spb.SamplingParams(
            temperature=9.0)), metadata=auth(KEY), timeout=30))
    assert bad_temperature.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert grpc_call(stub, sid)(ids(50, 40)) and rest_call(client, "mn-after")(ids(51, 40))


def test_worker_node_removed_sessions_resume_on_the_head_and_no_call_fails(platform, client):
    """Runs last: the worker node, its engine replica and its DRAM tier go away mid-calls."""
    plan = {f"mn-fault-{i}": (60 + i, 4, 330 + 20 * i) for i in range(4)}
    expected = references(plan, max_tokens=16)
    victim = next(r for r, node in engine_replicas().items() if node == platform.worker_id)
    controller_dies = actor_nodes()["ControllerActor"] == {platform.worker_id}
    outputs: dict[str, list] = {}
    errors: list[str] = []

    def run(session: str) -> None:
        try:
            outputs[session] = converse(rest_call(client, session, 16), *plan[session],
                                        between=lambda: time.sleep(0.3))
        except Exception as error:  # noqa: BLE001 (asserted below)
            errors.append(f"{session}: {error!r}")

    threads = [threading.Thread(target=run, args=(s,)) for s in plan]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not any(s["replica"] == victim and s["phase"] == "llm" for s in snapshot()["sessions"]):
        assert time.monotonic() < deadline and not errors, f"no call ran on the worker node's replica {errors}"
        time.sleep(0.02)
    platform.cluster.remove_node(platform.worker, allow_graceful=False)
    removed = time.monotonic()
    for t in threads:
        t.join(timeout=240)
    assert not errors, errors
    assert outputs == expected  # recomputed (or reloaded from the shared tier) on the head: same tokens
    deadline = removed + 60
    while victim in engine_replicas():
        assert time.monotonic() < deadline, "the controller still lists the removed replica"
        time.sleep(0.5)
    assert set(engine_replicas().values()) == {platform.head_id}
    print(f"the controller{' (restarted on the head)' if controller_dies else ''} forgot the removed replica "
          f"{time.monotonic() - removed:.1f} s after the removal")
    if controller_dies:
        assert actor_nodes()["ControllerActor"] == {platform.head_id}
    # Every session's next call runs (on the head) and answers what the same prompt gives afresh.
    for session, (seed, turns, length) in plan.items():
        context = ids(seed, length)
        for turn, out in enumerate(expected[session]):
            context = context + out + ids(seed * 7 + turn, 24)
        assert rest_call(client, session)(context) == rest_call(openai_client(OTHER_KEY), None)(context)
