"""The replay of `lull chaos` and its check of the answers.

Every call is greedy (temperature 0, a fixed ``max_tokens``) and is recorded with its prompt
and its text. After the faults, with none in flight, ``check_answers`` asks each recorded
prompt again as a fresh session under its own ``cache_salt``: vLLM's prefix cache and Lull's
tiers (both keyed by the salt) hold no block of it, so the reference is computed from
scratch, while the call under faults may have run on KV kept in HBM, loaded from the DRAM
or shared tier, or recomputed after a fault dropped it. A difference is a wrong output.

Why that comparison is fair: the engines run in float32 (start the platform with
``engine.dtype=float32``; bfloat16's rounding flips the random tiny model's near-tied
tokens with the batch a call runs in), and on CPU float32 a greedy call gives the same
tokens whether its prompt's KV was computed now or loaded, and whichever batch it ran in
(the fault tests rely on the same). The references run one per program at a time, as the
replay did.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

REFERENCE_SALT = "lull-chaos-reference"


@dataclass
class CallRecord:
    session: str
    prompt: list[int]
    max_tokens: int
    text: str
    ended_s: float  # since the replay began


@dataclass
class Loss:
    session: str
    at_s: float  # when its call failed, since the replay began
    error: str


@dataclass
class Wrong:
    session: str
    at_s: float  # when the wrong answer came, since the replay began
    got: str
    reference: str


@dataclass
class Ledger:
    """What the replay and the faults' own clients saw; shared by both."""

    began: float
    calls: list[CallRecord] = field(default_factory=list)
    losses: list[Loss] = field(default_factory=list)
    wrong: list[Wrong] = field(default_factory=list)
    sessions_completed: int = 0
    checked: int = 0  # answers compared with their reference so far

    def now_s(self) -> float:
        return round(time.monotonic() - self.began, 3)

    def lose(self, session: str, error: BaseException) -> None:
        self.losses.append(Loss(session, self.now_s(), f"{type(error).__name__}: {str(error)[:200]}"))
        print(f"  {self.now_s():7.1f}s session {session} lost: {self.losses[-1].error}", file=sys.stderr, flush=True)


# -- HTTP, stdlib only -------------------------------------------------------------------------

def _request(session: str, prompt: list[int], max_tokens: int, *, stream: bool = False,
             cache_salt: str | None = None) -> bytes:
    payload = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    if cache_salt:
        payload["cache_salt"] = cache_salt
    body = json.dumps(payload).encode()
    headers = {"content-type": "application/json", "x-session-id": session, "content-length": str(len(body))}
    if key := os.environ.get("LULL_CHAOS_API_KEY"):
        headers["authorization"] = f"Bearer {key}"
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return f"POST /v1/completions HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n{head}\r\n".encode() + body


async def http_call(port: int, session: str, prompt: list[int], max_tokens: int, timeout_s: float = 300.0,
                    cache_salt: str | None = None) -> str:
    """One greedy /v1/completions call by token ids; its text (errors raise)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    try:
        writer.write(_request(session, prompt, max_tokens, cache_salt=cache_salt))
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), timeout_s)
    finally:
        writer.close()
    status_line, _, rest = raw.partition(b"\r\n")
    if not status_line.startswith(b"HTTP/"):
        raise ConnectionError(f"the gateway closed the connection without a response ({len(raw)} bytes)")
    status = int(status_line.split()[1])
    payload = rest.partition(b"\r\n\r\n")[2]
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {payload[:200].decode(errors='replace')}")
    return json.loads(payload)["choices"][0]["text"]


async def call_and_hang_up(port: int, session: str, prompt: list[int], max_tokens: int, *,
                           stream: bool, after_s: float = 0.0, timeout_s: float = 60.0) -> bool:
    """Send a call and close the connection: a stream after its first event, a plain call
    ``after_s`` after it was sent (while it waits at the gate, or runs). Whether a stream's
    first event came before the close."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout_s)
    try:
        writer.write(_request(session, prompt, max_tokens, stream=stream))
        await writer.drain()
        if not stream:
            await asyncio.sleep(after_s)
            return False
        seen = b""
        while b"data: {" not in seen:
            chunk = await asyncio.wait_for(reader.read(4096), timeout_s)
            if not chunk:
                return False
            seen += chunk
        return True
    finally:
        writer.close()  # the client leaves: RST/FIN mid-call


# -- the replay --------------------------------------------------------------------------------

async def recorded_call(port: int, ledger: Ledger, session: str, prompt: list[int], max_tokens: int) -> str:
    text = await http_call(port, session, prompt, max_tokens)
    ledger.calls.append(CallRecord(session, prompt, max_tokens, text, ledger.now_s()))
    return text


async def replay_sessions(port: int, programs: int, running: Callable[[], bool], ledger: Ledger,
                          seed: int) -> None:
    """Closed loop: each program runs sessions of 3-6 calls with short tool gaps while
    ``running()``; each call's prompt extends the previous one (its context, tokens standing
    for the output, and the tool's result). A session whose call fails is lost."""
    async def program(p: int) -> None:
        rng = random.Random(seed * 7919 + p)
        n = 0
        while running():
            session, n = f"chaos-{seed}-{p}-{n}", n + 1
            context = [rng.randrange(20, 1000) for _ in range(rng.randrange(40, 200))]
            try:
                for _ in range(rng.randrange(3, 7)):
                    max_tokens = rng.randrange(4, 24)
                    await recorded_call(port, ledger, session, context, max_tokens)
                    context = context + [rng.randrange(20, 1000) for _ in range(max_tokens + rng.randrange(5, 40))]
                    await asyncio.sleep(rng.uniform(0.05, 1.0))  # the tool call
                ledger.sessions_completed += 1
            except Exception as error:  # a lost session is counted, never fatal to the replay
                ledger.lose(session, error)
            except asyncio.CancelledError:  # the run's time limit cut its call off: not served
                ledger.lose(session, TimeoutError("cut off by the run's time limit"))
                raise

    await asyncio.gather(*(program(p) for p in range(programs)))


async def check_answers(port: int, ledger: Ledger, parallel: int) -> int:
    """Ask every recorded call again from scratch (``REFERENCE_SALT``, a fresh session) and
    book each answer that differs as wrong; returns how many calls were checked. A
    reference that fails raises: with no fault in flight, the platform must answer."""
    queue = list(enumerate(ledger.calls))
    print(f"  {ledger.now_s():7.1f}s checking {len(queue)} answers", file=sys.stderr, flush=True)

    async def worker() -> None:
        while queue:
            i, record = queue.pop()
            reference = await http_call(port, f"chaos-ref-{i}", record.prompt, record.max_tokens,
                                        cache_salt=REFERENCE_SALT)
            if reference != record.text:
                ledger.wrong.append(Wrong(record.session, record.ended_s, record.text, reference))
            ledger.checked += 1

    await asyncio.gather(*(worker() for _ in range(max(1, parallel))))
    return len(ledger.calls)
