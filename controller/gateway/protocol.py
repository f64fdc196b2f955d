"""What the REST gateway reads from a request: the session id, the tenant, the body.

Pure functions and pydantic models, no I/O, so the rules are unit-tested without
a server. Errors are `ApiError`s that the REST layer turns into OpenAI-style JSON
(`{"error": {"message", "type", "code", "param"}}`).
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from proto.config import Secrets

# Checked in this order; the first one present wins.
SESSION_HEADERS = ("x-session-id", "x-claude-code-session-id")
SESSION_BODY_FIELDS = ("session_id", "user")
MAX_SESSION_ID_LEN = 256
ANONYMOUS_TENANT = "anonymous"


class ApiError(Exception):
    """An error a client caused or must know about; never carries prompt text."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


def session_id_from(headers: Mapping[str, str], body: Mapping[str, Any] | None = None) -> str | None:
    """The client's session id: `x-session-id`, `x-claude-code-session-id`, body `session_id`, body `user`.

    `headers` must be case-insensitive (Starlette's) or have lower-case keys.
    None means a one-off call. A present but unusable id is an error, not a one-off.
    """
    for name in SESSION_HEADERS:
        if (value := headers.get(name)) is not None:
            return check_session_id(value, name)
    for name in SESSION_BODY_FIELDS:
        value = (body or {}).get(name)
        if value is not None:
            if not isinstance(value, str):
                raise ApiError(400, f"body field {name!r} must be a string session id", param=name)
            return check_session_id(value, name)
    return None


def check_session_id(value: str, source: str) -> str:
    value = value.strip()
    if not value or len(value) > MAX_SESSION_ID_LEN or not value.isprintable():
        raise ApiError(400, f"{source}: a session id must be 1 to {MAX_SESSION_ID_LEN} printable characters",
                       param=source)
    return value


class Authenticator:
    """Bearer API keys per tenant (`proto.config.Secrets`).

    A wrong key is always refused. A missing key is refused when `required`, or
    when keys are configured at all; otherwise (a local platform with no keys)
    the caller is the anonymous tenant.
    """

    def __init__(self, secrets: Secrets, required: bool = False):
        self._keys = [(tenant, key.encode()) for tenant, key in secrets.api_keys.items()]
        self.required = required or bool(self._keys)

    def tenant(self, authorization: str | None) -> str:
        if not authorization:
            if self.required:
                raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
            return ANONYMOUS_TENANT
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        given = token.strip().encode()
        found = None
        for tenant, key in self._keys:  # compare with every key: timing says nothing about which matched
            if hmac.compare_digest(given, key):
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


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields Lull does not use

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    session_id: str | None = None
    user: str | None = None

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Body):
    prompt: str | list[int] = Field(...)

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, prompt):
        if not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, list) and any(t < 0 for t in prompt):
            raise ValueError("token ids must be non-negative")
        return prompt

    @property
    def output_limit(self) -> int | None:
        return self.max_tokens


def validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line from pydantic's errors, and the first offending field (never its value)."""
    lines, param = [], None
    for error in errors[:5]:
        where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
        param = param or where or None
        lines.append(f"{where or 'body'}: {error.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(lines), param
