"""``lull sim --gap-model mori``: tool-call gaps resampled to MORI's published statistics."""

import random

import pytest

from loadgen.sim.gaps import MORI_P50_S, MORI_P90_S, MORI_P99_S, TAIL_CAP_S, GapModel, mori_gap_quantile
from loadgen.sim.workload import build_workload
from loadgen.traces import load_sessions


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * len(ordered))]


def test_the_fitted_distribution_passes_through_the_papers_three_quantiles():
    assert mori_gap_quantile(0.5) == pytest.approx(MORI_P50_S)
    assert mori_gap_quantile(0.9) == pytest.approx(MORI_P90_S)
    assert mori_gap_quantile(0.99) == pytest.approx(MORI_P99_S)
    assert mori_gap_quantile(0.99999) == TAIL_CAP_S
    with pytest.raises(ValueError, match="q must be"):
        mori_gap_quantile(1.0)


def test_sampled_gaps_match_p50_p90_p99_and_are_seeded():
    model = GapModel("mori", seed=3)
    gaps = [model.gap(500.0) for _ in range(100_000)]
    assert _quantile(gaps, 0.5) == pytest.approx(MORI_P50_S, rel=0.03)
    assert _quantile(gaps, 0.9) == pytest.approx(MORI_P90_S, rel=0.03)
    assert _quantile(gaps, 0.99) == pytest.approx(MORI_P99_S, rel=0.08)
    again = GapModel("mori", seed=3)
    assert [again.gap(500.0) for _ in range(100)] == gaps[:100]
    assert GapModel("trace", seed=3).gap(500.0) == 500.0
    with pytest.raises(ValueError, match="unknown gap model"):
        GapModel("poisson", seed=0)


def test_the_workload_resamples_every_gap_but_a_sessions_first():
    sessions = load_sessions(limit=12)
    traced = build_workload(sessions, context_window=32_768, seed=0)
    mori = build_workload(sessions, context_window=32_768, seed=0, gap_model="mori")
    assert [len(s.calls) for s in mori.sessions] == [len(s.calls) for s in traced.sessions]
    gaps = [c.gap_s for s in mori.sessions for c in s.calls[1:]]
    assert all(s.calls[0].gap_s == 0.0 for s in mori.sessions)
    assert _quantile(gaps, 0.5) == pytest.approx(MORI_P50_S, rel=0.15)
    assert _quantile([c.gap_s for s in traced.sessions for c in s.calls[1:]], 0.5) > 3 * MORI_P50_S
    assert "MORI's statistics" in mori.notes
