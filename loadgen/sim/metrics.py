"""Metrics that see starvation, for every simulated run.

Mean TTFT over completed first tokens and throughput both reward a policy that never
serves an expensive request: the request is in neither. So every record also carries

- censored TTFT: a request still waiting for its first token when the run ends counts
  with the wait it has had so far (a lower bound on its TTFT, hence "censored");
- the live gate timeout (``gateway.gate_timeout_s``): a request whose wait to run (its
  gate or engine queue; send to launch) exceeded it would have failed live with a 503.
  The simulator does not enforce it (the request keeps waiting and may still run):
  the count says how many calls a live client would have seen fail;
- per-program progress: output tokens each closed-loop program (each open-loop
  session) produced, its percentiles, the programs with none at all, and Jain's
  fairness index over them, ``(sum x)^2 / (n sum x^2)``: 1 when all progress equally,
  1/n when one program has it all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from proto.config import GatewayConfig

GATE_TIMEOUT_S = GatewayConfig().gate_timeout_s  # the live default, one definition


class _Request(Protocol):
    sent: float
    first_token: float | None
    launched: float | None


class _Metrics(Protocol):
    ttft: list[float]
    waits: list[float]


def jain_index(values: Sequence[float]) -> float:
    """Jain's fairness index of ``values`` (>= 0); 0 when there are none or all are 0."""
    x = np.asarray(values, dtype=float)
    if x.size == 0 or not x.any():
        return 0.0
    if (x < 0).any():
        raise ValueError("Jain's index needs values >= 0")
    return float(x.sum() ** 2 / (x.size * (x ** 2).sum()))


def starvation(metrics: _Metrics, pending: Sequence[_Request], progress: Sequence[int], end: float,
               gate_timeout_s: float = GATE_TIMEOUT_S) -> dict:
    """The starvation fields of a run's record (see the module doc). ``pending``: the
    requests in flight at ``end``; ``progress``: output tokens per program."""
    open_waits = [end - r.sent for r in pending if r.first_token is None]
    censored = np.asarray(metrics.ttft + open_waits) if metrics.ttft or open_waits else np.zeros(1)
    unlaunched = [end - r.sent for r in pending if r.launched is None]
    failed = sum(w > gate_timeout_s for w in metrics.waits) + sum(w > gate_timeout_s for w in unlaunched)
    share = np.asarray(progress, dtype=float) if progress else np.zeros(1)
    return {
        "ttft_censored_mean_s": float(censored.mean()),
        "ttft_censored_p50_s": float(np.percentile(censored, 50)),
        "ttft_censored_p99_s": float(np.percentile(censored, 99)),
        "open_waits": len(open_waits),
        "longest_open_wait_s": max(open_waits, default=0.0),
        "gate_timeout_s": gate_timeout_s,
        "calls_past_gate_timeout": int(failed),
        "programs": len(progress),
        "programs_zero_progress": int(sum(1 for p in progress if p == 0)),
        "program_output_p10": float(np.percentile(share, 10)),
        "program_output_p50": float(np.percentile(share, 50)),
        "program_output_p90": float(np.percentile(share, 90)),
        "jain_fairness": jain_index(progress),
    }
