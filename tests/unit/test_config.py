"""proto/config.py: defaults, validation messages, YAML + env loading, secrets
kept out of sight, and the Helm export derived from the same definitions."""

from __future__ import annotations

from dataclasses import fields

import jsonschema
import pytest
import yaml

from controller.policy import PlannerConfig
from proto.config import SECTIONS, ConfigError, LullConfig, Secrets, from_dict, load_config
from proto.config_export import chart_config, config_schema, documented_yaml

KEY = "sk-very-secret-key-0123456789"


def test_defaults_are_valid_and_match_the_runtime_names():
    config = LullConfig()
    assert config.telemetry.metrics_port == 9102 and config.tiers.node_agent_port == 50061
    assert (config.gateway.http_port, config.gateway.grpc_port) == (8000, 9000)
    assert config.policy.tick_seconds == 5.0 and config.policy.idleness_window == 5
    assert config.model.path is None  # the embedded tiny model, resolved by the engine
    assert set(config.to_dict()) == {s.NAME for s in SECTIONS}


def test_every_setting_has_a_doc_and_a_check():
    for section in SECTIONS:
        assert section.__doc__, section.NAME
        for f in fields(section):
            assert f.metadata.get("doc") and f.metadata.get("check"), f"{section.NAME}.{f.name}"


