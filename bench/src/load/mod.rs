//! `helios-bench serve`: a load generator for capacity tests of a running server, over gRPC
//! (`helios.v1.Generation`) or OpenAI-compatible HTTP (so the same tool, with the same prompts
//! and the same arithmetic, drives vLLM, llama.cpp's server or anything else that speaks it).
//! Its flags and report follow `vllm bench serve`, so results compare across tools.
//!
//! A run: connect ([`client`]), build the prompts ([`dataset`]: random with exact lengths, or
//! ShareGPT), send `--warmup` requests that are not counted, read the server's counters (gRPC),
//! send the measured requests in a closed or open loop ([`arrivals`]) with a [`progress`] bar,
//! read the counters again, and print the [`report`] (a table, or one JSON object with
//! `--json`).
//!
//! `--workload` ([`workload`]) picks what the requests are: independent prompts (`random`, the
//! default), multi-turn conversations that resend their history ([`chat`]: `--sessions`,
//! `--turns`; the load's `--concurrency` and `--request-rate` then count sessions, whose turns
//! go back to back), or many requests behind a few system prompts ([`shared_prefix`]:
//! `--system-prompts`, `--system-prompt-len`, `--users`). The last two carry session ids and
//! share prefixes on purpose, to measure a prefix cache and a cache-aware router; the report
//! then shows the prefix-cache hit ratio over the run (gRPC). A chat run sends exactly
//! `--sessions` × `--turns` requests, so it takes neither `--num-requests` nor `--duration`.
//!
//! Exact token counts are the point of a capacity test, so `--ignore-eos` makes every request
//! generate exactly its `max_tokens` and fails a request that does not; input lengths are exact
//! by construction (token ids over gRPC, text that re-encodes to the asked length over HTTP).
//! The report's token totals are what the server says it processed (its usage).

pub mod arrivals;
pub mod chat;
pub mod client;
pub mod dataset;
pub mod progress;
pub mod report;
pub mod shared_prefix;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use helios_coordinator::tokenizer::TextTokenizer;
use serde_json::{json, Map, Value};

use arrivals::{Load, Until};
use chat::Chat;
use client::grpc::{Grpc, StepCounters};
use client::openai::OpenAi;
use client::{Client, Record, Reply, Sampling};
use dataset::{Dataset, Prompt, Random};
use progress::{Goal, Progress};
use report::{Report, RunInfo, Slo};
use shared_prefix::SharedPrefix;
use workload::{Workload, WorkloadArgs};

/// The model whose tokenizer builds text prompts unless `--tokenizer` says otherwise.
const DEFAULT_TOKENIZER: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Requests when neither `--num-requests` nor `--duration` is given.
const DEFAULT_REQUESTS: usize = 16;
/// Default prompt and output lengths of random prompts (small: CPU servers are the common case).
const DEFAULT_LEN: usize = 64;
/// ShareGPT entries kept for a `--duration` run, whose request count is not known up front.
const DURATION_POOL: usize = 4096;
/// gRPC connections of an open loop without `--concurrency`, and at most in any case.
const OPEN_LOOP_CONNECTIONS: usize = 16;
const MAX_CONNECTIONS: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// `helios.v1.Generation/GenerateStream`.
    Grpc,
    /// `POST /v1/completions`, streamed (OpenAI-compatible servers).
    Openai,
}

#[derive(clap::Args, Clone, Debug)]
pub struct LoadArgs {
    /// The server: `host:port` or `http://host:port` (a trailing `/v1` is fine for OpenAI).
    #[arg(long, visible_alias = "addr", alias = "base-url")]
    pub url: String,
    /// How to talk to the server.
    #[arg(long, value_enum, default_value_t = Protocol::Grpc, alias = "backend")]
    pub protocol: Protocol,
    /// gRPC over `https://`: trust the server's certificate if this PEM CA signed it.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// gRPC: the API key to send (`authorization: Bearer`).
    #[arg(long, env = "HELIOS_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// OpenAI: the completions path.
    #[arg(long, default_value = "/v1/completions")]
    pub endpoint: String,
    /// OpenAI: the model name sent in each request (default: the first of `GET /v1/models`).
    #[arg(long)]
    pub model: Option<String>,
    /// A model file or HF directory whose tokenizer builds text prompts of exact length (OpenAI)
    /// and measures ShareGPT conversations.
    #[arg(long, default_value = DEFAULT_TOKENIZER)]
    pub tokenizer: PathBuf,

