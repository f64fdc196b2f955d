"""The controller as a Ray actor: a thin async shell over ``LiveController`` + ``GrpcMover``.

Named ``CONTROLLER_ACTOR`` in namespace ``RAY_NAMESPACE`` (detached when asked), so the
gateway finds it with ``ray.get_actor``. ``start`` rebuilds the books from every node
agent's occupancy report (a restarted controller loses only idleness history), aborts
the moves a previous controller left prepared, and starts the backstop tick.
Every other method forwards to ``LiveController``; see it for the semantics. All are
``async`` so that they run on the actor's event loop, where the controller lives.
"""

from __future__ import annotations

import asyncio
import logging

import ray

from controller.names import CONTROLLER_ACTOR, RAY_NAMESPACE
from controller.policy import PlannerConfig
from controller.runtime.live import Admission, LiveController
from controller.runtime.mover import GrpcMover

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0, max_concurrency=1000)
class ControllerActor:
    def __init__(self, agents: dict[str, str], *, policy: str = "lull", planner_config: PlannerConfig | None = None,
                 tick_s: float = 5.0, bytes_per_token: int = 0, metrics: bool = False) -> None:
        from controller.telemetry.metrics import make_metrics

        self.mover = GrpcMover(agents, bytes_per_token=bytes_per_token)
        metrics = make_metrics() if metrics else None  # the process's registry (multiprocess dir)
        self.controller = LiveController(self.mover, policy=policy, planner_config=planner_config, metrics=metrics)
        self.tick_s, self.bytes_per_token = tick_s, bytes_per_token
        self._tick: asyncio.Task | None = None

    async def start(self, replicas: list[tuple[str, str, int, int]], shared_tokens: int = 0) -> int:
        """Add ``(replica_id, node_id, gpu_tokens, dram_tokens)``s, rebuild from the
        agents' reports, start the tick. Returns the sessions restored."""
        for replica_id, node_id, gpu, dram in replicas:
            self.controller.add_replica(replica_id, node_id, gpu, dram)
        self.controller.set_shared_capacity(shared_tokens)
        reports = []
        for node_id in sorted(self.mover.addresses):
            try:
                report = await self.mover.report(node_id)
            except Exception as e:  # a dead node keeps nothing; its sessions come back as new
                log.warning("node %s sent no occupancy report: %s", node_id, e)
                continue
            await self.mover.abort(node_id, list(report.prepared_move_ids), "controller restarted")
            reports.append(report)
        restored = self.controller.rebuild(reports, bytes_per_token=self.bytes_per_token or None)
        if self._tick is None:
            self._tick = asyncio.get_running_loop().create_task(self.controller.run(self.tick_s))
        return len(restored)

    async def set_agent(self, node_id: str, address: str) -> None:
        self.mover.set_agent(node_id, address)

    async def add_replica(self, replica_id: str, node_id: str, gpu_tokens: int, dram_tokens: int) -> None:
        self.controller.add_replica(replica_id, node_id, gpu_tokens, dram_tokens)

    async def remove_replica(self, replica_id: str) -> None:
        self.controller.remove_replica(replica_id)

    async def set_shared_capacity(self, tokens: int) -> None:
        self.controller.set_shared_capacity(tokens)

    async def admit(self, session_id: str, tenant: str, prompt_tokens: int, max_tokens: int,
                    timeout_s: float) -> Admission:
        return await self.controller.admit(session_id, tenant, prompt_tokens, max_tokens, timeout_s)

    async def call_finished(self, session_id: str, context_tokens: int) -> None:
        self.controller.call_finished(session_id, context_tokens)

    async def call_failed(self, session_id: str) -> None:
        self.controller.call_failed(session_id)

    async def tool_call_started(self, session_id: str) -> None:
        self.controller.tool_call_started(session_id)

    async def tool_call_finished(self, session_id: str) -> None:
        self.controller.tool_call_finished(session_id)

    async def close_session(self, session_id: str) -> None:
        self.controller.close_session(session_id)

    async def plan_step(self) -> None:
        await self.controller.plan_step()

    async def snapshot(self) -> dict:
        return self.controller.snapshot()


def launch_controller(agents: dict[str, str], *, detached: bool = False, **options) -> ray.actor.ActorHandle:
    """Start (or find) the named controller actor; call ``start`` on it next."""
    lifetime = "detached" if detached else None
    return ControllerActor.options(name=CONTROLLER_ACTOR, namespace=RAY_NAMESPACE, lifetime=lifetime,
                                   get_if_exists=True).remote(agents, **options)
