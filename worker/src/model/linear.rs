//! Linear layers, and row-parallel ones kept as column slices.
//!
//! A row-parallel layer (`o_proj`, `down_proj`) produces partial sums that ranks add up. Float
//! addition is not associative, so to make every tp give bit-identical hidden states (and tokens)
//! the layer is always split into the same `P` column slices (`ModelConfig::reduce_parts`): rank
//! `r` of `tp` holds slices `r·P/tp ..`, returns each slice's partial sum separately, and the
//! communicator adds all `P` partials in slice order. At tp 1 the same `P` partials are added
//! locally in the same order.
//!
//! Bit-identity also needs each matmul output to be independent of the matrix's width. Our
//! quantized kernels and candle's quantized CPU kernels compute every output as its own dot product, so
//! quantized models agree to the bit at every tp (tested). Dense f32 matmuls go through `gemm`,
//! which picks kernels by shape: dense models agree across tp to rounding (1e-6), not the bit.

use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use crate::kernels::quant_matmul::QuantMatrix;

/// A weight matrix `[out, in]` applied as `x · Wᵀ`.
pub enum Linear {
    /// Dense, or quantized through candle's kernels.
    Candle(QMatMul),
    /// Q4_1 / Q8_0 through our CPU kernels.
    Quant(QuantMatrix),
    /// Matrices that could not be fused into one: outputs concatenated.
    Stacked(Vec<Linear>),
}

impl Linear {
    /// `x`: `[T, in]` → `[T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => Ok(m.forward(x)?),
            Linear::Quant(m) => m.forward(x),
            Linear::Stacked(parts) => {
                let outs = parts
                    .iter()
                    .map(|p| p.forward(x))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&outs, 1)?)
            }
        }
    }

    /// The bytes its weights take.
    pub fn bytes(&self) -> usize {
        match self {
            Linear::Candle(QMatMul::QTensor(q)) => q.storage_size_in_bytes(),
            Linear::Candle(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => tensor_bytes(t),
            Linear::Quant(m) => m.bytes(),
            Linear::Stacked(parts) => parts.iter().map(Linear::bytes).sum(),
        }
    }

    /// One layer computing all of `parts` (same input width), outputs side by side: q/k/v and
    /// gate/up become one matmul each.
    pub fn stack_rows(parts: Vec<Linear>) -> Result<Linear> {
        let formats: Vec<_> = parts
            .iter()
            .map(|p| match p {
                Linear::Quant(m) => Some(m.format()),
                _ => None,
            })
            .collect();
        if formats[0].is_some() && formats.iter().all(|f| *f == formats[0]) {
            let ms = parts
                .into_iter()
                .filter_map(|p| match p {
                    Linear::Quant(m) => Some(m),
                    _ => None,
                })
                .collect();
            return Ok(Linear::Quant(QuantMatrix::concat_rows(ms)?));
        }
        if parts
            .iter()
            .all(|p| matches!(p, Linear::Candle(QMatMul::Tensor(_))))
        {
            let ts: Vec<Tensor> = parts
                .into_iter()
                .filter_map(|p| match p {
                    Linear::Candle(QMatMul::Tensor(t)) => Some(t),
                    _ => None,
                })
                .collect();
            return Ok(Linear::Candle(QMatMul::Tensor(Tensor::cat(&ts, 0)?)));
        }
        Ok(Linear::Stacked(parts))
    }
}

/// This rank's slices of a row-parallel layer.
pub enum RowParallel {
    /// One matrix per slice.
    Slices(Vec<Linear>),
    /// The rank's slices as one quantized matrix computed per column segment in one call.
    QuantSegments {
        matrix: QuantMatrix,
        segments: usize,
    },
}

/// The bytes a tensor's elements take.
pub fn tensor_bytes(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl RowParallel {
    /// The bytes its weights take.
    pub fn bytes(&self) -> usize {
        match self {
            RowParallel::QuantSegments { matrix, .. } => matrix.bytes(),
            RowParallel::Slices(parts) => parts.iter().map(Linear::bytes).sum(),
        }
    }

    /// `x`: `[T, in_local]`. Returns the partial sums `[P_local, T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            RowParallel::QuantSegments { matrix, segments } => {
                matrix.forward_segments(x, *segments)
            }
            RowParallel::Slices(parts) => {
                let width = x.dim(1)? / parts.len();
                let partials = parts
                    .iter()
                    .enumerate()
                    .map(|(j, w)| w.forward(&x.narrow(1, j * width, width)?.contiguous()?))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::stack(&partials, 0)?)
            }
        }
    }
}
