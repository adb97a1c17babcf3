//! The step loop: the one task that owns the scheduler and the replica's workers.
//!
//! Each turn it takes in new requests, drops those whose client left or whose deadline passed
//! (their blocks are free before the next plan), plans a step, hands it to every rank, and
//! streams the sampled tokens back. When nothing can run it sleeps until a request arrives or
//! a rank fails.
//!
//! **Overlap** (the default, as in SGLang's overlap scheduler and vLLM V1's async scheduling):
//! step N+1 is planned and sent while the ranks run step N, so it is waiting at every rank when
//! N ends; the loop then applies N's answer, streams its tokens, and plans N+2 while the ranks
//! run N+1. The ranks never wait for the coordinator: not for the answer's round trip, not for
//! scheduling, not for detokenizing. Tokens sampled in step N that N+1 feeds are fed by
//! reference (`feed_sampled`: rank 0 has them and shares them with the other ranks). The costs:
//! a sequence that ends in step N (EOS, a stop string) is computed in N+1 as well and that
//! token is dropped, and a new request joins one step later. `--no-overlap` runs one step at a
//! time instead (answer, stream, plan, send), for comparison.
//!
//! **Tracing**: when spans are exported, every step gets a `step` span whose context travels in
//! the plan (`StepPlan.trace_context`), so each rank's `worker_step` span is its child. A step
//! serves many requests but a span has one parent: the step hangs under the current phase
//! span of one traced request in it (the first one reading its prompt, else the first one),
//! and links to the other traced requests. A request running alone has every step of its
//! life in its own trace; in a batch the steps are shared out among the requests' traces,
//! and the links lead from any of them to the rest.
//!
//! **A lost rank** (its step stream ends, it stops answering health probes, its lease
//! expires: [`super::ranks`]) costs a pause, not a request. The replica turns *recovering*:
//! every running sequence goes back to the waiting queue with its tokens, as in preemption, and
//! the KV and prefix cache are dropped ([`Scheduler::requeue_all`]); the ranks are rebuilt
//! ([`Ranks::rebuild`]) while new requests queue, clients may leave and deadlines pass as ever;
//! then the replica serves on. A requeued request recomputes its prompt and output and samples
//! on at the same output index, so it gets exactly the tokens it would have had. If the rank is
//! not back within `--recovery-timeout`, every request held is answered UNAVAILABLE, the
//! replica is *down* (refusing new requests) and keeps rebuilding; once rebuilt it serves
//! again. A rank that can never come back (a restart limit) leaves the replica down for good.
//!
//! **Failover** (several replicas behind the front door): a replica still recovering after
//! `--failover-after`, or down, hands every request it holds to the front door
//! ([`Failover::elsewhere`]) with its tokens, and every request that reaches it from then on;
//! the front door moves them to another replica, where they recompute and sample on at the
//! same output index ([`Scheduler::take_all`]). Recovery goes on meanwhile, for the requests
//! the router sends once the replica serves again.
//!
//! This is the only place steps are driven: servers, `helios generate` without a server, the
//! `helios logits` debugging command and the engine benchmark all come here through the front
//! door.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use helios_proto::telemetry;
use helios_proto::v1::StepPlan;
use tokio::sync::{mpsc, oneshot};
use tracing::field::Empty;
use tracing::Span;

use super::ranks::{Loss, Ranks, Rebuilt, StepError};
use super::requests::Requests;
use super::{Failover, Moved, Published, ReplicaState};
use crate::admission::Admitted;
use crate::error::ServeError;
use crate::metrics::ReplicaMetrics;
use crate::output::{InFlight as Accepted, RequestOutput};
use crate::request_trace::RequestTrace;
use crate::scheduler::{Sampled, Scheduler};
use crate::tokenizer::TextTokenizer;

/// While the ranks are rebuilt, clients that left and deadlines that passed are looked for
/// this often.
const RECOVERY_TICK: Duration = Duration::from_millis(100);

