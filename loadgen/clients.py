"""The two network clients ``lull bench`` replays through: Lull's REST API and its gRPC
SessionService. Both send token ids (the trace's sizes, exactly), stream the reply,
and time the first token as the client sees it.

Each implements ``loadgen.replay.Client``: one ``call`` per LLM call of a session, from
any number of concurrent programs on one event loop; ``close`` once at the end.
``cached_tokens`` is what the reply reports, or -1 when the streamed reply carries no
figure (today's engine stream reports token ids only).
"""

from __future__ import annotations

import json
import time

import grpc
import httpx

from loadgen.replay import CallOutcome

UNKNOWN_CACHED = -1  # the reply did not say how much of the prompt came from KV


class RestClient:
    """POST /v1/completions with a token-id prompt, SSE streaming, vLLM's ``return_token_ids``."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None,
                 timeout_s: float = 600.0) -> None:
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model
        self.http = httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=headers,
                                      timeout=httpx.Timeout(timeout_s, connect=30.0),
                                      limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100))

    async def call(self, session_id: str, prompt_ids: list[int], max_tokens: int) -> CallOutcome:
        body = {"prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}, "return_token_ids": True}
        if self.model:
            body["model"] = self.model
        started = time.monotonic()
        ttft = None
        output: list[int] = []
        cached = UNKNOWN_CACHED
        async with self.http.stream("POST", "/v1/completions", json=body,
                                    headers={"x-session-id": session_id}) as reply:
            if reply.status_code != 200:
                text = (await reply.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {reply.status_code}: {text[:300]}")
            async for line in reply.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(f"stream error: {event['error'].get('message')}")
                for choice in event.get("choices", []):
                    ids = choice.get("token_ids") or []
                    if ids and ttft is None:
                        ttft = time.monotonic() - started
                    output.extend(ids)
                details = (event.get("usage") or {}).get("prompt_tokens_details") or {}
                if details.get("cached_tokens") is not None:
                    cached = int(details["cached_tokens"])
        if ttft is None:
            raise RuntimeError("the reply carried no output token")
        return CallOutcome(ttft, output, cached)

    async def close_session(self, session_id: str) -> None:
        reply = await self.http.delete(f"/v1/sessions/{session_id}")
        if reply.status_code not in (200, 404):  # 404: the session never reached the controller
            raise RuntimeError(f"HTTP {reply.status_code} closing {session_id}: {reply.text[:200]}")

    async def close(self) -> None:
        await self.http.aclose()


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

    async def call(self, session_id: str, prompt_ids: list[int], max_tokens: int) -> CallOutcome:
        pb = self.pb
        request = pb.GenerateRequest(session_id=session_id, token_ids=pb.TokenIds(ids=prompt_ids),
                                     sampling=pb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
        started = time.monotonic()
        ttft = None
        output: list[int] = []
        async for chunk in self.stub.Generate(request, metadata=self.metadata, timeout=self.timeout_s):
            if chunk.token_ids and ttft is None:
                ttft = time.monotonic() - started
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
