"""Shared fixtures for tests that run a real vLLM engine on CPU, a real Redis and real tiers.

One engine per test module: starting vLLM costs ~20-40 s here, so tests share
it and keep their sessions apart by session id.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from dataclasses import dataclass

from workers.dram_store import DramStore
from workers.engine import EngineReplica, EngineSettings
from workers.node_agent import NodeAgent
from workers.redis_server import LocalRedis
from workers.shared_tier import SharedTier
from workers.tiny_model import ensure_tiny_model


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
        return self.loop.run(self.engine.complete(prompt, session_id=session, tenant=tenant, tier=tier,
                                                  max_tokens=max_tokens))

    def reset_prefix_cache(self) -> bool:
        return self.loop.run(self.engine.reset_prefix_cache())


def start_data_plane(dram_capacity_bytes: int = 64 << 20, shared_capacity_bytes: int = 64 << 20) -> DataPlane:
    dram_dir = tempfile.mkdtemp(prefix="lull-dram-", dir="/dev/shm")
    redis = LocalRedis(maxmemory=shared_capacity_bytes * 2).start()
    loop = LoopThread()
    settings = EngineSettings(model=str(ensure_tiny_model()), dram_dir=dram_dir, dtype="float32",
                              dram_capacity_bytes=dram_capacity_bytes, max_model_len=4096)

    async def make():
        return EngineReplica(settings)

    engine = loop.run(make())
    dram = DramStore(dram_dir, dram_capacity_bytes)
    shared = SharedTier(redis.url, shared_capacity_bytes, timeout_s=0.5)
    agent = NodeAgent("node-0", dram, shared, dram_dir=dram_dir)
    return DataPlane(engine, loop, dram, shared, redis, agent, dram_dir)


def stop_data_plane(plane: DataPlane) -> None:
    plane.engine.shutdown()
    plane.loop.stop()
    plane.redis.stop()
    shutil.rmtree(plane.dram_dir, ignore_errors=True)
