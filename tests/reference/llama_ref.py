#!/usr/bin/env python3
"""Independent NumPy float64 reference forward pass for Llama-family models.

This is a test oracle for the Helios Rust engine. It deliberately shares no
code (and, for GGUF, not even the RoPE convention) with the engine:

* Weights come from either
  - a Hugging Face model directory: ``config.json`` (architectures
    ``LlamaForCausalLM`` / ``MistralForCausalLM``) plus ``model.safetensors``
    or the shards listed in ``model.safetensors.index.json``; dtypes F32, F16
    and BF16. Safetensors files are parsed with plain NumPy (8-byte
    little-endian header length, JSON header, raw little-endian data), or
  - a GGUF file with ``general.architecture == "llama"``, read with the PyPI
    ``gguf`` package; every tensor is dequantized to float with
    ``gguf.quants.dequantize`` (F32, F16, BF16, Q4_0/1, Q5_0/1, Q8_0,
    K-quants, ...). Hyper-parameters come from the ``llama.*`` metadata.
  All weights are converted to float64 and kept in memory only; matrices are
  ``[out_features, in_features]`` as in HF.

* RoPE convention:
  - HF weights use HF's ``rotate_half`` convention: dimension ``i`` is
    rotated together with dimension ``i + head_dim/2``.
  - GGUF weights: llama.cpp's converter permuted the rows of Q and K so that
    llama.cpp's NORM rope, which rotates adjacent pairs ``(x[2i], x[2i+1])``,
    reproduces the HF result. We therefore apply the adjacent-pair
    (interleaved) rotation to the weights as stored, and do NOT un-permute.
    Using the other convention than a straightforward HF-style engine is
    intentional: it keeps the reference independent of the engine's choice.
  Supported: ``rope_theta``; HF ``rope_scaling`` (or transformers-5
  ``rope_parameters``) of type ``llama3`` and ``linear``; GGUF
  ``llama.rope.scaling.type == linear`` and a ``rope_freqs.weight`` tensor
  (llama.cpp's encoding of llama3 scaling).

* Model: token embedding; per layer RMSNorm -> GQA self-attention (causal
  mask, optional Mistral sliding window) -> o_proj -> residual -> RMSNorm ->
  SwiGLU MLP ``down(silu(gate(x)) * up(x))`` -> residual; final RMSNorm;
  lm_head (tied to the embedding when ``tie_word_embeddings`` is true, or when
  a GGUF file has no ``output.weight``). RMSNorm is
  ``x / sqrt(mean(x^2) + eps) * w``. Everything is computed in float64.

Commands (each prints exactly one JSON object to stdout):

  logits   --model PATH --ids 1,2,3 [--all-positions]
      {"logits": [...]}  logits of the last position (vocab floats), or with
      --all-positions {"logits": [[...], ...]} for every position.

  generate --model PATH --ids 1,2,3 --max-new-tokens N [--eos ID ...]
      Greedy decoding with a KV cache (ties go to the lowest token id):
      {"generated_ids": [...], "logprobs": [...], "top2_gaps": [...]}
      logprobs[i] is the log-softmax of the chosen token at step i and
      top2_gaps[i] the difference between the top-1 and top-2 logits. Stops
      after emitting any --eos id, or after N tokens.

  score    --model PATH --ids PROMPT_IDS --continuation IDS
      Teacher-forced: for every continuation position i, the argmax and the
      top-2 logit gap of the distribution that predicts continuation[i]:
      {"argmax": [...], "top2_gaps": [...], "logprobs": [...]}
      (logprobs[i] is the log-softmax of continuation[i] itself).

PATH is an HF model directory or a ``.gguf`` file. Example:

  python3 tests/reference/llama_ref.py generate \\
      --model models/SmolLM2-135M-Instruct.Q4_1.gguf \\
      --ids 1,4093,198 --max-new-tokens 8 --eos 2

pip packages: numpy (always), gguf (GGUF models only). See requirements.txt.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass

# The matrices here are small (matrix-vector products while decoding), so BLAS
# threads buy little, and on a busy 2-core machine (e.g. cargo building next
# to us) they make things several times slower. Default to one thread; an
# explicit setting in the environment still wins. Must precede the numpy import.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402

# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    # "interleaved": rotate (x[2i], x[2i+1])  (GGUF / llama.cpp NORM rope)
    # "half":        rotate (x[i], x[i+d/2])   (HF rotate_half)
    rope_style: str
    rope_scaling: dict | None = None
    # Per-frequency divisors (GGUF rope_freqs.weight), length head_dim/2.
    rope_freq_factors: np.ndarray | None = None
    sliding_window: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False


def _hf_rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from an HF config (transformers 4 or 5 style)."""
    theta = cfg.get("rope_theta")
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")
    if isinstance(params, dict):  # transformers >= 5
        theta = params.get("rope_theta", theta)
        if scaling is None and params.get("rope_type", "default") != "default":
            scaling = params
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            scaling = None
        elif kind not in ("llama3", "linear"):
            raise NotImplementedError(f"rope scaling type {kind!r} is not supported")
        else:
            scaling = dict(scaling, rope_type=kind)
    return float(10000.0 if theta is None else theta), scaling


