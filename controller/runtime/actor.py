"""The controller: ``Controller``, its API as a plain asyncio class over ``LiveController`` (the
books and the planner) and ``Membership`` (the replicas and node agents), and
``ControllerActor``, its Ray shell.

The actor is named ``CONTROLLER_ACTOR`` in namespace ``RAY_NAMESPACE`` (detached when
asked), so the gateway and the engine replicas find it with ``ray.get_actor``. ``start``
reads back the membership a previous controller left (``runtime.ray_cluster.GcsStore``),
rebuilds the books from every node agent's occupancy report (a restarted controller loses
only idleness history), aborts the moves a previous controller left prepared, and starts
the backstop tick, the membership check, the books' reconciliation (``runtime.reconcile``)
and the published scaling signals.

Restartable: Ray restarts a killed controller (``max_restarts``) by running ``__init__``
again with the same arguments; the restarted actor starts itself. Until ``start`` is
done, every call but ``start`` raises ``ControllerNotStarted``, so no call runs against
empty books; callers wait and call again.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from dataclasses import asdict, dataclass

import ray

from controller.autoscale import signals
from controller.policy import DEFAULT_CYCLES, Location, Phase, PlannerConfig, Tier
from controller.runtime.live import LiveController
from controller.runtime.membership import Membership, Replica
from controller.runtime.metrics import gauge_gpu_tiers_forever, session_on_arrival
from controller.runtime.mover import GrpcMover
from controller.runtime.reconcile import Reconciler
from controller.runtime.restore import reports_for_restart
from controller.runtime.ray_cluster import GcsStore, RayCluster
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE

log = logging.getLogger(__name__)
HEAD_RESOURCE = "node:__internal_head__"  # Ray's own resource of the head node
RESTART_REPORT_S = 3.0  # how long a restarting controller waits for a node agent to answer (restore.reports_for_restart)


class ControllerNotStarted(RuntimeError):
    """The controller (re)started and has not rebuilt its books yet: call again shortly."""


@dataclass(frozen=True)
class Admitted:
    """``admit``'s answer: where and how the call runs, and the session as it arrived (which
    the gateway's metrics label by: its tier, ``NEW_SESSION`` for an unseen one, and the KV
    tokens a reuse could cover)."""

    replica_id: str
    tier_label: str  # the engine request's tier: "gpu" holds KV in HBM after the call
    waited_s: float  # gated time, on the controller's clock
    arrival_tier: str
    arrival_context_tokens: int


class Controller:
    """What the gateway and the engine replicas call; see ``LiveController`` for the
    semantics of the session calls and ``Membership`` for the replica calls."""

    def __init__(self, live: LiveController, membership: Membership | None = None, *,
                 planner_config: PlannerConfig | None = None, started: bool = True) -> None:
        """``membership`` None: an in-process controller whose replicas are added to ``live``
        directly (replica calls then raise). ``planner_config``: ``live``'s, for a policy switch."""
        self.controller, self.planner_config = live, planner_config
        self.membership = membership
        if membership is not None:
            membership.on_change = self._gauge_replicas
        self._started = started
        self._granted: dict[str, str | None] = {}  # session -> the ticket of its admitted call (`withdraw`)

    def _ready(self) -> None:
        if not self._started:
            raise ControllerNotStarted("the controller is restarting and rebuilds its books; call again shortly")

    def _members(self) -> Membership:
        self._ready()
        if self.membership is None:
            raise RuntimeError("this controller has no replica membership; add replicas to its LiveController")
        return self.membership

    # -- replicas (engine replicas call these) -------------------------------------------------

    async def register_replica(self, replica_id: str, node_id: str, gpu_tokens: int, dram_tokens: int,
                               actor_name: str) -> None:
        await self._members().register(Replica(replica_id, node_id, gpu_tokens, dram_tokens, actor_name))

    async def deregister_replica(self, replica_id: str) -> dict | None:
        """Drain the replica, then forget it; the drain's report, None for an unknown replica."""
        report = await self._members().deregister(replica_id)
        return None if report is None else asdict(report)

    async def replicas(self) -> list[dict]:
        return [asdict(r) for r in self._members().replicas.values()]

    async def drain_reports(self) -> list[dict]:
        """The latest drains' reports, oldest first."""
        return [asdict(r) for r in self._members().drained.values()]

    async def agent_nodes(self) -> list[str]:
        return sorted(self._members().agents.addresses)

    # -- sessions (the gateway calls these) -----------------------------------------------------

    async def admit(self, session_id: str, tenant: str, prompt_tokens: int, max_tokens: int,
                    timeout_s: float, ticket: str | None = None) -> Admitted:
        """Wait until the call may run (``LiveController.admit``: a call of a session whose
        previous call runs or waits waits for it first); records the session's idleness as
        the call's turn comes and answers with its tier and context then.

        Cancellation (the gateway's caller left: ``ray.cancel`` on this call's ref) withdraws
        the call, or gives back the reservation of a call admitted just before; the ref then
        raises TaskCancelledError. But Ray also answers TaskCancelledError for a call that
        had already run to its end, admitted: a caller who cancelled cannot tell, so it
        hands the call back by its ``ticket`` (``withdraw``). A caller that got an
        ``Admitted`` and will not run the call reports ``call_failed(session_id, started=False)``."""
        self._ready()
        live, arrival = self.controller, {}

        def on_turn() -> None:
            tier, context_tokens, idleness = arrival["at"] = session_on_arrival(live, session_id)
            if idleness is not None and "lull:session_idleness" in live.metrics:
                live.metrics["lull:session_idleness"].labels(tier=tier).observe(idleness)

        admission = await live.admit(session_id, tenant, prompt_tokens, max_tokens, timeout_s, on_turn)
        self._granted[session_id] = ticket  # (None: this call has no ticket to withdraw it by)
        tier, context_tokens, _ = arrival["at"]
        return Admitted(admission.replica_id, admission.tier_label, admission.waited_s, tier, context_tokens)

    async def call_finished(self, session_id: str, context_tokens: int, close: bool = False) -> None:
        """The call ended with ``context_tokens`` of KV; ``close``: the session ends with it (a one-off)."""
        self._ready()
        self._granted.pop(session_id, None)
        self.controller.call_finished(session_id, context_tokens)
        if close:
            self.controller.close_session(session_id)

    async def call_failed(self, session_id: str, lost_replica: str | None = None, dead: bool = False,
                          started: bool = True) -> None:
        """The call failed. ``lost_replica``: its replica died (``dead``: the caller was told so)
        or became unreachable under it, so membership looks at once, and a dead replica is
        drained or removed before the call is retried. ``started`` False: the admitted call
        never reached an engine (its caller left): its reservation is given back whole."""
        self._ready()
        self._granted.pop(session_id, None)
        try:
            self.controller.call_failed(session_id, started)
        finally:
            if lost_replica is not None and self.membership is not None:
                await self.membership.lost(lost_replica, dead)

    async def withdraw(self, session_id: str, ticket: str) -> bool:
        """The caller of the admit with ``ticket`` left: if that call was admitted and is still
        booked as running, it never reached an engine, and its reservation goes back whole.
        Whether it was; idempotent (a later call of the session has another ticket)."""
        self._ready()
        record = self.controller.state.sessions.get(session_id)
        if not ticket or self._granted.get(session_id) != ticket or record is None or record.phase is not Phase.LLM:
            return False
        await self.call_failed(session_id, started=False)
        return True

    async def tool_call_started(self, session_id: str) -> None:
        self._ready()
        self.controller.tool_call_started(session_id)

    async def tool_call_finished(self, session_id: str) -> None:
        self._ready()
        self.controller.tool_call_finished(session_id)

    async def close_session(self, session_id: str) -> None:
        self._ready()
        self.controller.close_session(session_id)

    async def session_state(self, session_id: str) -> dict | None:
        """The session's entry of ``snapshot``, or None for a session the controller does not know."""
        self._ready()
        return self.controller.session_state(session_id)

    async def snapshot(self) -> dict:
        self._ready()
        return self.controller.snapshot()

    async def plan_step(self) -> None:
        self._ready()
        await self.controller.plan_step()

    async def set_shared_capacity(self, tokens: int) -> None:
        self._ready()
        self.controller.set_shared_capacity(tokens)

    async def set_policy(self, policy: str, tick_s: float | None = None, dram_tokens: int | None = None) -> None:
        """Switch to ``policy`` between benchmark runs (``lull bench --policy a,b``): a fresh
        ``LiveController`` over the same replicas, capacities and mover. Only on empty books:
        a session's KV placement is the old policy's decision and cannot be handed over.
        ``tick_s``: the backstop tick from now on (a replay with scaled time scales it too);
        None keeps it. ``dram_tokens``: the DRAM tokens booked on every replica under this
        policy (a benchmark holding every policy's off-GPU bytes equal); None: each
        replica's registered capacity."""
        old = self.controller
        snap = old.snapshot()
        if snap["sessions"] or snap["gated"]:
            raise ValueError(f"cannot switch policy with {len(snap['sessions'])} session(s) open; close them first")
        if tick_s is not None and not tick_s > 0:
            raise ValueError(f"tick_s must be > 0, got {tick_s!r}")
        if dram_tokens is not None and (type(dram_tokens) is not int or dram_tokens < 0):
            raise ValueError(f"dram_tokens must be an integer >= 0, got {dram_tokens!r}")
        new = LiveController(old.mover, policy=policy, planner_config=self.planner_config,
                             idleness_window=old.idleness_window, metrics=old.metrics,
                             session_ttl_s=old.session_ttl_s, block_tokens=old.block_tokens)
        registered = self.membership.replicas if self.membership is not None else {}
        for replica_id, node_id in old.nodes.items():
            dram = dram_tokens
            if dram is None:
                known = registered.get(replica_id)
                dram = known.dram_tokens if known is not None else old.capacity[Location(Tier.DRAM, replica_id)]
            new.add_replica(replica_id, node_id, old.capacity[Location(Tier.GPU, replica_id)], dram)
        new.set_shared_capacity(old.capacity[Location(Tier.SHARED)])
        self.controller = new
        if tick_s is not None:
            self.tick_s = tick_s
        self._policy_switched(old, new)
        log.info("policy switched from %s to %s", old.policy_name, policy)

    def _policy_switched(self, old: LiveController, new: LiveController) -> None:
        """The Ray shell moves its tick to the new books."""

    def _gauge_replicas(self) -> None:
        if "lull:replicas" in self.controller.metrics:  # replicas registered with the controller
            draining = len(self.controller.draining)
            self.controller.metrics["lull:replicas"].labels(state="running").set(len(self.controller.nodes) - draining)
            self.controller.metrics["lull:replicas"].labels(state="draining").set(draining)


