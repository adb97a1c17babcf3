//! The worker's side of membership: claim a rank under a lease and keep it.
//!
//! A worker grants itself a lease, then writes its [`WorkerRecord`] under its [`RankKey`] in
//! one "create if absent" transaction attached to that lease: two workers can never hold the
//! same rank, and a worker that dies (crash, SIGKILL, lost host) drops out by itself when its
//! lease expires. A background task renews the lease every TTL/3.
//!
//! **An etcd outage never stops the worker**: it is serving a replica whose coordinator may
//! not need etcd at that moment. The task keeps retrying (with backoff) and reports what it is
//! doing through [`Registration::state`]. When etcd answers again: if the lease survived (etcd
//! extends leases across its own restarts), it goes on renewing it and makes sure the key is
//! still there; if the lease expired, it claims the key again under a new lease; if meanwhile
//! another worker took the rank, it logs an error and retries slowly, without exiting — which
//! worker should go is the operator's call.
//!
//! [`Registration::release`] revokes the lease (graceful shutdown: the record goes at once);
//! dropping a `Registration` only stops the renewals, so the record goes when the lease
//! expires, exactly as after a crash.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::backoff::Backoff;
use super::client::{
    is_auth_refused, CreateOutcome, EtcdClient, Lease, LeaseKeepAlive, DEFAULT_RPC_TIMEOUT,
};
use super::connect::EtcdConnect;
use super::key::{validate_cluster, RankKey};
use super::record::WorkerRecord;

/// How long [`claim`] keeps trying while etcd is unreachable before it gives up.
pub const CLAIM_RETRY_FOR: Duration = Duration::from_secs(30);

/// How often the task retries while another worker holds the rank: slowly, since only an
/// operator (or that worker's death) changes it.
const TAKEN_RETRY_EVERY: Duration = Duration::from_secs(10);

/// The longest pause between retries during an outage.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Why a claim failed.
#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    /// Another worker process holds the rank.
    #[error("{key} is already held by worker {} at {}", holder.instance, holder.grpc_addr)]
    Taken { key: RankKey, holder: WorkerRecord },
    /// The rank's key holds something that is not a worker record (written by hand?).
    #[error("{key} is held by a value that is not a worker record ({why}); remove the key {} to free it", key.key())]
    Occupied { key: RankKey, why: String },
    /// No etcd endpoint answered for the whole retry time.
    #[error(
        "etcd unreachable while claiming {key} (tried {endpoints} for {waited:?}): {source:#}"
    )]
    Unreachable {
        key: RankKey,
        endpoints: String,
        waited: Duration,
        source: anyhow::Error,
    },
    /// The request itself is wrong (cluster name, no endpoints).
    #[error("cannot claim {key}: {source:#}")]
    Invalid { key: RankKey, source: anyhow::Error },
}

/// What the registration is doing, for logs, health and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistrationState {
    /// The rank is held under this lease, renewed in time.
    Registered { lease_id: i64 },
    /// etcd is unreachable (or failing); retrying. The worker keeps serving.
    Reconnecting { why: String },
    /// After an outage, another worker holds the rank; retrying slowly.
    Taken { holder: WorkerRecord },
}

/// A claimed rank, kept alive in the background until released or dropped.
pub struct Registration {
    key: RankKey,
    etcd: EtcdConnect,
    state: watch::Receiver<RegistrationState>,
    /// The lease currently holding the key (changes when the key is re-claimed).
    lease_id: Arc<AtomicI64>,
    task: JoinHandle<()>,
}

/// Claims `key` for `record` under a lease of `ttl`, retrying for up to [`CLAIM_RETRY_FOR`]
/// while etcd is unreachable, and keeps it alive in the background.
pub async fn claim(
    etcd: &EtcdConnect,
    key: RankKey,
    record: WorkerRecord,
    ttl: Duration,
) -> Result<Registration, ClaimError> {
    claim_with_retry(etcd, key, record, ttl, CLAIM_RETRY_FOR).await
}

