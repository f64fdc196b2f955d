"""The tiny model's chat template renders what agent clients send (tools, earlier tool
calls, tool results, content as a list of parts) in the Hermes format, and vLLM's own
`hermes` tool parser reads a call in that format back. The real tokenizer is built
locally (workers/tiny_model.py); nothing is faked."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from workers.tiny_model import TinyModelSpec, ensure_tiny_model

BASH = {"type": "function", "function": {"name": "Bash", "description": "Run a command",
                                         "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ensure_tiny_model())


def render(tokenizer, messages, tools=None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


def test_plain_text_turns_render_as_before(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
    assert render(tokenizer, messages) == "<|system|>Be brief.\n<|user|>hi\n<|assistant|>hello\n<|user|>again\n<|assistant|>"


def test_tools_calls_results_and_parts_are_all_in_the_prompt(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "list "}, {"type": "text", "text": "files"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": {"cmd": "ls"}}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "a.txt"},
        {"role": "system", "content": "reminder"},  # Claude Code sends these mid-conversation
    ]
    text = render(tokenizer, messages, tools=[BASH])
    system, rest = text.split("<|user|>", 1)
    assert system.startswith("<|system|>Be brief.\n\n# Tools") and json.dumps(BASH) in system
    assert rest.startswith("list files\n")
    assert '<|assistant|><tool_call>{"name": "Bash", "arguments": {"cmd": "ls"}}</tool_call>\n' in rest
    assert "<|user|><tool_response>\na.txt\n</tool_response>\n" in rest
    assert rest.endswith("<|system|>reminder\n<|assistant|>")


def test_arguments_given_as_a_json_string_render_unchanged(tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": '{"cmd": "pwd"}'}}
    text = render(tokenizer, [{"role": "assistant", "content": None, "tool_calls": [call]}], tools=[BASH])
    assert '<tool_call>{"name": "Bash", "arguments": {"cmd": "pwd"}}</tool_call>' in text


def test_vllm_hermes_parser_reads_a_rendered_call_back(tokenizer):
    from vllm.tool_parsers.hermes_tool_parser import Hermes2ProToolParser

    call = {"id": "c1", "type": "function", "function": {"name": "Bash", "arguments": {"cmd": "ls -l"}}}
    text = render(tokenizer, [{"role": "assistant", "content": "ok", "tool_calls": [call]}], tools=[BASH])
    emitted = text[text.index("<|assistant|>") + len("<|assistant|>"):text.rindex("\n<|assistant|>")]
    parsed = Hermes2ProToolParser(tokenizer).extract_tool_calls(emitted, request=None)
    assert parsed.tools_called and parsed.content == "ok"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in parsed.tool_calls] == [("Bash", {"cmd": "ls -l"})]


def test_positions_cover_an_agent_prompt():
    # Claude Code's first request is ~24 k tokens of this tokenizer; RoPE has no learned
    # positions, so the window costs no parameters.
    assert TinyModelSpec().max_position_embeddings >= 65536
