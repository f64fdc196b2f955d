"""``lull bench-kv`` end to end on the real data plane, at toy scale.

Timings are not compared: this machine is noisy. What must hold is that every
case hit (or missed) where it claims, and that every figure is there.
"""

from __future__ import annotations

import json

from controller.cli import main
from controller.cli.bench.kv import MOVES, TIERS

BLOCK = 32


def test_bench_kv_runs_and_verifies_every_case(tmp_path):
    out = tmp_path / "bench.json"
    assert main(["bench-kv", "--context", "64", "--repeats", "1", "--json", str(out),
                 "--report", str(tmp_path / "report")]) == 0
    result = json.loads(out.read_text())
    assert "host memory" in result["note"]
    assert result["settings"]["contexts"] == [64] and result["machine"]["vllm"]
    figures = result["contexts"]["64"]
    assert set(figures["ttft_s"]) == set(TIERS)
    assert all(figures["ttft_s"][t] > 0 for t in TIERS)
    checks = {tier: figures["checks"][tier][0] for tier in TIERS}
    assert checks["gpu"]["cached_tokens"] >= BLOCK and checks["gpu"]["loaded_tokens"] == 0
    for tier in ("dram", "shared"):
        assert checks[tier]["loaded_tokens"] == checks[tier]["cached_tokens"] >= BLOCK
    assert checks["recompute"] == {"cached_tokens": 0, "loaded_tokens": 0, "expected_min_cached_tokens": 0}
    for name in MOVES:
        move = figures["moves"][name]
        assert move["samples"] >= 1 and move["seconds"] > 0 and move["bytes"] >= BLOCK * 2048
        assert move["bytes_per_s"] > 0
    assert (tmp_path / "report" / "bench-kv.md").exists() and (tmp_path / "report" / "ttft_by_tier.png").exists()