/// [`claim`], retrying for up to `retry_for` while etcd is unreachable.
pub async fn claim_with_retry(
    etcd: &EtcdConnect,
    key: RankKey,
    record: WorkerRecord,
    ttl: Duration,
    retry_for: Duration,
) -> Result<Registration, ClaimError> {
    if let Err(e) = validate_cluster(&key.cluster) {
        return Err(ClaimError::Invalid {
            key,
            source: e.into(),
        });
    }
    if let Err(source) = etcd.validate() {
        return Err(ClaimError::Invalid { key, source });
    }
    let keeper = Keeper {
        etcd: etcd.clone(),
        key: key.clone(),
        record,
        ttl,
        rpc_timeout: rpc_timeout(ttl),
    };
    let start = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    let (client, lease, renewals) = loop {
        match keeper.claim_once().await {
            Ok(claimed) => break claimed,
            Err(Attempt::Taken(holder)) => return Err(ClaimError::Taken { key, holder }),
            Err(Attempt::Occupied(why)) => return Err(ClaimError::Occupied { key, why }),
            // Wrong credentials do not fix themselves: say so now rather than after the retries.
            Err(Attempt::Etcd(e)) if is_auth_refused(&e) => {
                return Err(ClaimError::Invalid { key, source: e })
            }
            Err(Attempt::Etcd(e)) => {
                let delay = backoff.next_delay();
                if start.elapsed() + delay > retry_for {
                    return Err(ClaimError::Unreachable {
                        key,
                        endpoints: etcd.endpoints.join(","),
                        waited: start.elapsed(),
                        source: e,
                    });
                }
                warn!(key = %key.key(), "claiming: etcd unreachable, retrying: {e:#}");
                tokio::time::sleep(delay).await;
            }
        }
    };
    info!(key = %key.key(), lease = format!("{:x}", lease.id), ttl = ?lease.ttl, "claimed {key}");
    let (state_tx, state) = watch::channel(RegistrationState::Registered { lease_id: lease.id });
    let lease_id = Arc::new(AtomicI64::new(lease.id));
    let task = tokio::spawn(keeper.run(client, lease, renewals, state_tx, lease_id.clone()));
    Ok(Registration {
        key,
        etcd: etcd.clone(),
        state,
        lease_id,
        task,
    })
}

impl Registration {
    /// The claimed rank.
    pub fn key(&self) -> &RankKey {
        &self.key
    }

    /// What the registration is doing now, and every change.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.clone()
    }

    /// Graceful shutdown: stops the renewals and revokes the lease, which removes the record
    /// at once. If etcd cannot be reached the error says so, and the record goes when the
    /// lease expires.
    pub async fn release(mut self) -> Result<()> {
        self.task.abort();
        // Wait for the task to stop, so it cannot re-claim after the revoke.
        let _ = (&mut self.task).await;
        let id = self.lease_id.load(Ordering::SeqCst);
        let what = || format!("releasing {} (lease {id:x})", self.key);
        let client = EtcdClient::connect(&self.etcd, DEFAULT_RPC_TIMEOUT)
            .await
            .with_context(what)?;
        client.lease_revoke(id).await.with_context(what)?;
        info!(key = %self.key.key(), "released {}", self.key);
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The deadline of one call: short enough that an outage is noticed well within the TTL.
fn rpc_timeout(ttl: Duration) -> Duration {
    (ttl / 2).clamp(Duration::from_secs(1), DEFAULT_RPC_TIMEOUT)
}

/// Why one claim attempt failed.
enum Attempt {
    Taken(WorkerRecord),
    Occupied(String),
    Etcd(anyhow::Error),
}

impl From<anyhow::Error> for Attempt {
    fn from(e: anyhow::Error) -> Attempt {
        Attempt::Etcd(e)
    }
}

/// What the background task holds on to between rounds; `None` where it must be redone.
struct Links<'a> {
    client: &'a mut Option<EtcdClient>,
    lease: &'a mut Option<Lease>,
    renewals: &'a mut Option<LeaseKeepAlive>,
}

/// Everything the background task needs to (re-)claim the key.
struct Keeper {
    etcd: EtcdConnect,
    key: RankKey,
    record: WorkerRecord,
    ttl: Duration,
    rpc_timeout: Duration,
}

impl Keeper {
    /// Connect, grant a lease, claim the key under it, open its keep-alive stream.
    async fn claim_once(&self) -> Result<(EtcdClient, Lease, LeaseKeepAlive), Attempt> {
        let client = EtcdClient::connect(&self.etcd, self.rpc_timeout).await?;
        let lease = client.lease_grant(self.ttl).await?;
        if let Err(e) = self.hold_key(&client, lease.id).await {
            // Nothing is attached to the new lease: let it go now rather than at its expiry.
            let _ = client.lease_revoke(lease.id).await;
            return Err(e);
        }
        let (renewals, ttl) = client.keep_alive(lease.id).await?;
        if ttl.is_none() {
            return Err(Attempt::Etcd(anyhow!(
                "lease {:x} expired right after the claim",
                lease.id
            )));
        }
        Ok((client, lease, renewals))
    }

    /// Makes sure the key holds our record attached to `lease_id`: creates it if absent,
    /// re-attaches our own record found under another lease (a claim whose answer was lost).
    async fn hold_key(&self, client: &EtcdClient, lease_id: i64) -> Result<(), Attempt> {
        let key = self.key.key();
        match client
            .create_if_absent(&key, self.record.to_json(), lease_id)
            .await?
        {
            CreateOutcome::Created { .. } => Ok(()),
            CreateOutcome::Exists(kv) => {
                let holder = WorkerRecord::from_json(&kv.value)
                    .map_err(|e| Attempt::Occupied(format!("{e:#}")))?;
                if holder.instance != self.record.instance {
                    return Err(Attempt::Taken(holder));
                }
                if kv.lease != lease_id || holder != self.record {
                    client.put(&key, self.record.to_json(), lease_id).await?;
                }
                Ok(())
            }
        }
    }

