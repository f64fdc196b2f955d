"""`lull chaos`: inject faults into a running Lull platform during a closed-loop replay, and
check every answer.

    lull chaos --faults agent,redis-resident,shm-full,disconnect --duration 120 --json chaos.json

Against the platform of `lull up` (its state file names the Ray address, the REST port, the
Redis it started and the DRAM tier's folder). Programs replay agent sessions (calls with
tool gaps between them, each call's prompt extending the previous context) through the
public REST API while faults (``chaos_faults``: replica, controller, redis, node, agent,
redis-resident, shm-full, disconnect) are injected in turn, one every ``--interval``
seconds. Every call is greedy; after the replay every answer is compared with the same
prompt answered from scratch with no fault in flight (``chaos_replay``: how, and why that
is fair; start the platform with ``--set engine.dtype=float32``).

The report: ``sessions_completed``, ``sessions_lost`` (a session whose call failed or
never completed), ``wrong_outputs``, and per fault when it was injected, how long until
a probe call was answered again (``recovered_s``), and the sessions lost and wrong
outputs from its injection until the next fault's. Exit status 1 when a session was lost
or an answer was wrong.

``--time-limit`` bounds the whole run (replay, faults, probes and the answer check): past
it no fault is injected (booked as not injected), calls still running are cut off (their
sessions lost) and answers not yet checked are booked ``unchecked``; the run fails.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from controller.cli.bench.chaos_faults import FAULTS, MIB, FaultRecord, Injector, Options, PlatformRedis, Target
from controller.cli.bench.chaos_replay import Ledger, check_answers, http_call, replay_sessions


def add_parser(subparsers):
    parser = subparsers.add_parser("chaos", help="inject faults into a running platform during a replay")
    parser.add_argument("--faults", default="replica,controller,redis",
                        help=f"comma-separated faults to inject, in turn: {','.join(FAULTS)}")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of replay")
    parser.add_argument("--interval", type=float, default=15.0, help="seconds between faults")
    parser.add_argument("--programs", type=int, default=4, help="concurrent agent programs")
    parser.add_argument("--redis-down", type=float, default=5.0, help="seconds Redis stays stopped")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="seconds `agent` waits for a move in flight and `redis-resident` for sessions in Redis")
    parser.add_argument("--shm-full", type=float, default=5.0, help="seconds the DRAM tier's filesystem stays full")
    parser.add_argument("--shm-fill-max-mib", type=int, default=1024,
                        help="`shm-full` fills the DRAM tier's filesystem only when it has at most this much free")
    parser.add_argument("--probe-timeout", type=float, default=120.0,
                        help="seconds a fault's probe waits for a call to be answered again")
    parser.add_argument("--time-limit", type=float, default=0.0,
                        help="seconds the whole run may take (0: --duration + 5 min + --probe-timeout per fault)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", dest="json_path", default=None, help="write the report here")
    parser.set_defaults(func=cmd_chaos)
    return parser


@dataclass
class ChaosReport:
    duration_s: float = 0.0
    sessions_completed: int = 0
    sessions_lost: int = 0
    calls_completed: int = 0
    calls_checked: int = 0
    wrong_outputs: int = 0
    unchecked: int = 0  # calls whose answer the time limit left unchecked
    timed_out: bool = False  # the time limit cut the run short
    errors: list[str] = field(default_factory=list)
    wrong: list[dict] = field(default_factory=list)
    faults: list[FaultRecord] = field(default_factory=list)

    def to_json(self) -> dict:
        return {**asdict(self), "errors": self.errors[:50], "wrong": self.wrong[:50]}


def fill_report(report: ChaosReport, ledger: Ledger) -> None:
    """The ledger's counts, overall and per fault: each loss and wrong answer goes to the
    latest fault injected before it (none: before the first fault)."""
    report.sessions_completed = ledger.sessions_completed
    report.sessions_lost, report.wrong_outputs = len(ledger.losses), len(ledger.wrong)
    report.calls_completed = len(ledger.calls)
    report.errors = [f"{loss.session} at {loss.at_s:g}s: {loss.error}" for loss in ledger.losses]
    # Text lengths and positions only: logs and reports never carry the text itself.
    report.wrong = [{"session": w.session, "at_s": w.at_s, "chars": len(w.got), "reference_chars": len(w.reference),
                     "first_difference": next((i for i, (a, b) in enumerate(zip(w.got, w.reference)) if a != b),
                                              min(len(w.got), len(w.reference)))} for w in ledger.wrong]
    injected = sorted((f for f in report.faults if f.injected), key=lambda f: f.at_s)

    def owner(at_s: float) -> FaultRecord | None:
        return next((f for f in reversed(injected) if f.at_s <= at_s), None)

    for loss in ledger.losses:
        if (fault := owner(loss.at_s)) is not None:
            fault.sessions_lost += 1
    for wrong in ledger.wrong:
        if (fault := owner(wrong.at_s)) is not None:
            fault.wrong_outputs += 1


async def probe(port: int, began: float, timeout_s: float = 120.0) -> float | None:
    """Seconds until a fresh session's call succeeds (from `began`), or None."""
    deadline = time.monotonic() + timeout_s
    n = 0
    while time.monotonic() < deadline:
        n += 1
        try:
            await http_call(port, f"chaos-probe-{int(began)}-{n}", [101, 202, 303, 404], 2,
                            timeout_s=max(0.1, min(60.0, deadline - time.monotonic())))
            return round(time.monotonic() - began, 3)
        except Exception:
            await asyncio.sleep(0.5)
    return None


