//! `helios-bench serve`: end-to-end output tokens/s of a running server (`helios serve`), the
//! way a user sees it: over gRPC (`helios.v1.Generation/GenerateStream`), with TTFT and TPOT.
//!
//! A closed loop: `concurrency` clients, each on its own connection, send one request at a time
//! until `requests` have been sent. Every request has exactly `input_len` prompt tokens (random
//! ids from the middle of the vocabulary, away from special tokens, given as `token_ids` so the
//! length is exact) and generates exactly `output_len` tokens, greedy with end-of-sequence
//! ignored; a request that ends otherwise fails the run, so the token count is never a guess.
//! Deliberately minimal: the fuller load generator (open loop, arrival rates, length
//! distributions, percentiles) extends this module in a later issue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{
    FinishReason, GenerateRequest, GenerationParameters, ModelInfoRequest, ModelInfoResponse,
};
use serde_json::json;
use tokio::task::JoinSet;
use tonic::transport::Channel;

/// Prompt ids are drawn from `MARGIN .. vocab - MARGIN`: special and byte tokens sit at the ends.
const MARGIN: u32 = 1000;

#[derive(clap::Args, Clone)]
pub struct ServeArgs {
    /// The server's gRPC address (`host:port`).
    #[arg(long)]
    addr: String,
    /// Requests in flight at once (each client sends its next when the last one finishes).
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Requests measured.
    #[arg(long, default_value_t = 16)]
    requests: usize,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 64)]
    input_len: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 64)]
    output_len: u32,
    /// Requests run first, at the same concurrency, and not measured.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long)]
    json: bool,
}

/// One request as its client saw it.
struct Timed {
    ttft: Duration,
    /// Mean time between output tokens after the first.
    tpot: Option<Duration>,
    output_tokens: usize,
}

pub async fn run(a: ServeArgs) -> Result<()> {
    if a.concurrency == 0 || a.requests == 0 || a.input_len == 0 || a.output_len == 0 {
        bail!("--concurrency, --requests, --input-len and --output-len must be positive");
    }
    let url = if a.addr.contains("://") {
        a.addr.clone()
    } else {
        format!("http://{}", a.addr)
    };
    let mut clients = Vec::with_capacity(a.concurrency);
    for _ in 0..a.concurrency {
        let channel = Channel::from_shared(url.clone())
            .with_context(|| format!("bad address {url:?}"))?
            .connect()
            .await
            .with_context(|| format!("connecting to {url}"))?;
        clients.push(GenerationClient::new(channel));
    }
    let info = clients[0]
        .model_info(ModelInfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("ModelInfo: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    if info.vocab_size <= 2 * MARGIN + 1 {
        bail!("the vocabulary ({} tokens) is too small", info.vocab_size);
    }
    if a.warmup > 0 {
        phase(&a, &info, &clients, a.warmup, u64::MAX / 2)
            .await
            .context("warm-up")?;
    }
    let before = model_info(&mut clients[0]).await?;
    let start = Instant::now();
    let timed = phase(&a, &info, &clients, a.requests, 0).await?;
    let secs = start.elapsed().as_secs_f64();
    let steps = StepCounters::between(&before, &model_info(&mut clients[0]).await?);

    let output_tokens: usize = timed.iter().map(|t| t.output_tokens).sum();
    let mean = |d: &mut dyn Iterator<Item = Duration>| {
        let (sum, n) = d.fold((0.0, 0usize), |(s, n), d| (s + d.as_secs_f64(), n + 1));
        (n > 0).then(|| sum / n as f64 * 1e3)
    };
    let ttft_ms = mean(&mut timed.iter().map(|t| t.ttft));
    let tpot_ms = mean(&mut timed.iter().filter_map(|t| t.tpot));
    let tps = output_tokens as f64 / secs;
    if a.json {
        println!(
            "{}",
            json!({
                "model": info.model,
                "tensor_parallel_size": info.tensor_parallel_size,
                "concurrency": a.concurrency,
                "requests": timed.len(),
                "input_len": a.input_len,
                "output_len": a.output_len,
                "total_output_tokens": output_tokens,
                "duration_s": secs,
                "output_tokens_per_s": tps,
                "mean_ttft_ms": ttft_ms,
                "mean_tpot_ms": tpot_ms,
                "steps": steps.steps,
                "mean_step_compute_ms": steps.mean_compute_ms(),
                "mean_step_gap_us": steps.mean_gap_us(),
                "gap_percent_of_step": steps.gap_percent(),
                "rank_wait_percent_of_step": steps.rank_wait_percent(),
                "preemptions": steps.preemptions,
                "prefix_cache_hit_tokens": steps.prefix_hits,
            })
        );
    } else {
        let ms = |v: Option<f64>| v.map_or("–".to_string(), |v| format!("{v:.1} ms"));
        println!(
            "{} (tp {}), concurrency {}, {} requests of {} tokens in, {} out",
            info.model,
            info.tensor_parallel_size,
            a.concurrency,
            timed.len(),
            a.input_len,
            a.output_len
        );
        println!(
            "{output_tokens} output tokens in {secs:.2} s: {tps:.1} tok/s; mean TTFT {}, mean TPOT {}",
            ms(ttft_ms),
            ms(tpot_ms)
        );
        println!(
            "{} steps: mean {:.2} ms computing; rank 0 waits {:.0} µs for the next plan ({:.2}% of a step), the longest-waiting rank {:.2}%; {} preemptions",
            steps.steps,
            steps.mean_compute_ms(),
            steps.mean_gap_us(),
            steps.gap_percent(),
            steps.rank_wait_percent(),
            steps.preemptions
        );
    }
    Ok(())
}

async fn model_info(client: &mut GenerationClient<Channel>) -> Result<ModelInfoResponse> {
    Ok(client
        .model_info(ModelInfoRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("ModelInfo: {:?}: {}", s.code(), s.message()))?
        .into_inner())
}

/// The server's step counters over the measured phase (ModelInfo before and after): how long
/// the workers computed, and how long they waited between back-to-back steps.
struct StepCounters {
    steps: u64,
    compute_s: f64,
    gap_s: f64,
    rank_wait_s: f64,
    preemptions: u64,
    prefix_hits: u64,
}

impl StepCounters {
    fn between(a: &ModelInfoResponse, b: &ModelInfoResponse) -> Self {
        Self {
            steps: b.steps_total - a.steps_total,
            compute_s: b.step_compute_seconds_total - a.step_compute_seconds_total,
            gap_s: b.step_gap_seconds_total - a.step_gap_seconds_total,
            rank_wait_s: b.step_rank_wait_seconds_total - a.step_rank_wait_seconds_total,
            preemptions: b.preemptions_total - a.preemptions_total,
            prefix_hits: b.prefix_cache_hit_tokens - a.prefix_cache_hit_tokens,
        }
    }

    fn mean_compute_ms(&self) -> f64 {
        self.compute_s / self.steps.max(1) as f64 * 1e3
    }

    fn mean_gap_us(&self) -> f64 {
        self.gap_s / self.steps.max(1) as f64 * 1e6
    }

    fn gap_percent(&self) -> f64 {
        self.percent(self.gap_s)
    }

    fn rank_wait_percent(&self) -> f64 {
        self.percent(self.rank_wait_s)
    }

    fn percent(&self, s: f64) -> f64 {
        if self.compute_s > 0.0 {
            s / self.compute_s * 100.0
        } else {
            0.0
        }
    }
}

/// Runs `n` requests through the clients, one at a time per client.
async fn phase(
    a: &ServeArgs,
    info: &ModelInfoResponse,
    clients: &[GenerationClient<Channel>],
    n: usize,
    salt: u64,
) -> Result<Vec<Timed>> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for client in clients {
        let (mut client, next, a) = (client.clone(), next.clone(), a.clone());
        let vocab = info.vocab_size;
        tasks.spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return anyhow::Ok(done);
                }
                let ids = prompt_ids(a.seed ^ salt.wrapping_add(i as u64), a.input_len, vocab);
                let timed = one(&mut client, &a, i, ids)
                    .await
                    .with_context(|| format!("request {i}"))?;
                done.push(timed);
            }
        });
    }
    let mut all = Vec::with_capacity(n);
    while let Some(r) = tasks.join_next().await {
        all.extend(r.context("a client task panicked")??);
    }
    Ok(all)
}

