"""The errors every KV tier store raises, so that callers handle the DRAM tier
(`workers/dram_store.py`) and the shared tier (`workers/shared_tier.py`) alike.

No store chooses a victim (ARCHITECTURE.md: the planner is the only policy): a
write that does not fit raises ``TierFull`` and changes nothing; the caller then
evicts what the controller's decision allows and retries, or gives up.
"""

from __future__ import annotations


class TierError(Exception):
    """Base of the tier stores' errors."""


class TierFull(TierError):
    """The put needs ``needed`` bytes and only ``available`` are free; nothing changed.
    Evicting what the controller's decision allows, then a retry, is the intended answer."""

    def __init__(self, needed: int, available: int, *, tier: str = "shared", detail: str = "") -> None:
        message = f"{tier} tier full: the put needs {needed} bytes, {available} are free"
        super().__init__(f"{message} ({detail})" if detail else message)
        self.needed = needed
        self.available = available
