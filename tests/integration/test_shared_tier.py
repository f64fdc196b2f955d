"""SharedTier against a real redis-server (LocalRedis): byte-exact round trips,
content-addressed blocks shared across sessions, all-or-nothing puts, eviction in
the caller's order, exact accounting against a Python model (Hypothesis), a
password (LULL_REDIS_PASSWORD) that works and never reaches the logs, a refused
password or an evicting Redis reported as a misconfiguration naming its fix (not an
outage), and outages that degrade with one log line."""

import logging
import os
import re
import signal
import time

import hypothesis.strategies as st
import pytest
import redis
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from workers.redis_server import LocalRedis
from workers.shared_tier import (
    SharedTier,
    SharedTierMisconfigured,
    SharedTierUnavailable,
    TierError,
    TierFull,
    open_shared_tier,
)

CAPACITY = 1000
LOGGER = "workers.shared_tier"


@pytest.fixture(scope="module")
def server():
    with LocalRedis("8mb") as local:
        yield local


@pytest.fixture
def tier(server):
    redis.Redis.from_url(server.url).flushdb()
    shared = SharedTier(server.url, CAPACITY, timeout_s=0.5)
    yield shared
    shared.check_integrity()
    shared.close()


def block(name: str, size: int) -> tuple[str, bytes]:
    """A content-addressed block: its hash is fixed by its name, its bytes by both."""
    digest = name.encode().hex()
    return digest, bytes((i * 7 + len(name)) % 256 for i in range(size))


def snapshot(tier: SharedTier, session_ids=("a", "b", "c", "d")):
    return tier.used_bytes(), tier.sessions(), [tier.get_session(s) for s in session_ids]


def test_round_trip_is_byte_exact(tier):
    (h1, b1), (h2, b2) = block("one", 300), block("two", 0)
    h3, b3 = "00ff", b"\x00\r\n\xff" * 10
    added = tier.put_session("a", "tenant-x", [h1, h2, h3, h1], {h1: b1, h2: b2, h3: b3}, tokens=64)
    assert added == len(b1) + len(b2) + len(b3) == tier.used_bytes()
    session = tier.get_session("a")
    assert session.block_hashes == (h1, h2, h3, h1)
    assert (session.tenant, session.tokens, session.nbytes) == ("tenant-x", 64, added)
    assert tier.get_blocks([h3, h1, h2, "abcd"]) == {h1: b1, h2: b2, h3: b3}
    assert tier.missing_blocks([h1, "abcd", h3, "abcd"]) == ["abcd"]
    assert tier.get_session("nobody") is None


def test_shared_blocks_are_stored_once_and_freed_with_the_last_session(tier):
    (sys_h, sys_b), (a_h, a_b), (b_h, b_b) = block("system", 200), block("a", 50), block("b", 70)
    assert tier.put_session("a", "t", [sys_h, a_h], {sys_h: sys_b, a_h: a_b}, 10) == 250
    # The second session sends only its own block: the system prompt is stored.
    assert tier.missing_blocks([sys_h, b_h]) == [b_h]
    assert tier.put_session("b", "t", [sys_h, b_h], {b_h: b_b}, 10) == 70
    assert tier.used_bytes() == 320
    assert tier.sessions() == {"a": 250, "b": 270}
    assert tier.drop_session("a") == 50
    assert tier.get_blocks([sys_h]) == {sys_h: sys_b}
    assert tier.drop_session("b") == 270
    assert tier.drop_session("b") == 0
    assert tier.used_bytes() == 0 and tier.sessions() == {}


def test_put_replaces_the_previous_entry(tier):
    (h1, b1), (h2, b2), (h3, b3) = block("1", 100), block("2", 100), block("3", 40)
    tier.put_session("a", "t", [h1, h2], {h1: b1, h2: b2}, 20)
    tier.put_session("b", "t", [h2], {}, 10)
    assert tier.put_session("a", "t2", [h2, h3], {h3: b3}, 30) == 40
    assert tier.missing_blocks([h1, h2, h3]) == [h1]
    assert tier.get_session("a").block_hashes == (h2, h3)
    assert tier.used_bytes() == 140


