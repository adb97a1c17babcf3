//! `helios-bench overhead`: what the coordinator costs per step when the engine costs nothing.
//!
//! Every decode step pays the coordinator's own work on top of the model's: schedule, build the
//! StepPlan, send it to every rank and read the answer over gRPC, detokenize each new token,
//! check stop strings, and stream a response to each request. With a real model this hides
//! inside the step time; here the ranks are [fake workers](crate::fake_worker) that answer at
//! once, so the step rate is the coordinator's ceiling and its inverse is the overhead a real
//! step pays. The coordinator is the real one (a `FrontDoor` over a `ShardedClient`, gRPC over
//! loopback), with the SmolLM2 tokenizer.
//!
//! Clients either go through the real gRPC server (`helios_coordinator::grpc::serve` on a
//! loopback port, one tonic connection per request, as separate users would) or drain the
//! front door's channels in-process; the difference is the cost of streaming to clients. The
//! clients and the fake ranks run in the same process and on the same cores as the coordinator,
//! so the numbers are an upper bound on the coordinator's own cost. Steps are counted where
//! rank 0 receives them; clients' received tokens are sampled at the same moments, so a client
//! falling behind shows as a received rate below the step rate.
//!
//! A second table takes the step apart in-process at fixed context lengths: the scheduler's
//! schedule + apply, encoding and decoding the plan (what each side of the gRPC call does), and
//! the encoded plan size (a sequence's block table travels once, then only the blocks it gains,
//! so a decode step's size does not grow with the context). A third: streaming one token
//! (detokenize, stop check, response).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use helios_coordinator::admission::Admitted;
use helios_coordinator::block_manager::BlockManager;
use helios_coordinator::front_door::{FrontDoor, ServingOptions};
use helios_coordinator::membership::{FixedAddresses, Membership};
use helios_coordinator::metrics::Metrics;
use helios_coordinator::output::{response_channel, RequestOutput};
use helios_coordinator::replica::ReplicaOptions;
use helios_coordinator::request_trace::{Arrival, RequestTrace};
use helios_coordinator::scheduler::{
    Sampled, Scheduler, SchedulerConfig, Sequence, SequenceParams,
};
use helios_coordinator::sharded_client::InitOptions;
use helios_coordinator::tokenizer::TextTokenizer;
use helios_coordinator::{grpc, shutdown};
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{
    GenerateRequest, GenerationParameters, SampledToken, SamplingParams, StepPlan, StepResult,
};
use prost::Message;
use serde_json::json;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::fake_worker::{FakeOptions, FakeRank, Recorder, StepRecord};

#[derive(clap::Args)]
pub struct OverheadArgs {
    /// The tokenizer's model (only its tokenizer is read).
    #[arg(long, default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf")]
    model: PathBuf,
    /// Running sequences, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,64,256")]
    seqs: Vec<usize>,
    /// Decode steps measured per configuration (after the warm-up steps).
    #[arg(long, default_value_t = 1000)]
    steps: usize,
    /// Decode steps skipped once every sequence is running.
    #[arg(long, default_value_t = 50)]
    warmup_steps: usize,
    /// Fake ranks (the tensor-parallel degree), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    workers: Vec<usize>,
    /// How the streams are consumed, comma-separated: `grpc` (the real server, tonic clients
    /// over loopback) and/or `channel` (the front door's channels, in-process).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "grpc,channel"
    )]
    clients: Vec<ClientKind>,
    /// Context lengths of the in-process step breakdown, comma-separated (empty: skip it).
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096")]
    contexts: Vec<usize>,
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientKind {
    Grpc,
    Channel,
}

impl ClientKind {
    fn name(self) -> &'static str {
        match self {
            ClientKind::Grpc => "grpc",
            ClientKind::Channel => "channel",
        }
    }
}

