//! The worker's gRPC service (`helios.v1.Worker`): Health, Init and the Step stream.
//!
//! The forward pass is synchronous and CPU- or GPU-bound, so it runs on tokio's blocking pool;
//! the engine sits behind a mutex that only one step holds at a time. A refused plan is answered
//! in-band (`StepResult.error`); any other failure (a peer lost mid-collective) leaves this rank
//! out of step with its peers: it ends the step stream with the error and waits, weights
//! loaded, for the coordinator to rebuild the replica under a new generation
//! (`InitRequest.generation`). That Init first closes every rank's current mesh, which frees a
//! peer still blocked in a collective. Plans of another generation are refused, so a stale plan
//! never runs on a new mesh.
//!
//! Every result says how long this rank waited for its plan since it sent the previous result
//! (`wait_us`), how long the step took (`compute_us`) and how much of that went to collectives
//! (`allreduce_us`), so the coordinator can tell its own share of the time between steps from
//! the ranks', and the all-reduce from the arithmetic.
//!
//! A plan the coordinator traces carries its step span's context (`StepPlan.trace_context`);
//! this rank's `worker_step` span is then its child, with the same times as attributes, so a
//! request's trace shows every rank's part of its steps. Untraced plans make no span.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::Device;
use helios_proto::telemetry;
use helios_proto::v1::worker_server::Worker;
use helios_proto::v1::{
    HealthRequest, HealthResponse, InitRequest, InitResponse, StepPlan, StepResult,
};
use helios_proto::LoadFormat;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::batch::InvalidPlan;
use crate::comm::{
    Communicator, MeshAbort, MeshCall, ShmCommunicator, SingleRank, TcpCommunicator,
    TcpListenerSlot,
};
use crate::engine::{Engine, EngineOptions};

pub struct WorkerService {
    /// The communicator address peers dial: the advertised host, the bound port.
    comm_addr: String,
    device: Device,
    /// The communicator listener; every generation's mesh accepts on it.
    comm_slot: Arc<TcpListenerSlot>,
    /// The newest generation an Init asked for: a mesh of an older one being built gives up.
    newest: Arc<AtomicU64>,
    /// Closes the current mesh's sockets: a new Init frees a step blocked on a lost peer.
    mesh_abort: Mutex<Option<Arc<MeshAbort>>>,
    /// One Init at a time.
    init_lock: tokio::sync::Mutex<()>,
    loaded: Arc<Mutex<Option<Loaded>>>,
    /// The rank of the latest Init that succeeded; -1 before.
    rank: AtomicI32,
    /// The model this worker was started with (`--model`): loaded when an Init names none.
    model: Option<String>,
}

/// This rank's engine and the replica build (generation) it belongs to.
struct Loaded {
    engine: Engine,
    shape: InitShape,
    generation: u64,
    /// Why this rank left its mesh (a step failed mid-collective): it takes no more steps
    /// until an Init of a newer generation.
    broken: Option<String>,
}

/// What an Init loads: a later Init with the same shape keeps the weights and KV memory and
/// only joins the new mesh.
#[derive(Debug, Clone, PartialEq)]
struct InitShape {
    rank: usize,
    world: usize,
    model_path: String,
    block_size: u32,
    num_kv_blocks: u32,
    kv_cache_memory_bytes: u64,
    dequantize: bool,
    load_format: String,
}

impl InitShape {
    fn of(req: &InitRequest) -> Self {
        Self {
            rank: req.rank as usize,
            world: req.world_size as usize,
            model_path: req.model_path.clone(),
            block_size: req.block_size,
            num_kv_blocks: req.num_kv_blocks,
            kv_cache_memory_bytes: req.kv_cache_memory_bytes,
            dequantize: req.dequantize,
            load_format: req.load_format.clone(),
        }
    }
}

