//! One rank's engine: its model shard, its KV memory and its communicator, stepping plans.
//!
//! Overlap: the coordinator may plan step N+1 while the ranks still run step N, before it has
//! seen the tokens rank 0 samples in step N. Such a plan marks a sequence `feed_sampled` and
//! leaves its input token to the ranks: rank 0 keeps the tokens of the latest step it ran, and
//! hands those the plan asks for to every rank before the batch is built. Every rank must then
//! take the same path, or some wait in a collective that others never enter: whether to
//! broadcast depends only on the plan, every check is deterministic in the plan and the kept
//! block tables, and a token rank 0 does not have travels as a sentinel that every rank refuses
//! alike after it.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use helios_proto::v1::{Logits, ModelFacts, PromptLogprobs, SequenceStep, StepPlan, StepResult};
use helios_proto::LoadFormat;

use crate::batch::{invalid, BatchLimits, StepBatch};
use crate::block_tables::BlockTables;
use crate::comm::{Communicator, Timed, BROADCAST_LIMIT};
use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::prompt_logprobs::{self, ScoredSeq};
use crate::sampling::{self, Need};
use crate::vocab_parallel::{self, Gathered};
use crate::weights::{LoadOptions, Weights};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model_path: PathBuf,
    pub block_size: usize,
    /// Fixed block count; `None` derives it from `kv_cache_memory_bytes`.
    pub num_kv_blocks: Option<usize>,
    pub kv_cache_memory_bytes: u64,
    pub dequantize: bool,
    pub load_format: LoadFormat,
    pub device: Device,
}

impl EngineOptions {
    pub fn cpu(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            block_size: helios_proto::DEFAULT_BLOCK_SIZE as usize,
            num_kv_blocks: None,
            kv_cache_memory_bytes: helios_proto::DEFAULT_KV_CACHE_MIB << 20,
            dequantize: false,
            load_format: LoadFormat::Auto,
            device: Device::Cpu,
        }
    }
}

/// Scored prompt rows whose logits are computed at once: a 4096-token prompt chunk of a
/// 49152-token vocabulary would otherwise hold 800 MB of them.
const SCORED_ROWS_AT_ONCE: usize = 256;

pub struct Engine {
    pub model: Model,
    cache: KvCache,
    comm: Timed,
    limits: BatchLimits,
    dtype_name: String,
    /// Running sequences' block tables, as the coordinator sent them.
    tables: BlockTables,
    /// Rank 0: the token sampled for each sequence in the latest step that ran (always empty on
    /// the other ranks), for the next plan to feed (`feed_sampled`). Replaced by every step that
    /// runs, so only the step just before can be fed from; a refused plan leaves it as it was.
    sampled: HashMap<u64, u32>,
}

/// What rank 0 broadcasts for a sequence it sampled no token for in its latest step: no token
/// id (a plan that feeds sampled tokens of a larger vocabulary is refused) and, being below
/// [`BROADCAST_LIMIT`], carried exactly, so every rank sees it and refuses the plan alike.
const NOT_SAMPLED: u32 = BROADCAST_LIMIT - 1;

impl Engine {
    pub fn load(opts: &EngineOptions, comm: Box<dyn Communicator>) -> Result<Self> {
        let (rank, world) = (comm.rank(), comm.world_size());
        if opts.block_size == 0 {
            bail!("block size must be positive");
        }
        let dtype = if opts.device.is_cpu() {
            DType::F32
        } else {
            DType::BF16
        };
        let load = LoadOptions {
            device: opts.device.clone(),
            dtype,
            dequantize: opts.dequantize,
        };
        let weights = Weights::open_as(&opts.model_path, opts.load_format)?;
        let dtype_name = weights.dtype_name(&load);
        let model = Model::load(&weights, rank, world, &load)
            .with_context(|| format!("loading rank {rank} of {world}"))?;
        drop(weights);
        let cfg = &model.config;
        let row = model.kv_row_width(world);
        let per_block = KvCache::bytes_per_block(cfg.num_layers, opts.block_size, row, dtype);
        let num_blocks = match opts.num_kv_blocks {
            Some(n) => n,
            None => (opts.kv_cache_memory_bytes / per_block as u64) as usize,
        };
        if num_blocks == 0 {
            bail!(
                "the KV cache budget of {} bytes holds no block ({per_block} bytes each)",
                opts.kv_cache_memory_bytes
            );
        }
        let cache = KvCache::new(
            cfg.num_layers,
            num_blocks,
            opts.block_size,
            row,
            dtype,
            &opts.device,
        )?;
        let limits = BatchLimits {
            vocab_size: cfg.vocab_size,
            max_positions: cfg.max_position_embeddings,
            num_blocks,
            block_size: opts.block_size,
            kv_row_width: row,
        };
        Ok(Self {
            model,
            cache,
            comm: Timed::new(comm),
            limits,
            dtype_name,
            tables: BlockTables::default(),
            sampled: HashMap::new(),
        })
    }

