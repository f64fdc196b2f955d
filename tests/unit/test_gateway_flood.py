"""`/health` stays fast while the REST gateway is flooded with large bodies (issue 17, limits).

The real gateway app under a real uvicorn HTTP server (its own thread and event loop),
the real `GatewayCore`, `LiveController` and vLLM's render state for the tiny model;
only the engine replica is the REST tests' stub (vLLM takes half a minute to start;
no flood body reaches it anyway: each is refused by the prompt window, as not JSON, or
by the body limit). Clients send pre-built requests over raw sockets from threads, so
the test's own work is small next to the server's; the probe is a keep-alive HTTP
connection asking `/health` every 5 ms while the flood runs. The measured p99 is printed.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest
import uvicorn

from controller.gateway.controller_client import ControllerClient
from controller.gateway.protocol import Authenticator
from controller.gateway.rest import create_app
from controller.gateway.service import GatewayCore, Limits
from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from proto.config import Secrets
from tests.unit.test_gateway_rest import MODEL, NoMoves, StubEngines

MIB = 1 << 20
BODY_LIMIT = 8 * MIB
HEALTH_P99_S = 0.100
CLIENTS, BODIES_PER_CLIENT = 8, 6  # 48 bodies of 4 to 12 MiB, 8 at a time


def request(path: str, body: bytes, declared: int | None = None) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nhost: gateway\r\nauthorization: Bearer k-acme\r\n"
            f"content-type: application/json\r\ncontent-length: {declared or len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


def flood_requests() -> list[tuple[bytes, int]]:
    """(request, expected status): a 4 MiB prompt (refused by the window once rendered), 6 MiB
    that is not JSON, and a 12 MiB body over the limit (refused by its declared length)."""
    prompt = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "lorem ipsum " * (4 * MIB // 12)}]})
    kinds = [(request("/v1/chat/completions", prompt.encode()), 400),
             (request("/v1/chat/completions", b"{" * (6 * MIB)), 400),
             (request("/v1/chat/completions", b"x" * (12 * MIB)), 413)]
    return [kinds[i % len(kinds)] for i in range(CLIENTS * BODIES_PER_CLIENT)]


def send(port: int, raw: bytes) -> int:
    """The status the gateway answered; it may answer (413) and close before the body is sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        try:
            sock.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


@pytest.fixture
def gateway(counter):
    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    engines = StubEngines()
    core = GatewayCore(ControllerClient(Controller(live)), engines, counter,
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=5))
    app = create_app(core, Authenticator(Secrets(api_keys={"acme": "k-acme"})), engines, BODY_LIMIT)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield sock.getsockname()[1]
    server.should_exit = True
    thread.join(10)


def test_health_p99_stays_under_100ms_during_a_flood_of_large_bodies(gateway):
    work = flood_requests()
    statuses: list[tuple[int, int]] = []

    def client(mine: list[tuple[bytes, int]]) -> None:
        for raw, expected in mine:
            statuses.append((send(gateway, raw), expected))

    clients = [threading.Thread(target=client, args=(work[i::CLIENTS],)) for i in range(CLIENTS)]
    probe = http.client.HTTPConnection("127.0.0.1", gateway, timeout=30)
    probe.request("GET", "/health")
    probe.getresponse().read()  # connected and warm
    for thread in clients:
        thread.start()
    latencies = []
    while any(thread.is_alive() for thread in clients):
        started = time.perf_counter()
        probe.request("GET", "/health")
        reply = probe.getresponse()
        assert reply.status == 200 and json.loads(reply.read()) == {"status": "ok"}
        latencies.append(time.perf_counter() - started)
        time.sleep(0.005)
    for thread in clients:
        thread.join()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"\n/health during a flood of {len(work)} bodies of 4-12 MiB ({CLIENTS} at a time): "
          f"{len(latencies)} probes, p50 {latencies[len(latencies) // 2] * 1e3:.1f} ms, "
          f"p99 {p99 * 1e3:.1f} ms, max {latencies[-1] * 1e3:.1f} ms")
    assert [got for got, _ in statuses] == [expected for _, expected in statuses], statuses
    assert len(statuses) == len(work) and len(latencies) >= 20, "the probes ran during the flood"
    assert p99 < HEALTH_P99_S, f"/health p99 {p99 * 1e3:.0f} ms during the flood"
