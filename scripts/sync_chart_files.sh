#!/usr/bin/env bash
# Copy platform/'s Serve config, dashboards and alert rules into the Helm chart,
# which must be self-contained when packaged (.Files reads only inside the chart).
# tests/unit/test_helm_chart.py and tests/unit/test_dashboards.py fail while the copies differ.
set -euo pipefail
cd "$(dirname "$0")/.."
files=deploy/helm/lull/files
rm -rf "$files/serve" "$files/grafana" "$files/prometheus"
mkdir -p "$files/serve" "$files/grafana" "$files/prometheus"
cp platform/serve/lull.yaml "$files/serve/"
cp platform/grafana/*.json "$files/grafana/"
cp platform/prometheus/alerts.yaml "$files/prometheus/"
echo "sync: chart files match platform/"