impl WorkerService {
    /// `comm_addr` is the communicator address peers dial (see `helios-worker --advertise`).
    pub fn new(comm_slot: TcpListenerSlot, comm_addr: String, device: Device) -> Self {
        Self {
            comm_addr,
            device,
            comm_slot: Arc::new(comm_slot),
            newest: Arc::new(AtomicU64::new(0)),
            mesh_abort: Mutex::new(None),
            init_lock: tokio::sync::Mutex::new(()),
            loaded: Arc::new(Mutex::new(None)),
            rank: AtomicI32::new(-1),
            model: None,
        }
    }

    /// Loads `model` when an Init names no model (etcd mode: the worker registered it).
    pub fn with_model(self, model: String) -> Self {
        Self {
            model: Some(model),
            ..self
        }
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

#[tonic::async_trait]
impl Worker for WorkerService {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        // Not from `loaded`: a step holds that lock, and Health answers during steps.
        let rank = self.rank.load(Ordering::SeqCst);
        Ok(Response::new(HealthResponse {
            comm_addr: self.comm_addr.clone(),
            initialized: rank >= 0,
            rank,
            nccl_id: nccl_id_for(&self.device).map_err(internal)?,
            generation: self.newest.load(Ordering::SeqCst),
        }))
    }

    #[tracing::instrument(skip_all, fields(rank = req.get_ref().rank, world = req.get_ref().world_size, generation = req.get_ref().generation))]
    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let req = req.into_inner();
        let (rank, world) = (req.rank as usize, req.world_size as usize);
        if world == 0 || rank >= world || req.peer_addrs.len() != world {
            return Err(Status::invalid_argument(format!(
                "rank {rank} of world {world} with {} peer addresses",
                req.peer_addrs.len()
            )));
        }
        let mut req = req;
        if req.model_path.is_empty() {
            req.model_path = self.model.clone().ok_or_else(|| {
                Status::invalid_argument(
                    "no model named, and this worker was started without --model",
                )
            })?;
        }
        let generation = req.generation;
        let previous = self.newest.fetch_max(generation, Ordering::SeqCst);
        if generation <= previous {
            return Err(Status::failed_precondition(format!(
                "generation {generation} is not newer than generation {previous} this worker was asked for"
            )));
        }
        let opts = engine_options(&req, &self.device)?;
        // Leave the current mesh: a step blocked on a lost peer fails now and frees the engine.
        if let Some(abort) = self.mesh_abort.lock().map_err(internal)?.take() {
            abort.abort();
        }
        let _one_init = self.init_lock.lock().await;
        let shape = InitShape::of(&req);
        let join = MeshJoin {
            slot: self.comm_slot.clone(),
            newest: self.newest.clone(),
            peers: req.peer_addrs.clone(),
            nccl_id: req.nccl_id.clone(),
            generation,
        };
        let loaded = self.loaded.clone();
        let (resp, abort) =
            tokio::task::spawn_blocking(move || load_or_rejoin(&loaded, &join, &opts, shape))
                .await
                .map_err(internal)?
                .map_err(|e| Status::failed_precondition(format!("{e:#}")))?;
        *self.mesh_abort.lock().map_err(internal)? = abort;
        self.rank.store(rank as i32, Ordering::SeqCst);
        tracing::info!(blocks = resp.num_kv_blocks, "initialized");
        Ok(Response::new(resp))
    }

    type StepStream = ReceiverStream<Result<StepResult, Status>>;

