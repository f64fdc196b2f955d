"""Before a run, ``lull bench`` needs empty books (a policy switch starts a fresh controller):
what to do about sessions still open, decided from the controller's snapshot alone.

Closed sessions leave the books on the next planning step: wait for them. Sessions another
client left open expire after ``policy.session_idle_ttl_s`` idle: wait them out when that
TTL is short enough (``MAX_WAIT_TTL_S``), printing progress, else refuse at once, naming the
setting and how to shorten it. Pure: the caller passes each snapshot and the time.
"""

from __future__ import annotations

from dataclasses import dataclass

TTL_SETTING = "policy.session_idle_ttl_s"
MAX_WAIT_TTL_S = 120.0  # the longest TTL the bench waits out rather than refuse
DRAIN_S = 60.0  # beyond the last expiry: the tick that closes it and the release of its KV
PROGRESS_S = 10.0  # how often an unchanged wait is reported again


@dataclass(frozen=True)
class Leftovers:
    action: str  # "go", "wait" (at most wait_s) or "refuse"
    message: str = ""
    wait_s: float = 0.0
    count: int = 0


def decide(snapshot: dict) -> Leftovers:
    """What one snapshot of the controller (``Controller.snapshot``) calls for."""
    sessions = snapshot["sessions"]
    if not sessions and not snapshot["gated"] and not snapshot.get("queued", 0):
        return Leftovers("go")
    left_open = [s for s in sessions if not s["closing"]]
    if not left_open:
        return Leftovers("wait", f"{len(sessions)} closed session(s) leaving the books", DRAIN_S, len(sessions))
    ttl, count = snapshot.get("session_ttl_s", 0.0), len(left_open)
    if not ttl or ttl > MAX_WAIT_TTL_S:
        why = ("they never expire" if not ttl else
               f"they expire only after {ttl:g} s idle, longer than the bench waits ({MAX_WAIT_TTL_S:g} s)")
        return Leftovers("refuse", f"{count} session(s) still open (another client's?) and {TTL_SETTING} is "
                                   f"{ttl:g}: {why}. Close them, or start the platform with a shorter TTL, "
                                   f"e.g. `lull up --set {TTL_SETTING}=60`", count=count)
    # A session whose call runs or waits expires a whole TTL after that call ends.
    last = max(ttl - (s["idle_s"] if s["phase"] == "tool" else 0.0) for s in left_open)
    return Leftovers("wait", f"waiting for {count} session(s) left open to expire ({TTL_SETTING} = {ttl:g} s): "
                             f"the last in about {max(0.0, last):.0f} s", max(0.0, last) + DRAIN_S, count)


class LeftoverWait:
    """One wait for empty books: ``step`` with each snapshot until it answers "go". The
    wait's bound is set by the first snapshot, so sessions that keep arriving (another
    client at work) end it with an error instead of extending it."""

    def __init__(self) -> None:
        self.deadline: float | None = None
        self.waited_from = 0.0
        self._said: tuple[int, float] | None = None  # (count, when) of the last progress line

    def step(self, snapshot: dict, now: float) -> tuple[bool, str | None]:
        """(done, a progress line to print or None). Raises ValueError for leftovers the bench
        cannot wait out, RuntimeError when they outlast the wait."""
        plan = decide(snapshot)
        if plan.action == "go":
            return True, None
        if plan.action == "refuse":
            raise ValueError(plan.message)
        if self.deadline is None:
            self.deadline, self.waited_from = now + plan.wait_s, now
        if now > self.deadline:
            raise RuntimeError(f"{plan.count} session(s) still open after {now - self.waited_from:.0f} s; "
                               "is another client using this platform?")
        if self._said is None or self._said[0] != plan.count or now - self._said[1] >= PROGRESS_S:
            self._said = (plan.count, now)
            return False, plan.message
        return False, None
