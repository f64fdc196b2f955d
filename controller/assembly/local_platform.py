"""`lull up`, `lull status`, `lull down`: the embedded platform on one machine.

`up` starts a local Ray cluster (`ray start --head`, plus `--nodes - 1` more Ray
nodes joined with `ray start --address`), a local Redis unless `--redis-url` is
given, then the Serve app (`controller.assembly:build_app`: node agents, controller
actor, gateway, engine replicas). What `down` must stop is kept in a small JSON
state file under LULL_STATE_DIR (default ~/.cache/lull).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE, SERVE_APP

STATE_ENV = "LULL_STATE_DIR"


def state_path() -> Path:
    return Path(os.environ.get(STATE_ENV, Path.home() / ".cache" / "lull")) / "platform.json"


def read_state() -> dict:
    path = state_path()
    if not path.exists():
        raise ValueError(f"no Lull platform is up (no {path}); start one with `lull up`")
    return json.loads(path.read_text())


def add_parser(subparsers):
    up = subparsers.add_parser("up", help="start a local Lull platform (Ray, Redis, controller, gateway, engines)")
    up.add_argument("--nodes", type=int, default=1, help="Ray nodes to start on this host")
    up.add_argument("--replicas", type=int, default=1, help="engine replicas at start (vLLM on CPU, tiny local model)")
    up.add_argument("--min-replicas", type=int, default=None,
                    help="the autoscaler's lower bound (default: --replicas); it runs when min < max")
    up.add_argument("--max-replicas", type=int, default=None, help="the autoscaler's upper bound (default: --replicas)")
    up.add_argument("--policy", choices=("lull", "mori", "lru-offload"), default=None,
                    help="the controller's tier policy (default: policy.name of the config)")
    up.add_argument("--port", type=int, default=None, help="REST port (default: gateway.http_port)")
    up.add_argument("--gpu-tier-tokens", type=int, default=None,
                    help="the controller's GPU-tier budget per replica in tokens (default: the engine's whole KV cache); "
                         "a small budget shows tiering on a small machine")
    up.add_argument("--redis-url", default=None, help="use this Redis for the shared tier instead of starting one")
    up.add_argument("--engine-cpus", type=float, default=None,
                    help="Ray CPUs per engine replica (default: fits the replicas into this machine's cores)")
    up.set_defaults(func=cmd_up)
    status = subparsers.add_parser("status", help="sessions by tier with their idleness, and tier occupancy")
    status.set_defaults(func=cmd_status)
    down = subparsers.add_parser("down", help="stop the local platform started by `lull up`")
    down.set_defaults(func=cmd_down)


def _ray(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise RuntimeError(f"`ray {' '.join(args)}` failed:\n{done.stderr[-2000:]}")
    return done.stdout


def cmd_up(args) -> int:
    from proto.config import load_config
    from workers.redis_server import free_port

    if args.nodes < 1 or args.replicas < 1:
        raise ValueError("--nodes and --replicas must be >= 1")
    low = args.replicas if args.min_replicas is None else args.min_replicas
    high = args.replicas if args.max_replicas is None else args.max_replicas
    if not 1 <= low <= args.replicas <= high:
        raise ValueError(f"need 1 <= --min-replicas <= --replicas <= --max-replicas; got {low}, {args.replicas}, {high}")
    if state_path().exists():
        raise ValueError(f"a platform is already up ({state_path()}); run `lull down` first")
    config = load_config()
    port = args.port or config.gateway.http_port
    cpus = os.cpu_count() or 1
    state: dict = {"temp_dir": tempfile.mkdtemp(prefix="lull-ray-"), "port": port}
    state_path().parent.mkdir(parents=True, exist_ok=True)
    state_path().write_text(json.dumps(state))  # so `lull down` can clean up a half-started platform
    env = {**os.environ, "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled")}
    # Every Lull process (Ray workers inherit this) writes its metrics here; the node agent serves them merged.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(state["temp_dir"]) / "metrics")
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
    if args.redis_url is None:
        redis_port = free_port()
        log = open(Path(state["temp_dir"]) / "redis.log", "ab")  # not our stdout: a pipe reader would wait on it
        redis = subprocess.Popen([sys.executable, "-m", "workers.redis_server", "--port", str(redis_port),
                                  "--maxmemory", "512mb"], stdout=log, stderr=log, start_new_session=True)
        state["redis_pid"], state["redis_url"] = redis.pid, f"redis://127.0.0.1:{redis_port}/0"
    else:
        state["redis_url"] = args.redis_url
    gcs_port = free_port()
    _ray("start", "--head", f"--port={gcs_port}", f"--temp-dir={state['temp_dir']}", f"--num-cpus={cpus}",
         "--include-dashboard=false", "--disable-usage-stats", env=env)
    state["address"] = f"127.0.0.1:{gcs_port}"
    for _ in range(args.nodes - 1):
        _ray("start", f"--address={state['address']}", f"--num-cpus={cpus}", "--disable-usage-stats", env=env)
    state_path().write_text(json.dumps(state))

    import ray
    from ray import serve

    from controller.assembly import build_app

    ray.init(address=state["address"], namespace=RAY_NAMESPACE, log_to_driver=False)
    most = max(args.replicas, args.max_replicas or 0)
    engine_cpus = args.engine_cpus or max(0.25, (cpus * args.nodes - 0.5) / most)
    # One HTTP proxy, on the head: every Ray node here shares this host, and a proxy per node
    # would share the port, so a node's death would drop the connections its proxy held.
    serve.start(detached=True, http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    app_args = {"replicas": args.replicas, "engine_num_cpus": engine_cpus, "redis_url": state["redis_url"],
                "cpu_kv_cache_gib": 1}
    if args.policy:
        app_args["policy"] = args.policy
    if args.gpu_tier_tokens:
        app_args["gpu_tier_tokens"] = args.gpu_tier_tokens
    if args.min_replicas is not None:
        app_args["min_replicas"] = args.min_replicas
    if args.max_replicas is not None:
        app_args["max_replicas"] = args.max_replicas
    print(f"starting {args.replicas} engine replica(s) on {args.nodes} Ray node(s); this takes a minute ...")
    serve.run(build_app(app_args), name=SERVE_APP, route_prefix="/")
    print(f"Lull is up: OpenAI-compatible API at http://127.0.0.1:{port}/v1 (Ray at {state['address']})")
    print(f"  curl http://127.0.0.1:{port}/v1/chat/completions -H 'content-type: application/json' "
          f"-H 'x-session-id: demo' -d '{{\"model\": \"{config.model.served_name}\", "
          f"\"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}], \"max_tokens\": 16}}'")
    print(f"  metrics (lull:* and vllm:*, for Prometheus): http://127.0.0.1:{config.telemetry.metrics_port}/metrics")
    print("  lull status    # sessions by tier;   lull down    # stop everything")
    return 0


def cmd_status(args) -> int:
    import ray
    from rich.console import Console
    from rich.table import Table

    state = read_state()
    try:
        ray.init(address=state["address"], namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="ERROR")
        controller = ray.get_actor(CONTROLLER_ACTOR, namespace=RAY_NAMESPACE)
        snap = ray.get(controller.snapshot.remote(), timeout=10)
    except Exception as error:
        raise ValueError(f"the platform in {state_path()} does not answer ({type(error).__name__}); "
                         "it may be half started or already stopped: run `lull down`") from None
    console = Console()
    tiers = Table(title=f"Tiers (policy {snap['policy']}, {snap['gated']} request(s) gated)")
    for column in ("tier", "replica", "node", "sessions", "used tokens", "capacity tokens", "occupancy"):
        tiers.add_column(column, justify="right" if "tokens" in column or column == "sessions" else "left")
    for t in sorted(snap["tiers"], key=lambda t: (t["tier"], t["replica"] or "")):
        cap = t["capacity_tokens"]
        occupancy = f"{t['used_tokens'] / cap:.1%}" if cap else "-"
        tiers.add_row(t["tier"], t["replica"] or "-", (t["node"] or "-")[:8], str(t["sessions"]),
                      str(t["used_tokens"]), str(cap if cap is not None else "-"), occupancy)
    sessions = Table(title=f"Sessions ({len(snap['sessions'])}), busiest first")
    for column in ("session", "tier", "replica", "phase", "idleness", "kv tokens"):
        sessions.add_column(column, justify="right" if column in ("idleness", "kv tokens") else "left")
    for s in sorted(snap["sessions"], key=lambda s: (s["idleness"], s["session_id"])):
        sessions.add_row(s["session_id"], s["tier"], s["replica"] or "-", s["phase"], f"{s['idleness']:.3f}",
                         str(s["kv_tokens"]))
    console.print(tiers)
    console.print(sessions)
    console.print(f"API: http://127.0.0.1:{state['port']}/v1")
    return 0


def _stop_cluster(temp_dir: str, grace_s: float = 10.0) -> None:
    """Stop this platform's Ray processes only: those whose command line or environment names
    its temp dir. The command line names it for GCS and raylets; Ray's agents and workers
    rename themselves (`ray::DashboardAgent`, `ray::NodeAgentActor`) and some outlive their
    raylet, but all inherit `up`'s environment, whose PROMETHEUS_MULTIPROC_DIR is in the
    temp dir. `ray stop` would stop every Ray cluster on the host, other users' and other
    tests' included."""
    def ours() -> list[int]:
        pids = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if any(temp_dir.encode() in (entry / part).read_bytes() for part in ("cmdline", "environ")):
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile, or another user's
                continue
        return pids

    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 2.0)):
        for pid in ours():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while ours() and time.monotonic() < deadline:
            time.sleep(0.2)


def cmd_down(args) -> int:
    state = read_state()
    if state.get("address"):
        try:
            import ray
            from ray import serve

            ray.init(address=state["address"], namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="ERROR")
            serve.shutdown()
            ray.shutdown()
        except Exception as error:  # Ray may be half up; stopping it below is what matters
            print(f"serve shutdown skipped: {type(error).__name__}", file=sys.stderr)
        _stop_cluster(state["temp_dir"])
    if pid := state.get("redis_pid"):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    time.sleep(0.2)
    state_path().unlink()
    print("Lull is down")
    return 0
