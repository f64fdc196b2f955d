"""LocalRedis against a real redis-server: the settings that keep the shared tier
bounded (maxmemory + noeviction, no persistence), start-up errors that say why,
idempotent stop, restart on the same port, a password kept out of argv, and the
``python -m workers.redis_server`` entry point."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from workers.redis_server import LocalRedis, RedisStartError, parse_bytes


@pytest.fixture(scope="module")
def server():
    with LocalRedis("2mb") as local:
        yield local


@pytest.fixture
def client(server):
    client = redis.Redis.from_url(server.url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def no_retry_client(port: int, password: str | None = None) -> redis.Redis:
    """redis-py's default retries back off for seconds; these tests want the first answer."""
    return redis.Redis(port=port, password=password, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0))


def refuses_connections(port: int) -> bool:
    try:
        no_retry_client(port).ping()
    except redis.ConnectionError:
        return True
    return False


def test_bounded_and_not_persistent(client, server):
    config = client.config_get("*")
    assert int(config["maxmemory"]) == server.maxmemory == 2 * 1024**2
    assert config["maxmemory-policy"] == "noeviction"
    assert config["save"] == ""
    assert config["appendonly"] == "no"


def test_full_redis_refuses_writes_and_evicts_nothing(client):
    written = 0
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        for written in range(100):
            client.set(f"k{written}", b"x" * 100_000)
    assert written > 0
    assert all(client.exists(f"k{i}") for i in range(written))


def test_stop_is_idempotent_and_frees_the_port():
    local = LocalRedis("1mb").start()
    pid, port = local.pid, local.port
    assert pid is not None and not refuses_connections(port)
    local.stop()
    local.stop()
    assert not local.running and local.pid is None
    assert refuses_connections(port)


def test_restart_keeps_the_port_and_starts_empty():
    with LocalRedis("1mb") as local:
        client = redis.Redis.from_url(local.url)
        client.set("k", b"v")
        port = local.port
        local.restart()
        assert local.port == port and local.running
        assert client.get("k") is None  # the pooled socket died; redis-py reconnects
        client.close()
    assert refuses_connections(port)


def test_failed_start_says_why_with_the_log_tail(server):
    clash = LocalRedis("1mb", port=server.port)
    with pytest.raises(RedisStartError, match=rf"(?s)exited.*{server.port}.*Address already in use"):
        clash.start()
    assert not clash.running
    assert server.running


def test_password_required_and_kept_out_of_argv_and_repr():
    secret = "pw-Redis-7f3a"
    with LocalRedis("1mb", password=secret) as local:
        with pytest.raises(redis.AuthenticationError):
            no_retry_client(local.port).ping()
        assert redis.Redis.from_url(local.url).ping()
        with open(f"/proc/{local.pid}/cmdline", "rb") as cmdline:
            assert secret.encode() not in cmdline.read()
        assert secret not in repr(local) and secret not in local.address


@pytest.mark.parametrize(
    "size, expected",
    [(123, 123), ("2mb", 2 * 1024**2), ("1g", 10**9), ("64KB", 64 * 1024), (" 5 ", 5)],
)
def test_parse_bytes(size, expected):
    assert parse_bytes(size) == expected


@pytest.mark.parametrize("size", [0, "0", "1tb", "mb", "-1mb", "1.5gb"])
def test_parse_bytes_rejects(size):
    with pytest.raises(ValueError):
        parse_bytes(size)


def test_module_entry_point_serves_until_terminated(tmp_path):
    env = {**os.environ, "LULL_REDIS_PASSWORD": "cli-secret-1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "workers.redis_server", "--port", "0", "--maxmemory", "3mb"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        text=True,
    )
    try:
        line = process.stdout.readline()
        match = re.search(r"redis ready at 127\.0\.0\.1:(\d+) \(maxmemory 3145728 bytes\)", line)
        assert match, line
        port = int(match.group(1))
        client = redis.Redis(port=port, password="cli-secret-1")
        assert client.config_get("maxmemory")["maxmemory"] == "3145728"
        client.close()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert "cli-secret-1" not in line + process.stdout.read()
        assert refuses_connections(port)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_the_platforms_redis_restarted_by_chaos_keeps_its_password(tmp_path, monkeypatch):
    """`lull chaos`'s redis fault restarts the Redis `lull up` started; it must come back with
    the same password, or every agent's shared tier would stay refused after the fault."""
    from controller.assembly.local_platform import start_redis
    from workers.redis_server import free_port

    monkeypatch.delenv("LULL_REDIS_PASSWORD", raising=False)  # chaos runs in a process without it
    password_path = tmp_path / "redis-password"
    password_path.write_text("up-secret-7")
    state = {"temp_dir": str(tmp_path), "redis_password_path": str(password_path)}
    port = free_port()
    start_redis(state, port)
    try:
        client = no_retry_client(port, "up-secret-7")
        for _ in range(50):  # the server takes a moment to listen
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.1)
        else:
            pytest.fail("the restarted Redis never answered")
        with pytest.raises(redis.AuthenticationError):
            no_retry_client(port).set("k", "v")
    finally:
        os.kill(state["redis_pid"], signal.SIGTERM)
