#!/usr/bin/env python3
"""Tokenize texts with an independent implementation of a GGUF file's tokenizer.

This is a test oracle for Helios' own GGUF tokenizer: it rebuilds the
tokenizer described by the GGUF metadata (``tokenizer.ggml.*``) with the
Hugging Face ``transformers`` GGUF tokenizer converter, which produces a
``tokenizers.Tokenizer`` (HF's Rust tokenizers library), and encodes each text
with ``add_special_tokens=False`` (no BOS/EOS is added; special tokens written
literally in the text, e.g. ``<|im_start|>``, are still matched whole).

Why not ``AutoTokenizer.from_pretrained(dir, gguf_file=name)``?  In the
transformers versions tested (4.57.6 and 5.24.0) that entry point imports
``torch`` to read the GGUF header, even when only the tokenizer is wanted.
To stay torch-free we read the metadata ourselves with the ``gguf`` package
(exactly the keys transformers' own reader would extract) and hand them to
transformers' torch-free converter ``convert_gguf_tokenizer``.  The BPE /
unigram logic, the byte-level alphabet and the special-token handling are
therefore all transformers' + tokenizers', not ours.

One documented supplement: for the llama.cpp pre-tokenizer types that split
every digit on its own (``\\p{N}`` as the first regex: smollm, starcoder,
refact, command-r, codeshell, exaone, minerva) transformers has no split rule
and falls back to the plain GPT-2 byte-level regex.  The original HF
``tokenizer.json`` files of those models use ``Digits(individual_digits=True)``
before ``ByteLevel``, and llama.cpp does the same, so we prepend that step.

Usage:
    python3 tests/reference/gguf_tokenize.py --gguf models/X.gguf --texts-json texts.json

``texts.json`` holds a JSON array of strings (``-`` reads it from stdin).
Prints one JSON object to stdout: ``{"ids": [[...], ...]}``, one list per text.

pip packages needed (see requirements.txt for tested pins):
    numpy, gguf, tokenizers, transformers   (torch is NOT needed)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# transformers warns on import that torch is missing; we do not need torch.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# llama.cpp pre-tokenizer names whose first split regex is "\p{N}" (one digit
# per piece), which transformers' GGUF converter does not reproduce.
_DIGIT_SPLIT_PRE_TYPES = frozenset(
    {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
)

# GGUF metadata key (after "tokenizer.") -> name transformers' converter expects.
# Mirrors transformers' GGUF_TOKENIZER_MAPPING["tokenizer"].
_TOKENIZER_KEYS = {
    "ggml.model": "tokenizer_type",
    "ggml.pre": "pre_tokenizer_type",
    "ggml.tokens": "tokens",
    "ggml.scores": "scores",
    "ggml.token_type": "token_type",
    "ggml.merges": "merges",
    "ggml.precompiled_charsmap": "precompiled_charsmap",
    "ggml.bos_token_id": "bos_token_id",
    "ggml.eos_token_id": "eos_token_id",
    "ggml.unknown_token_id": "unk_token_id",
    "ggml.padding_token_id": "pad_token_id",
    "ggml.add_space_prefix": "add_prefix_space",
}


def read_gguf_tokenizer_dict(path: str) -> tuple[str, dict]:
    """Return (architecture, tokenizer_dict) from a GGUF file's metadata."""
    import gguf

    reader = gguf.GGUFReader(path)
    fields = reader.fields
    if "general.architecture" not in fields:
        raise ValueError(f"{path}: no general.architecture in GGUF metadata")
    architecture = fields["general.architecture"].contents()
    tokenizer_dict = {}
    for key, name in _TOKENIZER_KEYS.items():
        field = fields.get(f"tokenizer.{key}")
        if field is not None:
            tokenizer_dict[name] = field.contents()
    if "tokens" not in tokenizer_dict or "tokenizer_type" not in tokenizer_dict:
        raise ValueError(f"{path}: GGUF metadata has no tokenizer.ggml.model/tokens")
    return architecture, tokenizer_dict


def _convert(architecture: str, tokenizer_dict: dict):
    """Call transformers' GGUF tokenizer converter (its location moved in 5.x)."""
    try:  # transformers >= 5
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
        )
    except ImportError:  # transformers 4.x
        from transformers.integrations.ggml import convert_gguf_tokenizer
    tokenizer, _extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
    return tokenizer


def build_tokenizer(path: str):
    """Build a ``tokenizers.Tokenizer`` equivalent to the GGUF's tokenizer."""
    from tokenizers import pre_tokenizers

    architecture, tokenizer_dict = read_gguf_tokenizer_dict(path)
    tokenizer = _convert(architecture, tokenizer_dict)
    if tokenizer_dict.get("pre_tokenizer_type") in _DIGIT_SPLIT_PRE_TYPES:
        steps = [pre_tokenizers.Digits(individual_digits=True)]
        if tokenizer.pre_tokenizer is not None:
            steps.append(tokenizer.pre_tokenizer)
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    return tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", required=True, help="path of the GGUF model file")
    parser.add_argument(
        "--texts-json",
        required=True,
        help="JSON file holding an array of strings ('-' for stdin)",
    )
    args = parser.parse_args(argv)

    if args.texts_json == "-":
        texts = json.load(sys.stdin)
    else:
        with open(args.texts_json, encoding="utf-8") as f:
            texts = json.load(f)
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        parser.error("--texts-json must contain a JSON array of strings")

    tokenizer = build_tokenizer(args.gguf)
    ids = [tokenizer.encode(t, add_special_tokens=False).ids for t in texts]
    json.dump({"ids": ids}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
