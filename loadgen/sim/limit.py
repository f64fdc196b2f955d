"""The throughput limit of a simulated workload, computed rather than simulated.

No policy can produce more output tokens in ``duration_s`` than this bound, whatever it
does with KV: the bound assumes every call finds all the KV it could reuse, costs only
what no schedule can avoid, and waits for nothing. It is the least of three figures:

- **Demand.** Each closed-loop program runs its sessions' calls in order, each after its
  traced gap. A call cannot take less than its prefill in the fewest steps (chunks of the
  token budget, each at least its linear layers or its weight reads, plus the step's
  fixed costs; no attention counted) plus one single-sequence decode step per further
  output token, at its starting context. Calls that would finish by
  ``duration_s`` at that pace are the only ones any policy can complete (the simulator
  counts completed calls); their output is the demand bound.
- **Compute.** Each engine step costs at least its FLOPs at ``mfu`` plus its fixed
  overhead. A call's unavoidable FLOPs: the linear layers over its new prompt tokens and
  its output tokens, one logit row per decoded token, and decode attention over its
  context (prefill attention and the prefill's logit row are left out: the simulator
  prices a batched prefill chunk at its first sequence's context and gives it one row).
- **Memory.** Each step streams the weights at ``mbu`` and pays its overhead, and a
  step decodes at most ``max_num_seqs`` sequences, so every ``max_num_seqs`` output
  tokens cost at least one step; each decode token also reads its context's KV.

Compute and memory are each a fractional knapsack over the calls demand allows (the
engines' time, ``replicas x duration_s``, is the sack; a call's value is its output):
taking the calls with the most output per second first is optimal for one constraint,
and the lesser of the two is still a bound. Pure: no simulation runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from loadgen.sim.cost_model import CostModel
from loadgen.sim.workload import CallSpec, Workload


@dataclass(frozen=True)
class Limit:
    output_tokens_per_s: float  # the bound: the least of the three below
    demand_tokens_per_s: float
    compute_tokens_per_s: float
    memory_tokens_per_s: float

    @property
    def binding(self) -> str:
        """Which of demand, compute and memory sets the bound."""
        figures = {"demand": self.demand_tokens_per_s, "compute": self.compute_tokens_per_s,
                   "memory": self.memory_tokens_per_s}
        return min(figures, key=figures.__getitem__)


def throughput_limit(workload: Workload, cost: CostModel, programs: int, replicas: int,
                     duration_s: float) -> Limit:
    """The bound for ``programs`` closed-loop programs on ``replicas`` engines."""
    if programs < 1 or replicas < 1 or duration_s <= 0:
        raise ValueError(f"need programs >= 1, replicas >= 1, duration_s > 0; got {programs}, {replicas}, "
                         f"{duration_s}")
    calls = [call for p in range(programs) for call in _reachable(workload, p, programs, cost, duration_s)]
    engine_s = replicas * duration_s
    demand = sum(call.output_tokens for call in calls)
    compute = _knapsack([(call.output_tokens, _compute_s(call, cost)) for call in calls], engine_s)
    memory = _knapsack([(call.output_tokens, _memory_s(call, cost)) for call in calls], engine_s)
    bound = min(demand, compute, memory)
    return Limit(bound / duration_s, demand / duration_s, compute / duration_s, memory / duration_s)


def _reachable(workload: Workload, program: int, programs: int, cost: CostModel, duration_s: float):
    """The calls ``program`` completes by ``duration_s`` at its fastest possible pace."""
    script = workload.program_sessions(program, programs)
    now = 0.0
    while True:
        session = script.next_session()
        if not session.calls:
            return
        for call in session.calls:
            now += call.gap_s + _fastest_latency(call, cost)
            if now > duration_s:
                return
            yield call


def _new_tokens(call: CallSpec) -> int:
    """The prompt tokens a call must prefill at best: all but the reusable prefix (and at least one)."""
    return call.input_tokens - min(call.reuse_tokens, call.input_tokens - 1)


def _fastest_latency(call: CallSpec, cost: CostModel) -> float:
    gpu, tp, budget = cost.profile.gpu, cost.tp, cost.profile.token_budget
    new = _new_tokens(call)
    prefill = 0.0
    for done in range(0, new, budget):
        chunk = min(budget, new - done)
        compute = cost.linear_flops(chunk, logit_rows=0) / tp / (gpu.peak_flops * gpu.mfu)
        memory = (cost.weight_read_bytes(chunk) + cost.kv_bytes(chunk)) / tp / (gpu.hbm_bandwidth * gpu.mbu)
        prefill += max(compute, memory) + gpu.step_overhead_s + gpu.prefill_overhead_s
    decode = (call.output_tokens - 1) * cost.step_time(0, 1, call.input_tokens) if call.output_tokens > 1 else 0.0
    return prefill + decode


def _decode_context(call: CallSpec) -> int:
    """Context tokens the call's decode steps attend to, in all: input + 1, ..., input + output - 1."""
    steps = max(0, call.output_tokens - 1)
    return steps * call.input_tokens + steps * (steps + 1) // 2


def _per_step_floor(cost: CostModel) -> float:
    """What every step costs at least: its fixed overhead."""
    return cost.profile.gpu.step_overhead_s


def _compute_s(call: CallSpec, cost: CostModel) -> float:
    m, gpu, tp = cost.model, cost.profile.gpu, cost.tp
    decode_steps = max(0, call.output_tokens - 1)
    flops = cost.linear_flops(_new_tokens(call) + decode_steps, logit_rows=decode_steps)
    flops += 4.0 * m.layers * m.q_dim * (_decode_context(call) + decode_steps)
    steps = decode_steps / cost.profile.max_num_seqs
    return flops / tp / (gpu.peak_flops * gpu.mfu) + steps * _per_step_floor(cost)


def _memory_s(call: CallSpec, cost: CostModel) -> float:
    gpu, tp = cost.profile.gpu, cost.tp
    decode_steps = max(0, call.output_tokens - 1)
    kv = cost.model.kv_bytes_per_token * (_decode_context(call) + _new_tokens(call) + decode_steps)
    steps = decode_steps / cost.profile.max_num_seqs
    weights = cost.weight_read_bytes(1) / tp / (gpu.hbm_bandwidth * gpu.mbu)
    return kv / tp / (gpu.hbm_bandwidth * gpu.mbu) + steps * (weights + _per_step_floor(cost))


def _knapsack(items: list[tuple[int, float]], capacity_s: float) -> float:
    """Most output that fits in ``capacity_s`` of engine time, items divisible; (output, seconds) each."""
    total = 0.0
    for output, seconds in sorted(items, key=lambda item: -(item[0] / item[1]) if item[1] > 0 else float("-inf")):
        if seconds <= capacity_s:
            total += output
            capacity_s -= seconds
        else:
            return total + output * capacity_s / seconds
    return total
