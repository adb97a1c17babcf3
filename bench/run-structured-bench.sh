#!/usr/bin/env bash
# The structured outputs results of bench/RESULTS.md, in one run:
#
#   1. helios-bench constraint: the 20 test schemas' compile time (no cache), the coordinator's
#      mask per constrained token (along random walks through each schema), and a rank's cost
#      of applying a mask to a 49152-token row;
#   2. serving throughput at concurrency 16 with 0 %, 50 % and 100 % of the requests
#      constrained (`helios serve --tp 1`, gRPC, greedy, 64 tokens in and 64 out past EOS; the
#      constraint is the load generator's default regex, words that no run completes), three
#      rounds in turn so that the machine's drift spreads over all three.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
prepare

echo "## 1. compile and mask cost"
target/release/helios-bench constraint

echo "## 2. throughput at concurrency 16"
start_helios --model models/SmolLM2-135M-Instruct.Q4_1.gguf --tp 1
echo "| constrained | round | failed | output tok/s | mean TPOT ms | p99 TPOT ms |"
echo "|---|---|---|---|---|---|"
for round in 1 2 3; do
  for f in 0 0.5 1; do
    target/release/helios-bench serve --url "$GRPC_ADDR" --concurrency 16 --num-requests 64 \
      --warmup 16 --input-len 64 --output-len 64 --ignore-eos --constrained "$f" \
      --no-progress --json | python3 -c "
import json, sys
r = json.load(sys.stdin)
print(f'| {float(\"$f\") * 100:.0f} % | $round | {r[\"failed\"]} | {r[\"output_throughput\"]:.1f} | {r[\"mean_tpot_ms\"]:.1f} | {r[\"p99_tpot_ms\"]:.1f} |')
"
  done
done
stop_server
