//! Talking to all ranks of a replica as one: every call fans out to each worker and joins.
//!
//! As in TGI's sharded client, the coordinator sends every rank the same StepPlan over a
//! long-lived bidirectional stream and waits for all of them: ranks run the step in lockstep
//! (they meet in every all-reduce), rank 0's answer carries the sampled tokens.
//!
//! Channels connect lazily and reconnect by themselves, resolving the address's name at every
//! connect. Every [`ShardedClient::init`] builds the replica anew under a **generation**
//! number: every rank joins a new mesh, new step streams open, and every plan carries the
//! generation, so a rank of another build refuses it. Rebuilding after a lost rank is an init
//! with one rank's address replaced ([`ShardedClient::set_rank`]).

use anyhow::{bail, Context, Result};
use futures::future::{join_all, try_join_all};
use helios_proto::v1::worker_client::WorkerClient;
use helios_proto::v1::{
    HealthRequest, HealthResponse, InitRequest, ModelFacts, StepPlan, StepResult,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use crate::block_manager::BlockManager;
use crate::replica::Published;
use crate::scheduler::{Scheduler, SchedulerConfig};

/// How every rank is initialised.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub model_path: String,
    pub block_size: u32,
    pub num_kv_blocks: u32,
    pub kv_cache_memory_bytes: u64,
    pub dequantize: bool,
}

/// What the replica can do, once initialised.
#[derive(Debug, Clone)]
pub struct ReplicaInfo {
    pub facts: ModelFacts,
    /// The minimum over ranks.
    pub num_kv_blocks: u32,
}

impl ReplicaInfo {
    /// A scheduler over all of this replica's KV blocks.
    pub fn scheduler(&self, config: SchedulerConfig) -> Scheduler {
        let blocks = BlockManager::new(self.num_kv_blocks as usize, self.facts.block_size as usize);
        Scheduler::new(blocks, config)
    }
}

struct Shard {
    rank: usize,
    addr: String,
    client: WorkerClient<Channel>,
    /// Plans go out on `plans`; a reader task forwards the rank's answers to `results`.
    stream: Option<(mpsc::Sender<StepPlan>, mpsc::Receiver<StepResult>)>,
}

/// Every rank of one replica, addressed as one.
pub struct ShardedClient {
    shards: Vec<Shard>,
    /// The first failure of any rank's step stream in this generation (it ended or broke).
    failure: Arc<watch::Sender<Option<String>>>,
    closing: Closing,
    /// The build of the replica the open step streams belong to (0 before the first init).
    generation: u64,
    /// The same, for the stream readers: one of an older build reports nothing.
    current: Arc<AtomicU64>,
}

/// Set when the ranks are being stopped on purpose (shutdown): a step stream that ends from
/// then on is no failure, and is not logged as one.
#[derive(Debug, Clone, Default)]
pub struct Closing(Arc<AtomicBool>);

