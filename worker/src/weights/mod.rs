//! Weight loading: a rank reads only its own slice of each tensor.
//!
//! Two formats sit behind one interface: HF safetensors directories and GGUF files. Callers ask
//! by the HF tensor name (`model.layers.3.self_attn.q_proj.weight`) with the shape the config
//! implies and how the tensor is split across ranks; the format maps the name, checks the shape,
//! copies only this rank's rows or columns out of the memory-mapped file, and returns a candle
//! tensor (dense) or a quantized matmul (GGUF kept quantized).
//!
//! RoPE convention: the engine uses HF's (rotate the two halves of each head). GGUF files from
//! llama.cpp's converter store Q and K with rows permuted for llama.cpp's pairwise RoPE; the GGUF
//! reader undoes that permutation at load time, so the model code has one convention.

mod dummy;
mod gguf;
mod safetensors;

use std::ops::Range;
use std::path::Path;

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};

use helios_proto::LoadFormat;

use crate::config::ModelConfig;
use crate::model::linear::Linear;

pub use self::dummy::DummyWeights;
pub use self::gguf::GgufWeights;
pub use self::safetensors::SafetensorsWeights;

/// Which part of a 2-D `[out, in]` weight this rank holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The whole tensor (replicated).
    Full,
    /// Part `rank` of `parts` equal row ranges (column-parallel linear: split output features).
    Rows { rank: usize, parts: usize },
    /// Part `rank` of `parts` equal column ranges (row-parallel linear: split input features).
    Cols { rank: usize, parts: usize },
}

impl Split {
    pub(crate) fn rows(&self, n: usize) -> Range<usize> {
        match *self {
            Split::Rows { rank, parts } => rank * n / parts..(rank + 1) * n / parts,
            _ => 0..n,
        }
    }
    fn cols(&self, n: usize) -> Range<usize> {
        match *self {
            Split::Cols { rank, parts } => rank * n / parts..(rank + 1) * n / parts,
            _ => 0..n,
        }
    }
}

/// Where and how weights are materialised.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of dense weights (f32 on CPU, bf16 on CUDA).
    pub dtype: DType,
    /// Load quantized GGUF tensors as dense `dtype` instead of quantized matmuls.
    pub dequantize: bool,
}

/// An opened model: its config and its tensors.
pub enum Weights {
    Safetensors(SafetensorsWeights),
    Gguf(GgufWeights),
    Dummy(DummyWeights),
}

impl Weights {
    /// Opens `path` as `format` says.
    pub fn open_as(path: &Path, format: LoadFormat) -> Result<Self> {
        match format {
            LoadFormat::Auto => Self::open(path),
            LoadFormat::Dummy => Ok(Self::Dummy(DummyWeights::open(path)?)),
        }
    }

    /// Opens a `.gguf` file or an HF directory (`config.json` + safetensors).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Ok(Self::Safetensors(SafetensorsWeights::open(path)?))
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Ok(Self::Gguf(GgufWeights::open(path)?))
        } else if !path.exists() {
            bail!("model path {} does not exist", path.display())
        } else {
            bail!(
                "model path {} is neither an HF directory nor a .gguf file",
                path.display()
            )
        }
    }

    pub fn config(&self) -> &ModelConfig {
        match self {
            Self::Safetensors(w) => &w.config,
            Self::Gguf(w) => &w.config,
            Self::Dummy(w) => &w.config,
        }
    }

    /// Whether the weights are stored quantized (and kept so unless `dequantize`).
    pub fn dtype_name(&self, opts: &LoadOptions) -> String {
        match self {
            Self::Gguf(w) if !opts.dequantize => format!("gguf:{}", w.dominant_dtype()),
            Self::Dummy(w) => w.dtype_name(opts),
            _ => format!("{:?}", opts.dtype).to_lowercase(),
        }
    }

    /// A linear layer's weight `[out, in]` (HF name), this rank's part of it.
    pub fn linear(
        &self,
        name: &str,
        shape: [usize; 2],
        split: Split,
        opts: &LoadOptions,
    ) -> Result<Linear> {
        match self {
            Self::Safetensors(w) => Ok(Linear::Candle(candle_core::quantized::QMatMul::Tensor(
                w.matrix(name, shape, split, opts)?,
            ))),
            Self::Gguf(w) => w.linear(name, shape, split, opts),
            Self::Dummy(w) => w.linear(name, shape, split, opts),
        }
    }

    /// A replicated dense tensor (norm weights, the embedding table).
    pub fn dense(&self, name: &str, shape: &[usize], opts: &LoadOptions) -> Result<Tensor> {
        match self {
            Self::Safetensors(w) => w.dense(name, shape, opts),
            Self::Gguf(w) => w.dense(name, shape, opts),
            Self::Dummy(w) => w.dense(name, shape, opts),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Safetensors(w) => w.contains(name),
            Self::Gguf(w) => w.contains(name),
            Self::Dummy(w) => w.contains(name),
        }
    }
}

/// Copies the selected rows, and within each row the selected byte range, out of a row-major
/// matrix of `row_bytes`-byte rows.
fn slice_rows(
    data: &[u8],
    row_bytes: usize,
    rows: impl Iterator<Item = usize>,
    col_bytes: Range<usize>,
) -> Vec<u8> {
    let mut out = Vec::new();
    for r in rows {
        let start = r * row_bytes;
        out.extend_from_slice(&data[start + col_bytes.start..start + col_bytes.end]);
    }
    out
}

fn check_shape(file: &Path, name: &str, actual: &[usize], expected: &[usize]) -> Result<()> {
    if actual != expected {
        bail!(
            "{}: tensor {name} has shape {actual:?}, the config implies {expected:?}",
            file.display()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_even_ranges() {
        let s = Split::Rows { rank: 1, parts: 3 };
        assert_eq!(s.rows(9), 3..6);
        assert_eq!(s.cols(9), 0..9);
        let s = Split::Cols { rank: 2, parts: 3 };
        assert_eq!(s.cols(9), 6..9);
    }

    #[test]
    fn slice_rows_takes_rows_and_columns() {
        // 3 rows of 4 bytes.
        let data: Vec<u8> = (0..12).collect();
        assert_eq!(
            slice_rows(&data, 4, [2, 0].into_iter(), 1..3),
            vec![9, 10, 1, 2]
        );
    }
}