    #[command(flatten)]
    pub workload: WorkloadArgs,

    /// Requests measured [default: 16 unless --duration; chat: sessions × turns].
    #[arg(
        long,
        visible_alias = "num-prompts",
        alias = "requests",
        conflicts_with = "duration"
    )]
    pub num_requests: Option<usize>,
    /// Send requests for this many seconds instead of a fixed number (those in flight at the
    /// end finish and count).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Closed loop: requests in flight at once (default 1). With --request-rate: the most in
    /// flight (default: no limit).
    #[arg(long, visible_alias = "max-concurrency")]
    pub concurrency: Option<usize>,
    /// Open loop: requests per second arriving whatever the server does (`inf`: all at once).
    #[arg(long)]
    pub request_rate: Option<f64>,
    /// Open loop: shape of the gamma-distributed gaps (1 = Poisson, < 1 burstier).
    #[arg(long, default_value_t = 1.0)]
    pub burstiness: f64,
    /// Requests sent first, not measured.
    #[arg(long, visible_alias = "num-warmups", default_value_t = 0)]
    pub warmup: usize,

    /// Random prompts: tokens per prompt (chat: per user message; shared-prefix: after the
    /// system prompt) [default: 64].
    #[arg(long)]
    pub input_len: Option<usize>,
    /// Tokens to generate per request (`max_tokens`) [default: 64; ShareGPT: the reply's].
    #[arg(long)]
    pub output_len: Option<usize>,
    /// Prompts from a ShareGPT-format JSON file instead of random ones.
    #[arg(long, visible_alias = "dataset-path")]
    pub dataset: Option<PathBuf>,
    /// Seeds the prompts, the ShareGPT shuffle and the arrival times; when given, also sent as
    /// each request's sampling seed.
    #[arg(long)]
    pub seed: Option<u64>,

    /// Sampling temperature (0: greedy, so runs repeat exactly).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the K most likely tokens.
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Generate exactly the output length, past end-of-sequence (vLLM's `ignore_eos`); a
    /// request that ends otherwise counts as failed.
    #[arg(long)]
    pub ignore_eos: bool,
    /// gRPC: this fraction of the requests (0 to 1, evenly spread) is constrained to
    /// --constraint-regex (structured outputs' cost).
    #[arg(long)]
    pub constrained: Option<f64>,
    /// The regex constrained requests follow; the default never completes within a run's
    /// output length, so every request generates it whole.
    #[arg(long, default_value = DEFAULT_CONSTRAINT_REGEX)]
    pub constraint_regex: String,
    /// gRPC: every request asks for its prompt's logprobs and this many most likely tokens at
    /// each prompt position (the cost of scoring prompts, as evaluation harnesses do).
    #[arg(long)]
    pub prompt_logprobs: Option<u32>,
    /// OpenAI: a JSON object merged into every request body, e.g. `{"logit_bias": {"2": -100}}`
    /// for a server without `ignore_eos`.
    #[arg(long)]
    pub extra_body: Option<String>,
    /// A request with no complete answer after this many seconds fails.
    #[arg(long, default_value_t = 600.0)]
    pub request_timeout: f64,

    /// Service-level objectives for goodput, `ttft:MS,tpot:MS,e2el:MS` (any of them).
    #[arg(long, visible_alias = "goodput", num_args = 1..)]
    pub slo: Vec<String>,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress bar (it is also off when stderr is not a terminal, and with --json).
    #[arg(long, alias = "disable-tqdm")]
    pub no_progress: bool,
}

/// Words and punctuation, a thousand of them: plain text that no run's output length completes.
pub const DEFAULT_CONSTRAINT_REGEX: &str = "([A-Za-z]+[ .,]){1000}";

/// The validated shape of a run.
struct Plan {
    workload: Workload,
    load: Load,
    until: Until,
    slo: Option<Slo>,
    sampling: Sampling,
    seed: u64,
    timeout: Duration,
    extra_body: Map<String, Value>,
}

