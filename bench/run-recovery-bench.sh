#!/usr/bin/env bash
# How long a lost worker pauses a stream: `helios serve --tp 3` on the default model, one long
# greedy stream, and rank 1's process killed (SIGKILL) or stopped (SIGSTOP) after 32 tokens. The
# pause (kill to the stream's next token) is split with the coordinator's and workers' JSON log
# lines into detection (kill to "lost a rank"), respawn (to the new worker's "listening"), load
# and communicator rebuild (to "replica rebuilt") and recompute (to the next token). Each row also
# checks the stream's tokens against an undisturbed run.
#
# Usage: bench/run-recovery-bench.sh [RUNS]   (default 5 of each signal)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
runs=${1:-5}
py=.venv-ref/bin/python
[[ -x $py ]] || py=python3
prepare

# The seconds since the epoch of the JSON log lines in FILE that mark the recovery: the first
# "lost a rank", the last "listening" (the respawned worker's), the first "replica rebuilt".
recovery_times() {
  "$py" - "$1" <<'PY'
import json, sys, datetime
first, last = {}, {}
for line in open(sys.argv[1]):
    try:
        o = json.loads(line)
    except ValueError:
        continue
    msg = o.get("message", "")
    for mark in ("lost a rank", "listening", "replica rebuilt"):
        if msg.startswith(mark):
            t = datetime.datetime.fromisoformat(o["timestamp"].replace("Z", "+00:00")).timestamp()
            first.setdefault(mark, t)
            last[mark] = t
print(first["lost a rank"], last["listening"], first["replica rebuilt"])
PY
}

tokens=96
echo "| signal | run | detection (ms) | respawn (ms) | load + rebuild (ms) | recompute (ms) | pause (ms) | median gap between tokens (ms) | tokens as undisturbed |"
echo "|---|---|---|---|---|---|---|---|---|"
for sig in SIGKILL SIGSTOP; do
  for run in $(seq "$runs"); do
    RUST_LOG=info start_helios --tp 3 --log-format json
    workers=$(cat "/proc/$server/task/"*/children | tr ' ' '\n' | grep . | sort -n)
    rank1=$(sed -n 2p <<<"$workers")
    undisturbed=$("$py" bench/recovery_bench.py "$GRPC_ADDR" 0 SIGCONT 100000 "$tokens")
    out=$("$py" bench/recovery_bench.py "$GRPC_ADDR" "$rank1" "$sig" 32 "$tokens")
    read -r lost listening rebuilt < <(recovery_times "$work/server.err")
    "$py" - "$sig" "$run" "$lost" "$listening" "$rebuilt" "$out" "$undisturbed" <<'PY'
import json, statistics, sys
sig, run, lost, listening, rebuilt = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:6])
out, ref = json.loads(sys.argv[6]), json.loads(sys.argv[7])
killed, times = out["killed_at"], out["token_times"]
after = next(t for t in times if t > killed)
gaps = [b - a for a, b in zip(times, times[1:])]
ms = lambda s: f"{s * 1e3:.0f}"
print(f"| {sig} | {run} | {ms(lost - killed)} | {ms(listening - lost)} | {ms(rebuilt - listening)} "
      f"| {ms(after - rebuilt)} | {ms(after - killed)} | {statistics.median(gaps) * 1e3:.1f} "
      f"| {out['token_ids'] == ref['token_ids']} |")
PY
    stop_server
  done
done
