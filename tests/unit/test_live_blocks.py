"""The live controller books whole KV blocks (``block_tokens``), as vLLM allocates them.

The same set-up as test_live_controller.py: real node agents behind real gRPC, the real
``LiveController`` and ``GrpcMover``, a ``FakeClock``; the engine's write-through is done
by hand (``tests.support.Engine``), since no engine runs here.
"""

from __future__ import annotations

import pytest

from controller.policy import Location, Tier
from controller.runtime import GrpcMover, LiveController
from tests.support import FakeClock
from tests.unit.test_live_controller import controller, gated, plane, run, where  # noqa: F401


def test_the_books_count_whole_blocks_so_admitted_calls_fit_the_engines_blocks(plane):
    """Found by `lull chaos`: calls that fit the GPU tier's tokens but not its blocks (vLLM
    allocates whole blocks) were admitted, then waited inside vLLM for blocks only a release
    frees (128 s, until a timeout's side effect released one). With the engine's block size the
    books hold whole blocks: 510 + 514 tokens fit 1,024, but 16 + 17 blocks of 32 do not, so the
    second call waits at the gate until the first one's session can be demoted."""
    _, addresses, engines = plane

    async def scenario():
        clock = FakeClock()
        ctl = LiveController(GrpcMover(addresses, timeout_s=5), clock=lambda: clock.now, block_tokens=32)
        ctl.add_replica("r1", "n1", 1024, 2048)
        gpu = Location(Tier.GPU, "r1")
        await ctl.admit("a", "t", 500, 10, timeout_s=1)
        assert ctl.state.get("a").footprint == 512 and ctl.state.used[gpu] == 512
        waiting = await gated(ctl, "b", 500, 14)  # 514 tokens: 17 blocks, 15 left
        clock.advance(2.0)
        engines["r1"].finish(ctl, "a", 505)  # 16 blocks; in its tool call it may be demoted
        assert (await waiting).replica_id == "r1"
        assert where(ctl, "a") == Location(Tier.DRAM, "r1") and ctl.state.get("a").footprint == 512
        assert ctl.state.used[gpu] == 544  # 17 whole blocks
        ctl.check_integrity()

    run(scenario)


def test_without_a_block_size_the_books_count_tokens(plane):
    """The contrast (and the simulator's way): in tokens the same two calls fit together."""
    _, addresses, _ = plane

    async def scenario():
        ctl, _ = controller(addresses)
        ctl.add_replica("r9", "n1", 1024, 2048)
        ctl.remove_replica("r1")
        await ctl.admit("a", "t", 500, 10, timeout_s=1)
        assert (await ctl.admit("b", "t", 500, 14, timeout_s=1)).replica_id == "r9"
        ctl.check_integrity()

    run(scenario)


def test_block_tokens_must_be_a_positive_integer(plane):
    _, addresses, _ = plane
    for bad in (0, -32, 1.5, "32"):
        with pytest.raises(ValueError, match="block_tokens an integer >= 1"):
            LiveController(GrpcMover(addresses), block_tokens=bad)
