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
refused script has changed nothing (``workers/shared_tier_scripts.py``).

The Redis Lull needs: ``maxmemory`` set and ``maxmemory-policy noeviction``. Lull,
not Redis, decides which session's KV leaves; an evicting Redis would drop blocks
that session records still name. A Redis that refuses the password
(``LULL_REDIS_PASSWORD``) or evicts is misconfigured, which is not an outage: every
call raises ``SharedTierMisconfigured``, naming the setting to fix, until it is fixed.
Redis' own refusal at ``maxmemory`` is ``TierFull``, like Lull's capacity.

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

from proto.config_secrets import REDIS_PASSWORD_ENV, redis_password
from workers import shared_tier_scripts as scripts
from workers.tier_errors import TierError, TierFull

log = logging.getLogger(__name__)
T = TypeVar("T")
_HEX = re.compile(r"[0-9a-fA-F]+")
_KEYS = ("used", "blocks", "refs", "records", "sizes")

class SharedTierUnavailable(TierError):
    """Redis cannot be reached (down, or hung past ``timeout_s``); callers serve from
    the local tiers, and the next call tries again."""


class SharedTierMisconfigured(TierError):
    """Redis answers but cannot serve as the shared tier: it refuses the password, or its
    memory policy could evict blocks. A setting is wrong (the message names it), not an
    outage; callers serve from the local tiers, and every call checks again."""


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

    def __init__(self, url: str, capacity_bytes: int, *, password: str | None = None, namespace: str = "lull",
                 timeout_s: float = 1.0) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes must be positive, got {capacity_bytes}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if not namespace or "{" in namespace or "}" in namespace:
            raise ValueError(f"namespace must be non-empty and free of braces, got {namespace!r}")
        parts = urlsplit(url)
        if password and parts.password:
            raise ValueError("give the Redis password once: in the URL or as password, not both")
        self._capacity = capacity_bytes
        self.address = f"{parts.hostname}:{parts.port or 6379}" if parts.hostname else parts.path
        self._password = password or (unquote(parts.password) if parts.password else None)
        self._keys = [f"{{{namespace}}}:{name}" for name in _KEYS]
        # One retry, on connection errors only, and without backoff: it replaces a
        # pooled socket that a Redis restart closed; a refused connection fails at
        # once and a hung server costs one timeout_s, never more.
        self._redis = redis.Redis.from_url(
            url,
            password=password or None,  # None leaves the URL's, if any
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        self._put = self._redis.register_script(scripts.PUT)
        self._drop = self._redis.register_script(scripts.DROP)
        self._state_lock = threading.Lock()
        self._trouble_kind: str | None = None  # "unavailable" or "misconfigured" while it lasts
        self._verified = False  # Redis' memory policy checked since start or the last outage

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def close(self) -> None:
        self._redis.close()

    def verify(self) -> None:
        """Check now that Redis accepts the password and cannot evict, as the first call after
        start or after an outage does anyway. Raises SharedTierMisconfigured (naming the
        setting to fix) or SharedTierUnavailable."""
        self._verified = False
        self._run(lambda: None)

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

    def instance_id(self) -> str:
        """The Redis server's ``run_id``, new at every start: a change means the tier
        restarted and lost what it held (no persistence), whatever the books say."""
        return str(self._run(lambda: self._redis.info("server"))["run_id"])

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
                pipe.eval(scripts.BLOCK_SIZES, 1, self._keys[1])
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
        """Run one Redis call; map a refused password or an evicting Redis to
        SharedTierMisconfigured, connection failures to SharedTierUnavailable and Redis'
        own out-of-memory refusal to TierFull; log each trouble's start and end once."""
        try:
            if not self._verified:
                self._verify_server()
            result = call()
        except SharedTierMisconfigured as exc:
            self._trouble("misconfigured", f"shared tier misconfigured: {exc}; serving from local tiers",
                          logging.ERROR)
            raise
        except redis.AuthenticationError as exc:  # a ConnectionError subclass: first
            problem = self._auth_problem(exc)
            self._trouble("misconfigured", f"shared tier misconfigured: {problem}; serving from local tiers",
                          logging.ERROR)
            raise SharedTierMisconfigured(problem) from None
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._verified = False  # a Redis that comes back may be another one: check it again
            reason = f"shared tier unavailable at {self.address}: {self._reason(exc)}"
            self._trouble("unavailable", f"{reason}; serving from local tiers", logging.WARNING)
            raise SharedTierUnavailable(reason) from exc
        except redis.ResponseError as exc:
            # Inside a script Redis wraps the refusal, so match its text, not the type.
            if "OOM command not allowed" not in str(exc):
                raise
            # Redis hit maxmemory (set below capacity_bytes, or overhead): its
            # noeviction policy refused the script before its first write.
            raise TierFull(put_bytes, 0, detail=f"Redis at {self.address} is at its maxmemory") from exc
        self._untroubled()
        return result

    def _verify_server(self) -> None:
        memory = self._redis.info("memory")
        policy, maxmemory = memory.get("maxmemory_policy"), int(memory.get("maxmemory", 0))
        if policy != "noeviction":
            raise SharedTierMisconfigured(
                f"Redis at {self.address} has maxmemory-policy {policy}, which lets Redis drop blocks that "
                "sessions still name: set maxmemory-policy noeviction in its config (the Helm chart does)")
        if maxmemory == 0:
            raise SharedTierMisconfigured(
                f"Redis at {self.address} has no maxmemory, so it grows until the kernel kills it: set "
                "maxmemory above tiers.shared_capacity_gib (the Helm chart derives it: redis.maxmemoryMb)")
        if maxmemory < self._capacity:
            log.warning("Redis at %s has maxmemory %d bytes, below the shared tier's capacity %d: puts are "
                        "refused (TierFull) before the capacity is reached", self.address, maxmemory, self._capacity)
        self._verified = True

    def _auth_problem(self, exc: BaseException) -> str:
        fix = (f"set {REDIS_PASSWORD_ENV} to the password Redis requires "
               "(on Kubernetes the chart sets it from its Redis Secret: redis.auth)")
        if self._password is None:
            return f"Redis at {self.address} requires a password and none is set: {fix}"
        return f"Redis at {self.address} refused the password ({self._reason(exc)}): {fix}"

    def _reason(self, exc: BaseException) -> str:
        reason = str(exc).rstrip(".") or type(exc).__name__
        return reason.replace(self._password, "***") if self._password else reason

    def _trouble(self, kind: str, line: str, level: int) -> None:
        with self._state_lock:
            if self._trouble_kind == kind:
                return
            self._trouble_kind = kind
        log.log(level, "%s", line)

    def _untroubled(self) -> None:
        if self._trouble_kind is None:
            return
        with self._state_lock:
            if self._trouble_kind is None:
                return
            self._trouble_kind = None
        log.info("shared tier available again at %s", self.address)


def open_shared_tier(url: str, capacity_bytes: int, *, env: Mapping[str, str] | None = None,
                     timeout_s: float = 1.0) -> SharedTier:
    """The shared tier as a node agent opens it at start: the password from
    LULL_REDIS_PASSWORD (on Kubernetes, the chart's Secret), and Redis checked at once.
    A misconfigured Redis fails the start (SharedTierMisconfigured names the fix); one
    that is not up yet does not, since on Kubernetes Redis and the Ray pods start
    together: the first call checks it then."""
    tier = SharedTier(url, capacity_bytes, password=redis_password(env), timeout_s=timeout_s)
    try:
        tier.verify()
    except SharedTierUnavailable:
        pass  # the tier logged it; every later call tries again
    except SharedTierMisconfigured:
        tier.close()
        raise
    return tier


def _checked_hashes(block_hashes: Sequence[str]) -> list[str]:
    """Hashes are joined with spaces inside Redis, so only hex is accepted."""
    hashes = list(block_hashes)
    for h in hashes:
        if not isinstance(h, str) or not _HEX.fullmatch(h):
            raise ValueError(f"block hash must be a non-empty hex string, got {h!r}")
    return hashes
