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

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QStorage, QTensor};
use candle_core::{Device, Tensor};
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
        let content = Content::read(&mut Cursor::new(&mmap[..]))
            .map_err(anyhow::Error::from)
            .with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
        let embd = content
            .tensor_infos
            .get("token_embd.weight")
            .with_context(|| format!("{}: no token_embd.weight tensor", path.display()))?;
        let vocab_rows = embd.shape.dims().first().copied().unwrap_or(0);
        let has_output = content.tensor_infos.contains_key("output.weight");
        let config = ModelConfig::from_gguf(path, &content.metadata, vocab_rows, has_output)?;
        let w = Self {
            config,
            path: path.to_path_buf(),
            mmap,
            content,
        };
        // Catch a truncated file now rather than half-way through loading.
        for name in w.content.tensor_infos.keys() {
            w.raw(name)?;
        }
        Ok(w)
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
        let elems: usize = dims.iter().product();
        let bs = info.ggml_dtype.block_size();
        if !elems.is_multiple_of(bs) {
            bail!(
                "{}: tensor {gname} has {elems} elements, not a multiple of its block size {bs}",
                self.path.display()
            );
        }
        let len = elems / bs * info.ggml_dtype.type_size();
        let start = self.content.tensor_data_offset as usize + info.offset as usize;
        let end = start + len;
        if end > self.mmap.len() {
            bail!(
                "{}: tensor {gname} needs bytes {start}..{end} but the file has {} (truncated?)",
                self.path.display(),
                self.mmap.len()
            );
        }
        Ok((info.ggml_dtype, dims, &self.mmap[start..end]))
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
