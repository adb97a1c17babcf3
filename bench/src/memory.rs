//! `helios-bench memory`: what each rank of a model needs, from its `config.json` alone
//! (`helios_worker::memory::ShardMemory`), at several tp and context lengths; `--check-layers`
//! loads dummy shards of that many layers in-process and compares what they hold with the
//! figures for the same layer count.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use helios_proto::LoadFormat;
use helios_worker::memory::{Layout, ShardMemory};
use helios_worker::model::Model;
use helios_worker::weights::{LoadOptions, Weights};

#[derive(clap::Args)]
pub struct MemoryArgs {
    /// An HF model directory or its config.json (only the config is read).
    #[arg(long, default_value = "bench/configs/solar-10.7b")]
    model: PathBuf,
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8")]
    tp: Vec<usize>,
    /// Context lengths (tokens of KV) to size, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "4096,32768")]
    context: Vec<u64>,
    /// Also load dummy shards with this many layers (ranks 0 and tp-1 of every tp, every
    /// layout) and check they hold what the figures say for that many layers.
    #[arg(long)]
    check_layers: Option<usize>,
}

const GIB: f64 = (1u64 << 30) as f64;

/// The layouts reported: a GPU's bf16 (also its KV dtype) and the CPU's kept-quantized Q4_1
/// with f32 KV.
const LAYOUTS: [(&str, Layout, DType); 2] = [
    ("GPU, bf16", Layout::Dense(DType::BF16), DType::BF16),
    ("CPU, Q4_1", Layout::CpuQ4_1, DType::F32),
];

pub fn run(a: MemoryArgs) -> Result<()> {
    let weights = Weights::open_as(&a.model, LoadFormat::Dummy)?;
    let cfg = weights.config().clone();
    for tp in &a.tp {
        cfg.validate_tp(*tp)?;
    }
    println!(
        "{}: {} layers, hidden {}, {} query / {} KV heads, MLP {}, vocab {}",
        a.model.display(),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.intermediate_size,
        cfg.vocab_size
    );
    for (name, layout, kv_dtype) in LAYOUTS {
        println!("\n{name} (GiB per rank; the largest rank)\n");
        let ctx: Vec<String> = a.context.iter().map(|c| format!("KV {c}")).collect();
        let totals: Vec<String> = a.context.iter().map(|c| format!("total {c}")).collect();
        println!(
            "| tp | weights | {} | {} |",
            ctx.join(" | "),
            totals.join(" | ")
        );
        println!("|---|---|{}", "---|".repeat(2 * a.context.len()));
        for &tp in &a.tp {
            let m = (0..tp)
                .map(|r| ShardMemory::of(&cfg, r, tp, layout, kv_dtype))
                .max_by_key(|m| m.weights)
                .context("tp 0")?;
            let kv: Vec<String> = a
                .context
                .iter()
                .map(|c| format!("{:.2}", (c * m.kv_per_token) as f64 / GIB))
                .collect();
            let total: Vec<String> = a
                .context
                .iter()
                .map(|c| format!("{:.2}", (m.weights + c * m.kv_per_token) as f64 / GIB))
                .collect();
            println!(
                "| {tp} | {:.2} | {} | {} |",
                m.weights as f64 / GIB,
                kv.join(" | "),
                total.join(" | ")
            );
        }
    }
    if let Some(layers) = a.check_layers {
        check(&a, layers)?;
    }
    Ok(())
}

/// Dummy shards of `layers` layers hold exactly what the figures say.
fn check(a: &MemoryArgs, layers: usize) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = if a.model.is_dir() {
        a.model.join("config.json")
    } else {
        a.model.clone()
    };
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config)?)?;
    json["num_hidden_layers"] = layers.into();
    std::fs::write(dir.path().join("config.json"), json.to_string())?;
    let weights = Weights::open_as(dir.path(), LoadFormat::Dummy)?;
    let cfg = weights.config().clone();
    println!("\ncheck: dummy shards of {layers} layers, loaded");
    for (name, layout, dtype) in LAYOUTS {
        for &tp in &a.tp {
            for rank in if tp > 1 { vec![0, tp - 1] } else { vec![0] } {
                let opts = LoadOptions {
                    device: Device::Cpu,
                    dtype,
                    dequantize: matches!(layout, Layout::Dense(_)),
                };
                let model = Model::load(&weights, rank, tp, &opts)?;
                let held = model.weight_bytes() as u64;
                let want = ShardMemory::of(&cfg, rank, tp, layout, dtype).weights;
                println!(
                    "  {name}, tp {tp} rank {rank}: holds {held} bytes, figures {want}: {}",
                    if held == want { "equal" } else { "DIFFERENT" }
                );
                if held != want {
                    bail!("the figures are wrong for {name}, tp {tp}, rank {rank}");
                }
            }
        }
    }
    Ok(())
}
