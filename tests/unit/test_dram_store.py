"""The node's DRAM tier store: capacity, label-ordered eviction, shared blocks, cross-process safety."""

from __future__ import annotations

import multiprocessing
import random

import pytest

from workers.dram_store import PINNED, DramStore


def put(store: DramStore, session: str, blocks: dict[str, int], label: str = "idle") -> bool:
    return store.put_session(session, tenant="t", replica="r0", label=label, tokens=32 * len(blocks),
                             block_hashes=list(blocks), blocks={h: bytes([len(h)]) * n for h, n in blocks.items()})


@pytest.fixture
def store(tmp_path):
    return DramStore(tmp_path, capacity_bytes=1000)


def test_shared_blocks_are_stored_once_and_freed_with_their_last_session(store):
    assert put(store, "a", {"aa01": 300, "bb02": 300})
    assert put(store, "b", {"aa01": 300, "cc03": 300})
    assert store.used_bytes() == 900
    assert store.drop_session("a") == 300  # aa01 still belongs to b
    assert store.drop_session("b") == 600
    assert store.drop_session("b") == 0
    store.check_integrity()


def test_eviction_order_is_inactive_then_busy_then_idle_never_pinned(store):
    assert put(store, "idle", {"a1": 200}, "idle")
    assert put(store, "busy", {"b1": 200}, "busy")
    assert put(store, "inactive", {"c1": 200}, "inactive")
    assert put(store, "pinned", {"d1": 200}, PINNED)
    assert put(store, "new1", {"e1": 300})  # needs 100 more: evicts inactive only
    assert {s.session_id for s in store.sessions()} == {"idle", "busy", "pinned", "new1"}
    assert put(store, "new2", {"f1": 300})  # evicts busy: a redundant copy goes before an only copy
    assert {s.session_id for s in store.sessions()} == {"idle", "pinned", "new1", "new2"}
    assert put(store, "new3", {"g1": 200})  # then idle, oldest first
    assert {s.session_id for s in store.sessions()} == {"pinned", "new1", "new2", "new3"}
    store.check_integrity()


def test_a_session_that_cannot_fit_evicts_nothing(store):
    assert put(store, "a", {"a1": 400}, "busy")
    assert put(store, "p", {"p1": 500}, PINNED)
    assert not put(store, "big", {"g1": 600})
    assert {s.session_id for s in store.sessions()} == {"a", "p"}
    assert store.used_bytes() == 900
    store.check_integrity()


def test_replacing_a_session_keeps_blocks_it_still_uses(store):
    assert put(store, "a", {"a1": 300, "a2": 300})
    assert store.put_session("a", tenant="t", replica="r0", label="busy", tokens=96,
                             block_hashes=["a1", "a2", "a3"], blocks={"a3": b"x" * 300})
    assert store.session("a").block_hashes == ("a1", "a2", "a3") and store.used_bytes() == 900
    assert store.matched_prefix(["a1", "a2", "zz", "a3"]) == 2
    store.check_integrity()


def test_bad_values_are_rejected(tmp_path, store):
    with pytest.raises(ValueError, match="capacity"):
        DramStore(tmp_path / "x", 0)
    with pytest.raises(ValueError, match="label"):
        put(store, "a", {"a1": 10}, "hot")


def _writer(root: str, worker: int) -> None:
    store = DramStore(root, capacity_bytes=5000)
    rng = random.Random(worker)
    for i in range(150):
        chain = {f"{rng.randrange(30):04x}": 100 + rng.randrange(3) * 100 for _ in range(rng.randrange(1, 6))}
        action = rng.random()
        if action < 0.7:
            put(store, f"w{worker}-{rng.randrange(10)}", chain, rng.choice(["idle", "busy", "inactive"]))
        elif action < 0.9:
            store.drop_session(f"w{rng.randrange(3)}-{rng.randrange(10)}")
        else:
            store.set_label(f"w{worker}-{rng.randrange(10)}", "idle")


def test_three_processes_writing_at_once_keep_the_store_consistent(tmp_path):
    """Blocks are shared across processes (the same hashes), so evictions and writes race for real."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    store = DramStore(tmp_path, capacity_bytes=5000)
    store.check_integrity()
    assert 0 < store.used_bytes() <= 5000
