"""What a replayed session sends on each call: token ids, or chat messages in text.

A trace call says how many tokens its prompt holds and how many of them the previous
call's prompt and output already held. A ``Conversation`` turns that into a request
body of that size, one per session, and takes each reply back into the history:

- ``TokenConversation``: token ids (``/v1/completions``, gRPC). Exact sizes; the reused
  part is literally the previous prompt and output ids.
- ``ChatConversation``: OpenAI chat messages in text, the path agents use. Every call
  sends the previous messages, the model's previous answer as an assistant message (the
  text it returned) and a new user message whose filler text stands for the trace's new
  input (tool results etc.). Sizes are counted with the served model's tokenizer and
  chat template, rendered and encoded as vLLM's chat serving does (template to text,
  then ``encode`` without special tokens), so a prompt comes out at the traced size.

Both are pure: the tokenizer is handed in (any Hugging Face tokenizer), the randomness
is the caller's seeded ``random.Random``. One conversation serves one session of one
program, called in order: ``prompt``, then ``answered`` with that call's reply.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, Protocol

WORD = re.compile(r"[a-z]{2,12}")
MIN_WORDS = 64  # fewer single-token words than this: take multi-token ones, calibrated
FIT_ROUNDS = 4  # re-encodings allowed to bring a text or prompt to its size


@dataclass(frozen=True)
class Prompt:
    body: Any  # what the client sends: a list of token ids, or a list of chat messages
    tokens: int  # its size as the client counts it (chat: after the template)
    reused: int  # leading tokens that repeat the previous call's prompt and output


class Conversation(Protocol):
    def prompt(self, want: int, reuse: int) -> Prompt:
        """A prompt of ``want`` tokens whose first ``reuse`` tokens, at most, repeat the history;
        at least one token is new."""

    def answered(self, output_ids: list[int], text: str) -> None:
        """The reply to the last prompt joins the history (ids or text, whichever the client got)."""


class TokenConversation:
    """Token ids: the reusable part of the previous prompt and output, then new ids drawn from ``vocab``."""

    def __init__(self, vocab: tuple[int, int], rng: random.Random) -> None:
        self.vocab, self.rng = vocab, rng
        self.context: list[int] = []
        self.last: list[int] = []

    def prompt(self, want: int, reuse: int) -> Prompt:
        reused = max(0, min(reuse, len(self.context), want - 1))  # at least one new token
        fresh = [self.rng.randrange(*self.vocab) for _ in range(want - reused)]
        self.last = self.context[:reused] + fresh
        return Prompt(self.last, len(self.last), reused)

    def answered(self, output_ids: list[int], text: str) -> None:
        self.context = self.last + list(output_ids)


class Filler:
    """Filler words for a tokenizer: N tokens of text from about N words.

    Preferred words are ones that encode, with their leading space, to one token; with a
    byte-level BPE (the tiny model's, Llama 3's, Qwen's) each space-led word is its own
    pre-token, so N such words encode to exactly N tokens in any context. A tokenizer with
    too few of them gets multi-token words and a measured tokens-per-word ratio instead.
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        pieces = {tokenizer.decode([i]).strip() for i in range(len(tokenizer))}
        words = sorted(" " + p for p in pieces if WORD.fullmatch(p))
        single = [w for w in words if len(self.encode(w)) == 1]
        self.words = single if len(single) >= MIN_WORDS else words
        if len(self.words) < MIN_WORDS:
            raise ValueError(f"the tokenizer has {len(self.words)} lower-case word tokens; filler text needs "
                             f"at least {MIN_WORDS}")
        sample = self.words * max(1, 2000 // len(self.words))
        self.tokens_per_word = len(self.encode("".join(sample))) / len(sample)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def draw(self, n: int, rng: random.Random) -> list[str]:
        """About ``n`` tokens' worth of words (at least one)."""
        return [rng.choice(self.words) for _ in range(max(1, round(n / self.tokens_per_word)))]

    def text(self, n: int, rng: random.Random) -> str:
        """Text that encodes to ``n`` tokens (re-encoded and adjusted until it does, or nearly)."""
        if n < 1:
            raise ValueError(f"filler text needs n >= 1 tokens, got {n}")
        words = self.draw(n, rng)
        for _ in range(FIT_ROUNDS):
            diff = n - len(self.encode("".join(words)))
            if diff == 0 or (diff < 0 and len(words) == 1):
                break
            words = self.refit(words, diff, rng)
        return "".join(words)

    def refit(self, words: list[str], diff: int, rng: random.Random) -> list[str]:
        """``words`` grown (diff > 0) or cut (diff < 0) by about ``diff`` tokens, by one word at least."""
        n = max(1, len(words) + (round(diff / self.tokens_per_word) or (1 if diff > 0 else -1)))
        return words[:n] if n <= len(words) else words + [rng.choice(self.words) for _ in range(n - len(words))]


@dataclass(frozen=True)
class _Turn:
    role: str
    words: tuple[str, ...]  # a user turn's filler words (kept so a compaction can cut inside it)
    text: str

    def message(self) -> dict[str, str]:
        return {"role": self.role, "content": "".join(self.words) if self.role == "user" else self.text}


class ChatConversation:
    """Alternating user and assistant text messages, ending with a user message.

    A call whose reusable prefix is shorter than the history (a compacting agent, or a
    trace call that shares less) cuts the history there: whole turns before the cut are
    kept; a user turn the cut falls in keeps its leading words; an assistant turn the cut
    falls in is dropped with what follows. The new filler then extends the last user turn
    kept, so roles still alternate (some chat templates refuse two user turns in a row).
    ``reused`` is measured, not assumed: the prompt's encoded tokens that equal the
    previous prompt and answer as rendered. The engine's KV holds the answer as it was
    generated, which can encode differently from its text; real chat clients meet the same.
    """

    def __init__(self, filler: Filler, rng: random.Random) -> None:
        self.filler, self.rng = filler, rng
        self.turns: list[_Turn] = []
        self.ends: list[int] = []  # tokens of the history rendered through turn i
        self.context: list[int] = []  # the previous prompt and answer, rendered and encoded
        self.overhead = len(self.render([_Turn("user", (), "")], True))  # a user turn's tokens besides its text

    def render(self, turns: list[_Turn], generation: bool) -> list[int]:
        text = self.filler.tokenizer.apply_chat_template([t.message() for t in turns], tokenize=False,
                                                         add_generation_prompt=generation)
        return self.filler.encode(text)

    def prompt(self, want: int, reuse: int) -> Prompt:
        if want < 1:
            raise ValueError(f"a prompt needs want >= 1 tokens, got {want}")
        target = max(0, min(reuse, len(self.context), want - self.overhead - 1))  # at least one new word
        kept, head = (list(self.turns), ()) if target >= len(self.context) else self._cut(target)
        start = self.ends[len(kept) - 1] if kept else 0
        head_tokens = round(len(head) * self.filler.tokens_per_word)
        words = self.filler.draw(want - start - self.overhead - head_tokens, self.rng)
        for _ in range(FIT_ROUNDS):
            turns = kept + [_Turn("user", (*head, *words), "")]
            ids = self.render(turns, True)
            diff = want - len(ids)
            if diff == 0 or (diff < 0 and len(words) == 1):
                break
            words = self.filler.refit(words, diff, self.rng)
        else:
            turns = kept + [_Turn("user", (*head, *words), "")]
            ids = self.render(turns, True)
        self.turns = turns
        self.ends = self.ends[:len(kept)] + [len(self.render(turns, False))]
        return Prompt([t.message() for t in turns], len(ids), _common_prefix(ids, self.context))

    def _cut(self, target: int) -> tuple[list[_Turn], tuple[str, ...]]:
        """Turns kept whole before the cut at ``target`` tokens, and the words of the user turn
        the new filler extends."""
        whole = sum(1 for end in self.ends if end <= target)  # turns entirely within the target
        cut = self.turns[whole]  # the turn the cut falls in (target < the history's length)
        if cut.role == "user":
            start = self.ends[whole - 1] if whole else 0
            keep = round((target - start - self.overhead) / self.filler.tokens_per_word)
            return self.turns[:whole], cut.words[:max(0, keep)]
        user = self.turns[whole - 1]  # the first turn is a user turn, so an assistant turn has one before it
        return self.turns[:whole - 1], user.words

    def answered(self, output_ids: list[int], text: str) -> None:
        self.turns.append(_Turn("assistant", (), text))
        self.context = self.render(self.turns, False)
        self.ends.append(len(self.context))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)
