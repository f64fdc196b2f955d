"""The program-aware baselines (continuum, thunderagent, ta-offload) in small
scripted scenarios that show what sets each apart from plain vLLM LRU."""

from __future__ import annotations

from loadgen.sim.continuum import PIN_TTL_S
from loadgen.sim.cost_model import CostModel, get_profile
from loadgen.sim.policies import POLICIES, Cluster
from loadgen.sim.thunderagent import BUFFER_PER_PROGRAM
from loadgen.sim.workload import CallSpec

COST = CostModel(get_profile("h200-80g", "qwen2.5-7b"))


class Harness:
    def __init__(self, policy: str, gpu: int, dram: int = 0, replicas: int = 1) -> None:
        self.launches: list[tuple[str, str, int, float, float]] = []
        self.wakes: list[float] = []
        self.cluster = Cluster([f"r{i}" for i in range(replicas)], gpu, dram, 0, COST,
                               lambda *a: self.launches.append(a), wake_at=self.wakes.append)
        self.policy = POLICIES.get(policy)(self.cluster)

    def launched(self) -> list[str]:
        return [launch[0] for launch in self.launches]

    def call(self, sid: str, at: float, tokens_in: int, reuse: int, done: float, tool: bool = True) -> None:
        self.policy.request(sid, at, CallSpec(0.0, tokens_in, 10, reuse, tool))
        assert self.launches[-1][0] == sid
        self.policy.finished(sid, done, tokens_in + 10)


# -- continuum ---------------------------------------------------------------------


def _pinned_then_squeezed(policy: str, newcomer_at: float) -> Harness:
    """A's call asks for a tool at t=1; B runs (keeping the engine busy); C needs
    A's HBM at ``newcomer_at``."""
    run = Harness(policy, gpu=3000)
    for sid in "ABC":
        run.policy.open(sid, 0.0)
    run.call("A", 0.0, 1000, 0, done=1.0)  # A's KV: 1010 tokens
    run.policy.request("B", 0.5, CallSpec(0.0, 900, 10, 0))  # running: holds 910
    run.policy.request("C", newcomer_at, CallSpec(0.0, 1500, 10, 0))  # 1080 free: needs 1510
    return run


def test_continuum_pins_within_its_ttl_and_releases_after():
    pinned = _pinned_then_squeezed("continuum", newcomer_at=1.0 + PIN_TTL_S / 2)
    assert pinned.launched() == ["A", "B"], "A's KV is pinned: C waits"
    assert pinned.wakes == [1.0 + PIN_TTL_S]
    pinned.policy.tick(1.0 + PIN_TTL_S)  # the TTL ran out: A's KV is evictable again
    assert pinned.launched() == ["A", "B", "C"]
    lru = _pinned_then_squeezed("vllm-lru", newcomer_at=1.0 + PIN_TTL_S / 2)
    assert lru.launched() == ["A", "B", "C"], "vLLM evicts A's idle KV at once"


def test_continuum_keeps_the_pin_of_a_request_waiting_to_be_scheduled():
    run = _pinned_then_squeezed("continuum", newcomer_at=1.5)
    run.policy.request("A", 1.8, CallSpec(0.0, 1200, 10, 1010))  # within the TTL; A needs 200 more
    # A's request goes ahead of C (pinned programs first) and runs on its own KV.
    assert run.launched() == ["A", "B", "A"]
    assert run.launches[-1][2] == 1010
    assert run.policy.pinned_until == {}


def test_continuum_does_not_pin_after_a_human_turn_or_a_slow_tool():
    run = Harness("continuum", gpu=3000)
    run.policy.open("A", 0.0)
    run.call("A", 0.0, 100, 0, done=1.0, tool=False)
    assert "A" not in run.policy.pinned_until
    run.call("A", 5.0, 200, 110, done=6.0)  # first tool call: no history, pinned
    assert run.policy.pinned_until["A"] == 6.0 + PIN_TTL_S
    run.call("A", 16.0, 300, 210, done=17.0)  # that tool took 10 s on average: no pin
    assert "A" not in run.policy.pinned_until or run.policy.pinned_until["A"] <= 17.0


def test_continuum_queues_by_program_arrival_not_request_arrival():
    run = Harness("continuum", gpu=3000)
    for sid in ("old", "young", "hog"):
        run.policy.open(sid, {"old": 0.0, "young": 5.0, "hog": 6.0}[sid])
    run.policy.request("hog", 6.0, CallSpec(0.0, 2700, 10, 0))  # 290 tokens left
    run.policy.request("young", 7.0, CallSpec(0.0, 400, 10, 0))
    run.policy.request("old", 8.0, CallSpec(0.0, 400, 10, 0))
    run.policy.finished("hog", 9.0, 2710)
    run.policy.close("hog", 9.0)
    assert run.launched() == ["hog", "old", "young"], "the program that came first goes first"


# -- thunderagent and ta-offload -------------------------------------------------------


def _over_capacity(policy: str) -> Harness:
    """Three programs fit when they start; then big and mid grow, and in their tool
    calls the three hold 800 + 400 + 200 tokens plus 100 each of buffer: 200 more
    than the 1500-token GPU."""
    run = Harness(policy, gpu=1500, dram=4000)
    for sid, tokens in (("big", 390), ("mid", 290), ("small", 190)):
        run.policy.open(sid, 0.0)
        run.call(sid, 0.0, tokens, 0, done=0.5)
    run.call("big", 0.6, 790, 400, done=1.0)
    run.call("mid", 0.6, 390, 300, done=1.0)
    return run


