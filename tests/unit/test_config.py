"""proto/config.py: defaults, validation messages, YAML + env loading, secrets
kept out of sight, and the Helm export derived from the same definitions."""

from __future__ import annotations

import pickle
from dataclasses import fields

import jsonschema
import pytest
import yaml

from controller.policy import PlannerConfig
from proto.config import (
    SECTIONS,
    ConfigError,
    LullConfig,
    Secrets,
    definition,
    from_dict,
    load_config,
    parse_setting,
)
from proto.config_export import chart_config, config_schema, documented_yaml

KEY = "sk-very-secret-key-0123456789"


def test_defaults_are_valid_and_match_the_runtime_names():
    config = LullConfig()
    # A node agent takes a free port unless told (several Ray nodes share a laptop); the
    # chart's one agent per pod takes the port its image exposes.
    assert config.telemetry.metrics_port == 9102 and config.tiers.node_agent_port == 0
    assert chart_config().tiers.node_agent_port == 50061
    assert (config.gateway.http_port, config.gateway.grpc_port) == (8000, 9000)
    assert config.policy.tick_seconds == 5.0 and config.policy.idleness_window == 5
    assert config.model.path is None  # the embedded tiny model, resolved by the engine
    assert set(config.to_dict()) == {s.NAME for s in SECTIONS}


