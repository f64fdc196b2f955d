"""`lull up`, `lull status`, `lull down`: their command lines (the bodies are in
controller/assembly/local_platform.py).

`up`'s flags are settings of proto/config.py: each named flag stands for one setting
(``FLAGS``), and ``--set section.setting=value`` reaches any other. Type, check and help
come from the setting's definition, so a flag cannot drift from the config; what a flag
gives is laid over the config (file, LULL_* variables) as the Serve app's overrides.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from controller.cli.args import positive_int
from proto.config import ConfigError, definition, parse_setting

# flag -> the setting it sets. The flags' names predate `--set` (README, tests, benchmarks).
FLAGS: dict[str, str] = {
    "--replicas": "replicas.initial",
    "--min-replicas": "replicas.min",
    "--max-replicas": "replicas.max",
    "--policy": "policy.name",
    "--port": "gateway.http_port",
    "--host": "gateway.host",
    "--gpu-tier-tokens": "tiers.gpu_tier_tokens",
    "--redis-url": "tiers.redis_url",
    "--engine-cpus": "cluster.engine_cpus",
}
# Where `lull up`, not the config, supplies the value when no flag or --set gives one.
UP_DEFAULTS: dict[str, str] = {
    "tiers.redis_url": "a Redis that lull up starts",
    "cluster.engine_cpus": "the replicas' share of a Ray node's cores (every node has this host's)",
}


def setting_type(name: str) -> Callable[[str], Any]:
    """An argparse type: the text as the value of setting ``name``, by its check."""
    def parse(text: str) -> Any:
        try:
            return parse_setting(name, text)
        except ConfigError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    parse.__name__ = name  # argparse names the type in some messages
    return parse


def assignment(text: str) -> tuple[str, Any]:
    """An argparse type for ``--set``: ``section.setting=value``, parsed and checked."""
    name, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected section.setting=value, got {text!r}")
    return name.strip(), setting_type(name.strip())(value)


def model_argument(text: str) -> str:
    """An argparse type for ``--model``: a folder or a Hugging Face id, as a model.path."""
    from controller.assembly.local_model import model_reference

    return setting_type("model.path")(model_reference(text))


def flag_help(name: str) -> str:
    setting = definition(name)
    default = UP_DEFAULTS.get(name) or f"the config's, {json.dumps(setting.default)} unless set"
    return f"{setting.doc} [{name}; default: {default}]".replace("%", "%%")


def add_parser(subparsers):
    up = subparsers.add_parser("up", help="start a local Lull platform (Ray, Redis, controller, gateway, engines)")
    up.add_argument("--nodes", type=positive_int, default=1, help="Ray nodes to start on this host")
    for flag, name in FLAGS.items():
        up.add_argument(flag, type=setting_type(name), default=argparse.SUPPRESS, help=flag_help(name))
    up.add_argument("--model", type=model_argument, default=argparse.SUPPRESS, metavar="PATH|ID",
                    help="the model: a local folder, or a Hugging Face id (hf://ORG/NAME[@REVISION] or ORG/NAME), "
                         "downloaded once into $LULL_MODEL_CACHE (~/.cache/lull/models) before the platform starts "
                         "(HF_TOKEN for gated models) [model.path; default: the config's, the tiny local model "
                         "unless set]")
    up.add_argument("--set", type=assignment, action="append", default=[], metavar="SECTION.SETTING=VALUE",
                    help="any setting of proto/config.py, e.g. engine.dtype=float32 (repeatable; the flags "
                         "above win)")
    up.set_defaults(func=cmd_up)
    status = subparsers.add_parser("status", help="sessions by tier with their idleness, and tier occupancy")
    status.set_defaults(func=cmd_status)
    down = subparsers.add_parser("down", help="stop the local platform started by `lull up`")
    down.set_defaults(func=cmd_down)


def overrides_of(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """``{section: {setting: value}}`` from ``--set`` and then the named flags given."""
    given = list(args.set)
    given += [(name, getattr(args, _dest(flag))) for flag, name in FLAGS.items() if hasattr(args, _dest(flag))]
    if hasattr(args, "model"):
        given.append(("model.path", args.model))
    overrides: dict[str, dict[str, Any]] = {}
    for name, value in given:
        section, _, key = name.partition(".")
        overrides.setdefault(section, {})[key] = value
    return overrides


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def cmd_up(args) -> int:
    from controller.assembly.local_platform import up

    return up(args.nodes, overrides_of(args))


def cmd_status(args) -> int:
    from controller.assembly.local_platform import status

    return status()


def cmd_down(args) -> int:
    from controller.assembly.local_platform import down

    return down()
