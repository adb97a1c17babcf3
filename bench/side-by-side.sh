#!/usr/bin/env bash
# Helios beside llama.cpp's server on one machine, in one run (bench/RESULTS.md, "Side by side
# with llama.cpp"): the same SmolLM2-135M-Instruct Q4_1 GGUF, the same load over OpenAI HTTP.
#
#   Helios at tp 1 and tp 3 (`helios serve`, its OpenAI-compatible API), and llama-cpp-python's
#   server (`python -m llama_cpp.server`, built once by bench/setup-llama-cpp.sh: ~25 minutes on
#   2 cores, so never in CI), each driven by `helios-bench serve --protocol openai` at
#   concurrency 1, 4 and 16 with 128 tokens in and 128 out.
#
# Sampling is pinned for both: greedy (temperature 0), no top-k/top-p/min-p cut, no repetition
# penalty (llama.cpp's server otherwise applies repeat_penalty 1.1 and min_p 0.05), and both
# generate the full 128 tokens (`--ignore-eos`: a shorter answer counts as a failed request):
# Helios ignores EOS (`ignore_eos`); llama.cpp, which has no such option and ignores the field,
# gets its end-of-text tokens banned through `logit_bias`. Both use the machine's cores
# (llama.cpp: see --n_threads below; Helios: its workers share them).
#
# Usage: bench/side-by-side.sh [CONCURRENCIES] (default "1 4 16").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
CONCURRENCIES=${1:-"1 4 16"}
IN=128
OUT=128
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
scripts/fetch-model.sh >/dev/null
bench/setup-llama-cpp.sh
cargo build --release --bins -q
machine_line

# Waits until $1 answers GET /v1/models (the server's process is $server).
wait_http() {
  for _ in $(seq 900); do
    if curl -sf -m 2 "$1/v1/models" >/dev/null 2>&1; then
      return 0
    fi
    if ! kill -0 "$server" 2>/dev/null; then
      cat "$work/server.err" >&2
      return 1
    fi
    sleep 0.2
  done
  echo "no answer from $1" >&2
  return 1
}

# Drives the server at $2 (label $1) with extra request fields $3 at every concurrency.
drive() {
  local label=$1 url=$2 extra=$3
  for c in $CONCURRENCIES; do
    # 4 requests alone, 2 per client otherwise; one warm-up request per client.
    local n=$((c == 1 ? 4 : 2 * c))
    echo "$label, concurrency $c: $n requests" >&2
    target/release/helios-bench serve --protocol openai --url "$url" --tokenizer "$MODEL" \
      --concurrency "$c" --num-requests "$n" --warmup "$c" --input-len "$IN" --output-len "$OUT" \
      --temperature 0 --ignore-eos --extra-body "$extra" --no-progress --json |
      python3 -c "import json,sys; r=json.load(sys.stdin); r['server']='$label'; print(json.dumps(r))" \
        >>"$work/runs.jsonl"
  done
}

SAMPLING='"top_p": 1.0, "top_k": 0, "min_p": 0.0, "presence_penalty": 0.0, "frequency_penalty": 0.0'

for tp in 1 3; do
  start_helios --model "$MODEL" --tp "$tp"
  wait_http "$HTTP_URL"
  drive "helios tp $tp" "$HTTP_URL" "{$SAMPLING, \"repetition_penalty\": 1.0}"
  stop_server
done

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
# Decode on all cores but one (prefill on all): the server's event loop and the client need CPU
# for every streamed token, and llama.cpp's threads wait for each other in spin barriers. On the
# 2-core machine of RESULTS.md, decode took 31 ms/token at --n_threads 2 and 20 ms at 1 under
# this load (12 ms at 2 threads with curl as the only client). --interrupt_requests False: by
# default a new request interrupts the one being streamed (its client gets a truncated answer);
# off, requests wait their turn (llama-cpp-python's server runs one at a time).
threads=$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))
start_server bench/.llama-venv/bin/python -m llama_cpp.server --model "$MODEL" --n_ctx 4096 \
  --n_threads "$threads" --n_threads_batch "$(nproc)" --interrupt_requests False \
  --host 127.0.0.1 --port "$port"
wait_http "http://127.0.0.1:$port"
# SmolLM2's end-of-text tokens: <|endoftext|> (0) and <|im_end|> (2).
drive "llama.cpp" "http://127.0.0.1:$port" \
  "{$SAMPLING, \"repeat_penalty\": 1.0, \"logit_bias\": {\"0\": -100, \"2\": -100}}"
stop_server

python3 - "$work/runs.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
llama = {r["concurrency"]: r["output_throughput"] for r in rows if r["server"] == "llama.cpp"}
print()
print("Side by side, SmolLM2-135M-Instruct Q4_1, OpenAI HTTP, 128 tokens in / 128 out, greedy, closed loop")
print("| server | concurrency | requests | failed | output tok/s | vs llama.cpp | mean TTFT (ms) | mean TPOT (ms) | p99 E2E (ms) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    base = llama.get(r["concurrency"])
    ratio = f"{r['output_throughput'] / base:.2f}×" if base else "–"
    print(f"| {r['server']} | {r['concurrency']} | {r['completed']} | {r['failed']} | {r['output_throughput']:.1f} "
          f"| {ratio} | {r['ttft_ms']['mean']:.1f} | {r['tpot_ms']['mean']:.1f} | {r['e2el_ms']['p99']:.1f} |")
PY