@ray.remote(num_cpus=0, max_concurrency=1000, max_restarts=-1)
class ControllerActor(Controller):
    def __init__(self, agents: dict[str, str], *, policy: str = "lull", planner_config: PlannerConfig | None = None,
                 tick_s: float = 5.0, idleness_window: int = DEFAULT_CYCLES, bytes_per_token: int = 0,
                 metrics: bool = False, shared_tokens: int = 0, start_agent=None, session_ttl_s: float = 0.0,
                 reconcile_s: float = 30.0, block_tokens: int = 1) -> None:
        """``agents``: node id -> address of the agents started with the platform; ``start_agent``:
        the assembly's ``node id -> agent actor handle``, for nodes that join later; ``reconcile_s``:
        the books' periodic reconciliation (``runtime.reconcile``; 0: only after a Redis restart);
        ``block_tokens``: the engines' KV block size (the books count whole blocks)."""
        from proto.telemetry.metrics import make_metrics
        from proto.telemetry.tracing import setup_tracing

        setup_tracing("lull-controller")  # KV move spans; exports only when OTEL_* ask for it
        self._options = dict(agents=dict(agents), policy=policy, planner_config=planner_config, tick_s=tick_s,
                             idleness_window=idleness_window, bytes_per_token=bytes_per_token, metrics=metrics,
                             shared_tokens=shared_tokens, start_agent=start_agent, session_ttl_s=session_ttl_s,
                             reconcile_s=reconcile_s, block_tokens=block_tokens)
        self.shared_tokens, self.tick_s, self.bytes_per_token = shared_tokens, tick_s, bytes_per_token
        self.reconcile_s = reconcile_s
        self.mover = GrpcMover(agents, bytes_per_token=bytes_per_token)
        live = LiveController(self.mover, policy=policy, planner_config=planner_config, idleness_window=idleness_window,
                              metrics=make_metrics() if metrics else None,  # the process's registry
                              session_ttl_s=session_ttl_s, block_tokens=block_tokens)
        membership = Membership(lambda: self.controller, self.mover, RayCluster(start_agent), GcsStore())
        super().__init__(live, membership, planner_config=planner_config, started=False)
        self._start_lock = asyncio.Lock()
        self._tasks: dict[str, asyncio.Task] = {}
        with warnings.catch_warnings():  # Ray's own property reads a deprecated one
            warnings.simplefilter("ignore", DeprecationWarning)
            restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if restarted:  # nobody else will: the gateway and the engines only call
            self._tasks["restart"] = asyncio.get_running_loop().create_task(self.start(None))

    async def start(self, shared_tokens: int | None = None) -> int:
        """Read back the membership, rebuild from the agents' reports, start the loops. Returns
        the sessions restored. Idempotent: on a started controller it only sets the shared
        capacity (``shared_tokens`` None keeps it) and restores 0."""
        async with self._start_lock:
            if shared_tokens is not None or not self._started:
                self.shared_tokens = self.shared_tokens if shared_tokens is None else shared_tokens
                self.controller.set_shared_capacity(self.shared_tokens)
            if self._started:
                return 0
            replicas = await self.membership.restore()
            reports = await reports_for_restart(self.mover, RESTART_REPORT_S)
            restored = self.controller.rebuild(reports, bytes_per_token=self.bytes_per_token or None)
            self._start_loops()
            self._started = True
            log.info("controller started: %d replicas, %d sessions restored", len(replicas), len(restored))
            return len(restored)

    def _start_loops(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks["tick"] = loop.create_task(self.controller.run(self.tick_s))
        self._tasks["signals"] = loop.create_task(self._publish_signals_forever())
        self._tasks["membership"] = loop.create_task(self.membership.watch())
        reconciler = Reconciler(lambda: self.controller, self.mover)  # set_policy swaps the books: read them each time
        self._tasks["reconcile"] = loop.create_task(reconciler.run(self.reconcile_s))
        if self.controller.metrics and self.bytes_per_token:  # set_policy swaps the controller: read it each time
            self._tasks["gauges"] = loop.create_task(gauge_gpu_tiers_forever(lambda: self.controller,
                                                                             self.bytes_per_token))

    def _policy_switched(self, old: LiveController, new: LiveController) -> None:
        if "tick" in self._tasks:
            self._tasks["tick"].cancel()
            self._tasks["tick"] = asyncio.get_running_loop().create_task(new.run(self.tick_s))

    async def launch_options(self) -> dict:
        """What a new controller is launched with, should this one be killed for good."""
        return {**self._options, "shared_tokens": self.shared_tokens}

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


def launch_controller(agents: dict[str, str], *, detached: bool = False, **options) -> ray.actor.ActorHandle:
    """Start (or find) the named controller actor; call ``start`` on it next."""
    lifetime = "detached" if detached else None
    # On the head node: it outlives worker nodes (GPU pods come and go with the autoscaler).
    return ControllerActor.options(name=CONTROLLER_ACTOR, namespace=RAY_NAMESPACE, lifetime=lifetime,
                                   get_if_exists=True, resources={HEAD_RESOURCE: 0.001}).remote(agents, **options)
