//! A thin etcd v3 client over the vendored API ([`crate::etcd`]): just the calls membership
//! needs (range, put, "create if absent", delete, leases, a prefix watch).
//!
//! Thin on purpose: the etcd-client crate needs a system `protoc` to build, which Helios does
//! not require, and membership uses a handful of RPCs. Every unary call has a deadline (a
//! stalled etcd must not stall a worker), every failure is an `anyhow` error saying which call
//! on which endpoint failed, and nothing that comes from the network is unwrapped.
//!
//! Connection health: HTTP/2 keep-alive pings run even on an idle connection, so a watch on a
//! peer that vanished (no TCP reset: a partition, a dead host) fails instead of waiting forever.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::codec::Streaming;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::connect::{is_https, EtcdConnect, EtcdCredentials};
use super::key::prefix_range_end;
use crate::etcd::etcdserverpb::auth_client::AuthClient;
use crate::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use crate::etcd::etcdserverpb::kv_client::KvClient;
use crate::etcd::etcdserverpb::lease_client::LeaseClient;
use crate::etcd::etcdserverpb::watch_client::WatchClient;
use crate::etcd::etcdserverpb::{
    request_op, response_op, watch_request, AuthenticateRequest, Compare, DeleteRangeRequest,
    LeaseGrantRequest, LeaseKeepAliveRequest, LeaseKeepAliveResponse, LeaseRevokeRequest,
    PutRequest, RangeRequest, RequestOp, TxnRequest, WatchCreateRequest, WatchRequest,
    WatchResponse,
};
use crate::etcd::mvccpb::{Event, KeyValue};

/// The deadline of one unary call (and of opening a stream) unless the caller picks another.
pub const DEFAULT_RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// How often an idle connection is pinged, and how long a ping may go unanswered.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// A channel that carries the auth token (if any) on every call.
type Authed = InterceptedService<Channel, TokenInterceptor>;

/// A connection to one etcd endpoint (the first of a list that answered).
#[derive(Clone)]
pub struct EtcdClient {
    endpoint: String,
    timeout: Duration,
    kv: KvClient<Authed>,
    watch: WatchClient<Authed>,
    lease: LeaseClient<Authed>,
    /// `None`: etcd's auth is not used.
    auth: Option<Arc<Authenticator>>,
}

/// etcd refused the user or password (not an outage: retrying will not help).
#[derive(Debug, thiserror::Error)]
#[error("etcd authentication as user {user:?} at {endpoint} was refused: {reason}")]
pub struct AuthRefused {
    pub user: String,
    pub endpoint: String,
    pub reason: String,
}

/// Whether `e` (or its cause) is etcd refusing the credentials.
pub fn is_auth_refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<AuthRefused>())
}

/// Adds the current auth token (when there is one) as the `token` metadata etcd reads.
#[derive(Clone, Default)]
struct TokenInterceptor {
    token: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
}

impl tonic::service::Interceptor for TokenInterceptor {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        let token = self.token.read().map(|t| t.clone()).unwrap_or_default();
        if let Some(token) = token {
            request.metadata_mut().insert("token", token);
        }
        Ok(request)
    }
}

/// Gets (and renews) the auth token the interceptor sends.
struct Authenticator {
    client: AuthClient<Channel>,
    credentials: EtcdCredentials,
    token: Arc<RwLock<Option<MetadataValue<Ascii>>>>,
    endpoint: String,
    timeout: Duration,
}

impl Authenticator {
    /// Asks etcd for a fresh token and makes every later call send it.
    async fn authenticate(&self) -> Result<()> {
        let request = AuthenticateRequest {
            name: self.credentials.user.clone(),
            password: self.credentials.password().to_string(),
        };
        let what = || {
            format!(
                "etcd authentication as user {:?} at {}",
                self.credentials.user, self.endpoint
            )
        };
        let answer = tokio::time::timeout(self.timeout, self.client.clone().authenticate(request))
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.timeout))
            .with_context(what)?;
        let token = match answer {
            Ok(response) => response.into_inner().token,
            Err(status) if refused(&status) => {
                return Err(AuthRefused {
                    user: self.credentials.user.clone(),
                    endpoint: self.endpoint.clone(),
                    reason: status_error(&status).to_string(),
                }
                .into())
            }
            Err(status) => return Err(status_error(&status)).with_context(what),
        };
        let token = MetadataValue::try_from(token.as_str())
            .map_err(|_| anyhow!("etcd answered a token that is not ASCII"))
            .with_context(what)?;
        match self.token.write() {
            Ok(mut slot) => *slot = Some(token),
            Err(poisoned) => *poisoned.into_inner() = Some(token),
        }
        Ok(())
    }
}

