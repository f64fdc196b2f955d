"""The cluster-wide shared KV tier on Redis, with a capacity Lull enforces.

KV is stored per block, content-addressed by a hex block hash, so a block that
several sessions share (a common system prompt) is stored once and freed only
when the last session referencing it drops. A session is an ordered list of
block hashes plus its token count and tenant.

Mechanism, not policy (STYLE 2): this class never chooses a victim. A put that
would exceed the capacity raises ``TierFull`` (``workers/tier_errors.py``, the
same type the DRAM tier raises); the controller then calls
``evict()`` with the sessions in its own order and retries (STYLE 6).

Every mutation is one Lua script, so it is all or nothing and the byte count
(``used``) always equals the sum of stored block sizes. Scripts do every read
and check before their first write: Redis (6.2 and later) refuses a script's
write at ``maxmemory`` only while the script has written nothing yet, so a
refused script has changed nothing.

Redis layout, five keys under one hash tag (``{lull}:…``), so that on Redis
Cluster they share a slot and the scripts may touch them all:
``used`` (bytes stored), ``blocks`` (hash → bytes), ``refs`` (hash → number of
sessions referencing it), ``records`` (session → JSON: tenant, tokens, blocks),
``sizes`` (session → bytes of its distinct blocks, shared ones counted fully).
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.tier_errors import TierError, TierFull

log = logging.getLogger(__name__)
T = TypeVar("T")
_HEX = re.compile(r"[0-9a-fA-F]+")
_KEYS = ("used", "blocks", "refs", "records", "sizes")

_PUT = """
local capacity, sid, record, n = tonumber(ARGV[1]), ARGV[2], ARGV[3], tonumber(ARGV[4])
local new, order = {}, {}
for i = 5, 4 + n do
  local h = ARGV[i]
  if not new[h] then new[h] = true; order[#order + 1] = h end
end
local data = {}
for i = 5 + n, #ARGV, 2 do data[ARGV[i]] = ARGV[i + 1] end
local old, old_order = {}, {}
local previous = redis.call('HGET', KEYS[4], sid)
if previous then
  for h in string.gmatch(cjson.decode(previous).blocks, '%S+') do
    if not old[h] then old[h] = true; old_order[#old_order + 1] = h end
  end
end
local added, nbytes, freed = 0, 0, 0
for _, h in ipairs(order) do
  if redis.call('HEXISTS', KEYS[2], h) == 1 then
    nbytes = nbytes + redis.call('HSTRLEN', KEYS[2], h)
  elseif data[h] then
    added = added + #data[h]; nbytes = nbytes + #data[h]
  else
    return {'missing', h}
  end
end
for _, h in ipairs(old_order) do
  if not new[h] and tonumber(redis.call('HGET', KEYS[3], h)) == 1 then
    freed = freed + redis.call('HSTRLEN', KEYS[2], h)
  end
end
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
-- A put that does not grow passes even above capacity (a client with a smaller
-- capacity_bytes may share this namespace): it can only bring used down.
if added - freed > 0 and used + added - freed > capacity then
  return {'full', added - freed, capacity - used}
end
for _, h in ipairs(order) do
  if not old[h] and redis.call('HINCRBY', KEYS[3], h, 1) == 1 then
    redis.call('HSET', KEYS[2], h, data[h])
  end
end
for _, h in ipairs(old_order) do
  if not new[h] and redis.call('HINCRBY', KEYS[3], h, -1) <= 0 then
    redis.call('HDEL', KEYS[3], h); redis.call('HDEL', KEYS[2], h)
  end
end
redis.call('INCRBY', KEYS[1], added - freed)
redis.call('HSET', KEYS[4], sid, record)
redis.call('HSET', KEYS[5], sid, nbytes)
return {'ok', added}
"""

# ARGV: capacity, need ('' drops every listed session), session ids in drop order.
# The record is deleted first: HDEL is allowed at maxmemory, and once a script has
# written, its later writes are too, so dropping always works under memory pressure.
_DROP = """
local capacity, need = tonumber(ARGV[1]), tonumber(ARGV[2])
local free = capacity - tonumber(redis.call('GET', KEYS[1]) or '0')
local freed, dropped = 0, {}
for i = 3, #ARGV do
  if need and free + freed >= need then break end
  local sid = ARGV[i]
  local record = redis.call('HGET', KEYS[4], sid)
  if record then
    redis.call('HDEL', KEYS[4], sid); redis.call('HDEL', KEYS[5], sid)
    local seen = {}
    for h in string.gmatch(cjson.decode(record).blocks, '%S+') do
      if not seen[h] then
        seen[h] = true
        if redis.call('HINCRBY', KEYS[3], h, -1) <= 0 then
          freed = freed + redis.call('HSTRLEN', KEYS[2], h)
          redis.call('HDEL', KEYS[3], h); redis.call('HDEL', KEYS[2], h)
        end
      end
    end
    dropped[#dropped + 1] = sid
  end
end
if freed > 0 then redis.call('DECRBY', KEYS[1], freed) end
return {freed, dropped}
"""

# Flat [hash, size, hash, size, ...] of the blocks hash, without moving the bytes.
_BLOCK_SIZES = """
local sizes = {}
for _, h in ipairs(redis.call('HKEYS', KEYS[1])) do
  sizes[#sizes + 1] = h; sizes[#sizes + 1] = redis.call('HSTRLEN', KEYS[1], h)
end
return sizes
"""


class SharedTierUnavailable(TierError):
    """Redis cannot be reached (down, hung past ``timeout_s``, or refusing our password);
    callers serve from the local tiers."""


@dataclass(frozen=True)
class SharedSession:
    session_id: str
    tenant: str
    tokens: int
    block_hashes: tuple[str, ...]
    nbytes: int  # bytes of its distinct blocks, shared ones counted fully


class SharedTier:
    """Client of the shared tier; thread-safe (redis-py pools connections).

    Who calls: the node agents (demote DRAM → shared, promote shared → DRAM) and the
    controller (``evict``, occupancy). Ownership: bytes handed to ``put_session``
    are copied into Redis; ``get_blocks`` returns fresh copies.
    """

    def __init__(self, url: str, capacity_bytes: int, *, namespace: str = "lull", timeout_s: float = 1.0) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must be non-empty and free of braces, got {namespace!r}")
        parts = urlsplit(url)
        self._capacity = capacity_bytes
        self.address = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path
        self._password = unquote(parts.password) if parts.password else None
        self._keys = [f"{{{namespace}}}:{name}" for name in _KEYS]
        # One retry, on connection errors only, and without backoff: it replaces a
        # pooled socket that a Redis restart closed; a refused connection fails at
        # once and a hung server costs one timeout_s, never more.
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self._put = self._redis.register_script(_PUT)
        self._drop = self._redis.register_script(_DROP)
        self._outage_lock = threading.Lock()
        self._in_outage = False

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def close(self) -> None:
        self._redis.close()

    def put_session(
        self, session_id: str, tenant: str, block_hashes: Sequence[str], blocks: Mapping[str, bytes], tokens: int
    ) -> int:
        """Store (or replace) a session; returns the bytes of blocks newly written.

        ``blocks`` needs only the blocks not stored yet (see ``missing_blocks``); a
        block absent from both raises ValueError. Raises TierFull, changing nothing,
        when the net growth would exceed the capacity.
        """
        hashes = _checked_hashes(block_hashes)
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, got {tokens}")
        record = json.dumps({"tenant": tenant, "tokens": tokens, "blocks": " ".join(hashes)})
        missing = self.missing_blocks(hashes)
        absent = [h for h in missing if h not in blocks]
        if absent:
            raise ValueError(f"{len(absent)} blocks are neither stored nor given, e.g. {absent[0]}")
        send = {h: blocks[h] for h in missing}
        while True:
            args: list[str | bytes | int] = [self._capacity, session_id, record, len(hashes), *hashes]
            for h, data in send.items():
                args += [h, data]
            reply = self._run(lambda: self._put(keys=self._keys, args=args), sum(map(len, send.values())))
            status = reply[0].decode()
            if status == "ok":
                return int(reply[1])
            if status == "full":
                raise TierFull(int(reply[1]), int(reply[2]))
            # 'missing': another client dropped a block between our check and the
            # script; send it too if the caller gave it. Each round adds a block,
            # so this ends.
            lost = reply[1].decode()
            if lost not in blocks:
                raise ValueError(f"block {lost} is neither stored nor given")
            send[lost] = blocks[lost]

    def missing_blocks(self, block_hashes: Iterable[str]) -> list[str]:
        """The hashes (first occurrence order) not stored: the only ones callers need to send."""
        hashes = list(dict.fromkeys(block_hashes))
        if not hashes:
            return []
        refs = self._run(lambda: self._redis.hmget(self._keys[2], hashes))
        return [h for h, count in zip(hashes, refs) if count is None]

    def get_session(self, session_id: str) -> SharedSession | None:
        def read() -> list[bytes | None]:
            with self._redis.pipeline(transaction=True) as pipe:
                return pipe.hget(self._keys[3], session_id).hget(self._keys[4], session_id).execute()

        record, nbytes = self._run(read)
        if record is None:
            return None
        fields = json.loads(record)
        hashes = tuple(fields["blocks"].split())
        return SharedSession(session_id, fields["tenant"], int(fields["tokens"]), hashes, int(nbytes or 0))

    def get_blocks(self, block_hashes: Iterable[str]) -> dict[str, bytes]:
        """The stored blocks among ``block_hashes``; absent ones are left out."""
        hashes = list(dict.fromkeys(block_hashes))
        if not hashes:
            return {}
        values = self._run(lambda: self._redis.hmget(self._keys[1], hashes))
        return {h: value for h, value in zip(hashes, values) if value is not None}

    def drop_session(self, session_id: str) -> int:
        """Remove a session; returns the bytes freed (its blocks no other session
        references). Dropping an absent session frees 0."""
        freed, _ = self._drop_sessions([session_id], need_bytes=None)
        return freed

    def evict(self, session_ids_in_order: Sequence[str], need_bytes: int) -> list[str]:
        """Drop sessions in the caller's order until ``need_bytes`` are free
        (capacity - used); returns those dropped. Ids not stored are skipped.
        Atomic: no put interleaves with an eviction."""
        _, dropped = self._drop_sessions(session_ids_in_order, need_bytes)
        return dropped

    def used_bytes(self) -> int:
        return int(self._run(lambda: self._redis.get(self._keys[0])) or 0)

    def sessions(self) -> dict[str, int]:
        """Session id → bytes of its distinct blocks (shared blocks count in each)."""
        sizes = self._run(lambda: self._redis.hgetall(self._keys[4]))
        return {sid.decode(): int(nbytes) for sid, nbytes in sizes.items()}

    def check_integrity(self) -> None:
        """Assert the invariants the scripts keep (STYLE 7): used == sum of stored
        block sizes <= capacity; refs == sessions referencing each block; sizes match
        records. Reads a consistent snapshot (MULTI); meant for tests, O(stored)."""

        def snapshot() -> list:
            with self._redis.pipeline(transaction=True) as pipe:
                pipe.get(self._keys[0]).hgetall(self._keys[2]).hgetall(self._keys[3]).hgetall(self._keys[4])
                pipe.eval(_BLOCK_SIZES, 1, self._keys[1])
                return pipe.execute()

        used, refs, records, sizes, flat = self._run(snapshot)
        block_size = {flat[i].decode(): int(flat[i + 1]) for i in range(0, len(flat), 2)}
        used = int(used or 0)
        assert used == sum(block_size.values()), f"used {used} != stored {sum(block_size.values())}"
        assert used <= self._capacity, f"used {used} > capacity {self._capacity}"
        expected_refs: dict[str, int] = {}
        for sid, record in records.items():
            distinct = set(json.loads(record)["blocks"].split())
            for h in distinct:
                expected_refs[h] = expected_refs.get(h, 0) + 1
            expected_size = sum(block_size[h] for h in distinct)
            assert int(sizes.get(sid, -1)) == expected_size, f"size of {sid!r} != {expected_size}"
        assert {h.decode(): int(c) for h, c in refs.items()} == expected_refs, "reference counts drift"
        assert set(block_size) == set(expected_refs), "stored blocks != referenced blocks"
        assert set(sizes) == set(records), "sizes and records name different sessions"

    def _drop_sessions(self, session_ids: Sequence[str], need_bytes: int | None) -> tuple[int, list[str]]:
        if not session_ids:
            return 0, []
        args = [self._capacity, "" if need_bytes is None else need_bytes, *session_ids]
        freed, dropped = self._run(lambda: self._drop(keys=self._keys, args=args))
        return int(freed), [sid.decode() for sid in dropped]

    def _run(self, call: Callable[[], T], put_bytes: int = 0) -> T:
        """Run one Redis call; map connection failures to SharedTierUnavailable and
        Redis' own out-of-memory refusal to TierFull; log outage edges once."""
        try:
            result = call()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._outage_started(exc)
            raise SharedTierUnavailable(f"shared tier unavailable at {self.address}: {self._reason(exc)}") from exc
        except redis.ResponseError as exc:
            # Inside a script Redis wraps the refusal, so match its text, not the type.
            if "OOM command not allowed" not in str(exc):
                raise
            # Redis hit maxmemory (set below capacity_bytes, or overhead): its
            # noeviction policy refused the script before its first write.
            raise TierFull(put_bytes, 0) from exc
        self._outage_ended()
        return result

    def _reason(self, exc: BaseException) -> str:
        reason = str(exc).rstrip(".") or type(exc).__name__
        return reason.replace(self._password, "***") if self._password else reason

    def _outage_started(self, exc: BaseException) -> None:
        with self._outage_lock:
            if self._in_outage:
                return
            self._in_outage = True
        log.warning("shared tier unavailable at %s: %s; serving from local tiers", self.address, self._reason(exc))

    def _outage_ended(self) -> None:
        if not self._in_outage:
            return
        with self._outage_lock:
            if not self._in_outage:
                return
            self._in_outage = False
        log.info("shared tier available again at %s", self.address)


def _checked_hashes(block_hashes: Sequence[str]) -> list[str]:
    """Hashes are joined with spaces inside Redis, so only hex is accepted."""
    hashes = list(block_hashes)
    for h in hashes:
        if not isinstance(h, str) or not _HEX.fullmatch(h):
            raise ValueError(f"block hash must be a non-empty hex string, got {h!r}")
    return hashes
