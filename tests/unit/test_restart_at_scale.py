"""A controller restart at scale: 50,000 sessions come back from the node agents' streamed
occupancy reports, and the moves the dead controller left prepared are aborted, their
pins released, at once rather than when their leases run out.

Real parts, no engine: a real ``NodeAgent`` over a real ``DramStore`` (tmp dir) and a real
shared tier (``LocalRedis``) behind the agent's real gRPC server; the restarted controller
runs what ``ControllerActor.start`` runs after reading back its replicas
(``restore.reports_for_restart``, ``LiveController.rebuild``) over the real ``GrpcMover``;
a second node's agent is gone (nothing listens at its address)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from controller.policy import Location, Tier
from controller.policy.types import SHARED
from controller.runtime import GrpcMover, LiveController
from controller.runtime.actor import RESTART_REPORT_S
from controller.runtime.restore import reports_for_restart
from tests.support import INTERNAL_TOKEN, FakeClock
from workers.dram_store import PINNED, DramStore
from workers.node_agent import MoveKind, NodeAgent
from workers.node_agent_service import serve
from workers.redis_server import LocalRedis
from workers.shared_tier import SharedTier

LOCAL, SHARED_SESSIONS = 49_000, 1_000  # 50,000 in all
PREPARED = ("t/d-0000001", "t/d-0000002", "t/d-0000003")  # demotions to the shared tier the dead controller began
GPU1, DRAM1 = Location(Tier.GPU, "r1"), Location(Tier.DRAM, "r1")


def local_id(i: int) -> str:
    return f"t/d-{i:07d}"


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def home(i: int) -> Location:
    return GPU1 if i % 10 == 0 else DRAM1  # every tenth a GPU-tier session's write-through


@pytest.fixture(scope="module")
def crowded(tmp_path_factory):
    """Node n1 (replica r1) holding 49,000 sessions in its DRAM tier and 1,000 in Redis, and
    three demotions prepared by a controller that then died."""
    folder = tmp_path_factory.mktemp("dram")
    with LocalRedis("64mb") as redis_server:
        shared = SharedTier(redis_server.url, 32 << 20, timeout_s=2)
        store = DramStore(folder, 1 << 30)
        store.put_session(local_id(0), tenant="t", replica="r1", label="gpu", tokens=32, block_hashes=["b0"],
                          blocks={"b0": b"kv" * 32})
        for i in range(1, LOCAL):  # the block is stored once: no file is written again
            store.put_session(local_id(i), tenant="t", replica="r1", label=home(i).tier.label, tokens=32,
                              block_hashes=["b0"], blocks={})
        for i in range(SHARED_SESSIONS):
            shared.put_session(f"t/s-{i:07d}", "t", ["c0"], {"c0": b"kv" * 32}, 32)
        agent = NodeAgent("n1", store, shared, dram_dir=str(folder))
        for n, session_id in enumerate(PREPARED):
            agent.prepare(f"dead-{n}", session_id, MoveKind.DEMOTE, Tier.DRAM, Tier.SHARED, "r1", 600, time.monotonic())
        server, port, _ = serve(agent, 0, host="127.0.0.1", token=INTERNAL_TOKEN)
        try:
            yield agent, f"127.0.0.1:{port}"
        finally:
            server.stop(None)
            shared.close()


def test_a_restart_restores_50000_sessions_and_aborts_the_dead_controllers_moves(crowded, monkeypatch):
    agent, address = crowded
    monkeypatch.setenv("LULL_INTERNAL_TOKEN", INTERNAL_TOKEN)
    assert {agent.dram.session(s).label for s in PREPARED} == {PINNED} and len(agent.moves) == 3

    async def restart():
        clock = FakeClock()
        agents = {"n0": f"127.0.0.1:{unused_port()}", "n1": address}  # n0's agent is gone: it is left out
        ctl = LiveController(GrpcMover(agents, timeout_s=60), clock=lambda: clock.now)
        ctl.add_replica("r1", "n1", 10**6, 10**7)  # what membership.restore reads back
        ctl.set_shared_capacity(10**7)
        started = time.perf_counter()
        reports = await reports_for_restart(ctl.mover, RESTART_REPORT_S)
        reported = time.perf_counter()
        restored = ctl.rebuild(reports, bytes_per_token=2)
        done = time.perf_counter()
        await ctl.quiesce()
        return ctl, restored, (reported - started, done - reported)

    ctl, restored, (report_s, rebuild_s) = asyncio.run(restart())
    print(f"\nrestart: {len(restored):,} sessions restored in {report_s + rebuild_s:.2f} s "
          f"(streamed reports and aborts {report_s:.2f} s, books rebuilt {rebuild_s:.2f} s)")
    assert len(restored) == len(ctl.state.sessions) == LOCAL + SHARED_SESSIONS
    books = {s: r.location for s, r in ctl.state.sessions.items()}
    assert all(books[local_id(i)] == home(i) for i in range(LOCAL))
    assert all(books[f"t/s-{i:07d}"] == SHARED for i in range(SHARED_SESSIONS))
    assert agent.moves == {} and all(agent.finished[f"dead-{n}"] == "aborted" for n in range(3))
    assert {agent.dram.session(s).label for s in PREPARED} == {"dram"}  # unpinned, back home
    assert len(agent.shared.sessions()) == SHARED_SESSIONS  # their copies in Redis undone
    agent.shared.check_integrity()
    ctl.check_integrity()