impl LoadArgs {
    fn plan(&self) -> Result<Plan> {
        if self.concurrency == Some(0) {
            bail!("--concurrency must be positive");
        }
        let workload = self.workload.workload()?;
        let until = self.until(&workload)?;
        let load = match self.request_rate {
            None => Load::Closed {
                concurrency: self.concurrency.unwrap_or(1),
            },
            Some(rate) => {
                // Validates rate and burstiness.
                arrivals::Gaps::new(rate, self.burstiness, 0)?;
                Load::Open {
                    rate,
                    burstiness: self.burstiness,
                    max_concurrency: self.concurrency,
                }
            }
        };
        if self.input_len == Some(0) || self.output_len == Some(0) {
            bail!("--input-len and --output-len must be positive");
        }
        if self.dataset.is_some() && self.input_len.is_some() {
            bail!("--input-len applies to random prompts; a --dataset brings its own");
        }
        if self.dataset.is_some() && workload != Workload::Random {
            bail!(
                "--dataset applies to --workload random; {} builds random prompts",
                workload.kind().name()
            );
        }
        if !(self.request_timeout.is_finite() && self.request_timeout > 0.0) {
            bail!("--request-timeout must be a positive number of seconds");
        }
        let extra_body = match &self.extra_body {
            None => Map::new(),
            Some(s) => match serde_json::from_str(s).context("--extra-body is not JSON")? {
                Value::Object(o) => o,
                _ => bail!("--extra-body must be a JSON object"),
            },
        };
        if !extra_body.is_empty() && self.protocol != Protocol::Openai {
            bail!("--extra-body applies to --protocol openai");
        }
        if let Some(f) = self.constrained {
            if !(0.0..=1.0).contains(&f) {
                bail!("--constrained must be a fraction in [0, 1]");
            }
            if self.protocol != Protocol::Grpc {
                bail!("--constrained applies to --protocol grpc");
            }
        }
        if self.prompt_logprobs.is_some() && self.protocol != Protocol::Grpc {
            bail!("--prompt-logprobs applies to --protocol grpc (OpenAI: --extra-body with echo and logprobs)");
        }
        Ok(Plan {
            workload,
            load,
            until,
            slo: Slo::parse(&self.slo)?,
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                ignore_eos: self.ignore_eos,
                constrained: self.constrained.map(|f| (f, self.constraint_regex.clone())),
                prompt_logprobs: self.prompt_logprobs,
            },
            seed: self.seed.unwrap_or(0),
            timeout: Duration::from_secs_f64(self.request_timeout),
            extra_body,
        })
    }

    /// When the measured phase ends: a chat run sends all its sessions' turns, the others
    /// `--num-requests` or for `--duration`.
    fn until(&self, workload: &Workload) -> Result<Until> {
        if let Workload::Chat {
            sessions, turns, ..
        } = workload
        {
            if self.num_requests.is_some() || self.duration.is_some() {
                bail!(
                    "--workload chat sends --sessions × --turns requests: leave out \
                     --num-requests and --duration"
                );
            }
            let n = sessions
                .checked_mul(*turns)
                .context("--sessions × --turns is too large")?;
            return Ok(Until::Requests(n));
        }
        Ok(match (self.num_requests, self.duration) {
            (Some(0), _) => bail!("--num-requests must be positive"),
            (Some(n), None) => Until::Requests(n),
            (None, Some(s)) if s.is_finite() && s > 0.0 => {
                Until::Elapsed(Duration::from_secs_f64(s))
            }
            (None, Some(_)) => bail!("--duration must be a positive number of seconds"),
            (None, None) => Until::Requests(DEFAULT_REQUESTS),
            (Some(_), Some(_)) => bail!("give --num-requests or --duration, not both"),
        })
    }

    fn load_tokenizer(&self) -> Result<Arc<TextTokenizer>> {
        let t = TextTokenizer::from_model_path(&self.tokenizer).with_context(|| {
            format!(
                "loading the tokenizer {} (--tokenizer: the served model's file or directory)",
                self.tokenizer.display()
            )
        })?;
        Ok(Arc::new(t))
    }

    /// The prompts: ShareGPT, or random ids (gRPC) or text (OpenAI) of exact length, as the
    /// workload arranges them; for chat, the sessions, and single prompts for the warm-up.
    fn prompts(&self, plan: &Plan, client: &Client) -> Result<(Dataset, Option<Chat>)> {
        let output_len = self.output_len.unwrap_or(DEFAULT_LEN);
        if let Some(path) = &self.dataset {
            let needed = match plan.until {
                Until::Requests(n) => n,
                Until::Elapsed(_) => DURATION_POOL,
            } + self.warmup;
            let tokenizer = self.load_tokenizer()?;
            let d = Dataset::sharegpt(path, &tokenizer, self.output_len, needed, plan.seed)?;
            return Ok((d, None));
        }
        let input_len = self.input_len.unwrap_or(DEFAULT_LEN);
        let random = match client {
            Client::Grpc(g) => Random::ids(g.info.vocab_size)?,
            Client::OpenAi(_) => Random::text(self.load_tokenizer()?)?,
        };
        let seed = plan.seed;
        Ok(match plan.workload {
            Workload::Random => (Dataset::random(seed, input_len, output_len, random)?, None),
            Workload::Chat {
                sessions,
                turns,
                session_ids,
            } => {
                let mut chat = Chat::new(
                    random.clone(),
                    seed,
                    (sessions, turns),
                    input_len,
                    output_len,
                )?;
                chat.session_ids = session_ids;
                let warmup = Dataset::random(seed, input_len, output_len, random)?;
                (warmup, Some(chat))
            }
            Workload::SharedPrefix {
                system_prompts,
                system_prompt_len,
                users,
            } => {
                let shape = shared_prefix::Shape {
                    system_prompts,
                    system_len: system_prompt_len,
                    input_len,
                    output_len,
                    users,
                };
                let s =
                    SharedPrefix::new(random, seed, shape).context("--workload shared-prefix")?;
                (Dataset::SharedPrefix(s), None)
            }
        })
    }

    /// Over gRPC, refuses a chat or shared-prefix run whose longest request (prompt and
    /// output; chat: the last turn, every answer `--output-len` long) exceeds the model's
    /// length, which the server would refuse halfway through the run.
    fn check_fits(&self, plan: &Plan, client: &Client) -> Result<()> {
        let Client::Grpc(g) = client else {
            return Ok(());
        };
        let max = g.info.max_model_len as usize;
        let (input, output) = (
            self.input_len.unwrap_or(DEFAULT_LEN),
            self.output_len.unwrap_or(DEFAULT_LEN),
        );
        let longest = match plan.workload {
            Workload::Random => return Ok(()),
            Workload::Chat { turns, .. } => turns.saturating_mul(input.saturating_add(output)),
            Workload::SharedPrefix {
                system_prompt_len, ..
            } => system_prompt_len
                .saturating_add(input)
                .saturating_add(output),
        };
        if max > 0 && longest > max {
            bail!(
                "the longest request of this {} run is {longest} tokens with its output, more than \
                 the model's {max}: lower --input-len, --output-len, --turns or --system-prompt-len",
                plan.workload.kind().name()
            );
        }
        Ok(())
    }

    /// The run's settings, as the report's first JSON fields.
    fn settings(&self, plan: &Plan, client: &Client, dataset: &Dataset) -> Map<String, Value> {
        let (mode, concurrency, rate) = match &plan.load {
            Load::Closed { concurrency } => ("closed", Some(*concurrency), Value::Null),
            Load::Open {
                rate,
                max_concurrency,
                ..
            } => (
                "open",
                *max_concurrency,
                if rate.is_finite() {
                    json!(rate)
                } else {
                    json!("inf")
                },
            ),
        };
        let (num_requests, duration_limit) = match plan.until {
            Until::Requests(n) => (Some(n), None),
            Until::Elapsed(d) => (None, Some(d.as_secs_f64())),
        };
        let tp = match client {
            Client::Grpc(g) => Some(g.info.tensor_parallel_size),
            Client::OpenAi(_) => None,
        };
        let random = !matches!(dataset, Dataset::ShareGpt { .. });
        let v = json!({
            "protocol": match self.protocol { Protocol::Grpc => "grpc", Protocol::Openai => "openai" },
            "url": self.url,
            "model": client.model(),
            "tensor_parallel_size": tp,
            "load": mode,
            "concurrency": concurrency,
            "request_rate": rate,
            "burstiness": matches!(plan.load, Load::Open { .. }).then_some(self.burstiness),
            "num_requests": num_requests,
            "duration_limit_s": duration_limit,
            "warmup": self.warmup,
            "dataset": dataset.name(),
            "input_len": random.then(|| self.input_len.unwrap_or(DEFAULT_LEN)),
            "output_len": self.output_len.or(random.then_some(DEFAULT_LEN)),
            "ignore_eos": self.ignore_eos,
            "temperature": self.temperature,
            "constrained": self.constrained,
            "prompt_logprobs": self.prompt_logprobs,
        });
        let mut m = match v {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        m.extend(plan.workload.settings());
        m
    }
}

