//! Talking to all ranks of a replica as one: every call fans out to each worker and joins.
//!
//! As in TGI's sharded client, the coordinator sends every rank the same StepPlan over a
//! long-lived bidirectional stream and waits for all of them: ranks run the step in lockstep
//! (they meet in every all-reduce), rank 0's answer carries the sampled tokens.

use anyhow::{bail, Context, Result};
use futures::future::join_all;
use helios_proto::v1::worker_client::WorkerClient;
use helios_proto::v1::{HealthRequest, InitRequest, ModelFacts, StepPlan, StepResult};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

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

struct Shard {
    rank: usize,
    client: WorkerClient<Channel>,
    stream: Option<(mpsc::Sender<StepPlan>, Streaming<StepResult>)>,
}

pub struct ShardedClient {
    shards: Vec<Shard>,
}

const MAX_MESSAGE: usize = 256 << 20;

impl ShardedClient {
    /// Connects to the workers at `addrs` (indexed by rank).
    pub async fn connect(addrs: &[String]) -> Result<Self> {
        let mut shards = Vec::with_capacity(addrs.len());
        for (rank, addr) in addrs.iter().enumerate() {
            let client = WorkerClient::connect(addr.clone())
                .await
                .with_context(|| format!("connecting to rank {rank} at {addr}"))?
                .max_decoding_message_size(MAX_MESSAGE)
                .max_encoding_message_size(MAX_MESSAGE);
            shards.push(Shard {
                rank,
                client,
                stream: None,
            });
        }
        Ok(Self { shards })
    }

    pub fn world_size(&self) -> usize {
        self.shards.len()
    }

    /// Hands every rank its place and its peers, loads the model everywhere, opens the step
    /// streams.
    #[tracing::instrument(skip_all, fields(world = self.shards.len()))]
    pub async fn init(&mut self, opts: &InitOptions) -> Result<ReplicaInfo> {
        let world = self.shards.len();
        let healths = join_all(self.shards.iter_mut().map(|s| async move {
            let h = s
                .client
                .health(HealthRequest {})
                .await
                .with_context(|| format!("health of rank {}", s.rank))?;
            anyhow::Ok(h.into_inner())
        }))
        .await;
        let healths = healths.into_iter().collect::<Result<Vec<_>>>()?;
        let peer_addrs: Vec<String> = healths.iter().map(|h| h.comm_addr.clone()).collect();
        let nccl_id = healths
            .first()
            .map(|h| h.nccl_id.clone())
            .unwrap_or_default();
        let inits = join_all(self.shards.iter_mut().map(|s| {
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
        .await;
        let inits = inits.into_iter().collect::<Result<Vec<_>>>()?;
        let num_kv_blocks = inits.iter().map(|r| r.num_kv_blocks).min().unwrap_or(0);
        let facts = inits
            .into_iter()
            .next()
            .and_then(|r| r.model)
            .context("rank 0 reported no model facts")?;
        for s in &mut self.shards {
            let (tx, rx) = mpsc::channel(2);
            let results = s
                .client
                .step(ReceiverStream::new(rx))
                .await
                .with_context(|| format!("opening the step stream of rank {}", s.rank))?
                .into_inner();
            s.stream = Some((tx, results));
        }
        Ok(ReplicaInfo {
            facts,
            num_kv_blocks,
        })
    }

    /// Runs one step on every rank; returns rank 0's result.
    #[tracing::instrument(skip_all, fields(step = plan.step_id, seqs = plan.seqs.len()))]
    pub async fn step(&mut self, plan: StepPlan) -> Result<StepResult> {
        let results = join_all(self.shards.iter_mut().map(|s| {
            let plan = plan.clone();
            async move {
                let (tx, results) = s
                    .stream
                    .as_mut()
                    .with_context(|| format!("rank {} is not initialized", s.rank))?;
                tx.send(plan)
                    .await
                    .map_err(|_| anyhow::anyhow!("rank {}: step stream closed", s.rank))?;
                match results.message().await {
                    Ok(Some(r)) => Ok(r),
                    Ok(None) => bail!("rank {}: step stream ended", s.rank),
                    Err(st) => bail!("rank {}: {}", s.rank, st.message()),
                }
            }
        }))
        .await;
        let mut rank0 = None;
        for (rank, r) in results.into_iter().enumerate() {
            let r = r?;
            if !r.error.is_empty() {
                bail!("{}", r.error);
            }
            if r.step_id != plan.step_id {
                bail!(
                    "rank {rank} answered step {} to step {}",
                    r.step_id,
                    plan.step_id
                );
            }
            if rank == 0 {
                rank0 = Some(r);
            }
        }
        rank0.context("no ranks")
    }
}
