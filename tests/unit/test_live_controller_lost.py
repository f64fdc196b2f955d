"""The live controller when a session's KV is not where a move looks for it: a DRAM copy
gone (an agent or Redis restart), a GPU-tier session never written through (a full
DRAM tmpfs). Same plane as ``test_live_controller``: real node agents over real gRPC,
real DRAM stores, no engine, a ``FakeClock``."""

from __future__ import annotations

import asyncio

from controller.policy import Location, Tier
from controller.runtime.mechanism import WRITE_THROUGH_GRACE_S
from tests.unit.test_live_controller import gated, plane, run, s1_demoted_to_dram, s1_running, where  # noqa: F401


def test_a_session_whose_dram_copy_is_gone_is_recomputed_at_once(plane):
    """The agent answers SOURCE_NOT_FOUND for a promotion whose DRAM copy is gone (a restart
    emptied the tier): the books drop the copy and the request runs now, recomputed,
    instead of retrying the copy until its gate timeout."""
    agents, addresses, engines = plane

    async def scenario():
        ctl, _ = await s1_demoted_to_dram(addresses, engines)
        engines["r1"].finish(ctl, "s2", 200)
        await ctl.quiesce()
        assert where(ctl, "s1") == Location(Tier.DRAM, "r1")
        agents["n1"].dram.drop_session("s1")  # behind the controller's back
        real_release, released = ctl.mover.release, []

        async def recording(*args):
            released.append(args[:2])
            return await real_release(*args)

        ctl.mover.release = recording
        admission = await ctl.admit("s1", "t", 250, 20, timeout_s=2)
        assert admission.replica_id == "r1" and where(ctl, "s1") == Location(Tier.GPU, "r1")
        assert ("s1", Location(Tier.DRAM, "r1")) in released  # whatever was left of the copy is dropped
        ctl.check_integrity()

    run(scenario)


def test_a_gpu_session_never_written_through_is_recomputed_after_the_grace_and_the_gated_call_runs(plane):
    """s1's write-through was refused (its DRAM tier's tmpfs full): its KV is only in the engine,
    and the agent answers SOURCE_NOT_FOUND to every demotion. Within the grace that is retried (the
    save may be on its way); after it, s1 is booked as recomputed and its GPU room freed, so s2 runs
    instead of waiting at the gate for good (found by `lull chaos`'s shm-full fault)."""
    agents, addresses, engines = plane

    async def scenario():
        ctl, clock = await s1_running(addresses)
        waiting = await gated(ctl, "s2", 150)
        engines["r1"].finish(ctl, "s1", 240, written=False)
        await ctl.quiesce()
        assert not waiting.done() and where(ctl, "s1") == Location(Tier.GPU, "r1")
        clock.advance(WRITE_THROUGH_GRACE_S)
        await ctl.plan_step()  # the backstop tick
        admission = await asyncio.wait_for(waiting, 3)
        assert admission.replica_id == "r1" and where(ctl, "s2") == Location(Tier.GPU, "r1")
        assert where(ctl, "s1").tier is Tier.WAITING
        ctl.check_integrity()

    run(scenario)