/// Whether etcd's answer to `Authenticate` refuses the credentials (as opposed to failing).
fn refused(status: &tonic::Status) -> bool {
    let m = status.message();
    status.code() == tonic::Code::InvalidArgument
        || status.code() == tonic::Code::FailedPrecondition
        || m.contains("authentication failed")
        || m.contains("invalid user")
}

/// Whether a call failed because its token is invalid or expired (worth one fresh token).
fn stale_token(status: &tonic::Status) -> bool {
    let m = status.message();
    status.code() == tonic::Code::Unauthenticated
        || m.contains("invalid auth token")
        || m.contains("revision of auth store is old")
}

/// What [`EtcdClient::create_if_absent`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    /// The key did not exist and now holds the value; the store's revision after the write.
    Created { revision: i64 },
    /// The key already existed; it is left as it was, and this is what it holds.
    Exists(KeyValue),
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub id: i64,
    /// The TTL etcd granted (it may round a short request up to its minimum).
    pub ttl: Duration,
}

/// What a prefix watch delivers next.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchBatch {
    /// Changes, in order; `revision` is the store's revision when they were sent.
    Events { revision: i64, events: Vec<Event> },
    /// The watch's start revision was compacted away: re-list, then watch again.
    Compacted { compact_revision: i64 },
}

impl EtcdClient {
    /// Connects to the first of `etcd.endpoints` (`https://host:port` over TLS,
    /// `http://host:port` or a bare `host:port` in the clear) that accepts a connection within
    /// `timeout`, which is also each call's deadline; with credentials, authenticates there.
    /// Refused credentials end the search at once ([`AuthRefused`]).
    pub async fn connect(etcd: &EtcdConnect, timeout: Duration) -> Result<EtcdClient> {
        etcd.validate()?;
        let mut failures = Vec::new();
        for endpoint in &etcd.endpoints {
            match Self::connect_one(etcd, endpoint, timeout).await {
                Ok(client) => return Ok(client),
                Err(e) if is_auth_refused(&e) => return Err(e),
                Err(e) => failures.push(format!("{endpoint}: {e:#}")),
            }
        }
        bail!("no etcd endpoint answered: {}", failures.join("; "))
    }

