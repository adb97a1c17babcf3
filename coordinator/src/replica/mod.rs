//! A replica: the ranks (sharded client and membership), scheduler and step loop of one
//! tensor-parallel group of workers, behind one handle ([`Replica`]) that the front door hands
//! requests to.
//!
//! Its lifecycle is explicit ([`ReplicaState`]): **starting** while its ranks load the model,
//! then **serving**; **recovering** after it lost a rank, while it rebuilds itself (requests
//! wait in the queue: [`step_loop`], [`ranks`]); **down** when it cannot be rebuilt in time
//! or the step loop fails (every request it holds is answered, every later one refused);
//! **draining** on shutdown or when told to leave (new requests refused, those in flight
//! finish, then the rest are cancelled; a drain outlasts a recovery). Everything a replica
//! shows the world, its state included, is one [`ReplicaSnapshot`] ([`snapshot`]); what its
//! prefix cache holds, for the router, is its [`PrefixIndex`].
//!
//! Behind a front door of several replicas, each has an id, and a lost one hands its requests
//! back to the front door for another ([`Failover`], [`Moved`]; see [`step_loop`]).

pub mod ranks;
mod requests;
mod snapshot;
pub mod step_loop;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, oneshot, watch};

use self::ranks::Ranks;
pub use self::ranks::RecoveryOptions;
pub use self::snapshot::{Published, ReplicaSnapshot, ReplicaState, StepTotals};
use self::step_loop::{fail_choices, LoopMessage, NewRequest, Observers, Placement, StepLoop};
use crate::admission::Limits;
use crate::error::ServeError;
use crate::membership::Membership;
use crate::metrics::Metrics;
use crate::output::{InFlight, RequestOutput};
use crate::prefix_index::PrefixIndex;
use crate::scheduler::{Departing, SchedulerConfig};
use crate::sharded_client::{Closing, InitOptions, ReplicaInfo};
use crate::tokenizer::TextTokenizer;

/// How a replica schedules and reports its steps.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReplicaOptions {
    pub scheduler: SchedulerConfig,
    /// Plan step N+1 while the ranks run step N (see [`step_loop`]).
    pub overlap: bool,
    /// Spans are exported (`helios_proto::telemetry`): steps get spans too.
    pub tracing: bool,
    pub recovery: RecoveryOptions,
}

/// Where a lost replica's requests go: after `after` of recovering (or at once when it is down
/// for good) it hands each to `elsewhere`, the front door, which moves it to another replica.
#[derive(Clone)]
pub struct Failover {
    pub after: Duration,
    pub elsewhere: mpsc::UnboundedSender<Moved>,
}

impl Failover {
    fn send(&self, m: Moved) {
        if let Err(mpsc::error::SendError(m)) = self.elsewhere.send(m) {
            m.output
                .fail(ServeError::ReplicaDown("no replica can take it".into()));
        }
    }
}

/// A request leaving a lost replica (`from`) for another, with its tokens so far.
pub struct Moved {
    pub from: u32,
    pub departing: Departing,
    pub output: RequestOutput,
}

/// One tensor-parallel replica; cheap to clone (every clone is the same replica).
#[derive(Clone)]
pub struct Replica(Arc<Inner>);

struct Inner {
    id: u32,
    info: ReplicaInfo,
    world_size: usize,
    requests: mpsc::UnboundedSender<LoopMessage>,
    published: Published,
    /// Requests accepted and not yet ended.
    in_flight: InFlight,
    closing: Closing,
    prefixes: PrefixIndex,
}

impl Replica {
    /// Finds its workers through `membership` and loads the model on every rank (starting),
    /// then starts the step loop (serving). The step loop detokenizes with `tokenizer` and
    /// records steps in `metrics`.
    #[allow(clippy::too_many_arguments)]
    pub async fn start(
        id: u32,
        membership: Membership,
        init: &InitOptions,
        opts: ReplicaOptions,
        failover: Option<Failover>,
        tokenizer: Arc<TextTokenizer>,
        metrics: &Metrics,
    ) -> Result<Self> {
        let world_size = membership.world_size();
        let published = Published::new(world_size);
        let (ranks, info) =
            Ranks::start(membership, init.clone(), opts.recovery, &published).await?;
        let closing = ranks.client().closing().clone();
        let mut scheduler = info.scheduler(opts.scheduler);
        let prefixes = PrefixIndex::default();
        scheduler.publish_prefixes(prefixes.clone());
        published.update(|s| s.scheduler = scheduler.stats());
        let (requests, rx) = mpsc::unbounded_channel();
        let observers = Observers {
            published: published.clone(),
            metrics: metrics.replica(id, world_size),
            tracing: opts.tracing,
        };
        let in_flight = InFlight::default();
        let placement = Placement {
            id,
            accepted: in_flight.clone(),
            failover,
        };
        let step_loop = StepLoop::new(
            ranks,
            scheduler,
            tokenizer,
            rx,
            placement,
            observers,
            opts.overlap,
            opts.recovery.recovery_timeout,
        );
        let task = tokio::spawn(step_loop.run());
        // A step loop that panics (a bug) takes the replica down visibly: health, ModelInfo
        // and new requests say so, and streams in flight end with an error (ResponseStream).
        let supervised = published.clone();
        tokio::spawn(async move {
            if let Err(e) = task.await {
                tracing::error!("the step loop failed: {e}");
                supervised.set_state(ReplicaState::Down(format!("the step loop failed: {e}")));
            }
        });
        published.transition(&ReplicaState::Starting, ReplicaState::Serving);
        Ok(Self(Arc::new(Inner {
            id,
            info,
            world_size,
            requests,
            published,
            in_flight,
            closing,
            prefixes,
        })))
    }

