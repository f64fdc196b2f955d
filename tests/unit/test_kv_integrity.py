"""Stored KV carries its model's identity and a checksum (workers/kv_integrity.py): KV of one
model is never found under another's keys, and a block that is another model's or corrupted
is refused, never loaded. A real ``DramStore`` in a tmp dir; model folders written here."""

from __future__ import annotations

import json

import pytest

from workers.dram_store import DramStore
from workers.kv_integrity import HEADER_BYTES, BlockRejected, block_key, model_fingerprint, seal, unseal

VLLM_HASHES = [bytes([i]) * 32 for i in range(1, 5)]  # what vLLM's block hashes look like: 32 bytes


def model_dir(tmp_path, name="m", layers=2, weights=b"w" * 4096):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"num_hidden_layers": layers}))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_the_fingerprint_changes_with_everything_that_decides_the_kvs_meaning(tmp_path):
    base = model_fingerprint(model_dir(tmp_path), "m", "float32", 32)
    assert base == model_fingerprint(tmp_path / "m", "m", "torch.float32", 32)  # vLLM's torch dtype spelling
    others = {
        "served name": model_fingerprint(tmp_path / "m", "other", "float32", 32),
        "config.json": model_fingerprint(model_dir(tmp_path, "deeper", layers=3), "m", "float32", 32),
        "weights": model_fingerprint(model_dir(tmp_path, "tuned", weights=b"v" * 4096), "m", "float32", 32),
        "dtype": model_fingerprint(tmp_path / "m", "m", "bfloat16", 32),
        "block size": model_fingerprint(tmp_path / "m", "m", "float32", 64),
    }
    for what, fingerprint in others.items():
        assert fingerprint != base, what


def test_keys_are_hex_and_namespaced_by_the_fingerprint():
    a, b = b"\x01" * 8, b"\x02" * 8
    keys_a = [block_key(a, h) for h in VLLM_HASHES]
    keys_b = [block_key(b, h) for h in VLLM_HASHES]
    assert not set(keys_a) & set(keys_b)
    assert all(int(k, 16) >= 0 for k in keys_a + keys_b)


def test_a_sealed_block_opens_only_under_its_model_and_only_intact():
    mine, other = b"\x01" * 8, b"\x02" * 8
    payload = bytes(range(256)) * 8
    stored = seal(payload, mine)
    assert unseal(stored, mine) == payload
    with pytest.raises(BlockRejected) as refused:
        unseal(stored, other)
    assert refused.value.reason == "identity"
    for where in (HEADER_BYTES, len(stored) - 1, 5):  # payload start, payload end, the header's fingerprint
        flipped = bytearray(stored)
        flipped[where] ^= 0x01
        with pytest.raises(BlockRejected) as refused:
            unseal(bytes(flipped), mine)
        assert refused.value.reason == "checksum", where
    for broken in (stored[:HEADER_BYTES - 1], b"XXXX" + stored[4:], payload):
        with pytest.raises(BlockRejected) as refused:
            unseal(broken, mine)
        assert refused.value.reason == "format"


def test_kv_written_under_one_fingerprint_is_not_found_under_another(tmp_path):
    store = DramStore(tmp_path / "dram", 1 << 20)
    first = model_fingerprint(model_dir(tmp_path), "m", "float32", 32)
    second = model_fingerprint(tmp_path / "m", "m", "bfloat16", 32)
    keys = [block_key(first, h) for h in VLLM_HASHES]
    store.put_session("s", tenant="t", replica="r", label="dram", tokens=128, block_hashes=keys,
                      blocks={k: seal(f"kv {i}".encode() * 100, first) for i, k in enumerate(keys)})
    assert store.matched_prefix(keys) == len(keys)
    assert store.matched_prefix([block_key(second, h) for h in VLLM_HASHES]) == 0
    assert [unseal(store.read_blocks([k])[k], first) for k in keys[:1]] == [b"kv 0" * 100]
    store.check_integrity()


@pytest.mark.parametrize("key", ["../escape", ".hidden", "a/b", ""])
def test_the_dram_tier_refuses_block_keys_that_would_name_another_file(tmp_path, key):
    store = DramStore(tmp_path / "dram", 1 << 20)
    with pytest.raises(ValueError, match="block key"):
        store.put_session("s", tenant="t", replica="r", label="dram", tokens=32, block_hashes=[key],
                          blocks={key: b"x"})
    assert sorted(p.name for p in (tmp_path / "dram" / "blocks").iterdir()) == []