    async fn connect_one(
        etcd: &EtcdConnect,
        endpoint: &str,
        timeout: Duration,
    ) -> Result<EtcdClient> {
        let uri = if endpoint.contains("://") {
            endpoint.to_string()
        } else {
            format!("http://{endpoint}")
        };
        let mut channel = Endpoint::from_shared(uri.clone())
            .with_context(|| format!("invalid etcd endpoint {endpoint:?}"))?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_INTERVAL)
            .keep_alive_while_idle(true);
        if is_https(&uri) {
            channel = channel
                .tls_config(tls_config(etcd))
                .context("setting up TLS")?;
        }
        let channel = tokio::time::timeout(timeout, channel.connect())
            .await
            .map_err(|_| anyhow!("no connection within {timeout:?}"))?
            .map_err(|e| connect_error(&e, etcd))?;
        let interceptor = TokenInterceptor::default();
        let auth = etcd.credentials.clone().map(|credentials| {
            Arc::new(Authenticator {
                client: AuthClient::new(channel.clone()),
                credentials,
                token: interceptor.token.clone(),
                endpoint: uri.clone(),
                timeout,
            })
        });
        if let Some(auth) = &auth {
            auth.authenticate().await?;
        }
        Ok(EtcdClient {
            endpoint: uri,
            timeout,
            kv: KvClient::with_interceptor(channel.clone(), interceptor.clone()),
            watch: WatchClient::with_interceptor(channel.clone(), interceptor.clone()),
            lease: LeaseClient::with_interceptor(channel, interceptor),
            auth,
        })
    }

    /// The endpoint this client talks to.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Runs one call under the deadline; if the auth token was stale, authenticates again and
    /// runs it once more. The outer error is a timeout or a failed re-authentication.
    async fn attempt<T, Fut>(
        &self,
        mut make: impl FnMut() -> Fut,
    ) -> Result<Result<T, tonic::Status>>
    where
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let mut refreshed = false;
        loop {
            let answer = tokio::time::timeout(self.timeout, make())
                .await
                .map_err(|_| anyhow!("no answer within {:?}", self.timeout))?;
            match (answer, &self.auth) {
                (Err(status), Some(auth)) if !refreshed && stale_token(&status) => {
                    tracing::debug!(endpoint = %self.endpoint, "etcd auth token refused ({}): authenticating again", status.message());
                    auth.authenticate().await?;
                    refreshed = true;
                }
                (answer, _) => return Ok(answer.map(tonic::Response::into_inner)),
            }
        }
    }

    /// Runs one call ([`Self::attempt`]); errors say which call on which endpoint.
    async fn call<T, Fut>(&self, what: impl Fn() -> String, make: impl FnMut() -> Fut) -> Result<T>
    where
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.attempt(make).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(status)) => Err(status_error(&status)).with_context(|| self.doing(what())),
            Err(e) => Err(e).with_context(|| self.doing(what())),
        }
    }

    fn doing(&self, what: String) -> String {
        format!("etcd {what} at {}", self.endpoint)
    }

    /// The key's current value, if it exists.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let request = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let response = self
            .call(
                || format!("get {key}"),
                || {
                    let (mut c, r) = (self.kv.clone(), request.clone());
                    async move { c.range(r).await }
                },
            )
            .await?;
        Ok(response.kvs.into_iter().next())
    }

    /// Every key under `prefix`, in key order, and the store's revision they were read at
    /// (watch from the next one to miss nothing).
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let request = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_range_end(prefix.as_bytes()),
            ..Default::default()
        };
        let response = self
            .call(
                || format!("list {prefix}"),
                || {
                    let (mut c, r) = (self.kv.clone(), request.clone());
                    async move { c.range(r).await }
                },
            )
            .await?;
        Ok((response.kvs, revision(response.header.as_ref())))
    }

    /// Writes `value` under `key`, attached to `lease` (0: none); the store's new revision.
    pub async fn put(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64> {
        let request = PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..Default::default()
        };
        let response = self
            .call(
                || format!("put {key}"),
                || {
                    let (mut c, r) = (self.kv.clone(), request.clone());
                    async move { c.put(r).await }
                },
            )
            .await?;
        Ok(revision(response.header.as_ref()))
    }

    /// Writes `value` under `key` (attached to `lease`, 0: none) only if the key does not
    /// exist, in one transaction: two callers can never both create it.
    pub async fn create_if_absent(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<CreateOutcome> {
        let k = key.as_bytes().to_vec();
        let request = TxnRequest {
            compare: vec![Compare {
                result: CompareResult::Equal as i32,
                target: CompareTarget::Create as i32,
                key: k.clone(),
                target_union: Some(TargetUnion::CreateRevision(0)),
                ..Default::default()
            }],
            success: vec![RequestOp {
                request: Some(request_op::Request::RequestPut(PutRequest {
                    key: k.clone(),
                    value,
                    lease,
                    ..Default::default()
                })),
            }],
            failure: vec![RequestOp {
                request: Some(request_op::Request::RequestRange(RangeRequest {
                    key: k,
                    ..Default::default()
                })),
            }],
        };
        let response = self
            .call(
                || format!("create {key}"),
                || {
                    let (mut c, r) = (self.kv.clone(), request.clone());
                    async move { c.txn(r).await }
                },
            )
            .await?;
        if response.succeeded {
            return Ok(CreateOutcome::Created {
                revision: revision(response.header.as_ref()),
            });
        }
        let existing = response
            .responses
            .into_iter()
            .find_map(|op| match op.response {
                Some(response_op::Response::ResponseRange(range)) => range.kvs.into_iter().next(),
                _ => None,
            });
        match existing {
            Some(kv) => Ok(CreateOutcome::Exists(kv)),
            // Deleted between the compare and the read cannot happen inside one transaction;
            // an answer without the read is a broken server.
            None => Err(anyhow!("the transaction failed but returned no value"))
                .with_context(|| self.doing(format!("create {key}"))),
        }
    }

    /// Deletes `key`; how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &str) -> Result<i64> {
        let request = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let response = self
            .call(
                || format!("delete {key}"),
                || {
                    let (mut c, r) = (self.kv.clone(), request.clone());
                    async move { c.delete_range(r).await }
                },
            )
            .await?;
        Ok(response.deleted)
    }

    /// Grants a lease of `ttl` (rounded up to whole seconds, at least 1).
    pub async fn lease_grant(&self, ttl: Duration) -> Result<Lease> {
        let seconds = ttl_seconds(ttl);
        let request = LeaseGrantRequest {
            ttl: seconds,
            id: 0,
        };
        let response = self
            .call(
                || format!("lease grant ({seconds} s)"),
                || {
                    let (mut c, r) = (self.lease.clone(), request);
                    async move { c.lease_grant(r).await }
                },
            )
            .await?;
        if !response.error.is_empty() || response.id == 0 || response.ttl <= 0 {
            return Err(anyhow!(
                "refused (id {}, ttl {}): {}",
                response.id,
                response.ttl,
                response.error
            ))
            .with_context(|| self.doing("lease grant".into()));
        }
        Ok(Lease {
            id: response.id,
            ttl: Duration::from_secs(response.ttl.unsigned_abs()),
        })
    }

    /// Revokes a lease, deleting every key attached to it. `false`: it was already gone.
    pub async fn lease_revoke(&self, id: i64) -> Result<bool> {
        let request = LeaseRevokeRequest { id };
        let what = || self.doing(format!("revoke {id:x}"));
        match self
            .attempt(|| {
                let (mut c, r) = (self.lease.clone(), request);
                async move { c.lease_revoke(r).await }
            })
            .await
            .with_context(what)?
        {
            Ok(_) => Ok(true),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(false),
            Err(status) => Err(status_error(&status)).with_context(what),
        }
    }

    /// Opens a keep-alive stream for lease `id` and renews it once: the stream, and the TTL
    /// that renewal granted (`None`: the lease no longer exists, it expired or was revoked).
    ///
    /// (etcd answers the stream's headers with its first renewal, so opening it and renewing
    /// once are one step.)
    pub async fn keep_alive(&self, id: i64) -> Result<(LeaseKeepAlive, Option<Duration>)> {
        let what = || format!("lease keep-alive {id:x}");
        // A retried open needs a request stream of its own: the latest one is kept.
        let mut sender = None;
        let stream = self
            .call(what, || {
                let (tx, rx) = mpsc::channel(4);
                // A new channel has room for its first message.
                let _ = tx.try_send(LeaseKeepAliveRequest { id });
                sender = Some(tx);
                let mut c = self.lease.clone();
                async move { c.lease_keep_alive(ReceiverStream::new(rx)).await }
            })
            .await?;
        let tx = sender.ok_or_else(|| anyhow!("the keep-alive stream was never opened"))?;
        let mut keeper = LeaseKeepAlive {
            id,
            tx,
            stream,
            timeout: self.timeout,
            endpoint: self.endpoint.clone(),
        };
        let ttl = keeper.next_answer().await?;
        Ok((keeper, ttl))
    }

    /// Watches every key under `prefix` from `start_revision` on (0: from now). Returns once
    /// etcd confirmed the watch.
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<PrefixWatch> {
        let create = WatchRequest {
            request_union: Some(watch_request::RequestUnion::CreateRequest(
                WatchCreateRequest {
                    key: prefix.as_bytes().to_vec(),
                    range_end: prefix_range_end(prefix.as_bytes()),
                    start_revision,
                    ..Default::default()
                },
            )),
        };
        let what = || format!("watch {prefix} from revision {start_revision}");
        let (tx, stream, first) = self.open_watch(&create, &what).await?;
        // etcd checks the token when the watch is created, and answers a stale one with a
        // cancelled watch ("permission denied"), not an error: authenticate again, once.
        let (tx, stream, first) = match &self.auth {
            Some(auth) if first.canceled && first.compact_revision == 0 => {
                tracing::debug!(endpoint = %self.endpoint, "etcd watch refused ({}): authenticating again", first.cancel_reason);
                auth.authenticate()
                    .await
                    .with_context(|| self.doing(what()))?;
                self.open_watch(&create, &what).await?
            }
            _ => (tx, stream, first),
        };
        let mut watch = PrefixWatch {
            _requests: tx,
            stream,
            pending: None,
            endpoint: self.endpoint.clone(),
        };
        // A created answer can already carry a cancellation (a compacted start revision);
        // keep it for the first `next`.
        if first.canceled || first.compact_revision != 0 || !first.events.is_empty() {
            watch.pending = Some(first);
        }
        Ok(watch)
    }
}

