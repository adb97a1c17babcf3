//! The front door: the one type the gRPC server, the OpenAI-compatible HTTP API and
//! `helios generate` talk to. It admits a request (tokenizes it, renders the chat template,
//! checks its parameters: [`admission`]) in the caller's task and hands it to a replica.
//!
//! It holds the replicas. There is one today; choosing among several (the router) belongs
//! here, so that neither gRPC nor HTTP changes when replicas come and go. Tokenizing runs on
//! the blocking pool: a long prompt costs its own request time, never the runtime's other
//! tasks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use helios_proto::v1::{ChatMessage, GenerateRequest};
use tokio::sync::oneshot;

use crate::admission::{self, Limits};
use crate::error::ServeError;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::output::{RequestOutput, ResponseReceiver};
use crate::replica::step_loop::NewRequest;
use crate::replica::{Replica, ReplicaOptions, ReplicaSnapshot, ReplicaState};
use crate::request_trace::{Arrival, RequestTrace};
use crate::sharded_client::InitOptions;
use crate::tokenizer::TextTokenizer;

/// The largest request a client may send, gRPC message or HTTP body alike (gRPC's default):
/// a bigger one is refused by the transport.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// How the front door and its replica serve.
#[derive(Debug, Clone)]
pub struct ServingOptions {
    /// The model as the server was started with it (ModelInfo, the HTTP API's model id).
    pub model_name: String,
    pub replica: ReplicaOptions,
    /// Put prompt text in the log line of every request (off: it may be private).
    pub log_prompts: bool,
}

/// What the transport knows of a call besides its message.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// Past it the request is dropped wherever it is and answered DEADLINE_EXCEEDED.
    pub deadline: Option<Instant>,
    /// The client's trace context (a W3C `traceparent` in its metadata or headers).
    pub trace_parent: Option<opentelemetry::Context>,
}

/// Cheap to clone: every clone is the same front door.
#[derive(Clone)]
pub struct FrontDoor(Arc<Inner>);

struct Inner {
    tokenizer: Arc<TextTokenizer>,
    model_name: String,
    replica: Replica,
    metrics: Arc<Metrics>,
    log_prompts: bool,
    next_request: AtomicU64,
}

impl FrontDoor {
    /// Loads the model on the workers `membership` finds, as one replica, and serves it.
    pub async fn start(
        membership: Membership,
        init: &InitOptions,
        tokenizer: TextTokenizer,
        opts: &ServingOptions,
    ) -> Result<Self> {
        let tokenizer = Arc::new(tokenizer);
        let metrics = Arc::new(Metrics::new(membership.world_size()));
        let replica = Replica::start(
            membership,
            init,
            opts.replica,
            tokenizer.clone(),
            metrics.clone(),
        )
        .await?;
        Ok(Self(Arc::new(Inner {
            tokenizer,
            model_name: opts.model_name.clone(),
            replica,
            metrics,
            log_prompts: opts.log_prompts,
            next_request: AtomicU64::new(0),
        })))
    }

    /// The model's tokenizer (the HTTP API shows logprobs' tokens as text).
    pub fn tokenizer(&self) -> Arc<TextTokenizer> {
        self.0.tokenizer.clone()
    }

    /// The model as the server was started with it.
    pub fn model_name(&self) -> &str {
        &self.0.model_name
    }

    /// The replica requests go to.
    pub fn replica(&self) -> &Replica {
        &self.0.replica
    }

    /// What a request must fit in.
    pub fn limits(&self) -> Limits {
        self.0.replica.limits()
    }

    /// Whether it takes requests: the state of its replica.
    pub fn state(&self) -> ReplicaState {
        self.0.replica.state()
    }