impl Closing {
    pub fn close(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_closing(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// What one rank reports of a step (`StepResult`): its wait for the plan, its time on the step
/// and, of that, its time in collectives.
#[derive(Debug, Clone, Copy, Default)]
pub struct RankTimes {
    pub wait_us: u64,
    pub compute_us: u64,
    pub allreduce_us: u64,
}

impl ShardedClient {
    /// A client of the workers at `addrs` (`http://host:port`, by rank). Nothing connects
    /// until the first call.
    pub fn new(addrs: &[String]) -> Result<Self> {
        let shards = addrs
            .iter()
            .enumerate()
            .map(|(rank, addr)| {
                Ok(Shard {
                    rank,
                    addr: addr.clone(),
                    client: worker_client(rank, addr)?,
                    stream: None,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (failure, _) = watch::channel(None);
        Ok(Self {
            shards,
            failure: Arc::new(failure),
            closing: Closing::default(),
            generation: 0,
            current: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Rank `rank` is now served at `addr` (its replacement); the next init uses it.
    pub fn set_rank(&mut self, rank: usize, addr: &str) -> Result<()> {
        let shard = self
            .shards
            .get_mut(rank)
            .with_context(|| format!("no rank {rank}"))?;
        shard.client = worker_client(rank, addr)?;
        shard.addr = addr.to_string();
        shard.stream = None;
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Asks every rank for its health at once; `None` for a rank that does not answer within
    /// `timeout` (gone, stopped, unreachable).
    pub async fn probe(&self, timeout: Duration) -> Vec<Option<HealthResponse>> {
        probe_all(self.health_clients(), timeout).await
    }

    /// Clients for health probes, usable while a step is awaited.
    pub fn health_clients(&self) -> Vec<WorkerClient<Channel>> {
        self.shards.iter().map(|s| s.client.clone()).collect()
    }

    pub fn world_size(&self) -> usize {
        self.shards.len()
    }

    /// The flag that says the ranks are being stopped on purpose.
    pub fn closing(&self) -> &Closing {
        &self.closing
    }

    /// Watches for the first rank failure; the value is `Some(why)` once a rank is gone.
    pub fn failure(&self) -> watch::Receiver<Option<String>> {
        self.failure.subscribe()
    }

    /// Builds the replica under a generation newer than any its ranks have seen: hands every
    /// rank its place and its peers, loads the model where it is not loaded yet (a rank that
    /// has it keeps it and only joins the new mesh), opens the step streams. Fails as soon as
    /// any rank fails. Whether each rank's stream is open goes to `published` (`ranks_up`).
    #[tracing::instrument(skip_all, fields(world = self.shards.len(), generation = tracing::field::Empty))]
    pub async fn init(&mut self, opts: &InitOptions, published: &Published) -> Result<ReplicaInfo> {
        // The old generation's streams close; their readers report nothing from now on.
        for s in &mut self.shards {
            s.stream = None;
        }
        let (failure, _) = watch::channel(None);
        self.failure = Arc::new(failure);
        let healths = try_join_all(self.shards.iter_mut().map(|s| async move {
            let h = s
                .client
                .health(HealthRequest {})
                .await
                .map_err(|st| anyhow::anyhow!("{}", st.message()))
                .with_context(|| format!("health of rank {} at {}", s.rank, s.addr))?;
            anyhow::Ok(h.into_inner())
        }))
        .await?;
        let generation = healths
            .iter()
            .map(|h| h.generation)
            .chain([self.generation])
            .max()
            .unwrap_or(0)
            + 1;
        tracing::Span::current().record("generation", generation);
        let info = self.init_all(opts, &healths, generation).await?;
        self.current.store(generation, Ordering::SeqCst);
        for s in &mut self.shards {
            s.stream = Some(
                open_stream(
                    s,
                    generation,
                    self.failure.clone(),
                    &self.closing,
                    &self.current,
                    published,
                )
                .await?,
            );
        }
        self.generation = generation;
        Ok(info)
    }

    /// `Init` on every rank at once, with the peers' communicator addresses from `healths`.
    async fn init_all(
        &mut self,
        opts: &InitOptions,
        healths: &[HealthResponse],
        generation: u64,
    ) -> Result<ReplicaInfo> {
        let world = self.shards.len();
        let peer_addrs: Vec<String> = healths.iter().map(|h| h.comm_addr.clone()).collect();
        let nccl_id = healths
            .first()
            .map(|h| h.nccl_id.clone())
            .unwrap_or_default();
        let inits = try_join_all(self.shards.iter_mut().map(|s| {
            let req = InitRequest {
                rank: s.rank as u32,
                world_size: world as u32,
                model_path: opts.model_path.clone(),
                peer_addrs: peer_addrs.clone(),
                kv_cache_memory_bytes: opts.kv_cache_memory_bytes,
                num_kv_blocks: opts.num_kv_blocks,
                block_size: opts.block_size,
                dequantize: opts.dequantize,
                nccl_id: nccl_id.clone(),
                generation,
            };
            async move {
                let r = s
                    .client
                    .init(req)
                    .await
                    .map_err(|st| anyhow::anyhow!("{}", st.message()))
                    .with_context(|| format!("initializing rank {}", s.rank))?;
                anyhow::Ok(r.into_inner())
            }
        }))
        .await?;
        let num_kv_blocks = inits.iter().map(|r| r.num_kv_blocks).min().unwrap_or(0);
        let facts = inits
            .into_iter()
            .next()
            .and_then(|r| r.model)
            .context("rank 0 reported no model facts")?;
        Ok(ReplicaInfo {
            facts,
            num_kv_blocks,
        })
    }

    /// Hands a plan to every rank without waiting for the answers: the coordinator plans the
    /// next step meanwhile. Answers come back in order through [`Self::receive`].
    #[tracing::instrument(level = "debug", skip_all, fields(step = plan.step_id, seqs = plan.seqs.len()))]
    pub async fn send(&mut self, mut plan: StepPlan) -> Result<()> {
        let n = self.shards.len();
        plan.generation = self.generation;
        let mut plan = Some(plan);
        for (rank, s) in self.shards.iter_mut().enumerate() {
            // The last rank takes the plan itself: one deep copy fewer per step.
            let plan = if rank + 1 == n {
                plan.take()
            } else {
                plan.clone()
            };
            let (tx, _) = s
                .stream
                .as_mut()
                .with_context(|| format!("rank {} is not initialized", s.rank))?;
            // The reader's queue holds two plans: one running, one next.
            tx.send(plan.context("no plan")?)
                .await
                .map_err(|_| anyhow::anyhow!("rank {}: step stream closed", s.rank))?;
        }
        Ok(())
    }

    /// Waits for every rank's answer to step `step_id` (the oldest one sent); returns rank 0's,
    /// with `compute_us` that of the slowest rank, and every rank's times.
    /// Fails as soon as any rank is gone, even while other ranks are still waiting on it.
    #[tracing::instrument(level = "debug", skip_all, fields(step = step_id))]
    pub async fn receive(&mut self, step_id: u64) -> Result<(StepResult, Vec<RankTimes>)> {
        let mut failure = self.failure.subscribe();
        let all = join_all(self.shards.iter_mut().map(|s| async move {
            let (_, results) = s
                .stream
                .as_mut()
                .with_context(|| format!("rank {} is not initialized", s.rank))?;
            results
                .recv()
                .await
                .with_context(|| format!("rank {}: step stream ended", s.rank))
        }));
        let results = tokio::select! {
            r = all => r,
            _ = failure.wait_for(Option::is_some) => {
                bail!("{}", self.failure.borrow().clone().unwrap_or_default());
            }
        };
        let mut rank0: Option<StepResult> = None;
        let mut times = Vec::with_capacity(results.len());
        for (rank, r) in results.into_iter().enumerate() {
            let r = match r {
                Ok(r) => r,
                // A closed stream's reason is in `failure` (set by its reader).
                Err(e) => bail!(
                    "{}",
                    self.failure.borrow().clone().unwrap_or(format!("{e:#}"))
                ),
            };
            if !r.error.is_empty() {
                bail!("{}", r.error);
            }
            if r.step_id != step_id {
                bail!("rank {rank} answered step {} to step {step_id}", r.step_id);
            }
            times.push(RankTimes {
                wait_us: r.wait_us,
                compute_us: r.compute_us,
                allreduce_us: r.allreduce_us,
            });
            if rank == 0 {
                rank0 = Some(r);
            }
        }
        let mut r = rank0.context("no ranks")?;
        r.compute_us = times.iter().map(|t| t.compute_us).max().unwrap_or(0);
        Ok((r, times))
    }
}

/// A lazily connecting client of the worker at `addr`.
fn worker_client(rank: usize, addr: &str) -> Result<WorkerClient<Channel>> {
    let channel = Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("rank {rank}: bad address {addr:?}"))?
        .connect_timeout(Duration::from_secs(2))
        // A peer that vanishes without closing its socket (a lost node) is noticed within
        // seconds, not at the next TCP timeout.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(WorkerClient::new(channel)
        .max_decoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES)
        .max_encoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES))
}

/// Every client's health at once; `None` where there is no answer within `timeout`.
pub async fn probe_all(
    clients: Vec<WorkerClient<Channel>>,
    timeout: Duration,
) -> Vec<Option<HealthResponse>> {
    join_all(clients.into_iter().map(|mut c| async move {
        match tokio::time::timeout(timeout, c.health(HealthRequest {})).await {
            Ok(Ok(h)) => Some(h.into_inner()),
            _ => None,
        }
    }))
    .await
}

/// Opens rank `s`'s step stream of `generation`: plans go out on the sender; a reader task
/// forwards the answers to the receiver, and reports the stream's end as the generation's
/// failure (unless a newer generation replaced it, or the ranks are being let go).
async fn open_stream(
    s: &mut Shard,
    generation: u64,
    failure: Arc<watch::Sender<Option<String>>>,
    closing: &Closing,
    current: &Arc<AtomicU64>,
    published: &Published,
) -> Result<(mpsc::Sender<StepPlan>, mpsc::Receiver<StepResult>)> {
    let (plans_tx, plans_rx) = mpsc::channel(2);
    let mut answers = s
        .client
        .step(ReceiverStream::new(plans_rx))
        .await
        .with_context(|| format!("opening the step stream of rank {}", s.rank))?
        .into_inner();
    let (results_tx, results_rx) = mpsc::channel(2);
    let rank = s.rank;
    let (published, closing, current) = (published.clone(), closing.clone(), current.clone());
    published.set_rank_up(rank, true);
    tokio::spawn(async move {
        let why = loop {
            match answers.message().await {
                Ok(Some(r)) => {
                    if results_tx.send(r).await.is_err() {
                        return; // the client is gone
                    }
                }
                Ok(None) => break format!("rank {rank}: step stream ended"),
                Err(st) => break format!("rank {rank}: {}", st.message()),
            }
        };
        if current.load(Ordering::SeqCst) != generation {
            return; // a stream of an older build, closed by the rebuild
        }
        published.set_rank_up(rank, false);
        if closing.is_closing() {
            tracing::debug!("{why} (shutting down)");
            return;
        }
        // A warning: the replica recovers (its recovery logs what it lost and how it went).
        tracing::warn!("{why}");
        failure.send_if_modified(|f| f.is_none() && f.replace(why).is_none());
    });
    Ok((plans_tx, results_rx))
}
