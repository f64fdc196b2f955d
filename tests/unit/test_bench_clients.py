"""How `lull bench`'s REST clients (`loadgen.clients`) read a streamed reply.

The server is a fake: a few lines of asyncio that answer every request with a scripted
HTTP response and record what was asked. It stands in for the platform only to test the
client's parsing of SSE streams and its handling of failures; the live platform is
exercised by tests/integration/test_bench_live.py. The tokenizer is the tiny model's, real.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from controller.cli.bench import live
from loadgen.clients import ChatClient, RestClient, load_tokenizer
from workers.tiny_model import ensure_tiny_model

MODELS = {"object": "list", "data": [{"id": "tiny", "object": "model"}]}


def sse(*events: dict | str) -> list[str]:
    return [f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events]


def chunk(content: str | None = None, finish: str | None = None, role: bool = False) -> dict:
    delta = {"role": "assistant", "content": content} if role else ({} if content is None else {"content": content})
    return {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def usage(prompt: int, completion: int, cached: int | None = None) -> dict:
    body = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
    if cached is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached}
    return {"object": "chat.completion.chunk", "choices": [], "usage": body}


class FakeServer:
    """Answers GET /v1/models with MODELS and every POST with ``status`` and the ``parts``,
    written one by one after ``delay_s`` each; records each request's headers and body."""

    def __init__(self, parts: list[str | bytes], status: int = 200, delay_s: float = 0.0):
        self.parts, self.status, self.delay_s = parts, status, delay_s
        self.requests: list[tuple[str, dict, dict]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        line, *fields = head.strip().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
        raw = await reader.readexactly(int(headers.get("content-length", 0)))
        self.requests.append((line, headers, json.loads(raw) if raw else {}))
        if line.startswith("GET"):
            status, parts = 200, [json.dumps(MODELS)]
        else:
            status, parts = self.status, self.parts
        kind = "text/event-stream" if status == 200 and line.startswith("POST") else "application/json"
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {kind}\r\nconnection: close\r\n\r\n".encode())
        for part in parts:
            await asyncio.sleep(self.delay_s)
            writer.write(part if isinstance(part, bytes) else part.encode())
            await writer.drain()
        writer.close()

    async def call(self, client_of, prompt, max_tokens: int = 8):
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        client = client_of(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
        try:
            return await client.call("s-1", prompt, max_tokens)
        finally:
            await client.close()
            server.close()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(ensure_tiny_model()))


def chat(tokenizer, server: FakeServer, messages=None):
    messages = messages or [{"role": "user", "content": " the list"}]
    return asyncio.run(server.call(lambda url: ChatClient(url, tokenizer, api_key="sk-1"), messages))


def test_chat_reads_text_usage_and_cached_tokens_and_sends_an_openai_request(tokenizer):
    server = FakeServer(sse(chunk("", role=True), chunk(" the"), chunk(" return value"), chunk("", "length"),
                            usage(40, 3, cached=32), "[DONE]"))
    outcome = chat(tokenizer, server)
    assert outcome.text == " the return value" and outcome.output_ids == []
    assert (outcome.prompt_tokens, outcome.output_tokens, outcome.cached_tokens) == (40, 3, 32)
    (get, _, _), (post, headers, body) = server.requests
    assert get.startswith("GET /v1/models") and post.startswith("POST /v1/chat/completions")
    assert headers["x-session-id"] == "s-1" and headers["authorization"] == "Bearer sk-1"
    assert body == {"model": "tiny", "messages": [{"role": "user", "content": " the list"}], "max_tokens": 8,
                    "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}


def test_chat_without_cached_tokens_or_usage_counts_the_text_itself(tokenizer):
    outcome = chat(tokenizer, FakeServer(sse(chunk(" the object"), chunk(None, "stop"), "[DONE]")))
    assert outcome.cached_tokens == -1 and outcome.prompt_tokens is None
    assert outcome.output_tokens == len(tokenizer.encode(" the object", add_special_tokens=False)) == 2
    outcome = chat(tokenizer, FakeServer(sse(chunk(" in"), usage(9, 1), "[DONE]")))
    assert outcome.cached_tokens == -1 and outcome.prompt_tokens == 9


def test_chat_ttft_waits_for_the_first_content_not_the_role_chunk(tokenizer):
    server = FakeServer(sse(chunk("", role=True), chunk(" is"), chunk(None, "stop"), "[DONE]"), delay_s=0.15)
    outcome = chat(tokenizer, server)
    assert outcome.ttft_s >= 0.3  # the role chunk came at 0.15 s, the content at 0.3 s


def test_chat_answer_without_text_times_its_finishing_chunk(tokenizer):
    outcome = chat(tokenizer, FakeServer(sse(chunk("", role=True), chunk(None, "stop"), usage(9, 1), "[DONE]")))
    assert outcome.text == "" and outcome.output_tokens == 1 and outcome.ttft_s > 0


@pytest.mark.parametrize(("server", "error"), [
    (FakeServer([json.dumps({"error": {"message": "too long"}})], status=400), "HTTP 400: .*too long"),
    (FakeServer(sse(chunk(" the"), {"error": {"message": "the engine failed"}})), "stream error: the engine failed"),
    (FakeServer(sse(chunk(" the"), chunk(None, "stop"))), "without \\[DONE\\]"),
    (FakeServer(sse(usage(9, 0), "[DONE]")), "no content"),
])
def test_a_failed_chat_call_raises(tokenizer, server, error):
    with pytest.raises(RuntimeError, match=error):
        chat(tokenizer, server)


def test_completions_reads_token_ids_and_fails_on_a_cut_stream():
    def text(ids, finish=None):
        return {"object": "text_completion", "choices": [{"index": 0, "text": "x", "token_ids": ids,
                                                          "finish_reason": finish}]}

    server = FakeServer(sse(text([5, 6]), text([7], "length"), usage(4, 3, cached=2), "[DONE]"))
    outcome = asyncio.run(server.call(RestClient, [1, 2, 3, 4]))
    assert outcome.output_ids == [5, 6, 7] and outcome.cached_tokens == 2
    assert server.requests[0][2]["prompt"] == [1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="without \\[DONE\\]"):
        asyncio.run(FakeServer(sse(text([5]))).call(RestClient, [1]))


def test_text_with_unicode_line_breaks_does_not_cut_an_event():
    """vLLM writes its events with pydantic, which leaves U+0085, U+2028 and U+2029 unescaped; a
    model's text may hold them (a bench run's random prompts once drew one). Only CR and LF end
    an event stream's lines, and a chunk may end anywhere, inside a character too."""
    text = {"object": "text_completion", "choices": [{"index": 0, "text": "a\u0085b\u2028c\u2029d\x1ce",
                                                      "token_ids": [5, 6], "finish_reason": "length"}]}
    raw = "".join(sse(json.dumps(text, ensure_ascii=False), usage(4, 2, cached=0), "[DONE]")).encode()
    assert "\u2028".encode() in raw  # the line breaks travel raw, as vLLM sends them
    for size in (len(raw), 3, 1):
        server = FakeServer([raw[i:i + size] for i in range(0, len(raw), size)])
        outcome = asyncio.run(server.call(RestClient, [1, 2, 3, 4]))
        assert outcome.output_ids == [5, 6] and outcome.cached_tokens == 0


def bench_args(*extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    live.add_parser(parser.add_subparsers())
    return parser.parse_args(["bench", "--policy", "lull", "--duration", "1", "--json", "x.json", *extra])


def test_bench_calls_the_chat_api_by_default_sized_by_the_configured_model(monkeypatch):
    monkeypatch.delenv("LULL_CONFIG", raising=False)
    monkeypatch.delenv("LULL_MODEL__PATH", raising=False)
    args = bench_args()
    client = live.client_factory(args, "http://127.0.0.1:1", "127.0.0.1:2", None)()
    assert args.api == "chat" and isinstance(client, ChatClient) and args.tokenizer == str(ensure_tiny_model())
    asyncio.run(client.close())
    client = live.client_factory(bench_args("--api", "completions"), "http://127.0.0.1:1", "127.0.0.1:2", None)()
    assert isinstance(client, RestClient)
    asyncio.run(client.close())
    with pytest.raises(SystemExit):
        bench_args("--api", "rest")
