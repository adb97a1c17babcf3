#!/usr/bin/env bash
# Two builds of Helios compared on one machine in one run, alternately, because a single run
# on a shared machine moves more than most changes do (bench/RESULTS.md, "One transport-neutral
# core: before and after"):
#
#   bench/run-ab-bench.sh BEFORE_DIR AFTER_DIR
#
# Each folder holds the release binaries of one build (helios, helios-worker, helios-bench),
# e.g. copied out of target/release after `cargo build --release --bins` at each commit.
#   1. coordinator overhead (`helios-bench overhead --seqs 1,64,256 --workers 1,3`), rounds
#      before/after, before/after;
#   2. end to end (`helios serve` at tp 1 and 3; `helios-bench serve`, 64 in / 64 out,
#      concurrency 1 and 16), rounds before/after, before/after, after/before;
#   3. each coordinator with each worker, tp 1, concurrency 1, three rounds (mean TPOT).
set -euo pipefail
[[ $# == 2 ]] || { echo "usage: $0 BEFORE_DIR AFTER_DIR" >&2; exit 2; }
before=$(cd "$1" && pwd)
after=$(cd "$2" && pwd)
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
scripts/fetch-model.sh >/dev/null
machine_line
echo

dir_of() { if [[ $1 == before ]]; then echo "$before"; else echo "$after"; fi; }

# 1. Overhead: one JSON report per round and build.
for which in before after before after; do
  echo "$which $("$(dir_of $which)/helios-bench" overhead --seqs 1,64,256 --workers 1,3 --steps 1000 --json)" \
    >>"$work/overhead.txt"
done

# One load on the server at $GRPC_ADDR: `load CONCURRENCY REQUESTS LABEL` appends a JSON line.
load() {
  "$after/helios-bench" serve --url "$GRPC_ADDR" --concurrency "$1" --num-requests "$2" \
    --input-len 64 --output-len 64 --ignore-eos --warmup "$1" --json |
    python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; print(json.dumps(r))' "$3" \
      >>"$work/runs.jsonl"
}
serve_with() { # COORDINATOR_DIR WORKER_DIR TP
  HELIOS_BIN="$1/helios" HELIOS_WORKER_BIN="$2/helios-worker" start_helios --tp "$3"
}

# 2. End to end.
round=0
for which in before after before after after before; do
  round=$((round + 1))
  d=$(dir_of $which)
  for tp in 1 3; do
    serve_with "$d" "$d" "$tp"
    # As bench/run-serving-bench.sh: 4 requests at concurrency 1, 2 per client at 16.
    for c in 1 16; do load "$c" $((c == 1 ? 4 : 2 * c)) "e2e $(((round + 1) / 2)) $which"; done
    stop_server
  done
done

# 3. Crossed coordinators and workers.
for round in 1 2 3; do
  for coord in before after; do
    for worker in before after; do
      serve_with "$(dir_of $coord)" "$(dir_of $worker)" 1
      load 1 6 "cross $round $coord $worker"
      stop_server
    done
  done
done

check_runs "$work/runs.jsonl"
python3 - "$work/overhead.txt" "$work/runs.jsonl" <<'PY'
import json, sys
from collections import defaultdict
runs = [l.split(" ", 1) for l in open(sys.argv[1]) if l.strip()]
runs = [(w, json.loads(j)) for w, j in runs]
print("Coordinator overhead, µs per step (rounds alternate)")
print("| seqs | ranks | clients | " + " | ".join(w for w, _ in runs) + " |")
print("|---|---|---|" + "---|" * len(runs))
for e in runs[0][1]["end_to_end"]:
    key = (e["seqs"], e["workers"], e["clients"])
    cells = [next(x for x in r["end_to_end"] if (x["seqs"], x["workers"], x["clients"]) == key)
             for _, r in runs]
    print(f"| {key[0]} | {key[1]} | {key[2]} | " + " | ".join(f"{c['us_per_step']:.1f}" for c in cells) + " |")
print()
print("schedule + apply, 256 sequences, µs per step by context:",
      "; ".join(f"{w} " + " / ".join(f"{b['schedule_apply_us']:.1f}" for b in r["breakdown"] if b["seqs"] == 256)
                for w, r in runs))
print()
lines = [json.loads(l) for l in open(sys.argv[2]) if l.strip()]
e2e = [r for r in lines if r["label"].startswith("e2e")]
labels = list(dict.fromkeys(r["label"] for r in e2e))
print("End to end, output tok/s (rounds: before/after, before/after, after/before)")
print("| tp | concurrency | " + " | ".join(l.split()[2] for l in labels) + " |")
print("|---|---|" + "---|" * len(labels))
for tp in (1, 3):
    for c in (1, 16):
        cells = [next(r for r in e2e if r["label"] == l and r["tensor_parallel_size"] == tp
                      and r["concurrency"] == c) for l in labels]
        print(f"| {tp} | {c} | " + " | ".join(f"{r['output_throughput']:.1f}" for r in cells) + " |")
print()
tpot = defaultdict(list)
for r in lines:
    if r["label"].startswith("cross"):
        _, _, coord, worker = r["label"].split()
        tpot[(coord, worker)].append(r["mean_tpot_ms"])
print("Crossed, tp 1, concurrency 1: mean TPOT (ms) over three rounds")
for (coord, worker), v in tpot.items():
    print(f"  coordinator {coord}, worker {worker}: {sum(v) / len(v):.2f}  ({', '.join(f'{x:.2f}' for x in v)})")
PY
