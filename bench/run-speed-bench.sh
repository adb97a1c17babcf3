#!/usr/bin/env bash
# The speed results of bench/RESULTS.md ("Speed: kernels, lm_head, communicator"), in one run:
#
#   1. the engine (prefill 128, decode batch 1 and 16) for Helios with its best kernels, Helios
#      held to AVX2 (HELIOS_CPU_KERNEL=avx2: what a CPU without VNNI gets), and llama.cpp, twice;
#   2. the Q4_1 kernel alone, VNNI and AVX2, 1 and 2 threads;
#   3. the all-reduce's latency, TCP against shared memory (helios-bench allreduce);
#   4. step time per rank and the share of it spent in collectives, at tp 1, 2 and 3, over shared
#      memory and over TCP (HELIOS_COMM=tcp): `helios serve` driven by one client at a time
#      (16 tokens in, 128 out, 4 requests after 1 warm-up), then its /metrics:
#      helios_worker_forward_duration_seconds and helios_allreduce_duration_seconds per rank.
#      SmolLM2 splits 1 or 3 ways; tp 2 runs SOLAR-10.7B's shape with 4 of its layers on dummy
#      weights (bench/configs/solar-10.7b, --load-format dummy).
#
# llama.cpp comes from bench/setup-llama-cpp.sh (built once for this CPU, ~25 min on 2 cores).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
bench/setup-llama-cpp.sh
prepare

echo "## 1. engine: Helios (best kernels), Helios (AVX2 only), llama.cpp; twice"
for _ in 1 2; do
  target/release/helios-bench engine --tp 1 --threads 2 --json
  HELIOS_CPU_KERNEL=avx2 target/release/helios-bench engine --tp 1 --threads 2 --json
  bench/.llama-venv/bin/python bench/llama_cpp_bench.py --threads 2
done

echo "## 2. the Q4_1 kernel alone, [1536 x 576] x 1 token"
for isa in avx512vnni avx2; do
  for threads in 1 2; do
    echo "$isa: $(HELIOS_CPU_KERNEL=$isa RAYON_NUM_THREADS=$threads target/release/helios-bench kernel)"
  done
done

echo "## 3. all-reduce latency"
target/release/helios-bench allreduce

echo "## 4. step time and collectives per rank"
solar="$work/solar-4-layers"
mkdir -p "$solar"
python3 -c "import json,sys; c=json.load(open('bench/configs/solar-10.7b/config.json')); \
c['num_hidden_layers']=4; json.dump(c, open(sys.argv[1] + '/config.json', 'w'))" "$solar"
share() {
  local label=$1; shift
  start_helios "$@"
  target/release/helios-bench serve --url "$GRPC_ADDR" --concurrency 1 --num-requests 4 --warmup 1 \
    --input-len 16 --output-len 128 --ignore-eos --no-progress --json >/dev/null
  curl -sf "$HTTP_URL/metrics" | python3 -c "
import re, sys
sums = {}
for line in sys.stdin:
    m = re.match(r'helios_(worker_forward|allreduce)_duration_seconds_(sum|count)\{(.*)\} (\S+)', line)
    if m:
        rank = re.search(r'rank=\"(\d+)\"', m.group(3)).group(1)
        sums[(m.group(1), m.group(2), int(rank))] = float(m.group(4))
for r in sorted({k[2] for k in sums}):
    steps = sums[('worker_forward', 'count', r)]
    fwd = sums[('worker_forward', 'sum', r)] / steps * 1e3
    ar = sums[('allreduce', 'sum', r)] / steps * 1e3
    print(f'| $label | {r} | {steps:.0f} | {fwd:.2f} | {ar:.2f} | {100 * ar / fwd:.0f} % |')
"
  stop_server
}
echo "| run | rank | steps | ms per step | ms in collectives | share |"
echo "|---|---|---|---|---|---|"
share "SmolLM2, tp 1" --model models/SmolLM2-135M-Instruct.Q4_1.gguf --tp 1
for comm in shm tcp; do
  [[ $comm == tcp ]] && export HELIOS_COMM=tcp
  share "SmolLM2, tp 3, $comm" --model models/SmolLM2-135M-Instruct.Q4_1.gguf --tp 3
  share "SOLAR shape 4 layers, tp 2, $comm" --model "$solar" --load-format dummy --tp 2
  unset HELIOS_COMM
done
share "SOLAR shape 4 layers, tp 1" --model "$solar" --load-format dummy --tp 1