impl EtcdClient {
    /// Opens a watch stream and reads etcd's confirmation (its first answer).
    async fn open_watch(
        &self,
        create: &WatchRequest,
        what: &(dyn Fn() -> String + Sync),
    ) -> Result<(
        mpsc::Sender<WatchRequest>,
        Streaming<WatchResponse>,
        WatchResponse,
    )> {
        // A retried open needs a request stream of its own: the latest one is kept.
        let mut sender = None;
        let mut stream = self
            .call(what, || {
                let (tx, rx) = mpsc::channel(4);
                // A new channel has room for its first message.
                let _ = tx.try_send(create.clone());
                sender = Some(tx);
                let mut c = self.watch.clone();
                async move { c.watch(ReceiverStream::new(rx)).await }
            })
            .await?;
        let tx = sender.ok_or_else(|| anyhow!("the watch stream was never opened"))?;
        let first = tokio::time::timeout(self.timeout, stream.message())
            .await
            .map_err(|_| anyhow!("no confirmation within {:?}", self.timeout))
            .and_then(|m| m.map_err(|s| status_error(&s)))
            .with_context(|| self.doing(what()))?
            .ok_or_else(|| anyhow!("the stream ended before the watch was confirmed"))
            .with_context(|| self.doing(what()))?;
        if !first.created {
            return Err(anyhow!("the first answer did not confirm the watch"))
                .with_context(|| self.doing(what()));
        }
        Ok((tx, stream, first))
    }
}

