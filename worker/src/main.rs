//! `helios-worker`: serves one rank of a model to a coordinator.
//!
//! Started by `helios serve`/`helios generate` (one child process per rank) or by hand / by
//! Kubernetes with static addresses. Prints one line to stdout once it listens, with the
//! addresses the coordinator and its peers reach it at:
//! `HELIOS_WORKER_READY grpc=HOST:PORT comm=HOST:PORT`.
//!
//! Those addresses are advertised, not merely bound: a worker bound to one address is reached
//! at that address; one bound to every interface (`0.0.0.0`, `::`) advertises `--advertise`,
//! else the pod IP from the environment (`POD_IP`, as a Kubernetes downward-API variable),
//! else its hostname. Never `0.0.0.0`, which means nothing to a peer on another host.
//!
//! On the CPU, ranks of one host meet in shared memory, the others over TCP
//! (`helios_worker::comm::ShmCommunicator`); `HELIOS_COMM=tcp` in any rank's environment keeps
//! its whole mesh on TCP (to compare the two; `helios serve` passes it on to its workers).

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::Parser;
use helios_proto::auth::{ClusterSecret, KeySet, RequireBearer, CLUSTER_SECRET_ENV};
use helios_proto::membership::{
    claim, instance_id, model_fingerprint, ClaimError, EtcdArgs, RankKey, Registration,
    WorkerRecord,
};
use helios_proto::signal::shutdown_signal;
use helios_proto::telemetry::{LogDefault, LogFormat, Telemetry};
use helios_proto::v1::worker_server::WorkerServer;
use helios_worker::comm::TcpListenerSlot;
use helios_worker::service::WorkerService;
use tonic::transport::server::TcpIncoming;

#[derive(Parser, Debug)]
#[command(
    name = "helios-worker",
    about = "One tensor-parallel rank of a Helios replica"
)]
struct Args {
    /// gRPC address to serve the coordinator on (port 0: any free port).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Address for the peer-to-peer all-reduce (port 0: any free port); default: the host of
    /// `--listen`, any free port.
    #[arg(long)]
    comm_listen: Option<String>,
    /// The host (name or IP) the coordinator and peers reach this worker at, when it listens
    /// on every interface. Default: `$POD_IP`, else the hostname.
    #[arg(long)]
    advertise: Option<String>,
    /// Compute threads. Default: the CPUs this process may use (its affinity and its
    /// cgroup's CPU quota, as a container's limit sets it). Several workers on one host
    /// should share its cores: give each its part.
    #[arg(long)]
    threads: Option<usize>,
    /// `cpu` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Exit when standard input closes: set by a coordinator that spawns this worker, so the
    /// worker never outlives it.
    #[arg(long)]
    exit_with_stdin: bool,
    /// etcd endpoints (`http://host:port,...`): register there as rank `--rank` of replica
    /// `--replica` of cluster `--cluster`, for a coordinator started with `--etcd` to find.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    #[command(flatten)]
    etcd_security: EtcdArgs,
    #[arg(long, default_value = "helios")]
    cluster: String,
    #[arg(long, default_value_t = 0)]
    replica: u32,
    /// This worker's rank in its replica (etcd mode).
    #[arg(long)]
    rank: Option<u32>,
    /// Instead of `--replica` and `--rank` (etcd mode): this worker's place among all the
    /// cluster's workers, e.g. a StatefulSet pod's index. With `--tp` ranks per replica it is
    /// rank `index % tp` of replica `index / tp`, so a restarted pod claims its old rank.
    #[arg(long, requires = "tp", conflicts_with_all = ["rank", "replica"])]
    worker_index: Option<u32>,
    /// Ranks per replica, for `--worker-index`.
    #[arg(long, requires = "worker_index")]
    tp: Option<u32>,
    /// The model this worker serves (etcd mode: registered with its fingerprint, and loaded
    /// when the coordinator names none).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Seconds the etcd lease lives without a renewal: a worker that hangs or is cut off is
    /// taken for lost after this. A worker whose rank is held waits this long (and 2 s more)
    /// for the holder's lease to run out, then gives up, naming the holder.
    #[arg(long, default_value_t = 5)]
    lease_ttl: u64,
    /// A file holding the cluster secret the coordinator and every worker share (default:
    /// `$HELIOS_CLUSTER_SECRET`): calls without it are refused (UNAUTHENTICATED), and peers
    /// that cannot prove it never join the communicator. Generate one with `openssl rand -hex 32`.
    #[arg(long)]
    cluster_secret_file: Option<std::path::PathBuf>,
    /// Run without a cluster secret: anyone who reaches this worker's ports can drive it. Only
    /// on a network where nothing else can.
    #[arg(long)]
    insecure: bool,
    /// `text` or `json` (one object per line) on stderr; `RUST_LOG` filters.
    #[arg(long, default_value = "text")]
    log_format: LogFormat,
}

