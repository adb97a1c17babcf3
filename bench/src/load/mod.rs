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
//! Exact token counts are the point of a capacity test, so `--ignore-eos` makes every request
//! generate exactly its `max_tokens` and fails a request that does not; input lengths are exact
//! by construction (token ids over gRPC, text that re-encodes to the asked length over HTTP).
//! The report's token totals are what the server says it processed (its usage).

pub mod arrivals;
pub mod client;
pub mod dataset;
pub mod progress;
pub mod report;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use helios_coordinator::tokenizer::TextTokenizer;
use serde_json::{json, Map, Value};

use arrivals::{Load, Until};
use client::grpc::{Grpc, StepCounters};
use client::openai::OpenAi;
use client::{Client, Record, Sampling};
use dataset::{Dataset, Prompt};
use progress::{Goal, Progress};
use report::{Report, RunInfo, Slo};

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

    /// Requests measured [default: 16 unless --duration].
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

    /// Random prompts: tokens per prompt [default: 64].
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

/// The validated shape of a run.
struct Plan {
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
        let until = match (self.num_requests, self.duration) {
            (Some(0), _) => bail!("--num-requests must be positive"),
            (Some(n), None) => Until::Requests(n),
            (None, Some(s)) if s.is_finite() && s > 0.0 => {
                Until::Elapsed(Duration::from_secs_f64(s))
            }
            (None, Some(_)) => bail!("--duration must be a positive number of seconds"),
            (None, None) => Until::Requests(DEFAULT_REQUESTS),
            (Some(_), Some(_)) => bail!("give --num-requests or --duration, not both"),
        };
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
        Ok(Plan {
            load,
            until,
            slo: Slo::parse(&self.slo)?,
            sampling: Sampling {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                ignore_eos: self.ignore_eos,
            },
            seed: self.seed.unwrap_or(0),
            timeout: Duration::from_secs_f64(self.request_timeout),
            extra_body,
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

    /// The prompts: ShareGPT, or random ids (gRPC) or text (OpenAI) of exact length.
    fn dataset(&self, plan: &Plan, client: &Client) -> Result<Dataset> {
        let output_len = self.output_len.unwrap_or(DEFAULT_LEN);
        if let Some(path) = &self.dataset {
            let needed = match plan.until {
                Until::Requests(n) => n,
                Until::Elapsed(_) => DURATION_POOL,
            } + self.warmup;
            return Dataset::sharegpt(
                path,
                &*self.load_tokenizer()?,
                self.output_len,
                needed,
                plan.seed,
            );
        }
        let input_len = self.input_len.unwrap_or(DEFAULT_LEN);
        match client {
            Client::Grpc(g) => {
                Dataset::random_ids(plan.seed, input_len, output_len, g.info.vocab_size)
            }
            Client::OpenAi(_) => {
                Dataset::random_text(plan.seed, input_len, output_len, self.load_tokenizer()?)
            }
        }
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
        });
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
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
    let lengths = if v("dataset") == "random" {
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
                Ok(prompt) => tokio::time::timeout(timeout, client.send(i, &prompt, &sampling))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "no complete answer within {} s",
                            timeout.as_secs_f64()
                        ))
                    }),
            };
            counts.record(outcome.is_ok());
            outcome
        }
    })
    .await
}

pub async fn run(a: LoadArgs) -> Result<()> {
    let plan = a.plan()?;
    let client = match a.protocol {
        Protocol::Grpc => Client::Grpc(Grpc::connect(&a.url, connections(&plan.load)).await?),
        Protocol::Openai => Client::OpenAi(
            OpenAi::connect(
                &a.url,
                &a.endpoint,
                a.model.clone(),
                plan.extra_body.clone(),
            )
            .await?,
        ),
    };
    let dataset = a.dataset(&plan, &client)?;
    let settings = a.settings(&plan, &client, &dataset);
    let (client, dataset) = (Arc::new(client), Arc::new(dataset));
    let show = !a.json && !a.no_progress;
    // Made before the warm-up, so the measured phase starts right after it, on a warm server.
    let prompts = Prompts::new(&dataset, plan.until, false)?;

    if a.warmup > 0 {
        let load = Load::Closed {
            concurrency: a.concurrency.unwrap_or(a.warmup).clamp(1, a.warmup),
        };
        let until = Until::Requests(a.warmup);
        let prompts = Prompts::new(&dataset, until, true)?;
        let progress = Progress::start("warm-up", Goal::Requests(a.warmup), show);
        let out = phase(&client, prompts, &plan, &load, until, &progress).await;
        progress.finish().await;
        if let Some(e) = out?.into_iter().find_map(Result::err) {
            bail!("a warm-up request failed: {e}");
        }
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
    let outcomes = phase(&client, prompts, &plan, &plan.load, plan.until, &progress).await;
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
}
