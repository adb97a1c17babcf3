#!/usr/bin/env bash
# The scheduler benchmarks of bench/RESULTS.md ("Scheduler (issue 4)"), in one run on one machine:
#   1. the scheduler's decision time per decode step at 256 and 1,024 running sequences, prefix
#      caching on (helios-bench scheduler, in-process);
#   2. the gap between steps as the workers see it (from sending a StepResult to receiving the
#      next StepPlan: rank 0's, the coordinator's turnaround, and the longest-waiting rank's,
#      from ModelInfo's step counters), at batch 64 on
#      SmolLM2-135M-Instruct Q4_1, tp 1 and tp 3, with overlap (the default) and --no-overlap.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
prepare

target/release/helios-bench scheduler --seqs 256,1024 --context 512 --steps 1000
echo

BATCH=64
for tp in 1 3; do
  for mode in overlap no-overlap; do
    flags=()
    [[ "$mode" == no-overlap ]] && flags=(--no-overlap)
    start_helios --tp "$tp" --max-running "$BATCH" "${flags[@]}"
    target/release/helios-bench serve --url "$GRPC_ADDR" --concurrency "$BATCH" --num-requests $((2 * BATCH)) \
      --input-len 64 --output-len 64 --ignore-eos --warmup "$BATCH" --json |
      python3 -c "import json,sys; r=json.load(sys.stdin); r['mode']='$mode'; print(json.dumps(r))" >>"$work/gap.jsonl"
    stop_server
  done
done

check_runs "$work/gap.jsonl"
python3 - "$work/gap.jsonl" <<'EOF2'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("Gap between steps as the workers see it, batch 64 (closed loop, 64 in / 64 out), SmolLM2-135M-Instruct Q4_1")
print("| tp | mode | steps | mean step compute (ms) | rank 0 gap (µs) | rank 0 gap / step | longest rank wait / step | output tok/s | mean TPOT (ms) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['tensor_parallel_size']} | {r['mode']} | {r['steps']} | {r['mean_step_compute_ms']:.1f} "
          f"| {r['mean_step_gap_us']:.0f} | {r['gap_percent_of_step']:.2f}% | {r['rank_wait_percent_of_step']:.2f}% "
          f"| {r['output_throughput']:.1f} | {r['mean_tpot_ms']:.1f} |")
EOF2