    /// Joins a new mesh (the replica was rebuilt after losing a rank), keeping the weights and
    /// the KV memory. What the ranks held of the old one goes: block tables (the coordinator
    /// resends every table whole) and rank 0's latest sampled tokens.
    pub fn rejoin(&mut self, comm: Box<dyn Communicator>) -> Result<()> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        if (comm.rank(), comm.world_size()) != (rank, world) {
            bail!(
                "rank {rank} of {world} cannot rejoin as rank {} of {}",
                comm.rank(),
                comm.world_size()
            );
        }
        self.comm = Timed::new(comm);
        self.tables = BlockTables::default();
        self.sampled.clear();
        Ok(())
    }

    pub fn num_blocks(&self) -> usize {
        self.cache.num_blocks
    }

    pub fn facts(&self) -> ModelFacts {
        let c = &self.model.config;
        ModelFacts {
            architecture: c.architecture.clone(),
            vocab_size: c.vocab_size as u32,
            num_layers: c.num_layers as u32,
            hidden_size: c.hidden_size as u32,
            num_heads: c.num_heads as u32,
            num_kv_heads: c.num_kv_heads as u32,
            max_position_embeddings: c.max_position_embeddings as u32,
            dtype: self.dtype_name.clone(),
            block_size: self.cache.block_size as u32,
        }
    }

    /// Runs one plan. An [`crate::batch::InvalidPlan`] error leaves the engine usable and
    /// unchanged; any other error means this rank may have left its peers mid-collective.
    ///
    /// The plan is taken by value so that the sequences it feeds their sampled token
    /// (`feed_sampled`) get it in place, without a copy of the plan.
    pub fn step(&mut self, plan: StepPlan) -> Result<StepResult> {
        self.comm.take_spent();
        let mut result = self.run(plan)?;
        result.allreduce_us = u64::try_from(self.comm.take_spent().as_micros()).unwrap_or(u64::MAX);
        Ok(result)
    }

    fn run(&mut self, mut plan: StepPlan) -> Result<StepResult> {
        if plan.seqs.iter().any(|s| s.feed_sampled) {
            self.feed_sampled(&mut plan)?;
        }
        let device = self.model.embed_device();
        let tables = self.tables.resolve(&plan)?;
        let batch = StepBatch::build(&plan, &tables, &self.limits, self.model.dtype, &device)?;
        drop(tables);
        // Valid: from here the plan runs, so this rank's tables move on with it, and what rank
        // 0 sampled before is no longer the latest step's.
        self.tables.commit(&plan);
        self.sampled.clear();
        let (logits, scored) = self.model.forward(&batch, &self.cache, &mut self.comm)?;
        let mut result = StepResult {
            step_id: plan.step_id,
            ..Default::default()
        };
        let rows = match logits {
            Some(logits) => logits.to_vec2::<f32>()?,
            None => Vec::new(),
        };
        let seqs: Vec<&SequenceStep> = batch.output_seqs.iter().map(|&i| &plan.seqs[i]).collect();
        let gathered = self.gather(rows, &seqs, plan.return_logits, &device)?;
        result.prompt_logprobs = self.score(scored.as_ref(), &batch.scored, &device)?;
        let Some(rows) = gathered else {
            return Ok(result);
        };
        for (row, s) in rows.into_iter().zip(seqs) {
            let (token, values) = match row {
                Gathered::Full(v) => (s.sample.then(|| sampling::sample(&v, s)), Some(v)),
                Gathered::Best(c) => (s.sample.then(|| sampling::sample_best(c, s)), None),
                Gathered::Nothing => (None, None),
            };
            if let Some(t) = token {
                self.sampled.insert(t.seq_id, t.token_id);
                result.tokens.push(t);
            }
            if let (true, Some(values)) = (plan.return_logits, values) {
                result.logits.push(Logits {
                    seq_id: s.seq_id,
                    values,
                });
            }
        }
        Ok(result)
    }

    /// Rank 0: what sampling needs of each output row, gathered from every rank's slice of the
    /// vocabulary (`rows`: this rank's logits); `None` on the other ranks. Every rank calls it
    /// alike (what is gathered depends on the plan only).
    fn gather(
        &mut self,
        rows: Vec<Vec<f32>>,
        seqs: &[&SequenceStep],
        return_logits: bool,
        device: &Device,
    ) -> Result<Option<Vec<Gathered>>> {
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let vocab = self.limits.vocab_size;
        let needs: Vec<Need> = seqs
            .iter()
            .map(|s| sampling::need(s, return_logits))
            .collect();
        if world == 1 {
            let whole = rows.into_iter().zip(&needs).map(|(row, need)| match need {
                Need::Nothing => Gathered::Nothing,
                _ => Gathered::Full(row),
            });
            return Ok(Some(whole.collect()));
        }
        let offset = vocab_parallel::slice_of(vocab, rank, world).start;
        let mine = vocab_parallel::encode(&rows, seqs, &needs, offset, vocab, world);
        let all = if mine.is_empty() {
            Vec::new()
        } else {
            self.comm.all_gather(&mine, device)?
        };
        if rank != 0 {
            return Ok(None);
        }
        Ok(Some(vocab_parallel::decode(&all, &needs, vocab, world)?))
    }

    /// Rank 0: the prompt logprobs of every scored sequence, from every rank's share of the
    /// scored rows (`hidden`: their final hidden states); empty on the other ranks. Every rank
    /// calls it alike (see [`crate::prompt_logprobs`]). The logits are computed
    /// [`SCORED_ROWS_AT_ONCE`] rows at a time, so a long prompt chunk never holds them all.
    fn score(
        &mut self,
        hidden: Option<&Tensor>,
        scored: &[ScoredSeq],
        device: &Device,
    ) -> Result<Vec<PromptLogprobs>> {
        if scored.is_empty() {
            return Ok(Vec::new());
        }
        let (rank, world) = (self.comm.rank(), self.comm.world_size());
        let offset = vocab_parallel::slice_of(self.limits.vocab_size, rank, world).start;
        let targets = prompt_logprobs::rows_of(scored);
        let mut mine = Vec::with_capacity(prompt_logprobs::message_len(scored));
        if let Some(hidden) = hidden {
            for (k, part) in targets.chunks(SCORED_ROWS_AT_ONCE).enumerate() {
                let at = k * SCORED_ROWS_AT_ONCE;
                let rows = self
                    .model
                    .logits(&hidden.narrow(0, at, part.len())?)?
                    .to_vec2::<f32>()?;
                prompt_logprobs::encode_into(&mut mine, &rows, part, offset);
            }
        }
        let all = if world == 1 || mine.is_empty() {
            mine
        } else {
            self.comm.all_gather(&mine, device)?
        };
        if rank != 0 {
            return Ok(Vec::new());
        }
        prompt_logprobs::decode(&all, scored, world)
    }

    /// Gives every `feed_sampled` sequence of `plan` the token rank 0 sampled for it in the
    /// latest step as its input, on every rank, and appends it to the sequence's penalty
    /// context when one is sent (the coordinator's lacks it). The context grows on every rank,
    /// not only on rank 0 that reads it, because batch validation reads its length and must
    /// judge alike everywhere.
    ///
    /// What this refuses is refused before the broadcast, except a token rank 0 does not
    /// have: every rank learns of that from the broadcast and refuses it after. The rest of the
    /// checks (block tables, then [`StepBatch::build`]) follow in [`Self::step`], deterministic
    /// in the plan and the kept tables, so alike on every rank too.
    fn feed_sampled(&mut self, plan: &mut StepPlan) -> Result<()> {
        if let Some(s) = plan
            .seqs
            .iter()
            .find(|s| s.feed_sampled && !s.token_ids.is_empty())
        {
            return Err(invalid(format!(
                "sequence {} feeds its sampled token but also sends {} tokens",
                s.seq_id,
                s.token_ids.len()
            )));
        }
        if self.limits.vocab_size > NOT_SAMPLED as usize {
            return Err(invalid(format!(
                "feed_sampled carries token ids below {NOT_SAMPLED}, the vocabulary has {}",
                self.limits.vocab_size
            )));
        }
        let mut fed: Vec<u32> = plan
            .seqs
            .iter()
            .filter(|s| s.feed_sampled)
            .map(|s| self.sampled.get(&s.seq_id).copied().unwrap_or(NOT_SAMPLED))
            .collect();
        self.comm
            .broadcast_from_rank0(&mut fed, &self.model.embed_device())?;
        for (s, t) in plan.seqs.iter_mut().filter(|s| s.feed_sampled).zip(fed) {
            if t == NOT_SAMPLED {
                return Err(invalid(format!(
                    "sequence {} feeds the token sampled for it in the previous step, \
                     but rank 0 sampled none for it there",
                    s.seq_id
                )));
            }
            s.token_ids.push(t);
            if !s.context_token_ids.is_empty() {
                s.context_token_ids.push(t);
            }
        }
        Ok(())
    }
}
