"""The embedded platform on one machine, behind `lull up`, `lull status`, `lull down`
(their flags: controller/cli/platform.py).

`up` starts a local Ray cluster (`ray start --head`, plus `nodes - 1` more Ray nodes
joined with `ray start --address`), a local Redis unless `tiers.redis_url` is given,
then the Serve app (`controller.assembly:build_app`: node agents, controller actor,
gateway, engine replicas). What `down` must stop is kept in a small JSON state file
under LULL_STATE_DIR (default ~/.cache/lull).

Nothing listens beyond this host unless told (`lull up --host 0.0.0.0`): the REST API and
the gateway's gRPC on ``gateway.host`` (127.0.0.1 by default), the node agents on the same
loopback address. Ray runs with token authentication (its token in a 0600 file in the
platform's temp dir, which `status` and `down` read again), and the node agents with a
generated LULL_INTERNAL_TOKEN unless the environment gives one.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from proto.config import ConfigError, LullConfig
from proto.names import CONTROLLER_ACTOR, RAY_NAMESPACE, SERVE_APP

STATE_ENV = "LULL_STATE_DIR"
LOOPBACK = ("127.0.0.1", "::1", "localhost")


def state_path() -> Path:
    return Path(os.environ.get(STATE_ENV, Path.home() / ".cache" / "lull")) / "platform.json"


def read_state() -> dict:
    path = state_path()
    if not path.exists():
        raise ValueError(f"no Lull platform is up (no {path}); start one with `lull up`")
    state = json.loads(path.read_text())
    _use_ray_token(state)  # whoever reads the state connects to its Ray next (status, down, benchmarks)
    return state


def _ray(*args: str, env: dict | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", *args], capture_output=True, text=True,
                          env=env)
    if done.returncode:
        raise RuntimeError(f"`ray {' '.join(args)}` failed:\n{done.stderr[-2000:]}")
    return done.stdout


def local_engine_cpus(cpus_per_node: int, nodes: int, replicas: int) -> float:
    """Ray CPUs per engine replica so that ``replicas`` fit on ``nodes`` Ray nodes of
    ``cpus_per_node`` each: a node holds its share of them, rounded up, and keeps half a
    CPU for the gateway and the agents. Every Ray node of this host counts this host's
    cores, so the share is per node: a replica never asks for more than one node has."""
    per_node = math.ceil(replicas / nodes)
    return min(64.0, max(0.25, (cpus_per_node - 0.5) / per_node))


def up(nodes: int, overrides: dict[str, dict[str, Any]]) -> int:
    """Start the platform: ``nodes`` Ray nodes on this host, Redis unless ``tiers.redis_url`` is
    among ``overrides``, then the Serve app with ``overrides`` laid over the config."""
    from controller.assembly.app import launch_config

    overrides = {section: dict(values) for section, values in overrides.items()}
    config = launch_config(overrides)  # a bad setting fails before anything starts
    if nodes > 1 and config.tiers.node_agent_port:
        raise ConfigError(f"tiers.node_agent_port is {config.tiers.node_agent_port}, one port, but {nodes} Ray "
                          "nodes on this host each start a node agent: set it to 0 (a free port each)")
    if state_path().exists():
        raise ValueError(f"a platform is already up ({state_path()}); run `lull down` first")
    if config.model.path:  # had (downloaded once) before anything starts
        from controller.assembly.local_model import local_model

        overrides.setdefault("model", {})["path"] = local_model(str(config.model.path))
    cpus = os.cpu_count() or 1
    most = max(config.replicas.initial, config.replicas.max)
    overrides.setdefault("cluster", {}).setdefault("engine_cpus", local_engine_cpus(cpus, nodes, most))
    state: dict = {"temp_dir": tempfile.mkdtemp(prefix="lull-ray-"), "port": config.gateway.http_port,
                   "dram_dir": config.tiers.dram_dir}  # `lull chaos` fills its filesystem
    env = _secured_env(state)
    state_path().parent.mkdir(parents=True, exist_ok=True)
    state_path().write_text(json.dumps(state))  # so `lull down` can clean up a half-started platform
    if config.gateway.host in LOOPBACK:  # the agents stay on the loopback address the API listens on
        overrides.setdefault("tiers", {}).setdefault("node_agent_host", config.gateway.host)
    # Every Lull process (Ray workers inherit this) writes its metrics here; the node agent serves them merged.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(state["temp_dir"]) / "metrics")
    Path(env["PROMETHEUS_MULTIPROC_DIR"]).mkdir()
    if "redis_url" not in overrides.get("tiers", {}):
        env.setdefault("LULL_REDIS_PASSWORD", secrets.token_hex(24))  # its own Redis: a password too
        overrides.setdefault("tiers", {})["redis_url"] = _start_redis(state, env)
    state["redis_url"] = overrides["tiers"]["redis_url"]
    _start_ray(state, nodes, cpus, env)
    config = launch_config(overrides)
    _serve(config, overrides, state, nodes)
    return 0


def _secured_env(state: dict) -> dict[str, str]:
    """The environment of every Ray process of the platform: Ray's token authentication on
    (a fresh token, in a file only this user reads) and the node agents' internal token.
    This process takes Ray's settings too: it connects to the cluster next."""
    token_path = Path(state["temp_dir"]) / "ray-auth-token"
    token_path.touch(mode=0o600)
    token_path.write_text(secrets.token_hex(32))
    state["ray_token_path"] = str(token_path)
    _use_ray_token(state)
    env = dict(os.environ)
    env.setdefault("LULL_INTERNAL_TOKEN", secrets.token_hex(32))
    return env


