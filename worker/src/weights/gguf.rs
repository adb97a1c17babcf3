//! GGUF files (llama.cpp's format), architecture `llama`, memory-mapped.
//!
//! Quantized matrices stay quantized by default: their rows are independent runs of blocks, so a
//! row split copies byte ranges, and a column split copies whole blocks of each row as long as a
//! rank's share of the columns is a multiple of the block size (32 for Q4_0/Q4_1/Q8_0). Where it
//! is not (K-quants' 256-wide blocks at odd tp), that one tensor is dequantized and sliced dense.
//!
//! The converter permuted the rows of `attn_q` / `attn_k` within each head for llama.cpp's
//! pairwise RoPE: HF row `a * d/2 + b` of a head (a ∈ {0, 1}) is stored at row `2b + a`. Reading
//! rows in the HF order undoes it, for quantized and dense tensors alike.

use std::borrow::Cow;
use std::fs::File;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};
use helios_gguf::Content;
use memmap2::Mmap;

use super::{check_shape, slice_rows, LoadOptions, Split};
use crate::config::ModelConfig;
use crate::kernels::quant_matmul::{Format, QuantMatrix};
use crate::model::linear::Linear;

pub struct GgufWeights {
    pub config: ModelConfig,
    path: PathBuf,
    mmap: Mmap,
    content: Content,
}

