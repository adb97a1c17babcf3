#!/usr/bin/env bash
# Builds llama-cpp-python 0.3.36 (llama.cpp from source: about 25 minutes on 2 cores) into
# bench/.llama-venv, once, with its OpenAI-compatible server (python -m llama_cpp.server). Kept out
# of CI; only the llama.cpp comparisons (bench/run-engine-bench.sh, bench/side-by-side.sh) need it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
# The server's own dependencies (llama-cpp-python's "server" extra), pure Python: installed
# beside an existing build without rebuilding llama.cpp.
SERVER_DEPS=("uvicorn>=0.22.0" "fastapi>=0.100.0" "pydantic-settings>=2.0.1" "sse-starlette>=1.6.1"
  "starlette-context>=0.3.6,<0.4" "PyYAML>=5.1")
if [ -x .llama-venv/bin/python ] && .llama-venv/bin/python -c 'import llama_cpp' 2>/dev/null; then
  if ! .llama-venv/bin/python -c 'import llama_cpp.server.app' 2>/dev/null; then
    .llama-venv/bin/pip install --disable-pip-version-check -q "${SERVER_DEPS[@]}"
  fi
  exit 0
fi
python3 -m venv .llama-venv
# No AMX: on this kind of VM llama.cpp's AMX matmul segfaults (ggml_backend_amx_mul_mat). A native
# build (-march=native) turns AMX on whatever GGML_AMX_* say, so the x86 features are listed
# instead: AVX2/FMA/F16C and AVX-512 with VNNI, as the CPUs here have.
CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON \
  -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .llama-venv/bin/pip install --disable-pip-version-check \
  --no-cache-dir numpy llama-cpp-python==0.3.36 "${SERVER_DEPS[@]}"
