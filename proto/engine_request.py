"""`EngineRequest`: one call of an engine replica, as the gateway sends it and the engine runs it.

The gateway (edge) builds it and the engine replica (`workers.engine_deployment`,
runtime) takes it, so it lives in the vocabulary both import. It is validated once,
where it is built; Ray carries it to the replica pickled, which does not run the
checks again. Its repr leaves the prompt out: logs never print prompts.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from proto.tiers import Tier

MAX_TEMPERATURE = 2.0  # OpenAI's bound, which the gateway enforces too


@dataclass(frozen=True)
class EngineRequest:
    """What a replica needs for one call; every field is checked at construction."""

    prompt_token_ids: list[int]  # the whole prompt, the session's context included
    max_tokens: int = 16  # output tokens at most
    temperature: float = 0.0  # 0: greedy
    session_id: str | None = None  # the controller's session key; None: no tier label, a plain call
    tenant: str = ""  # vLLM's cache_salt: tenants never share KV blocks
    tier: str = Tier.GPU.label  # the session's tier label: "gpu" keeps its KV in HBM after the call
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    trace_headers: Mapping[str, str] | None = None  # W3C traceparent for vLLM's spans

    def __post_init__(self) -> None:
        ids = self.prompt_token_ids
        # set(map(type, ...)) runs in C: a 100k-token prompt is checked in about a millisecond.
        if not isinstance(ids, list) or not ids or not set(map(type, ids)) <= {int} or min(ids) < 0:
            raise ValueError("prompt_token_ids must be a non-empty list of non-negative integers")
        if type(self.max_tokens) is not int or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise ValueError(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {self.temperature!r}")
        if self.session_id is not None and (not isinstance(self.session_id, str) or not self.session_id):
            raise ValueError("session_id must be a non-empty string or None")
        if not isinstance(self.tenant, str):
            raise ValueError(f"tenant must be a string, got {type(self.tenant).__name__}")
        Tier.from_label(self.tier)  # raises naming the valid labels
        if not isinstance(self.request_id, str) or not self.request_id:
            raise ValueError("request_id must be a non-empty string")
        headers = self.trace_headers
        if headers is not None and not (isinstance(headers, Mapping) and all(
                isinstance(k, str) and isinstance(v, str) for k, v in headers.items())):
            raise ValueError("trace_headers must map header names to strings")

    def __repr__(self) -> str:
        return (f"EngineRequest(session_id={self.session_id!r}, tenant={self.tenant!r}, tier={self.tier!r}, "
                f"prompt_tokens={len(self.prompt_token_ids)}, max_tokens={self.max_tokens}, "
                f"temperature={self.temperature}, request_id={self.request_id!r})")
