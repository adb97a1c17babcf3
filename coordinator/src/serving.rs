//! The front door of a replica, used by the gRPC server, the OpenAI-compatible HTTP API and
//! `helios generate` alike: admission in the caller's task, then a hand-off to the [`StepLoop`].
//!
//! Tokenizing and rendering the chat template run on the blocking pool: a long prompt costs its
//! own request time, never the runtime's other tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use helios_proto::v1::{
    DetokenizeRequest, DetokenizeResponse, GenerateRequest, ModelInfoResponse, TokenizeRequest,
    TokenizeResponse,
};
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::admission::{self, Limits};
use crate::metrics::{Metrics, Snapshot};
use crate::output::{InFlight, RequestOutput, ResponseReceiver};
use crate::request_trace::{Arrival, RequestTrace};
use crate::scheduler::SchedulerConfig;
use crate::sharded_client::{RanksUp, ReplicaInfo, ShardedClient};
use crate::step_loop::{LoopMessage, LoopStats, NewRequest, Observers, ReplicaState, StepLoop};
use crate::tokenizer::TextTokenizer;

/// How the replica is scheduled and observed.
#[derive(Debug, Clone)]
pub struct ServingOptions {
    /// Shown in ModelInfo.
    pub model_name: String,
    pub scheduler: SchedulerConfig,
    /// Plan step N+1 while the ranks run step N (see `step_loop`).
    pub overlap: bool,
    /// Put prompt text in the log line of every request (off: it may be private).
    pub log_prompts: bool,
    /// Spans are exported (`helios_proto::telemetry`): steps get spans too.
    pub tracing: bool,
}

/// What the transport knows of a call besides its message.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// Past it the request is dropped wherever it is and answered DEADLINE_EXCEEDED.
    pub deadline: Option<Instant>,
    /// The client's trace context (a W3C `traceparent` in its metadata or headers).
    pub trace_parent: Option<opentelemetry::Context>,
}

#[derive(Clone)]
pub struct Serving {
    tokenizer: Arc<TextTokenizer>,
    limits: Limits,
    info: Arc<ModelInfoResponse>,
    requests: mpsc::UnboundedSender<LoopMessage>,
    stats: Arc<LoopStats>,
    metrics: Arc<Metrics>,
    ranks_up: RanksUp,
    log_prompts: bool,
    state: Arc<watch::Sender<ReplicaState>>,
    in_flight: InFlight,
    next_request: Arc<AtomicU64>,
}

