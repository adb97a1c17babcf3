//! The front door: the one type the gRPC server, the OpenAI-compatible HTTP API and
//! `helios generate` talk to. It admits a request (tokenizes it, renders the chat template,
//! checks its parameters: [`admission`]) in the caller's task, and the [`router`] chooses the
//! replica it goes to.
//!
//! It holds the replicas ([`Replicas`]), which come and go at run time: one joins once its
//! workers are ready ([`FrontDoor::add_replica`]), one leaves after draining
//! ([`FrontDoor::remove_replica`]), and neither gRPC nor HTTP notices. A replica that is lost
//! (down, or recovering for longer than `--failover-after`) hands its requests back here, and
//! [`move_requests`] moves them to another replica with their tokens. Tokenizing runs on the
//! blocking pool: a long prompt costs its own request time, never the runtime's other tasks.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use helios_proto::v1::{ChatMessage, GenerateRequest};
use tokio::sync::{mpsc, oneshot};

use crate::admission::{self, Admitted, Limits, RequestCaps};
use crate::constraint::{GrammarOptions, Grammars};
use crate::error::ServeError;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::output::{response_channels, RequestOutput, ResponseReceiver};
use crate::replica::step_loop::NewRequest;
use crate::replica::{Failover, Moved, Replica, ReplicaOptions, ReplicaState};
use crate::replicas::Replicas;
use crate::request_trace::{Arrival, RequestTrace};
use crate::router::{Accepts, Reason, ReplicaView, RouteRequest, Router, RouterOptions};
use crate::sharded_client::InitOptions;
use crate::tokenizer::TextTokenizer;

/// The largest request a client may send, gRPC message or HTTP body alike (gRPC's default):
/// a bigger one is refused by the transport.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// How often requests that no replica could take yet are offered again.
const PARKED_RETRY: Duration = Duration::from_millis(100);

/// How the front door and its replicas serve.
#[derive(Debug, Clone)]
pub struct ServingOptions {
    /// The model as the server was started with it (ModelInfo, the HTTP API's model id).
    pub model_name: String,
    pub replica: ReplicaOptions,
    pub router: RouterOptions,
    /// Put prompt text in the log line of every request (off: it may be private).
    pub log_prompts: bool,
    /// What one request may ask for.
    pub caps: RequestCaps,
    /// Bounds on structured outputs' grammars.
    pub grammars: GrammarOptions,
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
    init: InitOptions,
    replica_opts: ReplicaOptions,
    replicas: Arc<Replicas>,
    router: Router,
    /// Where lost replicas hand their requests (with failover).
    failover: Option<Failover>,
    metrics: Arc<Metrics>,
    log_prompts: bool,
    caps: RequestCaps,
    /// Built when the first constrained request comes (a trie of the whole vocabulary).
    grammars: OnceLock<Result<Grammars, String>>,
    grammar_opts: GrammarOptions,
    next_request: AtomicU64,
}

impl Inner {
    /// Compiles the request's constraint into its matcher (blocking: admission's pool).
    fn compile_constraint(
        &self,
        mut a: Admitted,
        vocab_size: usize,
    ) -> Result<Admitted, ServeError> {
        let Some(spec) = a.constraint.take() else {
            return Ok(a);
        };
        let grammars = self
            .grammars
            .get_or_init(|| {
                Grammars::new(&self.tokenizer, vocab_size, self.grammar_opts)
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| {
                ServeError::invalid(
                    "constraint",
                    format!("structured outputs are not available for this tokenizer: {e}"),
                )
            })?;
        let c = grammars
            .compile(&spec)
            .map_err(|e| ServeError::invalid("constraint", e.to_string()))?;
        a.params.constraint = Some(c);
        Ok(a)
    }
}

impl FrontDoor {
    /// A front door with no replica yet (it answers UNAVAILABLE, starting, until one joins).
    pub fn new(init: &InitOptions, tokenizer: TextTokenizer, opts: &ServingOptions) -> Self {
        let (moved_tx, moved_rx) = mpsc::unbounded_channel();
        let failover = opts.router.failover_after.map(|after| Failover {
            after,
            elsewhere: moved_tx,
        });
        let front = Self(Arc::new(Inner {
            tokenizer: Arc::new(tokenizer),
            model_name: opts.model_name.clone(),
            init: init.clone(),
            replica_opts: opts.replica,
            replicas: Arc::default(),
            router: Router::new(opts.router, init.block_size as usize),
            failover,
            metrics: Arc::new(Metrics::new()),
            log_prompts: opts.log_prompts,
            caps: opts.caps,
            grammars: OnceLock::new(),
            grammar_opts: opts.grammars,
            next_request: AtomicU64::new(0),
        }));
        if front.0.failover.is_some() {
            tokio::spawn(move_requests(Arc::downgrade(&front.0), moved_rx));
        }
        front
    }

    /// Loads the model on the workers each of `memberships` finds, as replicas 0, 1, ...,
    /// and serves them.
    pub async fn start(
        memberships: Vec<Membership>,
        init: &InitOptions,
        tokenizer: TextTokenizer,
        opts: &ServingOptions,
    ) -> Result<Self> {
        let front = Self::new(init, tokenizer, opts);
        let starts = memberships
            .into_iter()
            .enumerate()
            .map(|(id, m)| front.add_replica(id as u32, m));
        futures::future::try_join_all(starts).await?;
        Ok(front)
    }

