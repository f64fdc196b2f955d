"""Replica membership (``controller.runtime.membership``) and the in-process ``Controller`` over
it, without Ray: the cluster (alive nodes, alive named actors, agent starts) and the node
agents are fakes; the books are a real ``LiveController`` whose mover commits every move."""

from __future__ import annotations

import asyncio

import pytest

from controller.policy import Location, Tier
from controller.runtime import LiveController
from controller.runtime.actor import Controller
from controller.runtime.membership import MemoryStore, Membership, Replica
from proto.names import node_agent_actor
from tests.support import FakeClock

GPU, DRAM, SHARED = 300, 300, 1000  # KV tokens


class FakeCluster:
    def __init__(self, nodes=("n1", "n2")):
        self.nodes, self.actors, self.agent_starts = set(nodes), set(), []

    async def alive_nodes(self) -> set[str]:
        return set(self.nodes)

    async def alive_actors(self) -> set[str]:
        return set(self.actors)

    async def start_agent(self, node_id: str) -> str:
        self.agent_starts.append(node_id)
        await asyncio.sleep(0)  # a real start takes a while: concurrent registrations overlap it
        self.actors.add(node_agent_actor(node_id))
        return f"{node_id}:7000"


class FakeAgents:
    def __init__(self, addresses=None):
        self.addresses = dict(addresses or {})

    def set_agent(self, node_id: str, address: str) -> None:
        self.addresses[node_id] = address

    def forget_agent(self, node_id: str) -> None:
        self.addresses.pop(node_id, None)


class CommitAll:
    """Every move commits: the drain's demotions to the shared tier succeed."""

    async def move(self, move, src_node, dst_node) -> bool:
        return True

    async def release(self, session_id, where, node) -> bool:
        return True


def replica(replica_id: str, node_id: str, gpu: int = GPU) -> Replica:
    return Replica(replica_id, node_id, gpu, DRAM, f"SERVE_REPLICA::lull#LullEngine#{replica_id}")


def setup(store=None, agents=None, cluster=None):
    clock = FakeClock()
    live = LiveController(CommitAll(), clock=lambda: clock.now)
    live.set_shared_capacity(SHARED)
    cluster = cluster or FakeCluster()
    cluster.actors |= {node_agent_actor(n) for n in (agents.addresses if agents else ())}
    membership = Membership(lambda: live, agents or FakeAgents(), cluster, store or MemoryStore())
    return live, membership, cluster, clock


async def register(membership, cluster, *replicas):
    for r in replicas:
        cluster.actors.add(r.actor_name)
    await asyncio.gather(*(membership.register(r) for r in replicas))


def run(scenario):
    asyncio.run(asyncio.wait_for(scenario(), timeout=10))


def test_replicas_register_their_node_gets_one_agent_and_the_books_outlive_the_controller():
    async def scenario():
        live, membership, cluster, _ = setup()
        await register(membership, cluster, replica("r1", "n2"), replica("r2", "n2"))
        assert cluster.agent_starts == ["n2"]  # started once, though two replicas asked at once
        assert membership.agents.addresses == {"n2": "n2:7000"} and live.nodes == {"r1": "n2", "r2": "n2"}
        await membership.register(replica("r1", "n2", gpu=120))  # again: a capacity change
        assert live.capacity[Location(Tier.GPU, "r1")] == 120 and cluster.agent_starts == ["n2"]
        saved = membership.store.load()
        assert {r["replica_id"] for r in saved["replicas"]} == {"r1", "r2"} and saved["agents"] == {"n2": "n2:7000"}

    run(scenario)


def test_deregister_drains_to_the_shared_tier_and_every_caller_gets_the_same_report():
    async def scenario():
        live, membership, cluster, clock = setup()
        await register(membership, cluster, replica("r1", "n1"), replica("r2", "n2"))
        admission = await live.admit("s1", "t", 100, 20, timeout_s=1)
        live.call_finished("s1", 120)
        clock.advance(1)
        on = admission.replica_id
        first, second = await asyncio.gather(membership.deregister(on), membership.deregister(on))
        assert first == second and first.saved_sessions == 1 and first.saved_tokens == 120 and not first.timed_out
        assert live.state.get("s1").location == Location(Tier.SHARED)
        assert on not in live.nodes and on not in membership.replicas and not live.draining
        assert await membership.deregister(on) == first  # a late caller gets the report
        assert await membership.deregister("never-registered") is None

    run(scenario)


def test_check_removes_replicas_of_dead_nodes_and_drains_replicas_that_died_on_living_nodes():
    async def scenario():
        live, membership, cluster, _ = setup(agents=FakeAgents({"n1": "n1:7000", "n2": "n2:7000"}))
        r1, r2 = replica("r1", "n1"), replica("r2", "n2")
        await register(membership, cluster, r1, r2)
        cluster.nodes.discard("n2")  # the node and everything on it
        await membership.check()
        assert "r2" not in live.nodes and "r2" not in membership.replicas
        assert membership.agents.addresses == {"n1": "n1:7000"}
        cluster.actors.discard(r1.actor_name)  # the replica alone died
        await membership.check()
        # Booked at zero at once: nothing is admitted there while its KV drains.
        assert "r1" in live.draining and live.state.capacity[Location(Tier.GPU, "r1")] == 0
        report = await membership.deregister("r1")  # the same drain, awaited
        assert report.replica_id == "r1" and "r1" not in live.nodes and membership.replicas == {}

    run(scenario)


