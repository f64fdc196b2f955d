"""The tenure of the anti-starvation rule (``TierPlanner``, ``PlannerConfig.starvation_age_s``).

Where HBM and DRAM cannot hold every program's KV, aging alone thrashed: each aged
request whose KV was gone displaced a session just recomputed into HBM, which aged in
turn and pushed back, so nearly every call was a recompute (simulated, 1 replica x 80
programs at 128k: 45 M recomputed tokens, 192 output tok/s). So:

- a session recomputed into HBM keeps it for a tenure of ``starvation_age_s``: no aged
  request displaces it, and in a tier an aged request holds it may still run;
- KV is rebuilt one session at a time per GPU tier: an aged request whose KV is gone,
  or whose displacements would drop KV (its replica's DRAM and the shared tier have
  less room than it needs), displaces or holds only where no other rebuilt session is
  in its tenure; otherwise it takes free room only.

Other aged requests are not limited, so where no KV is dropped the rule is as before.
The oldest aged request runs within its age, one tenure (the rebuild before it, or the
rebuilt residents of the tier it holds), the longest call running there and a plan
interval; one queued behind k rebuilds waits k tenures more (``test_planner_tenure``).
Pure: reads the plan's view and its clock.
"""

from __future__ import annotations

from controller.policy.overlay import Overlay
from controller.policy.state import SessionRecord
from controller.policy.types import SHARED, Location, Tier


def rebuilt(view: Overlay, session_id: str, age: float | None) -> bool:
    """In its tenure: its KV was recomputed into the HBM it holds less than ``age`` ago."""
    since = view.record(session_id).rebuilt_at
    return since is not None and age is not None and view.now - since < age \
        and view.location(session_id).tier is Tier.GPU


def lost(view: Overlay, record: SessionRecord) -> bool:
    """Its KV is gone: admitting it recomputes its context."""
    return view.location(record.session_id).tier is Tier.WAITING and record.context_tokens > 0


def drops_kv(view: Overlay, record: SessionRecord, where: Location) -> bool:
    """Admitting it to ``where`` by force costs a recompute: its KV is gone, or what it
    displaces has less room below (its replica's DRAM and the shared tier) than it needs."""
    need = record.request.need_tokens if record.request else record.context_tokens
    below = view.free(Location(Tier.DRAM, where.replica)) + max(0, view.free(SHARED))
    return lost(view, record) or below < need


class Rebuilds:
    """One plan's view of the rule: the GPU tiers a rebuild entered in this plan, and
    each tier's rebuilt residents in their tenure. A plan never brings a session in its
    tenure into a tier (only the books set ``rebuilt_at``, and a plan moves nothing from
    one GPU tier to another), so a tier's are those first found there that are still there."""

    def __init__(self, view: Overlay, age: float | None) -> None:
        self.view, self.age = view, age
        self.entered: set[Location] = set()
        self._tenured: dict[Location, frozenset[str]] = {}

    def tenured(self, where: Location) -> frozenset[str]:
        members = self._tenured.get(where)
        if members is None:  # (from the index: a walk over each tier's residents was most of a plan)
            age = self.age
            early = () if age is None else self.view.state.index.rebuilt_after(where, self.view.now - age - 1.0)
            members = frozenset(s for _, s in early  # (a second early: ``rebuilt`` decides, to the last bit)
                                if self.view.location(s) == where and not self.view.released(s)
                                and rebuilt(self.view, s, age))
            self._tenured[where] = members
        if members and any(self.view.location(s) != where for s in members):
            members = self._tenured[where] = frozenset(s for s in members if self.view.location(s) == where)
        return members

    def may_force(self, where: Location, requester: str) -> bool:
        """Whether an aged request may displace for room in (or hold) ``where``: one that
        ``drops_kv`` only while no other rebuilt session there is in its tenure, nor one
        entered in this plan."""
        if where not in self.entered and self.tenured(where) <= {requester}:
            return True
        return not drops_kv(self.view, self.view.record(requester), where)


class HoldOrder:
    """The GPU tiers an aged request that did not fit may hold (``TierPlanner._hold_for``), most
    room displacement could free first, and of them those no older request holds: kept until
    ``held`` grows (it only grows in a plan), not filtered again for each request (at 64
    replicas, aged requests that fail in every plan asked thousands of times a plan)."""

    def __init__(self, bounds: dict[Location, int], held: set[Location]) -> None:
        self.tiers = sorted(bounds, key=lambda g: (bounds[g], g.replica or ""), reverse=True)
        self._held, self._unheld, self._seen = held, self.tiers, 0

    def first(self, capacity: dict[Location, int], need: int) -> Location | None:
        """The first unheld tier that could hold ``need`` at all, else the first held one."""
        if self._seen != len(self._held):
            self._unheld, self._seen = [g for g in self.tiers if g not in self._held], len(self._held)
        return next((g for g in self._unheld if capacity[g] >= need), None) \
            or next((g for g in self.tiers if capacity[g] >= need), None)
