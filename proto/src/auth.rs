//! Who may call: the cluster secret that a coordinator and its workers share, and the API keys
//! clients present.
//!
//! - [`ClusterSecret`]: from a file (`--cluster-secret-file`, e.g. a mounted Kubernetes
//!   Secret) or `$HELIOS_CLUSTER_SECRET`; `helios serve` makes a random one per run and hands it
//!   to the workers it spawns through their environment (never their command line, which every
//!   local user can read). It is never sent as is: a worker's gRPC calls carry a token derived
//!   from it ([`ClusterSecret::rpc_token`]), and the communicator's handshake proves it with
//!   HMACs over fresh nonces ([`ClusterSecret::mac`]), so what crosses the wire cannot be
//!   replayed into a mesh.
//! - [`KeySet`]: tokens a service accepts, kept as SHA-256 digests and compared in constant
//!   time; [`RequireBearer`] is the tower layer that refuses a gRPC call without one of them
//!   (UNAUTHENTICATED), [`Authorize`] the client interceptor that adds one.
//!
//! Secrets and keys never reach logs: their `Debug` is redacted.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{bail, Context as _, Result};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};

/// The environment variable a cluster secret may come from (the file flag wins).
pub const CLUSTER_SECRET_ENV: &str = "HELIOS_CLUSTER_SECRET";
/// The shortest cluster secret accepted, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

type HmacSha256 = Hmac<Sha256>;

/// The secret every process of one cluster holds.
#[derive(Clone)]
pub struct ClusterSecret(Arc<str>);

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterSecret(<redacted>)")
    }
}

impl ClusterSecret {
    /// 32 random bytes, hex-encoded: one per `helios serve`, so two local clusters on one host
    /// cannot cross.
    pub fn random() -> Result<Self> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        Self::new(hex(&bytes))
    }

    /// A secret given as text (surrounding whitespace, such as a file's last newline, is not
    /// part of it).
    pub fn new(text: impl AsRef<str>) -> Result<Self> {
        let text = text.as_ref().trim();
        if text.len() < MIN_SECRET_BYTES {
            bail!(
                "the cluster secret is {} bytes; at least {MIN_SECRET_BYTES} are needed \
                 (e.g. `openssl rand -hex 32`)",
                text.len()
            );
        }
        Ok(Self(text.into()))
    }

    /// From `file` if given, else from `$HELIOS_CLUSTER_SECRET`, else none.
    pub fn load(file: Option<&Path>) -> Result<Option<Self>> {
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the cluster secret {}", path.display()))?;
            return Self::new(text)
                .with_context(|| format!("the cluster secret in {}", path.display()))
                .map(Some);
        }
        match std::env::var(CLUSTER_SECRET_ENV) {
            Ok(text) if !text.trim().is_empty() => Self::new(text)
                .with_context(|| format!("${CLUSTER_SECRET_ENV}"))
                .map(Some),
            _ => Ok(None),
        }
    }

    /// The secret as the environment of a spawned worker carries it.
    pub fn env_value(&self) -> &str {
        &self.0
    }

    /// The bearer token of a call to a worker: derived from the secret, so a captured call
    /// gives away neither the secret nor the communicator's key.
    pub fn rpc_token(&self) -> String {
        hex(&self.mac(&[b"helios worker rpc v1"]))
    }

    /// HMAC-SHA256 under the secret of `parts`, each length-prefixed (no two lists of parts
    /// read alike).
    pub fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        self.hmac(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is [`Self::mac`] of `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.hmac(parts).verify_slice(tag).is_ok()
    }

    fn hmac(&self, parts: &[&[u8]]) -> HmacSha256 {
        // Any key length is valid for HMAC.
        let mut m = <HmacSha256 as Mac>::new_from_slice(self.0.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Tokens a service accepts (API keys, or a cluster's RPC token), as SHA-256 digests: a
/// presented token is hashed and compared with every digest in constant time, so neither its
/// content nor its length shows in the time an answer takes.
#[derive(Clone, Default)]
pub struct KeySet {
    digests: Vec<[u8; 32]>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeySet({} keys, <redacted>)", self.digests.len())
    }
}

impl KeySet {
    pub fn new<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Self {
        let digests = keys
            .into_iter()
            .map(|k| Sha256::digest(k.as_ref().as_bytes()).into())
            .collect();
        Self { digests }
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether `presented` is one of the keys (every digest is compared: no early exit).
    pub fn accepts(&self, presented: &str) -> bool {
        let d: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = subtle::Choice::from(0);
        for k in &self.digests {
            found |= k.ct_eq(&d);
        }
        found.into()
    }

    /// Whether the `authorization` header value is `Bearer <one of the keys>`.
    pub fn accepts_header(&self, value: Option<&http::HeaderValue>) -> bool {
        value
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .is_some_and(|t| self.accepts(t))
    }
}

/// The token of an `Authorization: Bearer <token>` value (the scheme in any case).
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// A client interceptor that adds `authorization: Bearer <token>` to every call (none: adds
/// nothing).
#[derive(Clone, Default)]
pub struct Authorize(Option<AsciiMetadataValue>);

impl std::fmt::Debug for Authorize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.0.is_some() {
            "<redacted>"
        } else {
            "none"
        };
        write!(f, "Authorize({what})")
    }
}

impl Authorize {
    pub fn bearer(token: &str) -> Result<Self> {
        let v = MetadataValue::try_from(format!("Bearer {token}"))
            .context("a token must be printable ASCII")?;
        Ok(Self(Some(v)))
    }

    /// A client's calls with `api_key`, if any.
    pub fn api_key(api_key: Option<&str>) -> Result<Self> {
        api_key.map_or_else(|| Ok(Self::default()), Self::bearer)
    }

    /// A worker's calls under `secret` (none: unauthenticated calls, for `--insecure` workers).
    pub fn cluster(secret: Option<&ClusterSecret>) -> Self {
        secret.map_or_else(Self::default, |s| {
            // Hex is always a valid header value.
            Self::bearer(&s.rpc_token()).unwrap_or_default()
        })
    }
}

impl tonic::service::Interceptor for Authorize {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client endpoint for `url`: `host:port` and `http://` in the clear; `https://` over TLS,
/// trusting `tls_ca` (a PEM file) or, without one, the public web's roots.
pub fn client_endpoint(url: &str, tls_ca: Option<&Path>) -> Result<tonic::transport::Endpoint> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let endpoint = Endpoint::from_shared(url.clone()).with_context(|| format!("{url:?}"))?;
    if !url.starts_with("https://") {
        return Ok(endpoint);
    }
    let tls = match tls_ca {
        Some(ca) => {
            let pem = std::fs::read(ca)
                .with_context(|| format!("reading the CA certificate {}", ca.display()))?;
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem))
        }
        None => ClientTlsConfig::new().with_webpki_roots(),
    };
    endpoint.tls_config(tls).context("TLS")
}

