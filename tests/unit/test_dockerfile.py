"""platform/Dockerfile agrees with the repository. No container runtime runs here, so the
image is not built (the README's Kubernetes section builds it); what can be checked
without one is: every COPY source exists, the base image's vLLM is the `gpu` extra's pin,
the metrics directory and the exposed ports are the config's, the lock it installs from
exists, and the `gpu` extra it installs is declared."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from proto.config_export import chart_config

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, out = "", []
    for line in (ROOT / "platform" / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        joined += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = joined.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            joined = ""
    return out


def args_of(name: str) -> list[str]:
    return [rest for word, rest in instructions() if word == name]


def test_every_copy_source_exists():
    copies = args_of("COPY")
    assert copies
    for rest in copies:
        *sources, _ = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_the_base_image_carries_the_gpu_extras_vllm():
    gpu = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    [vllm_pin] = [d for d in gpu if d.startswith("vllm==")]
    [base] = [rest for rest in args_of("ARG") if rest.startswith("BASE_IMAGE=")]
    assert base.endswith(f":v{vllm_pin.removeprefix('vllm==')}"), (base, vllm_pin)
    assert any('".[gpu]"' in rest for rest in args_of("RUN"))
    assert any("constraints/cpu.txt" in rest for rest in args_of("RUN"))


def test_metrics_dir_and_exposed_ports_are_the_configs():
    config = chart_config()  # the image's: the chart runs it
    env = " ".join(args_of("ENV"))
    assert f"PROMETHEUS_MULTIPROC_DIR={config.telemetry.metrics_dir}" in env
    assert any(f"mkdir -p {config.telemetry.metrics_dir}" in rest for rest in args_of("RUN"))
    exposed = {int(p) for rest in args_of("EXPOSE") for p in re.findall(r"\d+", rest)}
    for port in (config.gateway.http_port, config.gateway.grpc_port, config.tiers.node_agent_port,
                 config.telemetry.metrics_port):
        assert port in exposed, f"port {port} is not exposed"
