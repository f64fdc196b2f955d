"""The closed-loop replay core (`loadgen.replay`) with a scripted in-process client.

`ScriptedClient` stands in for the network (Lull's REST or gRPC API): it answers every
call at once with a fixed output and reports as cached the prefix its previous call in
the session left, as an engine with a perfect prefix cache would. Gaps are scaled to
zero so no test sleeps.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from loadgen.conversation import TokenConversation
from loadgen.replay import CallOutcome, CallRecord, ReplayResult, ReplaySettings, replay
from loadgen.sim.workload import scripted_workload


class ScriptedClient:
    def __init__(self, output: list[int], fail_on: set[tuple[str, int]] = frozenset()):
        self.output, self.fail_on = output, fail_on
        self.prompts: dict[str, list[list[int]]] = {}
        self.closed: list[str] = []

    def conversation(self, settings, rng):
        return TokenConversation(settings.vocab, rng)

    async def call(self, session_id, prompt_ids, max_tokens, progress=None):
        sent = self.prompts.setdefault(session_id, [])
        if (session_id, len(sent)) in self.fail_on:
            raise RuntimeError("engine failed")
        previous = sent[-1] + self.output if sent else []
        cached = next((i for i, (a, b) in enumerate(zip(previous, prompt_ids)) if a != b),
                      min(len(previous), len(prompt_ids)))
        sent.append(list(prompt_ids))
        await asyncio.sleep(0)
        return CallOutcome(0.01, self.output[:max_tokens], cached)

    async def close_session(self, session_id):
        self.closed.append(session_id)


def settings(**kw) -> ReplaySettings:
    return ReplaySettings(**{"programs": 1, "duration_s": 0.2, "time_scale": 0.0, "max_context": 200,
                             "max_output": 8, **kw})


def test_token_prompt_reuses_the_previous_context_then_adds_new_tokens():
    conversation = TokenConversation((20, 1000), random.Random(0))
    first = conversation.prompt(20, 0)
    conversation.answered(list(range(100, 110)), "")
    context = first.body + list(range(100, 110))
    prompt = conversation.prompt(50, 30)
    assert prompt.reused == 30 and prompt.body[:30] == context and prompt.tokens == len(prompt.body) == 50
    assert all(20 <= t < 1000 for t in prompt.body[30:])


def test_token_prompt_keeps_one_new_token_and_never_reuses_past_the_context():
    conversation = TokenConversation((20, 1000), random.Random(0))
    conversation.prompt(30, 0)
    conversation.answered([5, 6], "")
    assert conversation.prompt(20, 900).reused == 19  # compacted to 20 tokens, one of them new
    conversation.answered([5, 6], "")
    assert conversation.prompt(100, 900).reused == 22  # all of the previous 20 + 2, no more


def test_prompt_is_compacted_to_the_context_cap():
    work = scripted_workload([[(0.0, 900, 50, 0)]])
    client = ScriptedClient(output=[7])
    asyncio.run(replay(work, client, settings(max_context=200, duration_s=0.05)))
    # 200 tokens of context minus the capped output of 8: the agent drops old history.
    assert len(client.prompts["bench-0-0"][0]) == 192


def test_replay_reuses_kv_across_a_session_and_closes_it():
    work = scripted_workload([[(0.0, 40, 4, 0), (5.0, 60, 4, 44), (5.0, 80, 4, 64)]])
    client = ScriptedClient(output=[7, 8, 9, 10])
    result = asyncio.run(replay(work, client, settings(duration_s=0.3)))
    first = client.prompts["bench-0-0"]
    assert [len(p) for p in first] == [40, 60, 80]
    assert first[1][:44] == first[0] + [7, 8, 9, 10]  # prompt + output of the previous call
    calls = [c for c in result.calls if c.session_id == "bench-0-0"]
    assert [c.reused_tokens for c in calls] == [0, 44, 64] and [c.cached_tokens for c in calls] == [0, 44, 64]
    assert result.sessions_completed >= 1 and "bench-0-0" in client.closed
    assert result.errors == []


def test_an_error_ends_the_session_but_not_the_replay():
    work = scripted_workload([[(0.0, 10, 2, 0), (0.0, 20, 2, 12)]])
    client = ScriptedClient(output=[5, 6], fail_on={("bench-0-0", 1)})
    result = asyncio.run(replay(work, client, settings(duration_s=0.1)))
    assert len(result.errors) == 1 and "engine failed" in result.errors[0]
    assert "bench-0-0" in client.closed and "bench-0-1" in client.prompts  # the program went on


def test_programs_replay_different_sessions_in_the_workload_order():
    work = scripted_workload([[(0.0, 10, 2, 0)], [(0.0, 20, 2, 0)]])
    client = ScriptedClient(output=[5, 6])
    asyncio.run(replay(work, client, settings(programs=2, duration_s=0.05)))
    assert len(client.prompts["bench-0-0"][0]) == 10 and len(client.prompts["bench-1-0"][0]) == 20


def test_summary_math():
    result = ReplayResult(duration_s=10.0, calls=[
        CallRecord(0, "a", 0.0, 0.1, 100, 10, 50, 50),
        CallRecord(0, "a", 1.0, 0.3, 120, 20, 80, 60),
    ])
    s = result.summary()
    assert s["requests_completed"] == 2 and s["requests_per_s"] == pytest.approx(0.2)
    assert s["output_tokens_per_s"] == pytest.approx(3.0)
    assert s["ttft_mean_s"] == pytest.approx(0.2) and s["ttft_p50_s"] == pytest.approx(0.2)
    assert s["recompute_tokens"] == 20 and s["reuse_hit_tokens"] == 110 and s["prefill_tokens"] == 110


def test_settings_refuse_bad_values():
    with pytest.raises(ValueError, match="programs"):
        ReplaySettings(programs=0, duration_s=1)
    with pytest.raises(ValueError, match="no room"):
        ReplaySettings(programs=1, duration_s=1, max_context=40, max_output=8)


def test_summary_leaves_recompute_unknown_when_a_reply_did_not_report_cached_tokens():
    result = ReplayResult(duration_s=1.0, calls=[CallRecord(0, "a", 0.0, 0.1, 100, 10, 50, -1)])
    assert result.summary()["recompute_tokens"] is None


def test_records_take_the_servers_counts_when_the_reply_has_them():
    """A text API (chat) returns no ids: the record takes the reply's usage counts."""

    class TextClient(ScriptedClient):
        async def call(self, session_id, prompt_ids, max_tokens, progress=None):
            await super().call(session_id, prompt_ids, max_tokens)
            return CallOutcome(0.01, [], 5, text="hi", prompt_tokens=77, output_tokens=3)

    work = scripted_workload([[(0.0, 10, 2, 0)]])
    result = asyncio.run(replay(work, TextClient(output=[1]), settings(duration_s=0.05)))
    assert {(c.prompt_tokens, c.output_tokens, c.cached_tokens) for c in result.calls} == {(77, 3, 5)}
