//! `helios`: the coordinator's command line.
//!
//! - `helios serve` spawns `--dp` tensor-parallel replicas of `--tp` worker processes and
//!   serves the gRPC API and the OpenAI-compatible HTTP API.
//! - `helios coordinator` serves the same APIs over workers started separately (listed, one
//!   `--workers` list per replica, or registered in etcd, where replicas come and go).
//! - `helios drain` marks a replica of an etcd cluster to drain and leave (or to join again).
//! - `helios generate` streams one answer to the terminal: from a running server with `--addr`,
//!   or from a replica it spawns for the occasion.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use futures::{Stream, StreamExt};
use helios_coordinator::access::Access;
use helios_coordinator::admission::{
    RequestCaps, DEFAULT_MAX_CHOICE_TOKENS, DEFAULT_MAX_STOP_STRINGS,
};
use helios_coordinator::constraint::{
    GrammarOptions, DEFAULT_CACHE_ENTRIES, DEFAULT_COMPILE_TIMEOUT_SECS,
};
use helios_coordinator::front_door::{CallContext, FrontDoor, ServingOptions};
use helios_coordinator::listener::{
    ApiOptions, TlsFiles, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_STREAMS_PER_CONNECTION,
    DEFAULT_READ_TIMEOUT,
};
use helios_coordinator::membership::local::{resolve_model_path, LocalDevice, LocalOptions};
use helios_coordinator::membership::{
    discovery, EtcdOptions, FixedAddresses, LocalWorkers, Membership,
};
use helios_coordinator::output::{finish_name, ResponseStream};
use helios_coordinator::replica::{RecoveryOptions, ReplicaOptions, ReplicaState};
use helios_coordinator::router::{Policy, RouterOptions, DEFAULT_BALANCE, DEFAULT_FAILOVER_AFTER};
use helios_coordinator::scheduler::{
    SchedulerConfig, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_MAX_RUNNING, DEFAULT_MAX_WAITING,
};
use helios_coordinator::sharded_client::{InitOptions, LoadFormat};
use helios_coordinator::tokenizer::TextTokenizer;
use helios_coordinator::{grpc, openai, shutdown};
use helios_proto::auth::{client_endpoint, Authorize, ClusterSecret, CLUSTER_SECRET_ENV};
use helios_proto::membership::{
    model_fingerprint, EtcdArgs, EtcdClient, RankKey, DEFAULT_RPC_TIMEOUT,
};
use helios_proto::telemetry::{LogDefault, LogFormat, Telemetry};
use helios_proto::v1::generation_client::GenerationClient;
use helios_proto::v1::{
    ChatMessage, FinishReason, GenerateRequest, GenerateResponse, GenerationParameters,
    TokenizeRequest,
};
use helios_proto::{DEFAULT_BLOCK_SIZE, DEFAULT_KV_CACHE_MIB};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The default model, as `scripts/fetch-model.sh` places it.
const DEFAULT_MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(Parser)]
#[command(name = "helios", version, about = "Tensor-parallel LLM serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines on stderr as `text` or `json` (one object per line), for this process and the
    /// workers it spawns; `RUST_LOG` filters. Spans are exported over OTLP when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
    #[arg(long, global = true, default_value = "text")]
    log_format: LogFormat,
}

