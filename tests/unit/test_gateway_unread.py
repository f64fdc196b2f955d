"""An answer dropped before its body was read: its client left between the call's admission
and the body's first read (Starlette cancels a streaming response's sender when the client
disconnects; an async generator that never started runs no `finally`). The call must still be
reported to the controller and its engine stream closed, else the session keeps its turn and
its reservation, and its next call waits at the gate until it times out (found by `lull
chaos`'s `disconnect` fault in a CI run).

Real `GatewayCore`, `ControllerClient`, `Controller` and `LiveController`, vLLM's real render
state for the tiny model. Faked: the engine replica (Serve and vLLM), whose stream records
whether it was closed."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest

from controller.gateway.controller_client import ControllerClient
from controller.gateway.service import Call, GatewayCore, Limits
from controller.policy import Phase
from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from proto.engine_call import CallUsage
from tests.unit.test_gateway_rest import MODEL, NoMoves


class Engine:
    def __init__(self):
        self.closed = 0

    async def http(self, replica_id, call):
        try:
            yield {"status": 200, "headers": [("content-type", "text/event-stream")]}
            yield b'data: {"choices": [{"text": "a"}]}\n\n'
            await asyncio.sleep(3600)  # a long answer, still running when its client leaves
            yield CallUsage(1, 5, 0, 2, 7)
        finally:
            self.closed += 1

    def departed(self, replica_id):
        return False


def scenario(counter, read_nothing_then_drop: bool) -> tuple[Phase, int, bool]:
    """One call whose answer is dropped unread; then the session's next call. Returns the
    session's phase after the drop, how often the engine stream was closed, and whether the
    next call was admitted within 1 s."""
    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    engine = Engine()
    core = GatewayCore(ControllerClient(Controller(live)), engine, counter,
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=1))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}

    def call() -> Call:
        return Call(kind="chat", path="/v1/chat/completions", body=json.loads(json.dumps(body)), size=64,
                    tenant="acme", key="acme/s1")

    async def run():
        forwarded = await core.forward(call())
        if read_nothing_then_drop:
            await forwarded.dropped()
            await forwarded.dropped()  # idempotent
        await asyncio.sleep(0.05)  # the controller client's report is sent detached
        phase = live.state.get("acme/s1").phase
        try:
            again = await asyncio.wait_for(core.forward(call()), 1.5)
            await again.dropped()
            admitted = True
        except Exception:
            admitted = False
        return phase, engine.closed, admitted

    return asyncio.run(run())


def test_an_answer_dropped_unread_reports_the_call_and_closes_the_engine_stream(counter):
    phase, closed, admitted = scenario(counter, read_nothing_then_drop=True)
    assert phase is not Phase.LLM  # the call is over in the books
    assert closed >= 1  # vLLM was told to stop
    assert admitted  # the session's next call runs


def test_without_the_drop_the_session_keeps_its_turn_and_its_next_call_times_out(counter):
    """The bug this guards against, shown on the same code path: nothing reports the call."""
    phase, closed, admitted = scenario(counter, read_nothing_then_drop=False)
    assert phase is Phase.LLM and closed == 0 and not admitted


def through_the_rest_app(counter, spec_version: str, receive_after_body, send) -> tuple[Phase, int]:
    """One streamed call through the real FastAPI app, called as an ASGI server calls it with
    ``receive_after_body`` and ``send``; the session's phase and the engine's closes after it,
    with the garbage collector off (a generator left suspended stays so)."""
    from controller.gateway.protocol import Authenticator
    from controller.gateway.rest import create_app
    from proto.config import Secrets

    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    engine = Engine()
    core = GatewayCore(ControllerClient(Controller(live)), engine, counter,
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=1))
    app = create_app(core, Authenticator(Secrets()), engine, max_body_bytes=64 << 10)
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                       "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
             "query_string": b"", "root_path": "", "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000),
             "headers": [(b"content-type", b"application/json"), (b"x-session-id", b"s1"),
                         (b"content-length", str(len(body)).encode())]}
    messages = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else await receive_after_body()

    async def run():
        try:
            await asyncio.wait_for(app(scope, receive, send), 5)
        except Exception:
            pass  # the server's side of a client that left
        await asyncio.sleep(0.05)
        return live.state.get("anonymous/s1").phase, engine.closed

    gc.disable()
    try:
        return asyncio.run(run())
    finally:
        gc.enable()


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_gone_before_the_stream_starts_has_its_call_reported_through_the_rest_app(counter, spec_version):
    """A client already gone: the send of the response's start fails (ASGI 2.4: OSError) or the
    disconnect is received at once (2.3: the sender is cancelled). Either way the stream's body
    never starts, and the call must still end in the books."""
    async def gone():
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            raise OSError("the client closed the connection")

    phase, closed = through_the_rest_app(counter, spec_version, gone, send)
    assert phase is not Phase.LLM and closed >= 1


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_a_client_gone_while_a_piece_is_sent_has_its_call_reported_through_the_rest_app(counter, spec_version):
    """The client leaves while the first piece of the body is being sent: the send fails (ASGI
    2.4) or hangs until the disconnect cancels it (2.3). The body's generator is then suspended
    where it yielded, not inside an await, so no cancellation reaches its `finally` (found by
    `lull chaos`'s `disconnect` fault: 1 session of 5 lost its turn)."""
    started = asyncio.Event()

    async def gone_once_started():
        await started.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            started.set()
        elif spec_version == "2.4":
            raise OSError("the client closed the connection")
        else:
            await asyncio.sleep(3600)  # a client that reads no more

    phase, closed = through_the_rest_app(counter, spec_version, gone_once_started, send)
    assert phase is not Phase.LLM and closed >= 1
