//! A replica's ranks: the sharded client that steps them, the membership that finds them, and
//! how the replica is rebuilt when one is lost.
//!
//! **Detection.** A rank is lost when its step stream ends or breaks (the process died, the
//! connection broke), when its etcd lease expires (membership), or when it stops answering:
//! while a step is awaited longer than [`PROBE_AFTER`], every rank's health is probed each
//! [`PROBE_AFTER`], and a rank that does not answer within [`PROBE_TIMEOUT`] is lost (the
//! sharded client's [`StepWatch`]). `--step-timeout` bounds any step as a last resort.
//!
//! **Rebuild.** The ranks that do not answer a probe are replaced through the membership (local:
//! killed and spawned again; static: waited for at the same address; etcd: the next worker to
//! claim the rank), then every rank is initialised under a new generation: the survivors keep
//! their weights and only join the new mesh, the newcomer loads. An attempt that fails (a rank
//! lost again meanwhile) is retried from the probe; the caller bounds the whole.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use helios_proto::v1::{StepPlan, StepResult};

use super::snapshot::Published;
use crate::membership::Membership;
use crate::sharded_client::{InitOptions, RankTimes, ReplicaInfo, ShardedClient, StepWatch};
pub use crate::sharded_client::{Loss, StepError};

/// A step unanswered for this long has its ranks' health probed, and again at this interval.
pub const PROBE_AFTER: Duration = Duration::from_millis(500);
/// A rank that does not answer a health probe within this is lost.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The wait between two failed rebuild attempts, at first; it doubles up to a second.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);

/// How a replica notices and survives the loss of a rank.
#[derive(Debug, Clone, Copy)]
pub struct RecoveryOptions {
    /// A step unanswered for this long loses the replica its ranks, even if they all answer
    /// health probes (a rank stuck inside its forward pass).
    pub step_timeout: Duration,
    /// Requests wait this long for a lost rank to come back; then they are answered
    /// UNAVAILABLE (the replica keeps trying, refusing new requests meanwhile).
    pub recovery_timeout: Duration,
}

impl RecoveryOptions {
    /// How the sharded client watches for a step's answer.
    fn step_watch(&self) -> StepWatch {
        StepWatch {
            probe_after: PROBE_AFTER,
            probe_timeout: PROBE_TIMEOUT,
            step_timeout: self.step_timeout,
        }
    }
}

impl Default for RecoveryOptions {
    fn default() -> Self {
        Self {
            step_timeout: Duration::from_secs(300),
            recovery_timeout: Duration::from_secs(60),
        }
    }
}

/// How a rebuild went.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rebuilt {
    /// Finding the lost ranks and waiting for their replacements (a respawn, a restart, a
    /// registration), over every attempt.
    pub replace: Duration,
    /// The last, successful init: survivors joining the new mesh, newcomers loading the model.
    pub init: Duration,
    pub attempts: u32,
}

pub struct Ranks {
    client: ShardedClient,
    membership: Membership,
    init: InitOptions,
    opts: RecoveryOptions,
    /// What the first build reported: every rebuild must match it.
    info: ReplicaInfo,
}

impl Ranks {
    /// Finds every rank through `membership` and builds the replica for the first time.
    pub async fn start(
        mut membership: Membership,
        init: InitOptions,
        opts: RecoveryOptions,
        published: &Published,
    ) -> Result<(Self, ReplicaInfo)> {
        let addrs = membership.addresses().await?;
        let mut client = ShardedClient::new(&addrs, &init.auth)?;
        let info = client.init(&init, published).await?;
        let ranks = Self {
            client,
            membership,
            init,
            opts,
            info: info.clone(),
        };
        Ok((ranks, info))
    }

    pub fn client(&self) -> &ShardedClient {
        &self.client
    }

    /// Hands a plan to every rank (see [`ShardedClient::send`]).
    pub async fn send(&mut self, plan: StepPlan) -> Result<()> {
        self.client.send(plan).await
    }

    /// Waits for the answer to step `step_id`; a rank whose lease expires meanwhile is lost too.
    pub async fn receive(
        &mut self,
        step_id: u64,
    ) -> Result<(StepResult, Vec<RankTimes>), StepError> {
        let watch = self.opts.step_watch();
        tokio::select! {
            r = self.client.receive(step_id, &watch) => r,
            rank = self.membership.lost() => Err(StepError::Lost(Loss::new(format!(
                "rank {rank}: its lease expired"
            )))),
        }
    }

    /// Resolves with a rank lost while no step is awaited (an etcd lease expired).
    pub async fn lost(&mut self) -> usize {
        self.membership.lost().await
    }

    /// Replaces the ranks that do not answer (at first those `loss` names, if it names any)
    /// and builds the replica again under a new generation, until it works. An error means a
    /// rank cannot come back at all.
    #[tracing::instrument(skip_all, fields(generation = tracing::field::Empty))]
    pub async fn rebuild(&mut self, loss: &Loss, published: &Published) -> Result<Rebuilt> {
        let mut backoff = RETRY_BACKOFF;
        let mut known = Some(loss.silent.clone()).filter(|s| !s.is_empty());
        let mut times = Rebuilt::default();
        loop {
            times.attempts += 1;
            let replacing = Instant::now();
            let silent: Vec<usize> = match known.take() {
                Some(silent) => silent,
                None => self.client.silent(PROBE_TIMEOUT).await,
            };
            for rank in silent {
                published.set_rank_up(rank, false);
                tracing::warn!(rank, "rank lost; waiting for its replacement");
                let addr = self
                    .membership
                    .replace(rank)
                    .await
                    .with_context(|| format!("replacing rank {rank}"))?;
                self.client.set_rank(rank, &addr)?;
            }
            times.replace += replacing.elapsed();
            let init = Instant::now();
            let result = self.client.init(&self.init, published).await;
            times.init = init.elapsed();
            match result {
                Ok(info) => {
                    self.check_same(&info)?;
                    tracing::Span::current().record("generation", self.client.generation());
                    return Ok(times);
                }
                Err(e) => {
                    tracing::warn!("rebuilding the replica failed, trying again: {e:#}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// A rebuilt replica must be the one its requests were admitted to.
    fn check_same(&self, info: &ReplicaInfo) -> Result<()> {
        let first = &self.info;
        if info.facts != first.facts {
            bail!(
                "the rebuilt replica serves another model ({:?}, was {:?})",
                info.facts,
                first.facts
            );
        }
        if info.num_kv_blocks < first.num_kv_blocks {
            bail!(
                "the rebuilt replica holds {} KV blocks, fewer than its {}",
                info.num_kv_blocks,
                first.num_kv_blocks
            );
        }
        Ok(())
    }

    /// The replica is done with its workers (see [`Membership::release`]).
    pub async fn release(&mut self, grace: Duration) {
        self.client.closing().close();
        self.membership.release(grace).await;
    }
}
