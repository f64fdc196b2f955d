"""The faults of `lull chaos`, each injected once by ``Injector.inject(name)``.

- `replica`: kill one engine replica actor (Serve starts a new one);
- `controller`: kill the controller actor as a crash would (Ray restarts it and the gateway
  hands it the replicas; it rebuilds from the node agents);
- `redis`: stop the platform's Redis for ``redis_down_s``, then start it again on its port;
- `node`: kill the Ray processes of one worker node (not the head, which runs the gateway
  and the controller); needs `lull up --nodes 2` or more;
- `agent`: kill a node agent while a move is in flight (a copy pinned in its DRAM index,
  read from the tier's folder) or, when none is seen within ``wait_s``, at once;
- `redis-resident`: wait (up to ``wait_s``) until the controller books sessions in the
  shared tier, then restart Redis empty under them (start the platform with a small DRAM
  tier so that sessions get there);
- `shm-full`: fill the filesystem under the DRAM tier's folder until writes get ENOSPC, keep
  it full ``shm_full_s``, then free it; refused (not injected) when that filesystem has
  more than ``shm_fill_max_bytes`` free: put ``tiers.dram_dir`` on a small tmpfs;
- `disconnect`: clients that close the connection mid-stream and while gated (their
  session booked off the GPU tier), then call again; their calls join the answer check.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from controller.cli.bench.chaos_replay import Ledger, call_and_hang_up, recorded_call

FAULTS = ("replica", "controller", "redis", "node", "agent", "redis-resident", "shm-full", "disconnect")
MIB = 1024**2


@dataclass
class FaultRecord:
    fault: str
    at_s: float  # since the replay began
    target: str = ""
    injected: bool = True
    recovered_s: float | None = None  # from injection until a probe call succeeded
    sessions_lost: int = 0  # sessions lost from its injection until the next fault's
    wrong_outputs: int = 0  # answers that came in that window and differ from the reference
    # Whether it struck at the moment it aims for: a move in flight (agent), sessions in Redis
    # (redis-resident), every close mid-stream and while gated (disconnect).
    at_moment: bool = True
    note: str = ""


class RedisControl(Protocol):
    """The platform's Redis, as a fault stops and starts it (``workers.redis_server.LocalRedis`` is one)."""

    def stop(self) -> None: ...

    def start(self) -> object: ...


