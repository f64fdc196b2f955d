"""Tenants' GPU-tier shares in the planner (``auth.quotas`` gpu_share): a tenant at its share
takes no GPU-tier room from another tenant; its own requests wait or displace its own
sessions. The real planner and state, driven event by event, integrity checked each step."""

import pytest

from controller.policy import Location, MoveReason, PlannerConfig, Tier, TierPlanner
from controller.policy.shares import GpuShares
from proto.config import ConfigError, load_config
from tests.support import PolicyDriver

# acme's four sessions are the least idle; beta's the most: without shares, a request of
# acme's would displace beta's first (most idle first).
IOTAS = {"acme/s1": 0.1, "acme/s2": 0.2, "beta/s1": 0.8, "beta/s2": 0.9}


def gpu(driver: PolicyDriver) -> set[str]:
    return set(driver.state.residents[Location(Tier.GPU, "r0")])


def full_gpu(shares=(("acme", 0.5),), **config) -> PolicyDriver:
    """One replica whose 400 GPU tokens hold acme's two sessions (its share: 200) and beta's two."""
    driver = PolicyDriver.make({"r0": (400, 1000)}, config=PlannerConfig(gpu_shares=shares, **config))
    driver.sessions_with_idleness(IOTAS, tokens=100)
    assert gpu(driver) == set(IOTAS)
    return driver


def arrive(driver: PolicyDriver, session_id: str, prompt: int = 50, out: int = 50) -> None:
    driver.state.open_session(session_id, driver.clock.now)
    driver.state.request_arrived(session_id, driver.clock.now, prompt, out)


def test_without_shares_a_request_displaces_the_most_idle_tenant():
    driver = full_gpu(shares=())
    arrive(driver, "acme/s3")
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["acme/s3"]
    assert [m.session_id for m in plan.moves if m.reason is MoveReason.DISPLACED] == ["beta/s2"]


def test_a_tenant_at_its_share_displaces_only_its_own_sessions_and_never_another_tenants():
    driver = full_gpu()
    arrive(driver, "acme/s3")
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["acme/s3"]
    displaced = [m.session_id for m in plan.moves if m.reason is MoveReason.DISPLACED]
    assert displaced == ["acme/s2"], "acme's own most idle session makes room, not beta's idler ones"
    assert {"beta/s1", "beta/s2"} <= gpu(driver)


def test_a_tenant_at_its_share_with_nothing_of_its_own_to_move_waits_while_another_is_served():
    driver = full_gpu()
    arrive(driver, "acme/s3")
    driver.step()  # acme/s3 runs (pinned), acme/s2 went to DRAM
    driver.state.request_arrived("acme/s1", driver.clock.now, 100, 50)  # grows past acme's 200
    arrive(driver, "beta/s3")
    plan = driver.step()
    gates = {g.session_id: g.reason for g in plan.gates}
    assert gates == {"acme/s1": "the tenant is at its GPU-tier share"}
    assert [a.session_id for a in plan.admits] == ["beta/s3"], "beta is not gated by acme's share"
    displaced = [m.session_id for m in plan.moves if m.reason is MoveReason.DISPLACED]
    assert displaced == ["beta/s2"], "beta, under no share, displaced the idlest session, its own here"
    assert "acme/s3" in gpu(driver) and "acme/s1" in gpu(driver)
    # acme's call ends: its share frees, and its waiting request gets in from its own room.
    driver.state.call_finished("acme/s3", driver.clock.now, 100)
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["acme/s1"]
    assert all(m.session_id.startswith("acme/") for m in plan.moves), plan.moves


def test_an_aged_request_at_its_share_holds_no_tier_and_displaces_no_other_tenant():
    driver = full_gpu(starvation_age_s=1.0)
    arrive(driver, "acme/s3")
    driver.step()
    driver.state.request_arrived("acme/s1", driver.clock.now, 100, 50)
    driver.step()
    driver.clock.advance(5.0)  # acme/s1 is aged now
    arrive(driver, "beta/s3")
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["beta/s3"]
    assert "acme/s1" in {g.session_id for g in plan.gates}


def test_the_default_share_applies_to_each_unnamed_tenant_and_a_named_one_may_be_unlimited():
    config = load_config(env={}, overrides={"auth": {"quotas": {
        "*": {"gpu_share": 0.25}, "acme": {"gpu_share": None, "max_sessions": 5}}}})
    shares = PlannerConfig.from_config(config).gpu_shares
    assert dict(shares) == {"*": 0.25, "acme": 1.0}
    driver = full_gpu(shares=())
    driver.planner = TierPlanner(PlannerConfig(gpu_shares=shares))  # the shares, set once the GPU is full
    arrive(driver, "beta/s3")  # beta holds 200, over its 100: it must give back 200 of its own
    plan = driver.step()
    assert [a.session_id for a in plan.admits] == ["beta/s3"]
    assert {m.session_id for m in plan.moves if m.reason is MoveReason.DISPLACED} == {"beta/s1", "beta/s2"}
    assert {"acme/s1", "acme/s2"} <= gpu(driver)


@pytest.mark.parametrize("quotas, message", [
    ({"acme": {"gpu_share": 0}}, "auth.quotas.acme.gpu_share must be a fraction in (0, 1]"),
    ({"acme": {"gpu_share": 1.5}}, "auth.quotas.acme.gpu_share must be a fraction in (0, 1]"),
    ({"acme/x": {}}, "is no tenant name"),
    ({"acme": {"gpu": 0.5}}, "unknown quota auth.quotas.acme.gpu"),
])
def test_bad_shares_are_refused_by_the_config(quotas, message):
    with pytest.raises(ConfigError) as refused:
        load_config(env={}, overrides={"auth": {"quotas": quotas}})
    assert message in str(refused.value)
    with pytest.raises(ValueError, match="must be in"):
        GpuShares((("acme", 0.0),))