/// How this process reports itself, handed to what it starts.
#[derive(Clone, Copy)]
struct Observe {
    log_format: LogFormat,
    /// Spans are exported.
    tracing: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the gRPC and HTTP APIs from a tensor-parallel replica of worker processes spawned
    /// here.
    Serve(ServeArgs),
    /// Serve the gRPC and HTTP APIs from `helios-worker` processes started separately.
    Coordinator(CoordinatorArgs),
    /// Mark a replica of an etcd cluster to drain: its coordinator stops sending it requests,
    /// lets those it holds finish, and lets its workers go (`--undo`: it may join again).
    Drain(DrainArgs),
    /// Stream the answer to one prompt: from a server (`--addr`) or a replica spawned here.
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
    /// Load quantized GGUF weights as f32 (exact arithmetic; slower).
    #[arg(long)]
    dequantize: bool,
    /// `dummy`: random weights shaped by the model's config.json (`--model` names it or its
    /// directory), as real ones would be laid out on the device; for benchmarks and memory
    /// checks without the weights. Without a tokenizer.json beside it, text is the words
    /// w0 .. w{vocab-1}.
    #[arg(long, value_enum, default_value_t = LoadFormat::Auto)]
    load_format: LoadFormat,
    /// KV cache budget per rank, in MiB.
    #[arg(long, default_value_t = DEFAULT_KV_CACHE_MIB)]
    kv_cache_memory: u64,
    /// Fixed number of KV blocks (overrides --kv-cache-memory).
    #[arg(long, default_value_t = 0)]
    num_kv_blocks: u32,
    #[arg(long, default_value_t = DEFAULT_BLOCK_SIZE)]
    block_size: u32,
    /// Token budget of one step (chunked prefill reads prompts in pieces of at most this).
    #[arg(long, default_value_t = DEFAULT_MAX_BATCH_TOKENS)]
    max_batch_tokens: usize,
    /// Most sequences in one step.
    #[arg(long, default_value_t = DEFAULT_MAX_RUNNING)]
    max_running: usize,
    /// Most requests waiting for a place; beyond it new requests get RESOURCE_EXHAUSTED.
    #[arg(long, default_value_t = DEFAULT_MAX_WAITING)]
    max_waiting: usize,
    /// Recompute every prompt instead of reusing the KV of cached prefixes.
    #[arg(long)]
    no_prefix_caching: bool,
    /// Plan each step only after the previous one is answered (the ranks idle meanwhile);
    /// for comparison with the default overlap.
    #[arg(long)]
    no_overlap: bool,
    /// Put each request's prompt text in its log line (off by default: prompts may be private).
    #[arg(long)]
    log_prompts: bool,
    /// Seconds requests wait for a lost worker to be replaced; then they are answered
    /// UNAVAILABLE (the replica keeps trying and serves again once rebuilt).
    #[arg(long, default_value_t = 60.0)]
    recovery_timeout: f64,
    /// Seconds a step may take before its ranks are taken for lost even though they answer
    /// health probes (a stopped or unreachable worker is found within seconds anyway).
    #[arg(long, default_value_t = 300.0)]
    step_timeout: f64,
    /// How a request's replica is chosen, with several: the one holding the longest cached
    /// prefix of its prompt (within --router-balance), the least loaded, or each in turn.
    #[arg(long, value_enum, default_value_t = Policy::CacheAware)]
    router: Policy,
    /// cache-aware: requests a replica may hold beyond the least loaded one and still be chosen
    /// for its cached prefix.
    #[arg(long, default_value_t = DEFAULT_BALANCE)]
    router_balance: usize,
    /// With several replicas: seconds a replica may spend recovering from a lost worker before
    /// it gets no new requests and its own move to other replicas (tokens kept).
    #[arg(long, default_value_t = DEFAULT_FAILOVER_AFTER.as_secs_f64())]
    failover_after: f64,
    /// Longest prompt a request may have, in tokens (default: what the model and KV cache hold).
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Most tokens a request may ask to generate (default: what the model and KV cache hold).
    #[arg(long)]
    max_new_tokens_limit: Option<usize>,
    /// Most stop strings per request.
    #[arg(long, default_value_t = DEFAULT_MAX_STOP_STRINGS)]
    max_stop_strings: usize,
    /// Structured outputs: seconds a request's JSON Schema, regex or grammar may take to
    /// compile; a slower one is refused (INVALID_ARGUMENT).
    #[arg(long, default_value_t = DEFAULT_COMPILE_TIMEOUT_SECS as f64)]
    grammar_compile_timeout: f64,
    /// Structured outputs: compiled grammars kept in memory for reuse (0: none).
    #[arg(long, default_value_t = DEFAULT_CACHE_ENTRIES)]
    grammar_cache_size: usize,
    /// Most tokens one request's choices may generate together: `best_of` (or `n`) ×
    /// `max_new_tokens`.
    #[arg(long, default_value_t = DEFAULT_MAX_CHOICE_TOKENS)]
    max_choice_tokens: usize,
}

impl ReplicaArgs {
    fn init_options(&self) -> InitOptions {
        InitOptions {
            model_path: self.model.to_string_lossy().into_owned(),
            block_size: self.block_size,
            num_kv_blocks: self.num_kv_blocks,
            kv_cache_memory_bytes: self.kv_cache_memory << 20,
            dequantize: self.dequantize,
            load_format: self.load_format,
            auth: Authorize::default(),
        }
    }

