"""ThunderAgent: program-aware admission in front of vLLM engines; TA+O adds DRAM.

Source: Kang et al., "ThunderAgent: A Simple, Fast and Program-Aware Agentic
Inference System" (arXiv:2602.13692), and its router
(github.com/ThunderAgent-org/ThunderAgent, ``ThunderAgent/scheduler/router.py`` and
``backend/state.py``), which this follows:

- A program is ACTING (in a tool call) or REASONING (a request in flight), and
  ACTIVE or PAUSED. A backend counts the tokens of its active programs (each
  one's last known context) plus ``BUFFER_PER_PROGRAM = 100`` per program against
  its KV capacity.
- Every ``scheduler_interval = 5`` s: first resume, then pause.
  Pause (``_pause_until_safe``), while a backend is over capacity: ACTING programs,
  smallest context first; then REASONING ones are marked, smallest first, and
  paused when their call ends. A mark does not lower the overflow the loop reads
  (``remaining_capacity`` leaves ``future_paused_tokens`` out), so once the ACTING
  ones are gone every unmarked REASONING program on that backend is marked, and
  marked ones still count as active at the next check. A paused program's next
  request waits in the global waiting queue. Nothing is offloaded: the engine keeps
  or evicts the paused program's KV by its own LRU.
  Resume (``_greedy_resume``): waiting programs in priority order (programs on their
  first step, ``step_count == 1``, after those with a request, then the rest;
  smallest context first in each) while their sum fits the cluster's remaining
  capacity, where ACTING tokens count ``2^-t`` after t seconds in the tool call
  (``remaining_capacity_with_decay``: the paper's design, §4.3.1; the repository
  has it behind ``--use-acting-token-decay``); then placed best-fit-decreasing, the
  largest on the backend with the most room. The queue is node-agnostic: a
  program may resume on another backend (its KV there is recomputed).
  A request that waited ``1800`` s is resumed regardless (``_wait_for_resume``),
  on its old backend, or a new program on the one with the fewest programs.
- A new program is placed at once on the backend with the fewest active tokens
  among those with room for it, if nobody waits in the global queue; else it queues.

Under the admission layer each backend is the ``vllm-lru`` engine model (prefix
cache, LRU, FCFS queue); ``ta-offload`` (MORI's TA+O baseline) swaps in the
engine model ``lru-offload`` runs on: write-through to the node's DRAM, LRU at both tiers.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadgen.sim.lru import LruPolicy
from loadgen.sim.policies import POLICIES, Cluster
from loadgen.sim.workload import CallSpec

BUFFER_PER_PROGRAM = 100  # tokens of decode headroom per active program (backend/state.py)
RESUME_TIMEOUT_S = 1800.0  # _wait_for_resume forces a resume after this long


@dataclass(slots=True)
class _Program:
    tokens: int = 0  # last known context (the request's prompt while it runs)
    acting_since: float | None = None  # None: REASONING (or not started)
    backend: str | None = None  # None while paused or before placement
    marked: bool = False  # REASONING, to be paused when its call ends
    pending: CallSpec | None = None  # a request held while paused
    waiting_since: float | None = None  # when the held request began to wait
    started: bool = False  # has had a request placed
    steps: int = 0  # requests made (the router's step_count)


@POLICIES.register("thunderagent")
class ThunderAgent(LruPolicy):
    """ThunderAgent's program scheduler over vLLM engines with prefix caching and
    no offload (see the module docstring for the source)."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        self.programs: dict[str, _Program] = {}
        self.waiting: dict[str, None] = {}  # the global waiting queue, in arrival order

    # -- events --------------------------------------------------------------------

    def open(self, sid: str, now: float) -> None:
        self.programs[sid] = _Program()

    def request(self, sid: str, now: float, call: CallSpec) -> None:
        program = self.programs[sid]
        program.acting_since = None
        program.steps += 1
        program.tokens = call.input_tokens  # the router's estimate from the payload
        if not program.started:
            backend = self._place_new(program, now)
            if backend is None:
                program.pending, program.waiting_since = call, now
                self._pause(sid, program, now)
                return
            program.started = True
            self._settle(sid, backend)
        if program.backend is None:
            program.pending, program.waiting_since = call, now  # paused: wait to be resumed
            return
        super().request(sid, now, call)

    def finished(self, sid: str, now: float, context_tokens: int) -> None:
        program = self.programs[sid]
        program.tokens = context_tokens
        program.acting_since = now
        super().finished(sid, now, context_tokens)
        if program.marked:
            program.marked = False
            self._pause(sid, program, now)

    def close(self, sid: str, now: float) -> None:
        self.programs.pop(sid)
        self.waiting.pop(sid, None)
        if sid in self.home:
            super().close(sid, now)

    def tick(self, now: float) -> None:
        self._resume(now)
        remaining = self._remaining(now, decay=False)
        for name, room in remaining.items():
            if room < 0:
                self._pause_until_safe(name, -room, now)

    # -- accounting ----------------------------------------------------------------

    def _remaining(self, now: float, decay: bool) -> dict[str, float]:
        """Each backend's KV capacity less its active programs' tokens and buffers;
        with ``decay``, ACTING tokens weigh 2^-t after t seconds in the tool call."""
        remaining = dict.fromkeys(self.replicas, float(self.cluster.gpu_tokens))
        for program in self.programs.values():
            if program.backend is None:
                continue
            weight = 1.0
            if decay and program.acting_since is not None:
                weight = 2.0 ** -(now - program.acting_since)
            remaining[program.backend] -= program.tokens * weight + BUFFER_PER_PROGRAM
        return remaining

    def _place_new(self, program: _Program, now: float) -> str | None:
        if self.waiting:
            return None  # fairness: queue behind the waiting programs
        remaining = self._remaining(now, decay=False)
        roomy = [r for r in self.replicas if remaining[r] >= program.tokens + BUFFER_PER_PROGRAM]
        active = self._active_tokens()
        return min(roomy, key=lambda r: (active[r], r)) if roomy else None

    def _active_tokens(self) -> dict[str, int]:
        active = dict.fromkeys(self.replicas, 0)
        for program in self.programs.values():
            if program.backend is not None:
                active[program.backend] += program.tokens
        return active

    # -- pause and resume ------------------------------------------------------------

    def _pause(self, sid: str, program: _Program, now: float) -> None:
        program.backend = None
        self.waiting[sid] = None

    def _pause_until_safe(self, backend: str, over: float, now: float) -> None:
        mine = [(p.tokens, sid, p) for sid, p in self.programs.items() if p.backend == backend]
        acting = sorted(item for item in mine if item[2].acting_since is not None)
        reasoning = sorted(item for item in mine if item[2].acting_since is None and not item[2].marked)
        for tokens, sid, program in acting:
            if over <= 0:
                return
            self._pause(sid, program, now)
            over -= tokens + BUFFER_PER_PROGRAM
        for _, _, program in reasoning:  # a mark does not lower ``over`` (see the module doc): all
            program.marked = True

    def _resume(self, now: float) -> None:
        overdue = [sid for sid in self.waiting
                   if self.programs[sid].pending is not None
                   and now - self.programs[sid].waiting_since >= RESUME_TIMEOUT_S]
        for sid in overdue:
            self._wake(sid, self.home[sid].name if sid in self.home else self._fewest_programs(), now)
        if not self.waiting:
            return
        rooms = {name: room for name, room in self._remaining(now, decay=True).items()
                 if room > BUFFER_PER_PROGRAM}
        if not rooms:
            return

        def group(sid: str) -> int:
            program = self.programs[sid]
            if program.steps <= 1:
                return 1  # a new program (its first step), with a request or not
            return 0 if program.pending is not None else 2

        order = sorted(self.waiting, key=lambda sid: (group(sid), self.programs[sid].tokens))
        total = sum(rooms.values())
        chosen, used = [], 0
        for sid in order:
            need = self.programs[sid].tokens + BUFFER_PER_PROGRAM
            if used + need <= total:
                chosen.append(sid)
                used += need
        chosen.sort(key=lambda sid: -self.programs[sid].tokens)
        for sid in chosen:
            if not rooms:
                return
            name = max(rooms, key=lambda r: (rooms[r], r))
            need = self.programs[sid].tokens + BUFFER_PER_PROGRAM
            if need > rooms[name]:
                continue
            self._wake(sid, name, now)
            rooms[name] -= need
            if rooms[name] <= BUFFER_PER_PROGRAM:
                del rooms[name]

    def _fewest_programs(self) -> str:
        count = dict.fromkeys(self.replicas, 0)
        for program in self.programs.values():
            if program.backend is not None:
                count[program.backend] += 1
        return min(count, key=lambda r: (count[r], r))

    def _wake(self, sid: str, backend: str, now: float) -> None:
        program = self.programs[sid]
        del self.waiting[sid]
        program.waiting_since = None
        program.started = True
        self._settle(sid, backend)
        call, program.pending = program.pending, None
        if call is not None:
            super().request(sid, now, call)

    def _settle(self, sid: str, backend: str) -> None:
        """Make ``backend`` the program's replica. KV it left on another replica's
        HBM or DRAM is of no use there any more: freed."""
        self.programs[sid].backend = backend
        old = self.home.get(sid)
        if old is not None and old.name == backend:
            return
        if old is not None:
            old.sessions -= 1
            old.hbm_used -= old.idle.pop(sid, 0)
            old.dram_used -= old.dram.pop(sid, 0)
        replica = self.replicas[backend]
        replica.sessions += 1
        self.home[sid] = replica


@POLICIES.register("ta-offload")
class ThunderAgentOffload(ThunderAgent):
    """TA+O (MORI's baseline): ThunderAgent's scheduler over vLLM + LMCache
    engines, whose finished calls' KV is written through to the node's DRAM, LRU
    at both tiers; a resumed program on its old replica loads from DRAM."""

    offload = True
    uses_dram_tier = True
