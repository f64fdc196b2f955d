"""`lull chaos` with the faults that strike the KV tiers, against a live platform (the Serve app
of `controller.assembly:build_app`, one vLLM-on-CPU engine in float32, the controller actor, a
node agent, a real Redis), its DRAM tier on a 16 MiB tmpfs of its own.

Tiers small enough that sessions move all the time: a GPU tier of 1,024 tokens, a DRAM tier
of about 1,500, so idle sessions go on to Redis. In turn: a node agent killed (mid-move
when one is seen), Redis restarted empty under sessions booked in it, the DRAM tier's
filesystem filled until ENOSPC, clients that hang up mid-stream and while gated. No session may
be lost, and every answer must equal the same prompt answered from scratch after the faults.

The tmpfs needs root (mount); without it `shm-full` is left out, said in the output.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from pathlib import Path

import pytest

from controller.cli.bench.chaos import run_chaos, summary
from controller.cli.bench.chaos_faults import MIB, Options, Target
from tests.integration.live_platform import serve_platform
from workers.redis_server import free_port

PORT = free_port()
KEY = "sk-chaos-test"
FAULTS = ["agent", "redis-resident", "shm-full", "disconnect"]


@pytest.fixture(scope="module")
def tmpfs():
    """A 16 MiB tmpfs (None when this user cannot mount one)."""
    root = tempfile.mkdtemp(prefix="lull-chaos-tmpfs-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", root], capture_output=True).returncode == 0
    try:
        yield root if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", "-l", root], check=False)
        os.rmdir(root)


@pytest.fixture(scope="module")
def platform(tmpfs):
    env = {"LULL_API_KEYS": f"acme:{KEY}", "LULL_ENGINE__MAX_MODEL_LEN": "1024",
           "LULL_TIERS__DRAM_CAPACITY_GIB": "0.003", "LULL_GATEWAY__GATE_TIMEOUT_S": "60"}
    args = {"tiers": {"gpu_tier_tokens": 1024}, "gateway": {"default_max_tokens": 8}}
    with serve_platform(env, args, port=PORT, dram_root=tmpfs or "/dev/shm") as redis:
        dram_dir = next(p for p in Path(tmpfs or "/dev/shm").iterdir() if p.name.startswith("lull-test-dram-")) \
            if tmpfs else None
        yield redis, dram_dir


# The run's limit (a stalled platform fails the test in minutes, never hangs CI); a passing run
# takes about 35 s of replay and check here.
TIME_LIMIT_S = 300


def test_chaos_with_the_tier_faults_loses_no_session_and_every_answer_is_right(platform, monkeypatch):
    redis, dram_dir = platform
    monkeypatch.setenv("LULL_CHAOS_API_KEY", KEY)
    faults = FAULTS if dram_dir else [f for f in FAULTS if f != "shm-full"]
    if not dram_dir:
        print("no tmpfs could be mounted here: shm-full left out")
    options = Options(wait_s=20, shm_full_s=3, shm_fill_max_bytes=16 * MIB, disconnect_sessions=3, probe_timeout_s=60)
    target = Target(PORT, redis, str(dram_dir) if dram_dir else None)
    report = asyncio.run(run_chaos(target, faults, duration_s=20, interval_s=3, programs=3, options=options, seed=1,
                                   time_limit_s=TIME_LIMIT_S))
    print(summary(report))
    for fault in report.faults:
        print(f"  {fault.fault}: {fault.note}")
    assert [f.fault for f in report.faults] == faults
    assert all(f.injected and f.recovered_s is not None for f in report.faults), report.faults
    assert not report.timed_out, f"the run passed its {TIME_LIMIT_S} s limit"
    assert report.sessions_lost == 0, report.errors
    assert report.wrong_outputs == 0, report.wrong
    assert report.calls_checked == report.calls_completed > 20
    resident = next(f for f in report.faults if f.fault == "redis-resident")
    assert resident.at_moment, resident.note  # Redis restarted with sessions in it
