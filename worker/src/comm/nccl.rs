//! The NCCL communicator (feature `cuda`): the sum all-reduce between GPU ranks, through
//! cudarc's NCCL bindings, on candle CUDA tensors.
//!
//! One [`NcclCommunicator`] per worker process, one GPU per rank (NCCL refuses two ranks of one
//! communicator on the same GPU). The collectives are enqueued on the candle device's own CUDA
//! stream, so they are ordered after the kernels that produced their input and before those that
//! consume their output, without any host synchronisation; only [`Communicator::barrier`] blocks
//! the host.
//!
//! Rendezvous: rank 0's worker calls [`NcclCommunicator::unique_id_bytes`] (the id carries the
//! address of a bootstrap socket that NCCL opens in *that* process, so it must not be made by the
//! coordinator), the coordinator hands the 128 bytes to every rank, and each rank calls
//! [`NcclCommunicator::from_id_bytes`]. That call blocks until all `world` ranks have joined.
//!
//! Determinism: NCCL reduces every element once (ring, tree or NVLS) and broadcasts the result,
//! so all ranks hold bit-identical sums, which is what keeps them in lockstep. The order in which
//! the ranks' contributions are added is NCCL's, not rank order, so the sum may differ in the
//! last bits from the CPU communicator's. bf16 and f16 are summed in their own precision by
//! NCCL; callers that want an f32 accumulation convert before calling.
//!
//! What is and isn't tested:
//! - `scripts/cuda-check.sh` compiles and links this file (and the whole worker) against the
//!   CUDA 13.0 toolkit and NCCL on a machine without a GPU; nothing here has run on a GPU yet.
//! - The id (de)serialisation test runs anywhere the `cuda` build's test binary can start.
//! - `nccl_all_reduce_on_every_gpu` is `#[ignore]`d: on a GPU machine,
//!   `cargo test -p helios-worker --features cuda --lib nccl -- --ignored` runs one rank per
//!   visible GPU (world size 1 on a one-GPU machine) and checks sums in f32 and bf16, an
//!   out-of-place reduction of a non-contiguous input, and the barrier.

use std::ffi::c_char;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::CudaDType;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};
use cudarc::driver::DeviceRepr;
use cudarc::nccl::result::NcclError;
use cudarc::nccl::{Comm, Id, NcclType, ReduceOp};
use half::{bf16, f16};

use super::Communicator;

/// The size of an NCCL unique id (`ncclUniqueId`), in bytes.
pub const NCCL_ID_BYTES: usize = 128;

pub struct NcclCommunicator {
    comm: Comm,
    device: candle_core::CudaDevice,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may be used from any thread, but not from two at once. We hand
// out no shared access to `comm` (every collective takes `&mut self`, and the type is not
// `Sync`), so moving the whole communicator to another thread is sound. The CUDA context is
// bound to the calling thread before each NCCL call.
unsafe impl Send for NcclCommunicator {}

impl NcclCommunicator {
    /// Joins the communicator of `world` ranks identified by `id`, as `rank`, on the GPU of
    /// `device` (which must be a CUDA device). Blocks until every rank has joined.
    pub fn new(device: &Device, rank: usize, world: usize, id: Id) -> Result<Self> {
        if world == 0 || rank >= world {
            bail!("NCCL: rank {rank} is outside a world of {world}");
        }
        let device = device
            .as_cuda_device()
            .context("the NCCL communicator needs a CUDA device")?
            .clone();
        let stream = device.cuda_stream();
        // ncclCommInitRank picks the GPU that is current on the calling thread.
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context of {device:?}: {e:?}"))?;
        let comm = Comm::from_rank(stream, rank, world, id)
            .map_err(|e| nccl_error(e, &format!("ncclCommInitRank (rank {rank} of {world})")))?;
        Ok(NcclCommunicator {
            comm,
            device,
            rank,
            world,
        })
    }

    /// [`NcclCommunicator::new`] with an id that [`NcclCommunicator::unique_id_bytes`] made.
    pub fn from_id_bytes(device: &Device, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        Self::new(device, rank, world, id_from_bytes(id)?)
    }

    /// A fresh NCCL unique id, as the bytes to send to every rank. Call it in rank 0's process:
    /// it opens NCCL's bootstrap socket there.
    pub fn unique_id_bytes() -> Result<Vec<u8>> {
        let id = Id::new().map_err(|e| nccl_error(e, "ncclGetUniqueId"))?;
        Ok(id_to_bytes(&id))
    }

