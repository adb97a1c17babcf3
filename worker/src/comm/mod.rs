//! The communicator: how tensor-parallel ranks combine their partial results.
//!
//! Megatron-style sharding needs one collective, a sum all-reduce after the row-parallel
//! `o_proj` and `down_proj` of every layer. Every rank must end with bit-identical sums so that
//! all ranks stay in lockstep (same hidden states, same sampled tokens): implementations sum the
//! ranks' contributions in rank order on every rank.
//!
//! The lm_head is split by vocabulary; rank 0, which alone samples, collects what sampling
//! needs of every rank's logits with [`Communicator::all_gather`] (`crate::vocab_parallel`).
//!
//! Because rank 0 alone samples, it alone knows the tokens it sampled in the previous step; when
//! the coordinator plans ahead of those tokens (`SequenceStep.feed_sampled`), rank 0 hands them
//! to the other ranks with [`Communicator::broadcast_from_rank0`]. That is built on the sum
//! all-reduce every implementation already has, so it needs no transport of its own: a few ids
//! per step are not worth a second collective to implement and test on every backend.

mod handshake;
#[cfg(feature = "cuda")]
mod nccl;
mod shm;
mod tcp;
#[doc(hidden)]
pub mod test_support;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

#[cfg(feature = "cuda")]
pub use self::nccl::NcclCommunicator;
pub use self::shm::{ShmCommunicator, ShmOptions};
pub use self::tcp::{MeshAbort, MeshCall, TcpCommunicator, TcpListenerSlot};

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
    /// Every rank's `mine`, concatenated in rank order, on every rank. Every rank passes the
    /// same number of bytes (each knows it from the plan), as with the sums.
    ///
    /// The default carries each byte as an f32 through `all_reduce_sum` on `device`: every rank
    /// fills its own stretch of a zero buffer, and adding zeros to a byte value is exact in any
    /// order. Four times the bytes of a real gather, on a backend that has no cheaper one.
    fn all_gather(&mut self, mine: &[u8], device: &Device) -> Result<Vec<u8>> {
        let (rank, world, n) = (self.rank(), self.world_size(), mine.len());
        if world == 1 {
            return Ok(mine.to_vec());
        }
        let mut buf = vec![0f32; world * n];
        for (b, &v) in buf[rank * n..(rank + 1) * n].iter_mut().zip(mine) {
            *b = v as f32;
        }
        let sum = self
            .all_reduce_sum(&Tensor::from_vec(buf, world * n, device)?)?
            .to_vec1::<f32>()?;
        sum.into_iter()
            .map(|v| {
                if (0.0..=255.0).contains(&v) && v.fract() == 0.0 {
                    Ok(v as u8)
                } else {
                    bail!("rank {rank}: a gathered byte came back as {v}")
                }
            })
            .collect()
    }
    /// Gives every rank rank 0's `values` (the other ranks' `values` are overwritten; every rank
    /// passes the same number of them). Each value must be below [`BROADCAST_LIMIT`].
    ///
    /// The default sums an f32 tensor on `device` (the device this communicator's
    /// `all_reduce_sum` works on: NCCL's is the rank's GPU) to which rank 0 contributes its
    /// values and every other rank zeros; adding zeros is exact in any order, and integers below
    /// 2^24 are exact in f32. A value of rank 0's at or above the limit goes out as NaN, so that
    /// every rank fails here together instead of rank 0 alone leaving its peers in the
    /// collective. World size 1 returns at once.
    fn broadcast_from_rank0(&mut self, values: &mut [u32], device: &Device) -> Result<()> {
        if self.world_size() == 1 || values.is_empty() {
            return Ok(());
        }
        let mine: Vec<f32> = if self.rank() == 0 {
            values
                .iter()
                .map(|&v| {
                    if v < BROADCAST_LIMIT {
                        v as f32
                    } else {
                        f32::NAN
                    }
                })
                .collect()
        } else {
            vec![0.0; values.len()]
        };
        let n = values.len();
        let sum = self
            .all_reduce_sum(&Tensor::from_vec(mine, n, device)?)?
            .to_vec1::<f32>()?;
        if sum.len() != n {
            bail!("broadcast of {n} values came back with {}", sum.len());
        }
        for (v, s) in values.iter_mut().zip(sum) {
            // `s` is what rank 0 sent; check it rather than trust a cast to round it.
            if !(s >= 0.0 && s < BROADCAST_LIMIT as f32 && s.fract() == 0.0) {
                bail!(
                    "rank {}: rank 0 broadcast {s}, not an integer below {BROADCAST_LIMIT}",
                    self.rank()
                );
            }
            *v = s as u32;
        }
        Ok(())
    }
}

