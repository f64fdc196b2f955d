"""Real agent clients, unchanged, against the platform: the official `openai` and `anthropic` SDKs.

The Serve app of `controller.assembly:build_app` (gateway, one vLLM-on-CPU engine
replica with the tiny local model, the controller, a node agent) and a real Redis.
Auth is off, as on a local `lull up`: the SDKs send a key anyway, and it is accepted.
The tiny model's words are noise; what is tested is that every field is honoured
(vLLM constrains tool calls and JSON to their schemas, so even noise parses).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import anthropic
import openai
import pytest

from tests.claude_code import INSTALL_SCRIPT, SHORT_REPLIES, claude_binary, run_claude
from tests.integration.gateway_client import RawHttp, snapshot
from tests.integration.live_platform import serve_platform

HELM_TEST_SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "lull" / "files" / "test" / "first_request.py"
PORT = 8771
MODEL = "lull"
MAX_MODEL_LEN = 65536  # Claude Code's first request is ~24 k tokens (system prompt, reminder, 12 tools)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def platform():
    env = {"LULL_ENGINE__MAX_MODEL_LEN": str(MAX_MODEL_LEN)}
    # JSON grammars allow unbounded whitespace, which random weights fill until max_tokens cuts the
    # call; vLLM's own switch (`vllm serve --structured-outputs-config`) removes it. Claude Code sets
    # no temperature: greedy with a repetition penalty as the default keeps the noise short
    # (tests/claude_code.py), and every test here that samples sets its own temperature.
    vllm_args = {"structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
                 "override_generation_config": SHORT_REPLIES}
    with serve_platform(env, {"gateway": {"grpc_port": 0}, "engine": {"vllm_args": vllm_args}}, port=PORT):
        yield f"http://127.0.0.1:{PORT}"


@pytest.fixture(scope="module")
def oai(platform):
    return openai.OpenAI(base_url=f"{platform}/v1", api_key="sk-any-key-works", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(platform):
    return anthropic.Anthropic(base_url=platform, api_key="sk-ant-any", max_retries=0, timeout=120)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_required_tool_choice_returns_a_parsed_call_and_the_result_round_trips(oai):
    first = oai.chat.completions.create(model=MODEL, messages=ask("weather in Paris?"), tools=[WEATHER],
                                        tool_choice="required", max_tokens=64, extra_headers={"x-session-id": "tools"})
    calls = first.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments)  # valid JSON under the schema
    history = ask("weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    second = oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=8,
                                         extra_headers={"x-session-id": "tools"})
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.cached_tokens > 0  # the session's KV was reused


def test_sampling_fields_are_honoured(oai):
    two = oai.chat.completions.create(model=MODEL, messages=ask("count"), n=2, max_tokens=6, temperature=1.0, seed=7)
    again = oai.chat.completions.create(model=MODEL, messages=ask("count"), n=2, max_tokens=6, temperature=1.0, seed=7)
    assert len(two.choices) == 2 and [c.message.content for c in two.choices] == [
        c.message.content for c in again.choices]  # seed: reproducible
    free = oai.completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0)
    cut = free.choices[0].text[3:6]
    stopped = oai.completions.create(model=MODEL, prompt="import os\n", max_tokens=12, temperature=0, stop=[cut])
    assert stopped.choices[0].finish_reason == "stop" and cut not in stopped.choices[0].text
    probs = oai.chat.completions.create(model=MODEL, messages=ask("x"), max_tokens=3, logprobs=True, top_logprobs=2)
    assert len(probs.choices[0].logprobs.content) == 3 and len(probs.choices[0].logprobs.content[0].top_logprobs) == 2


def test_json_schema_response_format_gives_valid_json(oai):
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"],
              "additionalProperties": False}
    reply = oai.chat.completions.create(
        model=MODEL, messages=ask("2+2?"), max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    assert isinstance(json.loads(reply.choices[0].message.content)["answer"], int)


def test_streaming_with_usage(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=ask("stream"), max_tokens=5, stream=True,
                                              stream_options={"include_usage": True},
                                              extra_headers={"x-session-id": "streamed"}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []
    assert sum(len(c.choices[0].delta.content or "") for c in chunks if c.choices) > 0


def test_anthropic_messages_create_stream_tools_and_count_tokens(claude):
    tool = {"name": "get_weather", "description": "The weather in a city.",
            "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    reply = claude.messages.create(model=MODEL, max_tokens=16, system="You are terse.", tools=[tool],
                                   messages=ask("weather in Paris?"), extra_headers={"x-session-id": "claude"})
    assert reply.role == "assistant" and reply.content and reply.usage.output_tokens > 0
    with claude.messages.stream(model=MODEL, max_tokens=8, system="You are terse.", tools=[tool],
                                messages=ask("weather in Paris?"), extra_headers={"x-session-id": "claude"}) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.usage.output_tokens > 0 and isinstance(text, str)
    counted = claude.messages.count_tokens(model=MODEL, system="You are terse.", tools=[tool],
                                           messages=ask("weather in Paris?"))
    usage = reply.usage  # Anthropic's input_tokens leaves out what was read from or written to the cache
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens


def test_lulls_own_field_is_refused_and_unknown_routes_are_openai_errors(platform, oai):
    raw = RawHttp(PORT)
    status, _, body = raw("POST", "/v1/chat/completions", json.dumps(
        {"model": MODEL, "messages": ask("x"), "kv_transfer_params": {"do_remote_prefill": True}}).encode())
    assert status == 400 and body["error"]["param"] == "kv_transfer_params"
    status, _, body = raw("POST", "/v1/embeddings", b"{}")
    assert status == 404 and "not served here" in body["error"]["message"]
    models = oai.models.list().data
    assert models[0].id == MODEL and models[0].model_extra["max_model_len"] == MAX_MODEL_LEN
    tokens = raw("POST", "/tokenize", json.dumps({"model": MODEL, "prompt": "hello world"}).encode())[2]
    assert tokens["count"] > 0
    text = raw("POST", "/detokenize", json.dumps({"model": MODEL, "tokens": tokens["tokens"]}).encode())[2]
    assert text["prompt"] == "hello world"


def test_the_charts_helm_test_script_passes_against_the_platform(platform, tmp_path):
    """`helm test lull` runs this script in the cluster (templates/tests/first-request.yaml)."""
    keys = tmp_path / "api-keys"
    keys.write_text("default:sk-any\n")
    env = {"PATH": os.environ["PATH"], "LULL_URL": platform, "LULL_MODEL": MODEL, "LULL_KEYS_FILE": str(keys)}
    result = subprocess.run([sys.executable, str(HELM_TEST_SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{MODEL} is served (max_model_len {MAX_MODEL_LEN})" in result.stdout
    env["LULL_MODEL"] = "not-served"
    failed = subprocess.run([sys.executable, str(HELM_TEST_SCRIPT)], env=env, capture_output=True, text=True,
                            timeout=300)
    assert failed.returncode == 1 and "not 'not-served'" in failed.stderr


def test_clients_without_a_session_get_one_per_conversation(oai):
    before = {s["session_id"] for s in snapshot()["sessions"]}
    oai.chat.completions.create(model=MODEL, messages=ask("an unnamed agent's task"), max_tokens=2)
    new = {s["session_id"] for s in snapshot()["sessions"]} - before
    assert len(new) == 1 and next(iter(new)).startswith("anonymous/auto-")


def test_claude_code_itself_runs_against_lull(platform):
    """Claude Code from npm (`scripts/install_claude_code.sh`), offline: its Messages API calls go
    through Lull's gate as one session, named by its own session header."""
    binary = claude_binary()
    if binary is None:
        message = f"Claude Code is not installed: run {INSTALL_SCRIPT} (needs npm)"
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail(message + "; .ci/run installs it")
        pytest.skip(message)
    before = {s["session_id"] for s in snapshot()["sessions"]}
    result = run_claude(platform, MODEL, "say hello", context_tokens=MAX_MODEL_LEN, timeout_s=400, binary=binary)
    assert result.returncode == 0, f"claude exited {result.returncode}:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"claude printed nothing:\n{result.stderr[-3000:]}"
    sessions = [s for s in snapshot()["sessions"] if s["session_id"] not in before]
    assert len(sessions) == 1 and sessions[0]["kv_tokens"] > 10_000  # its ~24 k-token prompt, booked


def test_parallel_calls_on_one_session_take_turns(oai):
    """Sub-agents sharing a session id: the calls queue at the gate in turn, none is refused."""
    from concurrent.futures import ThreadPoolExecutor

    def call(i: int):
        return oai.chat.completions.create(model=MODEL, messages=ask(f"sub-agent {i}"), max_tokens=4,
                                           extra_headers={"x-session-id": "shared-by-subagents"})

    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(call, range(4)))
    assert [r.usage.completion_tokens for r in replies] == [4, 4, 4, 4]
