"""`helm test lull` (deploy/helm/lull/templates/tests/): one Pod, run on demand, that calls the
gateway Service as a client would, with the release's API key, as a non-root pod. Rendered
offline; the script itself runs against a live platform in
tests/integration/test_agent_clients.py::test_the_charts_helm_test_script_passes_against_the_platform."""

from __future__ import annotations

import pytest

from tests.unit.test_helm_chart import VALUE_SETS, find, rendered, values_of


def the_test_pod(which: str) -> dict:
    [pod] = [o for o in rendered(which) if o["kind"] == "Pod"]
    return pod


@pytest.mark.parametrize("which", VALUE_SETS)
def test_the_helm_test_pod_calls_the_gateway_service_with_the_releases_key(which):
    pod = the_test_pod(which)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    [service] = [s for s in find(which, "Service") if s["metadata"]["name"].endswith("-gateway")]
    http = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "http")
    assert env["LULL_URL"] == f"http://{service['metadata']['name']}.lull.svc:{http}"
    [config_map] = [c for c in find(which, "ConfigMap") if "config.yaml" in c.get("data", {})]
    assert f"served_name: {env['LULL_MODEL']}" in config_map["data"]["config.yaml"].replace('"', "")
    [volume] = pod["spec"]["volumes"]
    keys = (values_of(which) or {}).get("apiKeys", {}).get("existingSecret") or "lull-api-keys"
    assert volume["secret"]["secretName"] == keys and volume["secret"]["items"][0]["key"] == "api-keys"
    assert "/v1/chat/completions" in container["command"][-1] and "/v1/models" in container["command"][-1]


@pytest.mark.parametrize("which", VALUE_SETS)
def test_the_helm_test_pod_runs_non_root_without_a_token(which):
    spec = the_test_pod(which)["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True and spec["automountServiceAccountToken"] is False
    context = spec["containers"][0]["securityContext"]
    assert context["capabilities"] == {"drop": ["ALL"]} and context["readOnlyRootFilesystem"] is True
