"""The engine deployment's Serve autoscaling policy: ``decide`` fed with the controller's signals.

Serve calls ``LullEnginePolicy(ctx)`` on every pass of its control loop (Serve's custom
autoscaling policy API) and sets the engine deployment's replica count to what it
returns, so on Kubernetes Ray's autoscaler adds and removes the GPU worker pods that
count needs. The policy reads the Lull controller's latest published signals
(``signals``), builds a ``ScalingSnapshot`` from them and from Serve's own view of
the running replicas, and keeps ``decide``'s state in Serve's ``policy_state``.

Serve, not the policy, chooses which replica stops on a scale-down. Whichever it is,
its sessions are not lost: the replica's destructor (``LullEngine.__del__``) deregisters
it, the controller drains it to the shared tier (``controller.runtime.drain``), and
Serve's graceful shutdown waits for that.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from controller.autoscale import signals as published
from controller.autoscale.policy import AutoscaleSettings, ReplicaLoad, ScalerState, ScalingSnapshot, decide

log = logging.getLogger("ray.serve")
POLICY_PATH = "controller.autoscale.serve_policy:LullEnginePolicy"
STATE_KEY = "lull"


def snapshot_from(running_ids: list[str], serve_target: int, signals: dict, now: float) -> ScalingSnapshot:
    """What ``decide`` sees: Serve's running replicas with the controller's view of their GPU
    tier. A running replica the controller has not registered yet counts as starting, like
    the replicas Serve has yet to start (its target above those running)."""
    loads = {r["name"]: r for r in signals["replicas"]}
    running = tuple(ReplicaLoad(**loads[i]) for i in running_ids if i in loads)
    unregistered = sum(1 for i in running_ids if i not in loads)
    return ScalingSnapshot(
        now=now, running=running, starting=max(0, serve_target - len(running_ids)) + unregistered,
        draining=signals["draining"], gate_waits_s=tuple(signals["gate_waits_s"]),
        waiting_sessions=signals["waiting_sessions"])


class GpuCap:
    """On Kubernetes: the engine replicas the GPU nodes can hold (``kube.read_gpu_capacity``
    over the worker group's node selector), read at most every ``refresh_s``. A failed
    read logs once and leaves the cap unknown (None): the bounds alone apply."""

    def __init__(self, node_selector: str, gpus_per_replica: int = 1, gpus_per_pod: int = 1,
                 refresh_s: float = 60.0, core_api=None) -> None:
        self.node_selector, self.refresh_s = node_selector, refresh_s
        self.gpus_per_replica, self.gpus_per_pod = gpus_per_replica, gpus_per_pod
        self._core, self._read_at, self._cap, self._failing = core_api, float("-inf"), None, False

    def __call__(self, now: float) -> int | None:
        if now - self._read_at < self.refresh_s:
            return self._cap
        self._read_at = now
        try:
            from controller.autoscale.kube import read_gpu_capacity

            capacity = read_gpu_capacity(self._api(), self.node_selector)
            self._cap = capacity.replica_cap(self.gpus_per_replica, self.gpus_per_pod)
            self._failing = False
        except Exception as error:  # no API server, no RBAC: the cap is unknown, not zero
            if not self._failing:
                log.warning("Lull autoscaler cannot read GPU node capacity (%s: %s)", type(error).__name__, error)
            self._failing, self._cap = True, None
        return self._cap

    def _api(self):
        if self._core is None:
            from kubernetes import client, config

            config.load_incluster_config()
            self._core = client.CoreV1Api()
        return self._core


class LullEnginePolicy:
    """Serve instantiates it once with ``policy_kwargs``: ``AutoscaleSettings`` fields, and
    ``kube`` (``GpuCap`` arguments) on Kubernetes."""

    def __init__(self, kube: dict | None = None, **settings) -> None:
        self.settings = AutoscaleSettings(**settings)
        self.gpu_cap = GpuCap(**kube) if kube else None
        self._warned_stale = False

    def __call__(self, ctx) -> tuple[int, dict]:
        state = dict(ctx.policy_state)
        now = time.time()
        signals = published.read()
        if not published.fresh(signals, now):
            if not self._warned_stale:
                log.warning("no fresh scaling signals from the Lull controller; holding %d engine replicas",
                            ctx.target_num_replicas)
                self._warned_stale = True
            return ctx.target_num_replicas, state
        self._warned_stale = False
        running = [r.unique_id for r in ctx.running_replicas]
        snap = snapshot_from(running, ctx.target_num_replicas, signals, now)
        if self.gpu_cap is not None:
            snap = dataclasses.replace(snap, gpu_replica_cap=self.gpu_cap(now))
        try:
            decision, scaler = decide(snap, ScalerState(**state.get(STATE_KEY, {})), self.settings)
        except ValueError as error:  # the wall clock stepped back: start the windows afresh
            log.warning("Lull autoscaler reset its state: %s", error)
            decision, scaler = decide(snap, ScalerState(), self.settings)
        state[STATE_KEY] = dataclasses.asdict(scaler)
        if decision.changes:
            log.info("Lull autoscaler: %d -> %d engine replicas (%s: %s)", snap.replicas, decision.target,
                     decision.reason.value, decision.detail)
            published.publish(dict(at=now, before=snap.replicas, target=decision.target,
                                   reason=decision.reason.value, detail=decision.detail), published.DECISION_KEY)
        return decision.target, state


def engine_autoscaling_config(min_replicas: int, max_replicas: int, initial: int,
                              settings: AutoscaleSettings, kube: dict | None = None) -> dict:
    """The engine deployment's ``autoscaling_config``: Serve keeps its bounds; its own
    delays are off, since ``decide`` has its windows and cooldown. ``kube``: ``GpuCap``'s
    arguments, to cap the count at what the GPU nodes hold."""
    kwargs = dataclasses.asdict(dataclasses.replace(settings, min_replicas=min_replicas, max_replicas=max_replicas))
    if kube:
        kwargs["kube"] = kube
    return dict(min_replicas=min_replicas, max_replicas=max_replicas, initial_replicas=initial,
                upscale_delay_s=0.0, downscale_delay_s=0.0,
                policy=dict(policy_function=POLICY_PATH, policy_kwargs=kwargs))