/// What was run, in words: `grpc 127.0.0.1:50051, model X (tp 1); closed loop, concurrency 4;
/// 100 requests, random 64 in / 64 out, warm-up 4`.
fn title(s: &Map<String, Value>) -> String {
    let v = |k: &str| match s.get(k) {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Null) | None => "-".to_string(),
        Some(other) => other.to_string(),
    };
    let tp = match s.get("tensor_parallel_size") {
        Some(Value::Number(n)) => format!(" (tp {n})"),
        _ => String::new(),
    };
    let load = if v("load") == "closed" {
        format!("closed loop, concurrency {}", v("concurrency"))
    } else {
        format!(
            "open loop, {} req/s (burstiness {}), max concurrency {}",
            v("request_rate"),
            v("burstiness"),
            if v("concurrency") == "-" {
                "unlimited".to_string()
            } else {
                v("concurrency")
            }
        )
    };
    let until = match s.get("num_requests") {
        Some(Value::Number(n)) => format!("{n} requests"),
        _ => format!("for {} s", v("duration_limit_s")),
    };
    let lengths = if let Some(w) = workload::describe(s) {
        w
    } else if v("dataset") == "random" {
        format!("random {} in / {} out", v("input_len"), v("output_len"))
    } else if v("output_len") == "-" {
        "sharegpt (output lengths of the replies)".to_string()
    } else {
        format!("sharegpt, {} out", v("output_len"))
    };
    format!(
        "{} {}, model {}{tp}; {load}; {until}, {lengths}{}, warm-up {}",
        v("protocol"),
        v("url"),
        v("model"),
        if s.get("ignore_eos") == Some(&Value::Bool(true)) {
            " (ignore EOS)"
        } else {
            ""
        },
        v("warmup")
    )
}

