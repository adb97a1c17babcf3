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

mod tcp;
#[cfg(feature = "cuda")]
mod nccl;

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
    /// Returns once every rank has called it.
    fn barrier(&mut self) -> Result<()>;
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