async fn one(
    client: &mut GenerationClient<Channel>,
    a: &ServeArgs,
    i: usize,
    token_ids: Vec<u32>,
) -> Result<Timed> {
    let req = GenerateRequest {
        request_id: format!("bench-{i}"),
        token_ids,
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(a.output_len),
            temperature: 0.0,
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let status = |s: tonic::Status| anyhow::anyhow!("{:?}: {}", s.code(), s.message());
    let sent = Instant::now();
    let mut stream = client
        .generate_stream(req)
        .await
        .map_err(status)?
        .into_inner();
    let (mut first, mut last, mut tokens) = (None, sent, 0usize);
    let mut finish = None;
    while let Some(resp) = stream.message().await.map_err(status)? {
        if !resp.token_ids.is_empty() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = now;
            tokens += resp.token_ids.len();
        }
        if resp.finish_reason != FinishReason::Unspecified as i32 {
            finish = Some((resp.finish_reason, resp.usage.unwrap_or_default()));
            break;
        }
    }
    let (reason, usage) = finish.context("the stream ended without a finish reason")?;
    let want = a.output_len as usize;
    if reason != FinishReason::Length as i32
        || tokens != want
        || usage.completion_tokens as usize != want
    {
        bail!(
            "expected {want} tokens ending at the length limit, got {tokens} (usage says {}), \
             finish reason {reason}",
            usage.completion_tokens
        );
    }
    let first = first.context("no tokens")?;
    Ok(Timed {
        ttft: first - sent,
        tpot: (tokens > 1).then(|| (last - first) / (tokens as u32 - 1)),
        output_tokens: tokens,
    })
}

/// `len` pseudo-random ids in `MARGIN .. vocab - MARGIN` (splitmix64: the same prompts for the
/// same seed, on any machine).
fn prompt_ids(seed: u64, len: usize, vocab: u32) -> Vec<u32> {
    let span = u64::from(vocab - 2 * MARGIN);
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            MARGIN + (z % span) as u32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_ids_are_exact_in_range_and_reproducible() {
        let ids = prompt_ids(7, 500, 49152);
        assert_eq!(ids.len(), 500);
        assert!(ids.iter().all(|&t| (MARGIN..49152 - MARGIN).contains(&t)));
        assert_eq!(ids, prompt_ids(7, 500, 49152));
        assert_ne!(ids, prompt_ids(8, 500, 49152));
    }
}
