"""The gRPC SessionService counts every call in `lull:requests` (api="grpc", code: the
gRPC status name), on a real grpc.aio server on localhost over the real `GatewayCore`
(the REST tests' stub engine stands in for vLLM's server, vLLM's real render state counts)."""

from __future__ import annotations

import asyncio
import collections
import socket

import grpc
import prometheus_client
import pytest
from prometheus_client import CollectorRegistry

from proto.config import Secrets
from controller.gateway.grpc_service import session_server, start_grpc
from controller.gateway.protocol import Authenticator
from controller.gateway.controller_client import ControllerClient
from controller.gateway.service import GatewayCore, Limits
from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from proto.telemetry.metrics import make_metrics
from proto import session_pb2 as pb
from proto import session_pb2_grpc as pb_grpc
from tests.unit.test_gateway_rest import MODEL, NoMoves, StubEngines

KEY = (("authorization", "Bearer k-acme"),)
AUTH = Authenticator(Secrets(api_keys={"acme": "k-acme"}))


@pytest.fixture(scope="module")
def core() -> GatewayCore:
    from controller.gateway.prompt_counter import PromptCounter
    from tests.support import counter_settings

    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    counter = asyncio.run(PromptCounter.start(counter_settings(None)))
    return GatewayCore(ControllerClient(Controller(live)), StubEngines(), counter,
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=1))


async def _call(channel, call) -> str:
    """The status name the client sees for one call."""
    try:
        await call(pb_grpc.SessionServiceStub(channel), channel)
    except grpc.aio.AioRpcError as error:
        return error.code().name
    return "OK"


def serve_calls(core, *calls) -> tuple[collections.Counter, dict[tuple[str, str], float]]:
    """Run ``calls`` against a fresh server; returns the statuses the client saw and the
    `lull:requests` samples by (api, code)."""
    registry = CollectorRegistry()

    async def run() -> list[str]:
        server = session_server(core, AUTH, make_metrics(registry), MODEL)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=[("grpc.enable_http_proxy", 0)]) as channel:
                return [await _call(channel, call) for call in calls]
        finally:
            await server.stop(grace=5)  # returns once every handler has finished, its count included

    seen = collections.Counter(asyncio.run(run()))
    counted = {(s.labels["api"], s.labels["code"]): s.value for metric in registry.collect()
               if metric.name == "lull:requests" for s in metric.samples if s.name == "lull:requests_total"}
    return seen, counted


async def open_session(stub, channel):
    assert (await stub.OpenSession(pb.OpenSessionRequest(), metadata=KEY)).created


async def open_bad_session_id(stub, channel):
    await stub.OpenSession(pb.OpenSessionRequest(session_id="   "), metadata=KEY)


async def generate(stub, channel):
    chunks = [c async for c in stub.Generate(pb.GenerateRequest(session_id="s1", text="hello"), metadata=KEY)]
    assert [c.text for c in chunks[:-1]] == ["a", "b"] and list(chunks[1].token_ids) == [1]
    assert chunks[-1].usage.completion_tokens == 2 and chunks[-1].usage.prompt_tokens == 5


async def generate_empty_prompt(stub, channel):
    async for _ in stub.Generate(pb.GenerateRequest(session_id="s1"), metadata=KEY):
        pass


async def open_without_key(stub, channel):
    await stub.OpenSession(pb.OpenSessionRequest())


async def undecodable(stub, channel):
    await channel.unary_unary("/lull.v1.SessionService/OpenSession")(b"\xff\xff\xff", metadata=KEY)


async def unknown_method(stub, channel):
    await channel.unary_unary("/lull.v1.SessionService/NoSuchMethod")(b"", metadata=KEY)


def test_ok_and_invalid_argument_calls_are_counted_with_api_grpc(core):
    seen, counted = serve_calls(core, open_session, open_bad_session_id, open_bad_session_id)
    assert seen == {"OK": 1, "INVALID_ARGUMENT": 2}
    assert counted == {("grpc", "OK"): 1.0, ("grpc", "INVALID_ARGUMENT"): 2.0}


def test_every_call_counts_once_with_the_status_the_client_saw(core):
    calls = (generate, generate_empty_prompt, open_without_key, undecodable, unknown_method, open_session)
    seen, counted = serve_calls(core, *calls)
    assert seen == {"OK": 2, "INVALID_ARGUMENT": 2, "UNAUTHENTICATED": 1, "UNIMPLEMENTED": 1}
    assert counted == {("grpc", code): float(n) for code, n in seen.items()}


def test_start_grpc_counts_in_the_processs_metrics_by_default():
    """The gateway calls start_grpc without metrics: its calls land in the same
    `make_metrics()` objects the REST middleware counts in."""
    requests = make_metrics()["lull:requests"]
    assert make_metrics()["lull:requests"] is requests

    def ok_count() -> float:
        return prometheus_client.REGISTRY.get_sample_value("lull:requests_total", {"api": "grpc", "code": "OK"}) or 0.0

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async def run() -> None:
        server = await start_grpc(None, AUTH, port, MODEL, host="127.0.0.1")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                                 options=[("grpc.enable_http_proxy", 0)]) as channel:
                await open_session(pb_grpc.SessionServiceStub(channel), channel)
        finally:
            await server.stop(grace=5)

    before = ok_count()
    asyncio.run(run())
    assert ok_count() == before + 1


def test_calls_past_the_concurrency_limit_get_resource_exhausted(core):
    """gateway.max_concurrent_grpc bounds the calls in flight (gRPC bypasses Serve's own limit)."""
    release = asyncio.Event()

    class HeldController:  # a session-state query that waits until released
        async def session_state(self, session_id):
            await release.wait()
            return None

    held = GatewayCore(ControllerClient(HeldController()), StubEngines(), core.counter, core.limits)

    async def run():
        server = session_server(held, AUTH, make_metrics(CollectorRegistry()), MODEL, max_concurrent=1)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
                stub = pb_grpc.SessionServiceStub(ch)
                first = asyncio.create_task(_call(ch, lambda s, c: s.GetSessionState(
                    pb.GetSessionStateRequest(session_id="s1"), metadata=KEY)))
                await asyncio.sleep(0.3)  # the first call is in flight
                second = await _call(ch, open_session)
                release.set()
                first = await first
                for _ in range(20):  # grpc.aio frees a call's slot in a callback after it ended: a moment later
                    if (third := await _call(ch, open_session)) == "OK":
                        break
                    await asyncio.sleep(0.1)
                return second, first, third
        finally:
            await server.stop(grace=5)

    second, first, third = asyncio.run(run())
    assert second == "RESOURCE_EXHAUSTED" and first == "NOT_FOUND" and third == "OK"