impl Serving {
    /// Starts the step loop over an initialised replica.
    pub fn start(
        client: ShardedClient,
        replica: &ReplicaInfo,
        tokenizer: TextTokenizer,
        opts: &ServingOptions,
    ) -> Self {
        let facts = &replica.facts;
        let scheduler = replica.scheduler(opts.scheduler);
        let info = ModelInfoResponse {
            model: opts.model_name.clone(),
            architecture: facts.architecture.clone(),
            tensor_parallel_size: client.world_size() as u32,
            max_model_len: facts.max_position_embeddings,
            vocab_size: facts.vocab_size,
            dtype: facts.dtype.clone(),
            kv_block_size: facts.block_size,
            kv_blocks_total: replica.num_kv_blocks,
            ..Default::default()
        };
        let limits = Limits {
            max_model_len: facts.max_position_embeddings as usize,
            vocab_size: facts.vocab_size as usize,
            kv_capacity: replica.num_kv_blocks as usize * facts.block_size as usize,
        };
        let tokenizer = Arc::new(tokenizer);
        let stats = Arc::new(LoopStats::default());
        stats
            .kv_blocks_free
            .store(replica.num_kv_blocks, Ordering::Relaxed);
        let state = Arc::new(watch::Sender::new(ReplicaState::Serving));
        let (requests, rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::new(client.world_size()));
        let ranks_up = client.ranks_up();
        let observers = Observers {
            stats: stats.clone(),
            metrics: metrics.clone(),
            tracing: opts.tracing,
        };
        let step_loop = StepLoop::new(
            client,
            scheduler,
            tokenizer.clone(),
            rx,
            observers,
            state.clone(),
            opts.overlap,
        );
        let task = tokio::spawn(step_loop.run());
        // A step loop that panics (a bug) takes the replica down visibly: health, ModelInfo
        // and new requests say so, and streams in flight end with an error (ResponseStream).
        let supervised = state.clone();
        tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::error!("the step loop failed: {e}");
                supervised.send_replace(ReplicaState::Down(format!("the step loop failed: {e}")));
            }
        });
        Self {
            tokenizer,
            limits,
            info: Arc::new(info),
            requests,
            stats,
            metrics,
            ranks_up,
            log_prompts: opts.log_prompts,
            state,
            in_flight: InFlight::default(),
            next_request: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The model's tokenizer (the HTTP API shows logprobs' tokens as text).
    pub fn tokenizer(&self) -> Arc<TextTokenizer> {
        self.tokenizer.clone()
    }

    pub fn state(&self) -> watch::Receiver<ReplicaState> {
        self.state.subscribe()
    }

    /// Stops admitting, lets requests in flight finish for up to `grace`, then ends the rest
    /// with finish reason CANCELLED.
    pub async fn drain(&self, grace: Duration) {
        self.state.send_if_modified(|s| {
            let serving = *s == ReplicaState::Serving;
            if serving {
                *s = ReplicaState::Draining;
            }
            serving
        });
        let idle = || async {
            while self.in_flight.count() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(grace, idle()).await.is_err() {
            tracing::warn!(
                "{} requests still running after {grace:?}; cancelling them",
                self.in_flight.count()
            );
            let _ = self.requests.send(LoopMessage::CancelAll);
            let _ = tokio::time::timeout(Duration::from_secs(2), idle()).await;
        }
    }

    fn check_up(&self) -> Result<(), Status> {
        match &*self.state.borrow() {
            ReplicaState::Serving => Ok(()),
            ReplicaState::Draining => Err(Status::unavailable("the server is shutting down")),
            ReplicaState::Down(why) => {
                Err(Status::unavailable(format!("the replica is down: {why}")))
            }
        }
    }

    /// Admits a request and returns its stream of responses. Past `call.deadline` it is dropped
    /// wherever it is (waiting or running) and answered DEADLINE_EXCEEDED.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        call: CallContext,
    ) -> Result<ResponseReceiver, Status> {
        let arrival = Instant::now();
        self.check_up()?;
        let (tokenizer, limits) = (self.tokenizer.clone(), self.limits);
        let (req, admitted) = tokio::task::spawn_blocking(move || {
            let admitted = admission::admit(&tokenizer, &req, &limits);
            (req, admitted)
        })
        .await
        .map_err(|e| Status::internal(format!("admission task: {e}")))?;
        let mut admitted = admitted?;
        admitted.params.deadline = call.deadline;
        let prompt_text = self.log_prompts.then(|| prompt_text(&req));
        let request_id = if req.request_id.is_empty() {
            format!("req-{}", self.next_request.fetch_add(1, Ordering::Relaxed))
        } else {
            req.request_id
        };
        let trace = RequestTrace::start(
            Arrival {
                request_id,
                parent: call.trace_parent,
                prompt_tokens: admitted.prompt_ids.len() as u32,
                max_new_tokens: admitted.params.max_new_tokens,
                prompt_text: prompt_text.as_deref(),
                arrival,
            },
            self.metrics.clone(),
        );
        let (tx, rx) = mpsc::unbounded_channel();
        let output = RequestOutput::new(tx, &admitted, trace, &self.in_flight);
        self.requests
            .send(LoopMessage::Request(Box::new(NewRequest {
                admitted,
                output,
            })))
            .map_err(|_| Status::unavailable("the step loop has stopped"))?;
        Ok(rx)
    }

    pub async fn tokenize(&self, req: TokenizeRequest) -> Result<TokenizeResponse, Status> {
        let tokenizer = self.tokenizer.clone();
        let token_ids = tokio::task::spawn_blocking(move || {
            admission::prompt_ids(&tokenizer, &req.prompt, &req.messages, &[])
        })
        .await
        .map_err(|e| Status::internal(format!("tokenize task: {e}")))??;
        Ok(TokenizeResponse { token_ids })
    }

    pub fn detokenize(&self, req: DetokenizeRequest) -> Result<DetokenizeResponse, Status> {
        if let Some(bad) = req
            .token_ids
            .iter()
            .find(|&&t| t as usize >= self.limits.vocab_size)
        {
            return Err(Status::invalid_argument(format!(
                "token_ids: {bad} is outside the vocabulary (size {})",
                self.limits.vocab_size
            )));
        }
        let text = self
            .tokenizer
            .decode(&req.token_ids)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        Ok(DetokenizeResponse { text })
    }

    /// The workers are about to be stopped on purpose (after a drain): their going is no
    /// failure, and is not logged as one.
    pub fn release_workers(&self) {
        self.ranks_up.close();
    }

    /// `/metrics`: the text and its content type (OpenMetrics when `openmetrics`).
    pub fn metrics_text(&self, openmetrics: bool) -> (String, &'static str) {
        let s = &self.stats;
        let now = Snapshot {
            running: s.running.load(Ordering::Relaxed),
            waiting: s.waiting.load(Ordering::Relaxed),
            kv_blocks_total: self.info.kv_blocks_total,
            kv_blocks_free: s.kv_blocks_free.load(Ordering::Relaxed),
            prefix_query_tokens: s.prefix_query_tokens.load(Ordering::Relaxed),
            prefix_hit_tokens: s.prefix_hit_tokens.load(Ordering::Relaxed),
            preemptions: s.preemptions.load(Ordering::Relaxed),
            steps: s.steps.load(Ordering::Relaxed),
            ranks_up: self.ranks_up.get(),
        };
        self.metrics.render(&now, openmetrics)
    }

    pub fn model_info(&self) -> ModelInfoResponse {
        let s = &self.stats;
        let load = |v: &AtomicU64| v.load(Ordering::Relaxed);
        let ratio = |a: u64, b: u64| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        ModelInfoResponse {
            kv_blocks_free: s.kv_blocks_free.load(Ordering::Relaxed),
            requests_running: s.running.load(Ordering::Relaxed),
            requests_waiting: s.waiting.load(Ordering::Relaxed),
            ready: *self.state.borrow() == ReplicaState::Serving,
            prefix_cache_query_tokens: load(&s.prefix_query_tokens),
            prefix_cache_hit_tokens: load(&s.prefix_hit_tokens),
            prefix_cache_hit_ratio: ratio(load(&s.prefix_hit_tokens), load(&s.prefix_query_tokens)),
            preemptions_total: load(&s.preemptions),
            steps_total: load(&s.steps),
            step_compute_seconds_total: load(&s.step_compute_us) as f64 / 1e6,
            step_gap_seconds_total: load(&s.step_gap_us) as f64 / 1e6,
            step_rank_wait_seconds_total: load(&s.step_rank_wait_us) as f64 / 1e6,
            ..(*self.info).clone()
        }
    }
}

/// A request's input as text for the log (`--log-prompts`): the prompt, the chat messages as
/// `role: content` lines, or the token ids.
fn prompt_text(req: &GenerateRequest) -> String {
    if !req.prompt.is_empty() {
        return req.prompt.clone();
    }
    if !req.messages.is_empty() {
        let lines: Vec<String> = req
            .messages
            .iter()
            .map(|m| format!("{}: {}", m.role, m.content))
            .collect();
        return lines.join("\n");
    }
    format!("{:?}", req.token_ids)
}
