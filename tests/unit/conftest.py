"""Fixtures several unit-test modules share."""

from __future__ import annotations

import asyncio

import pytest


@pytest.fixture(scope="session")
def counter():
    """vLLM's render state for the tiny model (512-token window, hermes tool parser): the gateway
    tests' prompt counter. Made once per run: it takes seconds to load."""
    from controller.gateway.prompt_counter import PromptCounter
    from tests.support import counter_settings

    return asyncio.run(PromptCounter.start(counter_settings("hermes")))
