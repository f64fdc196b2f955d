"""The gateway counts a prompt from the replica's own `vllm serve` arguments.

Admission books the tokens the gateway counts; if the gateway rendered with other
arguments than the engine (a chat template given in `engine.vllm_args`), every
booking would be off. Real vLLM render state on the locally built tiny model."""

from __future__ import annotations

import asyncio

from controller.gateway.prompt_counter import PromptCounter
from tests.support import counter_settings

BODY = {"model": "lull", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}
PREAMBLE = "You are a careful assistant who always answers in complete sentences. " * 4


def _count(settings) -> int:
    async def run() -> int:
        counter = await PromptCounter.start(settings)
        return (await counter.count("chat", BODY, len(str(BODY)))).prompt_tokens

    return asyncio.run(run())


def test_a_chat_template_in_the_engine_args_is_the_one_the_gateway_renders(tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text(PREAMBLE + "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    default = _count(counter_settings(None))
    custom = _count(counter_settings(None, chat_template=str(template)))
    plain = _count(counter_settings(None, chat_template=str(_plain(tmp_path))))
    assert custom > plain + 40, (default, custom, plain)  # the preamble alone is ~50 tokens
    assert default != plain  # the model's own template is not the plain one either


def _plain(tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    return path
