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
//! A rank that fails (its step stream ends: the process died, the connection broke) takes the
//! replica down: every accepted request is answered [`ServeError::ReplicaDown`], the replica's
//! state says so (health turns NOT_SERVING), and every later request is refused at once. The
//! coordinator itself keeps serving everything else.
//!
//! This is the only place steps are driven: servers, `helios generate` without a server, the
//! `helios logits` debugging command and the engine benchmark all come here through the front
//! door.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use helios_proto::telemetry;
use helios_proto::v1::StepPlan;
use tokio::sync::mpsc;
use tracing::field::Empty;
use tracing::Span;

use super::{Published, ReplicaState};
use crate::admission::Admitted;
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::output::RequestOutput;
use crate::request_trace::RequestTrace;
use crate::scheduler::{AddError, Sampled, Scheduler, Sequence};
use crate::sharded_client::ShardedClient;
use crate::tokenizer::TextTokenizer;

/// Most links from a step's span to the traced requests it served besides its parent's.
const MAX_STEP_LINKS: usize = 32;

/// A request that passed admission, on its way to the step loop.
pub struct NewRequest {
    pub admitted: Admitted,
    pub output: RequestOutput,
}

/// What the step loop is told.
pub enum LoopMessage {
    Request(Box<NewRequest>),
    /// End every request now with finish reason CANCELLED (shutdown after its grace period).
    CancelAll,
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
    /// The replica's snapshot: the scheduler's numbers, step totals, going down.
    pub published: Published,
    pub metrics: Arc<Metrics>,
    /// Spans are exported: steps get spans, and plans carry their context to the ranks.
    pub tracing: bool,
}

pub struct StepLoop {
    client: ShardedClient,
    scheduler: Scheduler,
    tokenizer: Arc<TextTokenizer>,
    requests: mpsc::UnboundedReceiver<LoopMessage>,
    outputs: HashMap<u64, RequestOutput>,
    next_seq: u64,
    published: Published,
    metrics: Arc<Metrics>,
    tracing: bool,
    overlap: bool,
}

/// The ranks are gone: the loop ends and the replica goes down.
struct Lost;

impl StepLoop {
    pub fn new(
        client: ShardedClient,
        scheduler: Scheduler,
        tokenizer: Arc<TextTokenizer>,
        requests: mpsc::UnboundedReceiver<LoopMessage>,
        observers: Observers,
        overlap: bool,
    ) -> Self {
        Self {
            client,
            scheduler,
            tokenizer,
            requests,
            outputs: HashMap::new(),
            next_seq: 0,
            published: observers.published,
            metrics: observers.metrics,
            tracing: observers.tracing,
            overlap,
        }
    }