/// The text rank 0 streams: ordinary English, so every token detokenizes to real text.
const PASSAGE: &str = "The lighthouse keeper climbed the narrow stairs every evening, carrying a \
    lamp and a notebook in which he wrote down the colour of the sea, the direction of the wind \
    and the names of the ships that passed. Over the years the notebook became a history of the \
    coast: storms that came without warning, fishing boats that returned late, a summer when the \
    water was so calm that the stars seemed to float on it. Visitors sometimes asked him whether \
    he was lonely, and he would answer that a person who watches the horizon is never alone, \
    because something is always about to appear.";

/// A stop string that never matches the passage, so the stop check runs on every token.
const STOP: &str = "\n\nUser:";

/// One end-to-end configuration's result.
struct Measured {
    seqs: usize,
    workers: usize,
    clients: ClientKind,
    steps: usize,
    secs: f64,
    client_tokens: u64,
    plan_bytes: f64,
    context: f64,
}

impl Measured {
    fn us_per_step(&self) -> f64 {
        self.secs / self.steps as f64 * 1e6
    }

    fn steps_per_s(&self) -> f64 {
        self.steps as f64 / self.secs
    }

    fn us_per_token(&self) -> f64 {
        self.us_per_step() / self.seqs as f64
    }

    fn client_tokens_per_s(&self) -> f64 {
        self.client_tokens as f64 / self.secs
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "seqs": self.seqs,
            "workers": self.workers,
            "clients": self.clients.name(),
            "steps": self.steps,
            "seconds": self.secs,
            "steps_per_s": self.steps_per_s(),
            "us_per_step": self.us_per_step(),
            "us_per_token": self.us_per_token(),
            "tokens_per_s": self.steps_per_s() * self.seqs as f64,
            "client_tokens_per_s": self.client_tokens_per_s(),
            "plan_bytes_mean": self.plan_bytes,
            "context_positions_mean": self.context,
        })
    }
}

pub fn run(a: OverheadArgs) -> Result<()> {
    if a.seqs.contains(&0) || a.workers.contains(&0) || a.steps == 0 {
        bail!("--seqs, --workers and --steps must be positive");
    }
    let text = Arc::new(
        TextTokenizer::from_model_path(&a.model)?
            .encode(PASSAGE)
            .context("tokenizing the passage")?,
    );
    let mut e2e = Vec::new();
    for &workers in &a.workers {
        for &clients in &a.clients {
            for &seqs in &a.seqs {
                // A fresh runtime per configuration: nothing of the last one (its server, its
                // step loop, its fake ranks) keeps running into the next measurement.
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .enable_all()
                    .build()?;
                let m = rt.block_on(measure(&a, seqs, workers, clients, text.clone()));
                rt.shutdown_timeout(Duration::from_secs(2));
                let m = m.with_context(|| {
                    format!(
                        "{seqs} sequences, {workers} workers, {} clients",
                        clients.name()
                    )
                })?;
                if !a.json {
                    eprintln!(
                        "overhead: {seqs} seqs, {workers} workers, {} clients: {:.1} us/step",
                        clients.name(),
                        m.us_per_step()
                    );
                }
                e2e.push(m);
            }
        }
    }
    let parts = a
        .contexts
        .iter()
        .flat_map(|&ctx| a.seqs.iter().map(move |&n| (n, ctx)))
        .map(|(n, ctx)| breakdown(n, ctx, &text))
        .collect::<Result<Vec<_>>>()?;
    let push = push_cost(&a.model, &text)?;

    if a.json {
        let obj = json!({
            "end_to_end": e2e.iter().map(Measured::json).collect::<Vec<_>>(),
            "breakdown": parts.iter().map(Breakdown::json).collect::<Vec<_>>(),
            "stream_one_token_us": push,
        });
        println!("{obj}");
        return Ok(());
    }
    println!(
        "Coordinator overhead per decode step, zero-cost fake workers ({} steps after {} warm-up)",
        a.steps, a.warmup_steps
    );
    println!(
        "| seqs | workers | clients | steps/s | µs/step | µs/token | client tok/s | plan bytes | mean context |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for m in &e2e {
        println!(
            "| {} | {} | {} | {:.0} | {:.1} | {:.2} | {:.0} | {:.0} | {:.0} |",
            m.seqs,
            m.workers,
            m.clients.name(),
            m.steps_per_s(),
            m.us_per_step(),
            m.us_per_token(),
            m.client_tokens_per_s(),
            m.plan_bytes,
            m.context
        );
    }
    if !parts.is_empty() {
        println!();
        println!("In-process step breakdown (no gRPC, no clients)");
        println!("| seqs | context | plan bytes | schedule+apply µs | encode+decode plan µs |");
        println!("|---|---|---|---|---|");
        for p in &parts {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} |",
                p.seqs, p.context, p.plan_bytes, p.schedule_us, p.codec_us
            );
        }
    }
    println!();
    println!("Streaming one token to its request (detokenize, stop check, response): {push:.2} µs");
    Ok(())
}