def paused(run: Harness) -> list[str]:
    return [sid for sid, program in run.policy.programs.items() if program.backend is None]


def test_thunderagent_pauses_the_smallest_tool_waiting_program_first():
    run = _over_capacity("thunderagent")
    run.policy.tick(5.0)
    assert paused(run) == ["small"], "over by 200: pausing the smallest acting program is enough"
    launched = len(run.launches)
    run.policy.request("small", 6.0, CallSpec(0.0, 290, 10, 200))
    assert len(run.launches) == launched, "a paused program's request waits"
    assert run.policy.programs["small"].pending is not None


def test_thunderagent_resumes_a_paused_request_once_decayed_tool_tokens_make_room():
    run = _over_capacity("thunderagent")
    run.policy.tick(5.0)
    run.policy.request("small", 6.0, CallSpec(0.0, 290, 10, 200))
    # At t=10 big and mid have been in their tool calls for 9 s: they weigh 2^-9.
    run.policy.tick(10.0)
    assert run.launched()[-1] == "small"
    # Undecayed, the backend is over again: the smallest acting program is paused.
    assert paused(run) == ["mid"]


def test_thunderagent_marks_a_running_program_and_pauses_it_when_its_call_ends():
    run = Harness("thunderagent", gpu=1100)
    run.policy.open("A", 0.0)
    run.policy.request("A", 0.0, CallSpec(0.0, 950, 10, 0))
    run.policy.programs["A"].tokens = 1050  # it grew while streaming: over capacity
    run.policy.tick(5.0)
    assert run.policy.programs["A"].marked and run.policy.programs["A"].backend == "r0"
    run.policy.finished("A", 6.0, 960)
    assert run.policy.programs["A"].backend is None and "A" in run.policy.waiting


def test_thunderagent_marks_every_running_program_once_no_acting_one_is_left_as_its_router_does():
    """The router's loop reads ``remaining_capacity``, which a mark does not change."""
    run = Harness("thunderagent", gpu=2000)
    for sid in ("A", "B", "C"):
        run.policy.open(sid, 0.0)
        run.policy.request(sid, 0.0, CallSpec(0.0, 500, 10, 0))
    run.policy.programs["A"].tokens = 900  # it grew while streaming: 200 over with the buffers
    run.policy.tick(5.0)
    assert all(run.policy.programs[sid].marked for sid in ("A", "B", "C"))


def test_thunderagent_queues_new_programs_while_others_wait():
    run = Harness("thunderagent", gpu=1000 + BUFFER_PER_PROGRAM)
    run.policy.open("A", 0.0)
    run.policy.open("B", 0.0)
    run.policy.request("A", 0.0, CallSpec(0.0, 1000, 10, 0))
    run.policy.request("B", 0.0, CallSpec(0.0, 10, 10, 0))
    assert run.launched() == ["A"], "no room left for B's buffer: it queues"
    assert list(run.policy.waiting) == ["B"]


def test_ta_offload_resumes_from_dram_where_thunderagent_recomputes():
    kept = {}
    for policy in ("thunderagent", "ta-offload"):
        run = _over_capacity(policy)
        run.policy.tick(5.0)  # small is paused
        run.call("big", 6.0, 1290, 800, done=7.0)  # the engine evicts small's cached KV
        run.policy.request("small", 8.0, CallSpec(0.0, 290, 10, 200))
        run.policy.tick(10.0)
        sid, _, tokens, transfer, _ = run.launches[-1]
        assert sid == "small"
        kept[policy] = (tokens, transfer)
    assert kept["thunderagent"] == (0, 0.0), "no offload: dropped and recomputed"
    assert kept["ta-offload"][0] == 200 and kept["ta-offload"][1] > 0.0, "loaded back over PCIe"


def test_thunderagent_resumes_on_the_roomiest_replica_and_frees_the_old_kv():
    run = Harness("ta-offload", gpu=1500, dram=4000, replicas=2)
    for sid, tokens in (("big", 990), ("mid", 590), ("small", 290)):
        run.policy.open(sid, 0.0)
        run.call(sid, 0.0, tokens, 0, done=1.0)
    homes = {sid: run.policy.home[sid].name for sid in ("big", "mid", "small")}
    # The fewest active tokens among the backends with room; the first in order on a tie (the router's loop).
    assert homes == {"big": "r0", "mid": "r1", "small": "r1"}, "new programs go where fewest tokens are"
    run.policy.request("mid", 2.0, CallSpec(0.0, 1300, 10, 600))  # a long prompt: r1 is over
    run.policy.tick(3.0)
    assert paused(run) == ["small"]
    run.policy.request("small", 4.0, CallSpec(0.0, 400, 10, 300))
    run.policy.tick(5.0)
    assert run.policy.home["small"].name == "r0"
    r1 = run.policy.replicas["r1"]
    assert "small" not in r1.idle and "small" not in r1.dram, "its KV on r1 is freed"
    assert run.launches[-1][:3] == ("small", "r0", 0), "recomputed on r0"