/// A lease keep-alive stream ([`EtcdClient::keep_alive`]).
pub struct LeaseKeepAlive {
    id: i64,
    tx: mpsc::Sender<LeaseKeepAliveRequest>,
    stream: Streaming<LeaseKeepAliveResponse>,
    timeout: Duration,
    endpoint: String,
}

impl LeaseKeepAlive {
    /// Renews the lease: the TTL granted, or `None` if the lease no longer exists.
    pub async fn renew(&mut self) -> Result<Option<Duration>> {
        self.tx
            .send(LeaseKeepAliveRequest { id: self.id })
            .await
            .map_err(|_| anyhow!("the keep-alive stream is closed"))
            .with_context(|| format!("etcd lease keep-alive {:x} at {}", self.id, self.endpoint))?;
        self.next_answer().await
    }

    async fn next_answer(&mut self) -> Result<Option<Duration>> {
        let context = || format!("etcd lease keep-alive {:x} at {}", self.id, self.endpoint);
        let answer = tokio::time::timeout(self.timeout, self.stream.message())
            .await
            .map_err(|_| anyhow!("no answer within {:?}", self.timeout))
            .with_context(context)?
            .map_err(|s| status_error(&s))
            .with_context(context)?
            .ok_or_else(|| anyhow!("the stream ended"))
            .with_context(context)?;
        // etcd answers a lease it does not know with TTL 0 (or less).
        Ok((answer.ttl > 0).then(|| Duration::from_secs(answer.ttl.unsigned_abs())))
    }
}

/// A watch on a key prefix ([`EtcdClient::watch_prefix`]); cancelled when dropped.
pub struct PrefixWatch {
    /// Kept open: closing the request stream ends the watch.
    _requests: mpsc::Sender<WatchRequest>,
    stream: Streaming<WatchResponse>,
    pending: Option<WatchResponse>,
    endpoint: String,
}

