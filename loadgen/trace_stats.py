"""Figures that describe a trace set, beside those the traces README gives for the
whole public set (main agents, 710 sessions), so a split or a scaled set can be
checked against the real workload.

Every figure is over main agents only, as the README's table is; sub-agents are
counted but not pooled in. Each figure names its population.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt

from loadgen.traces import GapKind, TraceSession

LONG_GAP_S = 300.0  # "gaps over 5 minutes"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True, slots=True)
class FigureSpec:
    name: str
    label: str
    population: str
    readme: tuple[float | None, float | None, float | None]  # p50, p90, p99; None: not given


# The README's table, whole public set (main agents, 710 sessions).
FIGURES: tuple[FigureSpec, ...] = (
    FigureSpec("calls_per_session", "LLM calls per session", "main agents", (45, 155, 329)),
    FigureSpec("tool_gap_s", "tool-call gap (s)", "main-agent tool gaps", (9, 78, 947)),
    FigureSpec("human_gap_s", "human gap (s)", "main-agent human gaps", (185, 2_460, 12_240)),
    FigureSpec("input_tokens", "input tokens per call", "main-agent calls", (104_000, 234_000, 499_000)),
    FigureSpec("output_tokens", "output tokens per call", "main-agent calls", (216, 898, 3_700)),
    # Leading blocks equal to the previous call's, over the call's blocks: what a
    # prefix cache could reuse. Calls with no full block are left out.
    FigureSpec("prefix_shared", "prefix shared with previous call", "main-agent calls 2+", (0.99, None, None)),
)
README_LONG_GAP_FRACTION = 0.07  # "gaps over 5 minutes are 7% of gaps ..."
README_LONG_GAP_KV_SHARE = 0.87  # "... but hold 87% of the idle KV token-seconds"
LONG_GAP_POPULATION = "main-agent gaps of every kind: tool, human, unknown"

Samples = dict[str, npt.NDArray[np.float64]]


@dataclass(frozen=True, slots=True)
class Figure:
    name: str
    label: str
    population: str
    count: int
    p50: float
    p90: float
    p99: float
    readme: tuple[float | None, float | None, float | None]


@dataclass(frozen=True, slots=True)
class TraceStats:
    main_sessions: int
    subagent_sessions: int
    figures: tuple[Figure, ...]
    gaps: int  # main-agent gaps of every kind
    unknown_gaps: int  # of which the kind could not be told (see GapKind.UNKNOWN)
    long_gap_fraction: float
    long_gap_kv_share: float  # of gap x KV held (the previous call's input + output)

    def figure(self, name: str) -> Figure:
        return next(figure for figure in self.figures if figure.name == name)

    def to_json(self) -> dict[str, object]:
        result = asdict(self)
        result["figures"] = [
            {**asdict(f), "readme": dict(zip(("p50", "p90", "p99"), f.readme))} for f in self.figures
        ]
        result["long_gap_s"] = LONG_GAP_S
        result["long_gap_population"] = LONG_GAP_POPULATION
        result["readme_long_gap_fraction"] = README_LONG_GAP_FRACTION
        result["readme_long_gap_kv_share"] = README_LONG_GAP_KV_SHARE
        return result


def session_samples(session: TraceSession) -> Samples:
    """One main agent's contribution to every figure, so sessions can be resampled."""
    calls = session.calls
    gaps = calls[1:]
    shared = [
        call.hash_ids.shared_prefix(previous.hash_ids) / len(call.hash_ids)
        for previous, call in zip(calls, gaps)
        if len(call.hash_ids)
    ]
    return {
        "calls_per_session": np.array([len(calls)], dtype=np.float64),
        "tool_gap_s": np.array([c.gap_s for c in gaps if c.gap_kind is GapKind.TOOL]),
        "human_gap_s": np.array([c.gap_s for c in gaps if c.gap_kind is GapKind.HUMAN]),
        "input_tokens": np.array([c.input_tokens for c in calls], dtype=np.float64),
        "output_tokens": np.array([c.output_tokens for c in calls], dtype=np.float64),
        "prefix_shared": np.array(shared, dtype=np.float64),
        "gap_s": np.array([c.gap_s for c in gaps], dtype=np.float64),
        # KV held through a gap: what the previous call left, input and output.
        "gap_kv_token_s": np.array(
            [c.gap_s * p.context_tokens for p, c in zip(calls, gaps)], dtype=np.float64
        ),
        "unknown_gaps": np.array([sum(c.gap_kind is GapKind.UNKNOWN for c in gaps)], dtype=np.float64),
    }


def pool(samples: Iterable[Samples]) -> Samples:
    samples = list(samples)
    if not samples:
        raise ValueError("no main-agent sessions to describe")
    return {key: np.concatenate([s[key] for s in samples]) for key in samples[0]}


def summarize(pooled: Samples, main_sessions: int, subagent_sessions: int = 0) -> TraceStats:
    figures = []
    for spec in FIGURES:
        values = pooled[spec.name]
        p50, p90, p99 = (
            np.percentile(values, PERCENTILES).tolist() if values.size else [float("nan")] * 3
        )
        figures.append(Figure(spec.name, spec.label, spec.population, int(values.size), p50, p90, p99, spec.readme))
    gaps, held = pooled["gap_s"], pooled["gap_kv_token_s"]
    long = gaps > LONG_GAP_S
    return TraceStats(
        main_sessions=main_sessions,
        subagent_sessions=subagent_sessions,
        figures=tuple(figures),
        gaps=int(gaps.size),
        unknown_gaps=int(pooled["unknown_gaps"].sum()),
        long_gap_fraction=float(long.mean()) if gaps.size else float("nan"),
        long_gap_kv_share=float(held[long].sum() / held.sum()) if held.sum() > 0 else float("nan"),
    )


def compute_stats(sessions: Sequence[TraceSession]) -> TraceStats:
    main = [session for session in sessions if not session.is_subagent]
    return summarize(pool(session_samples(s) for s in main), len(main), len(sessions) - len(main))
