"""How many tokens a request's prompt has, by vLLM's own rendering: the tokens the engine will see.

Admission books a call's KV before the call reaches an engine, so the gateway needs
the prompt's length first. It takes it from vLLM's render-only server state (what
`vllm launch render` runs, no engine): the chat template with the request's tools,
Anthropic's conversion to chat, the completions prompt, exactly as the engine replica
will render them. vLLM runs templates and tokenizers in its own thread pool, and the
body's validation runs in a worker thread, so a large prompt never blocks the event loop.

A request vLLM would refuse (a bad field, a prompt over the context window, an unknown
model) is refused here with vLLM's own message, before it waits at the gate.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any

from controller.gateway.protocol import SESSION_BODY_FIELD, ApiError

# Bodies smaller than this are parsed, validated and serialized on the event loop (here, in
# `rest` and in `service`): a thread hop costs more.
INLINE_BODY_BYTES = 64 << 10


@dataclass(frozen=True)
class Rendered:
    prompt_tokens: int  # summed over the request's prompts (a text completion may have several)
    prompts: int  # engine requests the call makes
    max_tokens: int | None  # the output limit the client set (None: vLLM's default, the rest of the window)


class PromptCounter:
    """vLLM's render state for the served model; `count` renders one request body."""

    def __init__(self, state, max_model_len: int) -> None:
        self.state = state
        self.max_model_len = max_model_len

    @classmethod
    async def start(cls, settings) -> PromptCounter:
        """The render state of the replica's own `vllm serve` arguments (``settings``: the
        replica's `workers.engine.EngineSettings`), `engine.vllm_args` included: a chat
        template, tokenizer mode or override given there renders here as in the engine."""
        from starlette.datastructures import State
        from vllm import envs
        from vllm.config import VllmConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.render.app_state import init_render_app_state

        from workers.vllm_server import server_args

        args = server_args(settings)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        model_config = engine_args.create_model_config()
        model_config.quantization = None  # rendering runs no kernels (vLLM's render server does the same)
        envs.VLLM_CPU_KVCACHE_SPACE = 0  # and allocates no KV cache
        config = VllmConfig(model_config=model_config, logging_config=engine_args.create_logging_config(),
                            structured_outputs_config=engine_args.create_structured_outputs_config())
        state = State()
        await init_render_app_state(config, state, args)
        return cls(state, settings.max_model_len)

    async def count(self, kind: str, body: dict[str, Any], size: int) -> Rendered:
        """``kind``: "chat", "completion" or "messages"; ``size``: the body's bytes."""
        from pydantic import ValidationError

        model, render = self._renderer(kind)
        try:
            if size > INLINE_BODY_BYTES:
                request = await asyncio.to_thread(model.model_validate, body)
            else:
                request = model.model_validate(body)
            refuse_unknown_fields(model, body)
            result = await render(request)
        except ValidationError as error:
            raise ApiError(400, _validation_message(error), param=_first_field(error)) from None
        except ApiError:
            raise
        except Exception as error:  # vLLM's own refusals (context window, tool choice, ...)
            raise _vllm_error(error) from None
        rendered = result if isinstance(result, list) else [result]
        for one in rendered:
            if getattr(one, "error", None) is not None:  # an ErrorResponse
                raise ApiError(one.error.code, one.error.message, type=_error_type(one.error.type),
                               param=one.error.param)
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        return Rendered(sum(len(one.token_ids) for one in rendered), len(rendered),
                        limit if isinstance(limit, int) else None)

    def _renderer(self, kind: str):
        from vllm.entrypoints.anthropic.protocol import AnthropicMessagesRequest
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        serving = self.state.serving_render
        if kind == "chat":
            return ChatCompletionRequest, serving.render_chat_request
        if kind == "completion":
            return CompletionRequest, serving.render_completion_request
        if kind == "messages":
            return AnthropicMessagesRequest, serving.render_messages_request
        raise ValueError(f"no renderer for {kind!r}")


def refuse_unknown_fields(model, body: dict[str, Any]) -> None:
    """A 400 naming each top-level field vLLM's request model does not know: vLLM itself
    logs such fields at debug level and ignores them, a silent 200 that dropped what was
    asked. Known besides: Lull's own ``session_id`` (taken out before vLLM sees the body),
    and ``HONOURED_AS_IS``, fields whose given value asks nothing a server must do."""
    known = _field_names(model)
    unknown = sorted(name for name, value in body.items() if name not in known and name != SESSION_BODY_FIELD
                     and not (name in HONOURED_AS_IS and HONOURED_AS_IS[name](value, body)))
    if unknown:
        raise ApiError(400, f"unsupported field(s) {', '.join(unknown)}: vLLM's {model.__name__} does not "
                            "know them (or not with this value), so they would be ignored; remove them",
                       code="unsupported_field", param=unknown[0])


@functools.cache
def _field_names(model) -> frozenset[str]:
    """A request model's field names and aliases, once per model (every call checks against them)."""
    return frozenset(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}


def _keeps_all_thinking(value: Any, body: dict[str, Any]) -> bool:
    edits = value.get("edits") if isinstance(value, dict) and set(value) <= {"edits"} else None
    return isinstance(edits, list) and all(
        isinstance(edit, dict) and str(edit.get("type", "")).startswith("clear_thinking_")
        and edit.get("keep") == "all" and set(edit) <= {"type", "keep"} for edit in edits)


# Fields vLLM does not know whose value here asks for nothing that changes the answer.
HONOURED_AS_IS = {
    # Claude Code 2.x sends clear_thinking with keep "all": clearing nothing honours it.
    "context_management": _keeps_all_thinking,
    "store": lambda value, body: value is False,  # nothing is stored
    # OpenAI reads metadata only for stored completions.
    "metadata": lambda value, body: isinstance(value, dict) and body.get("store") is not True,
    "service_tier": lambda value, body: value in ("auto", "default"),
    # Routing hints for OpenAI's prompt cache and its abuse checks: Lull routes by session.
    "prompt_cache_key": lambda value, body: isinstance(value, str),
    "safety_identifier": lambda value, body: isinstance(value, str),
}


def _vllm_error(error: Exception) -> ApiError:
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    response = create_error_response(error)
    return ApiError(response.error.code, response.error.message, type=_error_type(response.error.type),
                    param=response.error.param)


def _error_type(vllm_type: str) -> str:
    """vLLM's error class names as OpenAI's error types."""
    return {"BadRequestError": "invalid_request_error", "NotFoundError": "invalid_request_error"}.get(
        vllm_type, vllm_type)


def _validation_message(error) -> str:
    lines = []
    for item in error.errors(include_input=False)[:5]:
        where = ".".join(str(p) for p in item.get("loc", ()))
        lines.append(f"{where or 'body'}: {item.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(lines)


def _first_field(error) -> str | None:
    for item in error.errors(include_input=False):
        if item.get("loc"):
            return ".".join(str(p) for p in item["loc"])
    return None
