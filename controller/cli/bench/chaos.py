"""`lull chaos`: inject faults into a running Lull platform during a closed-loop replay.

    lull chaos --faults replica,controller,redis,node --duration 120 --json chaos.json

Against the platform of `lull up` (its state file names the Ray address, the REST
port and the Redis it started). Programs replay agent sessions (calls with tool
gaps between them, each call's prompt extending the previous context) through the
public REST API while faults are injected in turn, one every `--interval` seconds:

- `replica`: kill one engine replica actor (Serve starts a new one);
- `controller`: kill the controller actor as a crash would (Ray restarts it and
  the gateway hands it the replicas; it rebuilds from the node agents);
- `redis`: stop the Redis that `lull up` started for `--redis-down` seconds, then
  start it again on the same port;
- `node`: kill the Ray processes of one worker node (not the head, which runs the
  gateway and the controller); needs `lull up --nodes 2` or more.

A session fails when one of its calls fails; the report has `sessions_completed`,
`sessions_failed`, and per fault when it was injected and how long until the
platform answered a probe call again (`recovered_s`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

FAULTS = ("replica", "controller", "redis", "node")


def add_parser(subparsers):
    parser = subparsers.add_parser("chaos", help="inject faults into a running platform during a replay")
    parser.add_argument("--faults", default="replica,controller,redis",
                        help=f"comma-separated faults to inject, in turn: {','.join(FAULTS)}")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of replay")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between faults")
    parser.add_argument("--programs", type=int, default=4, help="concurrent agent programs")
    parser.add_argument("--redis-down", type=float, default=5.0, help="seconds Redis stays stopped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the report here")
    parser.set_defaults(func=cmd_chaos)
    return parser


@dataclass
class FaultRecord:
    fault: str
    at_s: float  # since the replay began
    target: str = ""
    injected: bool = True
    recovered_s: float | None = None  # from injection until a probe call succeeded
    note: str = ""


@dataclass
class ChaosReport:
    duration_s: float = 0.0
    sessions_completed: int = 0
    sessions_failed: int = 0
    calls_completed: int = 0
    errors: list[str] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "errors": self.errors[:50]}


# -- the replay ------------------------------------------------------------------------------

async def http_call(port: int, session: str, prompt: list[int], max_tokens: int, timeout_s: float = 300.0) -> list:
    """One /v1/completions call by token ids (stdlib only); returns the output token count as ids' stand-in."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0}).encode()
    headers = {"content-type": "application/json", "x-session-id": session, "content-length": str(len(body))}
    if key := os.environ.get("LULL_CHAOS_API_KEY"):
        headers["authorization"] = f"Bearer {key}"
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    try:
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        writer.write(f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{head}\r\n".encode()
                     + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    if not status_line.startswith(b"HTTP/"):
        raise ConnectionError(f"the gateway closed the connection without a response ({len(raw)} bytes)")
    status = int(status_line.split()[1])
    payload = rest.partition(b"\r\n\r\n")[2]
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
    usage = json.loads(payload)["usage"]
    return [0] * usage["completion_tokens"]


async def replay_sessions(port: int, programs: int, deadline: float, report: ChaosReport, seed: int) -> None:
    """Closed loop: each program runs sessions of 3-6 calls with short tool gaps until the deadline."""
    async def program(p: int) -> None:
        rng = random.Random(seed * 7919 + p)
        n = 0
        while time.monotonic() < deadline:
            session, n = f"chaos-{seed}-{p}-{n}", n + 1
            context = [rng.randrange(20, 1000) for _ in range(rng.randrange(40, 200))]
            try:
                for _ in range(rng.randrange(3, 7)):
                    out = await http_call(port, session, context, max_tokens=rng.randrange(4, 24))
                    report.calls_completed += 1
                    context = context + [rng.randrange(20, 1000) for _ in range(len(out) + rng.randrange(5, 40))]
                    await asyncio.sleep(rng.uniform(0.05, 1.0))  # the tool call
                report.sessions_completed += 1
            except Exception as error:  # a failed session is counted, never fatal to the replay
                report.sessions_failed += 1
                report.errors.append(f"{session}: {type(error).__name__}: {str(error)[:200]}")

    await asyncio.gather(*(program(p) for p in range(programs)))


# -- the faults ------------------------------------------------------------------------------

class Injector:
    def __init__(self, state: dict, redis_down_s: float, rng: random.Random):
        self.state, self.redis_down_s, self.rng = state, redis_down_s, rng

    async def inject(self, fault: str) -> FaultRecord:
        return await getattr(self, fault)()

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

        from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE

        ray.kill(ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE), no_restart=False)  # a crash
        return FaultRecord("controller", 0, target=CONTROLLER_ACTOR)

    async def redis(self) -> FaultRecord:
        pid = self.state.get("redis_pid")
        if not pid:
            return FaultRecord("redis", 0, injected=False, note="Redis was not started by `lull up`; not touched")
        port = self.state["redis_url"].rsplit(":", 1)[1].split("/")[0]
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        await asyncio.sleep(self.redis_down_s)
        from controller.assembly.local_platform import start_redis, state_path

        start_redis(self.state, int(port))  # with the password `up` gave it: the agents log in again
        state_path().write_text(json.dumps(self.state))  # `lull down` stops the new Redis
        return FaultRecord("redis", 0, target=f"127.0.0.1:{port}", note=f"down {self.redis_down_s:g} s")

    async def node(self) -> FaultRecord:
        import ray

        head = ray.get_runtime_context().gcs_address.split(":")[0]
        workers = [n for n in ray.nodes() if n["Alive"] and not n.get("Resources", {}).get("node:__internal_head__")]
        if not workers:
            return FaultRecord("node", 0, injected=False, note="no worker node: start with `lull up --nodes 2`")
        victim = self.rng.choice(sorted(workers, key=lambda n: n["NodeID"]))
        killed = kill_node_processes(victim)
        if not killed:
            return FaultRecord("node", 0, target=victim["NodeID"][:8], injected=False,
                               note=f"no process of the node found (head {head})")
        return FaultRecord("node", 0, target=victim["NodeID"][:8], note=f"{killed} processes killed")