def test_a_block_neither_stored_nor_given_is_rejected_without_change(tier):
    (h1, b1), (h2, _) = block("1", 100), block("2", 100)
    tier.put_session("a", "t", [h1], {h1: b1}, 5)
    before = snapshot(tier)
    with pytest.raises(ValueError, match=h2):
        tier.put_session("b", "t", [h1, h2], {}, 5)
    with pytest.raises(ValueError, match="hex"):
        tier.put_session("b", "t", ["not hex"], {"not hex": b"x"}, 5)
    assert snapshot(tier) == before


def test_tier_full_changes_nothing_and_evicting_what_it_names_makes_room(tier):
    blocks = dict(block(name, 300) for name in "abc")
    for sid, h in zip("abc", blocks):
        tier.put_session(sid, "t", [h], {h: blocks[h]}, 1)
    before = snapshot(tier)
    big_h, big_b = block("big", 250)
    with pytest.raises(TierFull) as full:
        tier.put_session("d", "t", [big_h], {big_h: big_b}, 1)
    assert isinstance(full.value, TierError)
    assert (full.value.needed, full.value.available) == (250, 100)
    assert snapshot(tier) == before
    assert tier.missing_blocks([big_h]) == [big_h]
    assert tier.evict(["b", "a", "c"], full.value.needed) == ["b"]
    assert tier.put_session("d", "t", [big_h], {big_h: big_b}, 1) == 250
    assert tier.used_bytes() == 850


def test_capacity_is_a_hard_edge(tier):
    (h1, b1), (h2, b2) = block("1", CAPACITY), block("2", 1)
    assert tier.put_session("a", "t", [h1], {h1: b1}, 1) == CAPACITY
    with pytest.raises(TierFull) as full:
        tier.put_session("b", "t", [h2], {h2: b2}, 1)
    assert (full.value.needed, full.value.available) == (1, 0)
    assert tier.put_session("b", "t", [h1], {}, 1) == 0  # shared: needs no new bytes


def test_replacing_a_session_counts_only_its_net_growth(tier):
    (h1, b1), (h2, b2) = block("1", 600), block("2", 700)
    tier.put_session("a", "t", [h1], {h1: b1}, 1)
    # 700 new bytes fit because the 600 the old entry held are freed in the same step.
    assert tier.put_session("a", "t", [h2], {h2: b2}, 1) == 700
    assert tier.used_bytes() == 700


def test_evict_follows_the_callers_order_and_stops_when_enough_is_free(tier):
    for sid in "abcd":
        h, data = block(sid, 200)
        tier.put_session(sid, "t", [h], {h: data}, 1)
    assert tier.evict(["c"], need_bytes=200) == []  # 200 are free already
    assert tier.evict(["zz", "d", "b", "a"], need_bytes=550) == ["d", "b"]
    assert sorted(tier.sessions()) == ["a", "c"]
    assert tier.evict(["a", "c"], need_bytes=5000) == ["a", "c"]
    assert tier.used_bytes() == 0


def test_redis_maxmemory_refusal_is_tier_full_and_drops_still_work():
    with LocalRedis("1500kb") as local:
        tier = SharedTier(local.url, capacity_bytes=10**9)
        stored = []
        with pytest.raises(TierFull, match=f"Redis at {local.address} is at its maxmemory"):
            for i in range(40):
                h, data = block(f"s{i}", 100_000)
                tier.put_session(f"s{i}", "t", [h], {h: data}, 1)
                stored.append(f"s{i}")
        assert stored and sorted(tier.sessions()) == sorted(stored)
        tier.check_integrity()
        assert tier.drop_session(stored[0]) == 100_000
        tier.check_integrity()
        tier.close()


