"""The connector's worker side (`workers.kv_worker`) with its real mover thread, a real DRAM
store (SQLite index, block files) and a real control file, over a KV cache of CPU tensors in
vLLM's CPU layout: loads and saves complete asynchronously and come back through `finished`;
the engine-side calls never wait on storage; a release line wakes an idle step at once.
No vLLM engine: these are the calls vLLM's engine thread makes, made by the test."""

from __future__ import annotations

import ast
import sqlite3
import time
from pathlib import Path

import pytest
import torch

from workers.connector_control import engine_dir, release_sessions
from workers.dram_store import DramStore, write_session
from workers.kv_integrity import seal
from workers.kv_layout import KvLayout
from workers.kv_mover import BlockCopy
from workers.kv_worker import KvWorkerSide

FP = b"\x01" * 8
NUM_BLOCKS, BLOCK = 16, 16
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def side(tmp_path):
    store = DramStore(tmp_path, 64 << 20)
    caches = {f"layers.{i}": torch.randn(NUM_BLOCKS, 2, BLOCK, 16) for i in range(2)}
    worker = KvWorkerSide(store, engine_dir(tmp_path, "r0"), FP, "r0", BLOCK, idle_poll_s=5.0)
    worker.register(KvLayout.from_caches(caches, NUM_BLOCKS))
    yield worker
    worker.shutdown()


def block_bytes(worker: KvWorkerSide, block_id: int) -> bytes:
    layout = worker.mover.copier.layout
    return b"".join(layer[block_id].contiguous().view(torch.uint8).reshape(-1).numpy().tobytes()
                    for layer in layout.layers)


def until_reported(worker: KvWorkerSide, req_id: str, loads: bool = False, timeout: float = 20.0) -> float:
    """Idle steps until `req_id` is reported; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        freed, loaded = worker.finished(set(), idle_step=True)
        if req_id in ((loaded if loads else freed) or ()):
            return time.monotonic() - started
    raise TimeoutError(f"{req_id} never reported")


def save(req: str, session: str, ids: tuple[int, ...], tier: str = "dram") -> BlockCopy:
    return BlockCopy(req, session, "t", tier, len(ids) * BLOCK, ids, tuple(f"k{session}{b}" for b in ids))


def test_a_save_completes_later_and_the_step_never_waits_on_storage(side, tmp_path):
    lock = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # another process holds the DRAM tier's write lock
    started = time.monotonic()
    side.start_saves([save("r1", "s1", (3, 7, 1))])
    assert side.finished(set(), idle_step=False) == (None, None)  # not landed; the step goes on
    assert time.monotonic() - started < 1.0
    while time.monotonic() - started < 0.3:  # steps go on while the mover is stuck on the lock
        assert side.finished(set(), idle_step=False) == (None, None)
    lock.execute("ROLLBACK")
    until_reported(side, "r1")
    stored = side.store.read_blocks([f"ks1{b}" for b in (3, 7, 1)])
    assert all(stored[f"ks1{b}"] == seal(block_bytes(side, b), FP) for b in (3, 7, 1))
    assert side.stats["saved_blocks"] == 3 and side.stats["save_refused"] == 0


def test_a_gpu_tier_save_is_held_until_a_release_line_wakes_the_idle_step(side, tmp_path):
    side.start_saves([save("r2", "s2", (2, 4), tier="gpu")])
    wait = time.monotonic()
    while "s2" not in {session for session, _ in side._held.values()}:  # landed and held: never reported as freed
        assert side.finished(set(), idle_step=False) == (None, None)
        assert time.monotonic() - wait < 20
    release_sessions(tmp_path, "r0", ["s2"])
    # idle_poll_s is 5 s: a report well before that was woken by the control file.
    assert until_reported(side, "r2") < 2.0
    assert side.stats["released"] == 1


def test_a_release_while_the_save_is_in_flight_frees_it_when_it_lands(side, tmp_path):
    lock = sqlite3.connect(tmp_path / "index.sqlite3", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    side.start_saves([save("r3", "s3", (5,), tier="gpu")])
    side.finished({"s3"}, idle_step=False)  # the session's next call arrived before the save landed
    lock.execute("ROLLBACK")
    until_reported(side, "r3")
    assert not side._held


def test_a_load_lands_asynchronously_and_a_corrupt_block_is_reported_not_loaded(side):
    payloads = {b: torch.randint(0, 256, (len(block_bytes(side, 0)),), dtype=torch.uint8).numpy().tobytes()
                for b in (8, 9, 10)}
    blocks = {f"kL{b}": seal(p, FP) for b, p in payloads.items()}
    blocks["kL10"] = blocks["kL10"][:-1] + bytes([blocks["kL10"][-1] ^ 1])  # a flipped bit in DRAM
    write_session(side.store, "L", tenant="t", replica="r0", label="dram", tokens=3 * BLOCK,
                  block_hashes=list(blocks), blocks=blocks)
    side.start_loads([BlockCopy("r4", "L", "t", "dram", 3 * BLOCK, (11, 12, 13), ("kL8", "kL9", "kL10"))])
    until_reported(side, "r4", loads=True)
    assert block_bytes(side, 11) == payloads[8] and block_bytes(side, 12) == payloads[9]
    assert side.load_errors() == {13}
    assert side.stats["load_refused_checksum"] == 1 and side.stats["loaded_tokens"] == 2 * BLOCK


def sleeps_in(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "attr", getattr(node.func, "id", ""))
            if name == "sleep":
                found.append(f"{path.name}:{node.lineno}")
    return found


def test_no_sleep_on_the_engine_side():
    assert sleeps_in(ROOT / "workers/kv_connector.py") + sleeps_in(ROOT / "workers/kv_worker.py") == []


def test_the_bandwidth_script_imports_no_vllm():
    import subprocess
    import sys

    code = "import sys, workers.copy_bandwidth; print(any(m.split('.')[0] == 'vllm' for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "False"
