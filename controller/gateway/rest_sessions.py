"""Lull's own REST endpoints for sessions: open, close, tool-call events, state.

A client that knows Lull opens a session and reports its tool calls, so the controller
knows how idle the session is; every other client gets its session from its headers or
body (`protocol.session_id_from`), or an inferred one.
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request

from controller.gateway.protocol import ApiError, Authenticator, check_session_id, session_key
from controller.gateway.service import GatewayCore


def session_routes(app: FastAPI, core: GatewayCore, auth: Authenticator) -> None:
    # Opened with POST /v1/sessions but not yet called: the controller learns of a
    # session at its first call, so until then only this gateway knows it exists.
    opened: dict[str, float] = {}

    def key_of(request: Request, sid: str) -> str:
        tenant = auth.tenant(request.headers.get("authorization"), request.headers.get("x-api-key"))
        return session_key(tenant, check_session_id(sid, "session id"))

    @app.post("/v1/sessions")
    async def open_session(request: Request):
        sid = f"sess-{uuid.uuid4().hex}"
        opened[key_of(request, sid)] = time.time()
        return {"id": sid, "object": "session"}

    @app.delete("/v1/sessions/{sid}")
    async def close_session(sid: str, request: Request):
        key = key_of(request, sid)
        was_opened = opened.pop(key, None) is not None
        try:
            await core.close(key)
        except ApiError as error:  # opened here and never called: the controller never knew it
            if not (was_opened and error.status == 404):
                raise
        return {"id": sid, "object": "session", "deleted": True}

    @app.post("/v1/sessions/{sid}/tool_call_started")
    async def tool_call_started(sid: str, request: Request):
        key = key_of(request, sid)
        opened.pop(key, None)
        await core.tool_call(key, started=True)
        return {"id": sid, "object": "session", "event": "tool_call_started"}

    @app.post("/v1/sessions/{sid}/tool_call_finished")
    async def tool_call_finished(sid: str, request: Request):
        await core.tool_call(key_of(request, sid), started=False)
        return {"id": sid, "object": "session", "event": "tool_call_finished"}

    @app.get("/v1/sessions/{sid}")
    async def session_state(sid: str, request: Request):
        key = key_of(request, sid)
        state = await core.session_state(key)
        if state is None and key in opened:
            return {"id": sid, "object": "session", "state": {"phase": "opened", "calls": 0}}
        if state is None:
            raise ApiError(404, f"unknown session {sid!r}", code="session_not_found")
        return {"id": sid, "object": "session", "state": {k: v for k, v in state.items() if k != "session_id"}}
