//! The worker's gRPC service (`helios.v1.Worker`): Health, Init and the Step stream.
//!
//! The forward pass is synchronous and CPU- or GPU-bound, so it runs on tokio's blocking pool;
//! the engine sits behind a mutex that only one step holds at a time. A refused plan is answered
//! in-band (`StepResult.error`); any other failure leaves this rank out of step with its peers,
//! so the process exits: peers see the connection drop and the coordinator sees the rank go.
//!
//! Every result says how long this rank waited for its plan since it sent the previous result
//! (`wait_us`), how long the step took (`compute_us`) and how much of that went to collectives
//! (`allreduce_us`), so the coordinator can tell its own share of the time between steps from
//! the ranks', and the all-reduce from the arithmetic.
//!
//! A plan the coordinator traces carries its step span's context (`StepPlan.trace_context`);
//! this rank's `worker_step` span is then its child, with the same times as attributes, so a
//! request's trace shows every rank's part of its steps. Untraced plans make no span.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use helios_proto::telemetry;
use helios_proto::v1::worker_server::Worker;
use helios_proto::v1::{
    HealthRequest, HealthResponse, InitRequest, InitResponse, StepPlan, StepResult,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
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
        let (tx, rx) = mpsc::channel(4);
        let rank = *self.rank.lock().map_err(internal)?;
        let rank = rank.map_or(-1, i64::from);
        tokio::spawn(step_loop(req.into_inner(), self.engine.clone(), tx, rank));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Steps the plans of one stream in order, answering each on `tx`, timed (see the module docs).
async fn step_loop(
    mut plans: impl Stream<Item = Result<StepPlan, Status>> + Unpin,
    engine: Arc<Mutex<Option<Engine>>>,
    tx: mpsc::Sender<Result<StepResult, Status>>,
    rank: i64,
) {
    // When the previous result was handed to the stream; `None` before the first plan.
    let mut sent_at: Option<Instant> = None;
    while let Some(plan) = plans.next().await {
        let plan = match plan {
            Ok(p) => p,
            Err(status) => {
                tracing::info!("step stream closed: {status}");
                return;
            }
        };
        let wait_us = sent_at.map_or(0, |t| micros(t.elapsed()));
        let span = step_span(&plan, rank, wait_us);
        let engine = engine.clone();
        let started = Instant::now();
        // The blocking step, with its hop to the blocking pool and the engine lock.
        let result = tokio::task::spawn_blocking(move || {
            let mut guard = engine.lock().map_err(|e| anyhow::anyhow!("{e}"))?;
            let engine = guard
                .as_mut()
                .ok_or_else(|| anyhow::anyhow!("step before init"))?;
            let step_id = plan.step_id;
            engine
                .step(plan)
                .or_else(|e| match e.downcast_ref::<InvalidPlan>() {
                    Some(inv) => Ok(StepResult {
                        step_id,
                        error: inv.to_string(),
                        ..Default::default()
                    }),
                    None => Err(e),
                })
        })
        .await;
        let compute_us = micros(started.elapsed());
        match result {
            Ok(Ok(r)) => {
                span.record("forward_us", compute_us);
                span.record("allreduce_us", r.allreduce_us);
                if !r.error.is_empty() {
                    span.record("error", r.error.as_str());
                }
                drop(span);
                let r = StepResult {
                    wait_us,
                    compute_us,
                    ..r
                };
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
                sent_at = Some(Instant::now());
            }
            Ok(Err(e)) => fatal(&tx, format!("{e:#}")).await,
            Err(e) => fatal(&tx, format!("step task failed: {e}")).await,
        }
    }
}

/// This rank's span for a step: a child of the coordinator's step span when the plan carries
/// its context, none otherwise (the coordinator does not trace the step).
fn step_span(plan: &StepPlan, rank: i64, wait_us: u64) -> tracing::Span {
    let Some(parent) = telemetry::extract_map(&plan.trace_context) else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        "worker_step",
        rank,
        step_id = plan.step_id,
        seqs = plan.seqs.len(),
        wait_us,
        forward_us = tracing::field::Empty,
        allreduce_us = tracing::field::Empty,
        error = tracing::field::Empty,
    );
    telemetry::set_parent(&span, parent);
    span
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

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// This rank can no longer keep in step with its peers: say why, then exit.
async fn fatal(tx: &mpsc::Sender<Result<StepResult, Status>>, msg: String) -> ! {
    tracing::error!("fatal step error, exiting: {msg}");
    let _ = tx.send(Err(Status::internal(msg))).await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    std::process::exit(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use helios_proto::v1::SequenceStep;

    use crate::comm::SingleRank;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn results_say_how_long_the_rank_waited_and_computed() {
        let dir = tempfile::tempdir().unwrap();
        helios_tests::make_tiny_model(dir.path(), 6, &[]).unwrap();
        let engine = Engine::load(&EngineOptions::cpu(dir.path()), Box::new(SingleRank)).unwrap();
        let (plan_tx, plan_rx) = mpsc::channel(4);
        let (tx, mut results) = mpsc::channel(4);
        tokio::spawn(step_loop(
            ReceiverStream::new(plan_rx),
            Arc::new(Mutex::new(Some(engine))),
            tx,
            0,
        ));
        let plan = |step_id: u64, token_ids: Vec<u32>| StepPlan {
            step_id,
            seqs: vec![SequenceStep {
                seq_id: 1,
                token_ids,
                block_table: vec![0],
                sample: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        let mut next = async |p: StepPlan| {
            plan_tx.send(Ok(p)).await.unwrap();
            results.recv().await.unwrap().unwrap()
        };
        let first = next(plan(0, vec![1, 2, 3])).await;
        assert_eq!(first.error, "");
        assert_eq!(
            first.wait_us, 0,
            "the first plan of a stream waited for nothing"
        );
        assert!(first.compute_us > 0, "a forward pass took no time");
        // The coordinator takes its time; then a refused plan, timed all the same.
        let pause = Duration::from_millis(200);
        tokio::time::sleep(pause).await;
        let refused = next(plan(1, vec![])).await;
        assert_ne!(refused.error, "");
        assert!(
            refused.wait_us >= pause.as_micros() as u64,
            "waited {} µs",
            refused.wait_us
        );
        assert!(
            refused.wait_us < 60_000_000,
            "waited {} µs",
            refused.wait_us
        );
        let third = next(plan(2, vec![4])).await;
        assert!(third.wait_us < refused.wait_us, "the gap was not reset");
        assert!(third.compute_us > 0);
    }
}
