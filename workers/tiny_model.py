"""A small Llama-architecture model and BPE tokenizer, built on this machine.

Lull never downloads weights. Tests and the embedded default (`lull up` on one
machine) serve this model with vLLM on CPU: it has the real Llama shape (GQA,
RoPE, SwiGLU), so the engine, the KV connector and the tiers run their real
code paths, only with random weights. Greedy decoding is deterministic, which
is what the "same output with and without offload" tests need.

The build is deterministic (fixed seed, fixed corpus) and cached: the first
call takes a few seconds, later calls return the cached folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

BUILD_VERSION = 2  # bump when the recipe changes, so caches rebuild

# Hermes style, the format vLLM's `hermes` tool parser reads back: the tools are
# listed in the first system turn, a call is `<tool_call>{"name", "arguments"}</tool_call>`
# and a result comes back as a user turn in `<tool_response>`. Real agent clients
# (Claude Code) send tools, earlier calls and results on every request; a template
# that dropped them would hand the engine a prompt that is not the conversation.
# Content may be a string or a list of parts (only text parts carry text here).
CHAT_TEMPLATE = (
    "{%- macro text(content) -%}"
    "{%- if content is string -%}{{ content }}"
    "{%- elif content -%}{%- for part in content -%}"
    "{%- if part is string -%}{{ part }}{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set ns = namespace(first=0) -%}"
    "{%- if tools -%}"
    "<|system|>"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{ text(messages[0]['content']) }}{{ '\n\n' }}{%- set ns.first = 1 -%}"
    "{%- endif -%}"
    "{{ '# Tools\n\nYou may call one or more functions. Their signatures are in <tools></tools>:\n<tools>' }}"
    "{%- for tool in tools -%}{{ '\n' }}{{ tool | tojson }}{%- endfor -%}"
    "{{ '\n</tools>\n\nFor each call, return <tool_call>{\"name\": <function-name>, "
    "\"arguments\": <args-json-object>}</tool_call>\n' }}"
    "{%- endif -%}"
    "{%- for m in messages[ns.first:] -%}"
    "{%- if m['role'] == 'tool' -%}"
    "<|user|><tool_response>{{ '\n' }}{{ text(m['content']) }}{{ '\n' }}</tool_response>{{ '\n' }}"
    "{%- else -%}"
    "<|{{ m['role'] }}|>{{ text(m['content']) }}"
    "{%- for call in m.get('tool_calls') or [] -%}"
    "{%- set f = call['function'] if call['function'] is defined else call -%}"
    "<tool_call>{\"name\": {{ f['name'] | tojson }}, \"arguments\": "
    "{%- if f['arguments'] is string -%}{{ ' ' ~ f['arguments'] }}{%- else -%}{{ ' ' ~ (f['arguments'] | tojson) }}{%- endif -%}"
    "}</tool_call>"
    "{%- endfor -%}"
    "{{ '\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]


@dataclass(frozen=True)
class TinyModelSpec:
    """The shape of the locally built model (defaults: ~2 M parameters)."""

    vocab_size: int = 1024  # BPE vocabulary learned from the local corpus
    hidden_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2  # GQA, like every model Lull targets
    intermediate_size: int = 512
    max_position_embeddings: int = 131072  # RoPE has no learned positions; agent prompts are long
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def default_cache_dir() -> Path:
    return Path(os.environ.get("LULL_CACHE_DIR", Path.home() / ".cache" / "lull"))


def ensure_tiny_model(spec: TinyModelSpec = TinyModelSpec(), cache_dir: Path | None = None) -> Path:
    """Return the folder of the built model, building it on first use."""
    folder = (cache_dir or default_cache_dir()) / f"tiny-llama-v{BUILD_VERSION}-{_spec_key(spec)}"
    if (folder / "lull-model.json").exists():
        return folder
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    _build(spec, tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process built it first; theirs is identical
        pass
    return folder


def _spec_key(spec: TinyModelSpec) -> str:
    return "-".join(str(v) for v in asdict(spec).values())


def _corpus() -> list[str]:
    """Text to learn BPE merges from: the standard library's docstrings.

    They ship with Python, so the corpus is the same on every machine with
    the same Python version, and they look like the code and prose agents see.
    """
    import argparse, asyncio, collections, functools, itertools, json as j, pathlib, re, subprocess

    lines: list[str] = []
    for module in (argparse, asyncio, collections, functools, itertools, j, pathlib, re, subprocess):
        for name in sorted(dir(module)):
            doc = getattr(getattr(module, name), "__doc__", None)
            if isinstance(doc, str):
                lines.extend(doc.splitlines())
    return lines


def _build(spec: TinyModelSpec, folder: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; wider weights make greedy
    # decoding pick distinct tokens, so output comparisons can detect a
    # corrupted KV cache instead of passing on ties.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    (folder / "lull-model.json").write_text(json.dumps({"build_version": BUILD_VERSION, **asdict(spec)}))