impl GgufWeights {
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: read-only mapping of a model file that is not modified while in use.
        let mmap =
            unsafe { Mmap::map(&file) }.with_context(|| format!("mapping {}", path.display()))?;
        // The header reader checks every count, shape and offset against the file, so a
        // truncated or hostile file fails here, naming the field or tensor, not half-way through
        // loading.
        let content = helios_gguf::read(Cursor::new(&mmap[..]), mmap.len() as u64)
            .with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .with_context(|| format!("{}: no token_embd.weight tensor", path.display()))?;
        let vocab_rows = embd.shape.dims().first().copied().unwrap_or(0);
        let has_output = content.tensor_infos.contains_key("output.weight");
        let config = ModelConfig::from_gguf(path, &content.metadata, vocab_rows, has_output)?;
        Ok(Self {
            config,
            path: path.to_path_buf(),
            mmap,
            content,
        })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(&gguf_name(name))
    }

    /// The quantization of the attention and MLP matrices, for reporting.
    pub fn dominant_dtype(&self) -> String {
        self.content
            .tensor_infos
            .get("blk.0.ffn_up.weight")
            .map(|i| format!("{:?}", i.ggml_dtype).to_lowercase())
            .unwrap_or_else(|| "unknown".into())
    }

    /// The tensor's dtype, shape `[out, in]` and raw bytes in the mapping.
    fn raw(&self, gname: &str) -> Result<(GgmlDType, Vec<usize>, &[u8])> {
        let info = self
            .content
            .tensor_infos
            .get(gname)
            .with_context(|| format!("{}: tensor {gname} not found", self.path.display()))?;
        let dims = info.shape.dims().to_vec();
        let range = helios_gguf::tensor_range(&self.content, gname, self.mmap.len() as u64)
            .with_context(|| self.path.display().to_string())?;
        Ok((info.ggml_dtype, dims, &self.mmap[range]))
    }

    /// Rows of a `[out, in]` matrix in HF order (undoing the Q/K permutation).
    fn hf_rows(&self, name: &str, rows: std::ops::Range<usize>) -> Vec<usize> {
        let heads_permuted = if name.ends_with("self_attn.q_proj.weight") {
            true
        } else {
            name.ends_with("self_attn.k_proj.weight")
        };
        if !heads_permuted {
            return rows.collect();
        }
        let d = self.config.head_dim;
        rows.map(|r| {
            let (head, within) = (r / d, r % d);
            let (a, b) = (within / (d / 2), within % (d / 2));
            head * d + 2 * b + a
        })
        .collect()
    }

    pub fn linear(
        &self,
        name: &str,
        shape: [usize; 2],
        split: Split,
        opts: &LoadOptions,
    ) -> Result<Linear> {
        let gname = gguf_name(name);
        let (dtype, dims, data) = self.raw(&gname)?;
        check_shape(&self.path, &gname, &dims, &shape)?;
        let [rows, cols] = shape;
        let (r, c) = (split.rows(rows), split.cols(cols));
        let bs = dtype.block_size();
        let ctx = || format!("{}: tensor {gname}", self.path.display());
        let row_bytes = cols / bs * dtype.type_size();
        let blocks_ok = c.start % bs == 0 && c.end % bs == 0;
        let dense = |t: Tensor| -> Result<Linear> {
            Ok(Linear::Candle(QMatMul::Tensor(
                t.to_dtype(opts.dtype)?.to_device(&opts.device)?,
            )))
        };
        if !blocks_ok {
            // A column share that cuts through quant blocks: dequantize, then slice dense.
            let full = qtensor(data, dtype, &dims, &Device::Cpu).with_context(ctx)?;
            let idx: Vec<u32> = self
                .hf_rows(name, r.clone())
                .iter()
                .map(|&x| x as u32)
                .collect();
            let idx = Tensor::new(idx.as_slice(), &Device::Cpu)?;
            let t = full
                .dequantize(&Device::Cpu)?
                .index_select(&idx, 0)?
                .narrow(1, c.start, c.len())?
                .contiguous()?;
            return dense(t);
        }
        let per_block = dtype.type_size();
        let bytes = slice_rows(
            data,
            row_bytes,
            self.hf_rows(name, r.clone()).into_iter(),
            c.start / bs * per_block..c.end / bs * per_block,
        );
        let local = [r.len(), c.len()];
        let float = matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if opts.dequantize || float {
            let q = qtensor(&bytes, dtype, &local, &Device::Cpu).with_context(ctx)?;
            return dense(q.dequantize(&Device::Cpu)?);
        }
        let ours = match dtype {
            GgmlDType::Q4_1 => Some(Format::Q4_1),
            GgmlDType::Q8_0 => Some(Format::Q8_0),
            _ => None,
        };
        match ours {
            Some(format) if opts.device.is_cpu() => Ok(Linear::Quant(
                QuantMatrix::new(format, bytes, r.len(), c.len()).with_context(ctx)?,
            )),
            _ => {
                let q = qtensor(&bytes, dtype, &local, &opts.device).with_context(ctx)?;
                Ok(Linear::Candle(QMatMul::from_qtensor(q)?))
            }
        }
    }

    pub fn dense(&self, name: &str, shape: &[usize], opts: &LoadOptions) -> Result<Tensor> {
        let gname = gguf_name(name);
        let (dtype, dims, data) = self.raw(&gname)?;
        check_shape(&self.path, &gname, &dims, shape)?;
        let t = qtensor(data, dtype, &dims, &Device::Cpu)
            .and_then(|q| Ok(q.dequantize(&Device::Cpu)?))
            .with_context(|| format!("{}: tensor {gname}", self.path.display()))?;
        Ok(t.to_dtype(opts.dtype)?.to_device(&opts.device)?)
    }
}

fn qtensor(bytes: &[u8], dtype: GgmlDType, dims: &[usize], device: &Device) -> Result<QTensor> {
    let storage = QStorage::from_data(Cow::Borrowed(bytes), device, dtype)?;
    Ok(QTensor::new(storage, dims.to_vec())?)
}