class TierModel(RuleBasedStateMachine):
    """Random puts, drops and evictions; the tier must match a dict-based model.
    The blocks (723 bytes) outgrow the capacity, so TierFull is reached too."""

    def __init__(self, tier: SharedTier):
        super().__init__()
        self.tier = tier
        self.capacity = tier.capacity_bytes
        self.sessions: dict[str, list[str]] = {}
        self.contents = dict(block(f"b{i}", size) for i, size in enumerate([0, 10, 60, 120, 200, 333]))

    def stored(self) -> set[str]:
        return {h for hashes in self.sessions.values() for h in hashes}

    def used(self, hashes=None) -> int:
        return sum(len(self.contents[h]) for h in (self.stored() if hashes is None else hashes))

    @rule(
        sid=st.sampled_from("abcde"),
        picks=st.lists(st.integers(0, 5), max_size=6),
        send_all=st.booleans(),
    )
    def put(self, sid, picks, send_all):
        hashes = [list(self.contents)[i] for i in picks]
        stored = self.stored()
        given = {h: self.contents[h] for h in hashes if send_all or h not in stored}
        after = {**self.sessions, sid: hashes}
        growth = self.used({h for v in after.values() for h in v}) - self.used()
        if growth > 0 and self.used() + growth > self.capacity:
            with pytest.raises(TierFull) as full:
                self.tier.put_session(sid, "t", hashes, given, len(hashes))
            assert (full.value.needed, full.value.available) == (growth, self.capacity - self.used())
            return
        added = self.tier.put_session(sid, "t", hashes, given, len(hashes))
        assert added == self.used(set(hashes) - stored)
        self.sessions[sid] = hashes

    @rule(sid=st.sampled_from("abcdef"))
    def drop(self, sid):
        before = self.used()
        self.sessions.pop(sid, None)
        assert self.tier.drop_session(sid) == before - self.used()

    @rule(order=st.permutations("abcdef"), need=st.integers(0, 700))
    def evict(self, order, need):
        expected = []
        for sid in order:
            if self.capacity - self.used() >= need:
                break
            if sid in self.sessions:
                del self.sessions[sid]
                expected.append(sid)
        assert self.tier.evict(order, need) == expected

    @invariant()
    def matches_model(self):
        assert self.tier.used_bytes() == self.used() <= self.capacity
        assert self.tier.sessions() == {s: self.used(set(h)) for s, h in self.sessions.items()}
        assert self.tier.missing_blocks(self.contents) == [h for h in self.contents if h not in self.stored()]
        self.tier.check_integrity()

    def teardown(self):
        self.tier.evict(list("abcdef"), need_bytes=self.capacity + 1)


def test_accounting_matches_a_model_under_random_operations(server, tier):
    small = SharedTier(server.url, capacity_bytes=500, timeout_s=0.5)
    run_state_machine_as_test(
        lambda: TierModel(small),
        settings=settings(max_examples=40, stateful_step_count=25, deadline=None),
    )
    small.close()


def test_password_works_and_never_reaches_logs_or_errors(caplog):
    secret = "Tier-Secret-93x"
    caplog.set_level(logging.DEBUG)
    with LocalRedis("2mb", password=secret) as local:
        plain_url = f"redis://{local.address}/0"
        tier = SharedTier(plain_url, CAPACITY, password=secret, timeout_s=0.5)
        h, data = block("p", 10)
        assert tier.put_session("a", "t", [h], {h: data}, 1) == 10
        in_url = SharedTier(local.url, CAPACITY, timeout_s=0.5)  # a test server's URL carries it
        assert in_url.get_blocks([h]) == {h: data}
        wrong = SharedTier(plain_url, CAPACITY, password="wrong-pass", timeout_s=0.5)
        with pytest.raises(SharedTierMisconfigured) as refused:
            wrong.used_bytes()
        local.stop()
        with pytest.raises(SharedTierUnavailable) as down:
            tier.used_bytes()
        for client in (tier, in_url, wrong):
            client.close()
    assert "refused the password" in str(refused.value) and "LULL_REDIS_PASSWORD" in str(refused.value)
    assert secret not in str(refused.value) + str(down.value)
    assert [r.levelname for r in caplog.records if r.name == LOGGER] == ["ERROR", "WARNING"]
    assert all(secret not in r.getMessage() for r in caplog.records)
    assert secret not in caplog.text


