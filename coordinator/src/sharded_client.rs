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
//!
//! **A rank that stops answering.** A step whose answer is long in coming has every rank's
//! `Health` probed ([`StepWatch`]): a stopped process (SIGSTOP, a hung node) keeps its sockets
//! open, so nothing else would notice it; `Health` is served beside the forward pass, so a slow
//! step still answers. [`ShardedClient::receive`] tells a lost rank ([`StepError::Lost`]) from a
//! step the ranks refused ([`StepError::Failed`]).

use anyhow::{anyhow, Context, Result};
use futures::future::{join_all, try_join_all};
use helios_proto::auth::Authorize;
use helios_proto::v1::worker_client::WorkerClient;
use helios_proto::v1::{
    HealthRequest, HealthResponse, InitRequest, ModelFacts, StepPlan, StepResult,
};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

pub use helios_proto::LoadFormat;

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
    pub load_format: LoadFormat,
    /// What every call to a worker carries: the cluster's token (none for `--insecure`
    /// workers).
    pub auth: Authorize,
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

/// One rank's worker.
struct Shard {
    rank: usize,
    addr: String,
    client: WorkerRpc,
}

/// A worker's client; every call carries the cluster's token.
type WorkerRpc = WorkerClient<InterceptedService<Channel, Authorize>>;

/// One rank's step stream: plans go out on the sender; a reader task forwards the rank's
/// answers to the receiver.
type StepStream = (mpsc::Sender<StepPlan>, mpsc::Receiver<StepResult>);

/// Every rank of one replica, addressed as one.
pub struct ShardedClient {
    shards: Vec<Shard>,
    auth: Authorize,
    /// By rank, apart from `shards` so that a step is awaited on them while `shards` probes.
    streams: Vec<Option<StepStream>>,
    /// The first failure of any rank's step stream in this generation (it ended or broke).
    failure: Arc<watch::Sender<Option<String>>>,
    closing: Closing,
    /// The build of the replica the open step streams belong to (0 before the first init);
    /// the stream readers read it too, and one of an older build reports nothing.
    generation: Arc<AtomicU64>,
}

