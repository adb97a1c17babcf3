//! One rank's engine: its model shard, its KV memory and its communicator, stepping plans.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use helios_proto::v1::{Logits, ModelFacts, StepPlan, StepResult};

use crate::batch::{BatchLimits, StepBatch};
use crate::block_tables::BlockTables;
use crate::comm::Communicator;
use crate::kv_cache::KvCache;
use crate::model::Model;
use crate::sampling;
use crate::weights::{LoadOptions, Weights};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model_path: PathBuf,
    pub block_size: usize,
    /// Fixed block count; `None` derives it from `kv_cache_memory_bytes`.
    pub num_kv_blocks: Option<usize>,
    pub kv_cache_memory_bytes: u64,
    pub dequantize: bool,
    pub device: Device,
}

impl EngineOptions {
    pub fn cpu(model_path: impl Into<PathBuf>) -> Self {
        Self {
            model_path: model_path.into(),
            block_size: 16,
            num_kv_blocks: None,
            kv_cache_memory_bytes: 256 << 20,
            dequantize: false,
            device: Device::Cpu,
        }
    }
}

pub struct Engine {
    pub model: Model,
    cache: KvCache,
    comm: Box<dyn Communicator>,
    limits: BatchLimits,
    dtype_name: String,
    /// Running sequences' block tables, as the coordinator sent them.
    tables: BlockTables,
}

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
        let weights = Weights::open(&opts.model_path)?;
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
            comm,
            limits,
            dtype_name,
            tables: BlockTables::default(),
        })
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

    /// Runs one plan. An [`crate::batch::InvalidPlan`] error leaves the engine usable; any other
    /// error means this rank may have left its peers mid-collective.
    pub fn step(&mut self, plan: &StepPlan) -> Result<StepResult> {
        let device = self.model.embed_device();
        let tables = self.tables.resolve(plan)?;
        let batch = StepBatch::build(plan, &tables, &self.limits, self.model.dtype, &device)?;
        drop(tables);
        // Valid: from here the plan runs, so this rank's tables move on with it.
        self.tables.commit(plan);
        let logits = self
            .model
            .forward(&batch, &self.cache, self.comm.as_mut())?;
        let mut result = StepResult {
            step_id: plan.step_id,
            ..Default::default()
        };
        let Some(logits) = logits else {
            return Ok(result);
        };
        let rows = logits.to_vec2::<f32>()?;
        for (row, &i) in rows.iter().zip(&batch.output_seqs) {
            let s = &plan.seqs[i];
            if s.sample {
                result.tokens.push(sampling::sample(row, s));
            }
            if plan.return_logits {
                result.logits.push(Logits {
                    seq_id: s.seq_id,
                    values: row.clone(),
                });
            }
        }
        Ok(result)
    }
}
