"""The planner weighs the shared tier's link where its owner reports it (the simulator):
a returning session whose copy the link would deliver later than a prefill rebuilds it
is recomputed instead (its shared copy dropped), otherwise its copy is promoted. Driven
through the real ``PlanDriver``, so what the call waits on (``was``) is checked too."""

from __future__ import annotations

from controller.policy import POLICY_DEFINITIONS, PlanDriver
from controller.policy.types import SHARED, WAITING, Location, MoveReason, Tier

GPU = Location(Tier.GPU, "r1")


class Recorder:
    """A mechanism that carries every decision out at once and records it."""

    def __init__(self) -> None:
        self.moves = []
        self.admits = []

    async def release(self, release, free_kv):
        pass

    async def move(self, move):
        self.moves.append(move)
        return True

    def admitted(self, admit, was, kv_tokens, now):
        self.admits.append((admit.session_id, was, kv_tokens))


def _returning(link: tuple | None) -> tuple[PlanDriver, Recorder]:
    """``a`` ran a 610-token call, was displaced to the shared tier by ``b`` (no DRAM),
    ``b`` closed; at 6 s ``a``'s next request arrives with the link reported as ``link``
    (``report_shared_link``'s arguments; None: not reported)."""
    recorder = Recorder()
    driver = PlanDriver(POLICY_DEFINITIONS.get("lull"), recorder)
    driver.add_replica("r1", 700, 0)
    driver.set_shared_capacity(10_000)
    driver.open("a", 0.0)
    driver.request("a", 0.0, 600, 10)
    driver.step_now(0.0)
    driver.finished("a", 1.0, 610)
    driver.open("b", 2.0)
    driver.request("b", 2.0, 600, 10)
    driver.step_now(2.0)
    assert driver.state.get("a").location == SHARED
    driver.finished("b", 5.0, 610)
    driver.close("b", 5.0)
    driver.step_now(5.0)
    if link is not None:
        driver.state.report_shared_link(*link)
    driver.request("a", 6.0, 690, 10)
    recorder.moves.clear()
    recorder.admits.clear()
    return driver, recorder


def test_a_copy_the_link_would_deliver_after_a_prefill_is_dropped_and_recomputed():
    # The link is busy for 94 s more: the copy lands at ~94.6 s, a prefill takes 0.061 s.
    driver, recorder = _returning((100.0, 1000.0, lambda tokens: tokens / 10_000))
    plan = driver.step_now(6.0)
    assert [(m.session_id, m.src, m.dst, m.reason) for m in plan.moves] == [
        ("a", SHARED, WAITING, MoveReason.RECOMPUTE), ("a", WAITING, GPU, MoveReason.PROMOTE)]
    assert [m.dst for m in recorder.moves] == [WAITING], "the shared copy is dropped, nothing copied"
    assert recorder.admits == [("a", WAITING, 610)], "the call waits on a recompute"
    assert driver.state.get("a").request.kept_kv is False
    driver.state.check_integrity()


def test_a_copy_the_link_delivers_before_a_prefill_would_is_promoted():
    # The link is idle: the copy lands in 0.61 s, a prefill would take 10 s.
    driver, recorder = _returning((0.0, 1000.0, lambda tokens: 10.0))
    plan = driver.step_now(6.0)
    assert [(m.src, m.dst, m.reason) for m in plan.moves] == [(SHARED, GPU, MoveReason.PROMOTE)]
    assert recorder.admits == [("a", SHARED, 610)]
    assert driver.state.get("a").request.kept_kv is True


def test_without_a_reported_link_or_recompute_time_the_copy_is_promoted():
    for link in (None, (100.0, 1000.0)):  # live reports no link; a link without recompute time
        driver, recorder = _returning(link)
        plan = driver.step_now(6.0)
        assert [(m.src, m.dst) for m in plan.moves] == [(SHARED, GPU)], link
        assert recorder.admits == [("a", SHARED, 610)]