/// How a step's answer is watched for: when the ranks' health is probed, and how long it may
/// take at all.
#[derive(Debug, Clone, Copy)]
pub struct StepWatch {
    /// A step unanswered for this long has every rank's health probed, and again at this
    /// interval.
    pub probe_after: Duration,
    /// A rank that does not answer a probe within this is lost.
    pub probe_timeout: Duration,
    /// A step unanswered for this long loses the replica its ranks even if they all answer
    /// (a rank stuck inside its forward pass).
    pub step_timeout: Duration,
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

/// Why a step did not come back.
pub enum StepError {
    /// A rank is lost: the replica must be rebuilt.
    Lost(Loss),
    /// The step failed on the ranks (a refused plan, a malformed answer), or the ranks are
    /// being let go; they are not lost.
    Failed(anyhow::Error),
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
    pub fn new(addrs: &[String], auth: &Authorize) -> Result<Self> {
        let shards = addrs
            .iter()
            .enumerate()
            .map(|(rank, addr)| {
                Ok(Shard {
                    rank,
                    addr: addr.clone(),
                    client: worker_client(rank, addr, auth)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let (failure, _) = watch::channel(None);
        Ok(Self {
            streams: (0..shards.len()).map(|_| None).collect(),
            shards,
            auth: auth.clone(),
            failure: Arc::new(failure),
            closing: Closing::default(),
            generation: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Rank `rank` is now served at `addr` (its replacement); the next init uses it.
    pub fn set_rank(&mut self, rank: usize, addr: &str) -> Result<()> {
        let shard = self
            .shards
            .get_mut(rank)
            .with_context(|| format!("no rank {rank}"))?;
        shard.client = worker_client(rank, addr, &self.auth)?;
        shard.addr = addr.to_string();
        self.streams[rank] = None;
        Ok(())
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// The ranks that do not answer a health probe within `timeout` (gone, stopped,
    /// unreachable).
    pub async fn silent(&self, timeout: Duration) -> Vec<usize> {
        silent_ranks(&self.shards, timeout).await
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
        self.streams.iter_mut().for_each(|s| *s = None);
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
            .chain([self.generation()])
            .max()
            .unwrap_or(0)
            + 1;
        tracing::Span::current().record("generation", generation);
        let info = self.init_all(opts, &healths, generation).await?;
        self.generation.store(generation, Ordering::SeqCst);
        for (s, stream) in self.shards.iter_mut().zip(&mut self.streams) {
            let reader = Reader {
                rank: s.rank,
                generation,
                current: self.generation.clone(),
                failure: self.failure.clone(),
                closing: self.closing.clone(),
                published: published.clone(),
            };
            *stream = Some(open_stream(s, reader).await?);
        }
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
                load_format: opts.load_format.as_str().to_string(),
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
        let n = self.streams.len();
        plan.generation = self.generation();
        let mut plan = Some(plan);
        for (rank, stream) in self.streams.iter_mut().enumerate() {
            // The last rank takes the plan itself: one deep copy fewer per step.
            let plan = if rank + 1 == n {
                plan.take()
            } else {
                plan.clone()
            };
            let (tx, _) = stream
                .as_mut()
                .with_context(|| format!("rank {rank} is not initialized"))?;
            // The reader's queue holds two plans: one running, one next.
            tx.send(plan.context("no plan")?)
                .await
                .map_err(|_| anyhow!("rank {rank}: step stream closed"))?;
        }
        Ok(())
    }

    /// Waits for every rank's answer to step `step_id` (the oldest one sent); returns rank 0's,
    /// with `compute_us` that of the slowest rank, and every rank's times. Fails as soon as any
    /// rank is gone, even while other ranks are still waiting on it; probes the ranks while
    /// the answer is long in coming (`watch`).
    #[tracing::instrument(level = "debug", skip_all, fields(step = step_id))]
    pub async fn receive(
        &mut self,
        step_id: u64,
        watch: &StepWatch,
    ) -> Result<(StepResult, Vec<RankTimes>), StepError> {
        let mut failure = self.failure.subscribe();
        let started = Instant::now();
        let all = join_all(
            self.streams
                .iter_mut()
                .enumerate()
                .map(|(rank, s)| async move {
                    let (_, results) = s
                        .as_mut()
                        .with_context(|| format!("rank {rank} is not initialized"))?;
                    results
                        .recv()
                        .await
                        .with_context(|| format!("rank {rank}: step stream ended"))
                }),
        );
        tokio::pin!(all);
        let mut next_probe = started + watch.probe_after;
        let results = loop {
            tokio::select! {
                r = &mut all => break r,
                // The reason is copied out at once: a borrow of it must not live on in the
                // select's output across the probe's await.
                why = async { failure.wait_for(Option::is_some).await.ok().and_then(|w| w.clone()) } => {
                    return Err(StepError::Lost(Loss::new(why.unwrap_or_default())));
                }
                _ = tokio::time::sleep_until(next_probe.into()) => {
                    if started.elapsed() >= watch.step_timeout {
                        return Err(StepError::Lost(Loss::new(format!(
                            "step {step_id} took longer than the step timeout ({:?})",
                            watch.step_timeout
                        ))));
                    }
                    let silent = silent_ranks(&self.shards, watch.probe_timeout).await;
                    if let Some(rank) = silent.first() {
                        let why = format!(
                            "rank {rank} stopped answering (step {step_id} waited {:?})",
                            started.elapsed()
                        );
                        return Err(StepError::Lost(Loss { why, silent }));
                    }
                    next_probe = Instant::now() + watch.probe_after;
                }
            }
        };
        // A closed stream's reason is in `failure` (set by its reader): the rank is lost.
        let lost = |e: anyhow::Error| match self.failure.borrow().clone() {
            Some(why) => StepError::Lost(Loss::new(why)),
            None => StepError::Failed(e),
        };
        let mut rank0: Option<StepResult> = None;
        let mut times = Vec::with_capacity(results.len());
        for (rank, r) in results.into_iter().enumerate() {
            let r = r.map_err(lost)?;
            if !r.error.is_empty() {
                return Err(StepError::Failed(anyhow!("{}", r.error)));
            }
            if r.step_id != step_id {
                return Err(StepError::Failed(anyhow!(
                    "rank {rank} answered step {} to step {step_id}",
                    r.step_id
                )));
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
        let mut r = rank0.ok_or_else(|| StepError::Failed(anyhow!("no ranks")))?;
        r.compute_us = times.iter().map(|t| t.compute_us).max().unwrap_or(0);
        Ok((r, times))
    }
}

/// A lazily connecting client of the worker at `addr`.
fn worker_client(rank: usize, addr: &str, auth: &Authorize) -> Result<WorkerRpc> {
    let channel = Endpoint::from_shared(addr.to_string())
        .with_context(|| format!("rank {rank}: bad address {addr:?}"))?
        .connect_timeout(Duration::from_secs(2))
        // A peer that vanishes without closing its socket (a lost node) is noticed within
        // seconds, not at the next TCP timeout.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(WorkerClient::with_interceptor(channel, auth.clone())
        .max_decoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES)
        .max_encoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES))
}

/// The ranks of `shards` that do not answer a health probe within `timeout`, all probed at
/// once.
async fn silent_ranks(shards: &[Shard], timeout: Duration) -> Vec<usize> {
    let answers = join_all(shards.iter().map(|s| {
        let mut client = s.client.clone();
        async move { tokio::time::timeout(timeout, client.health(HealthRequest {})).await }
    }))
    .await;
    (0..answers.len())
        .filter(|&r| !matches!(answers[r], Ok(Ok(_))))
        .collect()
}

/// What a rank's stream reader reports to, and when it stays quiet.
struct Reader {
    rank: usize,
    /// The generation the stream belongs to, and the replica's current one.
    generation: u64,
    current: Arc<AtomicU64>,
    failure: Arc<watch::Sender<Option<String>>>,
    closing: Closing,
    published: Published,
}

/// Opens rank `s`'s step stream: a reader task forwards the answers, and reports the stream's
/// end as its generation's failure (unless a newer generation replaced it, or the ranks are
/// being let go).
async fn open_stream(s: &mut Shard, reader: Reader) -> Result<StepStream> {
    let (plans_tx, plans_rx) = mpsc::channel(2);
    let mut answers = s
        .client
        .step(ReceiverStream::new(plans_rx))
        .await
        .with_context(|| format!("opening the step stream of rank {}", s.rank))?
        .into_inner();
    let (results_tx, results_rx) = mpsc::channel(2);
    let Reader {
        rank,
        generation,
        current,
        failure,
        closing,
        published,
    } = reader;
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
