"""Prompts a replayed session sends (`loadgen.conversation`), sized with the tiny model's
real tokenizer and chat template (built locally by workers.tiny_model, as the engine serves it)."""

from __future__ import annotations

import random

import pytest

from loadgen.clients import load_tokenizer
from loadgen.conversation import ChatConversation, Filler
from workers.tiny_model import ensure_tiny_model


@pytest.fixture(scope="module")
def filler() -> Filler:
    return Filler(load_tokenizer(str(ensure_tiny_model())))


def rendered(filler: Filler, messages: list[dict]) -> list[int]:
    """As vLLM's chat serving sees them: the template to text, encoded without special tokens."""
    text = filler.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return filler.encode(text)


@pytest.mark.parametrize("n", [1, 7, 100, 1000, 4000])
def test_filler_text_of_n_tokens_encodes_to_n_tokens(filler, n):
    text = filler.text(n, random.Random(n))
    assert abs(len(filler.encode(text)) - n) <= 0.02 * n
    assert text.startswith(" ") and text.replace(" ", "").isalpha()


def test_a_user_turn_of_n_tokens_costs_n_tokens_after_the_template(filler):
    rng = random.Random(0)
    bare = len(rendered(filler, [{"role": "user", "content": ""}]))
    for n in (10, 300, 1500):
        assert abs(len(rendered(filler, [{"role": "user", "content": filler.text(n, rng)}])) - bare - n) <= 0.02 * n


def test_filler_refuses_a_tokenizer_without_words():
    class Bytes:
        def __len__(self):
            return 3

        def decode(self, ids):
            return "!?"[ids[0] % 2]

    with pytest.raises(ValueError, match="lower-case word tokens"):
        Filler(Bytes())


def test_chat_prompts_grow_turn_by_turn_with_the_answers_text(filler):
    chat = ChatConversation(filler, random.Random(1))
    first = chat.prompt(120, 0)
    assert [m["role"] for m in first.body] == ["user"] and first.reused == 0
    assert first.tokens == len(rendered(filler, first.body)) == 120
    chat.answered([], " the answer")
    second = chat.prompt(260, 10_000)  # the trace reuses everything the history holds
    assert [m["role"] for m in second.body] == ["user", "assistant", "user"]
    assert second.body[:2] == [first.body[0], {"role": "assistant", "content": " the answer"}]
    assert second.tokens == len(rendered(filler, second.body)) == 260
    previous = filler.encode(filler.tokenizer.apply_chat_template(second.body[:2], tokenize=False))
    assert second.reused == len(previous) and rendered(filler, second.body)[:second.reused] == previous


def test_chat_compaction_cuts_inside_a_user_turn_and_keeps_roles_alternating(filler):
    chat = ChatConversation(filler, random.Random(2))
    first = chat.prompt(400, 0)
    chat.answered([], " ok")
    cut = chat.prompt(300, 200)  # only 200 of the ~405 history tokens are reused
    assert [m["role"] for m in cut.body] == ["user"]
    assert cut.body[0]["content"].startswith("".join(" " + w for w in first.body[0]["content"].split()[:150]))
    assert 190 <= cut.reused <= 200 and cut.tokens == 300


def test_chat_compaction_inside_an_answer_drops_it_and_extends_the_user_turn_before(filler):
    chat = ChatConversation(filler, random.Random(3))
    first = chat.prompt(100, 0)
    chat.answered([], " word" * 50)
    history = len(chat.context)
    cut = chat.prompt(300, history - 10)
    assert [m["role"] for m in cut.body] == ["user"] and cut.body[0]["content"].startswith(first.body[0]["content"])
    assert cut.reused == 100 - 2  # the first turn's text and role token; its "\n" and the answer are gone
    assert cut.tokens == 300


def test_chat_prompt_keeps_one_new_word_when_the_trace_reuses_all(filler):
    chat = ChatConversation(filler, random.Random(4))
    chat.prompt(50, 0)
    chat.answered([], " done")
    prompt = chat.prompt(len(chat.context), 10_000)  # no room for new input: the history is cut
    assert prompt.body[-1]["role"] == "user" and prompt.reused < len(chat.context)
    assert abs(prompt.tokens - len(chat.context)) <= 1
