"""engine.dtype ``auto``: the type vLLM resolves for the tiny local model is the one the
tier budgets count KV bytes in (controller/assembly/settings.py reads vLLM's rule; this
checks the reading against vLLM itself, from its config, without starting an engine)."""

from __future__ import annotations

import torch

from controller.assembly.settings import dtype_bytes
from workers.engine import EngineSettings
from workers.tiny_model import ensure_tiny_model


def test_auto_dtype_is_what_vllm_resolves_for_the_tiny_model():
    model = str(ensure_tiny_model())  # float32 weights
    settings = EngineSettings(model=model, dtype="auto", connector=False)
    settings.apply_environment()
    resolved = settings.engine_args().create_engine_config().model_config.dtype
    assert resolved == torch.bfloat16  # vLLM runs a float32 checkpoint in the CPU's 16-bit type
    assert dtype_bytes(model, "auto") == resolved.itemsize
