"""Engine holds the books do not place (``runtime.reconcile``): the blocks a replica's
connector keeps after a call, for a session the controller's books put in another tier or
nowhere (a release line that never landed, a controller that restarted). Found by `lull
chaos`: after a controller restart and a Redis outage the engine held blocks nobody would
free, so calls the books admitted waited inside vLLM for blocks.

The set-up of test_reconcile.py: a real ``NodeAgent`` (real ``DramStore``, a real shared tier
on a password-protected redis-server) behind its real gRPC server, the real ``LiveController``
and ``GrpcMover``; what the connector writes (write-through copies, its counters file naming
its holds) is written by hand (``tests.support.Engine``), since no engine runs here."""

from __future__ import annotations

from controller.policy import Location, Tier
from controller.policy.types import SHARED
from controller.runtime.reconcile import Reconciler
from controller.runtime.restore import placements_from_reports
from tests.unit.test_reconcile import DRAM1, GPU1, controller, plane, put_shared, run  # noqa: F401
from workers.connector_control import CONTROL_LOG, engine_dir


def released(agent) -> list[str]:
    path = engine_dir(agent.dram_dir, "r1") / CONTROL_LOG
    lines = path.read_text().splitlines() if path.exists() else []
    return sorted(line.split(" ", 1)[1] for line in lines if line.startswith("release "))


def test_a_pass_releases_holds_the_books_place_elsewhere_and_keeps_their_booked_copies(plane):
    """Held by r1's engine: g (booked there), d (booked in DRAM, its copy labelled so), s (booked
    in the shared tier, its copy in Redis) and x (unknown to the books). A pass releases the
    holds of d, s and x and nothing else: d's DRAM copy and s's shared copy stay, the books do
    not change, and a second pass (the engine having let go) finds nothing."""
    agent, address, engine, _ = plane

    async def scenario():
        ctl = controller(address)
        engine.write_through("d", 40)
        agent.dram.set_label("d", "dram")
        put_shared(agent, "s")
        for session_id, where in (("g", GPU1), ("d", DRAM1), ("s", SHARED)):
            ctl.driver.restore(session_id, where, 40, 0.0)
        engine.hold({"g": 64, "d": 64, "s": 64, "x": 32})
        done = await Reconciler(lambda: ctl, ctl.mover).reconcile()
        assert done.lost == [] and sorted(done.orphans) == [("d", GPU1), ("s", GPU1), ("x", GPU1)]
        assert released(agent) == ["d", "s", "x"]  # the engine's control file: g keeps its hold
        assert [(c.session_id, c.label) for c in agent.dram.sessions()] == [("d", "dram")]
        assert set(agent.shared.sessions()) == {"s"}
        assert {s: r.location for s, r in ctl.state.sessions.items()} == {"g": GPU1, "d": DRAM1, "s": SHARED}
        engine.hold({"g": 64})
        again = await Reconciler(lambda: ctl, ctl.mover).reconcile()
        assert (again.lost, again.orphans) == ([], [])
        ctl.check_integrity()

    run(scenario)


def test_a_restarted_controller_finds_the_engines_holds_in_the_gpu_tier(plane):
    """A hold with no write-through copy is reported (over the agent's gRPC) as the GPU tier of
    its replica, with its tokens, so a restarted controller books it there instead of losing
    track of its blocks; a hold with a write-through copy is reported once."""
    agent, address, engine, _ = plane
    engine.write_through("w", 40)
    engine.hold({"h": 96, "w": 64})

    async def scenario():
        report = await controller(address).mover.report("n1")
        placed = {(p.session_id, p.where, p.tokens) for p in placements_from_reports([report], {"r1"})}
        assert placed == {("h", Location(Tier.GPU, "r1"), 96), ("w", Location(Tier.GPU, "r1"), 40)}

    run(scenario)