    /// Its id among the front door's replicas.
    pub fn id(&self) -> u32 {
        self.0.id
    }

    /// The hashes of the blocks its prefix cache holds.
    pub fn prefixes(&self) -> &PrefixIndex {
        &self.0.prefixes
    }

    /// The model's facts and the KV blocks every rank holds.
    pub fn info(&self) -> &ReplicaInfo {
        &self.0.info
    }

    pub fn world_size(&self) -> usize {
        self.0.world_size
    }

    /// What a request must fit in to run here.
    pub fn limits(&self) -> Limits {
        let facts = &self.0.info.facts;
        Limits {
            max_model_len: facts.max_position_embeddings as usize,
            vocab_size: facts.vocab_size as usize,
            kv_capacity: self.0.info.num_kv_blocks as usize * facts.block_size as usize,
        }
    }

    /// Everything it publishes, now.
    pub fn snapshot(&self) -> ReplicaSnapshot {
        self.0.published.get()
    }

    pub fn state(&self) -> ReplicaState {
        self.0.published.state()
    }

    /// Reads its snapshot in place (the router, per request).
    pub fn read<R>(&self, f: impl FnOnce(&ReplicaSnapshot) -> R) -> R {
        self.0.published.read(f)
    }

    /// A receiver of its snapshot that wakes on every lifecycle change.
    pub fn watch(&self) -> watch::Receiver<ReplicaSnapshot> {
        self.0.published.subscribe()
    }

    /// Counts a request from its acceptance until its output is dropped.
    pub fn in_flight(&self) -> &InFlight {
        &self.0.in_flight
    }

    /// Hands an admitted request (its choices, the first first) to the step loop, or answers
    /// it with the reason the replica cannot take it.
    pub fn submit(&self, mut choices: Vec<NewRequest>) -> Result<(), ServeError> {
        if let Some(refused) = self.state().refusal() {
            fail_choices(choices, &refused);
            return Err(refused);
        }
        for c in &mut choices {
            c.output.routed(self.0.id);
        }
        let message = LoopMessage::Request(choices);
        if let Err(mpsc::error::SendError(message)) = self.0.requests.send(message) {
            let stopped = ServeError::ReplicaDown("the step loop has stopped".into());
            if let LoopMessage::Request(r) = message {
                fail_choices(r, &stopped);
            }
            return Err(stopped);
        }
        Ok(())
    }

    /// Takes a request moved from a lost replica; it waits here with its tokens.
    pub fn resume(&self, moved: Moved) {
        if let Err(mpsc::error::SendError(LoopMessage::Resume(m))) =
            self.0.requests.send(LoopMessage::Resume(Box::new(moved)))
        {
            m.output
                .fail(ServeError::ReplicaDown("the step loop has stopped".into()));
        }
    }

    /// Stops taking requests, lets those in flight finish for up to `grace`, then ends the
    /// rest with finish reason CANCELLED.
    pub async fn drain(&self, grace: Duration) {
        self.0.published.start_draining();
        let in_flight = &self.0.in_flight;
        let idle = || async {
            while in_flight.count() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(grace, idle()).await.is_err() {
            tracing::warn!(
                "{} requests still running after {grace:?}; cancelling them",
                in_flight.count()
            );
            let _ = self.0.requests.send(LoopMessage::CancelAll);
            let _ = tokio::time::timeout(Duration::from_secs(2), idle()).await;
        }
    }

    /// Lets the workers go (after a drain): their going is no failure, and is not logged as
    /// one. Workers spawned here exit, and are killed after `grace`.
    pub async fn release_workers(&self, grace: Duration) {
        self.0.closing.close();
        let (done, gone) = oneshot::channel();
        if self
            .0
            .requests
            .send(LoopMessage::Release(grace, done))
            .is_ok()
        {
            let _ = gone.await;
        }
    }
}
