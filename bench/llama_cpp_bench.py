#!/usr/bin/env python3
"""llama.cpp's figures for the engine benchmark, measured the same way as `helios-bench engine`.

Prefill: tokens/s of evaluating one prompt of --prompt-tokens ids. Decode: tokens/s of greedy
decoding after a 16-token prompt, one sequence (llama-cpp-python evaluates one sequence at a
time). Token ids are the same deterministic pseudo-random ids helios-bench uses.

Needs llama-cpp-python (bench/setup-llama-cpp.sh builds it into bench/.llama-venv).
Prints one JSON object.
"""

import argparse
import json
import statistics
import time

import numpy as np
from llama_cpp import Llama


def prompt(n, salt, vocab):
    return [((i * 7919 + salt * 104_729 + 17) % (vocab - 1000) + 500) for i in range(n)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()

    llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads,
                n_ctx=1024, n_batch=512, verbose=False)
    vocab = llm.n_vocab()

    llm.reset()
    llm.eval(prompt(a.prompt_tokens, 99, vocab))  # warm-up
    prefill = []
    for r in range(a.repeat):
        llm.reset()
        p = prompt(a.prompt_tokens, r, vocab)
        t = time.perf_counter()
        llm.eval(p)
        prefill.append(len(p) / (time.perf_counter() - t))

    decode = []
    for r in range(min(a.repeat, 3)):
        llm.reset()
        llm.eval(prompt(16, 1000 + r, vocab))
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([tok])  # the first generated token's step is not timed, as in helios-bench
        t = time.perf_counter()
        for _ in range(a.decode_tokens - 1):
            tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([tok])
        decode.append((a.decode_tokens - 1) / (time.perf_counter() - t))

    print(json.dumps({
        "engine": "llama.cpp (llama-cpp-python 0.3.36)",
        "threads": a.threads,
        "prefill_tokens": a.prompt_tokens,
        "prefill_tokens_per_s": statistics.median(prefill),
        "decode_batch1_tokens_per_s": statistics.median(decode),
    }))


if __name__ == "__main__":
    main()