    /// How to serve; `several`: there may be more than one replica (failover is on).
    fn serving_options(&self, observe: Observe, several: bool) -> ServingOptions {
        ServingOptions {
            router: RouterOptions {
                policy: self.router,
                balance: self.router_balance,
                failover_after: several.then(|| seconds(self.failover_after)),
            },
            model_name: self.model.to_string_lossy().into_owned(),
            replica: ReplicaOptions {
                scheduler: SchedulerConfig {
                    max_batch_tokens: self.max_batch_tokens,
                    max_running: self.max_running,
                    max_waiting: self.max_waiting,
                    prefix_caching: !self.no_prefix_caching,
                },
                overlap: !self.no_overlap,
                tracing: observe.tracing,
                recovery: RecoveryOptions {
                    step_timeout: seconds(self.step_timeout),
                    recovery_timeout: seconds(self.recovery_timeout),
                },
            },
            log_prompts: self.log_prompts,
            caps: RequestCaps {
                max_prompt_tokens: self.max_prompt_tokens,
                max_new_tokens: self.max_new_tokens_limit,
                max_stop_strings: self.max_stop_strings,
                max_choice_tokens: self.max_choice_tokens,
            },
            grammars: GrammarOptions {
                compile_timeout: seconds(self.grammar_compile_timeout),
                cache_entries: self.grammar_cache_size,
            },
        }
    }
}

/// A duration of `s` seconds; negative or NaN is zero, huge is capped.
fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

/// Worker processes spawned on this host.
#[derive(Args, Clone)]
struct SpawnArgs {
    #[command(flatten)]
    replica: ReplicaArgs,
    /// Tensor-parallel degree: worker processes per replica.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Data-parallel degree: replicas, each of --tp workers, behind the router.
    #[arg(long, default_value_t = 1)]
    dp: usize,
    /// Compute threads per worker (default: the cores divided among the workers).
    #[arg(long)]
    threads_per_worker: Option<usize>,
    /// Times a lost worker is spawned again, per rank, before the replica gives up on it.
    #[arg(long, default_value_t = 10)]
    max_worker_restarts: u32,
    /// Where the workers compute: `cpu`, or `cuda` for one GPU each (rank r of replica d on
    /// `cuda:{d * tp + r}`, so `--dp 2 --tp 4` takes GPUs 0 to 7).
    #[arg(long, default_value = "cpu")]
    device: LocalDevice,
}

#[derive(Args)]
struct ListenArgs {
    #[arg(long, default_value = "0.0.0.0")]
    host: std::net::IpAddr,
    /// gRPC port (0 picks a free one; the bound address is printed).
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Port of the OpenAI-compatible HTTP API and /health, on the same host (0 picks a free
    /// one; the bound address is printed).
    #[arg(long, default_value_t = 8080)]
    http_port: u16,
    /// Seconds requests in flight get to finish after SIGTERM/SIGINT before they are cancelled.
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace: f64,
    /// Serve both APIs over TLS with this PEM certificate (chain) ...
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// ... and this PEM private key.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: clients must present a certificate signed by this PEM CA.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// API keys, one per line (`#` comments): every request but health checks (and /metrics)
    /// must carry one as `authorization: Bearer <key>`. `$HELIOS_API_KEY` (comma-separated)
    /// adds more. Without either, the APIs are open.
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// `/metrics` needs an API key too.
    #[arg(long)]
    protect_metrics: bool,
    /// Open connections per API port at most; more are closed as they arrive.
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS)]
    max_connections: usize,
    /// Concurrent requests per HTTP/2 connection (gRPC or HTTP) at most.
    #[arg(long, default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION)]
    max_streams_per_connection: u32,
    /// Seconds an HTTP client may take to send its headers, and its body.
    #[arg(long, default_value_t = DEFAULT_READ_TIMEOUT.as_secs_f64())]
    read_timeout: f64,
}

