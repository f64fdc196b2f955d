"""Shared fixtures for tests that run a real vLLM engine on CPU, a real Redis and real tiers.

One engine per test module: starting vLLM costs ~20-40 s here, so tests share
it and keep their sessions apart by session id. The plane itself is
`workers.local_plane`, which `lull bench-kv` runs too.
"""

from __future__ import annotations

from workers.local_plane import DataPlane, LoopThread, start_data_plane, stop_data_plane, wait_until

__all__ = ["DataPlane", "LoopThread", "start_data_plane", "stop_data_plane", "wait_until"]
