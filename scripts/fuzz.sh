#!/usr/bin/env bash
# The long fuzz run: the CI test `tests/tests/fuzz.rs` (gRPC to a `helios serve`, its HTTP
# API, step plans to a `helios-worker`; see tests/src/fuzz/) for SECONDS in all, a third per
# target, with a random seed unless HELIOS_FUZZ_SEED is set. Prints every target's cases per
# outcome and per generator, and the seed, which reproduces a failure:
#
#   scripts/fuzz.sh [SECONDS]            # default 600
#   HELIOS_FUZZ_SEED=0x1234 scripts/fuzz.sh 60
#
# The case bound (HELIOS_FUZZ_CASES, per target) defaults to 500 per second of budget, above
# what a small machine reaches, so time ends the run. Uses the reference environment
# scripts/test.sh sets up (.venv-ref/) for the tiny model's weights when it is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

total="${1:-600}"
per_target=$(( total / 3 ))
[ "$per_target" -ge 1 ] || { echo "usage: $0 [SECONDS] (at least 3)" >&2; exit 2; }
seed="${HELIOS_FUZZ_SEED:-0x$(od -An -N8 -tx8 /dev/urandom | tr -d ' \n')}"
if [ -z "${HELIOS_PYTHON:-}" ] && [ -x .venv-ref/bin/python ]; then
  export HELIOS_PYTHON="$PWD/.venv-ref/bin/python"
fi

echo "fuzz: ${per_target} s per target, HELIOS_FUZZ_SEED=${seed}" >&2
cargo build --bins -p helios-coordinator -p helios-worker
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
status=0
HELIOS_FUZZ_SECONDS="$per_target" HELIOS_FUZZ_SEED="$seed" \
  cargo test -p helios-tests --test fuzz -- --nocapture >"$log" 2>&1 || status=$?
# The reports (a summary line, then indented counts) and any failure; the servers' logs stay
# in the log, shown whole when the run failed.
awk '/^fuzz [a-z]+: [0-9]+ cases/ {on=1} on && (/^fuzz / || /^ /) {print; next} {on=0}' "$log"
grep -E 'FAILED|panicked' "$log" || true
if [ "$status" -ne 0 ]; then
  echo "fuzz: FAILED (HELIOS_FUZZ_SEED=${seed}); the whole log:" >&2
  cat "$log" >&2
fi
exit "$status"
