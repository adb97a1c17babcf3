# Shared by the bench/*.sh scripts (sourced, not run): the machine line, and one `helios serve`
# at a time, stopped on exit.
#
#   prepare                           fetches the default model, builds the release binaries,
#                                     prints the machine line and a blank line
#   machine_line                      prints cores, CPU, date, commit and load average
#   start_helios ARGS...              starts `helios serve --host 127.0.0.1 --port 0
#                                     --http-port 0 ARGS`, waits for its ready line and sets
#                                     GRPC_ADDR (host:port) and HTTP_URL (http://host:port);
#                                     HELIOS_BIN (default target/release/helios) and
#                                     HELIOS_WORKER_BIN pick other binaries
#   check_runs FILE                   exits, naming them, if any run in FILE (`helios-bench
#                                     serve --json` lines) had failed requests
#   start_server CMD...               starts any server in the background as $server
#   stop_server                       stops it

work=$(mktemp -d)
server=""

machine_line() {
  echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u '+%F %H:%M UTC'), commit $(git rev-parse --short HEAD), load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

prepare() {
  scripts/fetch-model.sh >/dev/null
  cargo build --release --bins -q
  machine_line
  echo
}

check_runs() {
  python3 - "$1" <<'EOF'
import json, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
failed = [(r["tensor_parallel_size"], r.get("concurrency"), r["errors"]) for r in runs if r["failed"]]
if failed:
    sys.exit(f"failed requests (tp, concurrency, errors): {failed}")
EOF
}

start_server() {
  "$@" >"$work/server.out" 2>"$work/server.err" &
  server=$!
}

stop_server() {
  if [[ -n "$server" ]]; then
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
    server=""
  fi
}
trap 'stop_server; rm -rf "$work"' EXIT

start_helios() {
  start_server "${HELIOS_BIN:-target/release/helios}" serve --host 127.0.0.1 --port 0 --http-port 0 "$@"
  local line=""
  for _ in $(seq 900); do
    line=$(grep -m1 '^HELIOS_READY ' "$work/server.out" || true)
    [[ -n "$line" ]] && break
    if ! kill -0 "$server" 2>/dev/null; then
      cat "$work/server.err" >&2
      return 1
    fi
    sleep 0.2
  done
  if [[ -z "$line" ]]; then
    echo "helios serve $* did not get ready" >&2
    return 1
  fi
  GRPC_ADDR=$(sed -n 's/.* grpc=\([^ ]*\).*/\1/p' <<<"$line")
  HTTP_URL=http://$(sed -n 's/.* http=\([^ ]*\).*/\1/p' <<<"$line")
}
