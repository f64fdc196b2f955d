"""``lull bench-gateway``: the latency the gateway adds, against calling the engine directly.

Against the platform ``lull up`` started: the same one-token call (the same prompt,
so the engine's work is a prefix-cache hit every time) alternates between the REST
gateway (``/v1/chat/completions`` by default: auth, the session, vLLM's rendering to
count the prompt, admission by the controller, routing to the session's replica,
vLLM's server there, the report back) and vLLM's server on the engine replica called
directly from this process through its Serve deployment handle, with the same body.
The difference of the two latency distributions is what Lull's control path costs a call.
Alternating the two paths call by call keeps a noisy shared machine fair to both.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table
from rich_argparse import RichHelpFormatter

from proto.engine_call import EngineCall
from proto.names import ENGINE_DEPLOYMENT, RAY_NAMESPACE, SERVE_APP
from controller.cli.bench.live import api_key

PROMPT = [(i * 29) % 700 + 30 for i in range(64)]
SYSTEM = "You are a coding agent. Use the tools to read and edit files; answer briefly."


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("bench-gateway", help="latency the gateway adds over calling the engine directly",
                                   description=__doc__, formatter_class=RichHelpFormatter)
    parser.add_argument("--calls", type=int, default=200, help="calls per path (alternating)")
    parser.add_argument("--warmup", type=int, default=10, help="calls per path before measuring")
    parser.add_argument("--api", choices=("chat", "completions"), default="chat",
                        help="chat: /v1/chat/completions with a text message; completions: /v1/completions, token ids")
    parser.add_argument("--api-key", default=None, help="bearer key (default: the first configured key, if any)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.set_defaults(func=run)
    return parser


def run(args) -> int:
    import httpx
    import ray
    from ray import serve

    from controller.assembly.local_platform import read_state

    if args.calls < 10 or args.warmup < 0:
        raise ValueError("--calls must be >= 10 and --warmup >= 0")
    state = read_state()
    ray.init(address=state["address"], namespace=RAY_NAMESPACE, log_to_driver=False)
    engine = serve.get_deployment_handle(ENGINE_DEPLOYMENT, app_name=SERVE_APP)
    key = api_key(args)
    http = httpx.Client(base_url=f"http://127.0.0.1:{state['port']}", timeout=120,
                        headers={"authorization": f"Bearer {key}"} if key else {})

    model = http.get("/v1/models").raise_for_status().json()["data"][0]["id"]
    route, body = _request(args.api, model)

    def via_gateway() -> float:
        started = time.perf_counter()
        http.post(route, json=body, headers={"x-session-id": "bench-gw"}).raise_for_status()
        return time.perf_counter() - started

    def direct() -> float:
        started = time.perf_counter()
        call = EngineCall("POST", route, json.dumps(body).encode(), headers=(("content-type", "application/json"),))
        head, *_ = list(engine.options(stream=True).http.remote(call))  # head, body, usage
        if head["status"] != 200:
            raise RuntimeError(f"the engine answered {head['status']}")
        return time.perf_counter() - started

    for _ in range(args.warmup):
        via_gateway(), direct()
    gateway_s, direct_s = [], []
    for i in range(args.calls):  # alternate which path goes first
        first, second = (via_gateway, direct) if i % 2 == 0 else (direct, via_gateway)
        for path in (first, second):
            (gateway_s if path is via_gateway else direct_s).append(path())
    http.delete("/v1/sessions/bench-gw")  # leave no session open: `lull bench` waits for open ones
    figures = _figures(np.array(gateway_s), np.array(direct_s))
    _print(figures)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"measured": True, "api": args.api, "path": route, "max_tokens": 1,
                                         "calls_per_path": len(gateway_s), **figures}, indent=2))
        print(f"wrote {args.json}")
    return 0


def _request(api: str, model: str) -> tuple[str, dict]:
    if api == "chat":
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "List the files."}]
        return "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 1, "temperature": 0}
    return "/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0}


def _figures(gateway: np.ndarray, direct: np.ndarray) -> dict:
    def q(values: np.ndarray, p: float) -> float:
        return float(np.percentile(values, p))

    return {
        "gateway_s": {"p50": q(gateway, 50), "p99": q(gateway, 99), "mean": float(gateway.mean())},
        "engine_direct_s": {"p50": q(direct, 50), "p99": q(direct, 99), "mean": float(direct.mean())},
        "added_s": {"p50": q(gateway, 50) - q(direct, 50), "p99": q(gateway, 99) - q(direct, 99)},
    }


def _print(figures: dict) -> None:
    table = Table(title="one-token call latency (ms), measured on this machine")
    for column in ("path", "p50", "p99", "mean"):
        table.add_column(column, justify="right" if column != "path" else "left")
    for name, key in (("gateway (REST)", "gateway_s"), ("engine handle, direct", "engine_direct_s")):
        row = figures[key]
        table.add_row(name, *(f"{row[k] * 1000:.1f}" for k in ("p50", "p99", "mean")))
    added = figures["added_s"]
    table.add_row("added by the gateway", f"{added['p50'] * 1000:.1f}", f"{added['p99'] * 1000:.1f}", "")
    Console().print(table)