# ---------------------------------------------------------------------------
# Weight loading: HF safetensors (plain NumPy)
# ---------------------------------------------------------------------------

_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": None}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Parse one safetensors file into float64 arrays, without the safetensors package."""
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    if raw.size < 8:
        raise ValueError(f"{path}: too small for a safetensors file")
    header_len = int(raw[:8].view("<u8")[0])
    header = json.loads(bytes(raw[8 : 8 + header_len]).decode("utf-8"))
    base = 8 + header_len
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape = info["dtype"], tuple(info["shape"])
        start, end = info["data_offsets"]
        buf = raw[base + start : base + end]
        if dtype not in _ST_DTYPES:
            raise NotImplementedError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        if dtype == "BF16":
            # bfloat16 is the upper half of a float32.
            arr = (buf.view("<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = buf.view(_ST_DTYPES[dtype])
        if arr.size != math.prod(shape):
            raise ValueError(f"{path}: tensor {name} size does not match its shape {shape}")
        out[name] = arr.reshape(shape).astype(np.float64)
    return out


def load_hf(model_dir: str) -> tuple[Config, dict[str, np.ndarray]]:
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    archs = cfg.get("architectures") or []
    if not any(a in ("LlamaForCausalLM", "MistralForCausalLM") for a in archs):
        raise NotImplementedError(f"unsupported architectures {archs}")

    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single_path = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif os.path.exists(single_path):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{model_dir}: no model.safetensors(.index.json)")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(read_safetensors(os.path.join(model_dir, name)))

    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    theta, scaling = _hf_rope_settings(cfg)
    config = Config(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_style="half",
        rope_scaling=scaling,
        sliding_window=cfg.get("sliding_window"),
        max_position_embeddings=cfg.get("max_position_embeddings"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
    )

    def take(name: str, required: bool = True) -> np.ndarray | None:
        if name not in tensors:
            if required:
                raise KeyError(f"{model_dir}: missing tensor {name}")
            return None
        return tensors.pop(name)

    w: dict[str, np.ndarray] = {"embed": take("model.embed_tokens.weight")}
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for key, name in (
            ("attn_norm", "input_layernorm.weight"),
            ("ffn_norm", "post_attention_layernorm.weight"),
            ("q", "self_attn.q_proj.weight"),
            ("k", "self_attn.k_proj.weight"),
            ("v", "self_attn.v_proj.weight"),
            ("o", "self_attn.o_proj.weight"),
            ("gate", "mlp.gate_proj.weight"),
            ("up", "mlp.up_proj.weight"),
            ("down", "mlp.down_proj.weight"),
        ):
            w[f"{i}.{key}"] = take(p + name)
        for key, name in (  # optional biases (attention_bias / mlp_bias)
            ("q_b", "self_attn.q_proj.bias"),
            ("k_b", "self_attn.k_proj.bias"),
            ("v_b", "self_attn.v_proj.bias"),
            ("o_b", "self_attn.o_proj.bias"),
            ("gate_b", "mlp.gate_proj.bias"),
            ("up_b", "mlp.up_proj.bias"),
            ("down_b", "mlp.down_proj.bias"),
        ):
            b = take(p + name, required=False)
            if b is not None:
                w[f"{i}.{key}"] = b
    w["norm"] = take("model.norm.weight")
    lm_head = take("lm_head.weight", required=False)
    if config.tie_word_embeddings:
        w["lm_head"] = w["embed"]
    elif lm_head is None:
        raise KeyError(f"{model_dir}: lm_head.weight missing and tie_word_embeddings is false")
    else:
        w["lm_head"] = lm_head
    return config, w


# ---------------------------------------------------------------------------
# Weight loading: GGUF (gguf package)
# ---------------------------------------------------------------------------


def load_gguf(path: str) -> tuple[Config, dict[str, np.ndarray]]:
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - environment problem
        raise SystemExit("llama_ref.py: the 'gguf' pip package is needed for GGUF models") from e

    reader = gguf.GGUFReader(path)
    fields = reader.fields

    def meta(key: str, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = meta("general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"{path}: architecture {arch!r}, expected 'llama'")

    tensors = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        # GGUF shapes are in ggml "ne" order (fastest dimension first); the
        # row-major NumPy shape is the reverse, i.e. [out_features, in_features].
        shape = tuple(int(d) for d in reversed(t.shape))
        tensors[t.name] = np.asarray(arr, dtype=np.float64).reshape(shape)

    hidden = int(meta("llama.embedding_length"))
    heads = int(meta("llama.attention.head_count"))
    head_dim = int(meta("llama.attention.key_length", hidden // heads))
    scaling = None
    if meta("llama.rope.scaling.type", "none") == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta("llama.rope.scaling.factor"))}
    elif meta("llama.rope.scaling.type", "none") not in ("none", None):
        raise NotImplementedError(f"rope scaling {meta('llama.rope.scaling.type')!r}")
    rope_dims = int(meta("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise NotImplementedError("partial rotary embeddings are not supported")

    has_output = "output.weight" in tensors
    config = Config(
        vocab_size=int(tensors["token_embd.weight"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(meta("llama.feed_forward_length")),
        num_layers=int(meta("llama.block_count")),
        num_heads=heads,
        num_kv_heads=int(meta("llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(meta("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(meta("llama.rope.freq_base", 10000.0)),
        rope_style="interleaved",
        rope_scaling=scaling,
        rope_freq_factors=tensors.pop("rope_freqs.weight", None),
        max_position_embeddings=meta("llama.context_length"),
        tie_word_embeddings=not has_output,
    )

    w: dict[str, np.ndarray] = {"embed": tensors.pop("token_embd.weight")}
    for i in range(config.num_layers):
        p = f"blk.{i}."
        for key, name in (
            ("attn_norm", "attn_norm.weight"),
            ("ffn_norm", "ffn_norm.weight"),
            ("q", "attn_q.weight"),
            ("k", "attn_k.weight"),
            ("v", "attn_v.weight"),
            ("o", "attn_output.weight"),
            ("gate", "ffn_gate.weight"),
            ("up", "ffn_up.weight"),
            ("down", "ffn_down.weight"),
        ):
            w[f"{i}.{key}"] = tensors.pop(p + name)
        for key, name in (("q_b", "attn_q.bias"), ("k_b", "attn_k.bias"),
                          ("v_b", "attn_v.bias"), ("o_b", "attn_output.bias")):
            if p + name in tensors:
                w[f"{i}.{key}"] = tensors.pop(p + name)
    w["norm"] = tensors.pop("output_norm.weight")
    w["lm_head"] = tensors.pop("output.weight") if has_output else w["embed"]
    return config, w


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x: np.ndarray) -> np.ndarray:
    # sigmoid(x) == 0.5 * (1 + tanh(x / 2)); this form never overflows.
    return x * (0.5 * (1.0 + np.tanh(0.5 * x)))


def rope_inv_freq(cfg: Config) -> np.ndarray:
    """Per-pair inverse frequencies (length head_dim/2), including scaling."""
    d = cfg.head_dim
    inv_freq = cfg.rope_theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
    if cfg.rope_freq_factors is not None:
        inv_freq = inv_freq / cfg.rope_freq_factors.astype(np.float64)
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    factor = float(s["factor"])
    if s["rope_type"] == "linear":
        return inv_freq / factor
    # llama3 (transformers' _compute_llama3_parameters)
    low = float(s["low_freq_factor"])
    high = float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_freq_wavelen = old_ctx / low
    high_freq_wavelen = old_ctx / high
    wavelen = 2.0 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotate x [heads, T, head_dim] by angles given as cos/sin [T, head_dim/2]."""
    out = np.empty_like(x)
    if style == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = b * cos + a * sin
    elif style == "half":
        h = x.shape[-1] // 2
        a, b = x[..., :h], x[..., h:]
        out[..., :h] = a * cos - b * sin
        out[..., h:] = b * cos + a * sin
    else:
        raise ValueError(f"unknown rope style {style!r}")
    return out


class KVCache:
    """Per-layer keys/values, each [kv_heads, seq, head_dim] (keys already rotated)."""

    def __init__(self, num_layers: int):
        self.k: list[np.ndarray | None] = [None] * num_layers
        self.v: list[np.ndarray | None] = [None] * num_layers
        self.length = 0

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = k, v
        else:
            self.k[layer] = np.concatenate([self.k[layer], k], axis=1)
            self.v[layer] = np.concatenate([self.v[layer], v], axis=1)
        return self.k[layer], self.v[layer]


class LlamaRef:
    def __init__(self, cfg: Config, weights: dict[str, np.ndarray]):
        if cfg.num_heads % cfg.num_kv_heads:
            raise ValueError("num_heads must be a multiple of num_kv_heads")
        self.cfg = cfg
        self.w = weights
        self.inv_freq = rope_inv_freq(cfg)
        self._check_shapes()

    def _check_shapes(self) -> None:
        c, w = self.cfg, self.w
        q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        expect = {
            "embed": (c.vocab_size, c.hidden_size),
            "norm": (c.hidden_size,),
            "lm_head": (c.vocab_size, c.hidden_size),
        }
        for i in range(c.num_layers):
            expect.update({
                f"{i}.attn_norm": (c.hidden_size,),
                f"{i}.ffn_norm": (c.hidden_size,),
                f"{i}.q": (q_out, c.hidden_size),
                f"{i}.k": (kv_out, c.hidden_size),
                f"{i}.v": (kv_out, c.hidden_size),
                f"{i}.o": (c.hidden_size, q_out),
                f"{i}.gate": (c.intermediate_size, c.hidden_size),
                f"{i}.up": (c.intermediate_size, c.hidden_size),
                f"{i}.down": (c.hidden_size, c.intermediate_size),
            })
        for name, shape in expect.items():
            if w[name].shape != shape:
                raise ValueError(f"weight {name}: shape {w[name].shape}, expected {shape}")

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self.w[name].T
        bias = self.w.get(name + "_b")
        return y if bias is None else y + bias

    def forward(self, ids: list[int], cache: KVCache) -> np.ndarray:
        """Run `ids` at positions cache.length.. and return final-normed hidden [T, hidden]."""
        c = self.cfg
        if any(not 0 <= t < c.vocab_size for t in ids):
            raise ValueError(f"token id out of range [0, {c.vocab_size})")
        T, start = len(ids), cache.length
        hd, nh, nkv = c.head_dim, c.num_heads, c.num_kv_heads
        group = nh // nkv

        pos = np.arange(start, start + T, dtype=np.float64)
        angles = pos[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(angles), np.sin(angles)

        # Causal (and optional sliding-window) mask over all cached keys.
        q_pos = np.arange(start, start + T)[:, None]
        k_pos = np.arange(start + T)[None, :]
        allowed = k_pos <= q_pos
        if c.sliding_window:
            allowed &= (q_pos - k_pos) < int(c.sliding_window)

        x = self.w["embed"][np.asarray(ids)]
        for i in range(c.num_layers):
            h = rms_norm(x, self.w[f"{i}.attn_norm"], c.rms_norm_eps)
            q = self._linear(h, f"{i}.q").reshape(T, nh, hd).transpose(1, 0, 2)
            k = self._linear(h, f"{i}.k").reshape(T, nkv, hd).transpose(1, 0, 2)
            v = self._linear(h, f"{i}.v").reshape(T, nkv, hd).transpose(1, 0, 2)
            q = apply_rope(q, cos, sin, c.rope_style)
            k = apply_rope(k, cos, sin, c.rope_style)
            k_all, v_all = cache.append(i, k, v)

            # Query head j uses KV head j // group (HF repeat_kv / llama.cpp).
            qg = q.reshape(nkv, group, T, hd)
            scores = np.einsum("kgtd,ksd->kgts", qg, k_all) / math.sqrt(hd)
            scores = np.where(allowed, scores, -np.inf)
            scores -= scores.max(axis=-1, keepdims=True)
            probs = np.exp(scores)
            probs /= probs.sum(axis=-1, keepdims=True)
            attn = np.einsum("kgts,ksd->kgtd", probs, v_all)
            attn = attn.reshape(nh, T, hd).transpose(1, 0, 2).reshape(T, nh * hd)
            x = x + self._linear(attn, f"{i}.o")

            h = rms_norm(x, self.w[f"{i}.ffn_norm"], c.rms_norm_eps)
            mlp = silu(self._linear(h, f"{i}.gate")) * self._linear(h, f"{i}.up")
            x = x + self._linear(mlp, f"{i}.down")
        cache.length += T
        return rms_norm(x, self.w["norm"], c.rms_norm_eps)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        return hidden @ self.w["lm_head"].T


def load_model(path: str) -> LlamaRef:
    if os.path.isdir(path):
        cfg, w = load_hf(path)
    elif path.endswith(".gguf") or _is_gguf(path):
        cfg, w = load_gguf(path)
    else:
        raise ValueError(f"{path}: neither an HF model directory nor a GGUF file")
    return LlamaRef(cfg, w)


def _is_gguf(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    m = logits.max(axis=-1, keepdims=True)
    return logits - m - np.log(np.exp(logits - m).sum(axis=-1, keepdims=True))


def top2_gap(logits: np.ndarray) -> float:
    top = np.partition(logits, -2)[-2:]
    return float(top[1] - top[0])


def cmd_logits(model: LlamaRef, ids: list[int], all_positions: bool) -> dict:
    hidden = model.forward(ids, KVCache(model.cfg.num_layers))
    if all_positions:
        return {"logits": model.logits(hidden).tolist()}
    return {"logits": model.logits(hidden[-1]).tolist()}


def cmd_generate(model: LlamaRef, ids: list[int], max_new: int, eos: set[int]) -> dict:
    cache = KVCache(model.cfg.num_layers)
    generated, logprobs, gaps = [], [], []
    if max_new <= 0:
        return {"generated_ids": generated, "logprobs": logprobs, "top2_gaps": gaps}
    logits = model.logits(model.forward(ids, cache)[-1])
    while True:
        token = int(np.argmax(logits))  # first maximum: ties go to the lowest id
        generated.append(token)
        logprobs.append(float(log_softmax(logits)[token]))
        gaps.append(top2_gap(logits))
        if token in eos or len(generated) >= max_new:
            break
        logits = model.logits(model.forward([token], cache)[-1])
    return {"generated_ids": generated, "logprobs": logprobs, "top2_gaps": gaps}


def cmd_score(model: LlamaRef, ids: list[int], continuation: list[int]) -> dict:
    if not continuation:
        return {"argmax": [], "top2_gaps": [], "logprobs": []}
    hidden = model.forward(ids + continuation[:-1], KVCache(model.cfg.num_layers))
    logits = model.logits(hidden[len(ids) - 1 :])  # row i predicts continuation[i]
    lp = log_softmax(logits)
    return {
        "argmax": [int(a) for a in np.argmax(logits, axis=-1)],
        "top2_gaps": [top2_gap(row) for row in logits],
        "logprobs": [float(lp[i, t]) for i, t in enumerate(continuation)],
    }


def parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from e
    return ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="NumPy float64 reference forward pass for Llama-family models "
        "(HF safetensors directory or GGUF file)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="HF model directory or .gguf file")
        p.add_argument("--ids", required=True, type=parse_ids, help="comma-separated prompt token ids")

    p = sub.add_parser("logits", help="logits of the last (or every) position")
    common(p)
    p.add_argument("--all-positions", action="store_true", help="emit logits for every position")

    p = sub.add_parser("generate", help="greedy decoding with a KV cache")
    common(p)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.add_argument("--eos", type=int, nargs="*", default=[], help="stop after emitting any of these ids")

    p = sub.add_parser("score", help="teacher-forced argmax / top-2 gaps of a continuation")
    common(p)
    p.add_argument("--continuation", required=True, type=parse_ids,
                   help="comma-separated continuation token ids")

    args = parser.parse_args(argv)
    if not args.ids:
        parser.error("--ids must contain at least one token id")

    model = load_model(args.model)
    if args.command == "logits":
        result = cmd_logits(model, args.ids, args.all_positions)
    elif args.command == "generate":
        result = cmd_generate(model, args.ids, args.max_new_tokens, set(args.eos))
    else:
        result = cmd_score(model, args.ids, args.continuation)
    json.dump(result, sys.stdout, allow_nan=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