    /// The background task: renew every TTL/3; through an outage, retry and re-claim.
    async fn run(
        self,
        client: EtcdClient,
        lease: Lease,
        renewals: LeaseKeepAlive,
        state: watch::Sender<RegistrationState>,
        lease_id: Arc<AtomicI64>,
    ) {
        let mut client = Some(client);
        let mut lease = Some(lease);
        let mut renewals = Some(renewals);
        let mut backoff = Backoff::new(Duration::from_millis(200), MAX_RETRY_DELAY);
        let mut troubled = false;
        loop {
            let trouble = self
                .round(
                    Links {
                        client: &mut client,
                        lease: &mut lease,
                        renewals: &mut renewals,
                    },
                    &state,
                    &lease_id,
                    &mut troubled,
                    &mut backoff,
                )
                .await;
            match trouble {
                Attempt::Etcd(e) => {
                    let why = format!("{e:#}");
                    if !troubled {
                        warn!(key = %self.key.key(), "etcd trouble, the worker keeps serving and retries: {why}");
                    }
                    troubled = true;
                    state.send_replace(RegistrationState::Reconnecting { why });
                    client = None;
                    renewals = None;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Attempt::Taken(holder) => {
                    error!(
                        key = %self.key.key(),
                        "{} is now held by worker {} at {}: this worker ({}) is not registered; retrying every {:?}",
                        self.key, holder.instance, holder.grpc_addr, self.record.instance, TAKEN_RETRY_EVERY
                    );
                    troubled = true;
                    state.send_replace(RegistrationState::Taken { holder });
                    tokio::time::sleep(TAKEN_RETRY_EVERY).await;
                }
                Attempt::Occupied(why) => {
                    error!(
                        key = %self.key.key(),
                        "{} holds a value that is not a worker record ({why}); retrying every {:?}",
                        self.key, TAKEN_RETRY_EVERY
                    );
                    troubled = true;
                    state.send_replace(RegistrationState::Reconnecting {
                        why: format!("the key holds a value that is not a worker record: {why}"),
                    });
                    tokio::time::sleep(TAKEN_RETRY_EVERY).await;
                }
            }
        }
    }

    /// One stretch of being registered: (re)connect and (re)claim as needed, then renew until
    /// something goes wrong, which is returned.
    async fn round(
        &self,
        links: Links<'_>,
        state: &watch::Sender<RegistrationState>,
        lease_id: &AtomicI64,
        troubled: &mut bool,
        backoff: &mut Backoff,
    ) -> Attempt {
        let Links {
            client,
            lease,
            renewals,
        } = links;
        let c = match client {
            Some(c) => c.clone(),
            None => match EtcdClient::connect(&self.etcd, self.rpc_timeout).await {
                Ok(c) => {
                    *client = Some(c.clone());
                    c
                }
                Err(e) => return Attempt::Etcd(e),
            },
        };
        if renewals.is_none() {
            // Back from trouble: is the lease still alive?
            if let Some(l) = *lease {
                match c.keep_alive(l.id).await {
                    Ok((r, Some(_))) => *renewals = Some(r),
                    Ok((_, None)) => {
                        info!(key = %self.key.key(), "lease {:x} expired meanwhile: claiming again", l.id);
                        *lease = None;
                    }
                    Err(e) => return Attempt::Etcd(e),
                }
            }
            if lease.is_none() {
                let l = match c.lease_grant(self.ttl).await {
                    Ok(l) => l,
                    Err(e) => return Attempt::Etcd(e),
                };
                *lease = Some(l);
                lease_id.store(l.id, Ordering::SeqCst);
                match c.keep_alive(l.id).await {
                    Ok((r, Some(_))) => *renewals = Some(r),
                    Ok((_, None)) => {
                        *lease = None;
                        return Attempt::Etcd(anyhow!("lease {:x} expired at once", l.id));
                    }
                    Err(e) => return Attempt::Etcd(e),
                }
            }
            let Some(l) = *lease else {
                return Attempt::Etcd(anyhow!("no lease"));
            };
            if let Err(e) = self.hold_key(&c, l.id).await {
                if !matches!(e, Attempt::Etcd(_)) {
                    // Not ours: free the lease; a later round starts over with a new one.
                    let _ = c.lease_revoke(l.id).await;
                    *lease = None;
                    *renewals = None;
                }
                return e;
            }
            if *troubled {
                info!(key = %self.key.key(), lease = format!("{:x}", l.id), "registered again as {}", self.key);
            }
        }
        let (Some(l), Some(r)) = (*lease, renewals.as_mut()) else {
            return Attempt::Etcd(anyhow!("no lease"));
        };
        *troubled = false;
        backoff.reset();
        state.send_if_modified(|s| {
            let now = RegistrationState::Registered { lease_id: l.id };
            let changed = *s != now;
            *s = now;
            changed
        });
        let every = (l.ttl / 3).max(Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            match r.renew().await {
                Ok(Some(_)) => {}
                Ok(None) => {
                    *lease = None;
                    *renewals = None;
                    return Attempt::Etcd(anyhow!("lease {:x} expired", l.id));
                }
                Err(e) => return Attempt::Etcd(e),
            }
        }
    }
}
