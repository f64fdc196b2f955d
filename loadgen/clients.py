"""The network clients ``lull bench`` replays through: the OpenAI chat API with text
messages (the path agents use), the completions API with token-id prompts, and Lull's
gRPC SessionService with token ids. Each streams the reply and times the first token as
the client sees it.

Each implements ``loadgen.replay.Client``: one ``call`` per LLM call of a session, from
any number of concurrent programs on one event loop; ``close`` once at the end.
``cached_tokens`` is what the reply reports, or -1 when the streamed reply carries no
figure. A ``CallProgress``, when given, is updated as tokens arrive, so that a replay
that cuts the call at its deadline knows what it got. Every call is greedy (temperature 0); none sends ``ignore_eos``, so an answer
may end before ``max_tokens`` as the model decides, on every API alike.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import AsyncIterator

import grpc
import httpx

from loadgen.conversation import ChatConversation, Filler, TokenConversation
from loadgen.replay import CallOutcome, CallProgress, ReplaySettings

UNKNOWN_CACHED = -1  # the reply did not say how much of the prompt came from KV


def load_tokenizer(model_dir: str):
    """The served model's tokenizer and chat template, from its folder (no download)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


class _HttpClient:
    """What the REST clients share: the connection pool, SSE reading, closing sessions."""

    def __init__(self, base_url: str, api_key: str | None, model: str | None, timeout_s: float) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                      timeout=httpx.Timeout(timeout_s, connect=30.0),
                                      limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))

    async def events(self, path: str, body: dict, session_id: str) -> AsyncIterator[dict]:
        """The stream's JSON events. An HTTP error, an error event or a stream cut before
        ``[DONE]`` raises: the call failed, whatever arrived before."""
        async with self.http.stream("POST", path, json=body, headers={"x-session-id": session_id}) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {reply.status_code}: {text[:300]}")
            async for line in sse_lines(reply.aiter_bytes()):
                if line == "data: [DONE]":
                    return
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream error: {(event['error'] or {}).get('message')}")
                yield event
        raise RuntimeError("the stream ended without [DONE]")

    async def close_session(self, session_id: str) -> None:
        reply = await self.http.delete(f"/v1/sessions/{session_id}")
        if reply.status_code not in (200, 404):  # 404: the session never reached the controller
            raise RuntimeError(f"HTTP {reply.status_code} closing {session_id}: {reply.text[:200]}")

    async def close(self) -> None:
        await self.http.aclose()


_LINE_END = re.compile(rb"\r\n|\r|\n")


async def sse_lines(chunks: AsyncIterator[bytes]) -> AsyncIterator[str]:
    """An event stream's lines, ended only where SSE ends them (CR LF, LF, CR). httpx's
    ``aiter_lines`` also breaks at the Unicode line breaks (U+0085, U+2028, ...) that a
    model's text may hold and vLLM's JSON leaves unescaped: an event cut there is no JSON."""
    pending = b""
    async for chunk in chunks:
        *lines, pending = _LINE_END.split(pending + chunk)
        for line in lines:
            yield line.decode()
    if pending:
        yield pending.decode()


def _cached(event: dict) -> int | None:
    details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
    return None if details.get("cached_tokens") is None else int(details["cached_tokens"])


