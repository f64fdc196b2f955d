"""Fixtures several unit-test modules share."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="session")
def counter():
    """vLLM's render state for the tiny model (512-token window, hermes tool parser): the gateway
    tests' prompt counter. Made once per run: it takes seconds to load."""
    from controller.gateway.prompt_counter import PromptCounter
    from workers.tiny_model import ensure_tiny_model

    return asyncio.run(PromptCounter.start(str(ensure_tiny_model()), "lull", 512, "hermes", "float32"))