/// A tower layer for a tonic server: with keys, a call to any path but the `open` prefixes
/// (e.g. the health service, for probes) must carry `authorization: Bearer <key>` with one of
/// them, or it is answered UNAUTHENTICATED and goes no further. Without keys (none configured:
/// an open server) every call passes.
#[derive(Clone)]
pub struct RequireBearer {
    keys: Option<Arc<KeySet>>,
    open: &'static [&'static str],
    what: &'static str,
}

impl RequireBearer {
    /// `what` names the credential in the refusal ("an API key", "the cluster secret").
    pub fn new(keys: Option<KeySet>, open: &'static [&'static str], what: &'static str) -> Self {
        Self {
            keys: keys.map(Arc::new),
            open,
            what,
        }
    }
}

impl<S> tower::Layer<S> for RequireBearer {
    type Service = RequireBearerService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequireBearerService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RequireBearerService<S> {
    inner: S,
    layer: RequireBearer,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B> tower::Service<http::Request<B>> for RequireBearerService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let open = self.layer.open.iter().any(|p| path.starts_with(p));
        let authorization = req.headers().get(http::header::AUTHORIZATION);
        let allowed = match &self.layer.keys {
            None => true,
            Some(keys) => open || keys.accepts_header(authorization),
        };
        if allowed {
            return Box::pin(self.inner.call(req));
        }
        let what = self.layer.what;
        let refusal = if req.headers().contains_key(http::header::AUTHORIZATION) {
            format!("the authorization does not carry {what}")
        } else {
            format!("{what} is required: send `authorization: Bearer <key>` metadata")
        };
        let response = tonic::Status::unauthenticated(refusal).into_http();
        Box::pin(async move { Ok(response) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_matched_exactly() {
        let keys = KeySet::new(["alpha-key", "beta-key"]);
        assert!(keys.accepts("alpha-key") && keys.accepts("beta-key"));
        for wrong in ["", "alpha", "alpha-key ", "ALPHA-KEY", "gamma-key"] {
            assert!(!keys.accepts(wrong), "{wrong:?}");
        }
        assert!(!KeySet::default().accepts(""));
        let h = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert!(keys.accepts_header(Some(&h("Bearer alpha-key"))));
        assert!(keys.accepts_header(Some(&h("bearer  beta-key"))));
        assert!(!keys.accepts_header(Some(&h("Basic alpha-key"))));
        assert!(!keys.accepts_header(Some(&h("alpha-key"))));
        assert!(!keys.accepts_header(None));
        assert!(!format!("{keys:?}").contains("alpha"));
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        assert!(ClusterSecret::new("short").is_err());
        let s = ClusterSecret::new("  0123456789abcdef0123\n").unwrap();
        assert_eq!(s.env_value(), "0123456789abcdef0123");
        assert_eq!(format!("{s:?}"), "ClusterSecret(<redacted>)");
        let other = ClusterSecret::new("0123456789abcdef0124").unwrap();
        assert_ne!(s.rpc_token(), other.rpc_token());
        let tag = s.mac(&[b"a", b"bc"]);
        assert!(s.verify(&[b"a", b"bc"], &tag));
        // Length prefixes: the same bytes split otherwise are another message.
        assert!(!s.verify(&[b"ab", b"c"], &tag));
        assert!(!other.verify(&[b"a", b"bc"], &tag));
        let (a, b) = (
            ClusterSecret::random().unwrap(),
            ClusterSecret::random().unwrap(),
        );
        assert_ne!(a.env_value(), b.env_value());
        assert_eq!(a.env_value().len(), 64);
    }
}
