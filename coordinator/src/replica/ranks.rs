//! A replica's ranks: the sharded client that steps them, the membership that finds them, and
//! how the replica is rebuilt when one is lost.
//!
//! **Detection.** A rank is lost when its step stream ends or breaks (the process died, the
//! connection broke), when its etcd lease expires (membership), or when it stops answering:
//! while a step is awaited longer than [`PROBE_AFTER`], every rank's health is probed each
//! [`PROBE_AFTER`], and a rank that does not answer within [`PROBE_TIMEOUT`] is lost (a
//! stopped process holds its sockets open, so nothing else would notice; the health service
//! runs beside the forward pass, so a slow step still answers). `--step-timeout` bounds any
//! step as a last resort.
//!
//! **Rebuild.** The ranks that do not answer a probe are replaced through the membership (local:
//! killed and spawned again; static: waited for at the same address; etcd: the next worker to
//! claim the rank), then every rank is initialised under a new generation: the survivors keep
//! their weights and only join the new mesh, the newcomer loads. An attempt that fails (a rank
//! lost again meanwhile) is retried from the probe; the caller bounds the whole.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use helios_proto::v1::StepResult;

use super::snapshot::Published;
use crate::membership::Membership;
use crate::sharded_client::{probe_all, InitOptions, RankTimes, ReplicaInfo, ShardedClient};

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

impl Default for RecoveryOptions {
    fn default() -> Self {
        Self {
            step_timeout: Duration::from_secs(300),
            recovery_timeout: Duration::from_secs(60),
        }
    }
}

/// A rank was lost: why, and which ranks are known not to answer (empty: not known; the
/// rebuild probes them all).
#[derive(Debug, Clone, Default)]
pub struct Loss {
    pub why: String,
    pub silent: Vec<usize>,
}

impl Loss {
    pub fn new(why: impl Into<String>) -> Self {
        Self {
            why: why.into(),
            silent: Vec::new(),
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

/// Why a step did not come back.
pub enum StepError {
    /// A rank is lost: the replica must be rebuilt.
    Lost(Loss),
    /// The step failed on the ranks (a refused plan, a malformed answer); they are fine.
    Failed(anyhow::Error),
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
        let mut client = ShardedClient::new(&addrs)?;
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

    pub fn client_mut(&mut self) -> &mut ShardedClient {
        &mut self.client
    }

    /// Waits for the answer to step `step_id`, probing the ranks while it is long in coming.
    pub async fn receive(
        &mut self,
        step_id: u64,
    ) -> Result<(StepResult, Vec<RankTimes>), StepError> {
        let probes = self.client.health_clients();
        let failure = self.client.failure();
        let started = Instant::now();
        let Self {
            client,
            membership,
            opts,
            ..
        } = self;
        let answer = client.receive(step_id);
        tokio::pin!(answer);
        let mut next_probe = started + PROBE_AFTER;
        loop {
            tokio::select! {
                r = &mut answer => {
                    return r.map_err(|e| match failure.borrow().clone() {
                        Some(why) => StepError::Lost(Loss::new(why)),
                        None => StepError::Failed(e),
                    });
                }
                rank = membership.lost() => {
                    return Err(StepError::Lost(Loss::new(format!(
                        "rank {rank}: its lease expired"
                    ))));
                }
                _ = tokio::time::sleep_until(next_probe.into()) => {
                    if started.elapsed() >= opts.step_timeout {
                        return Err(StepError::Lost(Loss::new(format!(
                            "step {step_id} took longer than the step timeout ({:?})",
                            opts.step_timeout
                        ))));
                    }
                    let healths = probe_all(probes.clone(), PROBE_TIMEOUT).await;
                    let silent: Vec<usize> = (0..healths.len())
                        .filter(|&r| healths[r].is_none())
                        .collect();
                    if let Some(rank) = silent.first() {
                        let why = format!(
                            "rank {rank} stopped answering (step {step_id} waited {:?})",
                            started.elapsed()
                        );
                        return Err(StepError::Lost(Loss { why, silent }));
                    }
                    next_probe = Instant::now() + PROBE_AFTER;
                }
            }
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
                None => {
                    let healths = self.client.probe(PROBE_TIMEOUT).await;
                    (0..healths.len())
                        .filter(|&r| healths[r].is_none())
                        .collect()
                }
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