def kill_node_processes(node: dict) -> int:
    """SIGKILL the raylet of a local Ray node (found by its socket name) and its workers."""
    socket = node.get("RayletSocketName", "")
    if not socket:
        return 0
    killed = 0
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and socket.encode() in (entry / "cmdline").read_bytes():
                os.kill(int(entry.name), signal.SIGKILL)
                killed += 1
        except (OSError, ProcessLookupError):
            continue
    return killed


async def probe(port: int, began: float, timeout_s: float = 120.0) -> float | None:
    """Seconds until a fresh session's call succeeds (from `began`), or None."""
    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            await http_call(port, f"chaos-probe-{int(began)}-{n}", [101, 202, 303, 404], 2, timeout_s=60)
            return round(time.monotonic() - began, 3)
        except Exception:
            await asyncio.sleep(0.5)
    return None


async def run_chaos(state: dict, faults: list[str], duration_s: float, interval_s: float, programs: int,
                    redis_down_s: float, seed: int) -> ChaosReport:
    report = ChaosReport()
    began = time.monotonic()
    deadline = began + duration_s
    injector = Injector(state, redis_down_s, random.Random(seed))

    async def schedule() -> None:
        i = 0
        while time.monotonic() + interval_s < deadline:
            await asyncio.sleep(interval_s)
            fault = faults[i % len(faults)]
            i += 1
            at = time.monotonic()
            try:
                record = await injector.inject(fault)
            except Exception as error:
                record = FaultRecord(fault, 0, injected=False, note=f"{type(error).__name__}: {str(error)[:200]}")
            record.at_s = round(at - began, 3)
            if record.injected:
                record.recovered_s = await probe(state["port"], at)
            report.faults.append(record)

    await asyncio.gather(replay_sessions(state["port"], programs, deadline, report, seed), schedule())
    report.duration_s = round(time.monotonic() - began, 3)
    return report


def parse_faults(text: str) -> list[str]:
    faults = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if not faults or unknown:
        raise ValueError(f"unknown fault(s) {unknown}; choose from {','.join(FAULTS)}")
    return faults


def cmd_chaos(args) -> int:
    import ray

    from proto.names import RAY_NAMESPACE
    from controller.assembly.local_platform import read_state

    faults = parse_faults(args.faults)
    if args.duration <= 0 or args.interval <= 0 or args.programs < 1 or args.redis_down < 0:
        raise ValueError("--duration and --interval must be > 0, --programs >= 1, --redis-down >= 0")
    state = read_state()
    ray.init(address=state["address"], namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="ERROR")
    try:
        report = asyncio.run(run_chaos(state, faults, args.duration, args.interval, args.programs,
                                       args.redis_down, args.seed))
    finally:
        ray.shutdown()
    out = report.to_json()
    print(f"lull chaos: {report.sessions_completed} sessions completed, {report.sessions_failed} failed, "
          f"{report.calls_completed} calls; faults: "
          + ", ".join(f"{f.fault}@{f.at_s:g}s" + (f" back {f.recovered_s:g}s" if f.recovered_s is not None else
                                                  " (not injected)" if not f.injected else " NOT BACK")
                      for f in report.faults))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(out, indent=2))
    return 0 if report.sessions_failed == 0 else 1