def _use_ray_token(state: dict) -> None:
    """Connect this process to the platform's Ray with the token `up` made (RAY_AUTH_TOKEN
    would win over the file: it is dropped)."""
    if path := state.get("ray_token_path"):
        os.environ.pop("RAY_AUTH_TOKEN", None)
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=path)
        if "ray" in sys.modules:  # Ray read its settings when imported: have it read them again,
            from ray._raylet import AuthenticationTokenLoader, Config  # as its own token setup does

            Config.initialize("")
            AuthenticationTokenLoader.instance().reset_cache()


def _start_redis(state: dict, env: dict[str, str]) -> str:
    from workers.redis_server import free_port

    redis_port = free_port()
    # The password, for a Redis restarted later (`lull chaos`), in a file only this user reads.
    password_path = Path(state["temp_dir"]) / "redis-password"
    password_path.touch(mode=0o600)
    password_path.write_text(env["LULL_REDIS_PASSWORD"])
    state["redis_password_path"] = str(password_path)
    start_redis(state, redis_port, env)
    return f"redis://127.0.0.1:{redis_port}/0"


def start_redis(state: dict, port: int, env: dict[str, str] | None = None) -> None:
    """Start the platform's own Redis on ``port`` (again, after a fault), with the password
    `up` gave it; its pid goes into ``state``."""
    env = dict(os.environ if env is None else env)
    if path := state.get("redis_password_path"):
        env["LULL_REDIS_PASSWORD"] = Path(path).read_text()
    log = open(Path(state["temp_dir"]) / "redis.log", "ab")  # not our stdout: a pipe reader would wait on it
    redis = subprocess.Popen([sys.executable, "-m", "workers.redis_server", "--port", str(port),
                              "--maxmemory", "512mb"], stdout=log, stderr=log, start_new_session=True, env=env)
    state["redis_pid"] = redis.pid


def _start_ray(state: dict, nodes: int, cpus: int, env: dict) -> None:
    from workers.redis_server import free_port

    gcs_port = free_port()
    _ray("start", "--head", f"--port={gcs_port}", f"--temp-dir={state['temp_dir']}", f"--num-cpus={cpus}",
         "--include-dashboard=false", "--disable-usage-stats", env=env)
    state["address"] = f"127.0.0.1:{gcs_port}"
    for _ in range(nodes - 1):
        _ray("start", f"--address={state['address']}", f"--num-cpus={cpus}", "--disable-usage-stats", env=env)
    state_path().write_text(json.dumps(state))


def _serve(config: LullConfig, overrides: dict, state: dict, nodes: int) -> None:
    import ray
    from ray import serve

    from controller.assembly import build_app

    ray.init(address=state["address"], namespace=RAY_NAMESPACE, log_to_driver=False)
    port, host = config.gateway.http_port, config.gateway.host
    # One HTTP proxy, on the head: every Ray node here shares this host, and a proxy per node
    # would share the port, so a node's death would drop the connections its proxy held.
    serve.start(detached=True, http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    print(f"starting {config.replicas.initial} engine replica(s) on {nodes} Ray node(s); this takes a minute ...")
    serve.run(build_app(overrides), name=SERVE_APP, route_prefix="/")
    print(f"Lull is up: OpenAI API at http://127.0.0.1:{port}/v1, Anthropic API at http://127.0.0.1:{port} "
          f"(model {config.model.served_name!r}; Ray at {state['address']})")
    print(f"  curl http://127.0.0.1:{port}/v1/chat/completions -H 'content-type: application/json' "
          f"-H 'x-session-id: demo' -d '{{\"model\": \"{config.model.served_name}\", "
          f"\"messages\": [{{\"role\": \"user\", \"content\": \"hello\"}}], \"max_tokens\": 16}}'")
    print(f"  ANTHROPIC_BASE_URL=http://127.0.0.1:{port} ANTHROPIC_API_KEY=any claude --model "
          f"{config.model.served_name}   # Claude Code (README: 'Point your agents at it')")
    print(f"  metrics (lull:* and vllm:*, for Prometheus): http://127.0.0.1:{config.telemetry.metrics_port}/metrics")
    print("  lull status    # sessions by tier;   lull down    # stop everything")


def status() -> int:
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


def down() -> int:
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
