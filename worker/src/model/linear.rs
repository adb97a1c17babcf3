//! Linear layers, and row-parallel ones kept as column slices.
//!
//! A row-parallel layer (`o_proj`, `down_proj`) produces partial sums that ranks add up. Float
//! addition is not associative, so to make every tp give bit-identical hidden states (and tokens)
//! the layer is always split into the same `P` column slices (`ModelConfig::reduce_parts`): rank
//! `r` of `tp` holds slices `r·P/tp ..`, returns each slice's partial sum separately, and the
//! communicator adds all `P` partials in slice order. At tp 1 the same `P` partials are added
//! locally in the same order. The price is `P/tp` smaller matmuls instead of one per layer.
//!
//! Bit-identity also needs each matmul output to be independent of the matrix's width. candle's
//! quantized CPU kernels compute every output as its own dot product, so quantized models agree
//! to the bit at every tp (tested). Dense f32 matmuls go through `gemm`, which picks kernels by
//! shape: dense models agree across tp to rounding (1e-6 relative), not to the bit.

use anyhow::Result;
use candle_core::quantized::QMatMul;
use candle_core::{Module, Tensor};

use crate::kernels::q4_1::Q41Matrix;

/// A weight matrix `[out, in]` applied as `x · Wᵀ`: dense or quantized through candle, or Q4_1
/// through our CPU kernel.
pub enum Linear {
    Candle(QMatMul),
    Q41(Q41Matrix),
}

impl Linear {
    /// `x`: `[T, in]` → `[T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Candle(m) => Ok(m.forward(x)?),
            Linear::Q41(m) => m.forward(x),
        }
    }
}

pub struct RowParallel {
    parts: Vec<Linear>,
}

impl RowParallel {
    pub fn new(parts: Vec<Linear>) -> Self {
        Self { parts }
    }

    /// `x`: `[T, in_local]`. Returns the partial sums `[P_local, T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let width = x.dim(1)? / self.parts.len();
        let partials = self
            .parts
            .iter()
            .enumerate()
            .map(|(j, w)| w.forward(&x.narrow(1, j * width, width)?.contiguous()?))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::stack(&partials, 0)?)
    }
}
