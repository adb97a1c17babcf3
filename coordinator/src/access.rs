//! Who may use the client APIs: API keys (`--api-key-file`, `$HELIOS_API_KEY`), checked by both
//! front doors alike. gRPC refuses a call without a key UNAUTHENTICATED (the health service
//! stays open for probes); HTTP answers 401 in OpenAI's shape (`/health` and `/live` stay open, and
//! `/metrics` unless `--protect-metrics`). Keys are kept as digests and never logged.

use std::path::Path;

use anyhow::{bail, Context, Result};
use helios_proto::auth::{KeySet, RequireBearer};

/// The environment variable that may hold API keys (comma-separated), beside the file.
pub const API_KEY_ENV: &str = "HELIOS_API_KEY";

/// gRPC paths served without a key: health checks, for load balancers and Kubernetes probes.
pub const OPEN_GRPC_PATHS: &[&str] = &["/grpc.health.v1.Health/"];

/// HTTP paths served without a key: readiness and liveness, for Kubernetes probes.
pub const OPEN_HTTP_PATHS: &[&str] = &["/health", "/live"];

/// What the client APIs require.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// None: no keys configured, the APIs are open.
    pub keys: Option<KeySet>,
    /// `/metrics` needs a key too.
    pub protect_metrics: bool,
}

impl Access {
    /// Keys from `file` (one per line; blank lines and `#` comments skipped) and from
    /// `$HELIOS_API_KEY`; none of either: open.
    pub fn load(file: Option<&Path>, protect_metrics: bool) -> Result<Self> {
        let mut keys: Vec<String> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading --api-key-file {}", path.display()))?;
            let before = keys.len();
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_string),
            );
            if keys.len() == before {
                bail!("--api-key-file {}: no key in it", path.display());
            }
        }
        if let Ok(v) = std::env::var(API_KEY_ENV) {
            keys.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|k| !k.is_empty())
                    .map(str::to_string),
            );
        }
        if let Some(k) = keys
            .iter()
            .find(|k| k.chars().any(|c| !c.is_ascii_graphic()))
        {
            bail!(
                "an API key may hold only printable ASCII without spaces (one of {} is not; it is {} bytes long)",
                keys.len(),
                k.len()
            );
        }
        if protect_metrics && keys.is_empty() {
            bail!("--protect-metrics needs API keys (--api-key-file or ${API_KEY_ENV})");
        }
        Ok(Self {
            keys: (!keys.is_empty()).then(|| KeySet::new(&keys)),
            protect_metrics,
        })
    }

    /// The tower layer of the gRPC server.
    pub fn grpc_layer(&self) -> RequireBearer {
        RequireBearer::new(self.keys.clone(), OPEN_GRPC_PATHS, "an API key")
    }

    /// Whether an HTTP request to `path` with this `authorization` header may proceed:
    /// `Err(presented)` if not (whether a credential was sent at all).
    pub fn check_http(
        &self,
        path: &str,
        authorization: Option<&http::HeaderValue>,
    ) -> Result<(), bool> {
        let Some(keys) = &self.keys else {
            return Ok(());
        };
        let open = OPEN_HTTP_PATHS.contains(&path) || (path == "/metrics" && !self.protect_metrics);
        if open || keys.accepts_header(authorization) {
            Ok(())
        } else {
            Err(authorization.is_some())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_a_file_and_guard_all_but_the_probes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys");
        std::fs::write(&file, "# ops\nkey-one\n\n  key-two  \n").unwrap();
        let access = Access::load(Some(&file), false).unwrap();
        let h = |s: &str| http::HeaderValue::from_str(s).unwrap();
        for path in ["/v1/completions", "/v1/chat/completions", "/v1/models"] {
            assert_eq!(access.check_http(path, None), Err(false), "{path}");
            assert_eq!(access.check_http(path, Some(&h("Bearer nope"))), Err(true));
            assert!(access.check_http(path, Some(&h("Bearer key-two"))).is_ok());
        }
        assert!(access.check_http("/health", None).is_ok());
        assert!(access.check_http("/live", None).is_ok());
        assert!(access.check_http("/metrics", None).is_ok());
        let guarded = Access::load(Some(&file), true).unwrap();
        assert_eq!(guarded.check_http("/metrics", None), Err(false));
        assert!(guarded
            .check_http("/metrics", Some(&h("Bearer key-one")))
            .is_ok());
        std::fs::write(&file, "# nothing\n").unwrap();
        assert!(Access::load(Some(&file), false).is_err());
        // Without keys the APIs are open (and /metrics cannot be guarded).
        assert!(Access::default()
            .check_http("/v1/completions", None)
            .is_ok());
    }
}
