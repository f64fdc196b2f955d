"""Where a REST call's time goes in the gateway, on a local Ray cluster (not a test; run it:
``python -m tests.integration.gateway_latency [calls]``).

The real gateway deployment, controller actor and `LullRouter` over a fake engine
deployment that answers at once (it registers with the controller as `LullEngine`
does), so the figures are the control path's alone: no vLLM. Measured, alternating
call by call: a one-token REST call through Serve's HTTP proxy; `/health` through the
proxy (the proxy hop and the ASGI app, nothing else); the engine's Serve handle
called directly (what `lull bench-gateway` compares with); one controller actor call.
Inside the gateway, the admit round trip, the engine call and the whole
`GatewayCore.complete` are timed too. Prints p50/p99 in ms as JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time

import httpx
import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from controller.assembly.settings import PlatformSettings
from controller.gateway.deployment import LullGateway
from controller.gateway.router import ROUTER_CLASS
from controller.runtime.actor import launch_controller
from proto.engine_request import EngineRequest
from proto.names import CONTROLLER_ACTOR, ENGINE_DEPLOYMENT, RAY_NAMESPACE, SERVE_APP
from workers.tiny_model import ensure_tiny_model

PROMPT = [(i * 29) % 700 + 30 for i in range(64)]  # lull bench-gateway's
PORT = 8799


@serve.deployment(name=ENGINE_DEPLOYMENT, max_ongoing_requests=64)
class FakeEngine:
    async def __init__(self):
        self.rid = serve.get_replica_context().replica_id.unique_id
        context = ray.get_runtime_context()
        controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
        await controller.register_replica.remote(self.rid, context.get_node_id(), 4096, 4096,
                                                 context.get_actor_name())

    def replica_id(self) -> str:
        return self.rid

    async def generate(self, request: EngineRequest) -> dict:
        ids = request.prompt_token_ids
        return {"token_ids": [ids[-1]], "text": "", "prompt_tokens": len(ids), "cached_tokens": 0,
                "finish_reason": "length", "replica_id": self.rid}


def _timed(store: dict, name: str, fn):
    @functools.wraps(fn)
    async def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            store.setdefault(name, []).append(time.perf_counter() - started)

    return timed


class TimedGateway(LullGateway.func_or_class):
    """The gateway, with its steps timed and a /timings route that reports them."""

    async def __init__(self, *args):
        await super().__init__(*args)
        self.times: dict[str, list[float]] = {}
        core = self.core
        core.controller.admit = _timed(self.times, "admit round trip", core.controller.admit)
        core.engines.generate = _timed(self.times, "engine call", core.engines.generate)
        core.complete = _timed(self.times, "GatewayCore.complete", core.complete)

    def __serve_build_asgi_app__(self):
        app = super().__serve_build_asgi_app__()

        @app.get("/timings")
        async def timings():
            out = {k: round(_quantile(v, 50) * 1000, 2) for k, v in self.times.items()}
            self.times.clear()
            return out

        return app


def _quantile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def _deploy() -> None:
    serve.start(http_options={"host": "127.0.0.1", "port": PORT})
    node = ray.get_runtime_context().get_node_id()
    controller = launch_controller({node: "127.0.0.1:1"}, detached=True, bytes_per_token=2048)  # no moves here
    ray.get(controller.start.remote(0))
    engine = dict(model=str(ensure_tiny_model()), cpu_kv_cache_gib=1, dram_capacity_bytes=1 << 26,
                  max_model_len=1024, served_model_name="lull")
    engines = FakeEngine.options(request_router_config=RequestRouterConfig(request_router_class=ROUTER_CLASS)).bind()
    gateway = serve.deployment(TimedGateway, name="LullGateway", max_ongoing_requests=1000)
    settings = dataclasses.asdict(PlatformSettings(grpc_port=0, default_max_tokens=1))
    serve.run(gateway.options(ray_actor_options={"num_cpus": 0}).bind(engines, settings, engine),
              name=SERVE_APP, route_prefix="/")


def main(calls: int = 200) -> dict:
    ray.init(address="local", num_cpus=2, include_dashboard=False, namespace=RAY_NAMESPACE, log_to_driver=False)
    try:
        _deploy()
        handle = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=SERVE_APP)
        controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
        http = httpx.Client(base_url=f"http://127.0.0.1:{PORT}", timeout=60)
        body = {"model": "lull", "prompt": PROMPT, "max_tokens": 1, "temperature": 0}
        paths = {
            "REST call": lambda: http.post("/v1/completions", json=body,
                                           headers={"x-session-id": "bench"}).raise_for_status(),
            "/health via the proxy": lambda: http.get("/health").raise_for_status(),
            "engine handle, direct": lambda: handle.generate.remote(EngineRequest(PROMPT, max_tokens=1)).result(),
            "one controller call": lambda: ray.get(controller.session_state.remote("nobody")),
        }
        for path in paths.values():
            for _ in range(20):
                path()
        http.get("/timings")  # drop the warm-up's
        times: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(calls):
            for name, path in paths.items():
                started = time.perf_counter()
                path()
                times[name].append(time.perf_counter() - started)
        figures = {k: {"p50": round(_quantile(v, 50) * 1000, 2), "p99": round(_quantile(v, 99) * 1000, 2)}
                   for k, v in times.items()}
        figures["added p50 (REST - engine direct)"] = round(
            figures["REST call"]["p50"] - figures["engine handle, direct"]["p50"], 2)
        figures["inside the gateway, p50"] = http.get("/timings").json()
        return figures
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200), indent=1))