@pytest.mark.parametrize(("data", "message"), [
    ({"engine": {"block_size": 12}}, r"engine\.block_size must be one of 8, 16, 32, 64, 128; got 12"),
    ({"engine": {"max_model_len": 10}}, r"engine\.max_model_len must be an integer in \[64, 1048576\]; got 10"),
    ({"engine": {"max_num_seqs": True}}, r"engine\.max_num_seqs must be an integer"),
    ({"engine": {"gpu_memory_utilization": 0.0}}, r"engine\.gpu_memory_utilization must be a number in \(0, 1\]"),
    ({"engine": {"gpu_memory_utilization": float("nan")}}, r"engine\.gpu_memory_utilization"),
    ({"model": {"device": "tpu"}}, r"model\.device must be one of 'cpu', 'gpu'; got 'tpu'"),
    ({"model": {"served_name": " "}}, r"model\.served_name must be a non-empty string"),
    ({"policy": {"name": "fifo"}}, r"policy\.name must be one of 'lull', 'mori', 'lru-offload'"),
    ({"policy": {"tick_seconds": 0}}, r"policy\.tick_seconds must be a number in \(0, 3600\]"),
    ({"tiers": {"shared_backend": "memcached"}}, r"tiers\.shared_backend must be one of 'redis', 'lmcache'"),
    ({"tiers": {"redis_url": "http://x"}}, r"tiers\.redis_url must be a URL with scheme redis:// or rediss:// or unix://"),
    ({"tiers": {"redis_url": "redis://:pw@host:6379"}}, r"tiers\.redis_url must not carry a password"),
    ({"tiers": {"dram_capacity_gib": -1}}, r"tiers\.dram_capacity_gib must be a number in \[0, 65536\]"),
    ({"gateway": {"http_port": 70000}}, r"gateway\.http_port must be an integer in \[1, 65535\]"),
    ({"gateway": {"grpc_port": 8000}}, r"gateway\.grpc_port and gateway\.http_port must differ"),
    ({"gateway": {"max_prompt_tokens": 4096}}, r"gateway\.max_prompt_tokens must be below engine\.max_model_len \(4096\)"),
    ({"replicas": {"min": 3, "max": 2}}, r"replicas must satisfy min <= initial <= max; got min=3, initial=1, max=2"),
    ({"engine": {"tensor_parallel_size": 2}}, r"engine\.tensor_parallel_size must be 1 when model\.device is cpu"),
    ({"autoscaling": {"scale_down_window_s": 10}}, r"autoscaling\.scale_down_window_s must be >= scale_up_window_s"),
    ({"auth": {"required": True}}, r"auth\.required is true but no API keys"),
    ({"engine": {"max_len": 1}}, r"unknown setting engine\.max_len; valid: "),
    ({"engines": {}}, r"unknown config section 'engines'"),
])
def test_bad_values_name_the_setting_and_what_it_accepts(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_yaml_then_env_overrides(tmp_path):
    path = tmp_path / "lull.yaml"
    path.write_text(yaml.safe_dump({"engine": {"max_model_len": 8192, "block_size": 32}, "policy": {"name": "mori"}}))
    env = {"LULL_CONFIG": str(path), "LULL_ENGINE__MAX_MODEL_LEN": "16384", "LULL_POLICY__PREFETCH": "false",
           "LULL_GATEWAY__MAX_PROMPT_TOKENS": "none", "LULL_DEVICE": "gpu"}  # LULL_DEVICE is setup.sh's, not a setting
    config = load_config(env=env)
    assert config.engine.max_model_len == 16384 and config.engine.block_size == 32
    assert config.policy.name == "mori" and config.policy.prefetch is False
    assert config.gateway.max_prompt_tokens is None and config.max_prompt_tokens == 16383


@pytest.mark.parametrize(("env", "message"), [
    ({"LULL_ENGINE__MAX_MODEL_LENGTH": "1"}, r"LULL_ENGINE__MAX_MODEL_LENGTH names no setting"),
    ({"LULL_ENGINE__MAX_MODEL_LEN": "big"}, r"LULL_ENGINE__MAX_MODEL_LEN must be an integer"),
    ({"LULL_POLICY__PREFETCH": "maybe"}, r"LULL_POLICY__PREFETCH must be true or false"),
    ({"LULL_NOPE__X": "1"}, r"unknown config section 'nope'"),
])
def test_bad_environment_overrides_are_errors(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env=env)


def test_api_keys_from_file_and_env_never_show(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"# tenants\nacme:{KEY}\n")
    env = {"LULL_AUTH__REQUIRED": "true", "LULL_AUTH__API_KEYS_FILE": str(keys),
           "LULL_API_KEYS": "beta:another-secret-key-xyz", "LULL_REDIS_PASSWORD": "redis-secret"}
    config = load_config(env=env)
    assert config.secrets.tenant_of(KEY) == "acme" and config.secrets.tenant_of("nope") is None
    shown = repr(config) + str(config.to_dict()) + documented_yaml(config)
    for secret in (KEY, "another-secret-key-xyz", "redis-secret"):
        assert secret not in shown
    assert "2 tenants" in repr(config.secrets)


@pytest.mark.parametrize("text", [f"acme {KEY}", f"acme:{KEY}\nacme:{KEY}x", f"a:{KEY}\nb:{KEY}", f":{KEY}"])
def test_bad_api_key_files_are_errors_that_never_quote_a_key(tmp_path, text):
    keys = tmp_path / "keys"
    keys.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(env={"LULL_AUTH__API_KEYS_FILE": str(keys)})
    assert KEY not in str(caught.value)


def test_planner_config_follows_the_policy_settings():
    config = from_dict({"policy": {"displacement": False, "displace_margin": 0.2}, "tiers": {"shared_capacity_gib": 0}})
    planner = PlannerConfig.from_config(config)
    assert (planner.displacement, planner.displace_margin, planner.shared_tier) == (False, 0.2, False)


def test_documented_yaml_reads_back_as_the_config():
    config = chart_config()
    text = documented_yaml(config)
    assert yaml.safe_load(text)["config"] == config.to_dict()
    for section in SECTIONS:
        for f in fields(section):
            assert f"# {f.metadata['doc']}\n    {f.name}:" in text


def test_schema_accepts_valid_configs_and_rejects_what_the_dataclasses_reject():
    schema = config_schema()
    jsonschema.validate(LullConfig().to_dict(), schema)
    jsonschema.validate(chart_config().to_dict(), schema)
    for bad in ({"engine": {"block_size": 12}}, {"policy": {"name": "fifo"}}, {"gateway": {"http_port": 0}},
                {"tiers": {"redis_url": "http://x"}}, {"engine": {"gpu_memory_utilization": 0}}, {"model": {"pathh": "x"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ConfigError):
            from_dict(bad)


def test_secrets_repr_hides_values():
    shown = repr(Secrets(api_keys={"t": "key-123"}, redis_password="pw-456"))
    assert "key-123" not in shown and "pw-456" not in shown
