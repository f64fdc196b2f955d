"""Real agent traces as typed, immutable values: sessions, their LLM calls, the gaps
between calls, and the registry of trace formats that read them (``loadgen.traces``
loads a folder; ``loadgen.claude_code_traces`` reads the Claude Code format)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from proto.registry import Registry


class GapKind(enum.Enum):
    """What the session waited on before an LLM call."""

    NONE = "none"  # the first call of a session: there is no gap
    TOOL = "tool"  # the previous call stopped with tool_use, or this input holds a tool_result
    HUMAN = "human"  # the previous call stopped with end_turn: a person's turn
    # The previous call's stop reason was not recorded (streamed calls with stop "",
    # 8% of calls) and this input is plain text: tool or human cannot be told apart.
    UNKNOWN = "unknown"


class BlockIds(Sequence[int]):
    """The prefix-block hash ids of one call's input: an immutable sequence of ints.

    Equal ids within one session mean equal 64-token blocks. Backed by a read-only
    int64 array that may be a view into a later call's ids (a session's context mostly
    grows by appending), so a session holds about one copy of its longest context.
    """

    __slots__ = ("_ids",)

    def __init__(self, ids: Sequence[int] | npt.NDArray[np.int64] = ()) -> None:
        array = np.asarray(ids, dtype=np.int64)
        if array.ndim != 1:
            raise ValueError(f"hash ids must be a flat sequence, got shape {array.shape}")
        if array.flags.writeable:
            if array is ids:  # the caller's own array: freeze a copy, not theirs
                array = array.copy()
            array.flags.writeable = False
        self._ids = array

    @property
    def array(self) -> npt.NDArray[np.int64]:
        """The ids as a read-only numpy array (no copy)."""
        return self._ids

    def shared_prefix(self, other: BlockIds) -> int:
        """How many leading blocks this and ``other`` have in common."""
        n = min(len(self._ids), len(other._ids))
        mine, theirs = self._ids, other._ids
        if mine.ctypes.data == theirs.ctypes.data and mine.strides == theirs.strides:
            return n  # two views of one buffer from the same place: equal, no compare
        differ = np.flatnonzero(mine[:n] != theirs[:n])
        return int(differ[0]) if differ.size else n

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int | slice) -> Any:  # an int, or BlockIds for a slice
        return BlockIds(self._ids[index]) if isinstance(index, slice) else int(self._ids[index])

    def __iter__(self) -> Iterator[int]:
        return iter(self._ids.tolist())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockIds):
            return NotImplemented
        return bool(np.array_equal(self._ids, other._ids))

    def __hash__(self) -> int:
        return hash(self._ids.tobytes())

    def __repr__(self) -> str:
        return f"BlockIds(n={len(self._ids)}, head={self._ids[:4].tolist()})"


@dataclass(frozen=True, slots=True)
class TraceCall:
    """One LLM call. Times are seconds since its session started."""

    t: float  # when the client sent the call
    input_tokens: int
    output_tokens: int
    hash_ids: BlockIds  # one id per full block of the input
    api_time: float  # how long the original server took
    api_time_measured: bool  # False: api_time was not recorded and is estimated
    gap_s: float  # idle time before this call: t minus the previous call's end
    gap_kind: GapKind
    stop: str  # "tool_use", "end_turn", or "" when not recorded
    model: str = ""
    subagent_ids: tuple[str, ...] = ()  # sub-agent sessions that ran in the gap before

    def __post_init__(self) -> None:
        for name in ("t", "input_tokens", "output_tokens", "api_time", "gap_s"):
            value = getattr(self, name)
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value!r}")

    @property
    def end(self) -> float:
        return self.t + self.api_time

    @property
    def context_tokens(self) -> int:
        """Tokens of KV the session holds once this call has finished."""
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True, slots=True)
class TraceSession:
    """One agent's run: a main agent, or a sub-agent linked to its parent."""

    session_id: str  # the trace's id; a sub-agent's is "<parent id>/<agent id>"
    calls: tuple[TraceCall, ...]
    start_s: float = 0.0  # when it started, seconds after its main agent started
    parent_id: str | None = None
    subagent_type: str | None = None
    block_size: int = 64
    system_tokens: int = 0
    tool_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.calls or self.block_size < 1:
            raise ValueError(f"needs calls and a block_size >= 1, got {len(self.calls)}, {self.block_size}")
        for index, call in enumerate(self.calls):
            if (index == 0) != (call.gap_kind is GapKind.NONE):
                raise ValueError(f"call {index}: only the first call has gap kind NONE")
            if index and call.t < self.calls[index - 1].t:
                raise ValueError(f"call {index}: t={call.t} is before the previous call's")
            if len(call.hash_ids) > -(-call.input_tokens // self.block_size):
                raise ValueError(
                    f"call {index}: {len(call.hash_ids)} hash ids for {call.input_tokens} input "
                    f"tokens in blocks of {self.block_size}"
                )

    @property
    def is_subagent(self) -> bool:
        return self.parent_id is not None

    @property
    def duration_s(self) -> float:
        return self.calls[-1].end


TraceReader = Callable[[Path], list[TraceSession]]
TRACE_FORMATS: Registry[TraceReader] = Registry("trace format")


TraceReader = Callable[[Path], list[TraceSession]]
TRACE_FORMATS: Registry[TraceReader] = Registry("trace format")
