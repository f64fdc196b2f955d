"""The engine deployment's Serve autoscaling policy: signals in, replica count out.

Serve's ``AutoscalingContext`` is stood in for by a namespace with the fields the
policy reads; the published signals are patched in (no GCS runs here). The config
that ``build_app`` hands Serve is validated by Serve's own ``AutoscalingConfig``,
which imports and pickles the policy class as Serve's controller will.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from ray.serve.config import AutoscalingConfig

from controller.autoscale import serve_policy, signals
from controller.autoscale.policy import AutoscaleSettings
from controller.autoscale.serve_policy import LullEnginePolicy, engine_autoscaling_config, snapshot_from

SETTINGS = dict(min_replicas=1, max_replicas=3, scale_up_window_s=10.0, scale_down_window_s=20.0, cooldown_s=5.0)


def published(now: float, replicas: dict[str, int], gate_waits=(), draining=0) -> dict:
    return dict(published_at=now, policy="lull", draining=draining, gate_waits_s=list(gate_waits),
                waiting_sessions=0, replicas=[dict(name=n, gpu_used_tokens=u, gpu_capacity_tokens=1000)
                                              for n, u in replicas.items()])


def context(target: int, running: list[str], state: dict | None = None):
    return SimpleNamespace(target_num_replicas=target, policy_state=state or {},
                           running_replicas=[SimpleNamespace(unique_id=r) for r in running])


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now


@pytest.fixture
def world(monkeypatch):
    """The wall clock and the published signals the policy reads."""
    clock, board = Clock(), {}
    monkeypatch.setattr(serve_policy.time, "time", lambda: clock.now)
    monkeypatch.setattr(signals, "read", lambda key=signals.KEY: board.get(key))
    monkeypatch.setattr(signals, "publish", lambda value, key=signals.KEY: board.__setitem__(key, value))
    return clock, board


def test_running_replicas_the_controller_does_not_know_yet_count_as_starting():
    snap = snapshot_from(["a", "b"], 3, published(0.0, {"a": 10}), now=1.0)
    assert [r.name for r in snap.running] == ["a"]
    assert snap.starting == 2 and snap.replicas == 3  # b unregistered, one more not started by Serve


def test_gate_waits_held_for_the_window_add_one_replica_then_the_count_holds(world):
    clock, board = world
    policy, state, target, waited = LullEnginePolicy(**SETTINGS), {}, 1, 0
    while target == 1 and waited < 20:  # gated requests waiting 5 s (> 2 s x 1.5), every second
        board[signals.KEY] = published(clock.now, {"a": 900}, gate_waits=[5.0, 6.0])
        target, state = policy(context(target, ["a"], state))
        clock.now += 1.0
        waited += 1
    assert target == 2 and waited == 11  # the 10 s window held, then one replica more
    assert board[signals.DECISION_KEY]["reason"] == "gate-wait"
    board[signals.KEY] = published(clock.now, {"a": 900}, gate_waits=[5.0])
    assert policy(context(2, ["a"], state))[0] == 2  # the new replica is starting: hold, not a third


def test_an_underused_gpu_tier_removes_one_replica_after_the_down_window(world):
    clock, board = world
    policy, state, target = LullEnginePolicy(**SETTINGS), {}, 2
    decisions = []
    for _ in range(25):
        board[signals.KEY] = published(clock.now, {"a": 100, "b": 50})
        target, state = policy(context(target, ["a", "b"][:target], state))
        decisions.append(target)
        clock.now += 1.0
    assert decisions[0] == 2 and decisions[-1] == 1 and decisions.index(1) >= 20  # the window held first


def test_stale_or_missing_signals_hold_the_count(world):
    clock, board = world
    policy = LullEnginePolicy(**SETTINGS)
    assert policy(context(2, ["a", "b"]))[0] == 2  # nothing published yet
    board[signals.KEY] = published(clock.now - signals.STALE_S - 1, {"a": 0, "b": 0}, gate_waits=[60.0])
    assert policy(context(2, ["a", "b"]))[0] == 2


def test_a_draining_replica_makes_the_policy_wait_for_it(world):
    clock, board = world
    policy, state = LullEnginePolicy(**{**SETTINGS, "scale_up_window_s": 1.0, "scale_down_window_s": 1.0}), {}
    for _ in range(5):
        board[signals.KEY] = published(clock.now, {"a": 900}, gate_waits=[30.0], draining=1)
        target, state = policy(context(1, ["a"], state))
        assert target == 1
        clock.now += 1.0


def test_the_config_build_app_hands_serve_is_valid_and_names_an_importable_policy():
    config = engine_autoscaling_config(1, 4, 2, AutoscaleSettings(**SETTINGS))
    parsed = AutoscalingConfig(**config)
    assert (parsed.min_replicas, parsed.max_replicas, parsed.initial_replicas) == (1, 4, 2)
    assert parsed.upscale_delay_s == 0 and parsed.downscale_delay_s == 0
    made = parsed.policy.get_policy()(**parsed.policy.policy_kwargs)
    assert made.settings.max_replicas == 4 and made.settings.min_replicas == 1


def test_on_kubernetes_the_gpu_nodes_cap_the_count_read_from_recorded_api_responses(world):
    """No API server runs here: the real ``kubernetes`` client answers from the recorded
    NodeList of tests/fixtures/k8s (``RecordedApiServer``, see test_autoscale_kube)."""
    from kubernetes import client

    from tests.unit.test_autoscale_kube import SELECTOR, RecordedApiServer, api, fixture

    clock, board = world
    server = RecordedApiServer({"/api/v1/nodes": fixture("nodelist-gpu-h100.json")})
    kube = dict(node_selector=SELECTOR, gpus_per_replica=8, gpus_per_pod=8, refresh_s=30.0)
    policy = LullEnginePolicy(**{**SETTINGS, "max_replicas": 10, "scale_up_window_s": 1.0}, kube=kube)
    policy.gpu_cap._core = client.CoreV1Api(api(server))
    target, state = 1, {}
    for _ in range(30):  # sessions wait all along: up, one replica at a time, to the nodes' cap
        board[signals.KEY] = published(clock.now, {f"r{i}": 900 for i in range(target)}, gate_waits=[9.0])
        target, state = policy(context(target, [f"r{i}" for i in range(target)], state))
        clock.now += 3.0
    assert target == 2  # two whole 8-GPU nodes are Ready and schedulable; the 7-GPU one holds no pod
    assert len(server.requests) == 3  # read once per refresh_s, not once per call


def test_without_an_api_server_the_cap_is_unknown_and_the_bounds_rule(world, caplog):
    clock, board = world
    policy = LullEnginePolicy(**{**SETTINGS, "scale_up_window_s": 1.0}, kube=dict(node_selector="x=y"))
    target, state = 1, {}
    for _ in range(12):
        board[signals.KEY] = published(clock.now, {f"r{i}": 900 for i in range(target)}, gate_waits=[9.0])
        target, state = policy(context(target, [f"r{i}" for i in range(target)], state))
        clock.now += 3.0
    assert target == 3  # max_replicas
    assert sum("cannot read GPU node capacity" in r.message for r in caplog.records) == 1
