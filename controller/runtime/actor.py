"""The controller as a Ray actor: a thin async shell over ``LiveController`` + ``GrpcMover``.

Named ``CONTROLLER_ACTOR`` in namespace ``RAY_NAMESPACE`` (detached when asked), so the
gateway finds it with ``ray.get_actor``. ``start`` rebuilds the books from every node
agent's occupancy report (a restarted controller loses only idleness history), aborts
the moves a previous controller left prepared, and starts the backstop tick.
Every other method forwards to ``LiveController``; see it for the semantics. All are
``async`` so that they run on the actor's event loop, where the controller lives.

Restartable: Ray restarts a killed controller (``max_restarts``) by running
``__init__`` again with the same arguments, which leaves it empty and not started.
Until ``start`` runs again (the gateway's ``ControllerClient`` calls it with the
replicas it registered), every call but ``start`` raises ``ControllerNotStarted``,
so no call runs against empty books.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import ray

from controller.autoscale import signals
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE
from controller.policy import DEFAULT_CYCLES, Location, PlannerConfig, Tier
from controller.runtime.drain import DrainReport, drain_replica
from controller.runtime.live import Admission, LiveController
from controller.runtime.mover import GrpcMover
from controller.runtime.metrics import gauge_gpu_tiers_forever, session_on_arrival

log = logging.getLogger(__name__)
DRAIN_TIMEOUT_S = 60.0  # a drain's deadline; the engine's graceful shutdown waits a little longer
KEEP_DRAIN_REPORTS = 100
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node
RESTART_REPORT_S = 3.0  # how long a restarting controller waits for one node agent's report


class ControllerNotStarted(RuntimeError):
    """The controller (re)started and has not rebuilt its books yet: call ``start``."""


@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=-1)
class ControllerActor:
    def __init__(self, agents: dict[str, str], *, policy: str = "lull", planner_config: PlannerConfig | None = None,
                 tick_s: float = 5.0, idleness_window: int = DEFAULT_CYCLES, bytes_per_token: int = 0,
                 metrics: bool = False) -> None:
        from proto.telemetry.metrics import make_metrics
        from proto.telemetry.tracing import setup_tracing

        setup_tracing("lull-controller")  # KV move spans; exports only when OTEL_* ask for it

        self._options = dict(agents=dict(agents), policy=policy, planner_config=planner_config, tick_s=tick_s,
                             idleness_window=idleness_window, bytes_per_token=bytes_per_token, metrics=metrics)
        self._started = False
        self._start_lock = asyncio.Lock()
        self.shared_tokens = 0

        self.mover = GrpcMover(agents, bytes_per_token=bytes_per_token)
        metrics = make_metrics() if metrics else None  # the process's registry (multiprocess dir)
        self.controller = LiveController(self.mover, policy=policy, planner_config=planner_config,
                                         idleness_window=idleness_window, metrics=metrics)
        self.tick_s, self.bytes_per_token, self.planner_config = tick_s, bytes_per_token, planner_config
        self._tick: asyncio.Task | None = None
        self._drains: dict[str, asyncio.Task] = {}  # replica -> its drain, shared by every caller
        self._drained: dict[str, DrainReport] = {}  # the latest drains, for late callers and status

    async def start(self, replicas: list[tuple[str, str, int, int]], shared_tokens: int | None = 0) -> int:
        """Add ``(replica_id, node_id, gpu_tokens, dram_tokens)``s, rebuild from the
        agents' reports, start the tick. Returns the sessions restored. Idempotent: on a
        started controller it only adds the replicas it does not know (and restores 0).
        ``shared_tokens`` None keeps the shared capacity as it is."""
        async with self._start_lock:
            for replica_id, node_id, gpu, dram in replicas:
                if replica_id not in self.controller.nodes:
                    self.controller.add_replica(replica_id, node_id, gpu, dram)
            if shared_tokens is not None:
                self.shared_tokens = shared_tokens
                self.controller.set_shared_capacity(shared_tokens)
            if self._started:
                return 0
            reports = [r for r in await asyncio.gather(*map(self._report_for_restart, sorted(self.mover.addresses)))
                       if r is not None]
            restored = self.controller.rebuild(reports, bytes_per_token=self.bytes_per_token or None)
            if self._tick is None:
                self._tick = asyncio.get_running_loop().create_task(self.controller.run(self.tick_s))
                self._publisher = asyncio.get_running_loop().create_task(self._publish_signals_forever())
                if self.controller.metrics and self.bytes_per_token:  # set_policy swaps the controller: read it each time
                    self._gauges = asyncio.get_running_loop().create_task(
                        gauge_gpu_tiers_forever(lambda: self.controller, self.bytes_per_token))
            self._started = True
            log.info("controller started: %d replicas, %d sessions restored", len(self.controller.nodes),
                     len(restored))
            return len(restored)

    async def _report_for_restart(self, node_id: str):
        """The node's occupancy report, its agent's half-done moves aborted; None when the
        agent does not answer within ``RESTART_REPORT_S`` (a dead node keeps nothing: its
        sessions come back as new). Asked of every agent at once, so one vanished host
        delays the restart by that timeout, not by a timeout per node."""
        try:
            report = await asyncio.wait_for(self.mover.report(node_id), RESTART_REPORT_S)
            await self.mover.abort(node_id, list(report.prepared_move_ids), "controller restarted")
            return report
        except Exception as e:
            log.warning("node %s sent no occupancy report: %s", node_id, e or type(e).__name__)
            return None

    async def launch_options(self) -> dict:
        """What a new controller is launched with, should this one be killed for good."""
        return {**self._options, "shared_tokens": self.shared_tokens}

    def _ready(self) -> None:
        if not self._started:
            raise ControllerNotStarted("the controller is restarting: call start() with the replicas first")

    async def set_agent(self, node_id: str, address: str) -> None:
        self.mover.set_agent(node_id, address)

    async def forget_agent(self, node_id: str) -> None:
        self.mover.forget_agent(node_id)

    async def agent_nodes(self) -> list[str]:
        return sorted(self.mover.addresses)

    async def add_replica(self, replica_id: str, node_id: str, gpu_tokens: int, dram_tokens: int) -> None:
        self._ready()
        self.controller.add_replica(replica_id, node_id, gpu_tokens, dram_tokens)
        self._gauge_replicas()

    async def remove_replica(self, replica_id: str) -> None:
        self._ready()
        self.controller.remove_replica(replica_id)
        self._gauge_replicas()

    async def drain_replica(self, replica_id: str, timeout_s: float = DRAIN_TIMEOUT_S) -> dict | None:
        """Demote the replica's sessions to the shared tier, then remove it (``runtime.drain``).
        Every caller of a replica's drain (its destructor, the gateway's sync) awaits the same
        one; returns its report as a dict, or None for a replica this controller never had."""
        self._ready()
        task = self._drains.get(replica_id)
        if task is None:
            if replica_id in self._drained:
                return dataclasses.asdict(self._drained[replica_id])
            if replica_id not in self.controller.nodes:
                return None
            task = asyncio.get_running_loop().create_task(
                drain_replica(self.controller, replica_id, timeout_s=timeout_s))
            self._drains[replica_id] = task
            task.add_done_callback(lambda done: self._drain_done(replica_id, done))
            self._gauge_replicas()
        report = await asyncio.shield(task)
        return dataclasses.asdict(report)

    def _drain_done(self, replica_id: str, task: asyncio.Task) -> None:
        self._drains.pop(replica_id, None)
        self._gauge_replicas()
        if not task.cancelled() and task.exception() is None:
            self._drained[replica_id] = task.result()
            while len(self._drained) > KEEP_DRAIN_REPORTS:
                self._drained.pop(next(iter(self._drained)))

    async def drain_reports(self) -> list[dict]:
        """The latest drains' reports, oldest first."""
        return [dataclasses.asdict(r) for r in self._drained.values()]

    async def _publish_signals_forever(self) -> None:
        """The scaling signals for Serve's autoscaling policy (``controller.autoscale``)."""
        failing = False
        while True:
            try:
                signals.publish(signals.collect(self.controller))
                failing = False
            except Exception as error:  # the GCS restarting: the policy holds the count meanwhile
                if not failing:
                    log.warning("scaling signals not published: %s", error)
                failing = True
            await asyncio.sleep(signals.PERIOD_S)

    async def set_shared_capacity(self, tokens: int) -> None:
        self._ready()
        self.controller.set_shared_capacity(tokens)

    async def admit(self, session_id: str, tenant: str, prompt_tokens: int, max_tokens: int,
                    timeout_s: float) -> Admission:
        self._ready()
        return await self.controller.admit(session_id, tenant, prompt_tokens, max_tokens, timeout_s)

    async def admit_observed(self, session_id: str, tenant: str, prompt_tokens: int, max_tokens: int,
                             timeout_s: float) -> tuple[Admission, str, int]:
        """``admit``, plus the session's tier and context tokens on arrival (for the gateway's
        metrics); records its idleness on arrival."""
        self._ready()
        tier, context_tokens, idleness = session_on_arrival(self.controller, session_id)
        if idleness is not None and "lull:session_idleness" in self.controller.metrics:
            self.controller.metrics["lull:session_idleness"].labels(tier=tier).observe(idleness)
        admission = await self.controller.admit(session_id, tenant, prompt_tokens, max_tokens, timeout_s)
        return admission, tier, context_tokens

    async def call_finished(self, session_id: str, context_tokens: int) -> None:
        self._ready()
        self.controller.call_finished(session_id, context_tokens)

    async def call_failed(self, session_id: str) -> None:
        self._ready()
        self.controller.call_failed(session_id)

    async def tool_call_started(self, session_id: str) -> None:
        self._ready()
        self.controller.tool_call_started(session_id)

    async def tool_call_finished(self, session_id: str) -> None:
        self._ready()
        self.controller.tool_call_finished(session_id)

    async def close_session(self, session_id: str) -> None:
        self._ready()
        self.controller.close_session(session_id)

    async def plan_step(self) -> None:
        self._ready()
        await self.controller.plan_step()

    async def snapshot(self) -> dict:
        self._ready()
        return self.controller.snapshot()

    async def set_policy(self, policy: str) -> None:
        """Switch to ``policy`` between benchmark runs (``lull bench --policy a,b``): a fresh
        ``LiveController`` over the same replicas, capacities and mover. Only on empty books:
        a session's KV placement is the old policy's decision and cannot be handed over."""
        old = self.controller
        snap = old.snapshot()
        if snap["sessions"] or snap["gated"]:
            raise ValueError(f"cannot switch policy with {len(snap['sessions'])} session(s) open; close them first")
        new = LiveController(self.mover, policy=policy, planner_config=self.planner_config, metrics=old.metrics)
        for replica_id, node_id in old.nodes.items():
            new.add_replica(replica_id, node_id, old.capacity[Location(Tier.GPU, replica_id)],
                            old.capacity[Location(Tier.DRAM, replica_id)])
        new.set_shared_capacity(old.capacity[Location(Tier.SHARED)])
        if self._tick is not None:
            self._tick.cancel()
            self._tick = asyncio.get_running_loop().create_task(new.run(self.tick_s))
        self.controller = new
        log.info("policy switched from %s to %s", old.policy_name, policy)

    def _gauge_replicas(self) -> None:
        if "lull:replicas" in self.controller.metrics:  # replicas registered with the controller
            draining = len(self.controller.draining)
            self.controller.metrics["lull:replicas"].labels(state="running").set(len(self.controller.nodes) - draining)
            self.controller.metrics["lull:replicas"].labels(state="draining").set(draining)


def launch_controller(agents: dict[str, str], *, detached: bool = False, **options) -> ray.actor.ActorHandle:
    """Start (or find) the named controller actor; call ``start`` on it next."""
    lifetime = "detached" if detached else None
    # On the head node: it outlives worker nodes (GPU pods come and go with the autoscaler).
    return ControllerActor.options(name=CONTROLLER_ACTOR, namespace=RAY_NAMESPACE, lifetime=lifetime,
                                   get_if_exists=True, resources={HEAD_RESOURCE: 0.001}).remote(agents, **options)
