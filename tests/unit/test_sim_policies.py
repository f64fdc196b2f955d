"""The simulated policies in one scripted scenario that tells them apart.

Session B is idle (one call, an 89 s tool call, one more call); session A is busy
(short calls with 1 s gaps) but used less recently than B. Then a new session C needs
more HBM than is free. LRU evicts A's KV (least recently used); MORI's ranking (lull,
mori) evicts B (most idle), so A's next call finds its KV in HBM.
"""

from __future__ import annotations

import pytest

from loadgen.sim.cost_model import CostModel, get_profile
from loadgen.sim.policies import POLICIES, Cluster
from loadgen.sim.workload import CallSpec

COST = CostModel(get_profile("h200-80g", "qwen2.5-7b"))
GPU = 3000


class Scenario:
    def __init__(self, policy: str, dram: int = 0, shared: int = 0) -> None:
        self.launches: list[tuple[str, str, int, float, float]] = []
        self.cluster = Cluster(["r0"], GPU, dram, shared, COST, lambda *a: self.launches.append(a))
        self.policy = POLICIES.get(policy)(self.cluster)
        self.tick_each_request = policy == "mori"

    def call(self, sid: str, at: float, tokens_in: int, reuse: int, seconds: float = 1.0) -> None:
        before = len(self.launches)
        self.policy.request(sid, at, CallSpec(0.0, tokens_in, 10, reuse))
        if self.tick_each_request and len(self.launches) == before:
            self.policy.tick(at)  # mori runs a session held in HBM at once, the rest on its tick
        assert self.launches[-1][0] == sid
        self.policy.finished(sid, at + seconds, tokens_in + 10)

    def run(self) -> tuple[str, str, int, float, float]:
        """Play the scenario; return the launch of A's call after C came."""
        for sid in "AB":
            self.policy.open(sid, 0.0)
        self.call("B", 0.0, 1000, 0)
        for i, at in enumerate((80.0, 82.0, 84.0)):
            self.call("A", at, 1000 + 10 * i, 0 if i == 0 else 1000 + 10 * i)
        self.call("B", 90.0, 1010, 1010)
        self.policy.open("C", 95.0)
        self.call("C", 95.0, 1500, 0)  # 1510 needed; 3000 - 1030 - 1020 = 950 free
        before = len(self.launches)
        self.policy.request("A", 96.0, CallSpec(0.0, 1030, 10, 1030))
        if self.tick_each_request and len(self.launches) == before:
            self.policy.tick(96.0)
        return self.launches[-1]


def test_vllm_lru_evicts_the_busy_session_that_mori_keeps():
    sid, _, kept, transfer, _ = Scenario("vllm-lru").run()
    assert sid == "A" and kept < 1030 and transfer == 0.0  # A's tail was evicted
    for policy in ("lull", "mori"):
        sid, _, kept, transfer, _ = Scenario(policy).run()
        assert (sid, kept, transfer) == ("A", 1030, 0.0), policy


def test_lru_offload_loads_evicted_kv_back_from_dram():
    scenario = Scenario("lru-offload", dram=6000)
    sid, _, kept, transfer, _ = scenario.run()
    assert sid == "A" and kept == 1030
    assert transfer > 0.0  # the evicted tail crossed PCIe back
    assert scenario.cluster.counters.bytes_hbm_dram > 0  # write-through and load


def test_lull_demotes_the_idle_session_to_the_shared_tier_mori_drops_it():
    lull = Scenario("lull", dram=0, shared=10_000)
    lull.run()
    assert lull.cluster.counters.bytes_dram_shared == 1020 * COST.model.kv_bytes_per_token
    assert lull.policy.occupancy()[2] == 1020  # B waits in the shared tier
    mori = Scenario("mori", dram=0, shared=10_000)
    mori.run()
    assert mori.cluster.counters.bytes_dram_shared == 0
    assert mori.policy.occupancy()[2] == 0  # no shared tier: B's KV was dropped


def test_mori_runs_a_call_of_a_session_held_in_hbm_at_once():
    scenario = Scenario("mori")
    scenario.policy.open("A", 0.0)
    scenario.policy.request("A", 0.0, CallSpec(0.0, 100, 10, 0))
    scenario.policy.tick(5.0)
    scenario.policy.finished("A", 6.0, 110)
    scenario.policy.request("A", 7.0, CallSpec(0.0, 120, 10, 110))
    assert scenario.launches[-1] == ("A", "r0", 110, 0.0, 7.0)  # not at the next tick (10 s)


def test_lull_admits_at_once_mori_waits_for_the_tick():
    for policy, launched in (("lull", 1), ("mori", 0)):
        scenario = Scenario(policy)
        scenario.policy.open("A", 0.0)
        scenario.policy.request("A", 0.0, CallSpec(0.0, 100, 10, 0))
        assert len(scenario.launches) == launched, policy
        scenario.policy.tick(5.0)
        assert len(scenario.launches) == 1


@pytest.mark.parametrize("policy", ["vllm-lru", "lru-offload"])
def test_lru_requests_queue_in_the_engine_until_blocks_free(policy):
    scenario = Scenario(policy, dram=6000)
    for sid in "AB":
        scenario.policy.open(sid, 0.0)
    scenario.policy.request("A", 0.0, CallSpec(0.0, 2000, 10, 0))
    scenario.policy.request("B", 0.0, CallSpec(0.0, 2000, 10, 0))
    assert [launch[0] for launch in scenario.launches] == ["A"]  # running KV is never evicted
    scenario.policy.finished("A", 1.0, 2010)
    assert [launch[0] for launch in scenario.launches] == ["A", "B"]


def test_infinite_hbm_never_evicts():
    scenario = Scenario("infinite-hbm")
    scenario.run()
    assert scenario.launches[-1][2] == 1030
    assert scenario.policy.occupancy()[0] == 1040 + 1020 + 1510
