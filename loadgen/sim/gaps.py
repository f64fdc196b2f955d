"""Tool-call gap models: the traced gaps as they are, or MORI's published statistics.

MORI (its Table of tool-call gaps) reports the time between an LLM call's end and the
next request at P50 1.1 s, P90 2.0 s, P99 20 s; the shared Claude Code traces have
P50 9.0 s, P90 124 s, P99 2,492 s. ``mori`` resamples every gap (a session's first
call keeps none) from a distribution through those three quantiles:

- the body (q <= 0.9) is log-normal through P50 and P90: mu = ln 1.1,
  sigma = ln(2.0 / 1.1) / z(0.9);
- the tail (q > 0.9) is Pareto through P90 and P99: x = 2.0 * (0.1 / (1 - q)) ** (1 / a)
  with 2.0 * 10 ** (1 / a) = 20, so a = 1; it is cut at ``TAIL_CAP_S`` (the paper
  gives no quantile past P99, and a = 1 has no finite mean uncut).

Seeded: the same seed gives every policy the same gaps.
"""

from __future__ import annotations

import math
import random
from statistics import NormalDist

MORI_P50_S, MORI_P90_S, MORI_P99_S = 1.1, 2.0, 20.0
TAIL_CAP_S = 300.0  # no sampled gap is longer: past P99.93
_SIGMA = math.log(MORI_P90_S / MORI_P50_S) / NormalDist().inv_cdf(0.9)
_ALPHA = math.log(10.0) / math.log(MORI_P99_S / MORI_P90_S)  # P90 -> P99 is a tenth of the tail
_BODY = NormalDist(math.log(MORI_P50_S), _SIGMA)


def mori_gap_quantile(q: float) -> float:
    """The gap at quantile ``q`` in [0, 1) of the fitted distribution."""
    if not 0.0 <= q < 1.0:
        raise ValueError(f"q must be in [0, 1), got {q}")
    if q <= 0.9:
        return math.exp(_BODY.inv_cdf(max(q, 1e-12)))
    return min(TAIL_CAP_S, MORI_P90_S * (0.1 / (1.0 - q)) ** (1.0 / _ALPHA))


class GapModel:
    """Draws one gap per call, in order; ``trace`` keeps the recorded gap."""

    NAMES = ("trace", "mori")

    def __init__(self, name: str, seed: int) -> None:
        if name not in self.NAMES:
            raise ValueError(f"unknown gap model {name!r}; choose one of {', '.join(self.NAMES)}")
        self.name = name
        self._rng = random.Random(f"gaps:{seed}")

    def gap(self, traced_s: float) -> float:
        return traced_s if self.name == "trace" else mori_gap_quantile(self._rng.random())

    def describe(self) -> str:
        if self.name == "trace":
            return "tool-call gaps as traced"
        return (f"tool-call gaps resampled to MORI's statistics (P50 {MORI_P50_S:g} s, P90 {MORI_P90_S:g} s, "
                f"P99 {MORI_P99_S:g} s: log-normal body, Pareto tail cut at {TAIL_CAP_S:g} s)")
