//! Grouped-query attention over the paged KV cache, one rank's share of the heads.
//!
//! `q/k/v_proj` are column-parallel (this rank's heads), `o_proj` is row-parallel: its output is
//! a partial sum that the caller all-reduces. New keys and values go into the slots the step
//! names; each sequence then attends over its whole context gathered from its blocks. The
//! gather uses only candle ops, so the same code runs on CPU and CUDA.

use anyhow::Result;
use candle_core::Tensor;

use super::linear::{Linear, RowParallel};
use super::rope::Rope;
use crate::batch::StepBatch;
use crate::kv_cache::KvCache;

pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: RowParallel,
    /// Heads on this rank.
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl Attention {
    /// `x`: `[T, hidden]` (normed). Returns this rank's partial sums `[P_local, T, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        batch: &StepBatch,
        cache: &KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let q = self.q_proj.forward(x)?.reshape((t, h, d))?;
        let k = self.k_proj.forward(x)?.reshape((t, kvh, d))?;
        let v = self.v_proj.forward(x)?;
        let q = Rope::apply(&q, cos, sin)?;
        let k = Rope::apply(&k, cos, sin)?.reshape((t, kvh * d))?;
        cache.write(layer, &k, &v, &batch.write_slots)?;

        let groups = h / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            let ctx = s.ctx_slots.dim(0)?;
            let (ks, vs) = cache.gather(layer, &s.ctx_slots)?;
            // [kvh, ctx, d]
            let ks = ks.reshape((ctx, kvh, d))?.transpose(0, 1)?.contiguous()?;
            let vs = vs.reshape((ctx, kvh, d))?.transpose(0, 1)?.contiguous()?;
            // Query heads are grouped by the KV head they share: [kvh, groups * q_len, d].
            let qs = q
                .narrow(0, s.q_start, s.q_len)?
                .transpose(0, 1)?
                .contiguous()?
                .reshape((kvh, groups * s.q_len, d))?;
            let mut att = (qs.matmul(&ks.t()?)? * scale)?;
            if let Some(mask) = &s.mask {
                att = att
                    .reshape((kvh, groups, s.q_len, ctx))?
                    .broadcast_add(mask)?
                    .reshape((kvh, groups * s.q_len, ctx))?;
            }
            let att = candle_nn::ops::softmax_last_dim(&att)?;
            let o = att
                .matmul(&vs)?
                .reshape((h, s.q_len, d))?
                .transpose(0, 1)?
                .reshape((s.q_len, h * d))?;
            outs.push(o);
        }
        let o = if outs.len() == 1 {
            outs.pop().expect("one output")
        } else {
            Tensor::cat(&outs, 0)?
        };
        self.o_proj.forward(&o.contiguous()?)
    }
}