/// Most links from a step's span to the traced requests it served besides its parent's.
const MAX_STEP_LINKS: usize = 32;

/// One choice of a request that passed admission, on its way to the step loop.
pub struct NewRequest {
    pub admitted: Admitted,
    pub output: RequestOutput,
}

/// Ends every choice of a request with `error`.
pub fn fail_choices(choices: Vec<NewRequest>, error: &ServeError) {
    for c in choices {
        c.output.fail(error.clone());
    }
}

/// What the step loop is told.
pub enum LoopMessage {
    /// A new request: its choices, the first first (see `Requests::add`).
    Request(Vec<NewRequest>),
    /// A request moved here from a lost replica, with its tokens.
    Resume(Box<Moved>),
    /// End every request now with finish reason CANCELLED (shutdown after its grace period).
    CancelAll,
    /// Let the workers go (after a drain) and stop; answered once they are gone.
    Release(Duration, oneshot::Sender<()>),
}

/// A step the ranks are running.
struct InFlight {
    step_id: u64,
    /// Sent right after the previous step's answer (not after an idle wait): the ranks' wait
    /// for it is the coordinator's overhead.
    back_to_back: bool,
    /// Its span (a disabled one unless spans are exported); ends with the answer.
    span: Span,
}

/// What the step loop reports beside its answers.
pub struct Observers {
    /// The replica's snapshot: the scheduler's numbers, step totals, its state.
    pub published: Published,
    pub metrics: ReplicaMetrics,
    /// Spans are exported: steps get spans, and plans carry their context to the ranks.
    pub tracing: bool,
}

/// The replica among others: its id, its count of accepted requests (a request moved here
/// counts in it), and where its requests go when it is lost (none with one replica).
pub struct Placement {
    pub id: u32,
    pub accepted: Accepted,
    pub failover: Option<Failover>,
}

pub struct StepLoop {
    ranks: Ranks,
    requests: Requests,
    tokenizer: Arc<TextTokenizer>,
    inbox: mpsc::UnboundedReceiver<LoopMessage>,
    placement: Placement,
    published: Published,
    metrics: ReplicaMetrics,
    tracing: bool,
    overlap: bool,
    recovery_timeout: Duration,
}

/// Why [`StepLoop::serve`] returned.
enum Stop {
    /// Every request sender is gone, or the workers were released: the loop ends.
    Done,
    /// A rank is lost: the replica must be rebuilt.
    Lost(Loss),
}

/// How the wait for a rebuild ended.
enum Meanwhile {
    Rebuilt(anyhow::Result<Rebuilt>),
    /// Shutdown came first (the workers are to be released, then this answered), or every
    /// request sender is gone.
    Released(Option<(Duration, oneshot::Sender<()>)>),
}

/// How a recovery ended.
enum Recovery {
    Rebuilt,
    /// A rank cannot come back.
    Failed(String),
    /// Shutdown came first (the workers are released) or every sender is gone.
    Stopped,
}

