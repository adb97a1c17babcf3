#!/usr/bin/env bash
# Builds llama-cpp-python 0.3.36 (llama.cpp from source: about 25 minutes on 2 cores) into
# bench/.llama-venv, once, with its OpenAI-compatible server (python -m llama_cpp.server). Kept out
# of CI; only the llama.cpp comparisons (bench/run-engine-bench.sh, bench/side-by-side.sh) need it.
#
# llama.cpp is built for the CPU it runs on, so every comparison is against its best
# configuration here: a native build (-march=native). Only where the CPU has AMX is the feature
# list spelled out instead, from /proc/cpuinfo, with AMX off: llama.cpp's AMX matmul segfaults on
# the VMs we have seen with it (ggml_backend_amx_mul_mat), and -march=native would turn it on.
# A build made on one machine is not reused on another: bench/.llama-venv/cpu-flags records the
# CPU flags it was built for, and a different CPU rebuilds it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# The server's own dependencies (llama-cpp-python's "server" extra), pure Python: installed
# beside an existing build without rebuilding llama.cpp.
SERVER_DEPS=("uvicorn>=0.22.0" "fastapi>=0.100.0" "pydantic-settings>=2.0.1" "sse-starlette>=1.6.1"
  "starlette-context>=0.3.6,<0.4" "PyYAML>=5.1")
flags="$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2 | xargs -n1 | sort | xargs)"
if [ -x .llama-venv/bin/python ] && .llama-venv/bin/python -c 'import llama_cpp' 2>/dev/null \
  && [ "$(cat .llama-venv/cpu-flags 2>/dev/null)" = "$flags" ]; then
  if ! .llama-venv/bin/python -c 'import llama_cpp.server.app' 2>/dev/null; then
    .llama-venv/bin/pip install --disable-pip-version-check -q "${SERVER_DEPS[@]}"
  fi
  exit 0
fi
has() { [[ " $flags " == *" $1 "* ]]; }
on() { has "$1" && echo ON || echo OFF; }
if [ "$(uname -m)" != x86_64 ] || ! has amx_tile; then
  CMAKE_ARGS="-DGGML_NATIVE=ON"
else
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=$(on avx) -DGGML_AVX2=$(on avx2) -DGGML_FMA=$(on fma) \
    -DGGML_F16C=$(on f16c) -DGGML_BMI2=$(on bmi2) -DGGML_AVX_VNNI=$(on avx_vnni) \
    -DGGML_AVX512=$(on avx512f) -DGGML_AVX512_VNNI=$(on avx512_vnni) \
    -DGGML_AVX512_VBMI=$(on avx512vbmi) -DGGML_AVX512_BF16=$(on avx512_bf16) \
    -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
fi
rm -rf .llama-venv
python3 -m venv .llama-venv
echo "llama.cpp build: $CMAKE_ARGS" >&2
CMAKE_ARGS="$CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .llama-venv/bin/pip install \
  --disable-pip-version-check --no-cache-dir numpy llama-cpp-python==0.3.36 "${SERVER_DEPS[@]}"
echo "$flags" > .llama-venv/cpu-flags