    /// A receiver of the replica's snapshot that wakes on every change of its state (gRPC
    /// health follows it).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<ReplicaSnapshot> {
        self.0.replica.watch()
    }

    /// Admits a request and returns its stream of responses. Past `call.deadline` it is dropped
    /// wherever it is (waiting or running) and answered DEADLINE_EXCEEDED.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        call: CallContext,
    ) -> Result<ResponseReceiver, ServeError> {
        self.submit(req, call, None).await
    }

    /// The logits rank 0 computes for the token after `prompt_ids` (the debugging command
    /// `helios logits`): one request of one token, on the same path as every other.
    pub async fn next_token_logits(&self, prompt_ids: Vec<u32>) -> Result<Vec<f32>, ServeError> {
        let req = GenerateRequest {
            token_ids: prompt_ids,
            parameters: Some(helios_proto::v1::GenerationParameters {
                max_new_tokens: Some(1),
                ignore_eos: true,
                ..Default::default()
            }),
            ..Default::default()
        };
        let (tx, rx) = oneshot::channel();
        let responses = self.submit(req, CallContext::default(), Some(tx)).await?;
        crate::output::collect(responses).await?;
        rx.await
            .map_err(|_| ServeError::Internal("rank 0 returned no logits".into()))
    }

    async fn submit(
        &self,
        req: GenerateRequest,
        call: CallContext,
        logits: Option<oneshot::Sender<Vec<f32>>>,
    ) -> Result<ResponseReceiver, ServeError> {
        let arrival = Instant::now();
        let replica = &self.0.replica;
        if let Some(refused) = replica.state().refusal() {
            return Err(refused);
        }
        let (tokenizer, limits) = (self.0.tokenizer.clone(), replica.limits());
        let (req, admitted) = tokio::task::spawn_blocking(move || {
            let admitted = admission::admit(&tokenizer, &req, &limits);
            (req, admitted)
        })
        .await
        .map_err(|e| ServeError::Internal(format!("admission task: {e}")))?;
        let mut admitted = admitted?;
        admitted.params.deadline = call.deadline;
        admitted.params.return_logits = logits.is_some();
        let prompt_text = self.0.log_prompts.then(|| prompt_text(&req));
        let request_id = if req.request_id.is_empty() {
            let n = self.0.next_request.fetch_add(1, Ordering::Relaxed);
            format!("req-{n}")
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
            self.0.metrics.clone(),
        );
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut output = RequestOutput::new(tx, &admitted, trace, replica.in_flight());
        if let Some(logits) = logits {
            output = output.with_logits(logits);
        }
        replica.submit(NewRequest { admitted, output })?;
        Ok(rx)
    }

    /// The token ids of a prompt or of chat messages (rendered with the chat template).
    pub async fn tokenize(
        &self,
        prompt: String,
        messages: Vec<ChatMessage>,
    ) -> Result<Vec<u32>, ServeError> {
        let tokenizer = self.0.tokenizer.clone();
        tokio::task::spawn_blocking(move || {
            admission::prompt_ids(&tokenizer, &prompt, &messages, &[])
        })
        .await
        .map_err(|e| ServeError::Internal(format!("tokenize task: {e}")))?
    }

    /// The text of token ids.
    pub fn detokenize(&self, token_ids: &[u32]) -> Result<String, ServeError> {
        let vocab_size = self.limits().vocab_size;
        if let Some(bad) = token_ids.iter().find(|&&t| t as usize >= vocab_size) {
            return Err(ServeError::invalid(
                "token_ids",
                format!("token_ids: {bad} is outside the vocabulary (size {vocab_size})"),
            ));
        }
        self.0
            .tokenizer
            .decode(token_ids)
            .map_err(|e| ServeError::invalid("token_ids", format!("{e:#}")))
    }

    /// `/metrics`: the text and its content type (OpenMetrics when `openmetrics`).
    pub fn metrics_text(&self, openmetrics: bool) -> (String, &'static str) {
        self.0
            .metrics
            .render(&self.0.replica.snapshot(), openmetrics)
    }

    /// Stops admitting, lets requests in flight finish for up to `grace`, then ends the rest
    /// with finish reason CANCELLED.
    pub async fn drain(&self, grace: Duration) {
        self.0.replica.drain(grace).await;
    }

    /// Lets the workers go (after a drain); workers spawned here exit, and are killed after
    /// `grace`.
    pub async fn release_workers(&self, grace: Duration) {
        self.0.replica.release_workers(grace).await;
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
