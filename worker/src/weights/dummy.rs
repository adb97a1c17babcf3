//! `--load-format dummy`: random weights of the right shapes from a `config.json` alone, as
//! vLLM's dummy load format, so that a SOLAR-10.7B- or Llama-70B-shaped model can be run,
//! benchmarked and profiled without its weights (here with fewer layers, on GPUs at full size).
//!
//! The weights take the form real ones would on that device, so the same kernels run: on the
//! CPU, Q4_1 layers and a Q8_0 embedding/lm_head (the default GGUF's formats, kept quantized);
//! dense `dtype` on other devices or with `--dequantize`.
//!
//! Every row is drawn from a generator seeded by the tensor's name and the row's index, so a
//! rank produces exactly its own rows and columns of one fixed model: every tp split sees the
//! same weights, and quantized logits are bit-identical across tp, as with a real file. Scales
//! keep activations in a sane range (each weight's spread is about `1/sqrt(in)`), norms are ones.

use std::path::Path;

use anyhow::{Context, Result};
use candle_core::quantized::QMatMul;
use candle_core::{Device, Tensor};
use half::f16;

use super::{LoadOptions, Split};
use crate::config::ModelConfig;
use crate::kernels::quant_matmul::{Format, QuantMatrix, BLOCK};
use crate::model::linear::Linear;
use crate::sampling::splitmix64;

/// A model of random weights shaped by a `config.json`.
pub struct DummyWeights {
    pub config: ModelConfig,
}

impl DummyWeights {
    /// `path`: an HF model directory (only its `config.json` is read) or a `config.json` itself.
    pub fn open(path: &Path) -> Result<Self> {
        let dir = if path.is_file() {
            path.parent().unwrap_or(Path::new("."))
        } else {
            path
        };
        let config = ModelConfig::from_hf_dir(dir)
            .with_context(|| format!("dummy weights for {}", path.display()))?;
        Ok(Self { config })
    }

    /// Whether linear layers are kept quantized: on the CPU, unless `--dequantize`.
    fn quantized(opts: &LoadOptions) -> bool {
        opts.device.is_cpu() && !opts.dequantize
    }

    /// The format a linear layer's weight takes, `None` for dense.
    fn format(name: &str, opts: &LoadOptions) -> Option<Format> {
        if !Self::quantized(opts) {
            None
        } else if name.contains("embed_tokens") || name.starts_with("lm_head") {
            Some(Format::Q8_0)
        } else {
            Some(Format::Q4_1)
        }
    }

    pub fn dtype_name(&self, opts: &LoadOptions) -> String {
        if Self::quantized(opts) {
            "dummy:q4_1".into()
        } else {
            format!("dummy:{:?}", opts.dtype).to_lowercase()
        }
    }

    pub fn linear(
        &self,
        name: &str,
        shape: [usize; 2],
        split: Split,
        opts: &LoadOptions,
    ) -> Result<Linear> {
        let [rows, cols] = shape;
        let (r, c) = (split.rows(rows), split.cols(cols));
        let quant_ok = cols.is_multiple_of(BLOCK) && c.start % BLOCK == 0 && c.len() % BLOCK == 0;
        match Self::format(name, opts) {
            Some(format) if quant_ok => {
                let bb = format.block_bytes();
                let keep = c.start / BLOCK * bb..c.end / BLOCK * bb;
                let mut data = Vec::with_capacity(r.len() * keep.len());
                for row in r.clone() {
                    let full = quant_row(format, name, row, cols);
                    data.extend_from_slice(&full[keep.clone()]);
                }
                Ok(Linear::Quant(QuantMatrix::new(
                    format,
                    data,
                    r.len(),
                    c.len(),
                )?))
            }
            _ => {
                let a = (3.0 / cols as f32).sqrt();
                let mut data: Vec<f32> = Vec::with_capacity(r.len() * c.len());
                for row in r.clone() {
                    data.extend(dense_row(name, row, cols, a)[c.clone()].iter());
                }
                let t = Tensor::from_vec(data, (r.len(), c.len()), &Device::Cpu)?
                    .to_dtype(opts.dtype)?
                    .to_device(&opts.device)?;
                Ok(Linear::Candle(QMatMul::Tensor(t)))
            }
        }
    }

    /// Norm weights are ones; the embedding table is random in [-1, 1].
    pub fn dense(&self, name: &str, shape: &[usize], opts: &LoadOptions) -> Result<Tensor> {
        let t = if name.contains("norm") {
            Tensor::ones(shape, opts.dtype, &Device::Cpu)?
        } else {
            let (rows, cols) = match shape {
                [r, c] => (*r, *c),
                _ => (1, shape.iter().product()),
            };
            let data: Vec<f32> = (0..rows)
                .flat_map(|row| dense_row(name, row, cols, 1.0))
                .collect();
            Tensor::from_vec(data, shape, &Device::Cpu)?.to_dtype(opts.dtype)?
        };
        Ok(t.to_device(&opts.device)?)
    }

    /// The tensors a Llama checkpoint has: all but `lm_head` when it is tied.
    pub fn contains(&self, name: &str) -> bool {
        name != "lm_head.weight" || !self.config.tie_word_embeddings
    }
}

