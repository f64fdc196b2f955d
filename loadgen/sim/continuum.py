"""Continuum: KV time-to-live pinning after a tool call, program-level FCFS.

Source: Li et al., "Continuum: Efficient and Robust Multi-Turn LLM Agent Scheduling
with KV Cache Time-to-Live" (arXiv:2511.02230), and its released code
(github.com/Hanchenli/vllm-continuum, a vLLM fork). The paper picks the TTL from a
cost model over an empirical CDF of tool durations; the release, which we follow,
"runs without the estimation in the paper": ``estimate_with_func.py`` pins for a
fixed ``FIXED_THRESHOLD_CONTINUUM = 2.0`` s when the tool's mean observed duration
is at most that (or unknown: a cold start pins), and not at all otherwise.

Modelled on the vLLM engine of ``vllm-lru`` (prefix cache, LRU eviction, no
offload, no gating), with three changes:

- Pinning: when a call that asked for a tool finishes, its KV is pinned in HBM for
  the TTL; pinned KV is never evicted. The pin ends when the TTL runs out with no
  request of the program waiting, or when the program's next request is scheduled
  (a request that arrives while pinned keeps the pin through its queue wait, as the
  release's unpin needs both TTL expiry and the job absent from the waiting queue).
  An expired pin leaves the KV in the ordinary LRU cache.
- Program-level FCFS: the engine's waiting queue is ordered by the program's
  arrival (its session's first request), pinned programs first, not by the
  request's arrival.
- Deadlock fallback (the release's ``unpin_requests_regular``): when the head of
  the queue cannot fit and nothing runs, pins do not hold.

Deviation: the traces carry no tool names, so the mean tool duration is learned
per program from its own completed tool calls, not per tool name across programs.
"""

from __future__ import annotations

import itertools
import math

from loadgen.sim.lru import LruPolicy, LruReplica
from loadgen.sim.policies import POLICIES, Cluster
from loadgen.sim.workload import CallSpec

PIN_TTL_S = 2.0  # FIXED_THRESHOLD_CONTINUUM in vllm-continuum's estimate_with_func.py


@POLICIES.register("continuum")
class Continuum(LruPolicy):
    """Continuum as released: fixed 2 s TTL pins after tool calls whose tool is
    fast on average, program-level FCFS with pinned programs first (see the module
    docstring for the source and the one deviation)."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(cluster)
        self.pinned_until: dict[str, float] = {}  # math.inf: held until scheduled
        self.program_start: dict[str, float] = {}
        self.calls: dict[str, CallSpec] = {}  # the request in flight, per session
        self.tool_since: dict[str, float] = {}  # when its current tool call started
        self.tool_time: dict[str, tuple[float, int]] = {}  # (sum, count) of tool calls
        self.queue_key: dict[str, tuple] = {}
        self._order = itertools.count()

    def open(self, sid: str, now: float) -> None:
        super().open(sid, now)
        self.program_start[sid] = now

    def request(self, sid: str, now: float, call: CallSpec) -> None:
        started = self.tool_since.pop(sid, None)
        if started is not None:
            total, count = self.tool_time.get(sid, (0.0, 0))
            self.tool_time[sid] = (total + now - started, count + 1)
        until = self.pinned_until.pop(sid, None)
        if until is not None and until > now:
            self.pinned_until[sid] = math.inf  # pinned until scheduled
        self.calls[sid] = call
        super().request(sid, now, call)

    def finished(self, sid: str, now: float, context_tokens: int) -> None:
        call = self.calls.pop(sid)
        if call.tool_call:
            self.tool_since[sid] = now
            total, count = self.tool_time.get(sid, (0.0, 0))
            if count == 0 or total / count <= PIN_TTL_S:
                self.pinned_until[sid] = now + PIN_TTL_S
                self.cluster.wake_at(now + PIN_TTL_S)
        super().finished(sid, now, context_tokens)

    def close(self, sid: str, now: float) -> None:
        for table in (self.pinned_until, self.program_start, self.tool_since, self.tool_time):
            table.pop(sid, None)
        super().close(sid, now)

    def tick(self, now: float) -> None:
        for replica in self.replicas.values():
            self._drain(replica, now)

    def _enqueue(self, replica: LruReplica, sid: str, call: CallSpec, now: float) -> None:
        key = (sid not in self.pinned_until, self.program_start[sid], next(self._order))
        self.queue_key[sid] = key
        for index, (other, _) in enumerate(replica.queue):
            if key < self.queue_key[other]:
                replica.queue.insert(index, (sid, call))
                return
        replica.queue.append((sid, call))

    def _evictable(self, replica: LruReplica, sid: str, now: float) -> bool:
        if not replica.running:
            return True  # nothing runs that could free room: pins would deadlock
        return self.pinned_until.get(sid, -math.inf) <= now

    def _started(self, replica: LruReplica, sid: str, now: float) -> None:
        self.pinned_until.pop(sid, None)
        self.queue_key.pop(sid, None)
