#!/usr/bin/env bash
# The prompt logprobs results of bench/RESULTS.md: what scoring every prompt token costs.
#
# `helios serve` on the default model at tp 1 and tp 3, gRPC, greedy, 512 prompt tokens and
# 1 generated (a prompt scored as evaluation harnesses score one), concurrency 1 and 4, with
# no prompt logprobs and with 5 most likely tokens per position; two rounds in turn so that the
# machine's drift spreads over both. The server runs without the prefix cache: a scored prompt
# is computed whole every time (the cache holds no logits), and so, here, is an unscored one
# (the load generator's prompts repeat from run to run, and would be read from the cache).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source bench/lib.sh
prepare

echo "| tp | concurrency | prompt logprobs | round | failed | prompt tok/s | mean TTFT ms | p99 TTFT ms |"
echo "|---|---|---|---|---|---|---|---|"
for tp in 1 3; do
  start_helios --model models/SmolLM2-135M-Instruct.Q4_1.gguf --tp "$tp" --no-prefix-caching
  for round in 1 2; do
    for c in 1 4; do
      for scored in none 5; do
        flags=()
        [[ "$scored" != none ]] && flags=(--prompt-logprobs "$scored")
        target/release/helios-bench serve --url "$GRPC_ADDR" --concurrency "$c" \
          --num-requests 8 --warmup 1 --input-len 512 --output-len 1 --ignore-eos \
          "${flags[@]}" --no-progress --json | python3 -c "
import json, sys
r = json.load(sys.stdin)
print(f'| $tp | $c | $scored | $round | {r[\"failed\"]} | {r[\"total_token_throughput\"] - r[\"output_throughput\"]:.0f} | {r[\"mean_ttft_ms\"]:.1f} | {r[\"p99_ttft_ms\"]:.1f} |')
"
      done
    done
  done
  stop_server
done
