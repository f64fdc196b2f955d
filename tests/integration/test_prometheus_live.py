"""A real Prometheus (the Debian package) scrapes a running local platform, and every
dashboard panel query returns data through Prometheus's HTTP API.

The platform and its traffic are `test_metrics_live`'s: sessions fill a GPU tier
shrunk to two sessions, are demoted during tool calls, come back gated and promoted,
so moves, gate waits and idleness have samples. Grafana's macros are replaced as
`tests.promql` does ($__rate_interval -> 5m); a rate needs two scrapes in its window,
so the test waits for them."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.integration.test_metrics_live import dashboard_queries, drive_traffic, platform  # noqa: F401 (fixture)
from tests.promql import substitute_grafana
from workers.redis_server import free_port

SCRAPE_S = 1
ALERTS = Path(__file__).resolve().parents[2] / "platform" / "prometheus" / "alerts.yaml"
# Queries that may return no data after a short run, and why. Keep empty unless a
# query's data cannot be produced by driving the platform.
NO_DATA_EXPECTED: dict[str, str] = {}


def prometheus_binary() -> str:
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("the `prometheus` binary is missing: install the Debian package "
                    "(`apt-get install -y prometheus`, as root; .ci/run does it when it runs as root)")
    return binary


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def prometheus(platform):  # noqa: F811 (the fixture imported above)
    binary = prometheus_binary()
    data = tempfile.mkdtemp(prefix="lull-prometheus-")
    port = free_port()
    config = Path(data) / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": f"{SCRAPE_S}s", "evaluation_interval": f"{SCRAPE_S}s"},
        "scrape_configs": [{"job_name": "lull", "static_configs": [
            {"targets": [f"127.0.0.1:{platform.metrics_port}"]}]}],
        "rule_files": [str(ALERTS)],
    }))
    log = open(Path(data) / "prometheus.log", "wb")
    process = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={data}/tsdb",
                                f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=log)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = get(f"{base}/api/v1/targets")["data"]["activeTargets"]
                if targets and targets[0]["health"] == "up":
                    break
            except OSError:
                pass
            assert process.poll() is None, (Path(data) / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, f"Prometheus never scraped the platform: {targets}"
            time.sleep(0.5)
        yield base
    finally:
        process.terminate()
        process.wait(30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)


def query(base: str, expr: str) -> list:
    answer = get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    assert answer["status"] == "success", f"{expr}: {answer}"
    return answer["data"]["result"]


def test_every_dashboard_query_returns_data(platform, prometheus):  # noqa: F811
    time.sleep(3 * SCRAPE_S)  # scrapes before the traffic: a rate's window starts empty
    drive_traffic(platform)
    time.sleep(3 * SCRAPE_S)  # and after it
    empty = []
    for title, expr in dashboard_queries():
        promql = substitute_grafana(expr).replace('=~"$model"', '=~".+"').replace('=~"$node"', '=~".+"')
        if not query(prometheus, promql) and title not in NO_DATA_EXPECTED:
            empty.append(f"{title}: {promql}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_alert_rules_load_and_evaluate(prometheus):
    time.sleep(2 * SCRAPE_S)  # an evaluation after the rules loaded
    groups = get(f"{prometheus}/api/v1/rules")["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert {"LullTierFull", "LullGateWaitsRising", "LullReplicaDown"} <= rules.keys(), rules.keys()
    broken = {name: r.get("lastError") for name, r in rules.items() if r["health"] != "ok"}
    assert not broken, f"alert rules that Prometheus cannot evaluate: {broken}"
