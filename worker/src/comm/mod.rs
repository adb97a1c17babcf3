//! The communicator: how tensor-parallel ranks combine their partial results.
//!
//! Megatron-style sharding needs one collective, a sum all-reduce after the row-parallel
//! `o_proj` and `down_proj` of every layer. Every rank must end with bit-identical sums so that
//! all ranks stay in lockstep (same hidden states, same sampled tokens): implementations sum the
//! ranks' contributions in rank order on every rank.
//!
//! The lm_head is kept whole on rank 0 (which alone samples), so no gather is needed; that
//! departs from DESIGN.md's vocab-parallel lm_head, which pays off only on GPUs where rank 0's
//! memory is the limit.

#[cfg(feature = "cuda")]
mod nccl;
mod tcp;

use anyhow::Result;
use candle_core::Tensor;

#[cfg(feature = "cuda")]
pub use self::nccl::NcclCommunicator;
pub use self::tcp::{TcpCommunicator, TcpListenerSlot};

pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sums `x` over all ranks; every rank gets the same (bit-identical) result.
    fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor>;
    /// Sums partial results `[P_local, ...]` of every rank (`P_local · world` slices in rank
    /// order) into `[...]`. Implementations that add all slices in that global order give the
    /// same bits for every tp that splits the same slices (see `model::linear`); this default
    /// adds this rank's slices first, then all-reduces.
    fn all_reduce_parts(&mut self, parts: &Tensor) -> Result<Tensor> {
        let local = sum_in_order(parts)?;
        self.all_reduce_sum(&local)
    }
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
}

/// `parts[0] + parts[1] + ...`, added strictly in that order.
pub fn sum_in_order(parts: &Tensor) -> Result<Tensor> {
    let mut acc = parts.get(0)?;
    for j in 1..parts.dim(0)? {
        acc = (acc + parts.get(j)?)?;
    }
    Ok(acc)
}

/// World size 1: nothing to combine.
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