def test_an_empty_cluster_answer_removes_nothing():
    async def scenario():
        live, membership, cluster, _ = setup()
        await register(membership, cluster, replica("r1", "n1"))
        cluster.nodes.clear()
        with pytest.raises(RuntimeError, match="no alive node"):
            await membership.check()
        assert live.nodes == {"r1": "n1"}

    run(scenario)


def test_a_restarted_controller_restores_the_replicas_and_agents_that_are_alive():
    async def scenario():
        store = MemoryStore()
        _, membership, cluster, _ = setup(store=store, cluster=FakeCluster(("n1", "n2", "n3")))
        await register(membership, cluster, replica("r1", "n1"), replica("r2", "n2"), replica("r3", "n3"))
        cluster.actors.discard(replica("r2", "n2").actor_name)  # died while the controller was down
        cluster.nodes.discard("n3")
        live, restarted, _, _ = setup(store=store, cluster=cluster)
        restored = await restarted.restore()
        assert [r.replica_id for r in restored] == ["r1"] and live.nodes == {"r1": "n1"}
        assert restarted.agents.addresses == {"n1": "n1:7000", "n2": "n2:7000"}

    run(scenario)


def test_replica_fields_are_checked():
    with pytest.raises(ValueError, match="gpu_tokens"):
        Replica("r1", "n1", 0, DRAM, "a")
    with pytest.raises(ValueError, match="node_id"):
        Replica("r1", "", GPU, DRAM, "a")


def test_admit_answers_with_the_arrival_and_a_lost_replica_is_looked_at_before_the_retry():
    async def scenario():
        live, membership, cluster, clock = setup()
        controller = Controller(live, membership)
        await register(membership, cluster, replica("r1", "n1"), replica("r2", "n2"))
        first = await controller.admit("t/s1", "t", 100, 20, 1)
        assert (first.arrival_tier, first.arrival_context_tokens) == ("new", 0)
        await controller.call_finished("t/s1", 120)
        clock.advance(1)
        again = await controller.admit("t/s1", "t", 130, 20, 1)
        assert (again.arrival_tier, again.arrival_context_tokens) == ("gpu", 120)
        assert (await controller.session_state("t/s1"))["phase"] == "llm"
        dead = again.replica_id
        cluster.actors.discard(replica(dead, "n1").actor_name)
        await controller.call_failed("t/s1", lost_replica=dead)
        assert dead in live.draining  # before call_failed answered
        retried = await controller.admit("t/s1", "t", 130, 20, 1)
        assert retried.replica_id != dead
        await controller.call_finished("t/s1", 150, close=True)  # a one-off ends with its call
        await live.quiesce()  # the closing session's KV is released by the next planning step
        assert await controller.session_state("t/s1") is None
        await membership.deregister(dead)

    run(scenario)


def test_a_replica_reported_dead_is_drained_before_ray_shows_it_and_unreachable_is_only_looked_at():
    async def scenario():
        live, membership, cluster, _ = setup()
        await register(membership, cluster, replica("r1", "n1"), replica("r2", "n2"))
        await membership.lost("r1", dead=False)  # unreachable, alive by Ray's tables: kept
        assert "r1" in live.nodes and not live.draining
        await membership.lost("r1", dead=True)  # the caller was told it died: nothing goes there again
        assert "r1" in live.draining and live.state.capacity[Location(Tier.GPU, "r1")] == 0
        await membership.deregister("r1")
        assert "r1" not in live.nodes

    run(scenario)


def test_an_agent_that_died_on_a_living_node_is_started_again_and_its_moves_wait_meanwhile():
    async def scenario():
        _, membership, cluster, _ = setup()
        await register(membership, cluster, replica("r1", "n1"), replica("r2", "n2"))
        assert cluster.agent_starts == ["n1", "n2"]
        cluster.actors.discard(node_agent_actor("n1"))  # killed mid-move, say
        cluster.start_agent = slow_start(cluster)
        await membership.check()
        # Forgotten at once (its address answers nothing); the replicas stay.
        assert "n1" not in membership.agents.addresses and set(membership.replicas) == {"r1", "r2"}
        for _ in range(5):
            await asyncio.sleep(0)
        assert membership.agents.addresses == {"n1": "n1:7001", "n2": "n2:7000"}
        await membership.check()  # alive again: nothing more happens
        assert cluster.agent_starts == ["n1", "n2", "n1"]

    run(scenario)


def slow_start(cluster):
    async def start_agent(node_id: str) -> str:
        cluster.agent_starts.append(node_id)
        await asyncio.sleep(0)
        cluster.actors.add(node_agent_actor(node_id))
        return f"{node_id}:7001"  # a fresh port
    return start_agent
