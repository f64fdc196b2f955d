"""One replica's engine: continuous batching timed by the cost model.

Each step decodes one token for every running sequence and spends the rest of the
token budget on prefill, FCFS, in chunks (vLLM V1's chunked prefill). A sequence's
first token comes at the end of the step that finishes its prefill.

Speed: decode-only stretches are simulated as one chunk of k identical steps, up to
the next sequence that finishes (k = its remaining tokens). The step time of the
chunk is taken at the batch's mean context over the chunk; decode is memory bound,
linear in context, so that mean is exact there. Progress is kept as one decode
counter per engine (a sequence stores the counter value at which it finishes), so a
chunk costs O(log n), not O(n). A sequence that arrives mid-chunk cuts the chunk at
the end of the step in progress: it joins at the next step boundary, as in vLLM.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from loadgen.sim.cost_model import CostModel

Schedule = Callable[[float, Callable[[float], None]], None]


class ContextWindowExceeded(ValueError):
    """vLLM's 400: the prompt plus max_tokens exceed the model's max_model_len."""


class Seq:
    __slots__ = ("sid", "prefill_left", "cached", "ctx", "output", "max_tokens", "arrived", "joined",
                 "finish_at", "on_first", "on_done")

    def __init__(self, sid: str, prefill: int, cached: int, output: int, arrived: float,
                 on_first: Callable[[float], None], on_done: Callable[[float], None],
                 max_tokens: int = 0) -> None:
        self.sid = sid
        self.max_tokens = max(output, max_tokens)  # what the request asked for
        self.prefill_left = prefill
        self.cached = cached  # KV already in HBM when the prefill starts
        self.ctx = cached  # KV tokens held so far
        self.output = output
        self.arrived = arrived
        self.joined = 0  # the decode counter when it joined decode
        self.finish_at = 0  # the decode counter at which its last token is out
        self.on_first = on_first
        self.on_done = on_done


class Engine:
    def __init__(self, replica: str, cost: CostModel, schedule: Schedule) -> None:
        self.replica = replica
        self.cost = cost
        self.budget = cost.profile.token_budget
        self.max_model_len = cost.profile.context_window
        self.max_seqs = cost.profile.max_num_seqs
        self._schedule = schedule
        self.prefilling: deque[Seq] = deque()
        self.decoding: list[tuple[int, int, Seq]] = []  # heap by finish counter
        self._tie = itertools.count()
        self.counter = 0  # decode steps done
        self.decode_ctx = 0  # sum of decoding sequences' contexts
        self._version = 0
        # The chunk in flight: start, steps, step time, prefill work [(seq, tokens)].
        self._chunk: tuple[float, int, float, list[tuple[Seq, int]]] | None = None
        self.busy_s = 0.0
        self.prefill_tokens = 0

    @property
    def running(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def add(self, seq: Seq, now: float) -> None:
        """Queue a call whose KV (``seq.cached`` tokens) is in HBM now. A call whose
        prompt + max_tokens exceed the context window is refused, as vLLM refuses it."""
        asked = seq.prefill_left + seq.cached + seq.max_tokens
        if asked > self.max_model_len:
            raise ContextWindowExceeded(
                f"{self.replica}: {seq.sid} asks for {asked} tokens (prompt + max_tokens); the "
                f"context window is {self.max_model_len}: compact the workload to it")
        self.prefilling.append(seq)
        if self._chunk is None:
            self._plan(now)
            return
        start, steps, step_t, prefill = self._chunk
        if prefill or steps == 1:
            return  # a single step: the newcomer is looked at when it ends
        done = int((now - start) / step_t) + 1  # steps ended by the end of the one in progress
        if done < steps:
            self._chunk = (start, done, step_t, prefill)
            self._version += 1
            version = self._version
            self._schedule(start + done * step_t, lambda t: self._step_done(t, version))

    def _step_done(self, now: float, version: int) -> None:
        if version != self._version or self._chunk is None:
            return  # a cut chunk's stale event
        start, steps, step_t, prefill = self._chunk
        self._chunk = None
        self.busy_s += now - start
        self.counter += steps
        self.decode_ctx += steps * len(self.decoding)
        for seq, tokens in prefill:
            seq.prefill_left -= tokens
            seq.ctx += tokens
            self.prefill_tokens += tokens
            if seq.prefill_left == 0:
                # A step prefills a head of the FCFS queue, and all but its last
                # sequence completely, so the finished ones leave from the front.
                self.prefilling.popleft()
                seq.on_first(now)
                if seq.output <= 1:
                    seq.on_done(now)
                    continue
                seq.ctx += 1
                seq.joined = self.counter
                seq.finish_at = self.counter + seq.output - 1
                self.decode_ctx += seq.ctx
                heapq.heappush(self.decoding, (seq.finish_at, next(self._tie), seq))
        while self.decoding and self.decoding[0][0] <= self.counter:
            _, _, seq = heapq.heappop(self.decoding)
            self.decode_ctx -= seq.ctx + self.counter - seq.joined
            seq.on_done(now)
        self._plan(now)

    def _plan(self, now: float) -> None:
        decode = len(self.decoding)
        prefill: list[tuple[Seq, int]] = []
        room = self.budget - decode
        seqs = decode
        for seq in self.prefilling:
            if room <= 0 or seqs >= self.max_seqs:
                break
            take = min(room, seq.prefill_left)
            prefill.append((seq, take))
            room -= take
            seqs += 1
        if prefill:
            tokens = sum(t for _, t in prefill)
            first = prefill[0][0]
            step_t = self.cost.step_time(tokens, decode, self.decode_ctx,
                                         prefill_context_tokens=first.ctx)
            steps = 1
        elif decode:
            steps = self.decoding[0][0] - self.counter
            mean_ctx = self.decode_ctx + decode * (steps - 1) // 2
            step_t = self.cost.step_time(0, decode, mean_ctx)
        else:
            return  # idle until a sequence arrives
        self._chunk = (now, steps, step_t, prefill)
        self._version += 1
        version = self._version
        self._schedule(now + steps * step_t, lambda t: self._step_done(t, version))