fn parse_device(s: &str) -> Result<Device> {
    if s == "cpu" {
        return Ok(Device::Cpu);
    }
    if let Some(n) = s.strip_prefix("cuda:") {
        let n: usize = n.parse().with_context(|| format!("bad device {s:?}"))?;
        return Device::new_cuda(n).with_context(|| format!("opening {s}"));
    }
    bail!("unknown device {s:?} (cpu or cuda:N)")
}

/// `--threads`, else the CPUs this process may use: the standard library's count honours the
/// affinity mask and the cgroup's CPU quota (`cpu.max`), which is what a container limit sets.
fn compute_threads(flag: Option<usize>) -> Result<usize> {
    match flag {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => Ok(n),
        None => Ok(std::thread::available_parallelism().map_or(1, |n| n.get())),
    }
}

/// The address others reach a listener bound at `bound` at: `bound` itself when it names one
/// address; for every interface, `advertise`, else `$POD_IP`, else the hostname.
fn advertised(bound: SocketAddr, advertise: Option<&str>) -> Result<String> {
    let host = match advertise {
        Some(h) if !h.is_empty() => h.to_string(),
        _ if !bound.ip().is_unspecified() => bound.ip().to_string(),
        _ => match std::env::var("POD_IP") {
            Ok(ip) if !ip.is_empty() => ip,
            _ => hostname()?,
        },
    };
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]") // an IPv6 address
    } else {
        host
    };
    Ok(format!("{host}:{}", bound.port()))
}

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .context("this worker listens on every interface and knows no name to advertise: pass --advertise")?;
    let name = name.trim();
    if name.is_empty() {
        bail!("the hostname is empty: pass --advertise");
    }
    Ok(name.to_string())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let threads = compute_threads(args.threads)?;
    // Before anything starts a thread pool: candle's and rayon's pools both read it.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    // Spans go out over OTLP only when OTEL_EXPORTER_OTLP_ENDPOINT is set (helios_proto::telemetry).
    let telemetry = Telemetry::init("helios-worker", args.log_format, LogDefault::Server)?;
    let device = parse_device(&args.device)?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let grpc_bound = listener.local_addr()?;
    let comm_listen = args
        .comm_listen
        .clone()
        .unwrap_or_else(|| SocketAddr::new(grpc_bound.ip(), 0).to_string());
    let secret = cluster_secret(&args)?;
    let slot = TcpListenerSlot::bind(&comm_listen, secret.clone())?;
    let comm_bound = slot.local_addr()?;
    let grpc_addr = advertised(grpc_bound, args.advertise.as_deref())?;
    let comm_addr = advertised(comm_bound, args.advertise.as_deref())?;
    tracing::info!(%grpc_addr, %comm_addr, threads, "listening");
    let mut service = WorkerService::new(slot, comm_addr.clone(), device);
    if let Some(model) = &args.model {
        service = service.with_model(model.to_string_lossy().into_owned());
    }
    let registration = if args.etcd.is_empty() {
        None
    } else {
        Some(register(&args, &grpc_addr, &comm_addr).await?)
    };
    println!("HELIOS_WORKER_READY grpc={grpc_addr} comm={comm_addr}");
    std::io::stdout().flush()?;
    if args.exit_with_stdin {
        let flush = telemetry.flusher();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            flush();
            std::process::exit(0);
        });
    }
    let cluster_only = RequireBearer::new(
        secret.map(|s| KeySet::new([s.rpc_token()])),
        &[],
        "the cluster secret",
    );
    let server = tonic::transport::Server::builder()
        .layer(cluster_only)
        .add_service(
            WorkerServer::new(service)
                .max_decoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES)
                .max_encoding_message_size(helios_proto::MAX_WORKER_MESSAGE_BYTES),
        )
        .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true)));
    let exit_with_stdin = args.exit_with_stdin;
    let stop = async move {
        if exit_with_stdin {
            // Spawned by a coordinator, which owns this process's life through its stdin: a
            // Ctrl-C sent to the whole terminal must not cut the coordinator's drain short.
            loop {
                shutdown_signal().await;
            }
        }
        shutdown_signal().await;
    };
    // No graceful drain: the coordinator's step stream never ends on its own, and a worker
    // told to stop (a pod deleted, Ctrl-C) is a lost rank its replica recovers from anyway.
    tokio::select! {
        served = server => served?,
        () = stop => tracing::info!("signalled to stop: leaving the replica"),
    }
    if let Some(registration) = registration {
        // Leaving on purpose: the rank is free at once, not when the lease runs out, so the
        // coordinator notices now and a replacement claims the rank without waiting.
        match tokio::time::timeout(RELEASE_TIMEOUT, registration.release()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("releasing the etcd registration: {e:#}"),
            Err(_) => tracing::warn!("etcd did not answer the release; the lease will run out"),
        }
    }
    // Exit now rather than wait for a forward pass in flight on the blocking pool.
    telemetry.flusher()();
    std::process::exit(0)
}