impl ListenArgs {
    fn api_options(&self) -> Result<ApiOptions> {
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.tls_client_ca.clone(),
            }),
            _ => None,
        };
        let opts = ApiOptions {
            access: Access::load(self.api_key_file.as_deref(), self.protect_metrics)?,
            tls,
            max_connections: self.max_connections,
            max_streams_per_connection: self.max_streams_per_connection.max(1),
            read_timeout: seconds(self.read_timeout),
        };
        // Fail at start, not at the first connection.
        opts.listen(&[])?;
        Ok(opts)
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    spawn: SpawnArgs,
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(Args)]
struct CoordinatorArgs {
    /// The model, as this process reads it for its tokenizer and as the workers read it.
    #[command(flatten)]
    replica: ReplicaArgs,
    /// gRPC addresses of one replica's workers, in rank order (`host:port,host:port,...`);
    /// repeat for each replica. Names are resolved at every connect.
    #[arg(long, required_unless_present = "etcd", conflicts_with = "etcd")]
    workers: Vec<String>,
    /// etcd endpoints (`http://host:port,...`): find the workers there instead, as they
    /// register (`helios-worker --etcd`); every replica of the cluster is served as it
    /// registers, and leaves when marked to (`helios drain`).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_security: EtcdArgs,
    /// The cluster's name in etcd (keys under `/helios/CLUSTER/`).
    #[arg(long, default_value = "helios")]
    cluster: String,
    /// Ranks per replica (etcd mode; static mode counts each `--workers` list).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// etcd mode: replicas to wait for before serving, 1 by default (more join as they
    /// register). Static mode: the number of `--workers` lists, if given.
    #[arg(long)]
    dp: Option<usize>,
    /// A file holding the cluster secret the workers were started with (default:
    /// `$HELIOS_CLUSTER_SECRET`).
    #[arg(long)]
    cluster_secret_file: Option<PathBuf>,
    /// The workers run without a cluster secret (`helios-worker --insecure`).
    #[arg(long)]
    insecure: bool,
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(Args)]
struct DrainArgs {
    #[arg(long, value_delimiter = ',', required = true)]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_security: EtcdArgs,
    #[arg(long, default_value = "helios")]
    cluster: String,
    #[arg(long)]
    replica: u32,
    /// Remove the mark instead: the replica joins again once its ranks are registered.
    #[arg(long)]
    undo: bool,
}

#[derive(Args)]
struct GenerateArgs {
    /// A running server (`host:port`, or `https://host:port` over TLS); without it, a replica
    /// is spawned for this prompt.
    #[arg(long)]
    addr: Option<String>,
    /// With `https://`: trust the server's certificate if this PEM CA signed it (default: the
    /// public web's roots).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
    /// The API key to send (`authorization: Bearer`), if the server wants one.
    #[arg(long, env = "HELIOS_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(flatten)]
    spawn: SpawnArgs,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: u32,
    /// Wrap the prompt in the model's chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: i32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Stop when the text contains this string (repeatable); the string is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Print one JSON object (prompt_ids, generated_ids, logprobs, text, finish_reason, usage).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    spawn: SpawnArgs,
    /// Comma-separated token ids.
    #[arg(long, value_delimiter = ',')]
    ids: Vec<u32>,
    /// Comma-separated token ids fed after the prompt, one per step.
    #[arg(long, value_delimiter = ',')]
    continuation: Vec<u32>,
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let default = match cli.command {
        Command::Serve(_) | Command::Coordinator(_) => LogDefault::Server,
        Command::Generate(_) | Command::Logits(_) | Command::Drain(_) => LogDefault::Quiet,
    };
    let mut telemetry = match Telemetry::init("helios-coordinator", cli.log_format, default) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    };
    let observe = Observe {
        log_format: cli.log_format,
        tracing: telemetry.exporting(),
    };
    let result = match cli.command {
        Command::Serve(a) => serve(a, observe).await,
        Command::Coordinator(a) => coordinator(a, observe).await,
        Command::Drain(a) => drain(a).await,
        Command::Generate(a) => generate(a, observe).await,
        Command::Logits(a) => logits(a, observe).await,
    };
    if let Err(e) = &result {
        match cli.log_format {
            LogFormat::Json => tracing::error!("{e:#}"),
            LogFormat::Text => eprintln!("error: {e:#}"),
        }
    }
    telemetry.shutdown();
    if result.is_err() {
        std::process::exit(1);
    }
}

