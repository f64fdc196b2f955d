"""The Claude Code trace format (``/work/shared/traces/README.md``): one gzip JSON file per
session; sub-agents (``type == "subagent"``) become sessions of their own that run beside
their parent, and the parent sees them as one long tool call.

Loading is dominated by the 48 million prefix-block hash ids (236 MB of JSON): ``json``
alone takes ~10 s and tuples of them ~1.3 GB. So hash-id lists are cut out of the text
before ``json`` sees it and parsed by numpy, and a call whose ids the next call extends
shares the next call's buffer (``BlockIds``): all 360 files load in ~2 s into ~32 MB.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from loadgen.trace_model import TRACE_FORMATS, BlockIds, GapKind, TraceCall, TraceSession

log = logging.getLogger(__name__)

# Seconds per output token of the calls whose api_time was recorded (median over the
# split, measured): the fallback for a session that recorded none (see _api_times).
SECONDS_PER_OUTPUT_TOKEN = 0.026


# Hash-id lists are cut out of the text before json parses it (see the module doc).
# A list that holds anything but integers is left in place for json, and _IdParser
# then rejects it with a clear message.
_HASH_IDS = re.compile(rb'"hash_ids"\s*:\s*\[([^\]]*)\]')
_NOT_INTEGERS = b"0123456789,- \t\r\n"  # bytes.translate deletes these; any rest is bad
_SPAN_TAG = "\x00hash_ids#"  # cannot occur in a real trace, so it cannot be forged


@TRACE_FORMATS.register("claude-code")
def read_claude_code(path: Path) -> list[TraceSession]:
    """A main session and its sub-agents from one file (``.json`` or ``.json.gz``)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        spans: list[bytes] = []

        def cut(match: re.Match[bytes]) -> bytes:
            if match.group(1).translate(None, _NOT_INTEGERS):
                return match.group(0)
            spans.append(match.group(1))
            return b'"hash_ids": "\\u0000hash_ids#%d"' % (len(spans) - 1)

        doc = json.loads(_HASH_IDS.sub(cut, raw))
        if not isinstance(doc, dict):
            raise ValueError("the top level is not a JSON object")
        header = {
            "block_size": _count(doc, "block_size"),
            "system_tokens": _count(doc, "system_tokens", 0),
            "tool_tokens": _count(doc, "tool_tokens", 0),
        }
        return _sessions(str(doc["id"]), doc["requests"], spans, 0.0, None, None, header)
    except (OSError, EOFError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable trace file: {error}") from error
    except (KeyError, TypeError, ValueError) as error:
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"{path}: malformed trace: {detail}") from error


def _sessions(
    session_id: str, entries: list[dict[str, Any]], spans: list[bytes], start_s: float,
    parent_id: str | None, subagent_type: str | None, header: dict[str, int],
) -> list[TraceSession]:
    if not isinstance(entries, list):
        raise ValueError(f"{session_id}: 'requests' is not a list")
    requests: list[tuple[dict[str, Any], tuple[str, ...]]] = []
    children: list[TraceSession] = []
    waiting: list[str] = []  # sub-agents since the last call: they ran in the next gap
    for entry in entries:
        kind = entry["type"]
        if kind == "subagent":
            child = _subagent(session_id, entry, spans, start_s, header)
            if child:
                children += child
                waiting.append(child[0].session_id)
        elif kind in ("n", "s"):  # non-streamed / streamed: the same call to the server
            requests.append((entry, tuple(waiting)))
            waiting = []
        else:
            raise ValueError(f"{session_id}: unknown request type {kind!r}")
    if not requests:
        raise ValueError(f"{session_id}: no LLM calls")
    calls = _calls(session_id, requests, spans)
    try:
        session = TraceSession(session_id, calls, start_s, parent_id, subagent_type, **header)
    except ValueError as error:
        raise ValueError(f"{session_id} {error}") from None
    return [session, *children]


