#!/usr/bin/env bash
# A soak of `helios serve` (release build): SECONDS (default 600) of 24 concurrent clients over
# gRPC and the OpenAI-compatible HTTP API, streamed and not, some cancelling, leaving mid-stream
# or giving a short deadline (tests/reference/soak.py), with the RSS of the coordinator and of
# every worker sampled each second. Prints soak.py's JSON and exits non-zero if any request
# failed, a client was still busy at the end, a worker was lost, the server did not come back to
# idle (nothing running or waiting, KV cache usage 0 on every replica), or a process' RSS grew
# after the warm-up by more than HELIOS_SOAK_MAX_SLOPE MiB per minute (default 1).
#
#   scripts/soak.sh [SECONDS]
#
# HELIOS_SOAK_SEED (default 1) and HELIOS_SOAK_CLIENTS (default 24) change the traffic;
# HELIOS_SOAK_SERVE_ARGS (default "--dp 2 --tp 1 --kv-cache-memory 64": two replicas, one worker
# process each; the default model splits 1 or 3 ways, and 3 processes on 2 cores mostly measure
# the contention) the server. The KV cache is kept small (about 90 blocks of 16 tokens per
# replica, about as many as the 12 requests a replica holds at once may use) so that the
# warm-up touches every page of it: KV memory is mapped lazily, and its first touch shows as RSS
# growth that is no leak; it also makes the soak preempt now and then.
#
# The slope bound: 1 MiB/min is 9 MiB over the 9 minutes after the warm-up (the first quarter
# of the run, at most 60 s), twice the most any process showed once warm (0.004-0.5 MiB/min:
# the step buffers' high-water mark rising a step or two, bench/RESULTS.md "Soak"), and below a
# leak of 8 KiB per request at the soak's rate on 2 shared cores (2.6 requests/s, about 160 a
# minute: 1.25 MiB/min). Runs much shorter than 10 minutes fit a slope to too few warm samples
# to hold them to this; use a longer run or raise the bound.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds=${1:-600}
seed=${HELIOS_SOAK_SEED:-1}
clients=${HELIOS_SOAK_CLIENTS:-24}
max_slope=${HELIOS_SOAK_MAX_SLOPE:-1}
read -r -a serve_args <<<"${HELIOS_SOAK_SERVE_ARGS:---dp 2 --tp 1 --kv-cache-memory 64}"

scripts/fetch-model.sh >/dev/null
# The Python clients (grpcio, its reflection, httpx, prometheus_client): the tests' environment.
python=${HELIOS_PYTHON:-}
if [ -z "$python" ]; then
  modules="grpc, grpc_reflection, httpx, prometheus_client"
  if [ ! -x .venv-ref/bin/python ] || ! .venv-ref/bin/python -c "import $modules" 2>/dev/null; then
    echo "setting up the reference environment in .venv-ref/" >&2
    python3 -m venv .venv-ref
    .venv-ref/bin/pip install --quiet --disable-pip-version-check -r tests/reference/requirements.txt
  fi
  python=.venv-ref/bin/python
fi
# Only what runs here: the coordinator and the worker.
cargo build --release -p helios-coordinator -p helios-worker --bins >&2
target_dir=${CARGO_TARGET_DIR:-target}

out=$(mktemp -d -t helios-soak.XXXXXX)
# Loopback only. The server's log goes to a file (RUST_LOG=warn: a line per request is noise).
RUST_LOG=${RUST_LOG:-warn} HELIOS_WORKER_BIN="$target_dir/release/helios-worker" \
  "$target_dir/release/helios" serve "${serve_args[@]}" --host 127.0.0.1 --port 0 --http-port 0 \
  >"$out/stdout" 2>"$out/stderr" &
server=$!
stop_server() {
  kill -TERM "$server" 2>/dev/null || return 0
  # The server drains what is in flight (nothing, by now) and stops its workers; bounded.
  for _ in $(seq 1 100); do
    kill -0 "$server" 2>/dev/null || { wait "$server" 2>/dev/null || true; return 0; }
    sleep 0.1
  done
  echo "helios serve did not stop within 10 s of SIGTERM; killing it" >&2
  kill -KILL "$server" 2>/dev/null || true
  wait "$server" 2>/dev/null || true
}
trap 'stop_server; rm -rf "$out"' EXIT

for _ in $(seq 1 1200); do
  grep -q '^HELIOS_READY ' "$out/stdout" && break
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$out/stderr" >&2
    echo "helios serve exited before it was ready" >&2
    exit 1
  fi
  sleep 0.1
done
ready=$(grep '^HELIOS_READY ' "$out/stdout") || {
  cat "$out/stderr" >&2
  echo "helios serve was not ready after 120 s" >&2
  exit 1
}
grpc=$(sed -n 's/.* grpc=\([^ ]*\).*/\1/p' <<<"$ready")
http=$(sed -n 's/.* http=\([^ ]*\).*/\1/p' <<<"$ready")
echo "soak: $seconds s, $clients clients, seed $seed, helios serve ${serve_args[*]} (pid $server)" >&2

"$python" tests/reference/soak.py --grpc "$grpc" --http "$http" --pid "$server" \
  --duration "$seconds" --seed "$seed" --clients "$clients" >"$out/soak.json"
stop_server
cat "$out/soak.json"

# The verdict, from the JSON.
"$python" - "$out/soak.json" "$max_slope" <<'EOF'
import json
import sys

r = json.load(open(sys.argv[1]))
max_slope = float(sys.argv[2])
bad = []
if r["outcomes"]["failed"]:
    bad.append(f"{r['outcomes']['failed']} failed requests: {r['failures'][:5]}")
if r["unfinished"]:
    bad.append(f"{r['unfinished']} clients still busy at the end")
final = r["final"]
if not final["idle"]:
    bad.append(f"not idle {final['waited_s']} s after the load: {final}")
for name, p in r["processes"].items():
    if not p["alive"]:
        bad.append(f"{name} (pid {p['pid']}) is gone")
    if p["slope_mib_per_min"] is not None and p["slope_mib_per_min"] > max_slope:
        bad.append(f"{name}: RSS slope {p['slope_mib_per_min']} MiB/min > {max_slope}")
print(
    "soak: "
    + ", ".join(f"{k} {v}" for k, v in r["outcomes"].items())
    + f"; {r['requests_per_s']} requests/s; "
    + "; ".join(
        f"{n} RSS {p['first_mib']}/{p['warm_mib']}/{p['last_mib']} MiB "
        f"(first/warm/last), slope {p['slope_mib_per_min']} MiB/min"
        for n, p in r["processes"].items()
    ),
    file=sys.stderr,
)
for b in bad:
    print(f"soak FAILED: {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
