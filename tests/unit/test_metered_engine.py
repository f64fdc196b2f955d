"""`MeteredEngine` counts a call's output tokens whether vLLM streams deltas or whole outputs.

The engine under it is a stub that yields vLLM's real `RequestOutput`s the way `AsyncLLM`
does for each `RequestOutputKind` (starting vLLM takes half a minute; its real streamed
usage is covered by tests/integration/test_metrics_live.py's time-per-output-token count)."""

from __future__ import annotations

import asyncio

import pytest
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams

from workers.vllm_server import MeteredEngine

PROMPT = list(range(10))
TOKENS = [[101, 102], [103], [104, 105, 106]]  # what the engine produced, step by step


class StubEngine:
    async def generate(self, prompt, params, request_id):
        so_far: list[int] = []
        for step, new in enumerate(TOKENS):
            so_far += new
            ids = new if params.output_kind == RequestOutputKind.DELTA else list(so_far)
            if params.output_kind == RequestOutputKind.FINAL_ONLY and step < len(TOKENS) - 1:
                continue
            yield RequestOutput(request_id, None, PROMPT, None, [CompletionOutput(0, "", ids, None, None)],
                                finished=step == len(TOKENS) - 1, num_cached_tokens=4)


@pytest.mark.parametrize("kind", list(RequestOutputKind))
def test_a_calls_usage_counts_every_output_token_in_every_output_kind(kind):
    engine = MeteredEngine(StubEngine())
    params = SamplingParams(max_tokens=6, output_kind=kind,
                            extra_args={"kv_transfer_params": {"lull": {"call": "c1"}}})

    async def run():
        return [o async for o in engine.generate(PROMPT, params, "r1")]

    asyncio.run(run())
    usage = engine.take_usage("c1")
    assert (usage.requests, usage.prompt_tokens, usage.cached_tokens) == (1, 10, 4)
    assert usage.output_tokens == 6 and usage.context_tokens == 16
