"""The cancellation contract across a real Ray actor boundary: ``ray.cancel`` on a gated
``admit`` raises CancelledError inside the controller's coroutine, which withdraws the
call; the caller's ref raises TaskCancelledError, and the session is admitted again later.

A real Ray (local) and the real ``Controller`` / ``LiveController`` in a thin actor shell;
the mover is a stub (``NoMoves``), since nothing here moves KV and no node agent runs.
"""

from __future__ import annotations

import time

import pytest
import ray
from ray.exceptions import TaskCancelledError

from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from tests.unit.test_gateway_rest import NoMoves


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=1, include_dashboard=False, namespace="lull-cancel-test", log_to_driver=False)
    yield
    ray.shutdown()


@ray.remote(num_cpus=0, max_concurrency=100)
class ControllerShell(Controller):
    def __init__(self) -> None:
        live = LiveController(NoMoves())
        live.add_replica("r1", "n1", 300, 300)
        super().__init__(live)


def wait_until(predicate, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_ray_cancel_of_a_gated_admit_withdraws_it(local_ray):
    shell = ControllerShell.remote()
    assert ray.get(shell.admit.remote("s1", "t", 200, 50, 10)).replica_id == "r1"  # 250 of 300
    gated = shell.admit.remote("s2", "t", 150, 50, 60)
    wait_until(lambda: ray.get(shell.snapshot.remote())["gated"] == 1)
    ray.cancel(gated)
    with pytest.raises(TaskCancelledError):
        ray.get(gated, timeout=20)
    snapshot = ray.get(shell.snapshot.remote())
    assert snapshot["gated"] == 0
    assert {s["session_id"]: s["phase"] for s in snapshot["sessions"]} == {"s1": "llm", "s2": "tool"}
    assert [t["used_tokens"] for t in snapshot["tiers"] if t["tier"] == "gpu"] == [250]
    ray.get(shell.call_finished.remote("s1", 60))  # room for s2 without moving s1
    assert ray.get(shell.admit.remote("s2", "t", 150, 50, 10)).replica_id == "r1"


def test_a_gateway_caller_who_leaves_while_gated_leaks_nothing(local_ray):
    """The gateway's side: its task awaiting `ControllerClient.admit` is cancelled (the client
    disconnected); the client cancels the actor's admit, and the GPU books are back at baseline."""
    import asyncio

    from controller.gateway.controller_client import ControllerClient

    shell = ControllerShell.remote()
    client = ControllerClient(shell)
    client._launch = {}  # the shell is never relaunched: no launch options to learn first

    async def scenario() -> dict:
        await client.admit("s1", "t", 200, 50, 10)  # 250 of 300
        gated = asyncio.get_running_loop().create_task(client.admit("s2", "t", 150, 50, 60))
        while (await shell.snapshot.remote())["gated"] != 1:
            await asyncio.sleep(0.05)
        gated.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gated
        while (await shell.snapshot.remote())["gated"] != 0 or client._pending:
            await asyncio.sleep(0.05)
        return await shell.snapshot.remote()

    snapshot = asyncio.run(asyncio.wait_for(scenario(), 30))  # a leaked gate entry never clears
    assert [t["used_tokens"] for t in snapshot["tiers"] if t["tier"] == "gpu"] == [250]  # s1's only
    ray.get(shell.call_finished.remote("s1", 60))
    assert ray.get(shell.admit.remote("s2", "t", 150, 50, 10)).replica_id == "r1"


@ray.remote(num_cpus=0, max_concurrency=100)
class SlowToAnswerShell(Controller):
    """Its admit, once granted, takes 1 s to return, with no await left (no CancelledError can
    land there): a cancel sent meanwhile finds the admission granted."""

    def __init__(self) -> None:
        live = LiveController(NoMoves())
        live.add_replica("r1", "n1", 300, 300)
        super().__init__(live)

    async def admit(self, *args):
        admitted = await Controller.admit(self, *args)
        time.sleep(1.0)
        return admitted


def test_an_admission_granted_as_its_caller_left_is_handed_back(local_ray):
    """Ray answers TaskCancelledError for an actor call cancelled while it ran, even one that
    then ran to its end: here an admit that granted the call. The caller cannot tell from the
    reply; its admission is handed back by ticket, else the session stays booked in a call
    nobody runs and its next call waits for its turn until the gate timeout (found by `lull
    chaos`'s `disconnect` fault under load)."""
    import asyncio

    from controller.gateway.controller_client import ControllerClient

    shell = SlowToAnswerShell.remote()
    client = ControllerClient(shell)
    client._launch = {}

    async def scenario() -> tuple[dict, str]:
        leaving = asyncio.get_running_loop().create_task(client.admit("s1", "t", 200, 50, 10))
        await asyncio.sleep(0.5)  # granted, not yet answered
        leaving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        while client._pending:
            await asyncio.sleep(0.05)
        snapshot = await shell.snapshot.remote()
        again = await asyncio.wait_for(client.admit("s1", "t", 200, 50, 2), 5)
        return snapshot, again.replica_id

    snapshot, replica = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert [s for s in snapshot["sessions"] if s["phase"] == "llm"] == []  # no call booked as running
    assert [t["used_tokens"] for t in snapshot["tiers"] if t["tier"] == "gpu"] == [0]  # the reservation is back
    assert replica == "r1"  # its next call runs
    assert ray.get(shell.withdraw.remote("s1", "not-its-ticket")) is False  # the running call is not another's
