"""The node's DRAM tier store: capacity (a write that does not fit is refused, never an
eviction in the store's own order), the callers' rule for redundant copies, shared
blocks, a full tmpfs, a volume too small for the tier, files a killed writer left,
cross-process safety."""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import random
import signal

import pytest

from proto.tiers import Tier
from tests.support import mounted_tmpfs
from workers import dram_store
from workers.dram_store import PINNED, DramStore, MissingBlocks, write_session
from workers.shared_tier import TierFull as SharedTierFull
from workers.tier_errors import TierFull


def put(store: DramStore, session: str, blocks: dict[str, int], label: str = "dram") -> bool:
    """Store a chain as the callers do (``write_session``); False if the tier refused it."""
    try:
        write_session(store, session, tenant="t", replica="r0", label=label, tokens=32 * len(blocks),
                      block_hashes=list(blocks), blocks={h: bytes([len(h)]) * n for h, n in blocks.items()})
    except TierFull:
        return False
    return True


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


def test_a_session_that_cannot_fit_evicts_nothing(store):
    assert put(store, "a", {"a1": 400}, "gpu")
    assert put(store, "p", {"p1": 500}, PINNED)
    assert not put(store, "big", {"g1": 600})
    assert {s.session_id for s in store.sessions()} == {"a", "p"}
    assert store.used_bytes() == 900
    store.check_integrity()


def contents(store: DramStore) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {s.session_id: (s.label, s.block_hashes) for s in store.sessions()}


def block_files(store: DramStore) -> set[str]:
    return {p.name for p in (store.root / "blocks").iterdir()}


def test_labels_are_the_tier_vocabulary_plus_the_move_marker(store):
    assert (Tier.GPU.label, Tier.DRAM.label, PINNED) == ("gpu", "dram", "pinned")
    with pytest.raises(ValueError, match="label"):  # the old "busy"/"idle" spellings are gone
        write_session(store, "s", tenant="t", replica="r0", label="idle", tokens=32, block_hashes=["b"],
                      blocks={"b": b"x"})


def test_a_full_store_raises_tier_full_and_keeps_every_entry(store):
    assert put(store, "home", {"a1": 300}, "dram")
    assert put(store, "copy", {"b1": 300}, "gpu")
    assert put(store, "moving", {"c1": 300}, PINNED)
    before, files = contents(store), block_files(store)
    for label in ("dram", "gpu", PINNED):  # the store alone evicts nothing, whatever the label
        with pytest.raises(TierFull) as full:
            store.put_session("new", tenant="t", replica="r0", label=label, tokens=32, block_hashes=["d1"],
                              blocks={"d1": b"x" * 200})
        assert (full.value.needed, full.value.available) == (200, 100)
        assert isinstance(full.value, SharedTierFull)  # one type: callers handle both tiers alike
    assert contents(store) == before and block_files(store) == files and store.used_bytes() == 900
    store.check_integrity()


def test_a_dram_booked_copy_is_never_dropped_to_make_room(store):
    assert put(store, "home", {"a1": 400}, "dram")
    assert put(store, "moving", {"p1": 400}, PINNED)
    before = contents(store)
    assert not put(store, "booked", {"n1": 300}, "dram")  # no redundant copy to let go: refused
    with pytest.raises(TierFull):  # named by a careless caller: still kept
        store.put_session("booked", tenant="t", replica="r0", label="dram", tokens=32, block_hashes=["n1"],
                          blocks={"n1": b"x" * 300}, evict=["home", "moving"])
    assert contents(store) == before
    store.check_integrity()


def test_a_redundant_gpu_copy_is_dropped_for_a_booked_write(store):
    assert put(store, "old-copy", {"g1": 300}, "gpu")
    assert put(store, "home", {"a1": 300}, "dram")
    assert put(store, "new-copy", {"g2": 300}, "gpu")
    assert put(store, "booked", {"n1": 300}, "dram")  # drops one redundant copy, the least recently written
    assert set(contents(store)) == {"home", "new-copy", "booked"}
    assert put(store, "staged", {"s1": 100, "g2": 300}, PINNED)  # a promotion's staging: shares g2, so 100 bytes
    assert set(contents(store)) == {"home", "new-copy", "booked", "staged"}
    assert not put(store, "staged2", {"s2": 200}, PINNED)  # new-copy's block is staged's too: dropping it frees 0
    assert set(contents(store)) == {"home", "new-copy", "booked", "staged"}  # so it was not dropped for nothing
    store.check_integrity()


def test_a_dropped_copy_keeps_the_blocks_the_booked_chain_shares(store):
    assert put(store, "copy", {"x1": 300, "x2": 300}, "gpu")
    assert put(store, "home", {"a1": 300}, "dram")
    dropped = write_session(store, "booked", tenant="t", replica="r0", label="dram", tokens=64,
                            block_hashes=["x1", "n1"], blocks={"n1": b"n" * 300})  # x1 is stored: not sent
    assert dropped == ["copy"] and store.session("booked").block_hashes == ("x1", "n1")
    assert block_files(store) == {"x1", "a1", "n1"} and store.used_bytes() == 900
    store.check_integrity()


def test_a_gpu_write_through_lets_older_redundant_copies_go_never_a_booked_one(store):
    """Write-through copies are an LRU cache among themselves (lru-offload's DRAM tier is
    exactly this); booked copies stay."""
    assert put(store, "old-copy", {"g1": 300}, "gpu")
    assert put(store, "home", {"a1": 400}, "dram")
    assert put(store, "copy", {"g2": 200}, "gpu")
    assert put(store, "newest", {"g3": 250}, "gpu")  # the least recently written copy goes
    assert set(contents(store)) == {"home", "copy", "newest"}
    assert not put(store, "too-big", {"g4": 700}, "gpu")  # even with every copy gone: skipped, nothing dropped
    assert set(contents(store)) == {"home", "copy", "newest"}
    store.check_integrity()


