//! The SwiGLU MLP, one rank's share of its columns.
//!
//! `gate/up_proj` are column-parallel over the MLP width, `down_proj` row-parallel: the output
//! is a set of partial sums (`[P_local, T, hidden]`) that the caller all-reduces.

use anyhow::Result;
use candle_core::Tensor;

use super::linear::{Linear, RowParallel};

pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: RowParallel,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(x)?)?;
        let up = self.up_proj.forward(x)?;
        self.down_proj.forward(&(gate * up)?)
    }
}