async fn measure(
    a: &OverheadArgs,
    seqs: usize,
    workers: usize,
    clients: ClientKind,
    text: Arc<Vec<u32>>,
) -> Result<Measured> {
    let tokenizer = TextTokenizer::from_model_path(&a.model)?;
    // Every request generates past the measured window; the cache holds all of them at once.
    let max_new_tokens = a.warmup_steps + a.steps + 256;
    let block_size = 16;
    let num_kv_blocks = (seqs * (max_new_tokens + 64).div_ceil(block_size) + 1024).max(100_000);
    let (gate, gated) = watch::channel(false);
    let mut ranks = Vec::with_capacity(workers);
    for r in 0..workers {
        ranks.push(
            FakeRank::start(FakeOptions {
                rank0: r == 0,
                num_kv_blocks: num_kv_blocks as u32,
                vocab_size: tokenizer.vocab_size() as u32,
                text: text.clone(),
                gate: gated.clone(),
            })
            .await?,
        );
    }
    let recorder = ranks[0].recorder.clone();
    let addrs: Vec<String> = ranks.iter().map(|r| format!("http://{}", r.addr)).collect();
    let membership = Membership::Static(FixedAddresses::new(&addrs)?);
    let init = InitOptions {
        model_path: "fake".into(),
        block_size: block_size as u32,
        num_kv_blocks: num_kv_blocks as u32,
        kv_cache_memory_bytes: 0,
        dequantize: false,
        load_format: Default::default(),
        auth: Default::default(),
    };
    // `helios serve`'s defaults, raised only where a configuration needs more.
    let defaults = SchedulerConfig::default();
    let opts = ServingOptions {
        model_name: "fake".into(),
        replica: ReplicaOptions {
            scheduler: SchedulerConfig {
                max_batch_tokens: defaults.max_batch_tokens.max(seqs),
                max_running: defaults.max_running.max(seqs),
                ..defaults
            },
            overlap: true,
            tracing: false,
            recovery: Default::default(),
        },
        router: Default::default(),
        log_prompts: false,
        caps: Default::default(),
        grammars: Default::default(),
    };
    let front = FrontDoor::start(vec![membership], &init, tokenizer, &opts).await?;

    let request = |i: usize| GenerateRequest {
        request_id: format!("overhead-{i}"),
        prompt: format!("Request {i}: tell me a long story about a lighthouse."),
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(max_new_tokens as u32),
            ignore_eos: true,
            stop: vec![STOP.into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut tasks = JoinSet::new();
    match clients {
        ClientKind::Channel => {
            for i in 0..seqs {
                let mut rx = front
                    .generate(request(i), Default::default())
                    .await
                    .context("generate")?;
                let recorder = recorder.clone();
                tasks.spawn(async move {
                    while let Some(Ok(resp)) = rx.recv().await {
                        recorder
                            .probe
                            .fetch_add(resp.token_ids.len() as u64, Ordering::Relaxed);
                    }
                });
            }
        }
        ClientKind::Grpc => {
            let listener = shutdown::bind("127.0.0.1:0".parse()?).await?;
            let url = format!("http://{}", listener.local_addr()?);
            tasks.spawn({
                let front = front.clone();
                async move {
                    if let Err(e) = grpc::serve(listener, front, Duration::from_secs(1)).await {
                        eprintln!("overhead: the gRPC server failed: {e:#}");
                    }
                }
            });
            for i in 0..seqs {
                // One connection per request, as separate users would have.
                let mut c = GenerationClient::connect(url.clone())
                    .await
                    .with_context(|| format!("connecting to {url}"))?;
                let mut stream = c
                    .generate_stream(request(i))
                    .await
                    .map_err(|s| anyhow::anyhow!("generate_stream: {}", s.message()))?
                    .into_inner();
                let recorder = recorder.clone();
                tasks.spawn(async move {
                    while let Ok(Some(resp)) = stream.message().await {
                        recorder
                            .probe
                            .fetch_add(resp.token_ids.len() as u64, Ordering::Relaxed);
                    }
                });
            }
        }
    }

    // Every request is queued in the step loop: let them run.
    gate.send_replace(true);
    // Wait for the first step in which every sequence decodes, then for the window after it.
    let first = wait_for(&recorder, Duration::from_secs(120), |steps| {
        steps.iter().position(|s| s.seqs == seqs && s.all_decode)
    })
    .await
    .context("waiting for every sequence to be decoding")?;
    let start = first + a.warmup_steps;
    let end = start + a.steps;
    wait_for(&recorder, Duration::from_secs(600), |steps| {
        (steps.len() > end).then_some(())
    })
    .await
    .context("waiting for the measured steps")?;
    let steps = recorder.snapshot();
    let window = &steps[start..=end];
    if let Some(bad) = window.iter().find(|s| s.seqs != seqs || !s.all_decode) {
        bail!(
            "a step in the window ran {} sequences (expected {seqs} decoding)",
            bad.seqs
        );
    }
    let (w0, w1) = (&window[0], &window[a.steps]);
    let n = window.len() as f64;
    let m = Measured {
        seqs,
        workers,
        clients,
        steps: a.steps,
        secs: w1.at.duration_since(w0.at).as_secs_f64(),
        client_tokens: w1.probe - w0.probe,
        plan_bytes: window.iter().map(|s| s.plan_bytes as f64).sum::<f64>() / n,
        context: window
            .iter()
            .map(|s| s.context_positions as f64 / seqs as f64)
            .sum::<f64>()
            / n,
    };
    tasks.abort_all();
    drop(ranks);
    Ok(m)
}

/// Polls rank 0's record until `found` says yes.
async fn wait_for<T>(
    recorder: &Recorder,
    timeout: Duration,
    found: impl Fn(&[StepRecord]) -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(steps) = recorder.steps.lock() {
            if let Some(v) = found(&steps) {
                return Ok(v);
            }
        }
        if Instant::now() > deadline {
            bail!(
                "timed out after {timeout:?} ({} steps seen)",
                recorder.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// One decode step taken apart, in-process.
struct Breakdown {
    seqs: usize,
    context: usize,
    plan_bytes: usize,
    schedule_us: f64,
    codec_us: f64,
}

impl Breakdown {
    fn json(&self) -> serde_json::Value {
        json!({
            "seqs": self.seqs,
            "context": self.context,
            "plan_bytes": self.plan_bytes,
            "schedule_apply_us": self.schedule_us,
            "encode_decode_plan_us": self.codec_us,
        })
    }
}

/// Rank 0's answer to a plan, as a fake rank gives it.
fn sample_all(plan: &StepPlan, text: &[u32]) -> StepResult {
    helios_coordinator::scheduler::answer_with(plan, |s| text[s.seq_id as usize % text.len()])
}

/// `seqs` sequences at `context` positions each (prefilled by the real scheduler in one step),
/// then decode steps timed: the scheduler alone, and the plan's encode + decode.
fn breakdown(seqs: usize, context: usize, text: &[u32]) -> Result<Breakdown> {
    const STEPS: usize = 200;
    let block_size = 16;
    let final_len = context + STEPS + 8;
    let blocks = seqs * final_len.div_ceil(block_size);
    let mut sched = Scheduler::new(
        BlockManager::new(blocks, block_size),
        SchedulerConfig {
            max_batch_tokens: seqs * context,
            max_running: seqs,
            ..Default::default()
        },
    );
    for i in 0..seqs {
        let prompt: Vec<u32> = (0..context).map(|j| text[(i + j) % text.len()]).collect();
        let params = SequenceParams {
            max_new_tokens: STEPS + 8,
            sampling: SamplingParams::default(),
            stop_token_ids: Vec::new(),
            ..Default::default()
        };
        sched.add(Sequence::new(i as u64, prompt, params))?;
    }
    let prefill = sched.schedule()?.context("nothing to prefill")?;
    sched.apply(sample_all(&prefill, text))?;
    let decode = |sched: &mut Scheduler| -> Result<StepPlan> {
        let plan = sched.schedule()?.context("nothing to decode")?;
        if plan.seqs.len() != seqs || plan.seqs.iter().any(|s| !s.sample) {
            bail!("the step after the prefill is not a full decode step");
        }
        Ok(plan)
    };
    let probe = decode(&mut sched)?;
    let plan_bytes = probe.encoded_len();
    let (mut scheduling, mut codec) = (Duration::ZERO, Duration::ZERO);
    let mut plan = probe;
    for _ in 0..STEPS {
        let answer = sample_all(&plan, text);
        let t = Instant::now();
        let bytes = plan.encode_to_vec();
        std::hint::black_box(StepPlan::decode(bytes.as_slice())?);
        codec += t.elapsed();
        let t = Instant::now();
        sched.apply(answer)?;
        plan = decode(&mut sched)?;
        scheduling += t.elapsed();
    }
    let per_step = |d: Duration| d.as_secs_f64() / STEPS as f64 * 1e6;
    Ok(Breakdown {
        seqs,
        context,
        plan_bytes,
        schedule_us: per_step(scheduling),
        codec_us: per_step(codec),
    })
}

/// Mean cost of streaming one sampled token of the passage to its request's channel.
fn push_cost(model: &std::path::Path, text: &[u32]) -> Result<f64> {
    const TOKENS: usize = 20_000;
    let tokenizer = TextTokenizer::from_model_path(model)?;
    let prompt = tokenizer.encode("Tell me a long story about a lighthouse.")?;
    let admitted = Admitted {
        prompt_ids: prompt,
        constraint: None,
        params: SequenceParams::default(),
        stop: vec![STOP.into()],
        logprobs: None,
        n: 1,
        best_of: 1,
    };
    let (tx, mut rx) = response_channel();
    let trace = RequestTrace::start(
        Arrival {
            request_id: "push".into(),
            parent: None,
            prompt_tokens: admitted.prompt_ids.len() as u32,
            max_new_tokens: TOKENS,
            prompt_text: None,
            arrival: Instant::now(),
        },
        Arc::new(Metrics::new()),
    );
    let mut out = RequestOutput::new(tx, &admitted, trace, &Default::default());
    let t = Instant::now();
    for i in 0..TOKENS {
        let s = Sampled {
            token: SampledToken {
                seq_id: 0,
                token_id: text[i % text.len()],
                ..Default::default()
            },
            finish: None,
            logits: None,
            prompt_logprobs: None,
        };
        out.push(&tokenizer, s)?;
        if i % 256 == 255 {
            while rx.try_recv().is_some() {}
        }
    }
    Ok(t.elapsed().as_secs_f64() / TOKENS as f64 * 1e6)
}
