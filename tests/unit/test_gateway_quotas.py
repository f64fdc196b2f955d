"""Per-tenant quotas at the gateway (``auth.quotas``: max_sessions, requests_per_second): a tenant
over its quota gets a 429 with Retry-After (REST) or RESOURCE_EXHAUSTED (gRPC), while another
tenant, at the same moment, is served and never gated by it.

The real FastAPI app over a real HTTP client, a real grpc.aio server, the real `GatewayCore`,
`LiveController` and vLLM's render state; only the engine replica is the REST tests' stub
(vLLM takes half a minute to start), here one that holds a chosen session's call until
released, so a call is in flight while the others arrive. The rate clock is a `FakeClock`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from controller.gateway.controller_client import ControllerClient
from controller.gateway.grpc_service import session_server
from controller.gateway.protocol import Authenticator
from controller.gateway.quotas import TenantGate
from controller.gateway.rest import create_app
from controller.gateway.service import GatewayCore, Limits
from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from proto import session_pb2 as pb
from proto import session_pb2_grpc as pb_grpc
from proto.config import Secrets
from proto.quotas import Quotas
from proto.telemetry.metrics import make_metrics
from tests.support import FakeClock
from tests.unit.test_gateway_rest import MODEL, NoMoves, StubEngines, chat_body

KEYS = {"acme": "k-acme", "beta": "k-beta"}
AUTH = Authenticator(Secrets(api_keys=KEYS))
QUOTAS = {"acme": {"max_sessions": 1, "requests_per_second": 2}}  # beta: unlimited


class HeldEngines(StubEngines):
    """The stub engine; a call of a session in ``hold`` waits until its event is set."""

    def __init__(self):
        super().__init__()
        self.hold: dict[str, threading.Event] = {}

    async def http(self, replica_id, call):
        session = json.loads(call.body)["kv_transfer_params"]["lull"]["session"]
        if session in self.hold:
            await asyncio.to_thread(self.hold[session].wait, 10)
        async for part in super().http(replica_id, call):
            yield part


def make_core(counter, engines) -> tuple[GatewayCore, FakeClock]:
    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    clock = FakeClock()
    core = GatewayCore(ControllerClient(Controller(live)), engines, counter,
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=5),
                       quotas=TenantGate(Quotas(QUOTAS), clock=lambda: clock.now))
    return core, clock


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + 10
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def post(http, tenant: str, session: str, path: str = "/v1/chat/completions"):
    body = chat_body(max_tokens=2) if path != "/v1/messages" else {**chat_body(), "max_tokens": 2}
    return http.post(path, json=body, headers={"authorization": f"Bearer {KEYS[tenant]}", "x-session-id": session})


def test_rest_a_tenant_over_its_quota_gets_429_while_another_is_served(counter):
    engines = HeldEngines()
    core, clock = make_core(counter, engines)
    app = create_app(core, AUTH, engines, max_body_bytes=64 << 10)
    with TestClient(app) as http:
        engines.hold["acme/s1"] = release = threading.Event()
        first: list = []
        running = threading.Thread(target=lambda: first.append(post(http, "acme", "s1")))
        running.start()
        wait_for(lambda: core.quotas.in_flight("acme") == 1, "acme's first call in flight")
        refused = post(http, "acme", "s2")  # a second session while s1's call runs: over max_sessions
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "max_sessions 1" in error["message"]
        anthropic = post(http, "acme", "s3", "/v1/messages")
        assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
        served = [post(http, "beta", f"b{i}") for i in range(5)]  # beta, at the same moment: unlimited
        assert [r.status_code for r in served] == [200] * 5 and core.quotas.in_flight("acme") == 1
        release.set()
        running.join(10)
        assert first[0].status_code == 200, first[0].text
        assert core.quotas.in_flight("acme") == 0
        assert post(http, "acme", "s2").status_code == 200  # acme's second and last call this second
        over_rate = post(http, "acme", "s4")
        assert over_rate.status_code == 429 and over_rate.headers["retry-after"] == "1"
        assert "2 requests per second" in over_rate.json()["error"]["message"]
        assert post(http, "beta", "b9").status_code == 200
        clock.advance(0.5)  # one more call's worth of acme's rate
        assert post(http, "acme", "s4").status_code == 200
        clock.advance(1.0)
        too_long = http.post("/v1/chat/completions", json=chat_body("word " * 600),
                             headers={"authorization": "Bearer k-acme", "x-session-id": "s5"})
        assert too_long.status_code == 400 and core.quotas.in_flight("acme") == 0  # a refused call holds nothing


def test_grpc_a_tenant_over_its_quota_gets_resource_exhausted_while_another_is_served(counter):
    engines = HeldEngines()
    core, _ = make_core(counter, engines)
    engines.hold["acme/s1"] = release = threading.Event()

    def generate(stub, tenant: str, session: str):
        return stub.Generate(pb.GenerateRequest(session_id=session, text="hello"),
                             metadata=(("authorization", f"Bearer {KEYS[tenant]}"),))

    async def run():
        server = session_server(core, AUTH, make_metrics(CollectorRegistry()), MODEL)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)]) as ch:
                stub = pb_grpc.SessionServiceStub(ch)
                first = asyncio.create_task(_chunks(generate(stub, "acme", "s1")))
                while core.quotas.in_flight("acme") < 1:
                    await asyncio.sleep(0.01)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await _chunks(generate(stub, "acme", "s2"))
                served = await asyncio.gather(*(_chunks(generate(stub, "beta", f"b{i}")) for i in range(3)))
                release.set()
                return refused.value, served, await first
        finally:
            await server.stop(grace=5)

    refused, served, first = asyncio.run(run())
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "max_sessions 1" in refused.details()
    assert refused.trailing_metadata()["retry-after"] == "1"
    assert all(chunks[-1].usage.completion_tokens == 2 for chunks in served)
    assert first[-1].usage.completion_tokens == 2


async def _chunks(call) -> list:
    return [chunk async for chunk in call]
