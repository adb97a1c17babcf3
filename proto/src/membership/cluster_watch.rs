//! The coordinator's side of membership: the live view of one replica's workers.
//!
//! [`ClusterWatch::start`] lists the replica's prefix, then watches it from the revision after
//! the listing, so no change between the two is missed. The view, rank → [`WorkerRecord`], is
//! published through a `tokio::sync::watch` channel: readers take the latest view and can wait
//! for the next change, without locks.
//!
//! Keys and values come from etcd, where anyone with access may write: a key that is not a
//! rank key, or a value that is not a worker record, is logged and skipped (a rank whose value
//! turns malformed leaves the view), never a panic.
//!
//! **It survives an etcd outage**: while etcd is unreachable the last view stays published
//! (the workers are most likely still serving) and [`ClusterWatch::connected`] reads false;
//! when etcd answers again it lists again (catching up on whatever changed meanwhile) and
//! watches from there. A watch whose start revision was compacted away lists again too.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::backoff::Backoff;
use super::client::{is_auth_refused, EtcdClient, WatchBatch, DEFAULT_RPC_TIMEOUT};
use super::connect::EtcdConnect;
use super::key::{validate_cluster, RankKey};
use super::record::WorkerRecord;
use crate::etcd::mvccpb::event::EventType;
use crate::etcd::mvccpb::KeyValue;

/// How long [`ClusterWatch::start`] keeps trying while etcd is unreachable.
pub const START_RETRY_FOR: Duration = Duration::from_secs(30);

/// The longest pause between retries during an outage.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// One replica's members: rank → record.
pub type Members = BTreeMap<u32, WorkerRecord>;

/// The live view of one replica's workers; stops watching when dropped.
pub struct ClusterWatch {
    members: watch::Receiver<Members>,
    connected: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl ClusterWatch {
    /// Lists `replica` of `cluster` and watches it, retrying for up to [`START_RETRY_FOR`]
    /// while etcd is unreachable; once started, it never gives up.
    pub async fn start(etcd: &EtcdConnect, cluster: &str, replica: u32) -> Result<ClusterWatch> {
        Self::start_with_retry(etcd, cluster, replica, START_RETRY_FOR).await
    }

    /// [`Self::start`], retrying the first listing for up to `retry_for`.
    pub async fn start_with_retry(
        etcd: &EtcdConnect,
        cluster: &str,
        replica: u32,
        retry_for: Duration,
    ) -> Result<ClusterWatch> {
        validate_cluster(cluster)?;
        etcd.validate()?;
        let watcher = Watcher {
            etcd: etcd.clone(),
            cluster: cluster.to_string(),
            replica,
            prefix: RankKey::replica_prefix(cluster, replica),
        };
        let start = Instant::now();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let (client, members, revision) = loop {
            match watcher.list().await {
                Ok(listed) => break listed,
                // Wrong credentials do not fix themselves: say so now.
                Err(e) if is_auth_refused(&e) => return Err(e),
                Err(e) => {
                    let delay = backoff.next_delay();
                    if start.elapsed() + delay > retry_for {
                        return Err(e).with_context(|| {
                            format!(
                                "etcd unreachable while listing {} (tried {} for {:?})",
                                watcher.prefix,
                                etcd.endpoints.join(","),
                                start.elapsed()
                            )
                        });
                    }
                    warn!(prefix = %watcher.prefix, "listing members: etcd unreachable, retrying: {e:#}");
                    tokio::time::sleep(delay).await;
                }
            }
        };
        info!(prefix = %watcher.prefix, members = members.len(), "watching cluster membership");
        let (members_tx, members) = watch::channel(members);
        let (connected_tx, connected) = watch::channel(true);
        let task = tokio::spawn(watcher.run(client, revision, members_tx, connected_tx));
        Ok(ClusterWatch {
            members,
            connected,
            task,
        })
    }

    /// The current view (rank → record), and every change to it.
    pub fn members(&self) -> watch::Receiver<Members> {
        self.members.clone()
    }

    /// Whether the view is live (true) or the last one seen before etcd became unreachable.
    pub fn connected(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }
}

impl Drop for ClusterWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Watcher {
    etcd: EtcdConnect,
    cluster: String,
    replica: u32,
    prefix: String,
}

impl Watcher {
    /// Connects and lists the prefix: the client, the members, the revision of the listing.
    async fn list(&self) -> Result<(EtcdClient, Members, i64)> {
        let client = EtcdClient::connect(&self.etcd, DEFAULT_RPC_TIMEOUT).await?;
        let (kvs, revision) = client.get_prefix(&self.prefix).await?;
        let mut members = Members::new();
        for kv in &kvs {
            if let Some((rank, record)) = self.member(kv) {
                members.insert(rank, record);
            }
        }
        Ok((client, members, revision))
    }