/// Connections for the gRPC client: one per closed-loop client.
fn connections(load: &Load) -> usize {
    match load {
        Load::Closed { concurrency } => *concurrency,
        Load::Open {
            max_concurrency, ..
        } => max_concurrency.unwrap_or(OPEN_LOOP_CONNECTIONS),
    }
    .clamp(1, MAX_CONNECTIONS)
}

/// Where a phase's prompts come from: all made before its clock starts when their number is
/// known (building a long text prompt takes tokenizer round trips that must not delay the
/// timestamps of requests in flight), else made on demand on a blocking thread (`--duration`).
enum Prompts {
    Made(Vec<Prompt>),
    OnDemand { dataset: Arc<Dataset>, warmup: bool },
}

impl Prompts {
    fn new(dataset: &Arc<Dataset>, until: Until, warmup: bool) -> Result<Prompts> {
        let make = |i: usize| {
            if warmup {
                dataset.warmup_prompt(i as u64)
            } else {
                dataset.prompt(i as u64)
            }
        };
        match until {
            Until::Requests(n) => Ok(Prompts::Made(
                (0..n)
                    .map(|i| make(i).with_context(|| format!("building prompt {i}")))
                    .collect::<Result<_>>()?,
            )),
            Until::Elapsed(_) => {
                // Fail before any request is sent on a prompt that cannot be built.
                make(0).context("building the first prompt")?;
                Ok(Prompts::OnDemand {
                    dataset: dataset.clone(),
                    warmup,
                })
            }
        }
    }

    async fn get(&self, i: usize) -> Result<Prompt, String> {
        match self {
            Prompts::Made(v) => v
                .get(i)
                .cloned()
                .ok_or_else(|| format!("no prompt {i} of {}", v.len())),
            Prompts::OnDemand { dataset, warmup } => {
                let (dataset, warmup) = (dataset.clone(), *warmup);
                tokio::task::spawn_blocking(move || {
                    if warmup {
                        dataset.warmup_prompt(i as u64)
                    } else {
                        dataset.prompt(i as u64)
                    }
                })
                .await
                .map_err(|e| format!("building prompt {i}: {e}"))?
                .map_err(|e| format!("building prompt {i}: {e:#}"))
            }
        }
    }
}

/// Sends one request, failing it after `timeout`.
async fn send_timed(
    client: &Client,
    i: usize,
    prompt: &Prompt,
    sampling: &Sampling,
    timeout: Duration,
) -> Result<Reply, String> {
    tokio::time::timeout(timeout, client.send(i, prompt, sampling))
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no complete answer within {} s",
                timeout.as_secs_f64()
            ))
        })
}

