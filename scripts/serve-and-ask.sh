#!/usr/bin/env bash
# The main job: fetch the default model if missing, build, start `helios serve` at tp 3, and
# stream an answer to a prompt through `helios generate --addr`.
#
#   scripts/serve-and-ask.sh ["prompt"]          # stops the server afterwards
#   KEEP_SERVING=1 scripts/serve-and-ask.sh      # leaves it running for other clients
#
# HELIOS_PORT (default 50051), HELIOS_HTTP_PORT (default 8080: the OpenAI-compatible HTTP API
# and /health) and HELIOS_TP (default 3) change the ports and the worker count.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

prompt=${1:-"What is the capital of France? Answer in one sentence."}
port=${HELIOS_PORT:-50051}
http_port=${HELIOS_HTTP_PORT:-8080}
tp=${HELIOS_TP:-3}

scripts/fetch-model.sh >/dev/null
# Only what runs here: the coordinator and the worker (not the benchmarks or the tests).
cargo build --release -p helios-coordinator -p helios-worker --bins

log=$(mktemp -t helios-serve.XXXXXX)
# The server's log (a line per request) goes to a file, so that the answer reads cleanly.
target/release/helios serve --tp "$tp" --host 127.0.0.1 --port "$port" --http-port "$http_port" \
  >"$log" 2>"$log.err" &
server=$!
if [ -z "${KEEP_SERVING:-}" ]; then
  trap 'kill "$server" 2>/dev/null; wait "$server" 2>/dev/null; rm -f "$log" "$log.err"' EXIT
fi

# Wait for the ready line (the workers load the model first).
for _ in $(seq 1 600); do
  grep -q '^HELIOS_READY ' "$log" && break
  if ! kill -0 "$server" 2>/dev/null; then
    cat "$log.err" >&2
    echo "helios serve exited before it was ready" >&2
    exit 1
  fi
  sleep 0.1
done
grep -q '^HELIOS_READY ' "$log" || { cat "$log.err" >&2; echo "helios serve was not ready after 60 s" >&2; exit 1; }

target/release/helios generate --addr "127.0.0.1:$port" --chat --prompt "$prompt" --max-new-tokens 128

if [ -n "${KEEP_SERVING:-}" ]; then
  http=$(sed -n 's/^HELIOS_READY .*http=\([^ ]*\).*/\1/p' "$log")
  echo "helios serve (pid $server) keeps serving gRPC on 127.0.0.1:$port and the OpenAI-compatible" \
    "HTTP API on http://$http/v1 (metrics on /metrics, its log in $log.err); stop it with: kill $server" >&2
fi
