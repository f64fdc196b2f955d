"""Offline validation of rendered Kubernetes objects: core kinds with
kubernetes-validate (strict: unknown fields are errors), KubeRay's RayService and
RayCluster with their CRDs' openAPIV3Schema (made strict the same way), and the
Prometheus Operator's kinds with a minimal structural check, since no schema for
them is available here."""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
KUBE_VERSION = "1.32"
SCHEMAS = Path(os.environ.get("LULL_K8S_SCHEMAS", ROOT.parent / "shared" / "k8s-schemas"))
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}


def kubectl() -> str:
    path = shutil.which("kubectl") or ("/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if path is None:
        raise AssertionError("kubectl is required (for `kubectl kustomize`) and is not on PATH; install kubectl >= 1.27")
    return path


def _strict(schema: Any) -> Any:
    """Reject unknown fields like `kubectl apply --validate=strict`: structural CRD
    schemas otherwise let the API server prune a misspelled field silently."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(item) for item in schema]
    return schema


@functools.cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    path = SCHEMAS / "kuberay" / CRD_FILES[kind]
    if not path.exists():
        raise AssertionError(
            f"KubeRay CRD schema {path} is missing; set LULL_K8S_SCHEMAS to a folder with kuberay/{CRD_FILES[kind]}"
        )
    crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return jsonschema.Draft7Validator(_strict(version["schema"]["openAPIV3Schema"]))


def _check_monitoring(obj: dict) -> None:
    spec = obj.get("spec") or {}
    if obj["kind"] in ("ServiceMonitor", "PodMonitor"):
        key = "endpoints" if obj["kind"] == "ServiceMonitor" else "podMetricsEndpoints"
        assert spec.get("selector", {}).get("matchLabels"), f"{obj['kind']} needs spec.selector.matchLabels"
        assert spec.get(key) and all("port" in e for e in spec[key]), f"{obj['kind']} needs spec.{key}[].port"
    elif obj["kind"] == "PrometheusRule":
        for group in spec.get("groups") or []:
            assert group.get("name") and group.get("rules"), "PrometheusRule groups need a name and rules"
            for rule in group["rules"]:
                assert rule.get("expr") and (rule.get("alert") or rule.get("record")), f"bad rule {rule}"
    else:
        raise AssertionError(f"no check for {obj['apiVersion']} {obj['kind']}")


def validate(obj: dict) -> None:
    """Raise if ``obj`` is not a valid object of its kind."""
    import kubernetes_validate

    kind, api = obj["kind"], obj["apiVersion"]
    if api == "ray.io/v1":
        errors = sorted(crd_validator(kind).iter_errors(obj), key=lambda e: list(e.path))
        if errors:
            raise AssertionError(
                f"{kind} {obj['metadata']['name']}: "
                + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])
            )
    elif api.startswith("monitoring.coreos.com/"):
        _check_monitoring(obj)
    else:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def load_all(text: str) -> list[dict]:
    return [obj for obj in yaml.safe_load_all(text) if obj]
