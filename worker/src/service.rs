//! The worker's gRPC service (`helios.v1.Worker`): Health, Init and the Step stream.
//!
//! The forward pass is synchronous and CPU- or GPU-bound, so it runs on tokio's blocking pool;
//! the engine sits behind a mutex that only one step holds at a time. A refused plan is answered
//! in-band (`StepResult.error`); any other failure leaves this rank out of step with its peers,
//! so the process exits: peers see the connection drop and the coordinator sees the rank go.

use std::sync::{Arc, Mutex};

use candle_core::Device;
use helios_proto::v1::worker_server::Worker;
use helios_proto::v1::{
    HealthRequest, HealthResponse, InitRequest, InitResponse, StepPlan, StepResult,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::batch::InvalidPlan;
use crate::comm::{Communicator, SingleRank, TcpCommunicator, TcpListenerSlot};
use crate::engine::{Engine, EngineOptions};

pub struct WorkerService {
    comm_addr: String,
    /// CUDA: an NCCL unique id made here, offered in Health (used if this worker is rank 0).
    nccl_id: Vec<u8>,
    device: Device,
    /// The communicator listener, consumed by Init.
    comm_slot: Mutex<Option<TcpListenerSlot>>,
    engine: Arc<Mutex<Option<Engine>>>,
    rank: Mutex<Option<u32>>,
}

impl WorkerService {
    pub fn new(comm_slot: TcpListenerSlot, device: Device) -> anyhow::Result<Self> {
        Ok(Self {
            comm_addr: comm_slot.local_addr()?.to_string(),
            nccl_id: nccl_id_for(&device)?,
            device,
            comm_slot: Mutex::new(Some(comm_slot)),
            engine: Arc::new(Mutex::new(None)),
            rank: Mutex::new(None),
        })
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        let rank = *self.rank.lock().map_err(internal)?;
        Ok(Response::new(HealthResponse {
            comm_addr: self.comm_addr.clone(),
            initialized: rank.is_some(),
            rank: rank.map_or(-1, |r| r as i32),
            nccl_id: self.nccl_id.clone(),
        }))
    }

    #[tracing::instrument(skip_all, fields(rank = req.get_ref().rank, world = req.get_ref().world_size))]
    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let req = req.into_inner();
        let (rank, world) = (req.rank as usize, req.world_size as usize);
        if world == 0 || rank >= world || req.peer_addrs.len() != world {
            return Err(Status::invalid_argument(format!(
                "rank {rank} of world {world} with {} peer addresses",
                req.peer_addrs.len()
            )));
        }
        let slot = self
            .comm_slot
            .lock()
            .map_err(internal)?
            .take()
            .ok_or_else(|| Status::failed_precondition("this worker is already initialized"))?;
        let opts = EngineOptions {
            model_path: req.model_path.clone().into(),
            block_size: if req.block_size == 0 {
                16
            } else {
                req.block_size as usize
            },
            num_kv_blocks: (req.num_kv_blocks > 0).then_some(req.num_kv_blocks as usize),
            kv_cache_memory_bytes: req.kv_cache_memory_bytes,
            dequantize: req.dequantize,
            device: self.device.clone(),
        };
        let peers = req.peer_addrs.clone();
        let nccl_id = req.nccl_id.clone();
        let engine = tokio::task::spawn_blocking(move || -> anyhow::Result<Engine> {
            let comm = communicator(&opts.device, &slot, rank, &peers, &nccl_id)?;
            Engine::load(&opts, comm)
        })
        .await
        .map_err(internal)?
        .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        let resp = InitResponse {
            num_kv_blocks: engine.num_blocks() as u32,
            model: Some(engine.facts()),
        };
        tracing::info!(blocks = resp.num_kv_blocks, "initialized");
        *self.engine.lock().map_err(internal)? = Some(engine);
        *self.rank.lock().map_err(internal)? = Some(rank as u32);
        Ok(Response::new(resp))
    }

    type StepStream = ReceiverStream<Result<StepResult, Status>>;

    async fn step(
        &self,
        req: Request<Streaming<StepPlan>>,
    ) -> Result<Response<Self::StepStream>, Status> {
        let mut plans = req.into_inner();
        let engine = self.engine.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            while let Some(plan) = plans.message().await.transpose() {
                let plan = match plan {
                    Ok(p) => p,
                    Err(status) => {
                        tracing::info!("step stream closed: {status}");
                        return;
                    }
                };
                let engine = engine.clone();
                let result = tokio::task::spawn_blocking(move || {
                    let mut guard = engine.lock().map_err(|e| anyhow::anyhow!("{e}"))?;
                    let engine = guard
                        .as_mut()
                        .ok_or_else(|| anyhow::anyhow!("step before init"))?;
                    engine
                        .step(&plan)
                        .map_err(|e| (plan.step_id, e))
                        .or_else(|(id, e)| match e.downcast_ref::<InvalidPlan>() {
                            Some(inv) => Ok(StepResult {
                                step_id: id,
                                error: inv.to_string(),
                                ..Default::default()
                            }),
                            None => Err(e),
                        })
                })
                .await;
                match result {
                    Ok(Ok(r)) => {
                        if tx.send(Ok(r)).await.is_err() {
                            return;
                        }
                    }
                    Ok(Err(e)) => fatal(&tx, format!("{e:#}")).await,
                    Err(e) => fatal(&tx, format!("step task failed: {e}")).await,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// The all-reduce for this rank: none alone, NCCL between GPUs, the TCP mesh on the CPU.
fn communicator(
    device: &Device,
    slot: &TcpListenerSlot,
    rank: usize,
    peers: &[String],
    nccl_id: &[u8],
) -> anyhow::Result<Box<dyn Communicator>> {
    let world = peers.len();
    if world == 1 {
        return Ok(Box::new(SingleRank));
    }
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return Ok(Box::new(crate::comm::NcclCommunicator::from_id_bytes(
            device, rank, world, nccl_id,
        )?));
    }
    let _ = (device, nccl_id);
    Ok(Box::new(TcpCommunicator::connect(slot, rank, peers)?))
}

fn nccl_id_for(device: &Device) -> anyhow::Result<Vec<u8>> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return crate::comm::NcclCommunicator::unique_id_bytes();
    }
    let _ = device;
    Ok(Vec::new())
}

/// This rank can no longer keep in step with its peers: say why, then exit.
async fn fatal(tx: &mpsc::Sender<Result<StepResult, Status>>, msg: String) -> ! {
    tracing::error!("fatal step error, exiting: {msg}");
    let _ = tx.send(Err(Status::internal(msg))).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::process::exit(1)
}