    /// The rank of a key under the prefix, or `None` (logged) if it is not a rank key of
    /// this replica.
    fn rank(&self, key: &[u8]) -> Option<u32> {
        let text = String::from_utf8_lossy(key);
        match RankKey::parse(&text) {
            Ok(k) if k.cluster == self.cluster && k.replica == self.replica => Some(k.rank),
            Ok(k) => {
                warn!(key = %text, "skipping a key of {k} under {}", self.prefix);
                None
            }
            Err(e) => {
                warn!("skipping a key that is not a rank key: {e}");
                None
            }
        }
    }

    /// The member a stored key-value describes, or `None` (logged) if it is malformed.
    fn member(&self, kv: &KeyValue) -> Option<(u32, WorkerRecord)> {
        let rank = self.rank(&kv.key)?;
        match WorkerRecord::from_json(&kv.value) {
            Ok(record) => Some((rank, record)),
            Err(e) => {
                warn!(
                    key = %String::from_utf8_lossy(&kv.key),
                    bytes = kv.value.len(),
                    "skipping a value that is not a worker record: {e:#}"
                );
                None
            }
        }
    }

    /// Applies one batch of watch events; whether the view changed.
    fn apply(&self, members: &mut Members, batch: &[crate::etcd::mvccpb::Event]) -> bool {
        let mut changed = false;
        for event in batch {
            let Some(kv) = &event.kv else {
                debug!("skipping a watch event without a key-value");
                continue;
            };
            if event.r#type == EventType::Delete as i32 {
                if let Some(rank) = self.rank(&kv.key) {
                    changed |= members.remove(&rank).is_some();
                }
                continue;
            }
            match self.member(kv) {
                Some((rank, record)) => {
                    changed |= members.get(&rank) != Some(&record);
                    members.insert(rank, record);
                }
                None => {
                    // The rank's key no longer holds a worker record: whoever was there is
                    // no longer described by it.
                    if let Some(rank) = self.rank(&kv.key) {
                        changed |= members.remove(&rank).is_some();
                    }
                }
            }
        }
        changed
    }

    /// The background task: watch; on any trouble, keep the last view, list again, watch
    /// again.
    async fn run(
        self,
        client: EtcdClient,
        revision: i64,
        members: watch::Sender<Members>,
        connected: watch::Sender<bool>,
    ) {
        let mut listed = Some((client, revision));
        let mut backoff = Backoff::new(Duration::from_millis(200), MAX_RETRY_DELAY);
        let mut outage = false;
        loop {
            let (client, revision) = match listed.take() {
                Some(l) => l,
                None => match self.list().await {
                    Ok((client, view, revision)) => {
                        members.send_if_modified(|m| {
                            let changed = *m != view;
                            *m = view;
                            changed
                        });
                        (client, revision)
                    }
                    Err(e) => {
                        self.trouble(&mut outage, &connected, &members, &e);
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                },
            };
            let mut watch = match client.watch_prefix(&self.prefix, revision + 1).await {
                Ok(w) => w,
                Err(e) => {
                    self.trouble(&mut outage, &connected, &members, &e);
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
            };
            if outage {
                info!(
                    prefix = %self.prefix,
                    members = members.borrow().len(),
                    "etcd reachable again: membership listed again and watched"
                );
                outage = false;
            }
            connected.send_replace(true);
            backoff.reset();
            loop {
                match watch.next().await {
                    Ok(WatchBatch::Events { events, .. }) => {
                        members.send_if_modified(|m| self.apply(m, &events));
                    }
                    Ok(WatchBatch::Compacted { compact_revision }) => {
                        info!(prefix = %self.prefix, compact_revision, "watch compacted: listing again");
                        break;
                    }
                    Err(e) => {
                        self.trouble(&mut outage, &connected, &members, &e);
                        tokio::time::sleep(backoff.next_delay()).await;
                        break;
                    }
                }
            }
        }
    }

    fn trouble(
        &self,
        outage: &mut bool,
        connected: &watch::Sender<bool>,
        members: &watch::Sender<Members>,
        e: &anyhow::Error,
    ) {
        if !*outage {
            warn!(
                prefix = %self.prefix,
                members = members.borrow().len(),
                "etcd unreachable: keeping the last view of the membership, retrying: {e:#}"
            );
        } else {
            debug!(prefix = %self.prefix, "etcd still unreachable: {e:#}");
        }
        *outage = true;
        connected.send_replace(false);
    }
}