/// The GGUF name of an HF tensor name.
fn gguf_name(hf: &str) -> String {
    const TOP: &[(&str, &str)] = &[
        ("model.embed_tokens.weight", "token_embd.weight"),
        ("model.norm.weight", "output_norm.weight"),
        ("lm_head.weight", "output.weight"),
    ];
    const LAYER: &[(&str, &str)] = &[
        ("self_attn.q_proj.weight", "attn_q.weight"),
        ("self_attn.k_proj.weight", "attn_k.weight"),
        ("self_attn.v_proj.weight", "attn_v.weight"),
        ("self_attn.o_proj.weight", "attn_output.weight"),
        ("mlp.gate_proj.weight", "ffn_gate.weight"),
        ("mlp.up_proj.weight", "ffn_up.weight"),
        ("mlp.down_proj.weight", "ffn_down.weight"),
        ("input_layernorm.weight", "attn_norm.weight"),
        ("post_attention_layernorm.weight", "ffn_norm.weight"),
    ];
    if let Some((_, g)) = TOP.iter().find(|(h, _)| *h == hf) {
        return g.to_string();
    }
    if let Some(rest) = hf.strip_prefix("model.layers.") {
        if let Some((layer, suffix)) = rest.split_once('.') {
            if let Some((_, g)) = LAYER.iter().find(|(h, _)| *h == suffix) {
                return format!("blk.{layer}.{g}");
            }
        }
    }
    hf.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use helios_gguf::test_util::{assert_mentions, error_chain, GgufBuilder};
    use helios_gguf::Value;

    /// Writes `b` to a temp dir as `model.gguf` and opens it; the error with its whole chain.
    fn open_err(b: &GgufBuilder) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, b.build()).unwrap();
        error_chain(GgufWeights::open(&path))
    }

    #[test]
    fn tiny_llama_opens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.gguf");
        std::fs::write(&path, GgufBuilder::tiny_llama().build()).unwrap();
        let w = GgufWeights::open(&path).unwrap();
        assert_eq!((w.config.vocab_size, w.config.hidden_size), (4, 8));
        let (_, dims, bytes) = w.raw("token_embd.weight").unwrap();
        assert_eq!((dims, bytes.len()), (vec![4, 8], 128));
    }

    #[test]
    fn hostile_tensors_are_named_with_the_file() {
        let mut b = GgufBuilder::tiny_llama();
        b.tensor_mut("token_embd.weight").dims = vec![1 << 32, 1 << 32, 2];
        assert_mentions(
            &open_err(&b),
            &["model.gguf", "token_embd.weight", "overflows"],
        );

        let mut b = GgufBuilder::tiny_llama();
        b.tensor_mut("output_norm.weight").offset = Some(1 << 40);
        assert_mentions(
            &open_err(&b),
            &["model.gguf", "output_norm.weight", "past the end"],
        );
    }

    #[test]
    fn hostile_config_metadata_is_named() {
        let b = GgufBuilder::tiny_llama().kv("llama.embedding_length", Value::U64(1 << 40));
        assert_mentions(
            &open_err(&b),
            &["model.gguf", "hidden_size is 1099511627776"],
        );
        let b = GgufBuilder::tiny_llama().kv("llama.attention.head_count", Value::U32(0));
        assert_mentions(&open_err(&b), &["num_attention_heads is 0"]);
        let b = GgufBuilder::tiny_llama().kv("llama.attention.head_count_kv", Value::U32(3));
        assert_mentions(&open_err(&b), &["not a multiple of 3 KV heads"]);
        let b = GgufBuilder::tiny_llama().kv("llama.context_length", Value::U64(u64::MAX));
        assert_mentions(
            &open_err(&b),
            &["max_position_embeddings is 18446744073709551615"],
        );
        let b = GgufBuilder::tiny_llama().kv("llama.context_length", Value::F32(1.0));
        assert_mentions(&open_err(&b), &["llama.context_length is not an integer"]);
        let b = GgufBuilder::tiny_llama().kv("llama.rope.freq_base", Value::F32(f32::NAN));
        assert_mentions(&open_err(&b), &["rope_theta is NaN"]);
        // No rows in the embedding: a vocabulary of 0.
        let mut b = GgufBuilder::tiny_llama();
        b.tensor_mut("token_embd.weight").dims = vec![8, 0];
        assert_mentions(&open_err(&b), &["vocab_size is 0"]);
    }

    #[test]
    fn names_map_to_gguf() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.q_proj.weight"),
            "blk.12.attn_q.weight"
        );
        assert_eq!(gguf_name("model.embed_tokens.weight"), "token_embd.weight");
        assert_eq!(gguf_name("lm_head.weight"), "output.weight");
    }
}
