"""A node's occupancy report at any scale, and moves of a dead agent.

- Past ~16,000 sessions the unary report exceeds gRPC's 4 MB limit: it says so
  (RESOURCE_EXHAUSTED), and StreamOccupancy delivers every session of one snapshot in
  chunks far below the limit, which the controller's mover joins again.
- An agent that dies after a prepare leaves its copy pinned in the DRAM tier (which
  outlives it); the next agent aborts that move and unpins the copy.

A real ``NodeAgent`` over a real ``DramStore`` (tmp dir) behind its real gRPC server on
127.0.0.1, and the real ``GrpcMover``."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from controller.runtime import GrpcMover
from proto import node_agent_pb2 as pb
from proto import node_agent_pb2_grpc as pb_grpc
from proto.internal_auth import blocking_agent_channel
from proto.tiers import Tier
from tests.support import INTERNAL_TOKEN
from workers.dram_store import PINNED, DramStore, write_session
from workers.node_agent import MoveKind, NodeAgent
from workers.node_agent_service import serve

SESSIONS = 20_000
NODE = "f" * 56  # as long as a Ray node id
ENV = {"LULL_INTERNAL_TOKEN": INTERNAL_TOKEN}


def session_id(i: int) -> str:
    return f"{i:06d}-" + "s" * 121  # the longest id the proto allows


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dram") / NODE
    store = DramStore(folder, 1 << 30)
    for i in range(SESSIONS):
        store.put_session(session_id(i), tenant="t", replica="replica-" + "r" * 24, label="dram", tokens=32,
                          block_hashes=["b0"], blocks={"b0": b"kv" * 32})
    agent = NodeAgent(NODE, store, None, dram_dir=str(folder))
    server, port, _ = serve(agent, 0, "127.0.0.1", token=INTERNAL_TOKEN)
    yield f"127.0.0.1:{port}"
    server.stop(None)


def test_the_unary_report_of_a_crowded_node_says_to_stream(crowded):
    with blocking_agent_channel(crowded, ENV) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.NodeAgentServiceStub(channel).ReportOccupancy(pb.ReportOccupancyRequest(), timeout=60)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "StreamOccupancy" in refused.value.details()


def test_the_stream_carries_every_session_of_one_snapshot_in_small_chunks(crowded):
    with blocking_agent_channel(crowded, ENV) as channel:
        stub = pb_grpc.NodeAgentServiceStub(channel)
        chunks = list(stub.StreamOccupancy(pb.ReportOccupancyRequest(), timeout=60))
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.StreamOccupancy(pb.ReportOccupancyRequest(max_sessions_per_chunk=8193), timeout=60))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sum(c.ByteSize() for c in chunks) > 4 << 20  # what one message could not carry
    assert all(c.ByteSize() < 1 << 20 for c in chunks)
    assert len({(c.node_id, c.agent_instance_id, c.report_seq) for c in chunks}) == 1
    assert chunks[0].tiers and all(not c.tiers for c in chunks[1:])
    ids = [s.session_id for c in chunks for s in c.sessions]
    assert sorted(ids) == [session_id(i) for i in range(SESSIONS)]


def test_the_controllers_mover_joins_the_chunks(crowded, monkeypatch):
    monkeypatch.setenv("LULL_INTERNAL_TOKEN", INTERNAL_TOKEN)

    async def report():
        mover = GrpcMover({NODE: crowded}, timeout_s=60)
        try:
            return await mover.report(NODE)
        finally:
            await mover.close()

    joined = asyncio.run(report())
    assert len(joined.sessions) == SESSIONS and joined.ByteSize() > 4 << 20
    assert {s.location.tier for s in joined.sessions} == {Tier.DRAM.pb}


def test_a_move_of_a_dead_agent_is_aborted_and_its_pin_released(tmp_path):
    store = DramStore(tmp_path, 4096)
    write_session(store, "s1", tenant="t", replica="r1", label="dram", tokens=32, block_hashes=["a1"],
                  blocks={"a1": b"a" * 2000})
    dead = NodeAgent("n1", store, None, dram_dir=str(tmp_path))
    dead.prepare("m1", "s1", MoveKind.DROP, Tier.DRAM, Tier.WAITING, "r1", 30, time.monotonic())
    assert store.session("s1").label == PINNED  # the agent dies here: its moves are gone, the pin stays

    reborn = NodeAgent("n1", DramStore(tmp_path, 4096), None, dram_dir=str(tmp_path))
    assert reborn.unpinned == ["s1"] and not reborn.moves
    assert reborn.complete("m1", time.monotonic())[0] == "unknown"  # never committed
    assert reborn.dram.session("s1").label == Tier.GPU.label  # redundant: nothing holds it forever
    dropped = write_session(reborn.dram, "s2", tenant="t", replica="r1", label="gpu", tokens=32,
                            block_hashes=["b1"], blocks={"b1": b"b" * 3000})
    assert dropped == ["s1"]
    reborn.dram.check_integrity()
