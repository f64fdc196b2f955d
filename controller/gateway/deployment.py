"""`LullGateway`: the Serve ingress (REST on the HTTP port, the gRPC session service) over the
`LullEngine` replicas and the controller actor.

The gateway only asks: the controller owns replica membership (engine replicas register
with it themselves), and the gateway sends each call where `admit` says.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import ray
from ray import serve

from controller.autoscale import signals as scaling_signals
from controller.gateway import router
from controller.gateway.controller_client import ControllerClient
from controller.gateway.grpc_service import start_grpc
from controller.gateway.metrics import CallMetrics, count_rest_requests
from controller.gateway.protocol import Authenticator
from controller.gateway.rest import create_app
from controller.gateway.prompt_counter import PromptCounter
from controller.gateway.quotas import TenantGate
from controller.gateway.service import GatewayCore, Limits
from proto.config import LullConfig
from proto.engine_call import EngineCall
from proto.quotas import Quotas
from proto.names import CONTROLLER_ACTOR, GATEWAY_DEPLOYMENT, RAY_NAMESPACE
from proto.telemetry.metrics import make_metrics
from proto.telemetry.tracing import setup_tracing
from workers.engine import EngineSettings

log = logging.getLogger(__name__)
TARGET_GAUGE_S = 1.0  # how often the replica target gauge follows the autoscaler's decision


class ServeEngines:
    """The engine deployment's handle: a call goes to the replica the controller chose, through
    `LullRouter` (the replica id rides in the handle's ``session_id`` option)."""

    def __init__(self, handle):
        self.handle = handle

    def http(self, replica_id: str, call: EngineCall) -> AsyncIterator:
        return self.handle.options(session_id=replica_id, stream=True).http.remote(call).__aiter__()

    def departed(self, replica_id: str) -> bool:
        return router.departed(replica_id)

    def any_http(self, call: EngineCall) -> AsyncIterator:
        """An ungated request (models, tokenize, ...): any replica answers."""
        return self.handle.options(stream=True).http.remote(call).__aiter__()


@serve.deployment(name=GATEWAY_DEPLOYMENT, max_ongoing_requests=1000)
@serve.ingress()
class LullGateway:
    async def __init__(self, engine_handle, config: LullConfig, engine: dict):
        self.config = config  # build_app's, overrides included (its secrets are read again here)
        setup_tracing("lull-gateway")  # exports only when the OTEL_* variables ask for it
        self.controller = ControllerClient(ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE))
        await self.controller.connect()
        self.metrics = make_metrics()  # the process's registry: the node's multiprocess directory
        self.metrics["lull:replicas_target"].set(config.replicas.initial)  # then the autoscaler's, once it decides
        counter = await PromptCounter.start(EngineSettings(**engine))  # renders as the replicas do
        limits = Limits(max_model_len=engine["max_model_len"], max_prompt_tokens=self.config.max_prompt_tokens,
                        default_max_tokens=config.gateway.default_max_tokens,
                        gate_timeout_s=self.config.gateway.gate_timeout_s)
        self.engines = ServeEngines(engine_handle)
        self.core = GatewayCore(self.controller, self.engines, counter, limits, CallMetrics(self.metrics),
                                TenantGate(Quotas(config.auth.quotas)))
        self.model_name = engine["served_model_name"]
        grpc_port = config.gateway.grpc_port
        self.grpc_server = None
        if grpc_port:
            auth = Authenticator(self.config.secrets, self.config.auth.required)
            self.grpc_server = await start_grpc(self.core, auth, grpc_port, self.model_name, host=config.gateway.host,
                                                max_concurrent=config.gateway.max_concurrent_grpc)
        await engine_handle.replica_id.remote()  # starts the handle's router: the first call finds it warm
        self._gauge_task = asyncio.get_running_loop().create_task(self._gauge_target_forever())

    def __serve_build_asgi_app__(self):
        auth = Authenticator(self.config.secrets, self.config.auth.required)
        app = create_app(self.core, auth, self.engines, self.config.gateway.max_body_bytes)
        count_rest_requests(app, self.metrics)
        return app

    async def _gauge_target_forever(self) -> None:
        """`lull:replicas_target` follows the autoscaler's latest decision."""
        while True:
            await asyncio.sleep(TARGET_GAUGE_S)
            try:
                if decision := await asyncio.to_thread(scaling_signals.read, scaling_signals.DECISION_KEY):
                    self.metrics["lull:replicas_target"].set(decision["target"])
            except Exception:
                log.exception("the autoscaler's decision could not be read")
