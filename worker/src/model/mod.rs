//! The Llama-family model, sharded Megatron-style across tensor-parallel ranks.
//!
//! Shape of the code follows candle-transformers' llama: small structs (`Attention`, `Mlp`,
//! `Block`) loaded by HF tensor-name prefix. Each block is
//! `x += all_reduce(attn(norm(x)))`, `x += all_reduce(mlp(norm(x)))`. Embedding and norms are
//! replicated; the lm_head is split by vocabulary, each rank computing the logits of its slice
//! (see `crate::vocab_parallel`).

mod attention;
pub mod linear;
mod mlp;
mod rope;

use anyhow::{Context, Result};
use candle_core::quantized::QMatMul;
use candle_core::{DType, Tensor};

use self::attention::Attention;
use self::linear::{Linear, RowParallel};
use self::mlp::Mlp;
use self::rope::Rope;
use crate::batch::StepBatch;
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::kv_cache::KvCache;
use crate::weights::{LoadOptions, Split, Weights};

struct Block {
    input_norm: Tensor,
    attn: Attention,
    post_attn_norm: Tensor,
    mlp: Mlp,
}

pub struct Model {
    pub config: ModelConfig,
    pub dtype: DType,
    embed_tokens: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// The rows of this rank's slice of the vocabulary.
    lm_head: Linear,
    rope: Rope,
    eps: f64,
}

impl Model {
    /// Loads rank `rank` of `world`'s shard.
    pub fn load(w: &Weights, rank: usize, world: usize, opts: &LoadOptions) -> Result<Self> {
        let cfg = w.config().clone();
        cfg.validate_tp(world)?;
        let (hidden, inter, d) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (h, kvh) = (cfg.num_heads, cfg.num_kv_heads);
        let rows = Split::Rows { rank, parts: world };
        // Row-parallel layers as `parts` global column slices, `per_rank` of them here.
        let parts = cfg.reduce_parts(world);
        let per_rank = parts / world;
        let row_parallel = |name: &str, shape: [usize; 2]| -> Result<RowParallel> {
            if per_rank == 1 {
                let cols = Split::Cols { rank, parts: world };
                return Ok(RowParallel::Slices(
                    vec![w.linear(name, shape, cols, opts)?],
                ));
            }
            // The rank's columns in one read, then split into its `per_rank` slices.
            let seg_cols = shape[1] / parts;
            let cols = Split::Cols { rank, parts: world };
            match w.linear(name, shape, cols, opts)? {
                // Quantized, segments of whole blocks: one matrix, computed per segment.
                Linear::Quant(matrix)
                    if seg_cols.is_multiple_of(crate::kernels::quant_matmul::BLOCK) =>
                {
                    Ok(RowParallel::QuantSegments {
                        matrix,
                        segments: per_rank,
                    })
                }
                Linear::Candle(QMatMul::Tensor(t)) => Ok(RowParallel::Slices(
                    (0..per_rank)
                        .map(|j| {
                            let slice = t.narrow(1, j * seg_cols, seg_cols)?.contiguous()?;
                            Ok(Linear::Candle(QMatMul::Tensor(slice)))
                        })
                        .collect::<Result<Vec<_>>>()?,
                )),
                // Anything else: read each slice on its own.
                _ => Ok(RowParallel::Slices(
                    (rank * per_rank..(rank + 1) * per_rank)
                        .map(|j| w.linear(name, shape, Split::Cols { rank: j, parts }, opts))
                        .collect::<Result<Vec<_>>>()?,
                )),
            }
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let lin = |name: &str, shape: [usize; 2], split: Split| {
                w.linear(&format!("{p}.{name}.weight"), shape, split, opts)
            };
            let row_par = |name: &str, shape| row_parallel(&format!("{p}.{name}.weight"), shape);
            blocks.push(Block {
                input_norm: w.dense(&format!("{p}.input_layernorm.weight"), &[hidden], opts)?,
                attn: Attention {
                    qkv_proj: Linear::stack_rows(vec![
                        lin("self_attn.q_proj", [h * d, hidden], rows)?,
                        lin("self_attn.k_proj", [kvh * d, hidden], rows)?,
                        lin("self_attn.v_proj", [kvh * d, hidden], rows)?,
                    ])?,
                    o_proj: row_par("self_attn.o_proj", [hidden, h * d])?,
                    num_heads: h / world,
                    num_kv_heads: kvh / world,
                    head_dim: d,
                },
                post_attn_norm: w.dense(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[hidden],
                    opts,
                )?,
                mlp: Mlp {
                    gate_up_proj: Linear::stack_rows(vec![
                        lin("mlp.gate_proj", [inter, hidden], rows)?,
                        lin("mlp.up_proj", [inter, hidden], rows)?,
                    ])?,
                    width: inter / world,
                    down_proj: row_par("mlp.down_proj", [hidden, inter])?,
                },
            });
        }
        let vocab = cfg.vocab_size;
        let name = if !cfg.tie_word_embeddings && w.contains("lm_head.weight") {
            "lm_head.weight"
        } else {
            "model.embed_tokens.weight"
        };
        let lm_head = w.linear(name, [vocab, hidden], rows, opts)?;
        Ok(Self {
            embed_tokens: w.dense("model.embed_tokens.weight", &[vocab, hidden], opts)?,
            norm: w.dense("model.norm.weight", &[hidden], opts)?,
            rope: Rope::new(&cfg, opts.dtype, &opts.device)?,
            eps: cfg.rms_norm_eps,
            dtype: opts.dtype,
            config: cfg,
            blocks,
            lm_head,
        })
    }