/// Sends one phase's requests and returns their outcomes in request order.
async fn phase(
    client: &Arc<Client>,
    prompts: Prompts,
    plan: &Plan,
    load: &Load,
    until: Until,
    progress: &Progress,
) -> Result<Vec<Result<Record, String>>> {
    let (client, prompts, counts) = (client.clone(), Arc::new(prompts), progress.counts.clone());
    let sampling = Arc::new(plan.sampling.clone());
    let timeout = plan.timeout;
    arrivals::drive(load, until, plan.seed, move |i| {
        let (client, prompts, counts, sampling) = (
            client.clone(),
            prompts.clone(),
            counts.clone(),
            sampling.clone(),
        );
        async move {
            let outcome = match prompts.get(i).await {
                Err(e) => Err(e),
                Ok(prompt) => send_timed(&client, i, &prompt, &sampling, timeout)
                    .await
                    .map(|reply| reply.record),
            };
            counts.record(outcome.is_ok());
            outcome
        }
    })
    .await
}

/// Runs the chat sessions under the run's load (which then starts sessions, not requests) and
/// returns every turn's outcome, session by session.
async fn chat_phase(
    client: &Arc<Client>,
    chat: Arc<Chat>,
    plan: &Plan,
    progress: &Progress,
) -> Result<Vec<Result<Record, String>>> {
    let (client, counts) = (client.clone(), progress.counts.clone());
    let sampling = Arc::new(plan.sampling.clone());
    let timeout = plan.timeout;
    let sessions = Until::Requests(chat.sessions);
    let per_session = arrivals::drive(&plan.load, sessions, plan.seed, move |n| {
        let (chat, client, counts, sampling) = (
            chat.clone(),
            client.clone(),
            counts.clone(),
            sampling.clone(),
        );
        let send = move |i: usize, prompt: Prompt| {
            let (client, sampling) = (client.clone(), sampling.clone());
            async move { send_timed(&client, i, &prompt, &sampling, timeout).await }
        };
        chat.run_session(n, send, move |ok| counts.record(ok))
    })
    .await?;
    Ok(per_session.into_iter().flatten().collect())
}

/// What the measured phase sends: prompts made before it, or chat sessions that make each turn
/// from the answer to the one before.
enum Measured {
    Prompts(Prompts),
    Chat(Arc<Chat>),
}

/// Sends `--warmup` requests (single prompts, whatever the workload), not measured.
async fn warm_up(
    a: &LoadArgs,
    client: &Arc<Client>,
    dataset: &Arc<Dataset>,
    plan: &Plan,
    show: bool,
) -> Result<()> {
    let load = Load::Closed {
        concurrency: a.concurrency.unwrap_or(a.warmup).clamp(1, a.warmup),
    };
    let until = Until::Requests(a.warmup);
    let prompts = Prompts::new(dataset, until, true)?;
    let progress = Progress::start("warm-up", Goal::Requests(a.warmup), show);
    let out = phase(client, prompts, plan, &load, until, &progress).await;
    progress.finish().await;
    if let Some(e) = out?.into_iter().find_map(Result::err) {
        bail!("a warm-up request failed: {e}");
    }
    Ok(())
}

async fn connect(a: &LoadArgs, plan: &Plan) -> Result<Client> {
    Ok(match a.protocol {
        Protocol::Grpc => {
            let access = client::grpc::Access {
                tls_ca: a.tls_ca.clone(),
                api_key: a.api_key.clone(),
            };
            Client::Grpc(Grpc::connect(&a.url, connections(&plan.load), &access).await?)
        }
        Protocol::Openai => Client::OpenAi(
            OpenAi::connect(
                &a.url,
                &a.endpoint,
                a.model.clone(),
                plan.extra_body.clone(),
            )
            .await?,
        ),
    })
}