    /// Starts replica `id` over the workers `membership` finds; it takes requests once its
    /// ranks have loaded the model.
    pub async fn add_replica(&self, id: u32, membership: Membership) -> Result<Replica> {
        let inner = &self.0;
        let replica = Replica::start(
            id,
            membership,
            &inner.init,
            inner.replica_opts,
            inner.failover.clone(),
            inner.tokenizer.clone(),
            &inner.metrics,
        )
        .await?;
        if inner.replicas.is_draining() {
            replica.release_workers(Duration::ZERO).await;
            bail!("shutting down");
        }
        inner.replicas.add(replica.clone());
        tracing::info!(replica = id, "replica {id} joined");
        Ok(replica)
    }

    /// Replica `id` leaves: it takes no new requests, those it holds get up to `grace` to
    /// finish (then are cancelled), and its workers are let go. False if there is no such
    /// replica.
    pub async fn remove_replica(&self, id: u32, grace: Duration) -> bool {
        let Some(replica) = self.0.replicas.get(id) else {
            return false;
        };
        tracing::info!(replica = id, "replica {id} is draining to leave");
        replica.drain(grace).await;
        self.0.replicas.remove(id);
        replica.release_workers(grace).await;
        tracing::info!(replica = id, "replica {id} left");
        true
    }

    /// The model's tokenizer (the HTTP API shows logprobs' tokens as text).
    pub fn tokenizer(&self) -> Arc<TextTokenizer> {
        self.0.tokenizer.clone()
    }

    /// The model as the server was started with it.
    pub fn model_name(&self) -> &str {
        &self.0.model_name
    }

    /// It is shutting down (replicas no longer join).
    pub fn is_draining(&self) -> bool {
        self.0.replicas.is_draining()
    }

    /// Every replica now, in id order.
    pub fn replicas(&self) -> Vec<Replica> {
        self.0.replicas.all()
    }

    pub fn router_options(&self) -> &RouterOptions {
        self.0.router.options()
    }

    /// Its metrics (ModelInfo reads the router's counts there).
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// What a request must fit in: the smallest of the replicas' (`None` before one joins).
    pub fn limits(&self) -> Option<Limits> {
        limits(&self.replicas())
    }

    /// Whether it takes requests: the best of its replicas' states.
    pub fn state(&self) -> ReplicaState {
        self.0.replicas.state_of(&self.replicas())
    }

    /// A receiver of that state, woken when it changes (gRPC health follows it).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<ReplicaState> {
        self.0.replicas.watch()
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
        // One look at the replicas serves the whole admission: refusal, limits, route.
        let replicas = self.replicas();
        let refusal = || self.0.replicas.state_of(&replicas).refusal();
        if let Some(refused) = refusal() {
            return Err(refused);
        }
        let limits = limits(&replicas).ok_or(ServeError::Starting)?;
        let (tokenizer, caps) = (self.0.tokenizer.clone(), self.0.caps);
        let inner = self.0.clone();
        // The grammar's bound lives in `Grammars::compile` (a permit waited for at most the
        // bound, a compile slower than it refused): admission itself has no deadline, so a
        // slow tokenization is never reported as a slow grammar.
        let (req, admitted) = tokio::task::spawn_blocking(move || {
            let admitted = admission::admit(&tokenizer, &req, &limits, &caps)
                .and_then(|a| inner.compile_constraint(a, limits.vocab_size));
            (req, admitted)
        })
        .await
        .map_err(|e| ServeError::Internal(format!("admission task: {e}")))?;
        let mut admitted = admitted?;
        admitted.params.deadline = call.deadline;
        admitted.params.return_logits = logits.is_some();
        let session = (!req.session_id.is_empty()).then_some(req.session_id.as_str());
        let request = RouteRequest {
            prompt: &admitted.prompt_ids,
            session,
            moving: false,
        };
        let (replica, reason) = route(&self.0.router, &replicas, request).ok_or_else(|| {
            refusal().unwrap_or_else(|| ServeError::ReplicaDown("no replica takes requests".into()))
        })?;
        self.0.metrics.routed(replica.id(), reason);
        let prompt_text = self.0.log_prompts.then(|| prompt_text(&req));
        let request_id = if req.request_id.is_empty() {
            let n = self.0.next_request.fetch_add(1, Ordering::Relaxed);
            format!("req-{n}")
        } else {
            req.request_id
        };
        let (senders, rx) = response_channels(admitted.best_of);
        let rx = if admitted.chooses() {
            rx.keeping_best(admitted.n, admitted.logprobs.is_some())
        } else {
            rx
        };
        let mut logits = logits;
        let mut choices = Vec::with_capacity(senders.len());
        for (i, tx) in senders.into_iter().enumerate() {
            // Each choice is traced (and counted) as a sequence of its own, under one id; the
            // prompt is logged once.
            let trace = RequestTrace::start(
                Arrival {
                    request_id: request_id.clone(),
                    parent: call.trace_parent.clone(),
                    prompt_tokens: admitted.prompt_ids.len() as u32,
                    max_new_tokens: admitted.params.max_new_tokens,
                    prompt_text: prompt_text.as_deref().filter(|_| i == 0),
                    arrival,
                },
                self.0.metrics.clone(),
            );
            let choice = admitted.choice(i);
            let mut output =
                RequestOutput::new(tx, &choice, trace, replica.in_flight()).with_index(i as u32);
            if let Some(logits) = logits.take() {
                output = output.with_logits(logits);
            }
            choices.push(NewRequest {
                admitted: choice,
                output,
            });
        }
        replica.submit(choices)?;
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
        let vocab_size = self.limits().ok_or(ServeError::Starting)?.vocab_size;
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
        let now: Vec<_> = self
            .replicas()
            .iter()
            .map(|r| (r.id(), r.snapshot()))
            .collect();
        self.0.metrics.render(&now, openmetrics)
    }

