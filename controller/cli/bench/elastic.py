"""`lull bench-elastic`: engine replicas added under load and drained when idle, measured live.

Runs against a platform whose engine count may move, e.g.
`lull up --nodes 2 --replicas 1 --max-replicas 2` with short autoscaling windows
(LULL_AUTOSCALING__SCALE_UP_WINDOW_S and friends, set before `lull up`). Four phases:

1. pressure: ``sessions`` concurrent sessions call again and again with short tool gaps;
   together they hold more KV than one replica's GPU tier, so requests wait at the
   gate. Measured: from the first call to the autoscaler's decision, and from the
   decision to the new replica serving (registered with the controller): the time to
   add a replica.
2. spread: new sessions join (they take the new replica's free HBM; sessions whose KV
   sits in a node's DRAM stay on their replica), then every session makes
   ``spread_calls`` more calls.
3. quiet: all but ``keep`` sessions per replica close, the rest sit in a tool call; the
   GPU tier is underused and the autoscaler removes a replica (Serve picks which),
   which the controller drains to the shared tier. Measured: from the quiet to the
   replica's removal, and the drain's own report (its time, the sessions and KV
   tokens it kept and lost).
4. resume: every kept session calls once more. Sessions lost = sessions whose call failed
   (must be 0). Recompute avoided = prompt tokens that the drained replica's sessions
   got from cached KV on this call.

Figures are live measurements on this machine (vLLM on CPU, tiny model), not simulated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from controller.cli.bench.live import add_endpoint_args
from loadgen.clients import RestClient
from loadgen.replay import CallOutcome


@dataclass
class SessionLog:
    session_id: str
    prompt: list[int]
    calls: int = 0
    failures: list[str] = field(default_factory=list)


def _gpu_replicas(snap: dict) -> dict[str, int]:
    """Replica -> GPU-tier capacity in tokens, for the replicas the controller knows."""
    return {t["replica"]: t["capacity_tokens"] for t in snap["tiers"] if t["tier"] == "gpu"}


def _decision() -> dict | None:
    from controller.autoscale import signals

    return signals.read(signals.DECISION_KEY)


class ElasticBench:
    def __init__(self, client, controller, *, sessions: int, max_tokens: int, gap_s: float,
                 spread_calls: int, deadline_s: float, keep: int = 2, say=print) -> None:
        self.client, self.controller, self.say = client, controller, say
        self.sessions, self.max_tokens, self.gap_s = sessions, max_tokens, gap_s
        self.spread_calls, self.deadline_s, self.keep = spread_calls, deadline_s, keep
        self.logs: list[SessionLog] = []

    async def snapshot(self) -> dict:
        return await self.controller.snapshot.remote()

    @staticmethod
    def session(session_id: str, context: int) -> SessionLog:
        seed = sum(session_id.encode())
        return SessionLog(session_id, [(seed * 7 + j * 31) % 900 + 20 for j in range(context)])

    async def call(self, log: SessionLog, grow: bool = True) -> CallOutcome | None:
        """One call of the session: its context plus a tool result; ``grow`` keeps both in the
        context (an agent's next turn), else the context stays as it was (bounded pressure)."""
        prompt = log.prompt + [(len(log.prompt) * 13 + i) % 900 + 20 for i in range(16)]
        try:
            outcome = await self.client.call(log.session_id, prompt, self.max_tokens)
        except Exception as error:  # a lost session: counted, never hidden
            log.failures.append(f"{type(error).__name__}: {str(error)[:200]}")
            return None
        if grow:
            log.prompt = prompt + outcome.output_ids
        log.calls += 1
        return outcome

    async def wait_for(self, what: str, check, since: float):
        """Poll ``check()`` (async) until it returns something truthy; raise past the deadline."""
        while not (found := await check()):
            if time.monotonic() - since > self.deadline_s:
                raise TimeoutError(f"no {what} within {self.deadline_s:g} s; are the autoscaling bounds "
                                   "and windows set (lull up --max-replicas, LULL_AUTOSCALING__*)?")
            await asyncio.sleep(0.25)
        return found

    async def run(self) -> dict:
        before = _gpu_replicas(await self.snapshot())
        if not before:
            raise RuntimeError("the controller knows no engine replica; is the platform up?")
        capacity = min(before.values())
        # Each session's KV is a fifth of one replica's GPU tier: the sessions want more than
        # one replica; after the quiet, ``keep`` per replica hold well under half of two.
        context = max(32, capacity // 5 - self.max_tokens - 16 * (self.spread_calls + 2))
        run = f"elastic-{int(time.time()) % 100000}"
        self.logs = [self.session(f"{run}-{i}", context) for i in range(self.sessions)]
        self.say(f"{len(before)} replica(s), GPU tier {capacity} tokens each; {self.sessions} sessions of "
                 f"{context} tokens press on it")
        new, up = await self._press_until_added(before)
        late = [self.session(f"{run}-late-{i}", context) for i in range(max(1, self.sessions // 2))]
        self.logs += late  # new sessions: they take the new replica's free HBM
        peak, placed = await self._spread_then_quiet()
        report, down = await self._wait_for_drain()
        outcomes = await asyncio.gather(*(self.call(log) for log in self.logs))
        for log in self.logs:
            await self.client.close_session(log.session_id)
        result = self._result(before, peak, new, report, placed, outcomes)
        result.update(seconds_to_add=round(up["seconds"], 2), seconds_to_remove_after_quiet=round(down["seconds"], 2),
                      decisions=dict(up=up["decision"], down=down["decision"]))
        if up["decision"] and up["decision"]["target"] > up["decision"]["before"]:
            result["seconds_from_up_decision_to_serving"] = round(up["wall"] - up["decision"]["at"], 2)
        return result

    async def _press_until_added(self, before: dict) -> tuple[set, dict]:
        """Every session calls in a loop until a new replica serves; returns it and when."""
        started = time.monotonic()
        added = asyncio.Event()

        async def press(log: SessionLog) -> None:
            while not added.is_set() and time.monotonic() - started < self.deadline_s:
                await self.call(log, grow=False)
                await asyncio.sleep(self.gap_s)

        pressing = [asyncio.create_task(press(log)) for log in self.logs]

        async def grown():
            now = _gpu_replicas(await self.snapshot())
            return set(now) - set(before)

        new = await self.wait_for("new replica", grown, started)
        added.set()
        up = dict(seconds=time.monotonic() - started, wall=time.time(), decision=_decision())
        await asyncio.gather(*pressing)
        self.say(f"replica {sorted(new)} added {up['seconds']:.1f} s after the first call")
        return new, up

    async def _spread_then_quiet(self) -> tuple[dict, dict]:
        """Calls that spread the sessions over the replicas; then all but ``keep`` per replica
        close, so the GPU tier is underused and a replica may go."""
        for _ in range(self.spread_calls):
            await asyncio.gather(*(self.call(log) for log in self.logs))
        # The controller names sessions "tenant/session id".
        placed = {s["session_id"].split("/", 1)[-1]: s["replica"] for s in (await self.snapshot())["sessions"]}
        peak = _gpu_replicas(await self.snapshot())
        kept = []
        for replica in peak:
            kept += [log for log in self.logs if placed.get(log.session_id) == replica][:self.keep]
        for log in self.logs:
            if log not in kept:
                await self.client.close_session(log.session_id)
        self.logs = kept
        self.say(f"{len(peak)} replicas; sessions per replica: "
                 f"{ {r: sum(1 for p in placed.values() if p == r) for r in peak} }; "
                 f"now quiet, {len(kept)} session(s) kept in a tool call")
        return peak, placed

    async def _wait_for_drain(self) -> tuple[dict, dict]:
        quiet = time.monotonic()
        known = len(await self.controller.drain_reports.remote())

        async def drained():
            reports = await self.controller.drain_reports.remote()
            return reports[known:]

        report = (await self.wait_for("drain", drained, quiet))[0]
        down = dict(seconds=time.monotonic() - quiet, decision=_decision())
        self.say(f"replica {report['replica_id']} drained in {report['seconds']:.2f} s "
                 f"({down['seconds']:.1f} s after the load stopped); resuming every session")
        return report, down

    def _result(self, before, peak, new, report, placed, outcomes) -> dict:
        drained = report["replica_id"]
        moved = [(log, o) for log, o in zip(self.logs, outcomes) if placed.get(log.session_id) == drained]
        lost = sorted(log.session_id for log in self.logs if log.failures)
        result = dict(
            simulated=False,
            replicas_before=len(before), replicas_peak=len(peak), added_replicas=sorted(new),
            drain=report,
            sessions_kept=len(self.logs), calls_of_kept=sum(log.calls for log in self.logs),
            sessions_lost=len(lost), lost_sessions=lost,
            failures={log.session_id: log.failures for log in self.logs if log.failures},
            drained_sessions=len(moved),
            # None: a reply did not say how many prompt tokens came from KV (never guessed as 0)
            recompute_avoided_tokens=None if any(o is not None and o.cached_tokens < 0 for _, o in moved)
            else sum(o.cached_tokens for _, o in moved if o is not None),
            drained_prompt_tokens=sum(len(log.prompt) for log, _ in moved),
            resume_ttft_ms=[round(o.ttft_s * 1000, 1) for _, o in moved if o is not None],
        )
        return result


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench-elastic", help="measure adding a replica under load and draining one "
                                                         "when idle, on a running platform (lull up --max-replicas)")
    parser.add_argument("--sessions", type=int, default=8, help="concurrent sessions")
    parser.add_argument("--max-tokens", type=int, default=8, help="output tokens per call")
    parser.add_argument("--gap", type=float, default=0.2, help="tool gap between a session's calls, s")
    parser.add_argument("--spread-calls", type=int, default=3, help="calls per session once a replica was added")
    parser.add_argument("--deadline", type=float, default=600.0, help="give up on a phase after this long, s")
    add_endpoint_args(parser)
    parser.add_argument("--json", type=Path, required=True, help="write the figures here")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    from controller.cli.bench.live import Platform, api_key, endpoints  # Ray and the config: only when it runs

    for name in ("sessions", "max_tokens", "spread_calls"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.gap <= 60 or not 10 <= args.deadline <= 7200:
        raise ValueError("--gap must be in [0, 60] s and --deadline in [10, 7200] s")
    args.grpc_target = None
    url, _, address = endpoints(args)
    platform = Platform(address)

    async def main() -> dict:
        client = RestClient(url, api_key(args))
        try:
            bench = ElasticBench(client, platform.controller, sessions=args.sessions, max_tokens=args.max_tokens,
                                 gap_s=args.gap, spread_calls=args.spread_calls, deadline_s=args.deadline)
            return await bench.run()
        finally:
            await client.close()

    result = asyncio.run(main())
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"replicas {result['replicas_before']} -> {result['replicas_peak']} -> "
          f"{result['replicas_peak'] - 1}; added after {result['seconds_to_add']} s of pressure; "
          f"drain {result['drain']['seconds']} s; sessions lost {result['sessions_lost']}; "
          f"recompute avoided {result['recompute_avoided_tokens']} of {result['drained_prompt_tokens']} "
          f"prompt tokens of the drained replica's sessions (live, not simulated)")
    print(f"wrote {args.json}")
    return 0 if result["sessions_lost"] == 0 else 1