/// Spawns `--dp` replicas of `--tp` workers and serves them behind a front door (which
/// respawns a lost one); [`FrontDoor::release_workers`] lets them go.
async fn start_serving(a: &SpawnArgs, observe: Observe) -> Result<FrontDoor> {
    if a.dp == 0 {
        bail!("--dp must be at least 1");
    }
    let tokenizer = TextTokenizer::for_serving(&a.replica.model, a.replica.load_format)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = a.tp.max(1) * a.dp;
    let threads = a.threads_per_worker.unwrap_or((cores / workers).max(1));
    let mut init = a.replica.init_options();
    resolve_model_path(&mut init)?;
    // One secret per run: another local cluster's processes cannot reach these workers.
    let secret = ClusterSecret::random()?;
    init.auth = Authorize::cluster(Some(&secret));
    let spawns = (0..a.dp).map(|replica| {
        LocalWorkers::spawn(LocalOptions {
            tp: a.tp,
            device: a.device,
            first_gpu: replica * a.tp,
            threads,
            log_format: observe.log_format,
            max_restarts: a.max_worker_restarts,
            secret: secret.clone(),
        })
    });
    let memberships = futures::future::try_join_all(spawns)
        .await?
        .into_iter()
        .map(Membership::Local)
        .collect();
    let opts = a.replica.serving_options(observe, a.dp > 1);
    FrontDoor::start(memberships, &init, tokenizer, &opts).await
}

/// How long workers spawned here get to exit on their own once let go.
const WORKER_EXIT_GRACE: Duration = Duration::from_secs(5);

async fn listen_and_serve(
    listen: &ListenArgs,
    opts: &ApiOptions,
    front: FrontDoor,
    what: &str,
) -> Result<()> {
    let grpc_listener = shutdown::bind(SocketAddr::new(listen.host, listen.port)).await?;
    let http = shutdown::bind(SocketAddr::new(listen.host, listen.http_port))
        .await
        .with_context(|| format!("binding the HTTP port {}", listen.http_port))?;
    let (grpc_addr, http_addr) = (grpc_listener.local_addr()?, http.local_addr()?);
    let grace = std::time::Duration::from_secs_f64(listen.shutdown_grace.max(0.0));
    // Before the ready line, so that a signal right after it drains rather than kills.
    let drained = shutdown::drain_on_signal(front.clone(), grace);
    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        "serving {what}: gRPC helios.v1.Generation on {grpc_addr}, OpenAI-compatible HTTP on \
         http://{http_addr}/v1, metrics on http://{http_addr}/metrics (Ctrl-C stops)"
    );
    // The machine-readable ready line (tests and scripts wait for it).
    println!("HELIOS_READY grpc={grpc_addr} http={http_addr}");
    std::io::stdout().flush()?;
    tokio::try_join!(
        grpc::serve_until(grpc_listener, front.clone(), opts, drained.clone().wait()),
        openai::serve(http, front, opts, drained.wait()),
    )?;
    Ok(())
}

async fn serve(a: ServeArgs, observe: Observe) -> Result<()> {
    // Bad TLS files or keys fail at once, before the workers load the model.
    let opts = a.listen.api_options()?;
    let front = start_serving(&a.spawn, observe).await?;
    let what = format!(
        "{} at dp {} × tp {}",
        a.spawn.replica.model.display(),
        a.spawn.dp,
        a.spawn.tp
    );
    let served = listen_and_serve(&a.listen, &opts, front.clone(), &what).await;
    // Drained: the workers may exit on their own (sending their last spans) before we do.
    front.release_workers(WORKER_EXIT_GRACE).await;
    served
}

