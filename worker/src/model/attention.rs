//! Grouped-query attention over the paged KV cache, one rank's share of the heads.
//!
//! `q/k/v_proj` are column-parallel (this rank's heads), `o_proj` is row-parallel: its output is
//! a partial sum that the caller all-reduces. New keys and values go into the slots the step
//! names; each sequence then attends over its whole context. On the CPU our kernel reads the
//! context in place (`kernels::attention`); elsewhere it is gathered from the blocks with candle
//! ops (`attend_gathered`), which run on any device.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};

use super::linear::{Linear, RowParallel};
use super::rope::Rope;
use crate::batch::StepBatch;
use crate::kernels::attention::{paged_attention, AttentionShape, SeqAttention};
use crate::kv_cache::KvCache;

pub struct Attention {
    /// `q_proj`, `k_proj` and `v_proj` stacked: one matmul.
    pub qkv_proj: Linear,
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
        let qkv = self.qkv_proj.forward(x)?;
        let q = qkv.narrow(1, 0, h * d)?.reshape((t, h, d))?;
        let k = qkv.narrow(1, h * d, kvh * d)?.reshape((t, kvh, d))?;
        let v = qkv.narrow(1, (h + kvh) * d, kvh * d)?;
        let q = Rope::apply(&q, cos, sin)?;
        let k = Rope::apply(&k, cos, sin)?.reshape((t, kvh * d))?;
        cache.write(layer, &k, &v, &batch.write_slots)?;

        let o = if x.device().is_cpu() && x.dtype() == DType::F32 {
            self.attend_cpu(&q, batch, cache, layer)?
        } else {
            self.attend_gathered(&q, batch, cache, layer)?
        };
        self.o_proj.forward(&o.contiguous()?)
    }

    /// CPU: our kernel reads each sequence's context straight from the cache.
    fn attend_cpu(
        &self,
        q: &Tensor,
        batch: &StepBatch,
        cache: &KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let t = q.dim(0)?;
        let qs = q.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let seqs: Vec<SeqAttention<'_>> = batch
            .seqs
            .iter()
            .map(|s| SeqAttention {
                q_start: s.q_start,
                q_len: s.q_len,
                start_pos: s.start_pos,
                slots: &s.slots,
            })
            .collect();
        let shape = AttentionShape {
            heads: self.num_heads,
            kv_heads: self.num_kv_heads,
            head_dim: self.head_dim,
            scale: 1.0 / (self.head_dim as f32).sqrt(),
        };
        let out = cache.with_cpu_slices(layer, |k, v| paged_attention(&qs, k, v, &seqs, &shape))?;
        Ok(Tensor::from_vec(
            out,
            (t, self.num_heads * self.head_dim),
            q.device(),
        )?)
    }

    /// Any device: gather each sequence's K/V rows, then batched matmuls over its heads.
    fn attend_gathered(
        &self,
        q: &Tensor,
        batch: &StepBatch,
        cache: &KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (h, kvh, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let groups = h / kvh;
        let scale = 1.0 / (d as f64).sqrt();
        let mut outs = Vec::with_capacity(batch.seqs.len());
        for s in &batch.seqs {
            let (ctx_slots, mask) = s
                .gather
                .as_ref()
                .context("the step was laid out for the CPU kernel")?;
            let ctx = ctx_slots.dim(0)?;
            let (ks, vs) = cache.gather(layer, ctx_slots)?;
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
            if let Some(mask) = mask {
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
        Ok(Tensor::cat(&outs, 0)?)
    }
}