impl PrefixWatch {
    /// The next batch of changes (waits as long as nothing changes). An error means the watch
    /// is over (the connection broke, or etcd cancelled it): list again and start a new one.
    pub async fn next(&mut self) -> Result<WatchBatch> {
        loop {
            let response = match self.pending.take() {
                Some(r) => r,
                None => self
                    .stream
                    .message()
                    .await
                    .map_err(|s| status_error(&s))
                    .and_then(|m| m.ok_or_else(|| anyhow!("the stream ended")))
                    .with_context(|| format!("etcd watch at {}", self.endpoint))?,
            };
            if response.compact_revision != 0 {
                return Ok(WatchBatch::Compacted {
                    compact_revision: response.compact_revision,
                });
            }
            if response.canceled {
                bail!(
                    "etcd watch at {}: cancelled by the server: {}",
                    self.endpoint,
                    response.cancel_reason
                );
            }
            // Progress notifications and the like carry no events: wait for the next answer.
            if !response.events.is_empty() {
                return Ok(WatchBatch::Events {
                    revision: revision(response.header.as_ref()),
                    events: response.events,
                });
            }
        }
    }
}

/// TLS for an `https://` endpoint: the given CA (else the public webpki roots), and the
/// client certificate if one is given.
fn tls_config(etcd: &EtcdConnect) -> ClientTlsConfig {
    let mut tls = ClientTlsConfig::new();
    tls = match &etcd.tls.ca_pem {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(ca)),
        None => tls.with_webpki_roots(),
    };
    if let Some((cert, key)) = &etcd.tls.identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    tls
}

/// A failed connection, with its causes, and a hint when it is about certificates.
fn connect_error(e: &tonic::transport::Error, etcd: &EtcdConnect) -> anyhow::Error {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text = format!("{text}: {cause}");
        source = cause.source();
    }
    let lower = text.to_lowercase();
    if lower.contains("certificate") || lower.contains("tls") || lower.contains("handshake") {
        let hint = if etcd.tls.ca_pem.is_some() {
            "is --etcd-ca the CA that signed etcd's certificate, for this host name or address?"
        } else {
            "etcd's certificate is not signed by a public CA: pass its CA with --etcd-ca"
        };
        anyhow!("connecting (TLS certificate check failed: {text}; {hint})")
    } else {
        anyhow!("connecting: {text}")
    }
}

fn revision(header: Option<&crate::etcd::etcdserverpb::ResponseHeader>) -> i64 {
    header.map(|h| h.revision).unwrap_or(0)
}

fn ttl_seconds(ttl: Duration) -> i64 {
    let whole = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
    i64::try_from(whole.max(1)).unwrap_or(i64::MAX)
}

/// A gRPC status as a short error: the code and etcd's message (not tonic's whole dump).
fn status_error(status: &tonic::Status) -> anyhow::Error {
    if status.message().is_empty() {
        anyhow!("{:?}", status.code())
    } else {
        anyhow!("{:?}: {}", status.code(), status.message())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttls_round_up_to_whole_seconds() {
        assert_eq!(ttl_seconds(Duration::from_millis(1)), 1);
        assert_eq!(ttl_seconds(Duration::ZERO), 1);
        assert_eq!(ttl_seconds(Duration::from_secs(2)), 2);
        assert_eq!(ttl_seconds(Duration::from_millis(2500)), 3);
    }

    #[tokio::test]
    async fn connecting_to_nothing_is_a_clear_error() {
        // A port nothing listens on: bind one, then close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let endpoints = EtcdConnect::new(vec![format!("http://127.0.0.1:{port}")]);
        let e = EtcdClient::connect(&endpoints, Duration::from_secs(2))
            .await
            .err()
            .expect("nothing listens there");
        let text = format!("{e:#}");
        assert!(text.contains("no etcd endpoint answered"), "{text}");
        assert!(text.contains(&port.to_string()), "{text}");
        assert!(
            EtcdClient::connect(&EtcdConnect::new(vec![]), Duration::from_secs(1))
                .await
                .is_err()
        );
    }
}
