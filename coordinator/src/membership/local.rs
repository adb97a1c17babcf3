//! Local membership: a replica's workers as child processes on this host (`helios serve --tp
//! N`, `helios generate` without `--addr`).
//!
//! Each child binds free ports and announces them on its first stdout line; its stdin is a pipe
//! it watches, so a worker never outlives the coordinator that spawned it, even one killed with
//! SIGKILL. Children are killed when this handle is dropped. A lost rank is killed for good (a
//! stopped process would still hold its ports and its peers' sockets) and spawned again: at
//! once the first time, then after a backoff that doubles with each restart of that rank, at
//! most `max_restarts` times.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use helios_proto::auth::{ClusterSecret, CLUSTER_SECRET_ENV};
use helios_proto::telemetry::LogFormat;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::sharded_client::InitOptions;

/// How long a spawned worker may take to announce its ports.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The second restart's backoff (the first is immediate); it doubles with each further
/// restart of the same rank, up to the cap.
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Where spawned workers compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LocalDevice {
    Cpu,
    /// One GPU per worker, numbered from [`LocalOptions::first_gpu`] by rank.
    Cuda,
}

/// How local workers are started.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    pub tp: usize,
    pub device: LocalDevice,
    /// With [`LocalDevice::Cuda`]: rank r computes on `cuda:{first_gpu + r}`.
    pub first_gpu: usize,
    /// Compute threads per worker (`helios-worker --threads`).
    pub threads: usize,
    pub log_format: LogFormat,
    /// Restarts allowed per rank over the replica's life.
    pub max_restarts: u32,
    /// The secret the workers are started with (in their environment, never on their command
    /// line): one per `helios serve`, made at random, so two local clusters cannot cross.
    pub secret: ClusterSecret,
}

pub struct LocalWorkers {
    binary: PathBuf,
    opts: LocalOptions,
    /// By rank; `None` while a rank is being replaced. Dropping a child kills it
    /// (`kill_on_drop`); [`LocalWorkers::stop`] lets them exit.
    children: Vec<Option<Child>>,
    /// gRPC address of each rank's worker.
    addrs: Vec<String>,
    restarts: Vec<u32>,
}

/// The `helios-worker` binary: `$HELIOS_WORKER_BIN`, else next to the running executable.
pub fn worker_binary() -> Result<PathBuf> {
    if let Ok(p) = std::env::var("HELIOS_WORKER_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let dir = exe.parent().context("the executable has no folder")?;
    for candidate in [dir.join("helios-worker"), dir.join("../helios-worker")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "helios-worker not found next to {} (build it with `cargo build --bins`, or set HELIOS_WORKER_BIN)",
        exe.display()
    )
}

/// The model path as local workers see it: checked, and absolute.
pub fn resolve_model_path(init: &mut InitOptions) -> Result<()> {
    let model = Path::new(&init.model_path);
    if !model.exists() {
        bail!(
            "model {} not found (fetch the default model with scripts/fetch-model.sh)",
            model.display()
        );
    }
    init.model_path = std::fs::canonicalize(model)
        .with_context(|| format!("resolving {}", model.display()))?
        .to_string_lossy()
        .into_owned();
    Ok(())
}

impl LocalWorkers {
    /// Starts `opts.tp` workers and waits until each announces its ports.
    pub async fn spawn(opts: LocalOptions) -> Result<Self> {
        if opts.tp == 0 {
            bail!("tp must be at least 1");
        }
        let binary = worker_binary()?;
        let mut workers = Self {
            binary,
            children: (0..opts.tp).map(|_| None).collect(),
            addrs: vec![String::new(); opts.tp],
            restarts: vec![0; opts.tp],
            opts,
        };
        for rank in 0..workers.opts.tp {
            workers.start(rank).await?;
        }
        Ok(workers)
    }

    pub fn world_size(&self) -> usize {
        self.addrs.len()
    }

    pub fn addresses(&self) -> Vec<String> {
        self.addrs.clone()
    }

    /// Kills rank `rank`'s process if it still runs, then starts a new one after the backoff,
    /// again until one starts or the rank's restarts run out.
    pub async fn respawn(&mut self, rank: usize) -> Result<String> {
        if let Some(mut old) = self.children.get_mut(rank).and_then(Option::take) {
            let _ = old.start_kill();
            let _ = old.wait().await;
        }
        loop {
            let restarts = self
                .restarts
                .get_mut(rank)
                .with_context(|| format!("no rank {rank}"))?;
            if *restarts >= self.opts.max_restarts {
                bail!(
                    "rank {rank} was restarted {} times, the limit (--max-worker-restarts)",
                    self.opts.max_restarts
                );
            }
            // The first restart at once (a lost worker is usually a one-off); then backing off,
            // so a worker that cannot start does not spin.
            let backoff = match *restarts {
                0 => Duration::ZERO,
                n => FIRST_BACKOFF
                    .saturating_mul(1 << (n - 1).min(16))
                    .min(MAX_BACKOFF),
            };
            *restarts += 1;
            tracing::warn!(rank, "restarting the worker in {backoff:?}");
            tokio::time::sleep(backoff).await;
            match self.start(rank).await {
                Ok(()) => return Ok(self.addrs[rank].clone()),
                Err(e) => tracing::warn!(rank, "the restarted worker failed: {e:#}"),
            }
        }
    }

    /// Rank `rank`'s `helios-worker --device`.
    fn device(&self, rank: usize) -> String {
        match self.opts.device {
            LocalDevice::Cpu => "cpu".to_string(),
            LocalDevice::Cuda => format!("cuda:{}", self.opts.first_gpu + rank),
        }
    }

    /// Starts rank `rank`'s process and reads its ready line.
    async fn start(&mut self, rank: usize) -> Result<()> {
        let mut cmd = Command::new(&self.binary);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "warn");
        }
        let mut child = cmd
            .env(CLUSTER_SECRET_ENV, self.opts.secret.env_value())
            .arg("--exit-with-stdin")
            .args(["--log-format", self.opts.log_format.as_str()])
            .args(["--threads", &self.opts.threads.to_string()])
            .args(["--device", &self.device(rank)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {} for rank {rank}", self.binary.display()))?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let line = tokio::time::timeout(READY_TIMEOUT, lines.next_line())
            .await
            .with_context(|| format!("rank {rank} did not start within {READY_TIMEOUT:?}"))??
            .with_context(|| format!("rank {rank} exited before it was ready"))?;
        let addr = line
            .strip_prefix("HELIOS_WORKER_READY ")
            .and_then(|rest| {
                rest.split_whitespace()
                    .find_map(|kv| kv.strip_prefix("grpc="))
            })
            .with_context(|| format!("rank {rank}: unexpected first line {line:?}"))?;
        self.addrs[rank] = format!("http://{addr}");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.children[rank] = Some(child);
        Ok(())
    }

    /// Lets the workers exit on their own (their stdin closes: they send the spans they still
    /// hold and exit), then kills those still running after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        let mut children: Vec<Child> = self.children.iter_mut().filter_map(Option::take).collect();
        for child in &mut children {
            drop(child.stdin.take());
        }
        let exits = children.iter_mut().map(|c| c.wait());
        if tokio::time::timeout(grace, futures::future::join_all(exits))
            .await
            .is_err()
        {
            tracing::warn!(
                "workers still running {grace:?} after their stdin closed; killing them"
            );
        }
        // Dropping the children kills any still running (`kill_on_drop`).
    }
}
