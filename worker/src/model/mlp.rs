//! The SwiGLU MLP, one rank's share of its columns.
//!
//! `gate/up_proj` are column-parallel over the MLP width, `down_proj` row-parallel: the output
//! is a set of partial sums (`[P_local, T, hidden]`) that the caller all-reduces.

use anyhow::Result;
use candle_core::Tensor;

use super::linear::{Linear, RowParallel};

pub struct Mlp {
    /// `gate_proj` and `up_proj` stacked: one matmul.
    pub gate_up_proj: Linear,
    /// Columns of the MLP on this rank.
    pub width: usize,
    pub down_proj: RowParallel,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate_up = self.gate_up_proj.forward(x)?;
        let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, self.width)?)?;
        let up = gate_up.narrow(1, self.width, self.width)?;
        self.down_proj.forward(&(gate * up)?)
    }
}