pub async fn run(a: LoadArgs) -> Result<()> {
    let plan = a.plan()?;
    let client = connect(&a, &plan).await?;
    a.check_fits(&plan, &client)?;
    let (dataset, chat) = a.prompts(&plan, &client)?;
    let settings = a.settings(&plan, &client, &dataset);
    let (client, dataset) = (Arc::new(client), Arc::new(dataset));
    let show = !a.json && !a.no_progress;
    // Made before the warm-up, so the measured phase starts right after it, on a warm server.
    let measured = match chat {
        Some(chat) => Measured::Chat(Arc::new(chat)),
        None => Measured::Prompts(Prompts::new(&dataset, plan.until, false)?),
    };
    if a.warmup > 0 {
        warm_up(&a, &client, &dataset, &plan, show).await?;
    }

    let before = match &*client {
        Client::Grpc(g) => Some(g.model_info().await?),
        Client::OpenAi(_) => None,
    };
    let goal = match plan.until {
        Until::Requests(n) => Goal::Requests(n),
        Until::Elapsed(d) => Goal::Elapsed(d),
    };
    let progress = Progress::start("requests", goal, show);
    let start = Instant::now();
    let outcomes = match measured {
        Measured::Prompts(p) => phase(&client, p, &plan, &plan.load, plan.until, &progress).await,
        Measured::Chat(chat) => chat_phase(&client, chat, &plan, &progress).await,
    };
    let duration = start.elapsed();
    progress.finish().await;
    let outcomes = outcomes?;
    let server = match (&*client, before) {
        (Client::Grpc(g), Some(before)) => {
            Some(StepCounters::between(&before, &g.model_info().await?).report())
        }
        _ => None,
    };

    let report = Report::new(&outcomes, duration, plan.slo);
    let mut settings = settings;
    if server.is_none() {
        settings.extend(StepCounters::absent());
    }
    let info = RunInfo {
        title: title(&settings),
        settings,
        server,
    };
    if a.json {
        println!("{}", report.to_json(&info));
    } else {
        print!("{}", report.to_text(&info));
    }
    if report.completed == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadArgs,
    }

    fn parse(args: &[&str]) -> LoadArgs {
        Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
            .expect("parses")
            .args
    }

    #[test]
    fn flags_vllm_users_guess_and_the_old_ones_parse() {
        let a = parse(&[
            "--base-url",
            "http://h:8000",
            "--backend",
            "openai",
            "--num-prompts",
            "10",
            "--max-concurrency",
            "4",
            "--request-rate",
            "2.5",
            "--goodput",
            "ttft:100",
            "tpot:10",
            "--num-warmups",
            "2",
            "--dataset-path",
            "x.json",
        ]);
        assert_eq!(a.protocol, Protocol::Openai);
        assert_eq!(a.num_requests, Some(10));
        let plan = a.plan().expect("plan");
        assert_eq!(
            plan.load,
            Load::Open {
                rate: 2.5,
                burstiness: 1.0,
                max_concurrency: Some(4)
            }
        );
        assert_eq!(plan.until, Until::Requests(10));
        assert!(plan.slo.is_some_and(|s| s.tpot_ms == Some(10.0)));

        let a = parse(&[
            "--addr",
            "127.0.0.1:5",
            "--concurrency",
            "3",
            "--requests",
            "7",
            "--input-len",
            "16",
            "--output-len",
            "8",
            "--warmup",
            "3",
            "--json",
        ]);
        assert_eq!(a.protocol, Protocol::Grpc);
        let plan = a.plan().expect("plan");
        assert_eq!(plan.load, Load::Closed { concurrency: 3 });
        assert_eq!(plan.until, Until::Requests(7));

        let a = parse(&["--url", "h:1", "--duration", "2.5"]);
        assert_eq!(
            a.plan().expect("plan").until,
            Until::Elapsed(Duration::from_millis(2500))
        );
    }

    #[test]
    fn bad_combinations_are_refused() {
        let cli = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
                .map_err(anyhow::Error::from)
                .and_then(|c| c.args.plan().map(|_| ()))
        };
        for bad in [
            &["--url", "h:1", "--num-requests", "3", "--duration", "1"][..],
            &["--url", "h:1", "--concurrency", "0"],
            &["--url", "h:1", "--request-rate", "0"],
            &["--url", "h:1", "--request-rate", "1", "--burstiness", "0"],
            &["--url", "h:1", "--dataset", "x", "--input-len", "3"],
            &[
                "--url",
                "h:1",
                "--extra-body",
                "[1]",
                "--protocol",
                "openai",
            ],
            &[
                "--url",
                "h:1",
                "--extra-body",
                "{}x",
                "--protocol",
                "openai",
            ],
            &["--url", "h:1", "--extra-body", "{\"a\": 1}"],
            &["--url", "h:1", "--slo", "ttft"],
            &["--url", "h:1", "--duration", "-1"],
        ] {
            assert!(cli(bad).is_err(), "{bad:?}");
        }
        assert!(cli(&[
            "--url",
            "h:1",
            "--extra-body",
            "{\"a\": 1}",
            "--protocol",
            "openai"
        ])
        .is_ok());
    }

    #[test]
    fn workloads_plan_their_requests_and_refuse_what_does_not_apply() {
        let plan = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("serve").chain(args.iter().copied()))
                .map_err(anyhow::Error::from)
                .and_then(|c| c.args.plan())
        };
        let p = plan(&[
            "--url",
            "h:1",
            "--workload",
            "chat",
            "--sessions",
            "3",
            "--turns",
            "5",
        ])
        .expect("chat");
        assert_eq!(
            p.workload,
            Workload::Chat {
                sessions: 3,
                turns: 5,
                session_ids: true,
            }
        );
        assert_eq!(p.until, Until::Requests(15));
        let p = plan(&[
            "--url",
            "h:1",
            "--workload",
            "shared-prefix",
            "--duration",
            "2",
        ])
        .expect("shared-prefix");
        assert_eq!(p.until, Until::Elapsed(Duration::from_secs(2)));
        assert_eq!(
            plan(&["--url", "h:1"]).expect("random").workload,
            Workload::Random
        );
        for bad in [
            &["--url", "h:1", "--workload", "chat", "--num-requests", "4"][..],
            &["--url", "h:1", "--workload", "chat", "--duration", "4"],
            &["--url", "h:1", "--workload", "chat", "--dataset", "x.json"],
            &[
                "--url",
                "h:1",
                "--workload",
                "shared-prefix",
                "--dataset",
                "x.json",
            ],
            &["--url", "h:1", "--users", "4"],
        ] {
            assert!(plan(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_title_says_the_workload() {
        let a = parse(&[
            "--url",
            "h:1",
            "--workload",
            "chat",
            "--sessions",
            "2",
            "--input-len",
            "32",
        ]);
        let mut s = a.workload.workload().expect("workload").settings();
        for (k, v) in [
            ("protocol", json!("grpc")),
            ("url", json!("h:1")),
            ("model", json!("m")),
            ("load", json!("closed")),
            ("concurrency", json!(2)),
            ("num_requests", json!(8)),
            ("dataset", json!("random")),
            ("input_len", json!(32)),
            ("output_len", json!(64)),
            ("warmup", json!(0)),
        ] {
            s.insert(k.into(), v);
        }
        let t = title(&s);
        assert!(
            t.contains("8 requests, chat: 2 sessions × 4 turns, 32 in per turn / 64 out"),
            "{t}"
        );
    }

    #[tokio::test]
    async fn chat_sessions_resend_their_history_over_http() {
        use client::openai::tests::{fake_server, sse_response};
        let answer = " Sure, here it is.";
        let stream = sse_response(&[
            &format!(r#"{{"choices":[{{"text":"{answer}"}}]}}"#),
            r#"{"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":1,"total_tokens":10}}"#,
            "[DONE]",
        ]);
        let (url, mut requests) = fake_server(vec![stream; 6]).await;
        let client = OpenAi::connect(&url, "/v1/completions", Some("m".into()), Map::new())
            .await
            .expect("connect");
        let client = Arc::new(Client::OpenAi(client));
        let random = Random::text(dataset::tests::tokenizer()).expect("random");
        let chat = Arc::new(Chat::new(random, 0, (2, 3), 8, 1).expect("chat"));
        let plan = parse(&["--url", &url, "--protocol", "openai", "--concurrency", "2"])
            .plan()
            .expect("plan");
        let progress = Progress::start("test", Goal::Requests(6), false);
        let outcomes = chat_phase(&client, chat, &plan, &progress)
            .await
            .expect("phase");
        assert_eq!(outcomes.len(), 6);
        assert!(outcomes.iter().all(Result::is_ok), "{outcomes:?}");
        let done = progress
            .counts
            .done
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(done, 6);

        let mut by_session = std::collections::BTreeMap::<String, Vec<String>>::new();
        for _ in 0..6 {
            let post = requests.recv().await.expect("request");
            let body: Value = serde_json::from_str(post.split("\r\n\r\n").nth(1).expect("body"))
                .expect("JSON body");
            let user = body["user"].as_str().expect("user").to_string();
            let prompt = body["prompt"].as_str().expect("prompt").to_string();
            by_session.entry(user).or_default().push(prompt);
        }
        assert_eq!(
            by_session.keys().collect::<Vec<_>>(),
            ["session-0", "session-1"]
        );
        for turns in by_session.values() {
            assert_eq!(turns.len(), 3);
            for k in 1..3 {
                let history = format!("{}{answer}", turns[k - 1]);
                assert!(turns[k].starts_with(&history), "{:?}", turns[k]);
                assert!(turns[k].len() > history.len());
            }
        }
        assert_ne!(by_session["session-0"][0], by_session["session-1"][0]);
    }
}
