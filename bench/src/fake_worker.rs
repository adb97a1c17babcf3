//! A zero-cost fake of `helios-worker`: the real `helios.v1.Worker` gRPC service with no model
//! behind it, so that what a benchmark measures through it is the coordinator alone.
//!
//! Init answers fixed model facts (SmolLM2-135M's vocabulary, an unbounded length) and as many KV
//! blocks as asked; Step answers every plan at once. Rank 0 samples, for each sequence with
//! `sample` set, token `text[(seq_id + output_index) % text.len()]` of a fixed list of ordinary
//! text tokens: every request streams real text (the detokenizer does its usual work) and never
//! an end-of-sequence token. Answers wait until the `gate` opens, so that a benchmark can queue
//! all its requests before the first one runs away (a request of a thousand tokens takes a few
//! milliseconds here, less than connecting the next client). Each rank records every plan it receives (arrival time, sequences,
//! encoded size), which is how the benchmark counts steps without touching the coordinator.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, Result};
use helios_proto::v1::worker_server::{Worker, WorkerServer};
use helios_proto::v1::{
    HealthRequest, HealthResponse, InitRequest, InitResponse, ModelFacts, SampledToken, StepPlan,
    StepResult,
};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status, Streaming};

/// One plan as a rank saw it.
#[derive(Debug, Clone, Copy)]
pub struct StepRecord {
    pub at: Instant,
    pub seqs: usize,
    /// Every sequence of the plan feeds one token and samples (pure decode).
    pub all_decode: bool,
    /// `StepPlan::encoded_len`.
    pub plan_bytes: usize,
    /// Sum over sequences of the positions computed so far (`start_pos`).
    pub context_positions: u64,
    /// The value of the benchmark's probe counter when the plan arrived (e.g. tokens its
    /// clients have received), so other progress can be read at exactly the same steps.
    pub probe: u64,
}

/// What a fake rank records; shared with the benchmark.
#[derive(Debug, Default)]
pub struct Recorder {
    pub steps: Mutex<Vec<StepRecord>>,
    pub probe: AtomicU64,
}

impl Recorder {
    pub fn len(&self) -> usize {
        self.steps.lock().map_or(0, |s| s.len())
    }

    pub fn snapshot(&self) -> Vec<StepRecord> {
        self.steps.lock().map_or_else(|_| Vec::new(), |s| s.clone())
    }
}

#[derive(Debug, Clone)]
pub struct FakeOptions {
    pub rank0: bool,
    pub num_kv_blocks: u32,
    pub vocab_size: u32,
    /// Token ids rank 0 cycles through.
    pub text: Arc<Vec<u32>>,
    /// No plan is answered before this is true.
    pub gate: watch::Receiver<bool>,
}

struct FakeWorker {
    opts: FakeOptions,
    recorder: Arc<Recorder>,
}

#[tonic::async_trait]
impl Worker for FakeWorker {
    async fn health(&self, _: Request<HealthRequest>) -> Result<Response<HealthResponse>, Status> {
        Ok(Response::new(HealthResponse {
            comm_addr: String::new(),
            initialized: false,
            rank: -1,
            nccl_id: Vec::new(),
            generation: 0,
        }))
    }

    async fn init(&self, req: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let req = req.into_inner();
        Ok(Response::new(InitResponse {
            num_kv_blocks: self.opts.num_kv_blocks,
            model: Some(ModelFacts {
                architecture: "llama".into(),
                vocab_size: self.opts.vocab_size,
                num_layers: 30,
                hidden_size: 576,
                num_heads: 9,
                num_kv_heads: 3,
                max_position_embeddings: 1 << 20,
                dtype: "fake".into(),
                block_size: if req.block_size == 0 {
                    16
                } else {
                    req.block_size
                },
            }),
        }))
    }

    type StepStream = ReceiverStream<Result<StepResult, Status>>;

    async fn step(
        &self,
        req: Request<Streaming<StepPlan>>,
    ) -> Result<Response<Self::StepStream>, Status> {
        let mut plans = req.into_inner();
        let (opts, recorder) = (self.opts.clone(), self.recorder.clone());
        let (tx, rx) = mpsc::channel(4);
        let mut gate = opts.gate.clone();
        tokio::spawn(async move {
            // A broken stream (the coordinator left) ends the task like a closed one.
            while let Ok(Some(plan)) = plans.message().await {
                if gate.wait_for(|open| *open).await.is_err() {
                    return;
                }
                record(&recorder, &plan);
                if tx.send(Ok(answer(&opts, &plan))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn record(recorder: &Recorder, plan: &StepPlan) {
    let rec = StepRecord {
        at: Instant::now(),
        seqs: plan.seqs.len(),
        all_decode: plan
            .seqs
            .iter()
            .all(|s| s.sample && (s.token_ids.len() == 1 || s.feed_sampled) && s.start_pos > 0),
        plan_bytes: plan.encoded_len(),
        context_positions: plan.seqs.iter().map(|s| u64::from(s.start_pos)).sum(),
        probe: recorder.probe.load(Ordering::Relaxed),
    };
    if let Ok(mut steps) = recorder.steps.lock() {
        steps.push(rec);
    }
}

fn answer(opts: &FakeOptions, plan: &StepPlan) -> StepResult {
    let tokens = if opts.rank0 && !opts.text.is_empty() {
        plan.seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| {
                let i = s.sampling.as_ref().map_or(0, |p| p.output_index) as u64;
                let at = (s.seq_id.wrapping_add(i) % opts.text.len() as u64) as usize;
                SampledToken {
                    seq_id: s.seq_id,
                    token_id: opts.text[at],
                    logprob: -0.5,
                    top_logprobs: Vec::new(),
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    StepResult {
        step_id: plan.step_id,
        tokens,
        ..Default::default()
    }
}

/// A fake rank serving on a loopback port of the current runtime; stops when dropped.
pub struct FakeRank {
    pub addr: SocketAddr,
    pub recorder: Arc<Recorder>,
    _stop: oneshot::Sender<()>,
}

impl FakeRank {
    pub async fn start(opts: FakeOptions) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a loopback port for a fake worker")?;
        let addr = listener.local_addr()?;
        let recorder = Arc::new(Recorder::default());
        let service = WorkerServer::new(FakeWorker {
            opts,
            recorder: recorder.clone(),
        })
        .max_decoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES)
        .max_encoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                eprintln!("fake worker on {addr}: {e}");
            }
        });
        Ok(Self {
            addr,
            recorder,
            _stop: stop,
        })
    }
}