class PlatformRedis:
    """The Redis `lull up` started: its pid and port in the state file; started again with
    the password `up` gave it, and the new pid written back (so `lull down` stops it)."""

    def __init__(self, state: dict):
        self.state = state
        self.port = int(state["redis_url"].rsplit(":", 1)[1].split("/")[0])

    def stop(self) -> None:
        try:
            os.kill(self.state["redis_pid"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        while _port_open(self.port) and time.monotonic() < deadline:  # its port must be free again
            time.sleep(0.05)

    def start(self) -> None:
        import json

        from controller.assembly.local_platform import start_redis, state_path

        start_redis(self.state, self.port)  # with the password `up` gave it: the agents log in again
        state_path().write_text(json.dumps(self.state))


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Target:
    """What the faults reach: the gateway's port, the Redis to stop (None: not ours), the DRAM
    tier's root folder (None: unknown)."""

    port: int
    redis: RedisControl | None = None
    dram_dir: str | None = None


@dataclass
class Options:
    redis_down_s: float = 5.0
    wait_s: float = 20.0  # how long `agent` and `redis-resident` wait for their moment
    shm_full_s: float = 5.0
    shm_fill_max_bytes: int = 1024 * MIB
    disconnect_sessions: int = 3
    probe_timeout_s: float = 120.0  # how long a fault's probe waits for an answer


class Injector:
    def __init__(self, target: Target, options: Options, rng: random.Random, ledger: Ledger):
        self.target, self.options, self.rng, self.ledger = target, options, rng, ledger
        self.count = 0

    async def inject(self, fault: str) -> FaultRecord:
        self.count += 1
        return await getattr(self, fault.replace("-", "_"))()

    async def replica(self) -> FaultRecord:
        import ray

        from proto.names import ENGINE_DEPLOYMENT

        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["namespace"] == "serve" and f"#{ENGINE_DEPLOYMENT}#" in a["name"]]
        if not names:
            return FaultRecord("replica", 0, injected=False, note="no engine replica found")
        victim = self.rng.choice(sorted(names))
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        return FaultRecord("replica", 0, target=victim.rpartition("#")[2])

    async def controller(self) -> FaultRecord:
        import ray

        ray.kill(_controller(), no_restart=False)  # a crash
        return FaultRecord("controller", 0, target="controller")

    async def redis(self) -> FaultRecord:
        if self.target.redis is None:
            return FaultRecord("redis", 0, injected=False, note="Redis was not started by `lull up`; not touched")
        await asyncio.to_thread(self.target.redis.stop)
        await asyncio.sleep(self.options.redis_down_s)
        await asyncio.to_thread(self.target.redis.start)
        return FaultRecord("redis", 0, target="redis", note=f"down {self.options.redis_down_s:g} s")

    async def node(self) -> FaultRecord:
        import ray

        workers = [n for n in ray.nodes() if n["Alive"] and not n.get("Resources", {}).get("node:__internal_head__")]
        if not workers:
            return FaultRecord("node", 0, injected=False, note="no worker node: start with `lull up --nodes 2`")
        victim = self.rng.choice(sorted(workers, key=lambda n: n["NodeID"]))
        killed = kill_node_processes(victim)
        if not killed:
            return FaultRecord("node", 0, target=victim["NodeID"][:8], injected=False, note="no process of it found")
        return FaultRecord("node", 0, target=victim["NodeID"][:8], note=f"{killed} processes killed")

    async def agent(self) -> FaultRecord:
        import ray

        from proto.names import RAY_NAMESPACE, node_agent_actor

        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        moving = await self._node_with_a_move(nodes)
        note = "a move in flight (a copy pinned)" if moving else f"no move seen in {self.options.wait_s:g} s"
        victim = moving or self.rng.choice(nodes)
        ray.kill(ray.get_actor(node_agent_actor(victim), namespace=RAY_NAMESPACE), no_restart=True)
        return FaultRecord("agent", 0, target=victim[:8], at_moment=moving is not None, note=f"killed during {note}")

    async def _node_with_a_move(self, nodes: list[str]) -> str | None:
        """The first node whose DRAM index shows a pinned copy (a prepared move), polled."""
        if not self.target.dram_dir:
            return None
        from workers.dram_store import PINNED, node_dram_dir

        indexes = {n: Path(node_dram_dir(self.target.dram_dir, n)) / "index.sqlite3" for n in nodes}
        deadline = time.monotonic() + self.options.wait_s
        while time.monotonic() < deadline:
            for node, index in indexes.items():
                if _count_label(index, PINNED):
                    return node
            await asyncio.sleep(0.005)
        return None

    async def redis_resident(self) -> FaultRecord:
        if self.target.redis is None:
            return FaultRecord("redis-resident", 0, injected=False, note="Redis was not started by `lull up`")
        deadline = time.monotonic() + self.options.wait_s
        resident = await _sessions_in("shared")
        while not resident and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            resident = await _sessions_in("shared")
        await asyncio.to_thread(self.target.redis.stop)
        await asyncio.to_thread(self.target.redis.start)
        return FaultRecord("redis-resident", 0, target="redis", at_moment=bool(resident),
                           note=f"restarted empty under {len(resident)} session(s) booked in the shared tier")

    async def shm_full(self) -> FaultRecord:
        root = self.target.dram_dir
        if not root or not os.path.isdir(root):
            return FaultRecord("shm-full", 0, injected=False, note="the DRAM tier's folder is unknown here")
        stat = os.statvfs(root)
        free = stat.f_bavail * stat.f_frsize
        if free > self.options.shm_fill_max_bytes:
            return FaultRecord("shm-full", 0, target=root, injected=False,
                               note=f"{free / MIB:.0f} MiB free under it: put tiers.dram_dir on a small tmpfs")
        path = Path(root) / f"chaos-fill-{os.getpid()}"
        try:
            filled = await asyncio.to_thread(fill, path)
            await asyncio.sleep(self.options.shm_full_s)
        finally:
            path.unlink(missing_ok=True)
        return FaultRecord("shm-full", 0, target=root,
                           note=f"{filled / MIB:.1f} MiB written until ENOSPC, full {self.options.shm_full_s:g} s")

    async def disconnect(self) -> FaultRecord:
        sessions = [f"chaos-dc-{self.count}-{i}" for i in range(self.options.disconnect_sessions)]
        gated = await asyncio.gather(*(self._hang_ups(s) for s in sessions))
        return FaultRecord("disconnect", 0, target=f"{len(sessions)} sessions", at_moment=all(a and b for a, b in gated),
                           note=f"mid-stream closes {sum(g[0] for g in gated)}, closes while booked off the "
                                f"GPU tier (gated) {sum(g[1] for g in gated)}, of {len(sessions)}")

    async def _hang_ups(self, session: str) -> tuple[bool, bool]:
        """One session: a call, a stream closed after its first event, a call closed while
        gated, and a last call; whether each close came where meant. A call that fails
        loses the session."""
        rng, port = random.Random(session), self.target.port
        prompt = [rng.randrange(20, 1000) for _ in range(rng.randrange(60, 200))]
        try:
            await recorded_call(port, self.ledger, session, prompt, 8)
            mid_stream = await call_and_hang_up(port, session, prompt + [11, 12, 13], 64, stream=True)
            deadline = time.monotonic() + self.options.wait_s
            while session not in await _sessions_off_gpu() and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            gated = session in await _sessions_off_gpu()
            await call_and_hang_up(port, session, prompt + [21, 22, 23], 16, stream=False, after_s=0.05)
            await recorded_call(port, self.ledger, session, prompt + [31, 32, 33, 34], 8)
        except Exception as error:  # the session is lost; the fault goes on
            self.ledger.lose(session, error)
            return False, False
        return mid_stream, gated


def _controller():
    import ray

    from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE

    return ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)


