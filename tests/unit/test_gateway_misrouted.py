"""A call admitted to a replica that has left is refused by whichever replica Serve sends it
to, and the gateway admits it again instead of running it outside the books.

Real `GatewayCore`, `ControllerClient`, `Controller` and `LiveController`, vLLM's real
render state for the tiny model. Faked: the engine replicas (Serve and vLLM: the stub
refuses a call admitted to a replica that has left, as `LullEngine.http` does) and the
controller's membership, which needs Ray: on a dead replica's report it removes that
replica from the books, as `Membership.lost` drains one."""

from __future__ import annotations

import asyncio
import json

import pytest

from controller.gateway.controller_client import ControllerClient
from controller.gateway import service
from controller.gateway.service import Call, GatewayCore, Limits
from controller.runtime.actor import Controller
from controller.runtime.live import LiveController
from proto.engine_call import CallUsage, MisroutedCall
from tests.unit.test_gateway_rest import MODEL, NoMoves


class LeftEngines:
    """Replica ``r1`` has left: Serve sends its calls to ``r2``, which refuses them."""

    def __init__(self, departed: bool):
        self.sent: list[str] = []
        self._departed = departed

    async def http(self, replica_id, call):
        self.sent.append(call.replica_id)
        assert call.replica_id == replica_id  # the call names the replica it was admitted to
        if replica_id == "r1":
            raise MisroutedCall(f"call {call.call_id} was admitted to replica r1, not to this one (r2)")
        yield {"status": 200, "headers": [("content-type", "application/json")]}
        yield json.dumps({"object": "chat.completion"}).encode()
        yield CallUsage(1, 5, 0, 2, 7)

    def departed(self, replica_id):
        return self._departed and replica_id == "r1"


class Membership:
    """What the controller's membership does with a lost replica, without Ray."""

    def __init__(self, live: LiveController):
        self.live, self.reports = live, []

    async def lost(self, replica_id, dead):
        self.reports.append((replica_id, dead))
        if dead and replica_id in self.live.nodes:
            self.live.remove_replica(replica_id)


def run_call(counter, departed: bool):
    live = LiveController(NoMoves())
    live.add_replica("r1", "node-1", 4096, 4096)
    live.add_replica("r2", "node-2", 4096, 4096)
    controller = Controller(live)
    controller.membership = Membership(live)
    engines = LeftEngines(departed)
    core = GatewayCore(ControllerClient(controller), engines, counter,
                       Limits(max_model_len=512, max_prompt_tokens=511, default_max_tokens=4, gate_timeout_s=2))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    call = Call(kind="chat", path="/v1/chat/completions", body=body, size=64, tenant="acme", key="acme/s1")

    async def forward():
        forwarded = await core.forward(call)
        return b"".join([chunk async for chunk in forwarded.chunks])

    return asyncio.run(forward()), engines, controller.membership, live


def test_a_call_whose_replica_left_is_admitted_again_elsewhere(counter):
    answer, engines, membership, live = run_call(counter, departed=True)
    assert json.loads(answer)["object"] == "chat.completion"
    assert engines.sent == ["r1", "r2"]  # refused where it was sent, then admitted to r2
    assert membership.reports == [("r1", True)]  # Serve had dropped r1: reported dead
    assert "r1" not in live.nodes


def test_a_misrouted_call_to_a_replica_serve_still_lists_is_not_reported_dead(counter, monkeypatch):
    """A replica not broadcast yet (or slow to be dropped) is looked at, not drained: the
    call is retried for `ENGINE_RETRY_S`, and with the replica still booked it then fails
    with the engine's error."""
    monkeypatch.setattr(service, "ENGINE_RETRY_S", 2.5)
    monkeypatch.setattr(service, "ENGINE_RETRY_WAIT_S", 1.0)
    with pytest.raises(MisroutedCall):
        run_call(counter, departed=False)
