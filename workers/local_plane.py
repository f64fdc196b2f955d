"""A whole node's data plane in one process, for tests and `lull bench-kv`.

A real vLLM engine (the tiny local model on CPU) with Lull's connector, the
node's DRAM tier in a fresh tmpfs folder, a private Redis as the shared tier,
and the node agent over both. No Ray: the agent is the plain class.

AsyncLLM's output handler lives on the loop that made the engine, so every
engine call goes through one loop running in a thread (`LoopThread`).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from proto.engine_request import EngineRequest
from proto.tiers import Tier
from workers.dram_store import DramStore
from workers.engine import EngineReplica, EngineSettings
from workers.node_agent import MoveKind, NodeAgent
from workers.redis_server import LocalRedis
from workers.shared_tier import SharedTier
from workers.tiny_model import ensure_tiny_model

T = TypeVar("T")


class LoopThread:
    """An event loop in a thread: AsyncLLM's output handler lives on one loop for the engine's life."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def wait_until(condition: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll `condition` until it returns something truthy; the engine core is another process."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


@dataclass
class DataPlane:
    engine: EngineReplica
    loop: LoopThread
    dram: DramStore
    shared: SharedTier
    redis: LocalRedis
    agent: NodeAgent
    dram_dir: str

    @property
    def replica_id(self) -> str:
        return self.engine.settings.replica_id

    def call(self, prompt: list[int], session: str, tier: str = "gpu", tenant: str = "t", max_tokens: int = 8):
        return self.loop.run(self.engine.complete(EngineRequest(prompt, max_tokens, session_id=session, tenant=tenant,
                                                                tier=tier)))

    def reset_prefix_cache(self) -> bool:
        return self.loop.run(self.engine.reset_prefix_cache())

    def evict_from_engine(self, timeout: float = 30.0) -> None:
        """Empty vLLM's prefix cache; vLLM refuses while any session's blocks are still held."""
        wait_until(self.reset_prefix_cache, timeout, what="held blocks released")

    def move(self, session: str, src: Tier, dst: Tier, kind: MoveKind = MoveKind.DEMOTE) -> None:
        """One two-phase move through the agent, as the controller drives it; raises unless committed."""
        move_id = f"{session}-{src.name}-{dst.name}-{time.monotonic_ns()}"
        self.agent.prepare(move_id, session, kind, src, dst, self.replica_id, lease_s=30, now=time.monotonic())
        state, _ = self.agent.complete(move_id, now=time.monotonic())
        if state != "committed":
            raise RuntimeError(f"move {move_id} ended {state}, not committed")


def start_data_plane(dram_capacity_bytes: int = 64 << 20, shared_capacity_bytes: int = 64 << 20,
                     max_model_len: int = 4096, dtype: str = "float32") -> DataPlane:
    dram_dir = tempfile.mkdtemp(prefix="lull-dram-", dir="/dev/shm")
    redis = LocalRedis(maxmemory=shared_capacity_bytes * 2).start()
    loop = LoopThread()
    try:
        settings = EngineSettings(model=str(ensure_tiny_model()), dram_dir=dram_dir, dtype=dtype,
                                  dram_capacity_bytes=dram_capacity_bytes, max_model_len=max_model_len)

        async def make():
            return EngineReplica(settings)

        engine = loop.run(make())
    except BaseException:
        loop.stop()
        redis.stop()
        shutil.rmtree(dram_dir, ignore_errors=True)
        raise
    dram = DramStore(dram_dir, dram_capacity_bytes)
    shared = SharedTier(redis.url, shared_capacity_bytes, timeout_s=0.5)
    agent = NodeAgent("node-0", dram, shared, dram_dir=dram_dir)
    return DataPlane(engine, loop, dram, shared, redis, agent, dram_dir)


def stop_data_plane(plane: DataPlane) -> None:
    async def shutdown():  # on the engine's loop: AsyncLLM cancels its output handler there
        plane.engine.shutdown()

    plane.loop.run(shutdown())
    plane.loop.stop()
    plane.shared.close()
    plane.redis.stop()
    shutil.rmtree(plane.dram_dir, ignore_errors=True)
