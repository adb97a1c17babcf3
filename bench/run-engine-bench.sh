#!/usr/bin/env bash
# The engine benchmark of bench/RESULTS.md: Helios and llama.cpp on the same machine, in one
# run, SmolLM2-135M-Instruct Q4_1, 2 threads. Prints both JSON results.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/fetch-model.sh >/dev/null
bench/setup-llama-cpp.sh
cargo build --release --bins -q
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)"
for i in 1 2; do
  target/release/helios-bench engine --tp 1 --threads 2 --json
  bench/.llama-venv/bin/python bench/llama_cpp_bench.py --threads 2
done