/// How long a stopping worker waits for etcd to free its rank.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(2);

/// This worker's (replica, rank) in etcd mode: `--replica`/`--rank`, or `--worker-index`
/// split by `--tp`.
fn place(args: &Args) -> Result<(u32, u32)> {
    match (args.worker_index, args.tp) {
        (Some(_), Some(0)) => bail!("--tp must be at least 1"),
        (Some(index), Some(tp)) => Ok((index / tp, index % tp)),
        _ => Ok((
            args.replica,
            args.rank.context("--etcd needs --rank or --worker-index")?,
        )),
    }
}

/// The cluster secret from `--cluster-secret-file` or the environment; none only if
/// `--insecure` says so.
fn cluster_secret(args: &Args) -> Result<Option<ClusterSecret>> {
    let secret = ClusterSecret::load(args.cluster_secret_file.as_deref())?;
    match (&secret, args.insecure) {
        (Some(_), true) => bail!("--insecure, but a cluster secret is given"),
        (None, false) => bail!(
            "no cluster secret: pass --cluster-secret-file or set ${CLUSTER_SECRET_ENV} (the same \
             as the coordinator's), or --insecure on a network nothing else can reach"
        ),
        (None, true) => tracing::warn!(
            "--insecure: this worker takes calls and communicator peers from anyone who reaches it"
        ),
        (Some(_), false) => {}
    }
    Ok(secret)
}

/// Claims this worker's rank in etcd (see `helios_proto::membership`): the claim fails if
/// another worker holds the rank, saying which.
async fn register(args: &Args, grpc_addr: &str, comm_addr: &str) -> Result<Registration> {
    let (replica, rank) = place(args)?;
    let model = args.model.as_ref().context("--etcd needs --model")?;
    let key = RankKey::new(&args.cluster, replica, rank)?;
    let etcd = args.etcd_security.connect(&args.etcd)?;
    let record = WorkerRecord {
        grpc_addr: grpc_addr.to_string(),
        comm_addr: comm_addr.to_string(),
        model_path: model.display().to_string(),
        model_fingerprint: model_fingerprint(model)?,
        version: env!("CARGO_PKG_VERSION").to_string(),
        instance: instance_id(),
    };
    let ttl = Duration::from_secs(args.lease_ttl.max(1));
    // A rank held by a worker that just died frees itself when that worker's lease runs out:
    // a replacement started at once waits that long, then gives up on a holder that is alive.
    let patience = ttl + CLAIM_GRACE;
    let started = std::time::Instant::now();
    let registration = loop {
        match claim(&etcd, key.clone(), record.clone(), ttl).await {
            Err(ClaimError::Taken { holder, .. }) if started.elapsed() < patience => {
                tracing::info!(holder = %holder.instance, "rank {rank} is held; waiting for its lease");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => break other?,
        }
    };
    tracing::info!(rank, replica, cluster = %args.cluster, "registered in etcd");
    Ok(registration)
}

/// How much longer than its own lease a worker waits for a held rank to be freed.
const CLAIM_GRACE: Duration = Duration::from_secs(2);