def _subagent(
    parent_id: str, entry: dict[str, Any], spans: list[bytes], parent_start: float, header: dict[str, int],
) -> list[TraceSession]:
    """A sub-agent and its own sub-agents, or none: a malformed sub-agent is skipped
    with a warning (its parent and the rest of the folder still load), because one
    bad nested entry says nothing about the parent's calls, which are the workload.

    Its ``t`` is in seconds and marks when it FINISHED, not when it started: on all 38
    sub-agents of the split, t - duration_ms/1000 falls 0.1-1.1 s after the end (t +
    api_time) of the parent call that spawned it, sub-agents spawned together share
    that start to 0.1 s while their t differ by their durations, the sub-agent's own
    calls span duration_ms less 1-7 s, and the entry sits in the list sorted by t
    (after the spawning call, before the parent call that reads the results). Read as
    milliseconds, trace_0004's t=440243.4 and t=440281.8 (durations 94 s and 133 s)
    would give two different starts, and every other trace's t=100.65 would be 0.1 s.
    trace_0004's two sub-agents start at 440149.3 s, 39.7 h after the parent's last
    recorded call: its spawning call and what followed are missing from the trace, so
    they have no gap to fill.
    """
    try:
        child_id = f"{parent_id}/{entry['agent_id']}"
        finished = parent_start + _seconds(entry, "t")
        if entry.get("duration_ms") is None:
            # Async-launched sub-agents record ``duration_ms: null``: the parent did not
            # wait for them, so nobody timed them. Unknown is not zero (that would start
            # the sub-agent when it finished, its calls running past that end), and not
            # a reason to drop calls that did run. Its own calls' span (first call to the
            # end of the last) is the one measured lower bound, short of duration_ms by
            # 1-7 s on the 38 sub-agents that have one: the start is estimated from it.
            start = max(parent_start, finished - _own_span(entry["requests"]))
            log.warning("%s: duration_ms is null (an async sub-agent?); its start is estimated "
                        "from its own calls' span", child_id)
        else:
            start = finished - _seconds(entry, "duration_ms") / 1000.0
        return _sessions(child_id, entry["requests"], spans, start, parent_id,
                         str(entry.get("subagent_type", "")) or None, header)
    except (KeyError, TypeError, ValueError) as error:
        detail = f"missing field {error}" if isinstance(error, KeyError) else str(error)
        log.warning("%s: sub-agent %r skipped, malformed: %s", parent_id, entry.get("agent_id"), detail)
        return []


def _own_span(entries: list[dict[str, Any]]) -> float:
    """Seconds from a sub-agent's start to the end of its last call (its ``t`` plus
    ``api_time``, 0 where unrecorded)."""
    ends = [_seconds(e, "t") + (_seconds(e, "api_time") if e.get("api_time") is not None else 0.0)
            for e in entries if isinstance(e, dict) and e.get("type") in ("n", "s")]
    return max(ends, default=0.0)


def _calls(
    session_id: str, requests: list[tuple[dict[str, Any], tuple[str, ...]]], spans: list[bytes]
) -> tuple[TraceCall, ...]:
    index = 0
    parse = _IdParser(spans)
    try:
        times, outputs, measured, arrays = [], [], [], []
        for index, (entry, _) in enumerate(requests):
            times.append(_seconds(entry, "t"))
            if index and times[-1] < times[-2]:
                raise ValueError(f"t={times[-1]} is before the previous call's t={times[-2]}")
            outputs.append(_count(entry, "out"))
            measured.append(None if entry.get("api_time") is None else _seconds(entry, "api_time"))
            arrays.append(parse(entry["hash_ids"]))
        api_times = _api_times(times, outputs, measured)
        ids = _shared_buffers(arrays, parse.extends)
        calls = []
        for index, (entry, subagents) in enumerate(requests):
            if index == 0:
                gap, kind = 0.0, GapKind.NONE
            else:
                # t is rounded to whole seconds and api_time is not, so a back-to-back
                # call can seem to start before the previous one ended: clamp at zero.
                gap = max(0.0, times[index] - times[index - 1] - api_times[index - 1])
                kind = _gap_kind(requests[index - 1][0].get("stop", ""), entry, subagents)
            calls.append(TraceCall(
                t=times[index], input_tokens=_count(entry, "in"), output_tokens=outputs[index],
                hash_ids=ids[index], api_time=api_times[index],
                api_time_measured=measured[index] is not None, gap_s=gap, gap_kind=kind,
                stop=str(entry.get("stop", "")), model=str(entry.get("model", "")),
                subagent_ids=subagents,
            ))
    except KeyError as error:
        raise ValueError(f"{session_id} call {index}: missing field {error}") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"{session_id} call {index}: {error}") from None
    return tuple(calls)


