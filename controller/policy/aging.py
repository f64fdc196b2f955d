"""The tenure of the anti-starvation rule (``TierPlanner``, ``PlannerConfig.starvation_age_s``).

Where HBM and DRAM cannot hold every program's KV, aging alone thrashed: each aged
request whose KV was gone displaced a session just recomputed into HBM, which aged in
turn and pushed back, so nearly every call was a recompute (simulated, 1 replica x 80
programs at 128k: 45 M recomputed tokens, 192 output tok/s). So:

- a session recomputed into HBM keeps it for a tenure of ``starvation_age_s``: no aged
  request displaces it, and in a tier an aged request holds it may still run;
- KV is rebuilt one session at a time per GPU tier: an aged request whose KV is gone
  displaces or holds only where no other rebuilt session is in its tenure; otherwise it
  takes free room only.

Aged requests whose KV exists are not limited, so where nothing is recomputed the rule
is as before. The oldest aged request runs within its age, one tenure (the rebuild
before it, or the rebuilt residents of the tier it holds), the longest call running
there and a plan interval; one queued behind k rebuilds waits k tenures more
(``test_planner_tenure``). Pure: reads the plan's view and its clock.
"""

from __future__ import annotations

from collections.abc import Set

from controller.policy.overlay import Overlay
from controller.policy.state import SessionRecord
from controller.policy.types import Location, Tier


def rebuilt(view: Overlay, session_id: str, age: float | None) -> bool:
    """In its tenure: its KV was recomputed into the HBM it holds less than ``age`` ago."""
    since = view.record(session_id).rebuilt_at
    return since is not None and age is not None and view.now - since < age \
        and view.location(session_id).tier is Tier.GPU


def lost(view: Overlay, record: SessionRecord) -> bool:
    """Its KV is gone: admitting it recomputes its context."""
    return view.location(record.session_id).tier is Tier.WAITING and record.context_tokens > 0


def may_force(view: Overlay, where: Location, forced: Set[Location], requester: str, age: float | None) -> bool:
    """Whether an aged request may displace for room in (or hold) ``where``: one whose KV
    is gone only while no other rebuilt session there is in its tenure, nor one entered
    in this plan (``forced``)."""
    if not lost(view, view.record(requester)):
        return True
    return where not in forced and not any(s != requester and rebuilt(view, s, age) for s in view.residents(where))
