//! `helios`: the coordinator's command line.
//!
//! `helios generate` runs a prompt through a tensor-parallel replica of worker processes that it
//! spawns itself, streaming the answer to the terminal (or printing one JSON object).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use helios_coordinator::detokenizer::Detokenizer;
use helios_coordinator::driver::{Control, Request};
use helios_coordinator::local_workers::LocalReplica;
use helios_coordinator::sharded_client::InitOptions;
use helios_coordinator::stop::StopMatcher;
use helios_coordinator::tokenizer::{ChatMessage, TextTokenizer};
use helios_proto::v1::SamplingParams;

/// The default model, as `scripts/fetch-model.sh` places it.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "helios", version, about = "Tensor-parallel LLM serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt on a local tensor-parallel replica.
    Generate(GenerateArgs),
    /// Print the last-position logits of a token sequence as JSON; with `--continuation`, the
    /// argmax of every teacher-forced position instead (tests, debugging).
    #[command(hide = true)]
    Logits(LogitsArgs),
}

#[derive(Args, Clone)]
struct ReplicaArgs {
    /// A GGUF file or an HF model directory.
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// Tensor-parallel degree: worker processes to spawn.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Load quantized GGUF weights as f32 (exact arithmetic; slower).
    #[arg(long)]
    dequantize: bool,
    /// KV cache budget per rank, in MiB.
    #[arg(long, default_value_t = 256)]
    kv_cache_memory: u64,
    /// Fixed number of KV blocks (overrides --kv-cache-memory).
    #[arg(long, default_value_t = 0)]
    num_kv_blocks: u32,
    #[arg(long, default_value_t = 16)]
    block_size: u32,
    /// Token budget of one step (chunked prefill reads prompts in pieces of at most this).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: usize,
    /// Compute threads per worker (default: the cores divided among the workers).
    #[arg(long)]
    threads_per_worker: Option<usize>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when the text contains this string (repeatable); the string is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object (prompt_ids, generated_ids, logprobs, text, finish_reason).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    ids: Vec<u32>,
    /// Comma-separated token ids fed after the prompt, one per step.
    #[arg(long, value_delimiter = ',')]
    continuation: Vec<u32>,
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate(a).await,
        Command::Logits(a) => logits(a).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn start_replica(a: &ReplicaArgs) -> Result<LocalReplica> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = a.threads_per_worker.unwrap_or((cores / a.tp.max(1)).max(1));
    LocalReplica::start(
        a.tp,
        threads,
        InitOptions {
            model_path: a.model.to_string_lossy().into_owned(),
            block_size: a.block_size,
            num_kv_blocks: a.num_kv_blocks,
            kv_cache_memory_bytes: a.kv_cache_memory << 20,
            dequantize: a.dequantize,
        },
    )
    .await
}

async fn generate(a: GenerateArgs) -> Result<()> {
    let tokenizer = TextTokenizer::from_model_path(&a.replica.model)?;
    let text = if a.chat {
        let messages = [ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        }];
        tokenizer.apply_chat_template(&messages, true)?
    } else {
        a.prompt.clone()
    };
    let prompt_ids = tokenizer.encode(&text)?;
    if prompt_ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    let mut replica = start_replica(&a.replica).await?;
    let max_len = replica.info.facts.max_position_embeddings as usize;
    if prompt_ids.len() + a.max_new_tokens > max_len {
        bail!(
            "prompt ({} tokens) + max_new_tokens ({}) exceeds the model's length of {max_len}",
            prompt_ids.len(),
            a.max_new_tokens
        );
    }
    let mut driver = replica.driver(a.replica.max_batch_tokens);
    let request = Request {
        prompt_ids: prompt_ids.clone(),
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: 0.0,
            seed: a.seed,
            ..Default::default()
        },
        stop_token_ids: if a.ignore_eos {
            Vec::new()
        } else {
            tokenizer.eos_token_ids().to_vec()
        },
    };
    let mut detok = Detokenizer::new(&prompt_ids);
    let mut stops = StopMatcher::new(a.stop.clone());
    let mut text = String::new();
    let mut failure = None;
    let outputs = driver
        .run(vec![request], |_, token| {
            let delta = match detok.push(&tokenizer, token) {
                Ok(d) => d,
                Err(e) => {
                    failure = Some(e);
                    return Control::Stop;
                }
            };
            let m = stops.push(&delta);
            text.push_str(&m.emit);
            if !a.json {
                print!("{}", m.emit);
                let _ = std::io::stdout().flush();
            }
            if m.stopped {
                Control::Stop
            } else {
                Control::Continue
            }
        })
        .await?;
    if let Some(e) = failure {
        return Err(e.context("detokenizing"));
    }
    let out = outputs.into_iter().next().context("no output")?;
    let tail = stops.finish();
    text.push_str(&tail);
    if a.json {
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": out.generated_ids,
            "logprobs": out.logprobs,
            "text": text,
            "finish_reason": out.finish_reason,
        });
        println!("{obj}");
    } else {
        println!("{tail}");
    }
    Ok(())
}

async fn logits(a: LogitsArgs) -> Result<()> {
    if a.ids.is_empty() {
        bail!("--ids is empty");
    }
    let mut replica = start_replica(&a.replica).await?;
    let mut driver = replica.driver(a.replica.max_batch_tokens);
    let rows = driver
        .teacher_forced_logits(&a.ids, &a.continuation)
        .await?;
    if a.continuation.is_empty() {
        let logits = rows.into_iter().next().context("no logits")?;
        println!("{}", serde_json::json!({ "logits": logits }));
    } else {
        let argmax: Vec<usize> = rows
            .iter()
            .map(|r| (0..r.len()).fold(0, |b, i| if r[i] > r[b] { i } else { b }))
            .collect();
        println!("{}", serde_json::json!({ "argmax": argmax }));
    }
    Ok(())
}
