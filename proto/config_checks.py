"""Value checks for settings: each validates one value, parses it from an
environment variable, and describes itself as a JSON-schema fragment, so that the
config, its env overrides and the Helm chart's ``values.schema.json`` share one
definition of what a setting accepts."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from proto.model_ref import FORMS, parse_model_ref


class ConfigError(ValueError):
    """A bad setting. The message names the setting and what it accepts."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NULL = {"", "null", "none"}


class Check:
    """Accepts or rejects one value; subclasses say what they accept in ``allowed``."""

    allowed: str = ""

    def validate(self, name: str, value: Any) -> None:
        if not self.accepts(value):
            raise ConfigError(f"{name} must be {self.allowed}; got {value!r}")

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def parse(self, name: str, text: str) -> Any:
        """The value of an environment variable; validated afterwards by ``validate``."""
        return text

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def _convert(self, name: str, text: str, convert: Any) -> Any:
        try:
            return convert(text)
        except ValueError:
            raise ConfigError(f"{name} must be {self.allowed}; got {text!r}") from None


@dataclass(frozen=True)
class IntRange(Check):
    lo: int
    hi: int

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"an integer in [{self.lo}, {self.hi}]"

    def accepts(self, value: Any) -> bool:
        return type(value) is int and self.lo <= value <= self.hi

    def parse(self, name: str, text: str) -> Any:
        return self._convert(name, text, int)

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.lo, "maximum": self.hi}


@dataclass(frozen=True)
class FloatRange(Check):
    lo: float
    hi: float
    lo_open: bool = False  # (lo, hi] instead of [lo, hi]

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"

    def accepts(self, value: Any) -> bool:
        if type(value) not in (int, float) or not math.isfinite(value):
            return False
        above = value > self.lo if self.lo_open else value >= self.lo
        return above and value <= self.hi

    def parse(self, name: str, text: str) -> Any:
        return self._convert(name, text, float)

    def schema(self) -> dict[str, Any]:
        bound = "exclusiveMinimum" if self.lo_open else "minimum"
        return {"type": "number", bound: self.lo, "maximum": self.hi}


@dataclass(frozen=True)
class OneOf(Check):
    choices: tuple[Any, ...]

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return "one of " + ", ".join(repr(c) for c in self.choices)

    def accepts(self, value: Any) -> bool:
        return any(type(value) is type(c) and value == c for c in self.choices)

    def parse(self, name: str, text: str) -> Any:
        if all(type(c) is int for c in self.choices):
            return IntRange(-(2**62), 2**62).parse(name, text)
        return text

    def schema(self) -> dict[str, Any]:
        return {"enum": list(self.choices)}


class Flag(Check):
    allowed = "true or false"

    def accepts(self, value: Any) -> bool:
        return type(value) is bool

    def parse(self, name: str, text: str) -> Any:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ConfigError(f"{name} must be {self.allowed}; got {text!r}")

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


class Text(Check):
    allowed = "a non-empty string"

    def accepts(self, value: Any) -> bool:
        return type(value) is str and value.strip() != ""

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "minLength": 1}


@dataclass(frozen=True)
class Pattern(Check):
    """A string matching ``regex`` in full (a name's syntax; the consumer that owns the
    names checks the name itself, e.g. policy names against their registry)."""

    regex: str
    what: str

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return self.what

    def accepts(self, value: Any) -> bool:
        return type(value) is str and re.fullmatch(self.regex, value) is not None

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": f"^{self.regex}$"}


@dataclass(frozen=True)
class Url(Check):
    schemes: tuple[str, ...]

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return "a URL with scheme " + " or ".join(f"{s}://" for s in self.schemes)

    def accepts(self, value: Any) -> bool:
        if type(value) is not str:
            return False
        parts = urlsplit(value)
        return parts.scheme in self.schemes and bool(parts.netloc or parts.path)

    def schema(self) -> dict[str, Any]:
        alternatives = "|".join(self.schemes)
        return {"type": "string", "pattern": f"^({alternatives})://."}


class ModelPath(Check):
    """A model reference (``proto/model_ref.py``); the error says what is wrong with it."""

    allowed = FORMS

    def validate(self, name: str, value: Any) -> None:
        try:
            parse_model_ref(value)
        except ValueError as error:
            raise ConfigError(f"{name}: {error}") from None

    def accepts(self, value: Any) -> bool:
        try:
            parse_model_ref(value)
        except ValueError:
            return False
        return True

    def schema(self) -> dict[str, Any]:
        # The outline only; the config's check (at start) says what is wrong in detail.
        return {"type": "string", "pattern": "^(hf://[A-Za-z0-9].*|pvc://[a-z0-9].*|/.*)$"}


@dataclass(frozen=True)
class Nullable(Check):
    """``inner``, or null (written ``null``, ``none`` or empty in the environment)."""

    inner: Check

    @property
    def allowed(self) -> str:  # type: ignore[override]
        return f"{self.inner.allowed}, or null"

    def validate(self, name: str, value: Any) -> None:
        if value is not None and type(self.inner).validate is not Check.validate:
            self.inner.validate(name, value)  # its own message says what is wrong
        super().validate(name, value)

    def accepts(self, value: Any) -> bool:
        return value is None or self.inner.accepts(value)

    def parse(self, name: str, text: str) -> Any:
        return None if text.strip().lower() in _NULL else self.inner.parse(name, text)

    def schema(self) -> dict[str, Any]:
        return {"anyOf": [self.inner.schema(), {"type": "null"}]}


class VllmArgs(Check):
    """More `vllm serve` arguments by their Python name ({"enable_chunked_prefill": true}), for
    every engine. Lull sets the ones in ``owned`` itself (from its own settings, or per call),
    so those are refused with the setting to use instead."""

    allowed = "a mapping of vLLM argument names (snake_case) to values"
    owned = {"model": "model.path", "served_model_name": "model.served_name", "max_model_len": "engine.max_model_len",
             "block_size": "engine.block_size", "tensor_parallel_size": "engine.tensor_parallel_size",
             "dtype": "engine.dtype", "max_num_seqs": "engine.max_num_seqs",
             "gpu_memory_utilization": "engine.gpu_memory_utilization",
             "tool_call_parser": "engine.tool_call_parser", "kv_transfer_config": "(Lull's KV connector)",
             "api_key": "auth (the gateway checks keys)", "port": "gateway.http_port", "host": "gateway.http_port"}

    def validate(self, name: str, value: Any) -> None:
        super().validate(name, value)
        for arg in value:
            if arg in self.owned:
                raise ConfigError(f"{name}.{arg} is Lull's to set: use {self.owned[arg]}")

    def accepts(self, value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(k, str) and re.fullmatch(r"[a-z][a-z0-9_]*", k)
                                               for k in value)

    def parse(self, name: str, text: str) -> Any:
        return self._convert(name, text, json.loads)

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "propertyNames": {"pattern": "^[a-z][a-z0-9_]*$"}}


PORT = IntRange(1, 65535)
