"""`lull up`'s Ray runs with token authentication: a real `ray start --head` with the
environment `up` gives it; a client that reads the platform's state (as `lull status`,
`lull down` and the benchmarks do) connects, one without the token is refused. Each client
is its own process, so that no Ray state or environment leaks between them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from controller.assembly import local_platform as lp

CLIENT = """
import sys, ray
from controller.assembly.local_platform import read_state
state = read_state() if sys.argv[1] == "with-state" else json.loads(open(sys.argv[2]).read())
ray.init(address=state["address"], log_to_driver=False, logging_level="ERROR")
print("connected", ray.cluster_resources().get("CPU"))
""".replace("import sys, ray", "import json, sys, ray")


@pytest.fixture
def platform_state(tmp_path, monkeypatch):
    monkeypatch.setenv("LULL_STATE_DIR", str(tmp_path))
    saved = dict(os.environ)
    state = {"temp_dir": tempfile.mkdtemp(prefix="lull-ray-")}
    try:
        env = lp._secured_env(state)  # what `up` starts Ray with
        lp.state_path().write_text(json.dumps(state))
        lp._start_ray(state, 1, 1, env)
        yield state
    finally:
        lp._stop_cluster(state["temp_dir"])
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
        os.environ.clear()
        os.environ.update(saved)


def client(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLIENT, *args], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": os.getcwd()})


def test_ray_refuses_a_client_without_the_platforms_token(platform_state, tmp_path):
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    ours = client("with-state", env=base)
    assert ours.returncode == 0 and "connected" in ours.stdout, ours.stderr[-2000:]

    stranger_home = tmp_path / "home"  # no ~/.ray/auth_token there either
    stranger_home.mkdir()
    stranger = client("without", str(lp.state_path()), env={**base, "HOME": str(stranger_home),
                                                            "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "x" * 64})
    assert stranger.returncode != 0
    assert "Unauthenticated" in stranger.stderr or "InvalidAuthToken" in stranger.stderr, stranger.stderr[-2000:]