async fn coordinator(a: CoordinatorArgs, observe: Observe) -> Result<()> {
    let api = a.listen.api_options()?;
    let tokenizer = TextTokenizer::for_serving(&a.replica.model, a.replica.load_format)?;
    let mut init = a.replica.init_options();
    init.auth = Authorize::cluster(cluster_secret(&a)?.as_ref());
    if a.etcd.is_empty() {
        let memberships = a
            .workers
            .iter()
            .map(|list| {
                let addrs: Vec<String> = list.split(',').map(str::to_string).collect();
                FixedAddresses::new(&addrs).map(Membership::Static)
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(dp) = a.dp.filter(|&dp| dp != memberships.len()) {
            bail!(
                "--dp {dp}, but {} --workers lists (one per replica)",
                memberships.len()
            );
        }
        let what = format!(
            "{} over {} replicas of {} workers",
            a.replica.model.display(),
            memberships.len(),
            memberships.first().map_or(0, Membership::world_size)
        );
        let opts = a.replica.serving_options(observe, memberships.len() > 1);
        let front = FrontDoor::start(memberships, &init, tokenizer, &opts).await?;
        return listen_and_serve(&a.listen, &api, front, &what).await;
    }
    let model_fingerprint = model_fingerprint(&a.replica.model)?;
    // Each worker loads the model it registered with (checked against ours above).
    init.model_path = String::new();
    let template = EtcdOptions {
        etcd: a.etcd_security.connect(&a.etcd)?,
        cluster: a.cluster.clone(),
        replica: 0,
        world: a.tp,
        model_fingerprint,
        model_path: a.replica.model.display().to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let opts = a.replica.serving_options(observe, true);
    let front = FrontDoor::new(&init, tokenizer, &opts);
    let grace = seconds(a.listen.shutdown_grace);
    discovery::check_credentials(&template.etcd).await?;
    tokio::spawn(discovery::follow(front.clone(), template, grace));
    wait_for_replicas(&front, a.dp.unwrap_or(1)).await;
    let what = format!(
        "{} over the replicas of cluster {:?} (tp {})",
        a.replica.model.display(),
        a.cluster,
        a.tp
    );
    listen_and_serve(&a.listen, &api, front, &what).await
}

/// The workers' secret from `--cluster-secret-file` or the environment; none only if
/// `--insecure` says so.
fn cluster_secret(a: &CoordinatorArgs) -> Result<Option<ClusterSecret>> {
    let secret = ClusterSecret::load(a.cluster_secret_file.as_deref())?;
    match (&secret, a.insecure) {
        (Some(_), true) => bail!("--insecure, but a cluster secret is given"),
        (None, false) => bail!(
            "no cluster secret: pass --cluster-secret-file or set ${CLUSTER_SECRET_ENV} (the \
             workers' own), or --insecure for workers started with --insecure"
        ),
        _ => Ok(secret),
    }
}

/// Waits until `n` replicas serve.
async fn wait_for_replicas(front: &FrontDoor, n: usize) {
    tracing::info!("waiting for {n} replicas to register in etcd and load the model");
    loop {
        let serving = front
            .replicas()
            .iter()
            .filter(|r| r.state() == ReplicaState::Serving)
            .count();
        if serving >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `helios drain`: writes (or deletes) the replica's drain mark.
async fn drain(a: DrainArgs) -> Result<()> {
    helios_proto::membership::validate_cluster(&a.cluster)?;
    let etcd = a.etcd_security.connect(&a.etcd)?;
    let etcd = EtcdClient::connect(&etcd, DEFAULT_RPC_TIMEOUT).await?;
    let key = RankKey::drain_key(&a.cluster, a.replica);
    if a.undo {
        etcd.delete(&key).await?;
        println!("replica {} may join again ({key} deleted)", a.replica);
    } else {
        etcd.put(&key, b"drain".to_vec(), 0).await?;
        println!("replica {} is marked to drain ({key})", a.replica);
    }
    Ok(())
}

type AnyResponseStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse>> + Send>>;

/// Where `helios generate` sends its request: a server, or a front door of its own over
/// workers it spawned (the same path a server's requests take).
enum Backend {
    Remote(GenerationClient<InterceptedService<Channel, Authorize>>),
    /// Over workers spawned for the request.
    Local(FrontDoor),
}

impl Backend {
    async fn tokenize(&mut self, req: TokenizeRequest) -> Result<Vec<u32>> {
        Ok(match self {
            Backend::Remote(c) => {
                let r = c.tokenize(req).await.map_err(status_error)?;
                r.into_inner().token_ids
            }
            Backend::Local(front) => front.tokenize(req.prompt, req.messages).await?,
        })
    }

    async fn generate(&mut self, req: GenerateRequest) -> Result<AnyResponseStream> {
        Ok(match self {
            Backend::Remote(c) => {
                let stream = c.generate_stream(req).await.map_err(status_error)?;
                Box::pin(stream.into_inner().map(|r| r.map_err(status_error)))
            }
            Backend::Local(front) => {
                let rx = front.generate(req, CallContext::default()).await?;
                Box::pin(ResponseStream::new(rx).map(|r| r.map_err(anyhow::Error::from)))
            }
        })
    }
}

/// A client of the server at `addr` (TLS for `https://`), sending `--api-key` if given.
async fn connect(
    addr: &str,
    a: &GenerateArgs,
) -> Result<GenerationClient<InterceptedService<Channel, Authorize>>> {
    let endpoint = client_endpoint(addr, a.tls_ca.as_deref())?;
    let url = endpoint.uri().to_string();
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let auth = Authorize::api_key(a.api_key.as_deref())?;
    Ok(GenerationClient::with_interceptor(channel, auth))
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn generate(a: GenerateArgs, observe: Observe) -> Result<()> {
    let mut backend = match &a.addr {
        Some(addr) => Backend::Remote(connect(addr, &a).await?),
        None => Backend::Local(start_serving(&a.spawn, observe).await?),
    };
    let (prompt, messages) = if a.chat {
        let user = ChatMessage {
            role: "user".into(),
            content: a.prompt.clone(),
        };
        (String::new(), vec![user])
    } else {
        (a.prompt.clone(), Vec::new())
    };
    let prompt_ids = if a.json {
        backend
            .tokenize(TokenizeRequest {
                prompt: prompt.clone(),
                messages: messages.clone(),
            })
            .await?
    } else {
        Vec::new()
    };
    let req = GenerateRequest {
        prompt,
        messages,
        parameters: Some(GenerationParameters {
            max_new_tokens: Some(a.max_new_tokens),
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: Some(a.top_p),
            min_p: a.min_p,
            repetition_penalty: Some(a.repetition_penalty),
            frequency_penalty: a.frequency_penalty,
            presence_penalty: a.presence_penalty,
            seed: a.seed,
            stop: a.stop.clone(),
            ignore_eos: a.ignore_eos,
            logprobs: a.json.then_some(0),
            ..Default::default()
        }),
        ..Default::default()
    };
    let streamed = stream_answer(&a, &mut backend, req, prompt_ids).await;
    if let Backend::Local(front) = &backend {
        front.release_workers(WORKER_EXIT_GRACE).await;
    }
    streamed
}

/// Streams the answer to the terminal (or prints it as one JSON object with `--json`).
async fn stream_answer(
    a: &GenerateArgs,
    backend: &mut Backend,
    req: GenerateRequest,
    prompt_ids: Vec<u32>,
) -> Result<()> {
    let mut stream = backend.generate(req).await?;
    let (mut text, mut ids, mut logprobs) = (String::new(), Vec::new(), Vec::new());
    let mut last = None;
    while let Some(resp) = stream.next().await {
        let resp = resp?;
        if !a.json {
            print!("{}", resp.text);
            std::io::stdout().flush()?;
        }
        text.push_str(&resp.text);
        ids.extend_from_slice(&resp.token_ids);
        logprobs.extend(
            resp.logprobs
                .iter()
                .filter_map(|l| l.sampled.as_ref().map(|s| s.logprob)),
        );
        if resp.finish_reason != FinishReason::Unspecified as i32 {
            last = Some(resp);
            break;
        }
    }
    let last = last.context("the stream ended without a finish reason")?;
    let usage = last.usage.unwrap_or_default();
    if a.json {
        let reason =
            FinishReason::try_from(last.finish_reason).unwrap_or(FinishReason::Unspecified);
        let obj = serde_json::json!({
            "prompt_ids": prompt_ids,
            "generated_ids": ids,
            "logprobs": logprobs,
            "text": text,
            "finish_reason": finish_name(reason),
            "usage": {
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
            },
        });
        println!("{obj}");
    } else {
        println!();
    }
    Ok(())
}

/// Teacher forcing through the serving path: the logits after the prompt, and after each
/// prefix of the continuation, each as a request of one token. They run batched; one admitted
/// after an earlier one's answer takes the shared prefix from the prefix cache.
async fn logits(a: LogitsArgs, observe: Observe) -> Result<()> {
    if a.ids.is_empty() {
        bail!("--ids is empty");
    }
    let front = start_serving(&a.spawn, observe).await?;
    let prompts = (0..=a.continuation.len()).map(|k| [&a.ids[..], &a.continuation[..k]].concat());
    let rows = futures::future::try_join_all(prompts.map(|p| front.next_token_logits(p))).await;
    // Done: the workers' going is no failure.
    front.release_workers(WORKER_EXIT_GRACE).await;
    let rows = rows?;
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