    /// Stops admitting, lets requests in flight finish for up to `grace`, then ends the rest
    /// with finish reason CANCELLED.
    pub async fn drain(&self, grace: Duration) {
        self.0.replicas.set_draining();
        let replicas = self.replicas();
        futures::future::join_all(replicas.iter().map(|r| r.drain(grace))).await;
    }

    /// Lets the workers go (after a drain); workers spawned here exit, and are killed after
    /// `grace`.
    pub async fn release_workers(&self, grace: Duration) {
        let replicas = self.replicas();
        futures::future::join_all(replicas.iter().map(|r| r.release_workers(grace))).await;
    }
}

/// What a request must fit in on every one of `replicas` (`None` when there is none).
fn limits(replicas: &[Replica]) -> Option<Limits> {
    replicas.iter().map(Replica::limits).reduce(|a, b| Limits {
        max_model_len: a.max_model_len.min(b.max_model_len),
        vocab_size: a.vocab_size.min(b.vocab_size),
        kv_capacity: a.kv_capacity.min(b.kv_capacity),
    })
}

/// The replica among `replicas` that `router` chooses for `req`.
pub fn route(
    router: &Router,
    replicas: &[Replica],
    req: RouteRequest<'_>,
) -> Option<(Replica, Reason)> {
    let failover_after = router.options().failover_after;
    let views: Vec<ReplicaView<'_>> = replicas
        .iter()
        .map(|r| {
            let (accepts, kv_free) = r.read(|s| {
                (
                    Accepts::of(s, failover_after),
                    s.scheduler.kv_blocks_free as usize,
                )
            });
            ReplicaView {
                id: r.id(),
                accepts,
                load: r.in_flight().count(),
                kv_blocks_free: kv_free,
                prefixes: r.prefixes(),
            }
        })
        .collect();
    let (i, reason) = router.choose(&views, req)?;
    Some((replicas[i].clone(), reason))
}

/// Moves the requests lost replicas hand back to other replicas, with their tokens. A request
/// no replica can take yet waits here, offered again every [`PARKED_RETRY`], for up to the
/// recovery timeout; then it is answered UNAVAILABLE (DEADLINE_EXCEEDED once its own deadline
/// passes; dropped if its client leaves). Ends with the front door.
async fn move_requests(front: Weak<Inner>, mut moved: mpsc::UnboundedReceiver<Moved>) {
    let mut parked: VecDeque<(Moved, Instant)> = VecDeque::new();
    let mut tick = tokio::time::interval(PARKED_RETRY);
    loop {
        tokio::select! {
            m = moved.recv() => {
                let Some(m) = m else { return };
                let Some(inner) = front.upgrade() else { return };
                inner.metrics.moved(m.from);
                if let Some(m) = place(&inner, m) {
                    parked.push_back((m, Instant::now()));
                }
            }
            _ = tick.tick(), if !parked.is_empty() => {
                let Some(inner) = front.upgrade() else { return };
                let timeout = inner.replica_opts.recovery.recovery_timeout;
                for (m, since) in std::mem::take(&mut parked) {
                    if m.output.is_closed() {
                        continue;
                    }
                    if m.departing.params.deadline.is_some_and(|d| d <= Instant::now()) {
                        m.output.fail(ServeError::DeadlineExceeded);
                        continue;
                    }
                    if let Some(m) = place(&inner, m) {
                        if since.elapsed() < timeout {
                            parked.push_back((m, since));
                        } else {
                            m.output.fail(ServeError::ReplicaDown(format!(
                                "its replica was lost and no other took it within {timeout:?}"
                            )));
                        }
                    }
                }
            }
        }
    }
}

/// Hands a moved request to the replica the router chooses (the one it left only if that one
/// serves again); gives it back when none takes requests.
fn place(inner: &Inner, m: Moved) -> Option<Moved> {
    let req = RouteRequest {
        prompt: &m.departing.tokens,
        session: None,
        moving: true,
    };
    match route(&inner.router, &inner.replicas.all(), req) {
        Some((to, _)) => {
            inner.metrics.routed(to.id(), Reason::Moved);
            to.resume(m);
            None
        }
        None => Some(m),
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
