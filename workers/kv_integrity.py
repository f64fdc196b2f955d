"""What every stored KV block carries, so that no block is ever loaded into the wrong model
or loaded corrupted: the model's identity in its key and its header, and a checksum.

Who uses it: the engine's KV connector seals each block it writes through to the DRAM tier
and checks each block it loads, the one place where a bad block would do harm. The bytes
between are opaque to both tiers (``DramStore``, ``SharedTier``) and to the node agent
that moves them, so a block keeps its header and checksum in DRAM and in Redis alike.

- **Identity.** ``model_fingerprint`` hashes what decides the KV's meaning: the served
  model's name, its ``config.json``, a sample of every weight file (name, size and first
  MiB, so a fine-tune of the same architecture differs), the KV's dtype and the block size.
  A block's key is the fingerprint's hex before vLLM's block hash (``block_key``), so
  another model never even finds it; the header repeats the fingerprint, so a block filed
  under the wrong key is refused too.
- **Checksum.** CRC-32 of the fingerprint and the payload: corruption, not forgery (who
  can write the tier's files or Redis could write any checksum).

A block that fails either check raises ``BlockRejected``; the connector treats it as a
miss (vLLM recomputes it, ``kv_load_failure_policy="recompute"``) and counts it.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

MAGIC = b"LKV1"
FINGERPRINT_BYTES = 8
_HEADER = struct.Struct(f"<4s{FINGERPRINT_BYTES}sI")  # magic, fingerprint, crc32(fingerprint + payload)
HEADER_BYTES = _HEADER.size
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
WEIGHT_SAMPLE_BYTES = 1 << 20


class BlockRejected(ValueError):
    """A stored block that must not be loaded; ``reason`` is "identity", "checksum" or "format"."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def model_fingerprint(model_dir: str | Path, served_name: str, dtype: str, block_size: int) -> bytes:
    """The identity of the KV a model computes; equal on every replica serving the same model."""
    digest = hashlib.sha256()
    for part in (str(served_name), str(dtype).removeprefix("torch."), str(int(block_size))):
        digest.update(part.encode() + b"\0")
    folder = Path(model_dir)
    config = folder / "config.json"
    digest.update(config.read_bytes() if config.is_file() else str(model_dir).encode())
    for weights in sorted(p for p in folder.glob("*") if p.suffix in WEIGHT_SUFFIXES and p.is_file()):
        with weights.open("rb") as f:
            digest.update(f"{weights.name}\0{weights.stat().st_size}\0".encode() + f.read(WEIGHT_SAMPLE_BYTES))
    return digest.digest()[:FINGERPRINT_BYTES]


def block_key(fingerprint: bytes, block_hash: bytes) -> str:
    """A block's key in every tier: hex, namespaced by the model's fingerprint."""
    return fingerprint.hex() + block_hash.hex()


def seal(payload: bytes, fingerprint: bytes) -> bytes:
    """The stored form of a block: header (magic, fingerprint, checksum), then the payload."""
    return _HEADER.pack(MAGIC, fingerprint, zlib.crc32(payload, zlib.crc32(fingerprint))) + payload


def unseal(stored: bytes, fingerprint: bytes) -> bytes:
    """The payload of a stored block of this model; BlockRejected when it is another model's,
    corrupted, or not a sealed block at all."""
    if len(stored) < HEADER_BYTES:
        raise BlockRejected("format", f"a stored block of {len(stored)} bytes has no header")
    magic, owner, checksum = _HEADER.unpack_from(stored)
    if magic != MAGIC:
        raise BlockRejected("format", "a stored block lacks Lull's header")
    payload = memoryview(stored)[HEADER_BYTES:]
    if zlib.crc32(payload, zlib.crc32(owner)) != checksum:
        raise BlockRejected("checksum", "a stored block's checksum does not match its bytes")
    if owner != fingerprint:
        raise BlockRejected("identity", f"a stored block belongs to model {owner.hex()}, not {fingerprint.hex()}")
    return bytes(payload)

