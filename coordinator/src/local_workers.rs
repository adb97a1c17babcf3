//! Spawning a replica's workers as child processes on this host (`helios serve --tp N`,
//! `helios generate` without `--addr`).
//!
//! Each child binds free ports and announces them on its first stdout line; its stdin is a pipe
//! it watches, so a worker never outlives the coordinator that spawned it, even one killed with
//! SIGKILL. Children are killed when this handle is dropped.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use helios_proto::telemetry::LogFormat;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::sharded_client::{InitOptions, ShardedClient};

pub struct LocalWorkers {
    /// Dropping the handle kills the children (`kill_on_drop`); [`LocalWorkers::stop`] lets
    /// them exit.
    children: Vec<Child>,
    /// gRPC address of each rank's worker.
    pub addrs: Vec<String>,
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

impl LocalWorkers {
    /// Starts `n` workers, each with `threads` compute threads.
    pub async fn spawn(
        n: usize,
        binary: &Path,
        threads: usize,
        log_format: LogFormat,
    ) -> Result<Self> {
        let mut children = Vec::with_capacity(n);
        let mut addrs = Vec::with_capacity(n);
        for rank in 0..n {
            let mut cmd = Command::new(binary);
            if std::env::var_os("RUST_LOG").is_none() {
                cmd.env("RUST_LOG", "warn");
            }
            let mut child = cmd
                .arg("--exit-with-stdin")
                .args(["--log-format", log_format.as_str()])
                .env("RAYON_NUM_THREADS", threads.to_string())
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting {} for rank {rank}", binary.display()))?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
                .await
                .with_context(|| format!("rank {rank} did not start within 60 s"))??
                .with_context(|| format!("rank {rank} exited before it was ready"))?;
            let addr = line
                .strip_prefix("HELIOS_WORKER_READY ")
                .and_then(|rest| {
                    rest.split_whitespace()
                        .find_map(|kv| kv.strip_prefix("grpc="))
                })
                .with_context(|| format!("rank {rank}: unexpected first line {line:?}"))?;
            addrs.push(format!("http://{addr}"));
            // Keep draining stdout so the child never blocks on a full pipe.
            tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
            children.push(child);
        }
        Ok(Self { children, addrs })
    }

    /// Lets the workers exit on their own (their stdin closes: they send the spans they still
    /// hold and exit), then kills those still running after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        for child in &mut self.children {
            drop(child.stdin.take());
        }
        let exits = self.children.iter_mut().map(|c| c.wait());
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

/// A replica's workers on this host, connected, ready for `Replica::start`.
pub struct LocalReplica {
    /// Dropping this kills the workers.
    pub workers: LocalWorkers,
    pub client: ShardedClient,
    /// How to initialise them: the model path resolved to an absolute one, as they see it.
    pub init: InitOptions,
}

impl LocalReplica {
    /// Spawns `tp` workers with `threads` compute threads each and connects to them.
    pub async fn spawn(
        tp: usize,
        threads: usize,
        mut init: InitOptions,
        log_format: LogFormat,
    ) -> Result<Self> {
        if tp == 0 {
            bail!("tp must be at least 1");
        }
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
        let workers = LocalWorkers::spawn(tp, &worker_binary()?, threads, log_format).await?;
        let client = ShardedClient::connect(&workers.addrs).await?;
        Ok(Self {
            workers,
            client,
            init,
        })
    }
}
