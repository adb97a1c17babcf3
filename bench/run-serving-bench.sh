#!/usr/bin/env bash
# The serving benchmarks of bench/RESULTS.md ("Serving (issue 3)"), in one run on one machine:
#   1. the coordinator's own cost per decode step, over zero-cost fake workers
#      (helios-bench overhead, 1/64/256 sequences, 1 and 3 fake ranks);
#   2. end-to-end output tokens/s of `helios serve` with SmolLM2-135M-Instruct Q4_1 at tp 1
#      and tp 3, concurrency 1 and 16, 64 tokens in and 64 out (helios-bench serve).
# Prints the overhead tables, then one table of the end-to-end runs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
prepare

target/release/helios-bench overhead --seqs 1,64,256 --workers 1,3 --steps 1000
echo

IN=64
OUT=64
for tp in 1 3; do
  start_helios --tp "$tp"
  for c in 1 16; do
    # Requests: 4 at concurrency 1, 2 per client at 16; a warm-up of one request per client.
    requests=$((c == 1 ? 4 : 2 * c))
    target/release/helios-bench serve --url "$GRPC_ADDR" --concurrency "$c" --num-requests "$requests" \
      --input-len "$IN" --output-len "$OUT" --ignore-eos --warmup "$c" --json >>"$work/runs.jsonl"
  done
  stop_server
done

check_runs "$work/runs.jsonl"
python3 - "$work/runs.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("End-to-end, helios serve (SmolLM2-135M-Instruct Q4_1), closed loop over gRPC")
print("| tp | concurrency | requests | in/out tokens | output tokens | duration (s) | output tok/s | mean TTFT (ms) | mean TPOT (ms) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['tensor_parallel_size']} | {r['concurrency']} | {r['completed']} | {r['input_len']}/{r['output_len']} "
          f"| {r['total_output_tokens']} | {r['duration']:.2f} | {r['output_throughput']:.1f} "
          f"| {r['mean_ttft_ms']:.1f} | {r['mean_tpot_ms']:.1f} |")
EOF
