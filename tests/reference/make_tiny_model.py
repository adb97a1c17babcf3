#!/usr/bin/env python3
"""Write a tiny random Llama model in Hugging Face format, for tests.

Usage:
    python3 tests/reference/make_tiny_model.py DIR [--seed S] [--layers 4]
        [--hidden 64] [--heads 8] [--kv-heads 4] [--intermediate 160] [--tie]

Writes into DIR (created if needed):

* ``config.json`` — a ``LlamaForCausalLM`` config (rms_norm_eps 1e-5,
  rope_theta 10000, max_position_embeddings 512, bos 0, eos 1,
  torch_dtype float32, tie_word_embeddings as requested).
* ``model-00001-of-00002.safetensors`` and ``model-00002-of-00002.safetensors``
  — the F32 weights with HF tensor names, split across two shards (embedding
  and the first half of the layers, then the rest), written with plain NumPy
  (no safetensors package), plus ``model.safetensors.index.json`` whose
  ``weight_map`` names the shard of every tensor. ``lm_head.weight`` is
  omitted with ``--tie``.
* ``tokenizer.json`` — a byte-level BPE tokenizer in the HF ``tokenizers``
  JSON format: ``<s>`` (id 0) and ``</s>`` (id 1) as special added tokens,
  the 256 byte-level symbols (ids 2..257, in byte order) and 42 merges of
  common English pairs (ids 258..299), ByteLevel pre-tokenizer
  (add_prefix_space false) and ByteLevel decoder; no post-processor, so
  encoding adds no BOS/EOS. Its full vocabulary (300) equals the config's
  ``vocab_size``.

Random weights (seeded NumPy generator, so output is byte-for-byte
deterministic for a given seed and shape options): every projection is
normal with std 1/sqrt(in_features), embeddings / lm_head normal with std
0.35 (so logits have a spread of a few units: neither flat nor one-hot),
RMSNorm weights 1 + 0.1 * normal.

Only NumPy is needed. Loading the tokenizer to check it needs ``tokenizers``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

SPECIAL_TOKENS = ["<s>", "</s>"]  # ids 0 and 1
BOS_ID, EOS_ID = 0, 1

# Merges in rank order, written in the byte-level alphabet (Ġ is a space,
# Ċ a newline). Each pair's parts must already be in the vocabulary.
MERGES = [
    "Ġ t", "h e", "i n", "r e", "o n", "Ġt he", "e r", "Ġ a", "a n", "o u",
    "e n", "Ġ s", "Ġ w", "a t", "i s", "o r", "e s", "Ġ o", "i t", "Ġ c",
    "e d", "n d", "Ġ b", "n g", "in g", "Ġ f", "Ġ h", "Ġ i", "Ġ m", "Ġ p",
    "Ġa nd", "Ġo f", "Ġt o", "Ġi n", "Ġi s", "l l", "e ll", "H ell", "Hell o",
    "Ġw or", "Ġ Ġ", "Ċ Ċ",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable unicode character map (the ByteLevel alphabet)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


def build_tokenizer() -> dict:
    """Return the tokenizer.json content (a dict) of the tiny byte-level BPE."""
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    byte_chars = bytes_to_unicode()
    for b in range(256):
        vocab[byte_chars[b]] = len(vocab)
    for merge in MERGES:
        left, right = merge.split(" ")
        if left not in vocab or right not in vocab:
            raise AssertionError(f"merge {merge!r} uses a token not yet in the vocabulary")
        if left + right in vocab:
            raise AssertionError(f"merge {merge!r} produces a duplicate token")
        vocab[left + right] = len(vocab)

    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": vocab[tok],
                "content": tok,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for tok in SPECIAL_TOKENS
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": MERGES,
        },
    }


def make_weights(args: argparse.Namespace, vocab_size: int) -> list[tuple[str, np.ndarray]]:
    """Random float32 weights with HF Llama names, in a fixed order."""
    rng = np.random.default_rng(args.seed)
    hidden, inter = args.hidden, args.intermediate
    head_dim = hidden // args.heads
    q_out, kv_out = args.heads * head_dim, args.kv_heads * head_dim

    def linear(out_f: int, in_f: int) -> np.ndarray:
        return rng.normal(0.0, 1.0 / np.sqrt(in_f), size=(out_f, in_f))

    def norm() -> np.ndarray:
        return 1.0 + 0.1 * rng.normal(size=hidden)

    tensors = [("model.embed_tokens.weight", rng.normal(0.0, 0.35, size=(vocab_size, hidden)))]
    for i in range(args.layers):
        p = f"model.layers.{i}."
        tensors += [
            (p + "input_layernorm.weight", norm()),
            (p + "self_attn.q_proj.weight", linear(q_out, hidden)),
            (p + "self_attn.k_proj.weight", linear(kv_out, hidden)),
            (p + "self_attn.v_proj.weight", linear(kv_out, hidden)),
            (p + "self_attn.o_proj.weight", linear(hidden, q_out)),
            (p + "post_attention_layernorm.weight", norm()),
            (p + "mlp.gate_proj.weight", linear(inter, hidden)),
            (p + "mlp.up_proj.weight", linear(inter, hidden)),
            (p + "mlp.down_proj.weight", linear(hidden, inter)),
        ]
    tensors.append(("model.norm.weight", norm()))
    if not args.tie:
        tensors.append(("lm_head.weight", rng.normal(0.0, 0.35, size=(vocab_size, hidden))))
    return [(name, arr.astype("<f4")) for name, arr in tensors]


def write_safetensors(path: str, tensors: list[tuple[str, np.ndarray]]) -> int:
    """Write F32 tensors as a safetensors file; returns the data byte count."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, arr in tensors:
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # align the data to 8 bytes
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(np.uint64(len(header_bytes)).astype("<u8").tobytes())
        f.write(header_bytes)
        for _, arr in tensors:
            f.write(np.ascontiguousarray(arr, dtype="<f4").tobytes())
    os.replace(tmp, path)
    return offset