/// The generator of row `row` of tensor `name`: the sampler's splitmix64 stepped from an
/// FNV-1a hash of the name and the row.
fn row_rng(name: &str, row: usize) -> impl FnMut() -> u64 {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let mut state = h ^ (row as u64).wrapping_mul(GAMMA);
    move || {
        let z = splitmix64(state);
        state = state.wrapping_add(GAMMA);
        z
    }
}

/// A uniform draw in [-a, a) from the top 24 bits of `v`.
fn uniform(v: u64, a: f32) -> f32 {
    ((v >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
}

fn dense_row(name: &str, row: usize, cols: usize, a: f32) -> Vec<f32> {
    let mut next = row_rng(name, row);
    (0..cols).map(|_| uniform(next(), a)).collect()
}

/// One whole row of `format` blocks. Q4_1: nibbles uniform, `m = -7.5·d` (centred), so a
/// weight's spread is about 4.6·d; Q8_0: bytes uniform, spread about 73·d. `d` is chosen for a
/// spread of `1/sqrt(cols)`, varied by ±25 % per block.
fn quant_row(format: Format, name: &str, row: usize, cols: usize) -> Vec<u8> {
    let mut next = row_rng(name, row);
    let spread = 1.0 / (cols as f32).sqrt();
    let mut out = Vec::with_capacity(cols / BLOCK * format.block_bytes());
    for _ in 0..cols / BLOCK {
        let jitter = 1.0 + uniform(next(), 0.25);
        match format {
            Format::Q4_1 => {
                let d = spread / 4.6 * jitter;
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                out.extend_from_slice(&f16::from_f32(-7.5 * d).to_bits().to_le_bytes());
                out.extend_from_slice(&next().to_le_bytes());
                out.extend_from_slice(&next().to_le_bytes());
            }
            Format::Q8_0 => {
                let d = spread / 73.0 * jitter;
                out.extend_from_slice(&f16::from_f32(d).to_bits().to_le_bytes());
                for _ in 0..4 {
                    out.extend_from_slice(&next().to_le_bytes());
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn cpu(dequantize: bool) -> LoadOptions {
        LoadOptions {
            device: Device::Cpu,
            dtype: DType::F32,
            dequantize,
        }
    }

    #[test]
    fn a_ranks_slice_is_that_slice_of_the_whole_tensor() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"architectures":["LlamaForCausalLM"],"vocab_size":256,"hidden_size":128,
               "intermediate_size":256,"num_hidden_layers":2,"num_attention_heads":4,
               "num_key_value_heads":2}"#,
        )
        .unwrap();
        let w = DummyWeights::open(&dir.path().join("config.json")).unwrap();
        let name = "model.layers.1.mlp.down_proj.weight";
        let x = Tensor::rand(-1f32, 1f32, (3, 256), &Device::Cpu).unwrap();
        for dequantize in [false, true] {
            let opts = cpu(dequantize);
            let whole = w.linear(name, [128, 256], Split::Full, &opts).unwrap();
            let whole = whole.forward(&x).unwrap().to_vec2::<f32>().unwrap();
            // Rows: rank 1 of 2 is rows 64..128 of the whole.
            let rows = w.linear(name, [128, 256], Split::Rows { rank: 1, parts: 2 }, &opts);
            let rows = rows.unwrap().forward(&x).unwrap().to_vec2::<f32>().unwrap();
            // Quantized: bit for bit; dense goes through gemm, whose kernels vary by shape.
            for t in 0..3 {
                for (a, b) in rows[t].iter().zip(&whole[t][64..]) {
                    let tol = if dequantize {
                        1e-5 * (1.0 + b.abs())
                    } else {
                        0.0
                    };
                    assert!((a - b).abs() <= tol, "dequantize {dequantize}: {a} vs {b}");
                }
            }
            // Columns: the two column halves' products add up to the whole's (up to rounding).
            let half = |rank| {
                let l = w.linear(name, [128, 256], Split::Cols { rank, parts: 2 }, &opts);
                let xs = x.narrow(1, rank * 128, 128).unwrap().contiguous().unwrap();
                l.unwrap().forward(&xs).unwrap().to_vec2::<f32>().unwrap()
            };
            let (a, b) = (half(0), half(1));
            for t in 0..3 {
                for r in 0..128 {
                    let sum = a[t][r] + b[t][r];
                    assert!((sum - whole[t][r]).abs() < 1e-3 * (1.0 + whole[t][r].abs()));
                }
            }
        }
        let opts = cpu(false);
        assert_eq!(w.dtype_name(&opts), "dummy:q4_1");
        assert!(w.contains("lm_head.weight"));
        let norm = w.dense("model.norm.weight", &[128], &opts).unwrap();
        assert_eq!(norm.to_vec1::<f32>().unwrap(), vec![1.0; 128]);
        let emb = w
            .dense("model.embed_tokens.weight", &[256, 128], &opts)
            .unwrap();
        let v = emb.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean_abs = v.iter().map(|x| x.abs()).sum::<f32>() / v.len() as f32;
        assert!(
            (0.4..0.6).contains(&mean_abs),
            "uniform in [-1, 1]: {mean_abs}"
        );
    }

    #[test]
    fn a_missing_or_bad_config_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = format!("{:#}", DummyWeights::open(dir.path()).err().unwrap());
        assert!(err.contains("config.json"), "{err}");
    }
}
