"""The discrete-event loop: programs issue requests, a policy decides when and where
they run, engines run them. One ``Simulation`` is one policy on one workload.

Closed loop (MORI's protocol): every program sends its session's next call the
recorded gap after its previous call finished here, and starts its next session at
once when one ends. Open loop (``arrival="poisson"``): sessions start as a Poisson
process of ``rate`` per second, each replayed once by a fresh program.

Memory is equal by default: every policy gets the same off-GPU bytes per replica
(DRAM plus its share of the shared tier); a policy without a shared tier gets the
shared tier's bytes as DRAM, and the record says so (``memory``).

Links: each replica's PCIe and the one, cluster-wide network link of the shared tier
carry one copy at a time (``LinkQueue``); demotions hold them too. What is not
modelled (the same for every policy): a demotion frees HBM at once (the copy does not
delay it), the engine is never preempted. TTFT runs from the request's send to its
first token: gate wait, engine queue, KV transfer and prefill; the starvation metrics
(``loadgen.sim.metrics``) also count the waits still open at the end.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from loadgen.sim.cost_model import CostModel
from loadgen.sim.engine import Engine, Seq
from loadgen.sim.metrics import starvation
from loadgen.sim.policies import POLICIES, TICK_S, Cluster, SimModel
from loadgen.sim.workload import CallSpec, ProgramScript, SessionSpec, Workload

OCCUPANCY_SAMPLES = 120  # points of the tier-occupancy series per run


@dataclass(frozen=True)
class SimConfig:
    policy: str
    programs_per_replica: int
    replicas: int
    duration_s: float
    gpu_tokens: int  # per replica
    dram_tokens: int  # per replica
    shared_tokens: int | None = None  # cluster-wide; None: 4x total GPU KV
    seed: int = 0
    drain: bool = False  # after duration_s, send nothing new and run until idle
    arrival: str = "closed"  # "closed" (MORI's protocol) or "poisson"
    rate: float = 0.0  # sessions per second, cluster-wide, for "poisson"
    start_spread_s: float = 30.0  # closed loop: programs start uniformly over this
    equal_memory: bool = True  # a policy without a shared tier gets its bytes as DRAM

    def __post_init__(self) -> None:
        if self.programs_per_replica < 1 or self.replicas < 1:
            raise ValueError("programs_per_replica and replicas must be >= 1")
        if not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.arrival not in ("closed", "poisson"):
            raise ValueError(f"arrival must be 'closed' or 'poisson', got {self.arrival!r}")
        if self.arrival == "poisson" and not self.rate > 0:
            raise ValueError("--arrival poisson needs --rate > 0")
        POLICIES.get(self.policy)  # fail fast on an unknown name


@dataclass
class _Request:
    sid: str
    call: CallSpec
    sent: float
    program: "_Program"
    first_token: float | None = None
    launched: float | None = None  # when the policy let it run (its gate or queue wait ends)


@dataclass
class _Program:
    script: ProgramScript | None
    session: SessionSpec | None = None
    sid: str = ""
    index: int = 0  # the next call of the session
    output_tokens: int = 0  # produced over the run: the program's progress


@dataclass
class Metrics:
    issued: int = 0
    completed: int = 0
    issued_output_tokens: int = 0  # for conservation checks: equals output_tokens once drained
    issued_reuse_tokens: int = 0  # = reuse_hit_tokens + recompute_tokens once drained
    output_tokens: int = 0
    recompute_tokens: int = 0
    reuse_hit_tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # send -> launch, of launched requests
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)


class Simulation:
    def __init__(self, config: SimConfig, workload: Workload, cost: CostModel,
                 progress: Callable[[float], None] | None = None) -> None:
        self.config = config
        self.workload = workload
        self.cost = cost
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._progress = progress
        names = [f"r{i}" for i in range(config.replicas)]
        self.engines = {r: Engine(r, cost, self.schedule) for r in names}
        policy_class = POLICIES.get(config.policy)
        dram, shared, self.memory = _memory(config, policy_class)
        self.cluster = Cluster(names, config.gpu_tokens, dram, shared, cost, self._launch,
                               wake_at=lambda at: self.schedule(at, self.policy.tick))
        self.policy = policy_class(self.cluster)
        self.metrics = Metrics()
        self._pending: dict[str, _Request] = {}  # session -> its request in flight
        self._sessions = itertools.count()
        self._rng = random.Random(config.seed)
        self.programs: list[_Program] = []

    def schedule(self, at: float, action: Callable[[float], None]) -> None:
        heapq.heappush(self._events, (at, next(self._seq), action))

    # -- running ---------------------------------------------------------------

    def run(self) -> Metrics:
        config = self.config
        programs = config.programs_per_replica * config.replicas
        if config.arrival == "closed":
            for p in range(programs):
                program = _Program(self.workload.program_sessions(p, programs))
                self.programs.append(program)
                self.schedule(self._rng.uniform(0, config.start_spread_s), lambda t, pr=program: self._next_session(pr, t))
        else:
            self.schedule(self._rng.expovariate(config.rate), self._poisson)
        self.schedule(TICK_S, self._tick)
        step = config.duration_s / OCCUPANCY_SAMPLES
        for i in range(OCCUPANCY_SAMPLES + 1):
            self.schedule(i * step, self._sample)
        end = math.inf if config.drain else config.duration_s
        while self._events and self._events[0][0] <= end:
            at, _, action = heapq.heappop(self._events)
            self.now = at
            action(at)
        return self.metrics

    def _tick(self, now: float) -> None:
        self.policy.tick(now)
        if now < self.config.duration_s or self._pending:
            self.schedule(now + TICK_S, self._tick)
        if self._progress is not None:
            self._progress(min(now, self.config.duration_s))

    def _sample(self, now: float) -> None:
        self.metrics.samples.append((now, *self.policy.occupancy()))

    def _open_window(self, now: float) -> bool:
        return now < self.config.duration_s or not self.config.drain

    # -- programs ----------------------------------------------------------------

    def _poisson(self, now: float) -> None:
        if not self._open_window(now) or now > self.config.duration_s:
            return
        n = next(self._sessions)
        sessions = self.workload.sessions
        program = _Program(None, sessions[n % len(sessions)])
        self.programs.append(program)
        self._next_session(program, now)
        self.schedule(now + self._rng.expovariate(self.config.rate), self._poisson)

    def _next_session(self, program: _Program, now: float) -> None:
        if program.script is not None:
            if not self._open_window(now):
                return
            program.session = program.script.next_session()
        elif program.sid:
            return  # an open-loop program replays one session
        program.sid = f"{program.session.trace_id}#{next(self._sessions)}"
        program.index = 0
        self.policy.open(program.sid, now)
        self._send(program, now)

    def _send(self, program: _Program, now: float) -> None:
        if not self._open_window(now):
            self.policy.close(program.sid, now)
            return
        call = program.session.calls[program.index]
        request = _Request(program.sid, call, now, program)
        self._pending[program.sid] = request
        self.metrics.issued += 1
        self.metrics.issued_output_tokens += call.output_tokens
        self.metrics.issued_reuse_tokens += call.reuse_tokens
        self.policy.request(program.sid, now, call)

    def _launch(self, sid: str, replica: str, kv_tokens: int, transfer_s: float, now: float) -> None:
        request = self._pending[sid]
        request.launched = now
        self.metrics.waits.append(now - request.sent)
        call = request.call
        cached = min(call.reuse_tokens, kv_tokens)
        self.metrics.reuse_hit_tokens += cached
        self.metrics.recompute_tokens += call.reuse_tokens - cached
        # An engine prefills at least one token: the logits of the last prompt token.
        cached = min(cached, call.input_tokens - 1)
        seq = Seq(sid, call.input_tokens - cached, cached, call.output_tokens, request.sent,
                  lambda t, r=request: self._first_token(r, t), lambda t, r=request: self._done(r, t),
                  max_tokens=call.max_tokens)
        engine = self.engines[replica]
        if transfer_s > 0:
            self.schedule(now + transfer_s, lambda t: engine.add(seq, t))
        else:
            engine.add(seq, now)

    def _first_token(self, request: _Request, now: float) -> None:
        request.first_token = now
        self.metrics.ttft.append(now - request.sent)

    def _done(self, request: _Request, now: float) -> None:
        metrics = self.metrics
        if self._pending.pop(request.sid) is not request:
            raise AssertionError(f"{request.sid}: a request completed twice")
        metrics.completed += 1
        metrics.output_tokens += request.call.output_tokens
        request.program.output_tokens += request.call.output_tokens
        self.policy.finished(request.sid, now, request.call.need_tokens)
        program = request.program
        program.index += 1
        if program.index < len(program.session.calls):
            gap = program.session.calls[program.index].gap_s
            self.schedule(now + gap, lambda t: self._send(program, t))
        else:
            self.policy.close(program.sid, now)
            self._next_session(program, now)


def _memory(config: SimConfig, policy: SimModel) -> tuple[int, int, str]:
    """(DRAM tokens per replica, shared tokens, a note) the policy runs with."""
    # The comparison's shared tier, whichever policy runs: 4x the GPU KV by default.
    shared = 4 * config.gpu_tokens * config.replicas if config.shared_tokens is None else config.shared_tokens
    per_replica = config.dram_tokens + shared // config.replicas
    if not policy.uses_dram_tier:
        return 0, 0, "no off-GPU tier: its engines keep KV in HBM only"
    if policy.uses_shared_tier:
        return config.dram_tokens, shared, (f"DRAM {config.dram_tokens:,} tokens per replica + shared "
                                            f"{shared:,} tokens cluster-wide")
    if config.equal_memory and shared:
        return per_replica, 0, (f"no shared tier: its {shared:,} tokens given as DRAM, {per_replica:,} "
                                f"tokens per replica (equal memory)")
    return config.dram_tokens, 0, f"DRAM {config.dram_tokens:,} tokens per replica, no shared tier"


def summarize(config: SimConfig, metrics: Metrics, sim: Simulation) -> dict:
    """One JSON record of a run."""
    ttft = np.asarray(metrics.ttft) if metrics.ttft else np.zeros(1)
    duration = config.duration_s
    counters = sim.cluster.counters
    end = sim.now if config.drain else duration
    record = {
        "policy": config.policy,
        "simulated": True,
        "profile": sim.cost.profile.name,
        "context_window": sim.cost.profile.context_window,
        "programs_per_replica": config.programs_per_replica,
        "replicas": config.replicas,
        "duration_s": duration,
        "arrival": config.arrival,
        "seed": config.seed,
        "requests_completed": metrics.completed,
        "output_tokens_per_s": metrics.output_tokens / duration,
        "requests_per_s": metrics.completed / duration,
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        **starvation(metrics, list(sim._pending.values()), [p.output_tokens for p in sim.programs], end),
        "recompute_tokens": metrics.recompute_tokens,
        "reuse_hit_tokens": metrics.reuse_hit_tokens,
        "prefill_tokens": sum(e.prefill_tokens for e in sim.engines.values()),
        "engine_busy_fraction": sum(e.busy_s for e in sim.engines.values()) / (duration * config.replicas),
        "bytes_hbm_dram": counters.bytes_hbm_dram,
        "bytes_dram_shared": counters.bytes_dram_shared,
        "network_busy_fraction": sim.cluster.network.busy_s / duration,
        "memory": sim.memory,
        "capacity_tokens": {"gpu_per_replica": config.gpu_tokens, "dram_per_replica": sim.cluster.dram_tokens,
                            "shared": sim.cluster.shared_tokens},
        "occupancy": {
            "t_s": [s[0] for s in metrics.samples],
            "gpu_tokens": [s[1] for s in metrics.samples],
            "dram_tokens": [s[2] for s in metrics.samples],
            "shared_tokens": [s[3] for s in metrics.samples],
        },
    }
    return record
