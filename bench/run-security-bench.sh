#!/usr/bin/env bash
# What TLS and API keys cost: the same load on a plain `helios serve` and on one with TLS and an
# API key, alternately in one run (a shared machine drifts more than the difference):
#
#   bench/run-security-bench.sh [ROUNDS]     (default 3)
#
# `helios serve --tp 1` (the default model), `helios-bench serve` over gRPC at concurrency 16:
# 64 requests of 128 tokens in and 64 out (EOS ignored), 16 warm-up requests; rounds go
# plain/secure, secure/plain, ... A CA and a server certificate for 127.0.0.1 are made here with
# openssl. Prints one table row per run and the mean output throughput of each.
set -euo pipefail
rounds=${1:-3}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
prepare

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
  -subj /CN=bench-ca -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
  -keyout "$work/server.key" -out "$work/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$work/san.ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
  -CAcreateserial -days 1 -extfile "$work/san.ext" -out "$work/server.pem" 2>/dev/null
key="bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
echo "$key" >"$work/keys"

run() { # MODE
  local url client=()
  if [[ $1 == secure ]]; then
    start_helios --tp 1 --tls-cert "$work/server.pem" --tls-key "$work/server.key" \
      --api-key-file "$work/keys"
    url="https://$GRPC_ADDR"
    client=(--tls-ca "$work/ca.pem" --api-key "$key")
  else
    start_helios --tp 1
    url="$GRPC_ADDR"
  fi
  target/release/helios-bench serve --url "$url" "${client[@]}" --concurrency 16 \
    --num-requests 64 --input-len 128 --output-len 64 --ignore-eos --warmup 16 --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; print(json.dumps(r))' "$1" \
      >>"$work/runs.jsonl"
  stop_server
}

for r in $(seq "$rounds"); do
  if ((r % 2)); then run plain; run secure; else run secure; run plain; fi
done
check_runs "$work/runs.jsonl"
python3 - "$work/runs.jsonl" <<'PY'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print("| run | mode | output tok/s | mean TTFT ms | mean TPOT ms |")
print("|---|---|---|---|---|")
for i, r in enumerate(runs, 1):
    print(f"| {i} | {r['label']} | {r['output_throughput']:.1f} | {r['mean_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} |")
mean = lambda m: sum(r["output_throughput"] for r in runs if r["label"] == m) / sum(1 for r in runs if r["label"] == m)
p, s = mean("plain"), mean("secure")
print(f"\nmean output throughput: plain {p:.1f} tok/s, TLS + API key {s:.1f} tok/s ({(s - p) / p * 100:+.1f}%)")
PY
