#!/usr/bin/env bash
# What observability costs (bench/RESULTS.md, "Observability (issue 6)"), in one run on one
# machine: the same closed-loop load on SmolLM2-135M-Instruct Q4_1 at tp 1 and tp 3, with spans
# off (no OTLP endpoint: the default) and exported over OTLP/gRPC to `helios-bench otlp-sink`,
# which counts them; and the time to scrape /metrics.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
prepare

BATCH=32
sink=""
stop_sink() {
  if [[ -n "$sink" ]]; then
    kill -INT "$sink" 2>/dev/null || true
    wait "$sink" 2>/dev/null || true
    sink=""
  fi
}
trap 'stop_server; stop_sink; rm -rf "$work"' EXIT

for tp in 1 3; do
  for mode in off otlp; do
    unset OTEL_EXPORTER_OTLP_ENDPOINT
    spans='{"spans": 0, "by_service": {}}'
    if [[ "$mode" == otlp ]]; then
      target/release/helios-bench otlp-sink >"$work/sink.out" &
      sink=$!
      for _ in $(seq 100); do grep -q OTLP_SINK_READY "$work/sink.out" && break; sleep 0.1; done
      export OTEL_EXPORTER_OTLP_ENDPOINT=$(sed -n 's/^OTLP_SINK_READY //p' "$work/sink.out")
    fi
    start_helios --tp "$tp" --max-running "$BATCH"
    target/release/helios-bench serve --url "$GRPC_ADDR" --concurrency "$BATCH" --num-requests $((3 * BATCH)) \
      --input-len 64 --output-len 64 --ignore-eos --warmup "$BATCH" --json >"$work/load.json"
    # /metrics under no load: the mean of 20 scrapes, and its size.
    scrape=$(python3 - "$HTTP_URL/metrics" <<'EOF2'
import sys, time, urllib.request
url = sys.argv[1]
t = time.perf_counter()
for _ in range(20):
    body = urllib.request.urlopen(url).read()
print(f"{(time.perf_counter() - t) / 20 * 1e3:.2f} {len(body)}")
EOF2
)
    stop_server
    if [[ "$mode" == otlp ]]; then
      sleep 1
      stop_sink
      spans=$(tail -n1 "$work/sink.out")
    fi
    python3 - "$work/load.json" "$tp" "$mode" "$spans" "$scrape" >>"$work/rows.jsonl" <<'EOF2'
import json, sys
r = json.load(open(sys.argv[1]))
r.update(tp=int(sys.argv[2]), mode=sys.argv[3], sink=json.loads(sys.argv[4]))
ms, size = sys.argv[5].split()
r.update(scrape_ms=float(ms), scrape_bytes=int(size))
print(json.dumps(r))
EOF2
  done
done
unset OTEL_EXPORTER_OTLP_ENDPOINT

check_runs "$work/rows.jsonl"
python3 - "$work/rows.jsonl" <<'EOF2'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"Spans off vs exported, batch 32 (closed loop, 96 requests of 64 in / 64 out after 32 warm-up), SmolLM2-135M-Instruct Q4_1")
print("| tp | spans | output tok/s | mean TPOT (ms) | mean TTFT (ms) | spans received, warm-up included (coordinator / workers) | /metrics scrape (ms, bytes) |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    by = r["sink"]["by_service"]
    c, w = by.get("helios-coordinator", 0), by.get("helios-worker", 0)
    print(f"| {r['tp']} | {r['mode']} | {r['output_throughput']:.1f} | {r['mean_tpot_ms']:.1f} | {r['mean_ttft_ms']:.0f} "
          f"| {c} / {w} | {r['scrape_ms']:.2f}, {r['scrape_bytes']} |")
print()
for r in rows:
    if r["sink"].get("by_name"):
        print(f"spans by name at tp {r['tp']}: " + ", ".join(f"{k} {v}" for k, v in r["sink"]["by_name"].items()))
EOF2