async def run_chaos(target: Target, faults: list[str], duration_s: float, interval_s: float, programs: int,
                    options: Options, seed: int, time_limit_s: float = 0.0) -> ChaosReport:
    """Replay for ``duration_s`` and inject ``faults`` in turn, each at least once (the replay
    goes on until the last has recovered), then check every answer; all within ``time_limit_s``
    (0: ``default_time_limit``)."""
    report = ChaosReport()
    ledger = Ledger(time.monotonic())
    deadline = ledger.began + duration_s
    limit = ledger.began + (time_limit_s or default_time_limit(duration_s, len(faults), options.probe_timeout_s))
    injector = Injector(target, options, random.Random(seed), ledger)
    scheduled = asyncio.Event()

    def left() -> float:
        return limit - time.monotonic()

    async def schedule() -> None:
        i = 0
        while i < len(faults) or time.monotonic() + interval_s < deadline:
            await asyncio.sleep(min(interval_s, max(0.0, left())))
            fault = faults[i % len(faults)]
            i += 1
            at = time.monotonic()
            if left() <= 0:  # this fault and those never tried yet are booked, not injected
                for name in [fault] + faults[i:]:
                    report.faults.append(FaultRecord(name, round(at - ledger.began, 3), injected=False,
                                                     note="not injected: the run's time limit had passed"))
                break
            print(f"  {ledger.now_s():7.1f}s {fault} ...", file=sys.stderr, flush=True)
            try:
                record = await asyncio.wait_for(injector.inject(fault), max(1.0, left()))
            except Exception as error:
                record = FaultRecord(fault, 0, injected=False, note=f"{type(error).__name__}: {str(error)[:200]}")
            record.at_s = round(at - ledger.began, 3)
            if record.injected:
                record.recovered_s = await probe(target.port, at, min(options.probe_timeout_s, max(1.0, left())))
            report.faults.append(record)
            print(f"  {ledger.now_s():7.1f}s {fault}: {'injected' if record.injected else 'NOT injected'}, back after "
                  f"{record.recovered_s} s; {record.note}", file=sys.stderr, flush=True)
        scheduled.set()

    def running() -> bool:
        return left() > 0 and (time.monotonic() < deadline or not scheduled.is_set())

    replay = asyncio.gather(replay_sessions(target.port, programs, running, ledger, seed), schedule())
    try:
        await asyncio.wait_for(replay, max(1.0, left()))
    except asyncio.TimeoutError:  # calls still running are cut off: replay_sessions books their sessions lost
        report.timed_out = True
    report.duration_s = ledger.now_s()
    try:
        report.calls_checked = await asyncio.wait_for(check_answers(target.port, ledger, programs), max(1.0, left()))
    except asyncio.TimeoutError:
        report.timed_out = True
        report.calls_checked = ledger.checked
    report.unchecked = len(ledger.calls) - report.calls_checked
    fill_report(report, ledger)
    return report


def default_time_limit(duration_s: float, faults: int, probe_timeout_s: float) -> float:
    """The replay, each fault's probe at its longest, and 5 minutes for injections and the check."""
    return duration_s + 300.0 + faults * probe_timeout_s


def parse_faults(text: str) -> list[str]:
    faults = [f.strip() for f in text.split(",") if f.strip()]
    unknown = sorted(set(faults) - set(FAULTS))
    if not faults or unknown:
        raise ValueError(f"unknown fault(s) {unknown}; choose from {','.join(FAULTS)}")
    return faults


def summary(report: ChaosReport) -> str:
    def one(f: FaultRecord) -> str:
        back = (f" back {f.recovered_s:g}s" if f.recovered_s is not None else
                " (not injected)" if not f.injected else " NOT BACK")
        return f"{f.fault}@{f.at_s:g}s{back} lost {f.sessions_lost} wrong {f.wrong_outputs}"

    return (f"lull chaos: {report.sessions_completed} sessions completed, {report.sessions_lost} lost; "
            f"{report.calls_completed} calls, {report.wrong_outputs} wrong of {report.calls_checked} checked"
            + (f", {report.unchecked} unchecked (time limit)" if report.timed_out else "")
            + "; faults: " + ", ".join(map(one, report.faults)))


def cmd_chaos(args) -> int:
    import ray

    from proto.names import RAY_NAMESPACE
    from controller.assembly.local_platform import read_state

    faults = parse_faults(args.faults)
    if (args.duration <= 0 or args.interval <= 0 or args.programs < 1 or args.redis_down < 0 or args.wait < 0
            or args.shm_full < 0 or args.shm_fill_max_mib < 1 or args.probe_timeout <= 0 or args.time_limit < 0):
        raise ValueError("--duration, --interval and --probe-timeout must be > 0, --programs and --shm-fill-max-mib "
                         ">= 1, --redis-down, --wait, --shm-full and --time-limit >= 0")
    state = read_state()
    target = Target(state["port"], PlatformRedis(state) if state.get("redis_pid") else None, state.get("dram_dir"))
    options = Options(redis_down_s=args.redis_down, wait_s=args.wait, shm_full_s=args.shm_full,
                      shm_fill_max_bytes=args.shm_fill_max_mib * MIB, probe_timeout_s=args.probe_timeout)
    ray.init(address=state["address"], namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="ERROR")
    try:
        report = asyncio.run(run_chaos(target, faults, args.duration, args.interval, args.programs, options,
                                       args.seed, args.time_limit))
    finally:
        ray.shutdown()
    print(summary(report))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report.to_json(), indent=2))
    return 0 if report.sessions_lost == 0 and report.wrong_outputs == 0 and not report.timed_out else 1
