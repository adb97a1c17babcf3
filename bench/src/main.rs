//! `helios-bench`: Helios benchmarks.
//!
//! - `helios-bench engine` measures the engine through real worker processes, on the path
//!   `helios generate` takes (a front door and its replica, in-process): prefill tokens/s for
//!   one prompt, and decode tokens/s at several batch sizes (greedy, end-of-sequence ignored).
//! - `helios-bench kernel`: the Q4_1 CPU matmul alone.
//! - `helios-bench allreduce`: the CPU all-reduce's latency, over TCP and over shared memory
//!   ([`allreduce`]).
//! - `helios-bench overhead`: the coordinator's cost per step over zero-cost fake workers
//!   ([`overhead`], [`fake_worker`]).
//! - `helios-bench serve`: a load generator for a running server, over gRPC or OpenAI HTTP,
//!   closed or open loop, with a report like `vllm bench serve`'s ([`load`]).
//!
//! - `helios-bench memory`: each rank's memory for a model at several tp and contexts, from its
//!   config alone, optionally checked against dummy loads ([`memory`]).
//!
//! Results go to stdout as a table, or as JSON with `--json`.

mod allreduce;
mod constraint;
mod fake_worker;
mod load;
mod memory;
mod otlp_sink;
mod overhead;
mod router;
mod sampling;
mod scheduler;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use helios_coordinator::front_door::{FrontDoor, ServingOptions};
use helios_coordinator::membership::local::{resolve_model_path, LocalDevice, LocalOptions};
use helios_coordinator::membership::{LocalWorkers, Membership};
use helios_coordinator::output::collect;
use helios_coordinator::replica::{RecoveryOptions, ReplicaOptions};
use helios_coordinator::scheduler::SchedulerConfig;
use helios_coordinator::sharded_client::{InitOptions, LoadFormat};
use helios_coordinator::tokenizer::TextTokenizer;
use helios_proto::auth::{Authorize, ClusterSecret};
use helios_proto::telemetry::LogFormat;
use helios_proto::v1::{GenerateRequest, GenerationParameters};

#[derive(Parser)]
#[command(name = "helios-bench")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prefill and decode throughput of the engine.
    Engine(EngineArgs),
    /// The Q4_1 CPU matmul kernel alone: weight bytes streamed per second.
    Kernel(KernelArgs),
    /// The CPU all-reduce's latency per call by message size, over TCP and shared memory.
    Allreduce(allreduce::AllreduceArgs),
    /// The coordinator's own cost per decode step, over fake workers that answer at once.
    Overhead(overhead::OverheadArgs),
    /// Load a running server (gRPC or OpenAI HTTP; closed or open loop; random prompts,
    /// multi-turn chat sessions or shared system prompts): throughput, TTFT, TPOT, ITL,
    /// end-to-end latency, goodput and prefix-cache hits, like `vllm bench serve`.
    Serve(Box<load::LoadArgs>),
    /// Each rank's memory for a model (weights, KV per context) at several tp, from its
    /// config.json alone; `--check-layers N` checks the figures against dummy loads.
    Memory(memory::MemoryArgs),
    /// Rank 0's cost of choosing one token, on the default model's real logits.
    Sampling(sampling::SamplingArgs),
    /// Structured outputs: grammar compile time, the mask per constrained token, a rank's
    /// cost of applying one.
    Constraint(constraint::ConstraintArgs),
    /// The scheduler's decision time per decode step (schedule + apply), in-process.
    Scheduler(scheduler::SchedulerArgs),
    /// The router's decision time per request over many replicas' prefix caches, in-process.
    Router(router::RouterArgs),
    /// An OTLP trace endpoint that counts the spans it is sent (what exporting costs).
    OtlpSink(otlp_sink::SinkArgs),
}

#[derive(clap::Args)]
struct KernelArgs {
    #[arg(long, default_value_t = 1536)]
    rows: usize,
    #[arg(long, default_value_t = 576)]
    cols: usize,
    /// Tokens per call (1 = decode, larger = prefill).
    #[arg(long, default_value_t = 1)]
    tokens: usize,
    /// Distinct matrices cycled through, so weights come from memory, not cache.
    #[arg(long, default_value_t = 64)]
    matrices: usize,
    #[arg(long, default_value_t = 2000)]
    calls: usize,
}

