"""Shared test helpers: one FakeClock, a driver that runs the policy core the
way the controller does (event, then plan, then apply) with integrity checked
after every step, and an ``Engine`` that writes KV through as the connector would."""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from controller.policy import ClusterState, Plan, PlannerConfig, ReplicaSpec, TierPlanner
from controller.runtime import LiveController
from workers.connector_control import STATS_FILE, engine_dir
from workers.dram_store import DramStore

BLOCK_BYTES = 64
# The node agents' shared token in tests that run agents in-process (LULL_INTERNAL_TOKEN).
INTERNAL_TOKEN = "test-internal-token-4f1c2e9a"


@dataclass
class FakeClock:
    now: float = 0.0

    def advance(self, seconds: float) -> float:
        assert seconds >= 0, "a clock never runs backwards"
        self.now += seconds
        return self.now


@dataclass
class PolicyDriver:
    state: ClusterState
    planner: TierPlanner = field(default_factory=TierPlanner)
    clock: FakeClock = field(default_factory=FakeClock)
    plans: list[Plan] = field(default_factory=list)

    @classmethod
    def make(
        cls,
        replicas: dict[str, tuple[int, int]],
        shared: int = 0,
        config: PlannerConfig | None = None,
    ) -> PolicyDriver:
        specs = [ReplicaSpec(name, gpu, dram) for name, (gpu, dram) in replicas.items()]
        return cls(ClusterState(specs, shared), TierPlanner(config))

    def step(self) -> Plan:
        plan = self.planner.plan(self.state, self.clock.now)
        self.state.apply(plan, self.clock.now)
        self.state.check_integrity()
        self.plans.append(plan)
        return plan

    def run_call(self, session_id: str, prompt: int, max_out: int, seconds: float, out: int) -> Plan:
        """A request that is admitted at once and finishes after ``seconds``."""
        self.state.request_arrived(session_id, self.clock.now, prompt, max_out)
        plan = self.step()
        assert any(a.session_id == session_id for a in plan.admits), plan
        self.clock.advance(seconds)
        self.state.call_finished(session_id, self.clock.now, prompt + out)
        self.step()
        return plan

    def sessions_with_idleness(self, iotas: dict[str, float], tokens: int, span: float = 100.0) -> None:
        """Open sessions and run one call each, all starting now, so that ``span``
        seconds later each is in a tool call with the given idleness. The GPU must
        hold them all while their calls run; cut capacity afterwards if needed."""
        start = self.clock.now
        for session_id in iotas:
            self.state.open_session(session_id, start)
            self.state.request_arrived(session_id, start, tokens - 1, 1)
        admitted = {a.session_id for a in self.step().admits}
        assert admitted == set(iotas), f"not all admitted: {set(iotas) - admitted}"
        for session_id, iota in sorted(iotas.items(), key=lambda item: -item[1]):
            self.clock.now = start + span * (1 - iota)
            self.state.call_finished(session_id, self.clock.now, tokens)
            self.step()
        self.clock.now = start + span

    def tier_of(self, session_id: str) -> str:
        return str(self.state.get(session_id).location)


@dataclass
class Engine:
    """Stands in for the engine's write-through (the KV connector's job)."""

    store: DramStore
    replica: str

    def write_through(self, session_id: str, tokens: int, tier_label: str = "gpu") -> None:
        hashes = [hashlib.sha1(f"{session_id}:{i}".encode()).hexdigest() for i in range(tokens // 32 + 1)]
        label = "gpu"  # as LullConnector labels every write-through: the session's call ran in the GPU tier
        self.store.put_session(session_id, tenant="t", replica=self.replica, label=label, tokens=tokens,
                               block_hashes=hashes, blocks={h: b"k" * BLOCK_BYTES for h in hashes})  # or TierFull

    def hold(self, held: dict[str, int]) -> None:
        """The connector's counters file naming the sessions whose blocks it holds (session ->
        tokens), as `KvWorkerSide` writes it; read by the node agent's report."""
        path = engine_dir(self.store.root, self.replica) / STATS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"held_requests": len(held), "held_sessions": held}))

    def finish(self, ctl: LiveController, session_id: str, tokens: int, *, written: bool = True,
               tier_label: str = "gpu") -> None:
        if written:
            self.write_through(session_id, tokens, tier_label)
        ctl.call_finished(session_id, tokens)


def counter_settings(tool_call_parser: str | None, **extra_engine_args):
    """The tiny model's replica settings, as the gateway's PromptCounter takes them ("lull", 512 tokens)."""
    from workers.engine import EngineSettings
    from workers.tiny_model import ensure_tiny_model

    return EngineSettings(model=str(ensure_tiny_model()), served_model_name="lull", max_model_len=512,
                          dtype="float32", tool_call_parser=tool_call_parser, extra_engine_args=extra_engine_args)


@contextmanager
def mounted_tmpfs(root: Path, size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` ("1m") mounted at ``root`` (made here), unmounted after; the
    test is skipped where this user may not mount one."""
    root.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(root)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield root
    finally:
        subprocess.run(["umount", "-l", str(root)], check=True)
