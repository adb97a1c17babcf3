#!/usr/bin/env bash
# Several replicas on this machine: `helios serve --tp 1` at --dp 1 and --dp 2 (one compute
# thread per worker), and the three routing policies on the multi-turn chat workload.
#
# 1. Throughput: 64 requests of 64 tokens in and 64 out at concurrency 16, dp 1 vs dp 2.
# 2. Routing: 16 chat sessions of 4 turns (each turn resends the history and the answers;
#    --concurrency 8 sessions at a time), at dp 2 under each --router without session ids (the
#    policy alone places every turn), and cache-aware with them: the prefix-cache hit ratio over
#    the run, TTFT p50/p99, output tok/s.
# 3. Under KV pressure: 3 system prompts of 256 tokens (16 blocks) taken in turn by 64 requests
#    (32 tokens of their own, 16 out; 4 at a time) at dp 2 with 48 KV blocks of 16 per replica:
#    a replica holds two prefixes beside the requests running, not three: under each --router.
# 4. The router's decision time per request at 8 replicas with 10,000 cached prompts each
#    (`helios-bench router`, in-process).
#
# Usage: bench/run-router-bench.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
prepare
bench=target/release/helios-bench
runs="$work/runs.jsonl"

report() {
  python3 - "$1" "$2" <<'PY'
import json, sys
what, r = sys.argv[1], json.loads(sys.argv[2])
ratio = r.get("prefix_cache_hit_ratio")
ratio = "-" if ratio is None else f"{ratio:.3f}"
print(f"| {what} | {r['completed']} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} "
      f"| {r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} | {ratio} |")
PY
}

echo "| run | requests | output tok/s | TTFT p50 (ms) | TTFT p99 (ms) | TPOT p50 (ms) | prefix-cache hit ratio |"
echo "|---|---|---|---|---|---|---|"
for dp in 1 2; do
  start_helios --dp "$dp" --tp 1 --threads-per-worker 1
  out=$("$bench" serve --url "$GRPC_ADDR" --concurrency 16 --num-requests 64 --input-len 64 \
    --output-len 64 --ignore-eos --warmup 4 --json)
  echo "$out" >>"$runs"
  report "random, dp $dp" "$out"
  stop_server
done
for run in "cache-aware --no-session-ids" "least-load --no-session-ids" \
  "round-robin --no-session-ids" "cache-aware"; do
  read -r router sessions <<<"$run"
  start_helios --dp 2 --tp 1 --threads-per-worker 1 --router "$router"
  out=$("$bench" serve --url "$GRPC_ADDR" --workload chat --sessions 16 --turns 4 \
    --concurrency 8 --input-len 64 --output-len 32 --ignore-eos $sessions --json)
  echo "$out" >>"$runs"
  report "chat, dp 2, $router${sessions:+, no session ids}" "$out"
  stop_server
done
for router in cache-aware least-load round-robin; do
  start_helios --dp 2 --tp 1 --threads-per-worker 1 --router "$router" --num-kv-blocks 48
  out=$("$bench" serve --url "$GRPC_ADDR" --workload shared-prefix --system-prompts 3 \
    --system-prompt-len 256 --num-requests 64 --concurrency 4 --input-len 32 --output-len 16 \
    --ignore-eos --json)
  echo "$out" >>"$runs"
  report "shared-prefix, 48 KV blocks, dp 2, $router" "$out"
  stop_server
done
check_runs "$runs"
echo
"$bench" router
