"""`lull up`/`down` and the assembly's settings: down stops its own platform's processes and
nothing else; up's flags are config settings; every replica fits a Ray node; the engine's
dtype and the KV bytes per token agree."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from controller.assembly.app import actor_options, launch_config
from controller.assembly.local_platform import _stop_cluster, local_engine_cpus, up
from controller.assembly.settings import check_fits, engine_settings, kv_bytes_per_token, replica_asks
from controller.cli.main import build_parser
from controller.cli.platform import FLAGS, flag_help, overrides_of
from controller.runtime import LIVE_POLICIES
from proto.config import ConfigError, LullConfig, definition, from_dict
from workers.engine import EngineSettings
from workers.tiny_model import ensure_tiny_model

MKDTEMP = tempfile.mkdtemp  # the real one, for tests that give `up` its temp dir
SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_down_stops_processes_that_name_the_temp_dir_in_their_command_line_or_environment():
    temp_dir = tempfile.mkdtemp(prefix="lull-ray-")
    # A raylet names the temp dir on its command line; Ray's agents and workers rename
    # themselves but keep `up`'s environment (PROMETHEUS_MULTIPROC_DIR under the temp dir).
    by_cmdline = subprocess.Popen([*SLEEPER, f"--temp-dir={temp_dir}"])
    by_environ = subprocess.Popen(SLEEPER, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": f"{temp_dir}/metrics"})
    other = subprocess.Popen(SLEEPER, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": "/tmp/lull-ray-other/metrics"})
    try:
        _stop_cluster(temp_dir, grace_s=5.0)
        assert by_cmdline.wait(timeout=5) is not None and by_environ.wait(timeout=5) is not None
        assert other.poll() is None  # another platform's process (or anyone's) is left alone
    finally:
        for process in (by_cmdline, by_environ, other):
            process.kill()
            process.wait()


# --- `lull up`'s flags are the config's settings -------------------------------------------

RECORDED_NODES = json.loads((Path(__file__).parents[1] / "fixtures" / "ray_nodes_two_cpu_nodes.json").read_text())


def parse_up(*argv: str):
    return build_parser().parse_args(["up", *argv])


def test_up_flags_become_config_overrides():
    args = parse_up("--nodes", "2", "--replicas", "2", "--min-replicas", "1", "--max-replicas", "3",
                    "--policy", "mori", "--port", "8100", "--gpu-tier-tokens", "3000",
                    "--redis-url", "redis://127.0.0.1:7000/0", "--engine-cpus", "0.5",
                    "--set", "engine.dtype=float32", "--set", "replicas.initial=1")
    assert args.nodes == 2
    assert overrides_of(args) == {
        "engine": {"dtype": "float32"},
        "replicas": {"initial": 2, "min": 1, "max": 3},  # the named flag wins over --set
        "policy": {"name": "mori"}, "gateway": {"http_port": 8100}, "tiers": {"gpu_tier_tokens": 3000,
        "redis_url": "redis://127.0.0.1:7000/0"}, "cluster": {"engine_cpus": 0.5},
    }
    assert overrides_of(parse_up()) == {}  # nothing given: the config decides


def test_every_flag_is_a_setting_with_its_doc():
    for flag, name in FLAGS.items():
        setting = definition(name)
        assert flag_help(name).startswith(setting.doc), flag


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "0"], r"--replicas: replicas.initial must be an integer in \[1, 1024\]; got 0"),
    (["--engine-cpus", "lots"], r"--engine-cpus: cluster.engine_cpus must be a number"),
    (["--redis-url", "http://x"], r"--redis-url: tiers.redis_url must be a URL with scheme redis://"),
    (["--set", "engine.dtype"], r"--set: expected section.setting=value"),
    (["--set", "engine.dtyp=auto"], r"--set: unknown setting 'engine.dtyp'"),
])
def test_bad_flags_name_the_setting_and_what_it_accepts(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_up(*argv)
    assert re.search(message, capsys.readouterr().err)


def test_unknown_policy_fails_at_launch_with_the_registered_names():
    with pytest.raises(ConfigError, match=r"policy.name 'fifo' is no registered policy; valid: lru-offload, lull, mori"):
        launch_config({"policy": {"name": "fifo"}})
    for name in LIVE_POLICIES.names():
        assert launch_config({"policy": {"name": name}}).policy.name == name


def test_up_refuses_one_node_agent_port_for_several_nodes_before_starting_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("LULL_STATE_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"tiers.node_agent_port is 50061, one port, but 2 Ray nodes"):
        up(2, {"tiers": {"node_agent_port": 50061}})
    assert not list(tmp_path.iterdir())


# --- every replica fits a Ray node --------------------------------------------------------

def test_engine_cpus_are_a_share_of_one_node():
    # `lull up --nodes 2` on a 2-core host: two nodes of 2 CPUs each (RECORDED_NODES). The old
    # share, (2 x 2 - 0.5) / 1 = 3.5 CPUs for the one replica, fit no node: it waited forever.
    assert local_engine_cpus(2, nodes=2, replicas=1) == 1.5
    assert local_engine_cpus(2, nodes=1, replicas=2) == 0.75  # as before on one node
    assert local_engine_cpus(4, nodes=2, replicas=3) == 1.75  # two on a node: 3.5 of its 4
    assert local_engine_cpus(256, nodes=1, replicas=1) == 64.0  # cluster.engine_cpus' bound
    config = from_dict({"cluster": {"engine_cpus": local_engine_cpus(2, nodes=2, replicas=1)}})
    check_fits(replica_asks(config), RECORDED_NODES)


def test_a_replica_larger_than_every_alive_node_fails_naming_the_fix():
    with pytest.raises(ConfigError, match=r"an engine replica asks Ray for 3.5 CPU, more than any alive Ray node "
                                          r"has \(the largest: 2 CPU; 2 alive\): lower cluster.engine_cpus "
                                          r"\(lull up --engine-cpus\)"):
        check_fits(replica_asks(from_dict({"cluster": {"engine_cpus": 3.5}})), RECORDED_NODES)
    gpu = from_dict({"model": {"device": "gpu"}, "engine": {"block_size": 16}})
    with pytest.raises(ConfigError, match=r"asks Ray for 1 CPU, 1 GPU.*the largest: 2 CPU, 0 GPU.*tensor_parallel_size"):
        check_fits(replica_asks(gpu), RECORDED_NODES)
    with pytest.raises(ConfigError, match=r"the gateway asks Ray for 3 CPU.*lower cluster.gateway_cpus"):
        check_fits(replica_asks(from_dict({"cluster": {"gateway_cpus": 3.0}})), RECORDED_NODES)
    dead = [dict(node, Alive=False) for node in RECORDED_NODES]
    with pytest.raises(ConfigError, match=r"the largest: 0 CPU; 0 alive"):
        check_fits(replica_asks(LullConfig()), dead)


def test_actor_options_ask_what_the_config_says():
    gpu = from_dict({"model": {"device": "gpu"}, "cluster": {"engine_cpus": 4.0, "gateway_cpus": 1.0}})
    assert actor_options(gpu) == {"engine": {"num_cpus": 4.0, "num_gpus": 1.0}, "gateway": {"num_cpus": 1.0}}
    assert actor_options(LullConfig())["engine"] == {"num_cpus": 1.0, "num_gpus": 0.0}


# --- the engine's settings and the KV bytes per token follow engine.dtype ---------------

def test_engine_settings_come_from_the_config(tmp_path):
    config = from_dict({"model": {"path": str(tmp_path)}, "engine": {"dtype": "float16", "block_size": 64},
                        "tiers": {"dram_dir": "/dev/shm/x"}})
    engine = engine_settings(config)
    assert (engine["dtype"], engine["block_size"], engine["tensor_parallel_size"]) == ("float16", 64, 1)
    assert (engine["dram_dir"], engine["cpu_kv_cache_gib"], engine["model"]) == ("/dev/shm/x", 1.0, str(tmp_path))
    assert set(engine) <= {f.name for f in dataclasses.fields(EngineSettings)}


def test_kv_bytes_per_token_follow_the_dtype_the_engine_runs():
    model = str(ensure_tiny_model())  # float32 weights; 2 layers x 2 KV heads x 64 dims, K and V
    assert kv_bytes_per_token(model, "float32") == 2 * 2 * 2 * 64 * 4
    assert kv_bytes_per_token(model, "auto") == kv_bytes_per_token(model, "bfloat16") == 2 * 2 * 2 * 64 * 2



# --- nothing listens beyond this host unless told; Ray and the agents take tokens ----------

def started_with(tmp_path, monkeypatch, flags: list[str]) -> tuple[dict, dict]:
    """`lull up` as far as its decisions go: Redis, Ray and the Serve app are not started
    here (each takes minutes and a core); the env Ray would start with and the overrides
    the Serve app would get are recorded instead."""
    import controller.assembly.local_platform as lp

    monkeypatch.setenv("LULL_STATE_DIR", str(tmp_path))
    for var in ("LULL_INTERNAL_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "LULL_REDIS_PASSWORD"):
        monkeypatch.setenv(var, "")  # so that monkeypatch restores it after up() sets it
        monkeypatch.delenv(var)
    seen: dict = {}
    monkeypatch.setattr(lp.tempfile, "mkdtemp", lambda prefix: MKDTEMP(prefix=prefix, dir=tmp_path))
    monkeypatch.setattr(lp, "_start_redis", lambda state, env: seen.update(redis_env=env) or "redis://127.0.0.1:1/0")
    monkeypatch.setattr(lp, "_start_ray", lambda state, nodes, cpus, env: seen.update(env=env))
    monkeypatch.setattr(lp, "_serve", lambda config, overrides, state, nodes: seen.update(config=config))
    args = build_parser().parse_args(["up", *flags])
    assert args.func(args) == 0
    return seen["env"], seen


def test_up_binds_the_api_and_the_agents_to_loopback_unless_told(tmp_path, monkeypatch):
    env, seen = started_with(tmp_path, monkeypatch, [])
    assert (seen["config"].gateway.host, seen["config"].tiers.node_agent_host) == ("127.0.0.1", "127.0.0.1")
    (tmp_path / "open").mkdir()
    _, seen = started_with(tmp_path / "open", monkeypatch, ["--host", "0.0.0.0"])
    assert seen["config"].gateway.host == "0.0.0.0" and seen["config"].tiers.node_agent_host is None


def test_up_turns_ray_token_auth_on_and_gives_the_agents_and_redis_secrets(tmp_path, monkeypatch):
    env, seen = started_with(tmp_path, monkeypatch, [])
    assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" not in env
    token_file = Path(env["RAY_AUTH_TOKEN_PATH"])
    assert token_file.stat().st_mode & 0o777 == 0o600 and len(token_file.read_text()) == 64
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token_file)  # this process connects with it next
    assert len(env["LULL_INTERNAL_TOKEN"]) == 64 and seen["redis_env"]["LULL_REDIS_PASSWORD"]
    state = json.loads((tmp_path / "platform.json").read_text())
    assert state["ray_token_path"] == str(token_file) and env["LULL_INTERNAL_TOKEN"] not in json.dumps(state)