class RestClient(_HttpClient):
    """POST /v1/completions with a token-id prompt, SSE streaming, vLLM's ``return_token_ids``."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 600.0) -> None:
        super().__init__(base_url, api_key, model, timeout_s)

    def conversation(self, settings: ReplaySettings, rng: random.Random) -> TokenConversation:
        return TokenConversation(settings.vocab, rng)

    async def call(self, session_id: str, prompt_ids: list[int], max_tokens: int,
                   progress: CallProgress | None = None) -> CallOutcome:
        progress = progress or CallProgress()
        body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        if self.model:
            body["model"] = self.model
        started = time.monotonic()
        ttft = None
        output: list[int] = []
        cached = UNKNOWN_CACHED
        async for event in self.events("/v1/completions", body, session_id):
            for choice in event.get("choices", []):
                ids = choice.get("token_ids") or []
                if ids and ttft is None:
                    ttft = time.monotonic() - started
                if ids:
                    progress.token(len(ids))
                output.extend(ids)
            cached = cached if _cached(event) is None else _cached(event)
        if ttft is None:
            raise RuntimeError("the reply carried no output token")
        return CallOutcome(ttft, output, cached)


class ChatClient(_HttpClient):
    """POST /v1/chat/completions with text messages, SSE streaming with ``include_usage``.

    TTFT is taken at the first chunk with content (the role-only opening chunk does not
    count); an answer with no text at all (its only token a special one) takes it at the
    chunk that finishes it. Sizes come from the reply's usage (the server's tokenizer),
    else from ``tokenizer``, the served model's own, which also sizes the messages.
    """

    def __init__(self, base_url: str, tokenizer, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 600.0) -> None:
        super().__init__(base_url, api_key, model, timeout_s)
        self.filler = Filler(tokenizer)

    def conversation(self, settings: ReplaySettings, rng: random.Random) -> ChatConversation:
        return ChatConversation(self.filler, rng)

    async def served_model(self) -> str:
        """The request's ``model``: the one given, else the first that /v1/models lists."""
        if self.model is None:
            reply = await self.http.get("/v1/models")
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code} listing models: {reply.text[:200]}")
            self.model = reply.json()["data"][0]["id"]
        return self.model

    async def call(self, session_id: str, messages: list[dict[str, str]], max_tokens: int,
                   progress: CallProgress | None = None) -> CallOutcome:
        progress = progress or CallProgress()
        body = {"model": await self.served_model(), "messages": messages, "max_tokens": max_tokens,
                "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
        started = time.monotonic()
        ttft = finished = None
        parts: list[str] = []
        usage: dict = {}
        async for event in self.events("/v1/chat/completions", body, session_id):
            for choice in event.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content and ttft is None:
                    ttft = time.monotonic() - started
                if content:
                    progress.token()  # vLLM streams a chunk per token
                parts.append(content or "")
                if choice.get("finish_reason") and finished is None:
                    finished = time.monotonic() - started
            usage = event.get("usage") or usage
        if ttft is None and finished is None:
            raise RuntimeError("the reply carried no content and did not finish")
        text = "".join(parts)
        cached = _cached({"usage": usage})
        output = usage.get("completion_tokens")
        return CallOutcome(finished if ttft is None else ttft, [], UNKNOWN_CACHED if cached is None else cached,
                           text=text, prompt_tokens=usage.get("prompt_tokens"),
                           output_tokens=len(self.filler.encode(text)) if output is None else int(output))


class GrpcClient:
    """SessionService.Generate with ``token_ids`` (proto/session.proto), server-streamed."""

    def __init__(self, target: str, api_key: str | None = None, timeout_s: float = 600.0) -> None:
        from proto import session_pb2 as pb
        from proto import session_pb2_grpc as pb_grpc

        self.pb = pb
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.SessionServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
        self.timeout_s = timeout_s

    def conversation(self, settings: ReplaySettings, rng: random.Random) -> TokenConversation:
        return TokenConversation(settings.vocab, rng)

    async def call(self, session_id: str, prompt_ids: list[int], max_tokens: int,
                   progress: CallProgress | None = None) -> CallOutcome:
        progress = progress or CallProgress()
        pb = self.pb
        request = pb.GenerateRequest(session_id=session_id, token_ids=pb.TokenIds(ids=prompt_ids),
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
        started = time.monotonic()
        ttft = None
        output: list[int] = []
        async for chunk in self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s):
            if chunk.token_ids and ttft is None:
                ttft = time.monotonic() - started
            if chunk.token_ids:
                progress.token(len(chunk.token_ids))
            output.extend(chunk.token_ids)
        if ttft is None:
            raise RuntimeError("the reply carried no output token")
        return CallOutcome(ttft, output, UNKNOWN_CACHED)

    async def close_session(self, session_id: str) -> None:
        try:
            await self.stub.CloseSession(self.pb.CloseSessionRequest(session_id=session_id),
                                         metadata=self.metadata, timeout=60)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.NOT_FOUND:
                raise

    async def close(self) -> None:
        await self.channel.close()