def test_a_missing_or_wrong_password_is_a_misconfiguration_naming_the_setting_not_an_outage(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with LocalRedis("2mb", password="right-pass-1") as local:
        plain_url = f"redis://{local.address}/0"
        none = SharedTier(plain_url, CAPACITY, timeout_s=0.5)
        for call in (none.used_bytes, none.sessions, lambda: none.drop_session("a")):
            with pytest.raises(SharedTierMisconfigured, match="requires a password and none is set: set "
                               "LULL_REDIS_PASSWORD") as error:
                call()
            assert isinstance(error.value, TierError) and not isinstance(error.value, SharedTierUnavailable)
        records = [r for r in caplog.records if r.name == LOGGER]
        assert [r.levelno for r in records] == [logging.ERROR]  # once, not once per call
        assert re.fullmatch(rf"shared tier misconfigured: Redis at {re.escape(local.address)} requires a "
                            r"password .+; serving from local tiers", records[0].getMessage())
        with pytest.raises(SharedTierMisconfigured, match="refused the password"):
            open_shared_tier(plain_url, CAPACITY, env={"LULL_REDIS_PASSWORD": "wrong-pass"}, timeout_s=0.5)
        opened = open_shared_tier(plain_url, CAPACITY, env={"LULL_REDIS_PASSWORD": "right-pass-1"}, timeout_s=0.5)
        assert opened.used_bytes() == 0
        none.close()
        opened.close()
    with pytest.raises(ValueError, match="once"):
        SharedTier(local.url, CAPACITY, password="right-pass-1")


def test_an_evicting_or_unbounded_redis_is_refused_until_fixed(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    with LocalRedis("2mb") as local:
        admin = redis.Redis.from_url(local.url)
        admin.config_set("maxmemory-policy", "allkeys-lru")
        with pytest.raises(SharedTierMisconfigured, match="maxmemory-policy allkeys-lru.+set maxmemory-policy "
                           "noeviction"):
            open_shared_tier(local.url, CAPACITY, env={}, timeout_s=0.5)
        tier = SharedTier(local.url, CAPACITY, timeout_s=0.5)
        h, data = block("e", 10)
        with pytest.raises(SharedTierMisconfigured):
            tier.put_session("a", "t", [h], {h: data}, 1)
        assert admin.hlen("{lull}:blocks") == 0, "a refused tier writes nothing"
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", "0")
        with pytest.raises(SharedTierMisconfigured, match="no maxmemory"):
            tier.used_bytes()
        admin.config_set("maxmemory", str(2 << 20))
        assert tier.put_session("a", "t", [h], {h: data}, 1) == 10  # fixed: checked again, and served
        tier.close()
        admin.close()
    levels = [r.levelno for r in caplog.records if r.name == LOGGER]
    assert levels == [logging.ERROR, logging.ERROR, logging.INFO]  # open, then the tier: once each; then back


def test_a_redis_not_up_yet_does_not_fail_the_start(caplog):
    """On Kubernetes Redis and the Ray pods start together: the agent starts, the first call checks."""
    with LocalRedis("2mb") as local:
        address = local.address
    tier = open_shared_tier(f"redis://{address}/0", CAPACITY, env={}, timeout_s=0.3)
    with pytest.raises(SharedTierUnavailable):
        tier.used_bytes()
    tier.close()
    assert [r.levelname for r in caplog.records if r.name == LOGGER] == ["WARNING"]


@pytest.fixture
def outage_server():
    with LocalRedis("2mb") as local:
        yield local


def test_outage_raises_fast_logs_once_and_recovers(outage_server, caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)
    tier = SharedTier(outage_server.url, CAPACITY, timeout_s=0.5)
    h, data = block("o", 10)
    tier.put_session("a", "t", [h], {h: data}, 1)
    outage_server.stop()
    for call in (tier.used_bytes, tier.sessions, lambda: tier.get_session("a"), lambda: tier.drop_session("a")):
        started = time.monotonic()
        with pytest.raises(SharedTierUnavailable):
            call()
        assert time.monotonic() - started < 0.5
    records = [r for r in caplog.records if r.name == LOGGER]
    assert len(records) == 1 and records[0].levelno == logging.WARNING and records[0].exc_info is None
    pattern = rf"shared tier unavailable at {re.escape(outage_server.address)}: .+; serving from local tiers"
    assert re.fullmatch(pattern, records[0].getMessage())

    outage_server.restart()
    assert tier.used_bytes() == 0  # a restarted Redis is empty: it persists nothing
    assert tier.put_session("a", "t", [h], {h: data}, 1) == 10
    records = [r for r in caplog.records if r.name == LOGGER]
    assert [r.levelno for r in records] == [logging.WARNING, logging.INFO]
    assert records[1].getMessage() == f"shared tier available again at {outage_server.address}"
    tier.close()


def test_a_hung_redis_fails_within_the_timeout(outage_server, caplog):
    tier = SharedTier(outage_server.url, CAPACITY, timeout_s=0.3)
    assert tier.used_bytes() == 0
    os.kill(outage_server.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(SharedTierUnavailable, match="[Tt]imeout|timed out"):
            tier.used_bytes()
        assert 0.25 < time.monotonic() - started < 0.6
    finally:
        os.kill(outage_server.pid, signal.SIGCONT)
    assert tier.used_bytes() == 0
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    tier.close()