/// Values [`Communicator::broadcast_from_rank0`] can carry are below this: 2^24, the first
/// integer from which f32 (the sum all-reduce's type) no longer holds every integer.
pub const BROADCAST_LIMIT: u32 = 1 << 24;

/// `parts[0] + parts[1] + ...`, added strictly in that order.
pub fn sum_in_order(parts: &Tensor) -> Result<Tensor> {
    let mut acc = parts.get(0)?;
    for j in 1..parts.dim(0)? {
        acc = (acc + parts.get(j)?)?;
    }
    Ok(acc)
}

/// A communicator that keeps the time spent in its collectives: the engine reports it with
/// every step (`StepResult.allreduce_us`), which the coordinator turns into
/// `helios_allreduce_duration_seconds`.
pub struct Timed {
    inner: Box<dyn Communicator>,
    spent: Duration,
}

impl Timed {
    pub fn new(inner: Box<dyn Communicator>) -> Self {
        Self {
            inner,
            spent: Duration::ZERO,
        }
    }

    /// The time spent in collectives since the previous call.
    pub fn take_spent(&mut self) -> Duration {
        std::mem::take(&mut self.spent)
    }

    fn timed<T>(&mut self, f: impl FnOnce(&mut dyn Communicator) -> T) -> T {
        let started = Instant::now();
        let out = f(self.inner.as_mut());
        self.spent += started.elapsed();
        out
    }
}

impl Communicator for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor> {
        self.timed(|c| c.all_reduce_sum(x))
    }
    fn all_reduce_parts(&mut self, parts: &Tensor) -> Result<Tensor> {
        self.timed(|c| c.all_reduce_parts(parts))
    }
    fn barrier(&mut self) -> Result<()> {
        self.timed(|c| c.barrier())
    }
    fn all_gather(&mut self, mine: &[u8], device: &Device) -> Result<Vec<u8>> {
        self.timed(|c| c.all_gather(mine, device))
    }
    fn broadcast_from_rank0(&mut self, values: &mut [u32], device: &Device) -> Result<()> {
        self.timed(|c| c.broadcast_from_rank0(values, device))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timed_counts_the_collectives_only() {
        struct Slow;
        impl Communicator for Slow {
            fn rank(&self) -> usize {
                0
            }
            fn world_size(&self) -> usize {
                2
            }
            fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor> {
                std::thread::sleep(Duration::from_millis(20));
                Ok(x.clone())
            }
            fn barrier(&mut self) -> Result<()> {
                Ok(())
            }
        }
        let mut c = Timed::new(Box::new(Slow));
        let x = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        c.all_reduce_sum(&x).unwrap();
        c.broadcast_from_rank0(&mut [1, 2], &Device::Cpu).unwrap();
        let spent = c.take_spent();
        assert!(spent >= Duration::from_millis(40), "{spent:?}");
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(
            c.take_spent(),
            Duration::ZERO,
            "time outside collectives counted"
        );
    }

    #[test]
    fn one_rank_broadcasts_nothing() {
        // No collective, no conversion: even a value f32 could not carry comes back as it was.
        let mut v = vec![3, BROADCAST_LIMIT + 1];
        SingleRank
            .broadcast_from_rank0(&mut v, &Device::Cpu)
            .unwrap();
        assert_eq!(v, vec![3, BROADCAST_LIMIT + 1]);
    }
}