    fn bind(&self) -> Result<()> {
        self.comm
            .context()
            .bind_to_thread()
            .map_err(|e| anyhow!("binding the CUDA context of {:?}: {e:?}", self.device))
    }
}

/// The bytes of an NCCL unique id.
pub fn id_to_bytes(id: &Id) -> Vec<u8> {
    id.internal().iter().map(|&c| c as u8).collect()
}

/// An NCCL unique id from the bytes that [`id_to_bytes`] made.
pub fn id_from_bytes(bytes: &[u8]) -> Result<Id> {
    let bytes: &[u8; NCCL_ID_BYTES] = bytes.try_into().map_err(|_| {
        anyhow!(
            "an NCCL unique id is {NCCL_ID_BYTES} bytes, got {}",
            bytes.len()
        )
    })?;
    Ok(Id::uninit(bytes.map(|b| b as c_char)))
}

fn nccl_error(e: NcclError, what: &str) -> anyhow::Error {
    anyhow!("{what} failed: {:?}", e.0)
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// Out of place: `x` is left as it is (candle tensors may share storage, so reducing into
    /// `x`'s buffer could change other tensors). The result is contiguous, with `x`'s shape and
    /// dtype (bf16, f16 or f32).
    fn all_reduce_sum(&mut self, x: &Tensor) -> Result<Tensor> {
        if !x.device().same_device(&Device::Cuda(self.device.clone())) {
            bail!(
                "NCCL rank {}: the tensor is on {:?}, the communicator on {:?}",
                self.rank,
                x.device(),
                self.device
            );
        }
        match x.dtype() {
            DType::BF16 | DType::F16 | DType::F32 => {}
            dt => bail!("the NCCL communicator sums bf16, f16 and f32 tensors, got {dt:?}"),
        }
        if x.elem_count() == 0 {
            return Ok(x.clone());
        }
        self.bind()?;
        let x = x.contiguous()?;
        let sum = x
            .apply_op1_no_bwd(&AllReduceSum { comm: &self.comm })
            .with_context(|| format!("NCCL all-reduce on rank {}", self.rank))?;
        Ok(sum)
    }

    /// An all-reduce of one float, then a wait for it on the host: returns once every rank has
    /// entered the barrier (and all work this rank had enqueued before it is done).
    fn barrier(&mut self) -> Result<()> {
        self.bind()?;
        let mut one = self.device.alloc_zeros::<f32>(1)?;
        self.comm
            .all_reduce_in_place(&mut one, &ReduceOp::Sum)
            .map_err(|e| nccl_error(e, "ncclAllReduce (barrier)"))?;
        self.comm
            .stream()
            .synchronize()
            .map_err(|e| anyhow!("waiting for the NCCL barrier: {e:?}"))?;
        Ok(())
    }
}

/// The all-reduce as a candle op, so that its output is an ordinary candle CUDA tensor.
struct AllReduceSum<'a> {
    comm: &'a Comm,
}

impl AllReduceSum<'_> {
    fn reduce<T: CudaDType + DeviceRepr + NcclType>(
        &self,
        s: &CudaStorage,
        start: usize,
        end: usize,
    ) -> candle_core::Result<CudaStorage> {
        let device = s.device().clone();
        let src = s.as_cuda_slice::<T>()?.slice(start..end);
        // SAFETY: every element is written by the all-reduce before anyone reads it; both run
        // on the device's stream.
        let mut dst = unsafe { device.alloc::<T>(end - start)? };
        self.comm
            .all_reduce(&src, &mut dst, &ReduceOp::Sum)
            .map_err(|e| candle_core::Error::Msg(format!("ncclAllReduce failed: {:?}", e.0)))?;
        Ok(CudaStorage::wrap_cuda_slice(dst, device))
    }
}

impl CustomOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        s: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous tensor");
        };
        let out = match s.dtype() {
            DType::BF16 => self.reduce::<bf16>(s, start, end)?,
            DType::F16 => self.reduce::<f16>(s, start, end)?,
            DType::F32 => self.reduce::<f32>(s, start, end)?,
            dt => candle_core::bail!("the NCCL all-reduce does not sum {dt:?}"),
        };
        Ok((out, layout.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_bytes_round_trip() {
        let bytes: Vec<u8> = (0..NCCL_ID_BYTES).map(|i| (i * 7 + 200) as u8).collect();
        let id = id_from_bytes(&bytes).unwrap();
        assert_eq!(id_to_bytes(&id), bytes);
        assert!(id_from_bytes(&bytes[..127]).is_err());
        assert!(id_from_bytes(&[0u8; 129]).is_err());
    }

    /// One rank per visible GPU, each on its own thread. Needs a GPU: run with `--ignored`.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn nccl_all_reduce_on_every_gpu() {
        let world = cudarc::driver::CudaContext::device_count().unwrap() as usize;
        assert!(world > 0, "no CUDA device");
        let id = NcclCommunicator::unique_id_bytes().unwrap();
        let handles: Vec<_> = (0..world)
            .map(|rank| {
                let id = id.clone();
                std::thread::spawn(move || {
                    let device = Device::new_cuda(rank).unwrap();
                    let mut c = NcclCommunicator::from_id_bytes(&device, rank, world, &id).unwrap();
                    assert_eq!((c.rank(), c.world_size()), (rank, world));
                    c.barrier().unwrap();
                    // Rank r contributes (r + 1) * v, so the sum is world * (world + 1) / 2 * v.
                    let v: Vec<f32> = (0..4096).map(|i| (i % 5) as f32).collect();
                    let x = (Tensor::from_vec(v.clone(), (64, 64), &device).unwrap()
                        * (rank + 1) as f64)
                        .unwrap();
                    let k = (world * (world + 1) / 2) as f32;
                    let want: Vec<f32> = v.iter().map(|a| a * k).collect();
                    let s = c.all_reduce_sum(&x).unwrap();
                    assert_eq!(s.dims(), &[64, 64]);
                    assert_eq!(s.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
                    // bf16 (these small integers are exact), on a transposed (non-contiguous)
                    // view; the input must be left untouched.
                    let xb = x.to_dtype(DType::BF16).unwrap().t().unwrap();
                    let sb = c.all_reduce_sum(&xb).unwrap();
                    assert_eq!(sb.dtype(), DType::BF16);
                    let got = sb.t().unwrap().to_dtype(DType::F32).unwrap();
                    assert_eq!(got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want);
                    let back = xb.t().unwrap().to_dtype(DType::F32).unwrap();
                    let xv = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), xv);
                    c.barrier().unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}