    /// Runs until every request sender is gone.
    pub async fn run(mut self) {
        let mut failure = self.client.failure();
        // Steps the ranks hold, oldest first: with overlap the next one waits at the ranks
        // while they run the current one.
        let depth = if self.overlap { 2 } else { 1 };
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let mut idled = true;
        loop {
            while let Ok(m) = self.requests.try_recv() {
                self.take(m);
            }
            self.drop_gone();
            if in_flight.len() < depth {
                let plan = match self.scheduler.schedule() {
                    Ok(plan) => plan,
                    Err(e) => {
                        self.fail_all(ServeError::Internal(format!("scheduling failed: {e:#}")));
                        continue;
                    }
                };
                self.note_preemptions();
                self.publish_stats();
                if let Some(mut plan) = plan {
                    self.mark_scheduled(&plan);
                    let span = self.step_span(&mut plan);
                    let step_id = plan.step_id;
                    if let Err(e) = self.client.send(plan).await {
                        tracing::error!("sending step {step_id}: {e:#}");
                        break;
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
                tokio::select! {
                    m = self.requests.recv() => match m {
                        Some(m) => self.take(m),
                        None => return,
                    },
                    _ = failure.wait_for(Option::is_some) => break,
                }
                continue;
            };
            // A step failed before this one was answered and took its sequences with it:
            // this answer only keeps the stream in order.
            let stale = self.scheduler.num_unanswered() <= in_flight.len();
            match self.collect(step, stale).await {
                Ok(sampled) => self.stream(sampled),
                Err(Lost) => break,
            }
        }
        let why = failure
            .borrow()
            .clone()
            .unwrap_or_else(|| "a rank stopped taking steps".into());
        self.down(why).await;
    }

    /// Waits for the answer to a step in flight and applies it. A refused plan or a malformed
    /// answer fails that step's sequences (and those of the step sent after it); the replica
    /// goes on.
    async fn collect(&mut self, step: InFlight, stale: bool) -> Result<Vec<Sampled>, Lost> {
        let result = self.client.receive(step.step_id).await;
        if self.client.failure().borrow().is_some() {
            return Err(Lost);
        }
        let (result, times) = match result {
            Ok(r) => r,
            Err(_) if stale => return Ok(Vec::new()),
            Err(e) if self.client.closing().is_closing() => {
                // Shutting down: the ranks stopped mid-step on purpose.
                tracing::debug!("step {} unanswered at shutdown: {e:#}", step.step_id);
                for id in self.scheduler.fail_planned() {
                    self.finish_with(id, ServeError::Draining);
                }
                return Ok(Vec::new());
            }
            Err(e) => {
                tracing::error!("step {} failed: {e:#}", step.step_id);
                step.span.record("error", format!("{e:#}"));
                for id in self.scheduler.fail_planned() {
                    self.finish_with(id, ServeError::Internal(format!("{e:#}")));
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
        match self.scheduler.apply(result) {
            Ok(sampled) => Ok(sampled),
            Err(failed) => {
                let why = failed.to_string();
                tracing::error!("step {} failed: {why}", step.step_id);
                for id in failed.seq_ids {
                    self.finish_with(id, ServeError::Internal(why.clone()));
                }
                Ok(Vec::new())
            }
        }
    }

    fn take(&mut self, m: LoopMessage) {
        match m {
            LoopMessage::Request(r) => self.add(*r),
            LoopMessage::CancelAll => {
                self.scheduler.abort_all();
                for (_, out) in self.outputs.drain() {
                    out.cancel();
                }
            }
        }
    }

    fn add(&mut self, r: NewRequest) {
        let id = self.next_seq;
        self.next_seq += 1;
        let seq = Sequence::new(id, r.admitted.prompt_ids, r.admitted.params);
        match self.scheduler.add(seq) {
            Ok(()) => {
                tracing::debug!(request_id = r.output.request_id(), seq = id, "queued");
                self.outputs.insert(id, r.output);
            }
            Err(AddError::QueueFull(n)) => r.output.fail(ServeError::QueueFull(n)),
            Err(e) => r.output.fail(ServeError::invalid_request(e.to_string())),
        }
    }

    /// Frees the blocks of every request whose client is gone or whose deadline passed.
    fn drop_gone(&mut self) {
        let gone: Vec<u64> = self
            .outputs
            .iter()
            .filter(|(_, o)| o.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.scheduler.abort(id);
            if let Some(out) = self.outputs.remove(&id) {
                tracing::debug!(
                    request_id = out.request_id(),
                    seq = id,
                    "client left; freeing its blocks"
                );
            }
        }
        for id in self.scheduler.expire(Instant::now()) {
            if let Some(out) = self.outputs.remove(&id) {
                tracing::debug!(
                    request_id = out.request_id(),
                    seq = id,
                    "deadline passed; freeing its blocks"
                );
                out.fail(ServeError::DeadlineExceeded);
            }
        }
    }

    /// Tells the requests the scheduler preempted: they wait again.
    fn note_preemptions(&mut self) {
        for id in self.scheduler.take_preempted() {
            if let Some(out) = self.outputs.get_mut(&id) {
                out.preempted();
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
            .filter_map(|s| self.outputs.get(&s.seq_id).map(RequestOutput::trace))
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
            if let Some(o) = self.outputs.get_mut(&s.seq_id) {
                o.mark_scheduled(now);
            }
        }
    }

    fn stream(&mut self, sampled: Vec<Sampled>) {
        for s in sampled {
            let id = s.token.seq_id;
            let Some(out) = self.outputs.get_mut(&id) else {
                self.scheduler.abort(id);
                continue;
            };
            let retired = s.finish.is_some();
            match out.push(&self.tokenizer, s) {
                Ok(None) => {}
                Ok(Some(_)) => {
                    // The scheduler already retired sequences at EOS or length.
                    if !retired {
                        self.scheduler.abort(id);
                    }
                    self.outputs.remove(&id);
                }
                Err(e) => {
                    self.finish_with(id, ServeError::Internal(format!("detokenizing: {e:#}")))
                }
            }
        }
    }

    fn finish_with(&mut self, id: u64, error: ServeError) {
        self.scheduler.abort(id);
        if let Some(out) = self.outputs.remove(&id) {
            out.fail(error);
        }
    }

    fn fail_all(&mut self, error: ServeError) {
        self.scheduler.abort_all();
        for (_, out) in self.outputs.drain() {
            out.fail(error.clone());
        }
    }

    /// The scheduler's numbers into the replica's snapshot.
    fn publish_stats(&self) {
        let stats = self.scheduler.stats();
        self.published.update(|s| s.scheduler = stats);
    }

    /// The replica is down: answer everyone, now and from now on.
    async fn down(mut self, why: String) {
        tracing::error!("replica down: {why}");
        self.published.set_state(ReplicaState::Down(why.clone()));
        let error = ServeError::ReplicaDown(why);
        self.fail_all(error.clone());
        self.publish_stats();
        while let Some(m) = self.requests.recv().await {
            if let LoopMessage::Request(r) = m {
                r.output.fail(error.clone());
            }
        }
    }
}
