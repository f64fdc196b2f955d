"""`lull chaos`'s bookkeeping without a platform: faults parsed by name, losses and wrong answers
charged to the fault in flight, reports that carry no text, and `fill` on a real 1 MiB
tmpfs (mounted when this user may; skipped otherwise), and the run's time limit against a
gateway that accepts calls and never answers (a local socket server standing for a stalled
platform)."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from controller.cli.bench.chaos import ChaosReport, fill_report, parse_faults, run_chaos, summary
from controller.cli.bench.chaos_faults import FaultRecord, Options, Target, fill
from controller.cli.bench.chaos_replay import CallRecord, Ledger, Loss, Wrong
from tests.support import mounted_tmpfs


def test_faults_are_parsed_by_name_and_an_unknown_one_is_refused():
    assert parse_faults("agent, redis-resident,shm-full,disconnect") == [
        "agent", "redis-resident", "shm-full", "disconnect"]
    with pytest.raises(ValueError, match="unknown fault"):
        parse_faults("agent,meteor")
    with pytest.raises(ValueError):
        parse_faults(" , ")


def test_losses_and_wrong_answers_go_to_the_latest_fault_injected_before_them():
    ledger = Ledger(0.0, sessions_completed=7)
    ledger.calls = [CallRecord("s1", [1, 2], 4, "abc", 1.0), CallRecord("s2", [3], 4, "xyz", 12.0)]
    ledger.losses = [Loss("s0", 2.0, "before any fault"), Loss("s3", 11.0, "TimeoutError")]
    ledger.wrong = [Wrong("s2", 12.0, "the secret answer", "the secret answee")]
    report = ChaosReport(faults=[FaultRecord("agent", 5.0), FaultRecord("shm-full", 8.0, injected=False),
                                 FaultRecord("disconnect", 10.0)])
    fill_report(report, ledger)
    assert (report.sessions_completed, report.sessions_lost, report.wrong_outputs, report.calls_completed) == (7, 2, 1, 2)
    by_name = {f.fault: f for f in report.faults}
    assert (by_name["agent"].sessions_lost, by_name["agent"].wrong_outputs) == (0, 0)
    assert by_name["shm-full"].sessions_lost == 0  # not injected: charged nothing
    assert (by_name["disconnect"].sessions_lost, by_name["disconnect"].wrong_outputs) == (1, 1)
    # The report says where answers differ, never what they say.
    assert report.wrong == [{"session": "s2", "at_s": 12.0, "chars": 17, "reference_chars": 17,
                             "first_difference": 16}]
    assert "secret" not in str(report.to_json()) and "secret" not in summary(report)
    assert "disconnect@10s" in summary(report) and "lost 1 wrong 1" in summary(report)


def test_fill_writes_until_enospc_and_the_filesystem_is_full(tmp_path):
    with mounted_tmpfs(tmp_path / "tmpfs", "1m") as root:
        written = fill(root / "fill")
        assert 1024**2 - 64 * 1024 <= written <= 1024**2
        with pytest.raises(OSError) as error:
            (root / "more").write_bytes(b"x" * 4096)
        assert error.value.errno == 28  # ENOSPC
        os.unlink(root / "fill")
        (root / "more").write_bytes(b"x" * 4096)  # freed: writes succeed again


def test_a_stalled_platform_ends_the_run_at_its_time_limit_with_the_cut_off_sessions_lost():
    async def scenario() -> tuple[ChaosReport, float]:
        async def never_answer(reader, writer):
            await reader.read()  # holds the call open: the platform is stalled
        server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        started = time.monotonic()
        try:
            report = await run_chaos(Target(port), ["shm-full", "shm-full"], duration_s=60, interval_s=0.5,
                                     programs=2, options=Options(probe_timeout_s=30), seed=3, time_limit_s=2.0)
        finally:
            server.close()
        return report, time.monotonic() - started

    report, took = asyncio.run(scenario())
    assert took < 6, f"the run took {took:.1f} s past its 2 s limit"
    assert report.timed_out and report.calls_completed == 0
    assert report.sessions_lost == 2 and all("time limit" in e for e in report.errors)  # one call in flight each
    assert len(report.faults) >= 2 and not any(f.injected for f in report.faults)  # no DRAM folder known here
    assert [f.fault for f in report.faults].count("shm-full") == len(report.faults) < 10  # no spin past the limit
    assert "unchecked (time limit)" in summary(report)