def write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a tiny random Llama model (HF format).")
    parser.add_argument("dir", help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=160)
    parser.add_argument("--tie", action="store_true", help="tie lm_head to the embedding")
    args = parser.parse_args(argv)

    if args.layers < 1 or args.hidden < 1 or args.intermediate < 1:
        parser.error("--layers, --hidden and --intermediate must be positive")
    if args.heads < 1 or args.hidden % args.heads:
        parser.error("--hidden must be a multiple of --heads")
    if args.kv_heads < 1 or args.heads % args.kv_heads:
        parser.error("--heads must be a multiple of --kv-heads")
    if (args.hidden // args.heads) % 2:
        parser.error("head_dim (hidden / heads) must be even for RoPE")

    os.makedirs(args.dir, exist_ok=True)
    tokenizer = build_tokenizer()
    vocab_size = len(tokenizer["model"]["vocab"])

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": args.hidden,
        "intermediate_size": args.intermediate,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "vocab_size": vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "tie_word_embeddings": bool(args.tie),
        "torch_dtype": "float32",
    }

    tensors = make_weights(args, vocab_size)
    # Shard 1: embedding + first half of the layers; shard 2: the rest
    # (never empty: it always holds model.norm.weight).
    first_half = (args.layers + 1) // 2

    def in_first_shard(name: str) -> bool:
        if name == "model.embed_tokens.weight":
            return True
        return name.startswith("model.layers.") and int(name.split(".")[2]) < first_half

    shards = [
        ("model-00001-of-00002.safetensors", [t for t in tensors if in_first_shard(t[0])]),
        ("model-00002-of-00002.safetensors", [t for t in tensors if not in_first_shard(t[0])]),
    ]
    total = 0
    weight_map = {}
    for filename, part in shards:
        total += write_safetensors(os.path.join(args.dir, filename), part)
        weight_map.update({name: filename for name, _ in part})

    write_json(os.path.join(args.dir, "config.json"), config)
    write_json(
        os.path.join(args.dir, "model.safetensors.index.json"),
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
    )
    write_json(os.path.join(args.dir, "tokenizer.json"), tokenizer)
    print(json.dumps({"dir": args.dir, "vocab_size": vocab_size, "tensors": len(tensors)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