async def _snapshot_sessions() -> list[dict]:
    import ray

    try:
        snap = await asyncio.to_thread(ray.get, _controller().snapshot.remote(), timeout=10)
    except Exception:  # restarting: nothing seen this time
        return []
    return snap["sessions"]


def _bare(session_id: str) -> str:
    return session_id.rpartition("/")[2]  # the books say "<tenant>/<session>"


async def _sessions_in(tier: str) -> list[str]:
    return [_bare(s["session_id"]) for s in await _snapshot_sessions() if s["tier"] == tier]


async def _sessions_off_gpu() -> set[str]:
    return {_bare(s["session_id"]) for s in await _snapshot_sessions() if s["tier"] != "gpu"}


def _count_label(index: Path, label: str) -> int:
    if not index.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{index}?mode=ro", uri=True, timeout=0.05) as db:
            return db.execute("SELECT count(*) FROM sessions WHERE label = ?", (label,)).fetchone()[0]
    except sqlite3.Error:  # busy or mid-checkpoint: look again
        return 0


def fill(path: Path, chunk: int = MIB) -> int:
    """Write zeros to ``path`` until its filesystem is full (ENOSPC); the bytes written."""
    written, block = 0, bytes(chunk)
    with open(path, "wb", buffering=0) as out:
        while True:
            try:
                written += out.write(block)
            except OSError as error:
                if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                if len(block) == 1:
                    return written
                block = block[: len(block) // 16 or 1]  # fill the last pages too


def kill_node_processes(node: dict) -> int:
    """SIGKILL the raylet of a local Ray node (found by its socket name) and its workers."""
    socket_name = node.get("RayletSocketName", "")
    if not socket_name:
        return 0
    killed = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and socket_name.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed
