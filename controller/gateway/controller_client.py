"""`ControllerClient`: the gateway's typed calls to the controller, and how it survives a restart.

The gateway only asks: it admits calls and reports how they ended, tool calls and
closures; replica membership is the controller's own (`controller.runtime.membership`).
A REST call makes two controller calls: `admit` (whose answer also carries the
session's tier and context on arrival, for the gateway's metrics) and `call_finished`
(which also closes a one-off session). `call_finished` is sent without waiting for its
answer: Ray delivers one caller's calls to an actor in order, so the session's next
`admit` is recorded after it, and the client's response does not wait for the books.

The reports of how a call ended (`call_finished`, `call_failed`, an admission handed
back) are sent outside the client request's Ray task context (`_detached`): Serve
cancels a request whose client leaves, even after its last byte, and Ray cancels with
it every call the request sent that has not run yet; a lost report would leave its
session booked in an LLM call, its GPU tier held, for good.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
import uuid
from typing import Any

from proto.actor_errors import cause, controller_gone
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE

log = logging.getLogger(__name__)

# How long a call waits for a killed controller to come back (restarted by Ray, or relaunched here).
CONTROLLER_RESTART_WAIT_S = 20.0


class ControllerClient:
    """Awaitable calls to the controller: a `ControllerActor` handle, or an in-process
    `controller.runtime.actor.Controller` (tests).

    With an actor, a call that finds the controller dead or restarting waits for it (at
    most `restart_wait_s`) and is sent again: Ray restarts the actor, which rebuilds its
    books itself, or, when it was killed for good, this client relaunches it from the
    options the first one was launched with.
    """

    def __init__(self, target: Any, restart_wait_s: float = CONTROLLER_RESTART_WAIT_S):
        self._target = target
        self._is_actor = hasattr(getattr(target, "admit", None), "remote")
        self.restart_wait_s = restart_wait_s
        self._launch: dict | None = None  # the controller's launch options, for a relaunch
        self._recovering = asyncio.Lock()
        self._pending: set[asyncio.Task] = set()  # answers of calls sent without waiting
        self.recoveries = 0

    async def connect(self) -> None:
        """Learn the controller's launch options now, so that no request pays for it later."""
        if self._is_actor and self._launch is None:
            self._launch = await self._call("launch_options")

    # -- the calls ------------------------------------------------------------------------

    async def admit(self, session_id: str, tenant: str, prompt_tokens: int, max_tokens: int, timeout_s: float):
        """`controller.runtime.actor.Admitted` once the call may run; raises GateTimeout,
        SessionClosed, or ValueError for a call that cannot run.

        A caller that leaves while gated (its task is cancelled: the client disconnected)
        withdraws: the controller's waiting admit is cancelled, and an admission granted
        before the cancel reached it is handed back by its ticket, so no reservation leaks."""
        sent: list = []
        ticket = uuid.uuid4().hex
        try:
            return await self._call("admit", session_id, tenant, prompt_tokens, max_tokens, timeout_s, ticket,
                                    sent=sent)
        except asyncio.CancelledError:
            if sent:
                self._withdraw(session_id, ticket, sent[-1])
            raise

    async def call_finished(self, session_id: str, context_tokens: int, close: bool = False,
                            wait: bool = True) -> None:
        """``wait`` False: sent now, its answer only logged when it is an error."""
        if wait or not self._is_actor:
            await self._call("call_finished", session_id, context_tokens, close)
            return
        # Sent here, in order, and outside the request's context (see `_detached`).
        reply = contextvars.Context().run(self._target.call_finished.remote, session_id, context_tokens, close)
        self._detached(_log_failure(reply, session_id))

    async def call_failed(self, session_id: str, lost_replica: str | None = None, dead: bool = False,
                          started: bool = True) -> None:
        """``lost_replica``: the call's replica died (``dead``) or became unreachable under it;
        ``started`` False: the admitted call never reached an engine (its reservation goes back whole)."""
        await asyncio.shield(self._detached(self._call("call_failed", session_id, lost_replica, dead, started)))

    async def tool_call_started(self, session_id: str) -> None:
        await self._call("tool_call_started", session_id)

    async def tool_call_finished(self, session_id: str) -> None:
        await self._call("tool_call_finished", session_id)

    async def close_session(self, session_id: str) -> None:
        await self._call("close_session", session_id)

    async def session_state(self, session_id: str) -> dict | None:
        return await self._call("session_state", session_id)

    async def snapshot(self) -> dict:
        return await self._call("snapshot")

    def _withdraw(self, session_id: str, ticket: str, reply) -> None:
        """Cancel a gated admit whose caller left; if it was granted first, hand the admission back.
        Once the admit has ended, the controller is asked by ticket, whatever the reply says:
        Ray answers TaskCancelledError also for an admit that ran to its end, granted."""
        import ray

        ray.cancel(reply)

        async def hand_back() -> None:
            try:
                await reply
            except BaseException:  # cancelled, or granted as it was cancelled
                pass
            try:
                if await self._call("withdraw", session_id, ticket):
                    log.info("admission of session %s granted after its caller left; handed back", session_id)
            except Exception as error:  # (a controller that restarted meanwhile holds no admission)
                log.warning("withdrawing session %s's admission failed: %s", session_id, type(cause(error)).__name__)

        self._detached(hand_back())

    def _detached(self, coro) -> asyncio.Task:
        """Run ``coro`` in a fresh context, so the Ray calls it sends are no children of the client
        request that asked: Serve cancels a request whose client leaves (even after its last
        byte), and Ray cancels with it every call the request sent that has not run yet; a lost
        report of how a call ended would leave its session booked in a call, and its next call
        queued behind it until the gate timeout."""
        task = asyncio.get_running_loop().create_task(coro, context=contextvars.Context())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    # -- restarts ---------------------------------------------------------------------------

    async def _call(self, name: str, *args, sent: list | None = None):
        """``sent``: receives the reply of each attempt sent to the actor (to cancel it)."""
        if not self._is_actor:
            return await getattr(self._target, name)(*args)
        deadline = time.monotonic() + self.restart_wait_s
        while True:
            target = self._target
            try:
                if self._launch is None and name != "launch_options":
                    self._launch = await target.launch_options.remote()
                reply = getattr(target, name).remote(*args)
                if sent is not None:
                    sent.append(reply)
                return await reply
            except Exception as error:
                if not controller_gone(error) or time.monotonic() > deadline:
                    raise
                log.warning("controller unavailable (%s) during %s; waiting for it", type(error).__name__, name)
                await self._recover(target, deadline)

    async def _recover(self, failed: Any, deadline: float) -> None:
        """Find the restarted controller (or launch one) and wait until it has rebuilt its books."""
        import ray

        from controller.runtime.actor import launch_controller

        async with self._recovering:
            if self._target is not failed:
                return  # another call recovered it meanwhile
            while True:
                await asyncio.sleep(0.2)
                try:
                    handle = await asyncio.to_thread(ray.get_actor, CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
                except ValueError:  # killed for good: the name is free
                    if self._launch is None:
                        raise RuntimeError("the controller is gone and its launch options are unknown") from None
                    options = dict(self._launch)
                    handle = launch_controller(options.pop("agents"), detached=True, **options)
                try:
                    await handle.start.remote(None)
                except Exception as error:
                    if time.monotonic() > deadline:
                        raise
                    log.warning("controller not back yet (%s)", type(error).__name__)
                    continue
                self._target = handle
                self.recoveries += 1
                log.warning("controller back after a restart")
                return


async def _log_failure(reply, session_id: str) -> None:
    try:
        await reply
    except Exception as error:  # restarted meanwhile and rebuilt without this call: the answer stands
        log.warning("call_finished for session %s not recorded: %s", session_id, type(cause(error)).__name__)
