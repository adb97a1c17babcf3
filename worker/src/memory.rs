//! What one rank's shard costs in memory, from the config alone: capacity planning before a
//! model is downloaded (`helios-bench memory`), checked against dummy loads
//! (`Model::weight_bytes`).
//!
//! A rank holds `1/tp` of every attention and MLP matrix and of the lm_head's vocabulary rows,
//! plus what every rank keeps whole: the embedding table, the norms and the RoPE tables. Its KV
//! cache holds, per token, a K and a V row of its `kv_heads/tp` heads in every layer.

use candle_core::DType;

use crate::config::ModelConfig;
use crate::kernels::quant_matmul::{Format, QuantMatrix};
use crate::kv_cache::KvCache;
use crate::vocab_parallel;

/// How a shard's weights are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The CPU's kept-quantized layout (the default GGUF, and `--load-format dummy` on CPU):
    /// Q4_1 layers, a Q8_0 lm_head, dense f32 embedding, norms and RoPE tables.
    CpuQ4_1,
    /// Every tensor dense in one dtype (bf16 on GPUs, f32 for `--dequantize` on CPU).
    Dense(DType),
}

impl Layout {
    fn matrix(self, rows: usize, cols: usize, lm_head: bool) -> u64 {
        let bytes = match self {
            // Rows are kept in groups of eight (`QuantMatrix`), the last one padded.
            Layout::CpuQ4_1 => {
                let f = if lm_head { Format::Q8_0 } else { Format::Q4_1 };
                QuantMatrix::bytes_for(f, rows, cols)
            }
            Layout::Dense(dt) => rows * cols * dt.size_in_bytes(),
        };
        bytes as u64
    }

    /// The dtype of what stays dense (embedding, norms, RoPE tables).
    fn dense_dtype(self) -> DType {
        match self {
            Layout::CpuQ4_1 => DType::F32,
            Layout::Dense(dt) => dt,
        }
    }
}

/// One rank's memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMemory {
    pub weights: u64,
    /// KV cache per token of context (all layers, K and V).
    pub kv_per_token: u64,
}

impl ShardMemory {
    /// Rank `rank` of `tp`; KV in `kv_dtype` (the compute dtype: f32 on CPU, bf16 on GPUs).
    pub fn of(cfg: &ModelConfig, rank: usize, tp: usize, layout: Layout, kv_dtype: DType) -> Self {
        let (hidden, d) = (cfg.hidden_size, cfg.head_dim);
        let (q, kv, inter) = (
            cfg.num_heads * d / tp,
            cfg.num_kv_heads * d / tp,
            cfg.intermediate_size / tp,
        );
        let dense = layout.dense_dtype().size_in_bytes() as u64;
        let layer = layout.matrix(q + 2 * kv, hidden, false)
            + layout.matrix(hidden, q, false)
            + layout.matrix(2 * inter, hidden, false)
            + layout.matrix(hidden, inter, false)
            + 2 * hidden as u64 * dense;
        let vocab_rows = vocab_parallel::slice_of(cfg.vocab_size, rank, tp).len();
        let rope = 2 * cfg.max_position_embeddings as u64 * (d / 2) as u64 * dense;
        let weights = cfg.num_layers as u64 * layer
            + (cfg.vocab_size * hidden) as u64 * dense
            + hidden as u64 * dense
            + layout.matrix(vocab_rows, hidden, true)
            + rope;
        let kv_per_token = KvCache::bytes_per_block(cfg.num_layers, 1, kv, kv_dtype) as u64;
        Self {
            weights,
            kv_per_token,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;
    use crate::weights::{LoadOptions, Weights};
    use candle_core::Device;
    use helios_proto::LoadFormat;

    /// SOLAR-10.7B's proportions (32 query and 8 KV heads, MLP 3.5 × hidden), scaled down, with
    /// a vocabulary that does not split evenly.
    const SMALL_SOLAR: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":1001,
        "hidden_size":512,"intermediate_size":1792,"num_hidden_layers":2,
        "num_attention_heads":32,"num_key_value_heads":8,"max_position_embeddings":256}"#;

    #[test]
    fn the_figures_are_what_a_dummy_load_holds_at_every_tp_and_rank() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), SMALL_SOLAR).unwrap();
        let w = Weights::open_as(dir.path(), LoadFormat::Dummy).unwrap();
        let cfg = w.config().clone();
        for (layout, dequantize, dtype) in [
            (Layout::CpuQ4_1, false, DType::F32),
            (Layout::Dense(DType::F32), true, DType::F32),
            (Layout::Dense(DType::BF16), true, DType::BF16),
        ] {
            let opts = LoadOptions {
                device: Device::Cpu,
                dtype,
                dequantize,
            };
            for tp in [1, 2, 4, 8] {
                for rank in [0, tp - 1] {
                    let model = Model::load(&w, rank, tp, &opts).unwrap();
                    let want = ShardMemory::of(&cfg, rank, tp, layout, dtype);
                    assert_eq!(
                        model.weight_bytes() as u64,
                        want.weights,
                        "{layout:?}, rank {rank} of {tp}"
                    );
                    let row = model.kv_row_width(tp);
                    let per_block = KvCache::bytes_per_block(cfg.num_layers, 16, row, dtype);
                    assert_eq!(per_block as u64, 16 * want.kv_per_token);
                }
            }
        }
    }
}
