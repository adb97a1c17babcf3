//! The paged KV cache of one rank: where a sequence's keys and values live.
//!
//! Per layer, K and V are `[num_blocks * block_size, kv_heads_local * head_dim]`: row
//! `block * block_size + offset` is one token's slot. The coordinator's block manager decides
//! which blocks a sequence owns (its block table); the worker only writes the slots a step names
//! and reads back the slots of each sequence's context. Nothing here knows about sequences.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Storage, Tensor};

pub struct KvCache {
    pub block_size: usize,
    pub num_blocks: usize,
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    /// Bytes one block takes on this rank across all layers (K and V).
    pub fn bytes_per_block(
        num_layers: usize,
        block_size: usize,
        row_width: usize,
        dtype: DType,
    ) -> usize {
        2 * num_layers * block_size * row_width * dtype.size_in_bytes()
    }

    pub fn new(
        num_layers: usize,
        num_blocks: usize,
        block_size: usize,
        row_width: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let slots = num_blocks * block_size;
        let layers = (0..num_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, row_width), dtype, device)?,
                    Tensor::zeros((slots, row_width), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()
            .with_context(|| format!("allocating {num_blocks} KV blocks"))?;
        Ok(Self {
            block_size,
            num_blocks,
            layers,
        })
    }

    /// Writes `k`, `v` (`[T, row_width]`) into the slots of `slot_index` (u32 `[T, row_width]`,
    /// every column of a row holding that token's slot).
    pub fn write(&self, layer: usize, k: &Tensor, v: &Tensor, slot_index: &Tensor) -> Result<()> {
        let (kc, vc) = &self.layers[layer];
        kc.scatter_set(slot_index, &k.contiguous()?, 0)?;
        vc.scatter_set(slot_index, &v.contiguous()?, 0)?;
        Ok(())
    }

    /// Runs `f` on the raw K and V storage of `layer` (CPU, f32): `[slots * row_width]` each.
    pub fn with_cpu_slices<R>(
        &self,
        layer: usize,
        f: impl FnOnce(&[f32], &[f32]) -> R,
    ) -> Result<R> {
        let (kc, vc) = &self.layers[layer];
        let (ks, kl) = kc.storage_and_layout();
        let (vs, vl) = vc.storage_and_layout();
        match (&*ks, &*vs) {
            (Storage::Cpu(k), Storage::Cpu(v))
                if kl.is_contiguous() && vl.is_contiguous() && kl.start_offset() == 0 =>
            {
                Ok(f(k.as_slice::<f32>()?, v.as_slice::<f32>()?))
            }
            _ => bail!("the KV cache is not contiguous f32 CPU memory"),
        }
    }

    /// The K and V rows `[ctx, row_width]` of the given slots (u32 `[ctx]`).
    pub fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        let (kc, vc) = &self.layers[layer];
        Ok((kc.index_select(slots, 0)?, vc.index_select(slots, 0)?))
    }
}
