"""Scaling trace sessions: tokens, time, context cap and windows keep the shape."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from loadgen.scaling import ScaleSpec, scale_session, scale_sessions, window_slice
from loadgen.traces import DEFAULT_TRACE_DIR, BlockIds, GapKind, TraceCall, TraceSession, load_sessions

BLOCK = 64


def session(
    n: int = 60, growth: int = 640, start_s: float = 0.0, session_id: str = "s", parent_id: str | None = None,
    subagents: dict[int, tuple[str, ...]] | None = None,
) -> TraceSession:
    """A coding-agent-like session: context grows by ``growth`` tokens a call, the ids
    of each call extend the previous call's, every fifth gap is a human's (300 s),
    the others tool calls (10 s); each call takes 2 s."""
    calls, t = [], 0.0
    for i in range(n):
        tokens = 6_400 + growth * i
        kind = GapKind.NONE if i == 0 else GapKind.HUMAN if i % 5 == 0 else GapKind.TOOL
        gap = {GapKind.NONE: 0.0, GapKind.HUMAN: 300.0, GapKind.TOOL: 10.0}[kind]
        t += gap
        calls.append(TraceCall(
            t=t, input_tokens=tokens, output_tokens=200 + i, hash_ids=BlockIds(np.arange(1, tokens // BLOCK + 1)),
            api_time=2.0, api_time_measured=True, gap_s=gap, gap_kind=kind,
            stop="end_turn" if i % 5 == 4 else "tool_use", subagent_ids=(subagents or {}).get(i, ()),
        ))
        t += 2.0
    return TraceSession(session_id, tuple(calls), start_s, parent_id, system_tokens=3_000, tool_tokens=12_000)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"token_scale": 0}, "token_scale"), ({"token_scale": -0.1}, "token_scale"),
        ({"token_scale": float("nan")}, "token_scale"), ({"time_scale": 0}, "time_scale"),
        ({"time_scale": float("inf")}, "time_scale"), ({"context_cap": 1}, "context_cap"),
        ({"context_cap": 100.5}, "context_cap"), ({"window": 0}, "window"), ({"window": True}, "window"),
    ],
)
def test_bad_settings_name_their_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ScaleSpec(**kwargs)


def test_identity_spec_changes_nothing():
    original = session()
    assert scale_session(original, ScaleSpec()) == original


def test_tokens_scale_and_blocks_follow_consistently():
    original = session()
    scaled = scale_session(original, ScaleSpec(token_scale=0.01))
    total_in = sum(c.input_tokens for c in original.calls)
    # Each call rounds to the nearest token: at most half a token off per call.
    assert abs(sum(c.input_tokens for c in scaled.calls) - total_in * 0.01) <= 0.5 * len(scaled.calls)
    assert all(c.output_tokens >= 1 for c in scaled.calls)
    assert all(len(c.hash_ids) == c.input_tokens // BLOCK for c in scaled.calls)
    for (a, b), (sa, sb) in zip(zip(original.calls, original.calls[1:]), zip(scaled.calls, scaled.calls[1:])):
        # A shared prefix of k original blocks becomes one of about k * s scaled blocks.
        expected = int(b.hash_ids.shared_prefix(a.hash_ids) * 0.01)
        assert sb.hash_ids.shared_prefix(sa.hash_ids) in (min(expected, len(sb.hash_ids)), expected - 1)


def test_blocks_differ_where_the_originals_differ():
    original = session(n=3)
    forked = list(original.calls)
    ids = forked[2].hash_ids.array.copy()
    ids[105:] += 10_000  # call 2 (120 blocks) rewrites history from block 105 of call 1's 110
    forked[2] = dataclasses.replace(forked[2], hash_ids=BlockIds(ids))
    spec = ScaleSpec(token_scale=0.1)
    assert scale_session(original, spec).calls[2].hash_ids.shared_prefix(
        scale_session(original, spec).calls[1].hash_ids) == 11
    scaled = scale_session(dataclasses.replace(original, calls=tuple(forked)), spec)
    assert scaled.calls[2].hash_ids.shared_prefix(scaled.calls[1].hash_ids) == 10


def test_times_scale_and_the_gap_structure_is_kept():
    original = session()
    scaled = scale_session(original, ScaleSpec(time_scale=0.01))
    assert [c.gap_kind for c in scaled.calls] == [c.gap_kind for c in original.calls]
    assert [c.gap_s for c in scaled.calls] == pytest.approx([c.gap_s * 0.01 for c in original.calls])
    assert [c.t for c in scaled.calls] == pytest.approx([c.t * 0.01 for c in original.calls])
    assert [c.api_time for c in scaled.calls] == pytest.approx([0.02] * len(original.calls))


def test_window_is_a_middle_slice_rebased_to_time_zero():
    original = session(n=100)
    cut = window_slice(100, 20, seed=3, session_id="s")
    assert 20 <= cut.start <= 60 and cut.stop - cut.start == 20  # middle half of 0..80
    scaled = scale_session(original, ScaleSpec(window=20), seed=3)
    kept = original.calls[cut]
    assert [c.input_tokens for c in scaled.calls] == [c.input_tokens for c in kept]
    assert scaled.calls[0].t == 0 and scaled.calls[0].gap_kind is GapKind.NONE
    assert [c.gap_kind for c in scaled.calls[1:]] == [c.gap_kind for c in kept[1:]]
    assert [c.t for c in scaled.calls] == pytest.approx([c.t - kept[0].t for c in kept])


def test_window_is_deterministic_by_seed_and_varies_across_seeds():
    original = session(n=100)
    assert scale_session(original, ScaleSpec(window=20), seed=7) == scale_session(original, ScaleSpec(window=20), seed=7)
    starts = {window_slice(100, 20, seed, "s").start for seed in range(20)}
    assert len(starts) > 5 and all(20 <= start <= 60 for start in starts)
    assert window_slice(10, 20, seed=1, session_id="s") == slice(0, 10), "a short session is kept whole"


def test_context_cap_is_respected_and_compacts_rather_than_slides():
    original = session(n=120)
    cap = 1024
    scaled = scale_session(original, ScaleSpec(token_scale=0.05, context_cap=cap))
    assert all(c.input_tokens + c.output_tokens <= cap for c in scaled.calls)
    assert all(len(c.hash_ids) <= c.input_tokens // BLOCK for c in scaled.calls)
    compactions = 0
    for a, b in zip(scaled.calls, scaled.calls[1:]):
        if len(b.hash_ids) < len(a.hash_ids):
            compactions += 1  # history dropped: the system and tool prefix is kept
            assert b.hash_ids.shared_prefix(a.hash_ids) >= 3
        else:  # between compactions each call extends the previous one, as in the original
            assert b.hash_ids.shared_prefix(a.hash_ids) >= len(a.hash_ids) - 1
    # 32 tokens of growth per call against a budget halved at each compaction (384
    # tokens): a compaction every ~12 calls, where a sliding window would shift every call.
    assert 3 <= compactions <= 15


def test_context_cap_on_real_sessions():
    if not DEFAULT_TRACE_DIR.is_dir():
        pytest.skip(f"the shared trace split is not at {DEFAULT_TRACE_DIR}")
    spec = ScaleSpec(token_scale=0.02, time_scale=0.1, context_cap=2048, window=50)
    for original in load_sessions(DEFAULT_TRACE_DIR, limit=40):
        scaled = scale_session(original, spec, seed=1)
        assert all(c.input_tokens + c.output_tokens <= 2048 for c in scaled.calls)
        shared = [b.hash_ids.shared_prefix(a.hash_ids) / len(b.hash_ids)
                  for a, b in zip(scaled.calls, scaled.calls[1:]) if len(b.hash_ids)]
        if len(shared) >= 10:
            assert np.median(shared) >= 0.8, original.session_id


def test_subagents_follow_their_parent_window():
    parent = session(n=100, session_id="p", subagents={45: ("p/a",), 90: ("p/b",)})
    inside = session(n=5, session_id="p/a", parent_id="p", start_s=parent.calls[44].end)
    outside = session(n=5, session_id="p/b", parent_id="p", start_s=parent.calls[89].end)
    spec = ScaleSpec(window=20, time_scale=0.5)
    seed = next(s for s in range(50) if window_slice(100, 20, s, "p").start in range(30, 44))
    result = {s.session_id: s for s in scale_sessions([outside, inside, parent], spec, seed)}
    assert sorted(result) == ["p", "p/a"]
    first = parent.calls[window_slice(100, 20, seed, "p")][0]
    assert result["p/a"].start_s == pytest.approx((inside.start_s - first.t) * 0.5)
    assert [c.t for c in result["p/a"].calls] == pytest.approx([c.t * 0.5 for c in inside.calls])
    kept_ids = {i for c in result["p"].calls for i in c.subagent_ids}
    assert kept_ids == {"p/a"}