def test_a_block_dropped_since_the_caller_looked_is_missing_not_stored(store):
    assert put(store, "a", {"a1": 100, "a2": 100})
    store.drop_session("a")
    with pytest.raises(MissingBlocks, match="neither given nor stored"):
        store.put_session("b", tenant="t", replica="r0", label="gpu", tokens=64, block_hashes=["a1", "b1"],
                          blocks={"b1": b"x" * 100})
    assert contents(store) == {} and block_files(store) == set()
    store.check_integrity()


def test_a_write_through_never_unpins_a_session_mid_move(store):
    assert put(store, "s", {"a1": 100}, PINNED)
    assert put(store, "s", {"a1": 100, "a2": 100}, "gpu")
    assert store.session("s").label == PINNED and store.redundant_copies() == []


def test_a_full_tmpfs_leaves_no_partial_file_and_raises_tier_full(store, monkeypatch):
    assert put(store, "a", {"a1": 100})
    before, files = contents(store), block_files(store)

    def enospc(path, data):  # what the kernel does: part of the bytes, then ENOSPC
        with open(path, "wb") as f:
            f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(dram_store, "_write_file", enospc)
    with pytest.raises(TierFull, match="give /dev/shm more room"):
        store.put_session("b", tenant="t", replica="r0", label="dram", tokens=64, block_hashes=["b1", "b2"],
                          blocks={"b1": b"x" * 100, "b2": b"y" * 100})
    assert contents(store) == before and block_files(store) == files and store.used_bytes() == 100
    assert not [p for p in store.root.joinpath("blocks").iterdir() if p.name.endswith(".tmp")]
    store.check_integrity()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A real 512 KiB tmpfs (needs the right to mount: skipped where there is none)."""
    with mounted_tmpfs(tmp_path / "shm", "512k") as root:
        yield root


def test_a_real_tmpfs_filling_below_capacity_refuses_and_cleans_up(tiny_tmpfs):
    store = DramStore(tiny_tmpfs, capacity_bytes=8 << 20)  # far above what the tmpfs holds
    assert put(store, "a", {"a1": 100_000})
    with pytest.raises(TierFull, match="full below the tier's capacity"):
        store.put_session("b", tenant="t", replica="r0", label="dram", tokens=64, block_hashes=["b1", "b2"],
                          blocks={"b1": b"x" * 300_000, "b2": b"y" * 300_000})
    assert set(contents(store)) == {"a"} and block_files(store) == {"a1"} and store.used_bytes() == 100_000
    store.check_integrity()
    assert put(store, "c", {"c1": 100_000})  # the room the failed write took is back


def test_a_volume_smaller_than_the_tier_is_reported_with_its_fix(tiny_tmpfs, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="workers.dram_store")
    DramStore(tmp_path / "roomy", capacity_bytes=1 << 20)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    DramStore(tiny_tmpfs, capacity_bytes=8 << 20)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"the filesystem under {tiny_tmpfs}" in warning and "lower tiers.dram_capacity_gib" in warning
    assert "ray.gpuWorkers.shmSize" in warning


def _killed_mid_write(root: str) -> None:
    """A writer SIGKILLed (as the kernel's OOM killer does) after one block's file is complete
    and halfway through the next: neither is indexed yet."""
    store = DramStore(root, capacity_bytes=1000)
    done = []

    def write_then_die(path, data):
        if done:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        path.write_bytes(data)
        done.append(path)

    dram_store._write_file = write_then_die
    store.put_session("k", tenant="t", replica="r0", label="dram", tokens=64, block_hashes=["c1", "c2"],
                      blocks={"c1": b"x" * 400, "c2": b"y" * 400})


def test_files_a_killed_writer_left_are_removed_when_the_store_opens(tmp_path, caplog):
    store = DramStore(tmp_path, capacity_bytes=1000)
    assert put(store, "a", {"a1": 100})
    child = multiprocessing.get_context("spawn").Process(target=_killed_mid_write, args=(str(tmp_path),))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL
    left = block_files(store) - {"a1"}
    assert "c1" in left and any(name.startswith(".c2.") and name.endswith(".tmp") for name in left), left
    live_tmp = store.root / "blocks" / f".d1.{os.getpid()}.1.tmp"  # a writer of this process, mid-write
    live_tmp.write_bytes(b"z")
    caplog.set_level(logging.INFO, logger="workers.dram_store")
    reopened = DramStore(tmp_path, capacity_bytes=1000)
    assert block_files(reopened) == {"a1", live_tmp.name}
    assert "removed 2 files no session owns" in caplog.text
    assert contents(reopened) == {"a": ("dram", ("a1",))} and reopened.used_bytes() == 100
    reopened.check_integrity()
    assert put(reopened, "b", {"b1": 900})  # the bytes the dead writer took are free again


def test_replacing_a_session_keeps_blocks_it_still_uses(store):
    assert put(store, "a", {"a1": 300, "a2": 300})
    assert store.put_session("a", tenant="t", replica="r0", label="gpu", tokens=96,
                             block_hashes=["a1", "a2", "a3"], blocks={"a3": b"x" * 300}) == []
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
            put(store, f"w{worker}-{rng.randrange(10)}", chain, rng.choice(["dram", "gpu", "gpu"]))
        elif action < 0.9:
            store.drop_session(f"w{rng.randrange(3)}-{rng.randrange(10)}")
        else:
            store.set_label(f"w{worker}-{rng.randrange(10)}", "dram")


def test_three_processes_writing_at_once_keep_the_store_consistent(tmp_path):
    """Blocks are shared across processes (the same hashes), so drops of redundant copies and writes race for real."""
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