def _gap_kind(previous_stop: str, entry: dict[str, Any], subagents: tuple[str, ...]) -> GapKind:
    # The README's rule. A gap in which sub-agents ran is the parent's tool call
    # (the Task tool), whatever else the trace says.
    if subagents or previous_stop == "tool_use" or "tool_result" in entry.get("input_types", ()):
        return GapKind.TOOL
    if previous_stop == "end_turn":
        return GapKind.HUMAN
    return GapKind.UNKNOWN


def _api_times(times: list[float], outputs: list[int], measured: list[float | None]) -> list[float]:
    """Recorded api_time, or an estimate where it is missing (8% of calls).

    Missing api_time comes with stop "" on streamed calls. Counting such a call as
    taking no time would add its whole duration to the next gap, so it is estimated
    as the session's median seconds per output token times its output tokens, and
    never past the next call's start.
    """
    rates = [value / out for value, out in zip(measured, outputs) if value is not None and out > 0]
    rate = statistics.median(rates) if rates else SECONDS_PER_OUTPUT_TOKEN
    result = []
    for index, (value, out) in enumerate(zip(measured, outputs)):
        if value is None:
            value = rate * out
            if index + 1 < len(times):
                value = min(value, times[index + 1] - times[index])
        result.append(float(value))
    return result


class _IdParser:
    """Parses one session's hash-id lists in call order.

    A call's list usually repeats the previous call's and appends new ids; when its
    text starts with the previous text, only the new tail is parsed (numpy, C speed;
    `fromstring` is deprecated only in binary mode). ``extends[i]`` records that call
    i's ids start with call i-1's.
    """

    def __init__(self, spans: list[bytes]) -> None:
        self.spans = spans
        self.extends: list[bool] = []
        self._text = b""
        self._ids = np.empty(0, dtype=np.int64)

    def __call__(self, value: Any) -> npt.NDArray[np.int64]:
        if not (isinstance(value, str) and value.startswith(_SPAN_TAG)):
            self.extends.append(False)
            self._text = b""
            if not isinstance(value, list) or not all(type(v) is int for v in value):
                raise ValueError(f"'hash_ids' must be a list of integers, got {str(value)[:40]}")
            return np.asarray(value, dtype=np.int64)
        text = self.spans[int(value[len(_SPAN_TAG):])].strip()
        old = self._text
        extends = bool(old) and text.startswith(old) and text[len(old) : len(old) + 1] in (b"", b",")
        ids = np.concatenate([self._ids, _integers(text[len(old) + 1 :])]) if extends else _integers(text)
        self.extends.append(extends)
        self._text, self._ids = text, ids
        return ids


def _integers(text: bytes) -> npt.NDArray[np.int64]:
    if not text.strip():
        return np.empty(0, dtype=np.int64)
    ids = np.fromstring(text, dtype=np.int64, sep=",")
    if ids.size != text.count(b",") + 1:  # fromstring stops quietly at what it cannot read
        raise ValueError("'hash_ids' holds something that is not an integer")
    return ids


def _shared_buffers(arrays: list[npt.NDArray[np.int64]], extends: list[bool]) -> list[BlockIds]:
    """Read-only ids; a call whose ids the next call extends becomes a view of them."""
    result: list[BlockIds] = [BlockIds()] * len(arrays)
    for index in range(len(arrays) - 1, -1, -1):
        ids = arrays[index]
        if index + 1 < len(arrays) and extends[index + 1]:
            ids = result[index + 1].array[: len(ids)]
        else:
            ids.flags.writeable = False
        result[index] = BlockIds(ids)
    return result


def _count(doc: dict[str, Any], key: str, default: int | None = None) -> int:
    value = doc.get(key, default) if default is not None else doc[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{key!r} must be an integer >= 0, got {value!r}")
    return value


def _seconds(doc: dict[str, Any], key: str) -> float:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{key!r} must be a number >= 0, got {value!r}")
    return float(value)
