"""`EngineCall`: one client HTTP request, as the gateway forwards it to an engine replica;
`CallUsage`: what the engine did for it, the replica's last answer.

The gateway (edge) builds the call and the engine replica (`workers.engine_deployment`)
runs it through vLLM's own server (`workers.vllm_server`), so both live in the vocabulary
both import. The replica answers with a stream: ``{"status", "headers"}`` once, the body's
chunks (bytes) as vLLM writes them, and a `CallUsage` last. Reprs leave the body out:
logs never print prompts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

# Hop-by-hop and framing headers the gateway does not forward (the engine's response is
# re-framed by the gateway's own server), and the client's credentials (checked at the gateway).
UNFORWARDED_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive",
                                 "authorization", "x-api-key", "accept-encoding"})


@dataclass(frozen=True)
class EngineCall:
    method: str
    path: str  # the client's path, e.g. /v1/chat/completions
    body: bytes  # the client's JSON body with Lull's kv_transfer_params and cache_salt set
    query: str = ""
    headers: tuple[tuple[str, str], ...] = ()
    call_id: str = field(default_factory=lambda: uuid.uuid4().hex)  # keys the engine's usage record
    # The replica the controller admitted the call to, whose KV and books it uses; another
    # replica refuses it (`MisroutedCall`). Empty: any replica (ungated routes).
    replica_id: str = ""

    def __post_init__(self) -> None:
        if self.method not in ("GET", "POST"):
            raise ValueError(f"an engine call is a GET or a POST, got {self.method!r}")
        if not self.path.startswith("/"):
            raise ValueError(f"an engine call's path must start with '/', got {self.path!r}")
        if not isinstance(self.body, bytes):
            raise ValueError("an engine call's body must be bytes")

    def __repr__(self) -> str:
        return f"EngineCall({self.method} {self.path}, {len(self.body)} bytes, call_id={self.call_id!r})"


class MisroutedCall(RuntimeError):
    """A call reached a replica other than the one it was admitted to: Serve's router sends
    a call whose replica has left (or has not been broadcast yet) to any replica. Run
    there, it would use KV cache the controller booked for others (the engine's cache is
    the GPU tier, so it could wait for blocks for ever); the gateway reports the replica
    lost and admits the call again."""


@dataclass
class CallUsage:
    """What the engine did for one call, summed over its engine requests (a text completion
    with several prompts makes several). ``context_tokens``: the longest prompt + output
    among them, the KV its session holds afterwards."""

    requests: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused (prefix cache + connector loads)
    output_tokens: int = 0
    context_tokens: int = 0

    def add(self, output, produced: list[int] | None = None) -> None:
        """Count one finished (or cut) engine request: its last vLLM ``RequestOutput`` and the
        output tokens of each choice (default: the output's own, which for a streamed
        request are only its last delta's)."""
        prompt = len(output.prompt_token_ids or ())
        if produced is None:
            produced = [len(choice.token_ids) for choice in output.outputs]
        self.requests += 1
        self.prompt_tokens += prompt
        self.cached_tokens += output.num_cached_tokens or 0
        self.output_tokens += sum(produced)
        self.context_tokens = max(self.context_tokens, prompt + max(produced, default=0))