#[derive(clap::Args)]
struct EngineArgs {
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Compute threads per worker.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    dequantize: bool,
    /// `dummy`: random weights shaped by `--model`'s config.json (see `helios serve --help`).
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    load_format: LoadFormat,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Tokens generated per sequence in the decode runs.
    #[arg(long, default_value_t = 64)]
    decode_tokens: usize,
    /// Decode batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16")]
    batch: Vec<usize>,
    /// Repetitions of each measurement (the median is reported).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    #[arg(long)]
    json: bool,
}

fn main() -> Result<()> {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    };
    match Cli::parse().command {
        Command::Engine(a) => runtime()?.block_on(engine(a)),
        Command::Kernel(a) => kernel(a),
        Command::Allreduce(a) => allreduce::run(a),
        Command::Sampling(a) => sampling::run(a),
        Command::Constraint(a) => constraint::run(a),
        Command::Memory(a) => memory::run(a),
        Command::Scheduler(a) => scheduler::run(a),
        Command::Router(a) => router::run(a),
        Command::OtlpSink(a) => runtime()?.block_on(otlp_sink::run(a)),
        // Builds a runtime per configuration.
        Command::Overhead(a) => overhead::run(a),
        Command::Serve(a) => runtime()?.block_on(load::run(*a)),
    }
}