    async fn step(
        &self,
        req: Request<Streaming<StepPlan>>,
    ) -> Result<Response<Self::StepStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(step_loop(req.into_inner(), self.loaded.clone(), tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// What an Init asks the engine for.
fn engine_options(req: &InitRequest, device: &Device) -> Result<EngineOptions, Status> {
    let load_format = LoadFormat::parse(&req.load_format)
        .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
    Ok(EngineOptions {
        model_path: req.model_path.clone().into(),
        block_size: if req.block_size == 0 {
            helios_proto::DEFAULT_BLOCK_SIZE as usize
        } else {
            req.block_size as usize
        },
        num_kv_blocks: (req.num_kv_blocks > 0).then_some(req.num_kv_blocks as usize),
        kv_cache_memory_bytes: req.kv_cache_memory_bytes,
        dequantize: req.dequantize,
        load_format,
        device: device.clone(),
    })
}

/// Joins the mesh of `join.generation`, then keeps the engine already loaded with `shape`
/// (only its mesh changes) or loads one. Blocks: waits for a step still running (it fails fast,
/// its mesh being closed) and for the model to load.
fn load_or_rejoin(
    loaded: &Mutex<Option<Loaded>>,
    join: &MeshJoin,
    opts: &EngineOptions,
    shape: InitShape,
) -> anyhow::Result<(InitResponse, Option<Arc<MeshAbort>>)> {
    let mut guard = loaded.lock().map_err(|e| anyhow::anyhow!("{e}"))?;
    let (comm, abort) = join.communicator(&opts.device, shape.rank)?;
    let engine = match guard.take() {
        Some(mut l) if l.shape == shape => {
            l.engine.rejoin(comm)?;
            tracing::info!("rejoined with the weights kept");
            l.engine
        }
        _ => Engine::load(opts, comm)?,
    };
    let resp = InitResponse {
        num_kv_blocks: engine.num_blocks() as u32,
        model: Some(engine.facts()),
    };
    *guard = Some(Loaded {
        engine,
        shape,
        generation: join.generation,
        broken: None,
    });
    Ok((resp, abort))
}

/// A rank's communicator and, for the CPU mesh, the handle that closes it.
type Joined = (Box<dyn Communicator>, Option<Arc<MeshAbort>>);

/// How to join the mesh of one generation.
struct MeshJoin {
    slot: Arc<TcpListenerSlot>,
    newest: Arc<AtomicU64>,
    peers: Vec<String>,
    nccl_id: Vec<u8>,
    generation: u64,
}

impl MeshJoin {
    /// The all-reduce for this rank (none alone, NCCL between GPUs, on the CPU the TCP mesh,
    /// moved onto shared memory when every rank is on this host) and, for the CPU mesh, the
    /// handle that closes it.
    fn communicator(&self, device: &Device, rank: usize) -> anyhow::Result<Joined> {
        let world = self.peers.len();
        if world == 1 {
            return Ok((Box::new(SingleRank), None));
        }
        #[cfg(feature = "cuda")]
        if device.is_cuda() {
            let comm =
                crate::comm::NcclCommunicator::from_id_bytes(device, rank, world, &self.nccl_id)?;
            return Ok((Box::new(comm), None));
        }
        let _ = (device, &self.nccl_id);
        let call = MeshCall {
            rank,
            peer_addrs: &self.peers,
            generation: self.generation,
            newest: &self.newest,
        };
        let comm = ShmCommunicator::attach(TcpCommunicator::connect(&self.slot, &call)?)?;
        let abort = comm.abort_handle();
        Ok((Box::new(comm), Some(abort)))
    }
}

/// Steps the plans of one stream in order, answering each on `tx`, timed (see the module docs).
/// A plan that cannot be read ends the stream with that status.
///
/// A plan of another generation than this rank's is refused and ends the stream. A step that
/// fails other than by refusing its plan (a peer was lost mid-collective) leaves this rank out
/// of step with its peers: the rank takes no more steps until the coordinator rebuilds the
/// replica (an Init of a newer generation), and the stream ends with the error. The process
/// stays up, with its weights, for that rebuild.
async fn step_loop(
    mut plans: impl Stream<Item = Result<StepPlan, Status>> + Unpin,
    loaded: Arc<Mutex<Option<Loaded>>>,
    tx: mpsc::Sender<Result<StepResult, Status>>,
) {
    let rank = match loaded.lock() {
        Ok(l) => l.as_ref().map_or(-1, |l| l.shape.rank as i64),
        Err(_) => -1,
    };
    // When the previous result was handed to the stream; `None` before the first plan.
    let mut sent_at: Option<Instant> = None;
    while let Some(plan) = plans.next().await {
        let plan = match plan {
            Ok(p) => p,
            Err(status) => {
                // A plan that could not be read (tonic could not decode it, or the stream
                // broke) is answered with why: ending the stream without a word would look
                // like success to the peer, its plan unanswered.
                tracing::info!("step stream closed: {status}");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let wait_us = sent_at.map_or(0, |t| micros(t.elapsed()));
        let span = step_span(&plan, rank, wait_us);
        let loaded = loaded.clone();
        let started = Instant::now();
        // The blocking step, with its hop to the blocking pool and the engine lock.
        let result = tokio::task::spawn_blocking(move || step_one(&loaded, plan)).await;
        let compute_us = micros(started.elapsed());
        let r = match result {
            Ok(Ok(r)) => r,
            Ok(Err(status)) => {
                tracing::error!("leaving the step stream: {}", status.message());
                let _ = tx.send(Err(status)).await;
                return;
            }
            Err(e) => {
                let _ = tx
                    .send(Err(internal(format!("step task failed: {e}"))))
                    .await;
                return;
            }
        };
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
}

/// Runs one plan on this rank's engine (see [`step_loop`] for what is refused).
fn step_one(loaded: &Mutex<Option<Loaded>>, plan: StepPlan) -> Result<StepResult, Status> {
    let mut guard = loaded.lock().map_err(internal)?;
    let l = guard
        .as_mut()
        .ok_or_else(|| Status::failed_precondition("step before init"))?;
    if let Some(why) = &l.broken {
        return Err(Status::failed_precondition(format!(
            "this rank left generation {} ({why}) and waits to be initialized again",
            l.generation
        )));
    }
    if plan.generation != l.generation {
        return Err(Status::failed_precondition(format!(
            "a plan of generation {} reached a rank of generation {}",
            plan.generation, l.generation
        )));
    }
    let step_id = plan.step_id;
    match l.engine.step(plan) {
        Ok(r) => Ok(r),
        Err(e) => match e.downcast_ref::<InvalidPlan>() {
            Some(inv) => Ok(StepResult {
                step_id,
                error: inv.to_string(),
                ..Default::default()
            }),
            None => {
                let why = format!("{e:#}");
                l.broken = Some(why.clone());
                Err(Status::internal(why))
            }
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use helios_proto::v1::SequenceStep;

    use crate::comm::SingleRank;

    /// A plan tonic could not decode (fuzzing found it) ends the stream with tonic's status,
    /// never silently: before, the stream ended OK and the plan went unanswered.
    #[tokio::test]
    async fn a_plan_that_cannot_be_read_ends_the_stream_with_its_status() {
        let plans = tokio_stream::iter(vec![Err(Status::internal(
            "failed to decode Protobuf message: invalid wire type",
        ))]);
        let (tx, mut results) = mpsc::channel(4);
        step_loop(plans, Arc::new(Mutex::new(None)), tx).await;
        let status = results
            .recv()
            .await
            .expect("an answer")
            .expect_err("an error status");
        assert_eq!(status.code(), tonic::Code::Internal);
        assert!(status.message().contains("failed to decode"), "{status}");
        assert!(results.recv().await.is_none(), "the stream ends after it");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn results_say_how_long_the_rank_waited_and_computed() {
        let dir = tempfile::tempdir().unwrap();
        helios_tests::make_tiny_model(dir.path(), 6, &[]).unwrap();
        let engine = Engine::load(&EngineOptions::cpu(dir.path()), Box::new(SingleRank)).unwrap();
        let (plan_tx, plan_rx) = mpsc::channel(4);
        let (tx, mut results) = mpsc::channel(4);
        let loaded = Loaded {
            engine,
            shape: InitShape::of(&InitRequest::default()),
            generation: 0,
            broken: None,
        };
        tokio::spawn(step_loop(
            ReceiverStream::new(plan_rx),
            Arc::new(Mutex::new(Some(loaded))),
            tx,
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