    /// Width of one KV-cache row on this rank.
    pub fn kv_row_width(&self, world: usize) -> usize {
        self.config.num_kv_heads / world * self.config.head_dim
    }

    /// Runs one step. Returns the logits of this rank's slice of the vocabulary,
    /// `[N, vocab_slice]` (f32), of the rows of the batch's `output_seqs`, and the final
    /// (normed) hidden states `[S, hidden]` of its `S` scored rows, whose logits
    /// [`Self::logits`] gives a slice at a time; `None` for either when there are none (see
    /// `StepBatch::output_rows`).
    pub fn forward(
        &self,
        batch: &StepBatch,
        cache: &KvCache,
        comm: &mut dyn Communicator,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let mut x = self.embed_tokens.index_select(&batch.tokens, 0)?;
        let (cos, sin) = self.rope.at(&batch.positions)?;
        let eps = self.eps as f32;
        for (i, b) in self.blocks.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &b.input_norm, eps)?;
            let a = b.attn.forward(&h, &cos, &sin, batch, cache, i)?;
            let a = comm
                .all_reduce_parts(&a)
                .with_context(|| format!("all-reduce after attention {i}"))?;
            x = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x, &b.post_attn_norm, eps)?;
            let m = b.mlp.forward(&h)?;
            let m = comm
                .all_reduce_parts(&m)
                .with_context(|| format!("all-reduce after MLP {i}"))?;
            x = (x + m)?;
        }
        if !batch.has_output() {
            return Ok((None, None));
        }
        let rows = x.index_select(&batch.output_rows, 0)?;
        let rows = candle_nn::ops::rms_norm(&rows, &self.norm, eps)?;
        let n = batch.output_seqs.len();
        let scored = rows.dim(0)? - n;
        let logits = match n {
            0 => None,
            _ => Some(self.logits(&rows.narrow(0, 0, n)?)?),
        };
        let scored = match scored {
            0 => None,
            _ => Some(rows.narrow(0, n, scored)?),
        };
        Ok((logits, scored))
    }

    /// This rank's slice of the logits (f32) of final hidden states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(self.lm_head.forward(hidden)?.to_dtype(DType::F32)?)
    }
}

impl Model {
    /// The bytes this rank's weights take (and the RoPE tables), as loaded: what
    /// `crate::memory::ShardMemory` predicts from the config alone.
    pub fn weight_bytes(&self) -> usize {
        use self::linear::tensor_bytes;
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| {
                tensor_bytes(&b.input_norm)
                    + tensor_bytes(&b.post_attn_norm)
                    + b.attn.qkv_proj.bytes()
                    + b.attn.o_proj.bytes()
                    + b.mlp.gate_up_proj.bytes()
                    + b.mlp.down_proj.bytes()
            })
            .sum();
        blocks
            + tensor_bytes(&self.embed_tokens)
            + tensor_bytes(&self.norm)
            + self.lm_head.bytes()
            + self.rope.bytes()
    }

    /// The device the weights live on.
    pub fn embed_device(&self) -> candle_core::Device {
        self.embed_tokens.device().clone()
    }
}