impl StepLoop {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        ranks: Ranks,
        scheduler: Scheduler,
        tokenizer: Arc<TextTokenizer>,
        inbox: mpsc::UnboundedReceiver<LoopMessage>,
        placement: Placement,
        observers: Observers,
        overlap: bool,
        recovery_timeout: Duration,
    ) -> Self {
        Self {
            ranks,
            requests: Requests::new(scheduler),
            tokenizer,
            inbox,
            placement,
            published: observers.published,
            metrics: observers.metrics,
            tracing: observers.tracing,
            overlap,
            recovery_timeout,
        }
    }

    /// Runs until every request sender is gone or the workers are released, rebuilding the
    /// ranks whenever one is lost.
    pub async fn run(mut self) {
        loop {
            let loss = match self.serve().await {
                Stop::Done => return,
                Stop::Lost(loss) => loss,
            };
            match self.recover(loss).await {
                Recovery::Rebuilt => continue,
                Recovery::Stopped => return,
                Recovery::Failed(why) => return self.down(why).await,
            }
        }
    }

    /// Steps until a rank is lost or the loop is told to stop.
    async fn serve(&mut self) -> Stop {
        let mut failure = self.ranks.client().failure();
        // Steps the ranks hold, oldest first: with overlap the next one waits at the ranks
        // while they run the current one.
        let depth = if self.overlap { 2 } else { 1 };
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut idled = true;
        loop {
            while let Ok(m) = self.inbox.try_recv() {
                if let Some(stop) = self.take(m).await {
                    return stop;
                }
            }
            self.requests.drop_gone();
            if in_flight.len() < depth {
                let plan = match self.requests.scheduler.schedule() {
                    Ok(plan) => plan,
                    Err(e) => {
                        self.requests
                            .fail_all(ServeError::Internal(format!("scheduling failed: {e:#}")));
                        continue;
                    }
                };
                self.requests.note_preemptions();
                self.publish_stats();
                if let Some(mut plan) = plan {
                    self.mark_scheduled(&plan);
                    let span = self.step_span(&mut plan);
                    let step_id = plan.step_id;
                    if let Err(e) = self.ranks.send(plan).await {
                        return Stop::Lost(Loss::new(format!("sending step {step_id}: {e:#}")));
                    }
                    in_flight.push_back(InFlight {
                        step_id,
                        back_to_back: !idled,
                        span,
                    });
                    idled = false;
                    continue;
                }
            }
            let Some(step) = in_flight.pop_front() else {
                idled = true;
                let message = tokio::select! {
                    m = self.inbox.recv() => m,
                    why = failure.wait_for(Option::is_some) => {
                        let why = why.ok().and_then(|w| w.clone()).unwrap_or_default();
                        return Stop::Lost(Loss::new(why));
                    }
                    rank = self.ranks.lost() => {
                        return Stop::Lost(Loss::new(format!("rank {rank}: its lease expired")));
                    }
                };
                match message {
                    Some(m) => {
                        if let Some(stop) = self.take(m).await {
                            return stop;
                        }
                    }
                    None => return Stop::Done,
                }
                continue;
            };
            // A step failed before this one was answered and took its sequences with it:
            // this answer only keeps the stream in order.
            let stale = self.requests.scheduler.num_unanswered() <= in_flight.len();
            match self.collect(step, stale).await {
                Ok(sampled) => self.stream(sampled),
                Err(loss) => return Stop::Lost(loss),
            }
        }
    }

    /// Waits for the answer to a step in flight and applies it. A refused plan or a malformed
    /// answer fails that step's sequences (and those of the step sent after it); the replica
    /// goes on. A lost rank is the error.
    async fn collect(&mut self, step: InFlight, stale: bool) -> Result<Vec<Sampled>, Loss> {
        let (result, times) = match self.ranks.receive(step.step_id).await {
            Ok(r) => r,
            Err(StepError::Lost(loss)) => {
                step.span.record("error", loss.why.as_str());
                return Err(loss);
            }
            Err(StepError::Failed(_)) if stale => return Ok(Vec::new()),
            Err(StepError::Failed(e)) if self.ranks.client().closing().is_closing() => {
                // Shutting down: the ranks stopped mid-step on purpose.
                tracing::debug!("step {} unanswered at shutdown: {e:#}", step.step_id);
                for id in self.requests.scheduler.fail_planned() {
                    self.requests.finish_with(id, ServeError::Draining);
                }
                return Ok(Vec::new());
            }
            Err(StepError::Failed(e)) => {
                tracing::error!("step {} failed: {e:#}", step.step_id);
                step.span.record("error", format!("{e:#}"));
                for id in self.requests.scheduler.fail_planned() {
                    self.requests
                        .finish_with(id, ServeError::Internal(format!("{e:#}")));
                }
                return Ok(Vec::new());
            }
        };
        let longest_wait_us = times.iter().map(|t| t.wait_us).max().unwrap_or(0);
        self.published.update(|s| {
            let t = &mut s.steps;
            t.steps += 1;
            t.compute_us += result.compute_us;
            if step.back_to_back {
                t.gap_us += result.wait_us;
                t.rank_wait_us += longest_wait_us;
            }
        });
        self.metrics.step(result.compute_us, &times);
        let span = &step.span;
        span.record("compute_us", result.compute_us);
        span.record(
            "allreduce_us",
            times.iter().map(|t| t.allreduce_us).max().unwrap_or(0),
        );
        span.record("rank_wait_us", longest_wait_us);
        if stale {
            return Ok(Vec::new());
        }
        match self.requests.scheduler.apply(result) {
            Ok(sampled) => Ok(sampled),
            Err(failed) => {
                let why = failed.to_string();
                tracing::error!("step {} failed: {why}", step.step_id);
                for id in failed.seq_ids {
                    self.requests
                        .finish_with(id, ServeError::Internal(why.clone()));
                }
                Ok(Vec::new())
            }
        }
    }

    /// Handles one message; `Some` when the loop must stop.
    async fn take(&mut self, m: LoopMessage) -> Option<Stop> {
        match m {
            LoopMessage::Request(r) => self.requests.add(r),
            LoopMessage::Resume(m) => {
                let p = &self.placement;
                self.requests.resume(*m, p.id, &p.accepted);
            }
            LoopMessage::CancelAll => self.requests.cancel_all(),
            LoopMessage::Release(grace, done) => {
                self.ranks.release(grace).await;
                let _ = done.send(());
                return Some(Stop::Done);
            }
        }
        None
    }

    /// Rebuilds the ranks after one was lost (see the module doc), taking in, dropping and
    /// expiring requests meanwhile.
    async fn recover(&mut self, loss: Loss) -> Recovery {
        let started = Instant::now();
        let why = loss.why.clone();
        tracing::warn!("lost a rank ({why}); recovering");
        self.published
            .set_state_unless_draining(ReplicaState::Recovering(why.clone()));
        let requeued = self.requests.scheduler.requeue_all();
        for id in &requeued {
            if let Some(out) = self.requests.outputs.get_mut(id) {
                out.requeued();
            }
        }
        self.publish_stats();
        let span = tracing::info_span!(
            "recovery",
            reason = why.as_str(),
            requeued = requeued.len(),
            generation = Empty,
            duration_ms = Empty,
            outcome = Empty,
        );
        let rebuilt = self.rebuild_meanwhile(&loss, started).await;
        let elapsed = started.elapsed();
        span.record("duration_ms", elapsed.as_millis() as u64);
        let outcome = match rebuilt {
            Meanwhile::Released(release) => {
                if let Some((grace, done)) = release {
                    self.ranks.release(grace).await;
                    let _ = done.send(());
                }
                span.record("outcome", "stopped");
                Recovery::Stopped
            }
            Meanwhile::Rebuilt(Err(e)) => {
                span.record("outcome", "failed");
                Recovery::Failed(format!("{why}; the replica cannot be rebuilt: {e:#}"))
            }
            Meanwhile::Rebuilt(Ok(rebuilt)) => {
                let generation = self.ranks.client().generation();
                span.record("outcome", "rebuilt");
                span.record("generation", generation);
                tracing::warn!(
                    generation,
                    replace_ms = rebuilt.replace.as_millis() as u64,
                    init_ms = rebuilt.init.as_millis() as u64,
                    attempts = rebuilt.attempts,
                    "replica rebuilt in {elapsed:?}; {} requests requeued",
                    requeued.len()
                );
                self.metrics.recovered(elapsed);
                self.published
                    .set_state_unless_draining(ReplicaState::Serving);
                Recovery::Rebuilt
            }
        };
        self.publish_stats();
        outcome
    }

    /// Rebuilds the ranks while requests keep arriving (they queue), leaving and expiring.
    /// Once the recovery timeout passes, every request held is answered UNAVAILABLE and the
    /// replica is down, refusing new ones, while the rebuild goes on.
    async fn rebuild_meanwhile(&mut self, loss: &Loss, started: Instant) -> Meanwhile {
        let timeout = self.recovery_timeout;
        let deadline = started + timeout;
        // The router's clock: the replica counts as recovering too long (`Accepts::Late`) from
        // the moment it hands its requests over, so none of them comes straight back. (A
        // draining replica kept its state, and its older `state_since`.)
        let since = self
            .published
            .read(|s| s.state_since)
            .map_or(started, |s| s.max(started));
        let failover_at = self.placement.failover.as_ref().map(|f| since + f.after);
        let Self {
            ranks,
            requests,
            inbox,
            published,
            placement,
            ..
        } = self;
        let mut gave_up = false;
        let mut evacuated = false;
        let rebuild = ranks.rebuild(loss, published);
        tokio::pin!(rebuild);
        let mut tick = tokio::time::interval(RECOVERY_TICK);
        loop {
            tokio::select! {
                r = &mut rebuild => return Meanwhile::Rebuilt(r),
                m = inbox.recv() => {
                    let Some(m) = m else { return Meanwhile::Released(None) };
                    // Requests went elsewhere: every later one follows them.
                    let kept = if evacuated { placement.forward(m) } else { Some(m) };
                    match kept {
                        None => {}
                        Some(LoopMessage::Request(r)) if gave_up => {
                            let refused = published.state().refusal();
                            fail_choices(r, &refused.unwrap_or(ServeError::Recovering(loss.why.clone())));
                        }
                        Some(LoopMessage::Request(r)) => requests.add(r),
                        Some(LoopMessage::Resume(m)) => {
                            requests.resume(*m, placement.id, &placement.accepted);
                        }
                        Some(LoopMessage::CancelAll) => requests.cancel_all(),
                        Some(LoopMessage::Release(grace, done)) => {
                            return Meanwhile::Released(Some((grace, done)));
                        }
                    }
                }
                _ = tokio::time::sleep_until(failover_at.unwrap_or(deadline).into()),
                    if failover_at.is_some() && !evacuated => {
                    evacuated = true;
                    let n = placement.evacuate(requests);
                    tracing::warn!(
                        "{}; still recovering after {:?}: moved {n} requests to other replicas",
                        loss.why,
                        started.elapsed()
                    );
                }
                _ = tokio::time::sleep_until(deadline.into()), if !gave_up => {
                    gave_up = true;
                    let late = format!("{}; not rebuilt within {timeout:?}", loss.why);
                    tracing::error!("{late}: answering every request UNAVAILABLE");
                    requests.fail_all(ServeError::Recovering(late.clone()));
                    published.set_state(ReplicaState::Down(late));
                }
                _ = tick.tick() => requests.drop_gone(),
            }
        }
    }

    /// The step's span (see the module doc), its context put in the plan for the ranks. A
    /// disabled span, and nothing in the plan, unless spans are exported.
    fn step_span(&self, plan: &mut StepPlan) -> Span {
        if !self.tracing {
            return Span::none();
        }
        let traced: Vec<&RequestTrace> = plan
            .seqs
            .iter()
            .filter_map(|s| {
                self.requests
                    .outputs
                    .get(&s.seq_id)
                    .map(RequestOutput::trace)
            })
            .filter(|t| t.exported().is_some())
            .collect();
        // The first traced request reading its prompt, else the first traced one at all.
        let parent = traced
            .iter()
            .position(|t| t.in_prefill())
            .or((!traced.is_empty()).then_some(0));
        let parent_span = parent.and_then(|i| traced[i].phase_span().id());
        // Tokens fed: prompt chunks, decodes, and the sampled tokens fed by reference.
        let tokens: usize = plan
            .seqs
            .iter()
            .map(|s| s.token_ids.len() + usize::from(s.feed_sampled))
            .sum();
        let span = tracing::info_span!(
            parent: parent_span,
            "step",
            step_id = plan.step_id,
            seqs = plan.seqs.len(),
            tokens,
            compute_us = Empty,
            allreduce_us = Empty,
            rank_wait_us = Empty,
            error = Empty,
        );
        let others = traced
            .iter()
            .enumerate()
            .filter(|&(i, _)| Some(i) != parent)
            .filter_map(|(_, t)| t.exported());
        for cx in others.take(MAX_STEP_LINKS) {
            telemetry::add_link(&span, cx.clone());
        }
        plan.trace_context = telemetry::inject(&span);
        span
    }

    fn mark_scheduled(&mut self, plan: &StepPlan) {
        let now = Instant::now();
        // A table sent whole: the sequence's first step (or its first after a preemption,
        // which does not move its queue time). Its start may be past 0: a prefix-cache hit.
        for s in plan.seqs.iter().filter(|s| !s.append_blocks) {
            if let Some(o) = self.requests.outputs.get_mut(&s.seq_id) {
                o.mark_scheduled(now);
            }
        }
    }

    fn stream(&mut self, sampled: Vec<Sampled>) {
        let requests = &mut self.requests;
        for s in sampled {
            let id = s.token.seq_id;
            let Some(out) = requests.outputs.get_mut(&id) else {
                requests.scheduler.abort(id);
                continue;
            };
            let retired = s.finish.is_some();
            match out.push(&self.tokenizer, s) {
                Ok(None) => {}
                Ok(Some(_)) => {
                    // The scheduler already retired sequences at EOS or length.
                    if !retired {
                        requests.scheduler.abort(id);
                    }
                    requests.outputs.remove(&id);
                }
                Err(e) => {
                    requests.finish_with(id, ServeError::Internal(format!("detokenizing: {e:#}")))
                }
            }
        }
    }

    /// The scheduler's numbers into the replica's snapshot.
    fn publish_stats(&self) {
        let stats = self.requests.scheduler.stats();
        self.published.update(|s| s.scheduler = stats);
    }

    /// The replica is down for good: answer everyone, now and from now on, or, with other
    /// replicas, move every request to them (a release still lets the workers go).
    async fn down(mut self, why: String) {
        tracing::error!("replica down: {why}");
        self.published.set_state(ReplicaState::Down(why.clone()));
        let error = ServeError::ReplicaDown(why);
        let moved = self.placement.evacuate(&mut self.requests);
        if moved > 0 {
            tracing::warn!("moved {moved} requests to other replicas");
        }
        self.requests.fail_all(error.clone());
        self.publish_stats();
        while let Some(m) = self.inbox.recv().await {
            let Some(m) = self.placement.forward(m) else {
                continue;
            };
            match m {
                LoopMessage::Request(r) => fail_choices(r, &error),
                LoopMessage::Resume(m) => m.output.fail(error.clone()),
                LoopMessage::CancelAll => {}
                LoopMessage::Release(grace, done) => {
                    self.ranks.release(grace).await;
                    let _ = done.send(());
                    return;
                }
            }
        }
    }
}

impl Placement {
    /// Hands every request held to the front door for another replica; how many.
    fn evacuate(&self, requests: &mut Requests) -> usize {
        let Some(failover) = &self.failover else {
            return 0;
        };
        let moved = requests.take_all(self.id);
        let n = moved.len();
        for m in moved {
            failover.send(m);
        }
        n
    }

    /// With failover, sends a request that reached this lost replica on to another replica
    /// (`None`); any other message, or any message without failover, is the loop's to handle.
    fn forward(&self, m: LoopMessage) -> Option<LoopMessage> {
        let Some(failover) = &self.failover else {
            return Some(m);
        };
        match m {
            LoopMessage::Request(r) => {
                for m in Moved::unqueued(self.id, r) {
                    failover.send(m);
                }
            }
            LoopMessage::Resume(mut m) => {
                m.from = self.id;
                failover.send(*m);
            }
            other => return Some(other),
        }
        None
    }
}
