"""Lull's secrets: API keys by tenant, the Redis password and the token of the internal
services. They come only from a file (``auth.api_keys_file``) or the environment, and never
appear in reprs, logs or pickles."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proto.config_checks import ConfigError
from proto.names import id_problem

API_KEYS_ENV = "LULL_API_KEYS"
REDIS_PASSWORD_ENV = "LULL_REDIS_PASSWORD"
INTERNAL_TOKEN_ENV = "LULL_INTERNAL_TOKEN"
MIN_TOKEN_CHARS = 16


@dataclass(frozen=True)
class Secrets:
    """API keys by tenant and the Redis password; shown only as counts."""

    api_keys: Mapping[str, str] = field(default_factory=dict)  # tenant -> key
    redis_password: str | None = None
    api_keys_file: str | None = None  # where the keys were read, besides the environment

    def __repr__(self) -> str:
        password = "set" if self.redis_password else "unset"
        return f"Secrets(api_keys=<{len(self.api_keys)} tenants>, redis_password=<{password}>)"

    def __reduce__(self):
        # Ray pickles a config that crosses processes, and Serve keeps deployment args in the
        # GCS: the secrets never travel; the receiving process reads them again, from the same
        # file and from its environment (Ray's workers inherit the driver's).
        return load_secrets, (self.api_keys_file,)

    def tenant_of(self, key: str) -> str | None:
        return next((t for t, k in self.api_keys.items() if k == key), None)


def read_api_keys(text: str, source: str) -> dict[str, str]:
    """``tenant:key`` pairs, one per line or comma-separated. Errors never quote a key."""
    keys: dict[str, str] = {}
    entries = [e.strip() for line in text.splitlines() for e in line.split(",")]
    for number, entry in enumerate(entries, 1):
        if not entry or entry.startswith("#"):
            continue
        tenant, sep, key = (part.strip() for part in entry.partition(":"))
        if not sep or not tenant or not key:
            raise ConfigError(f"{source} entry {number}: expected 'tenant:key'")
        if problem := id_problem("a tenant name", tenant):
            raise ConfigError(f"{source} entry {number}: {problem}")
        if tenant in keys:
            raise ConfigError(f"{source}: tenant {tenant!r} has two keys")
        if key in keys.values():
            raise ConfigError(f"{source}: tenant {tenant!r} reuses another tenant's key")
        keys[tenant] = key
    return keys


def load_secrets(api_keys_file: str | None, env: Mapping[str, str] | None = None) -> Secrets:
    """API keys from ``api_keys_file`` and ``LULL_API_KEYS``; the Redis password from its variable."""
    env = os.environ if env is None else env
    api_keys: dict[str, str] = {}
    if api_keys_file:
        api_keys = read_api_keys(Path(api_keys_file).read_text(), api_keys_file)
    for tenant, key in read_api_keys(env.get(API_KEYS_ENV, ""), API_KEYS_ENV).items():
        if tenant in api_keys:
            raise ConfigError(f"{API_KEYS_ENV}: tenant {tenant!r} already has a key in auth.api_keys_file")
        api_keys[tenant] = key
    return Secrets(api_keys=api_keys, redis_password=redis_password(env), api_keys_file=api_keys_file)


def redis_password(env: Mapping[str, str] | None = None) -> str | None:
    """The shared tier's Redis password (``LULL_REDIS_PASSWORD``); None when unset or empty.
    A process that connects to Redis reads it from its own environment (on Kubernetes, the
    chart's Secret), so it never travels in actor arguments."""
    env = os.environ if env is None else env
    return env.get(REDIS_PASSWORD_ENV) or None


def internal_token(env: Mapping[str, str] | None = None) -> str:
    """The shared token of Lull's internal gRPC services (the node agents), from
    ``LULL_INTERNAL_TOKEN``: on Kubernetes the chart's Secret, under `lull up` one it
    generates. Every agent and every caller of one reads it from its own environment, so
    it never travels in actor arguments. Missing or weak is an error naming the fix."""
    env = os.environ if env is None else env
    token = env.get(INTERNAL_TOKEN_ENV, "")
    fix = (f"set {INTERNAL_TOKEN_ENV} to the same random secret of at least {MIN_TOKEN_CHARS} characters "
           "on every Ray node (the Helm chart sets it from its internal-token Secret; `lull up` generates one)")
    if not token:
        raise ConfigError(f"{INTERNAL_TOKEN_ENV} is not set: {fix}")
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
        raise ConfigError(f"{INTERNAL_TOKEN_ENV} is not a usable token (printable ASCII, no spaces, "
                          f"at least {MIN_TOKEN_CHARS} characters): {fix}")
    return token
