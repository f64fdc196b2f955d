"""What the gateway reads from a request before it forwards it: the caller, the session, Lull's fields.

Pure functions, no I/O, so the rules are unit-tested without a server. The request
itself (messages, tools, sampling) is vLLM's to read: the gateway forwards the body
to vLLM's own server unchanged but for Lull's two fields (`lull_fields`). Errors are
`ApiError`s, shaped as OpenAI errors, or as Anthropic errors on `/v1/messages`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping
from typing import Any

from proto.config import Secrets
from proto.names import ID_PATTERN  # the charset proto/session.proto documents

# Checked in this order; the first one present wins.
SESSION_HEADERS = ("x-session-id", "x-claude-code-session-id")
AGENT_HEADER = "x-claude-code-agent-id"  # a Claude Code sub-agent: its own session (as Dynamo reads it)
SESSION_BODY_FIELD = "session_id"  # Lull's own body field, removed before vLLM sees the body
# Claude Code before 2.x put its session in metadata.user_id as "user_<hash>_account_<id>_session_<uuid>".
CLAUDE_CODE_USER = re.compile(r"_session_([A-Za-z0-9-]{8,64})$")
ANONYMOUS_TENANT = "anonymous"
LULL_OWNED_FIELDS = ("kv_transfer_params",)  # Lull sets them; a client's would steer another tier


class ApiError(Exception):
    """An error a client caused or must know about; never carries prompt text."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's error shape (`/v1/messages`), with its error type names."""
        kind = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                503: "overloaded_error", 529: "overloaded_error"}.get(self.status, "api_error")
        return {"type": "error", "error": {"type": kind, "message": self.message}}


def check_session_id(value: str, source: str) -> str:
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value.strip()):
        raise ApiError(400, f"{source}: a session id is 1 to 128 characters of A-Z a-z 0-9 . _ : -", param=source)
    return value.strip()


def session_id_from(headers: Mapping[str, str], body: Mapping[str, Any] | None = None) -> str | None:
    """The client's own session id, or None. `headers` must be case-insensitive (Starlette's)
    or have lower-case keys. A present but unusable id is an error, never ignored."""
    sid = None
    for name in SESSION_HEADERS:
        if (value := headers.get(name)) is not None:
            sid = check_session_id(value, name)
            break
    if sid is None and body is not None:
        if (value := body.get(SESSION_BODY_FIELD)) is not None:
            sid = check_session_id(value, SESSION_BODY_FIELD)
        elif isinstance(user := (body.get("metadata") or {}).get("user_id"), str):
            sid = _claude_code_session(user)
    if sid is not None and (agent := headers.get(AGENT_HEADER)) is not None:
        sid = f"{sid}:agent:{check_session_id(agent, AGENT_HEADER)}"
        check_session_id(sid[:128], AGENT_HEADER)
        sid = sid[:128]
    return sid


def _claude_code_session(user_id: str) -> str | None:
    """The session Claude Code puts in Anthropic's metadata.user_id: a JSON object with
    "session_id" (2.x), or "user_<hash>_account_<id>_session_<uuid>" (earlier versions)."""
    if user_id.startswith("{"):
        try:
            value = json.loads(user_id).get("session_id")
        except (ValueError, AttributeError):
            return None
        return check_session_id(value, "metadata.user_id") if isinstance(value, str) and value else None
    found = CLAUDE_CODE_USER.search(user_id)
    return found.group(1) if found else None


def inferred_session_id(kind: str, body: Mapping[str, Any]) -> str:
    """A session for a client that names none: a hash of the conversation's opening (its system
    prompt and first user turn), which every later turn of the same conversation repeats.
    Two conversations that open alike share a session: their KV is shared anyway."""
    if kind == "completion":
        prompt = body.get("prompt")
        opening: Any = prompt[:4096] if isinstance(prompt, (str, list)) else prompt
    else:
        messages = body.get("messages") or []
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"),
                          len(messages) - 1)
        opening = [body.get("system"), messages[:first_user + 1]]
    digest = hashlib.blake2b(json.dumps(opening, sort_keys=True, default=str).encode(), digest_size=12)
    return "auto-" + digest.hexdigest()


def lull_fields(body: dict[str, Any], tenant: str, session_key: str, tier: str, call_id: str) -> dict[str, Any]:
    """The body vLLM gets: the client's, with the session's tier in `kv_transfer_params` and the
    tenant in `cache_salt` (tenants never share KV blocks; a client's own salt is kept within)."""
    forwarded = {k: v for k, v in body.items() if k != SESSION_BODY_FIELD}
    forwarded["kv_transfer_params"] = {"lull": {"session": session_key, "tenant": tenant, "tier": tier,
                                                "call": call_id}}
    salt = body.get("cache_salt")
    forwarded["cache_salt"] = f"{tenant}:{salt}" if salt else tenant
    return forwarded


def refuse_lull_owned(body: Mapping[str, Any]) -> None:
    for name in LULL_OWNED_FIELDS:
        if body.get(name) is not None:
            raise ApiError(400, f"{name} is set by Lull (it carries the session's tier); remove it from the "
                                "request", param=name)
    salt = body.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise ApiError(400, "cache_salt must be a string", param="cache_salt")


class Authenticator:
    """API keys per tenant (`proto.config.Secrets`), as `Authorization: Bearer <key>` or `x-api-key`.

    When keys are configured (or `required`), a missing or wrong key is refused. Otherwise
    (a local platform with no keys, like vLLM without --api-key) any key or none is accepted
    and the caller is the anonymous tenant: every OpenAI and Anthropic SDK sends some key.
    """

    def __init__(self, secrets: Secrets, required: bool = False):
        self._keys = [(tenant, key.encode()) for tenant, key in secrets.api_keys.items()]
        self.required = required or bool(self._keys)

    def tenant(self, authorization: str | None, api_key: str | None = None) -> str:
        if not self.required:
            return ANONYMOUS_TENANT
        given = api_key.strip() if api_key else None
        if given is None and authorization:
            scheme, _, token = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise unauthorized("malformed Authorization header: expected 'Bearer <key>'")
            given = token.strip()
        if not given:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        found = None
        for tenant, key in self._keys:  # compare with every key: timing says nothing about which matched
            if hmac.compare_digest(given.encode(), key):
                found = tenant
        if found is None:
            raise unauthorized("invalid API key")
        return found


def unauthorized(message: str) -> ApiError:
    return ApiError(401, message, type="authentication_error", code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"})


def session_key(tenant: str, session_id: str) -> str:
    """The controller's key of a client session: tenants never see or touch each other's sessions."""
    return f"{tenant}/{session_id}"
