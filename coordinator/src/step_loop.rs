//! The step loop: the one task that owns the scheduler and the replica's workers.
//!
//! Each turn it takes in new requests, drops those whose client left (their blocks are free
//! before the next plan), plans a step, runs it on every rank, and streams the sampled tokens
//! back. When nothing can run it sleeps until a request arrives or a rank fails.
//!
//! A rank that fails (its step stream ends: the process died, the connection broke) takes the
//! replica down: every accepted request is answered UNAVAILABLE, health turns NOT_SERVING, and
//! every later request is answered UNAVAILABLE at once. Recovering a replica without losing
//! requests is a later issue; the coordinator itself keeps serving everything else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Instant;

use helios_proto::v1::StepPlan;
use tokio::sync::{mpsc, watch};
use tonic::Status;

use crate::admission::Admitted;
use crate::output::RequestOutput;
use crate::scheduler::{Scheduler, Sequence};
use crate::sharded_client::ShardedClient;
use crate::tokenizer::TextTokenizer;

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

/// Whether the replica can take requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    Serving,
    /// Shutting down: requests in flight finish, new ones are refused.
    Draining,
    /// A rank failed; the reason.
    Down(String),
}

/// Numbers the step loop publishes after every turn (ModelInfo, later metrics).
#[derive(Debug, Default)]
pub struct LoopStats {
    pub kv_blocks_free: AtomicU32,
    pub running: AtomicU32,
    pub waiting: AtomicU32,
}

pub struct StepLoop {
    client: ShardedClient,
    scheduler: Scheduler,
    tokenizer: Arc<TextTokenizer>,
    requests: mpsc::UnboundedReceiver<LoopMessage>,
    outputs: HashMap<u64, RequestOutput>,
    next_seq: u64,
    stats: Arc<LoopStats>,
    state: Arc<watch::Sender<ReplicaState>>,
}

impl StepLoop {
    pub fn new(
        client: ShardedClient,
        scheduler: Scheduler,
        tokenizer: Arc<TextTokenizer>,
        requests: mpsc::UnboundedReceiver<LoopMessage>,
        stats: Arc<LoopStats>,
        state: Arc<watch::Sender<ReplicaState>>,
    ) -> Self {
        Self {
            client,
            scheduler,
            tokenizer,
            requests,
            outputs: HashMap::new(),
            next_seq: 0,
            stats,
            state,
        }
    }

    /// Runs until every request sender is gone.
    pub async fn run(mut self) {
        let mut failure = self.client.failure();
        loop {
            while let Ok(m) = self.requests.try_recv() {
                self.take(m);
            }
            self.drop_cancelled();
            let plan = match self.scheduler.schedule() {
                Ok(plan) => plan,
                Err(e) => {
                    self.fail_all(Status::internal(format!("scheduling failed: {e:#}")));
                    continue;
                }
            };
            self.publish_stats();
            let Some(plan) = plan else {
                tokio::select! {
                    m = self.requests.recv() => match m {
                        Some(m) => self.take(m),
                        None => return,
                    },
                    _ = failure.wait_for(Option::is_some) => break,
                }
                continue;
            };
            self.mark_scheduled(&plan);
            let step_id = plan.step_id;
            let result = self.client.step(plan).await;
            if failure.borrow().is_some() {
                break;
            }
            let sampled = result.and_then(|r| self.scheduler.apply(r));
            match sampled {
                Ok(sampled) => self.stream(sampled),
                // Not a lost rank: a refused plan or a malformed answer. Only this step's
                // sequences are failed; the replica goes on.
                Err(e) => {
                    tracing::error!("step {step_id} failed: {e:#}");
                    let ids: Vec<u64> = self.scheduler.planned_ids().collect();
                    for id in ids {
                        self.finish_with(id, Status::internal(format!("{e:#}")));
                    }
                }
            }
        }
        let why = failure.borrow().clone().unwrap_or_default();
        self.down(why).await;
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
            Err(e) => r.output.fail(Status::invalid_argument(format!("{e:#}"))),
        }
    }

    /// Frees the blocks of every request whose client is gone.
    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .outputs
            .iter()
            .filter(|(_, o)| o.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            tracing::debug!(seq = id, "client left; freeing its blocks");
            self.scheduler.abort(id);
            self.outputs.remove(&id);
        }
    }

    fn mark_scheduled(&mut self, plan: &StepPlan) {
        let now = Instant::now();
        for s in plan.seqs.iter().filter(|s| s.start_pos == 0) {
            if let Some(o) = self.outputs.get_mut(&s.seq_id) {
                o.mark_scheduled(now);
            }
        }
    }

    fn stream(&mut self, sampled: Vec<crate::scheduler::Sampled>) {
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
                Err(e) => self.finish_with(id, Status::internal(format!("detokenizing: {e:#}"))),
            }
        }
    }

    fn finish_with(&mut self, id: u64, status: Status) {
        self.scheduler.abort(id);
        if let Some(out) = self.outputs.remove(&id) {
            out.fail(status);
        }
    }

    fn fail_all(&mut self, status: Status) {
        self.scheduler.abort_all();
        for (_, out) in self.outputs.drain() {
            out.fail(status.clone());
        }
    }

    fn publish_stats(&self) {
        let s = &self.stats;
        let n = |v: usize| v.min(u32::MAX as usize) as u32;
        s.kv_blocks_free
            .store(n(self.scheduler.num_free_blocks()), Ordering::Relaxed);
        s.running
            .store(n(self.scheduler.num_running()), Ordering::Relaxed);
        s.waiting
            .store(n(self.scheduler.num_waiting()), Ordering::Relaxed);
    }

    /// The replica is down: answer everyone, now and from now on.
    async fn down(mut self, why: String) {
        tracing::error!("replica down: {why}");
        self.state.send_replace(ReplicaState::Down(why.clone()));
        let status = Status::unavailable(format!("the replica is down: {why}"));
        self.fail_all(status.clone());
        self.publish_stats();
        while let Some(m) = self.requests.recv().await {
            if let LoopMessage::Request(r) = m {
                r.output.fail(status.clone());
            }
        }
    }
}