def test_a_dram_tier_that_fits_its_volume_with_headroom_is_accepted():
    # 10% of the volume, at least 2 GiB, stays free: 36 of 40 GiB fits, 36.01 does not.
    assert from_dict({"tiers": {"dram_capacity_gib": 36, "dram_volume_gib": 40}}).tiers.dram_volume_gib == 40
    assert from_dict({"tiers": {"dram_capacity_gib": 64}}).tiers.dram_volume_gib is None  # unknown: unchecked
    assert from_dict({"tiers": {"dram_capacity_gib": 0, "dram_volume_gib": 1}}).tiers.dram_capacity_gib == 0
    with pytest.raises(ConfigError, match="at most 36, or give the volume at least 41 GiB"):
        from_dict({"tiers": {"dram_capacity_gib": 36.01, "dram_volume_gib": 40}})


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
    ({"policy": {"name": "Fifo!"}}, r"policy\.name must be a policy name \(lowercase letters, digits, - and _\)"),
    ({"policy": {"tick_seconds": 0}}, r"policy\.tick_seconds must be a number in \(0, 3600\]"),
    ({"tiers": {"shared_backend": "redis"}}, r"unknown setting tiers\.shared_backend"),  # read by nothing: gone
    ({"tiers": {"lmcache_url": "tcp://x:1"}}, r"unknown setting tiers\.lmcache_url"),
    ({"tiers": {"redis_url": "http://x"}}, r"tiers\.redis_url must be a URL with scheme redis:// or rediss:// or unix://"),
    ({"tiers": {"redis_url": "redis://:pw@host:6379"}}, r"tiers\.redis_url must not carry a password"),
    ({"tiers": {"dram_capacity_gib": -1}}, r"tiers\.dram_capacity_gib must be a number in \[0, 65536\]"),
    ({"tiers": {"dram_capacity_gib": 64, "dram_volume_gib": 16}},
     r"tiers\.dram_capacity_gib \(64\) does not fit its memory volume of 16 GiB .+ lower tiers\.dram_capacity_gib "
     r"to at most 14, or give the volume at least 72 GiB \(Helm: ray\.gpuWorkers\.shmSize\)"),
    ({"tiers": {"dram_capacity_gib": 768, "dram_volume_gib": 64}}, r"at most 57\.6, or give the volume at least 854 GiB"),
    ({"tiers": {"dram_volume_gib": 0}}, r"tiers\.dram_volume_gib must be a number in \(0, 65536\], or null"),
    ({"model": {"path": "Qwen/Qwen2.5-7B"}}, r"model\.path: 'Qwen/Qwen2\.5-7B' is not hf://.+ \(a Hugging Face id\? "
                                             r"write hf://Qwen/Qwen2\.5-7B\)"),
    ({"model": {"path": "s3://bucket/m"}}, r"model\.path: 's3://bucket/m' has an unknown scheme"),
    ({"model": {"path": "pvc://Models/x"}}, r"model\.path: 'pvc://Models/x' is not pvc://CLAIM\[/PATH\]"),
    ({"cluster": {"gateway_resource": "lull-gateway"}}, r"cluster\.gateway_resource must be a Ray resource name"),
    ({"gateway": {"http_port": 70000}}, r"gateway\.http_port must be an integer in \[1, 65535\]"),
    ({"gateway": {"grpc_port": 8000}}, r"gateway\.grpc_port and gateway\.http_port must differ"),
    ({"gateway": {"max_prompt_tokens": 4096}}, r"gateway\.max_prompt_tokens must be below engine\.max_model_len \(4096\)"),
    ({"replicas": {"min": 3, "max": 2}}, r"replicas must satisfy min <= initial <= max; got min=3, initial=1, max=2"),
    ({"replicas": {"initial": 3, "max": 2}}, r"replicas must satisfy min <= initial <= max; got min=3, initial=3, max=2"),
    ({"replicas": {"min": 0}}, r"replicas\.min must be an integer in \[1, 1024\], or null; got 0"),
    ({"engine": {"block_size": 16}}, r"engine\.block_size must be a multiple of 32 when model\.device is cpu"),
    ({"engine": {"cpu_kv_cache_space_gib": 1.5}}, r"engine\.cpu_kv_cache_space_gib must be a whole number of GiB"),
    ({"engine": {"dtype": "float64"}}, r"engine\.dtype must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
    ({"model": {"device": "gpu"}, "engine": {"tensor_parallel_size": 4},
      "cluster": {"gpu_node_selector": "pool=gpu", "gpus_per_pod": 2}},
     r"engine\.tensor_parallel_size \(4\) must not exceed cluster\.gpus_per_pod \(2\)"),
    ({"cluster": {"engine_cpus": 0}}, r"cluster\.engine_cpus must be a number in \(0, 64\]"),
    ({"gateway": {"default_max_tokens": 0}}, r"gateway\.default_max_tokens must be an integer in \[1, 1048576\]"),
    ({"engine": {"tensor_parallel_size": 2}}, r"engine\.tensor_parallel_size must be 1 when model\.device is cpu"),
    ({"model": {"device": "gpu"}, "engine": {"tensor_parallel_size": 2}},
     r"engine\.tensor_parallel_size 2 is not supported yet: .*tier copies would overwrite each other"),
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


@pytest.mark.parametrize("tenant", ["acme/prod", "../acme", "a b", "x" * 129, "tenant\u00e9"])
def test_tenant_names_are_ids_of_the_protos_charset(tenant):
    """Tenant `acme` must not be able to address `acme/prod`'s sessions: no `/` in a name."""
    with pytest.raises(ConfigError, match="tenant name") as caught:
        load_config(env={"LULL_API_KEYS": f"{tenant}:{KEY}"})
    assert KEY not in str(caught.value)
    assert load_config(env={"LULL_API_KEYS": f"acme.prod_1-a:{KEY}"}).secrets.tenant_of(KEY) == "acme.prod_1-a"


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
    for bad in ({"engine": {"block_size": 12}}, {"policy": {"name": "Fifo!"}}, {"gateway": {"http_port": 0}},
                {"tiers": {"redis_url": "http://x"}}, {"engine": {"gpu_memory_utilization": 0}}, {"model": {"pathh": "x"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
        with pytest.raises(ConfigError):
            from_dict(bad)


def test_secrets_repr_hides_values():
    shown = repr(Secrets(api_keys={"t": "key-123"}, redis_password="pw-456"))
    assert "key-123" not in shown and "pw-456" not in shown


def test_unset_replica_bounds_are_the_initial_count():
    assert (LullConfig().replicas.min, LullConfig().replicas.max) == (1, 1)
    fixed = from_dict({"replicas": {"initial": 3}}).replicas
    assert (fixed.initial, fixed.min, fixed.max) == (3, 3, 3)
    scaling = from_dict({"replicas": {"initial": 2, "max": 4}}).replicas
    assert (scaling.initial, scaling.min, scaling.max) == (2, 2, 4)


def test_overrides_win_over_file_and_environment_setting_by_setting(tmp_path):
    path = tmp_path / "lull.yaml"
    path.write_text(yaml.safe_dump({"replicas": {"min": 1, "max": 4}, "policy": {"name": "mori"}}))
    env = {"LULL_CONFIG": str(path), "LULL_REPLICAS__INITIAL": "2", "LULL_GATEWAY__DEFAULT_MAX_TOKENS": "8"}
    config = load_config(env=env, overrides={"replicas": {"initial": 3}, "tiers": {"gpu_tier_tokens": 500}})
    assert (config.replicas.initial, config.replicas.min, config.replicas.max) == (3, 1, 4)
    assert config.policy.name == "mori" and config.gateway.default_max_tokens == 8
    assert config.tiers.gpu_tier_tokens == 500
    # An unset bound follows the overridden initial count, as it would in a file.
    assert load_config(env={}, overrides={"replicas": {"initial": 2}}).replicas.max == 2


@pytest.mark.parametrize(("overrides", "message"), [
    ({"replicas": 2}, r"replicas must be a mapping of settings; got 2"),
    ({"engine_num_cpus": 0.5}, r"unknown config section 'engine_num_cpus'"),
    ({"cluster": {"engine_num_cpus": 0.5}}, r"unknown setting cluster\.engine_num_cpus"),
    ([("replicas", 2)], r"overrides must map sections to \{setting: value\}"),
])
def test_bad_overrides_are_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(env={}, overrides=overrides)


def test_settings_parse_by_their_definitions():
    assert definition("cluster.engine_cpus").default == 1.0
    assert parse_setting("replicas.min", "none") is None and parse_setting("replicas.initial", "3") == 3
    assert parse_setting("engine.dtype", "bfloat16") == "bfloat16"
    with pytest.raises(ConfigError, match=r"engine\.dtype must be one of"):
        parse_setting("engine.dtype", "fp8")
    with pytest.raises(ConfigError, match=r"unknown setting 'engine\.dtyp'; engine has .*dtype"):
        definition("engine.dtyp")
    with pytest.raises(ConfigError, match=r"unknown setting 'engine'"):
        definition("engine")


def test_zero_ports_mean_off_or_free_and_never_clash():
    config = from_dict({"gateway": {"grpc_port": 0}, "tiers": {"node_agent_port": 0}})
    assert (config.gateway.grpc_port, config.tiers.node_agent_port) == (0, 0)


def test_secrets_never_travel_in_a_pickle(tmp_path, monkeypatch):
    keys = tmp_path / "keys"
    keys.write_text(f"acme:{KEY}\n")
    monkeypatch.setenv("LULL_API_KEYS", "beta:another-secret-key-xyz")
    config = load_config(env={"LULL_AUTH__API_KEYS_FILE": str(keys), "LULL_API_KEYS": "beta:another-secret-key-xyz"})
    data = pickle.dumps(config)
    assert KEY.encode() not in data and b"another-secret-key-xyz" not in data
    # The receiving process reads them again: the same file, its own environment.
    again = pickle.loads(data)
    assert again.secrets.tenant_of(KEY) == "acme" and again.secrets.tenant_of("another-secret-key-xyz") == "beta"
    assert again.to_dict() == config.to_dict()
