//! etcd membership: workers register themselves, the coordinator watches.
//!
//! Each `helios-worker --etcd … --cluster C --replica R --rank N --model M` claims
//! `/helios/C/replicas/R/ranks/N` under a lease it keeps alive, with a record of its gRPC and
//! communicator addresses, its model (path and content fingerprint) and its version
//! (`helios_proto::membership`). The coordinator watches its replica's prefix:
//!
//! - it waits until every rank is held by an acceptable worker: one serving the same model
//!   (fingerprint) and version as the coordinator. Another is refused, and the log says why,
//!   naming both models;
//! - a rank whose key goes away (its lease expired: the worker hung or is cut off, or it left)
//!   is lost ([`EtcdMembers::lost`]);
//! - a lost rank is replaced by the next acceptable worker that claims it.
//!
//! An etcd outage stops none of this from serving: the watch keeps its last view, the workers
//! keep their leases alive once etcd is back (etcd renews every lease when it restarts), and
//! the replica's own step streams and health probes still tell a lost rank.

use std::collections::HashSet;

use anyhow::{Context, Result};
use helios_proto::membership::{ClusterWatch, EtcdConnect, Members, WorkerRecord};
use tokio::sync::watch;

/// How a coordinator finds its workers in etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// The endpoints, TLS and credentials.
    pub etcd: EtcdConnect,
    pub cluster: String,
    pub replica: u32,
    /// Ranks in the replica (`--tp`).
    pub world: usize,
    /// The model the coordinator serves, as `helios_proto::membership::model_fingerprint`
    /// gives it, and its path (for messages).
    pub model_fingerprint: String,
    pub model_path: String,
    /// This build's version: workers of another are refused.
    pub version: String,
}

pub struct EtcdMembers {
    /// Boxed: the etcd connection options (TLS material, credentials) are not small.
    opts: Box<EtcdOptions>,
    /// Kept for its task: dropping it stops the watch.
    _watch: ClusterWatch,
    members: watch::Receiver<Members>,
    /// The instance serving each rank now (`None`: not known, or lost).
    current: Vec<Option<String>>,
    /// Instances already refused (each is logged once).
    refused: HashSet<String>,
}

impl EtcdMembers {
    /// Starts watching the replica's prefix.
    pub async fn start(opts: EtcdOptions) -> Result<Self> {
        let watch = ClusterWatch::start(&opts.etcd, &opts.cluster, opts.replica)
            .await
            .with_context(|| format!("watching etcd at {}", opts.etcd.endpoints.join(",")))?;
        let members = watch.members();
        Ok(Self {
            current: vec![None; opts.world],
            opts: Box::new(opts),
            _watch: watch,
            members,
            refused: HashSet::new(),
        })
    }

    pub fn world_size(&self) -> usize {
        self.opts.world
    }

    /// Every rank's address once each is held by an acceptable worker.
    pub async fn addresses(&mut self) -> Result<Vec<String>> {
        loop {
            let members = self.members.borrow_and_update().clone();
            let found: Vec<Option<&WorkerRecord>> = (0..self.opts.world)
                .map(|r| members.get(&(r as u32)).filter(|w| self.acceptable(r, w)))
                .collect();
            if found.iter().all(Option::is_some) {
                let workers: Vec<&WorkerRecord> = found.into_iter().flatten().collect();
                self.current = workers.iter().map(|w| Some(w.instance.clone())).collect();
                return Ok(workers.iter().map(|w| url(&w.grpc_addr)).collect());
            }
            let missing: Vec<usize> = (0..self.opts.world)
                .filter(|r| !members.contains_key(&(*r as u32)))
                .collect();
            tracing::info!(?missing, "waiting for every rank to register in etcd");
            self.members
                .changed()
                .await
                .context("the etcd watch stopped")?;
        }
    }

    /// The address of the next acceptable worker to claim rank `rank` (not the lost one).
    pub async fn replacement(&mut self, rank: usize) -> Result<String> {
        let lost = self.current.get_mut(rank).and_then(Option::take);
        loop {
            let candidate = self
                .members
                .borrow_and_update()
                .get(&(rank as u32))
                .cloned();
            if let Some(w) = candidate {
                if Some(&w.instance) != lost.as_ref() && self.acceptable(rank, &w) {
                    self.current[rank] = Some(w.instance.clone());
                    return Ok(url(&w.grpc_addr));
                }
            }
            self.members
                .changed()
                .await
                .context("the etcd watch stopped")?;
        }
    }

    /// Resolves with a rank whose worker's key went away (lease expired or released).
    pub async fn lost(&mut self) -> usize {
        loop {
            {
                let members = self.members.borrow_and_update();
                for (r, current) in self.current.iter_mut().enumerate() {
                    let held = members.get(&(r as u32)).map(|w| &w.instance);
                    if current.is_some() && held != current.as_ref() {
                        *current = None;
                        return r;
                    }
                }
            }
            if self.members.changed().await.is_err() {
                // The watch is gone: nothing more can be learnt from etcd.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Whether `w` may serve rank `rank` here; a refusal is logged once per worker.
    fn acceptable(&mut self, rank: usize, w: &WorkerRecord) -> bool {
        let o = &self.opts;
        let why = if w.model_fingerprint != o.model_fingerprint {
            format!(
                "it serves model {} (fingerprint {}), this coordinator serves {} ({})",
                w.model_path, w.model_fingerprint, o.model_path, o.model_fingerprint
            )
        } else if w.version != o.version {
            format!(
                "it is version {}, this coordinator {}",
                w.version, o.version
            )
        } else {
            return true;
        };
        if self.refused.insert(w.instance.clone()) {
            tracing::error!(
                rank,
                worker = %w.instance,
                addr = %w.grpc_addr,
                "refusing the worker registered for rank {rank}: {why}"
            );
        }
        false
    }
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}