/// Deterministic pseudo-random token ids below `vocab`.
pub(crate) fn prompt(n: usize, salt: usize, vocab: usize) -> Vec<u32> {
    (0..n)
        .map(|i| ((i * 7919 + salt * 104_729 + 17) % (vocab - 1000) + 500) as u32)
        .collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// A request of `prompt` for exactly `n` greedy tokens.
fn exact_request(prompt: Vec<u32>, n: usize) -> GenerateRequest {
    GenerateRequest {
        token_ids: prompt,
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(n as u32),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn engine(a: EngineArgs) -> Result<()> {
    let model = a.model.to_string_lossy().into_owned();
    let mut init = InitOptions {
        model_path: model.clone(),
        block_size: helios_proto::DEFAULT_BLOCK_SIZE,
        num_kv_blocks: 0,
        kv_cache_memory_bytes: 512 << 20,
        dequantize: a.dequantize,
        load_format: a.load_format,
        auth: Default::default(),
    };
    resolve_model_path(&mut init)?;
    let secret = ClusterSecret::random()?;
    init.auth = Authorize::cluster(Some(&secret));
    let workers = LocalWorkers::spawn(LocalOptions {
        tp: a.tp,
        device: LocalDevice::Cpu,
        first_gpu: 0,
        threads: a.threads,
        log_format: LogFormat::Text,
        max_restarts: 0,
        secret,
    })
    .await?;
    // The model, never the cache: no prefix caching, and a whole prompt in one step.
    let opts = ServingOptions {
        model_name: model,
        replica: ReplicaOptions {
            scheduler: SchedulerConfig {
                max_batch_tokens: 4096,
                max_running: usize::MAX,
                max_waiting: usize::MAX,
                prefix_caching: false,
            },
            overlap: true,
            tracing: false,
            recovery: RecoveryOptions::default(),
        },
        router: Default::default(),
        log_prompts: false,
        caps: Default::default(),
        grammars: Default::default(),
    };
    let tokenizer = TextTokenizer::for_serving(&a.model, a.load_format)?;
    let front = FrontDoor::start(vec![Membership::Local(workers)], &init, tokenizer, &opts).await?;
    let replica = front.replicas().into_iter().next().context("no replica")?;
    let facts = replica.info().facts.clone();
    let vocab = facts.vocab_size as usize;
    let one_token = |p: Vec<u32>| {
        let front = front.clone();
        async move {
            let rx = front
                .generate(exact_request(p, 1), Default::default())
                .await?;
            anyhow::Ok(collect(rx).await?)
        }
    };

    // Warm-up: first touches of the weights and allocator.
    one_token(prompt(a.prompt_tokens, 99, vocab)).await?;

    // Prefill rate: a prompt read in one step, up to its first token.
    let mut prefill = Vec::new();
    for r in 0..a.repeat {
        let p = prompt(a.prompt_tokens, r, vocab);
        let t = Instant::now();
        one_token(p).await?;
        prefill.push(a.prompt_tokens as f64 / t.elapsed().as_secs_f64());
    }
    let prefill_tps = median(prefill);

    let mut decode = Vec::new();
    for &b in &a.batch {
        let mut runs = Vec::new();
        for r in 0..a.repeat.min(3) {
            // Decode rate: tokens after each sequence's first, over the time from the moment
            // every sequence had its first token to the last token.
            let start = Instant::now();
            let mut streams = tokio::task::JoinSet::new();
            for i in 0..b {
                let req = exact_request(prompt(16, 1000 + r * b + i, vocab), a.decode_tokens);
                let mut rx = front.generate(req, Default::default()).await?;
                streams.spawn(async move {
                    let mut times = Vec::new();
                    while let Some(resp) = rx.recv().await {
                        let resp = resp?;
                        times.extend(resp.token_ids.iter().map(|_| start.elapsed()));
                    }
                    anyhow::Ok(times)
                });
            }
            let (mut all_started, mut last, mut after_first) = (Duration::ZERO, Duration::ZERO, 0);
            while let Some(times) = streams.join_next().await {
                let times = times??;
                all_started = all_started.max(times.first().copied().unwrap_or_default());
                last = last.max(times.last().copied().unwrap_or_default());
                after_first += times.len().saturating_sub(1);
            }
            runs.push(after_first as f64 / (last - all_started).as_secs_f64());
        }
        decode.push((b, median(runs)));
    }
    let info = facts;

    if a.json {
        let obj = serde_json::json!({
            "model": a.model.display().to_string(),
            "dtype": info.dtype,
            "tp": a.tp,
            "threads_per_worker": a.threads,
            "prefill_tokens": a.prompt_tokens,
            "prefill_tokens_per_s": prefill_tps,
            "decode_tokens_per_s": decode.iter().map(|(b, t)| serde_json::json!({"batch": b, "tokens_per_s": t})).collect::<Vec<_>>(),
        });
        println!("{obj}");
    } else {
        println!(
            "model {} ({}), tp {}, {} threads/worker",
            a.model.display(),
            info.dtype,
            a.tp,
            a.threads
        );
        println!(
            "prefill {} tokens: {prefill_tps:.1} tokens/s",
            a.prompt_tokens
        );
        for (b, t) in decode {
            println!("decode batch {b}: {t:.1} tokens/s");
        }
    }
    front.release_workers(Duration::from_secs(5)).await;
    Ok(())
}

fn kernel(a: KernelArgs) -> Result<()> {
    use helios_worker::kernels::quant_matmul::{Format, QuantMatrix, BLOCK};
    let block_bytes = Format::Q4_1.block_bytes();
    let bytes = a.rows * a.cols / BLOCK * block_bytes;
    let mats = (0..a.matrices)
        .map(|m| {
            // Scale 0.001 (f16 0x1419), minimum 0, nibbles varying by matrix.
            let data: Vec<u8> = (0..bytes)
                .map(|i| match i % block_bytes {
                    0 => 0x19,
                    1 => 0x14,
                    2 | 3 => 0,
                    _ => ((i + m) % 251) as u8,
                })
                .collect();
            QuantMatrix::new(Format::Q4_1, data, a.rows, a.cols)
        })
        .collect::<Result<Vec<_>>>()?;
    let x = candle_core::Tensor::ones(
        (a.tokens, a.cols),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )?;
    let t = Instant::now();
    for i in 0..a.calls {
        mats[i % mats.len()].forward(&x)?;
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "Q4_1 [{} x {}] x {} tokens: {:.1} us/call, {:.2} GB/s of weights, {:.1} GMAC/s ({} threads)",
        a.rows,
        a.cols,
        a.tokens,
        secs / a.calls as f64 * 1e6,
        (bytes * a.calls) as f64 / secs / 1e9,
        (a.rows * a.cols * a.tokens * a.calls) as f64 / secs / 1e9,
        candle_core::utils::get_num_threads()
    );
    Ok(())
}
