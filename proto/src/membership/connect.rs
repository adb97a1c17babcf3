//! How to reach etcd: its endpoints, TLS (a CA to trust, a client certificate) and a user
//! with a password. [`EtcdArgs`] is the command-line form, the same on `helios coordinator`,
//! `helios drain` and `helios-worker`.
//!
//! `https://` endpoints are reached over TLS, trusting `--etcd-ca` (else the public webpki
//! roots), presenting `--etcd-cert`/`--etcd-key` when given (etcd's `--client-cert-auth`);
//! `http://` ones in the clear. With `--etcd-user`, the client authenticates
//! (`Auth/Authenticate`) and sends the token on every call (see [`super::client`]). The
//! password comes from `--etcd-password-file` or `$HELIOS_ETCD_PASSWORD`, never from the
//! command line, and no `Debug` output shows it.

use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The environment variable the etcd password is read from when no file is given.
pub const ETCD_PASSWORD_ENV: &str = "HELIOS_ETCD_PASSWORD";

/// Everything needed to connect to etcd.
#[derive(Debug, Clone, Default)]
pub struct EtcdConnect {
    /// `https://host:port` (TLS), `http://host:port` or a bare `host:port` (clear text).
    pub endpoints: Vec<String>,
    pub tls: EtcdTls,
    /// Authenticate as this user; `None`: etcd's auth is off.
    pub credentials: Option<EtcdCredentials>,
}

/// TLS material for `https://` endpoints, as PEM text (read when the options are built, so a
/// missing file is an error at start-up, not at the first reconnect).
#[derive(Clone, Default)]
pub struct EtcdTls {
    /// The CA that signed etcd's certificate; `None`: the public webpki roots.
    pub ca_pem: Option<Vec<u8>>,
    /// A client certificate and its key, for etcd's `--client-cert-auth`.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for EtcdTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdTls")
            .field("ca", &self.ca_pem.is_some())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl EtcdTls {
    fn is_set(&self) -> bool {
        self.ca_pem.is_some() || self.identity.is_some()
    }
}

/// An etcd user and password; `Debug` shows only the user.
#[derive(Clone)]
pub struct EtcdCredentials {
    pub user: String,
    password: String,
}

impl EtcdCredentials {
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> EtcdCredentials {
        EtcdCredentials {
            user: user.into(),
            password: password.into(),
        }
    }

    pub(crate) fn password(&self) -> &str {
        &self.password
    }
}

impl fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

impl EtcdConnect {
    /// Plain endpoints: no TLS material, no user.
    pub fn new(endpoints: Vec<String>) -> EtcdConnect {
        EtcdConnect {
            endpoints,
            ..Default::default()
        }
    }

    /// Checks the combination: TLS material needs an `https://` endpoint to be used on.
    pub fn validate(&self) -> Result<()> {
        if self.endpoints.is_empty() {
            bail!("no etcd endpoints given");
        }
        if self.tls.is_set() && !self.endpoints.iter().any(|e| is_https(e)) {
            bail!(
                "--etcd-ca/--etcd-cert are given but no etcd endpoint is https:// ({}): they \
                 would not be used; write the endpoints as https://host:port",
                self.endpoints.join(",")
            );
        }
        Ok(())
    }
}

pub(crate) fn is_https(endpoint: &str) -> bool {
    endpoint
        .get(..8)
        .is_some_and(|s| s.eq_ignore_ascii_case("https://"))
}

/// The etcd security flags, the same on every binary that talks to etcd.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct EtcdArgs {
    /// A PEM file of the CA that signed etcd's certificate, trusted for `https://` etcd
    /// endpoints (default: the public webpki roots).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// A PEM client certificate to present to etcd (its `--client-cert-auth`); needs
    /// `--etcd-key`.
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The PEM private key of `--etcd-cert`.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Authenticate to etcd as this user (etcd's `auth enable`); the password comes from
    /// `--etcd-password-file`, else `$HELIOS_ETCD_PASSWORD`.
    #[arg(long, value_name = "NAME")]
    pub etcd_user: Option<String>,
    /// A file holding the password of `--etcd-user` (one line; a trailing newline is ignored).
    #[arg(long, value_name = "FILE", requires = "etcd_user")]
    pub etcd_password_file: Option<PathBuf>,
}

impl EtcdArgs {
    /// The connection options for `endpoints`: reads the files and the password.
    pub fn connect(&self, endpoints: &[String]) -> Result<EtcdConnect> {
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => {
                Some((read_pem(cert, "--etcd-cert")?, read_pem(key, "--etcd-key")?))
            }
            (None, None) => None,
            _ => bail!("--etcd-cert and --etcd-key go together"),
        };
        let ca_pem = match &self.etcd_ca {
            Some(ca) => Some(read_pem(ca, "--etcd-ca")?),
            None => None,
        };
        let credentials = match &self.etcd_user {
            Some(user) => Some(EtcdCredentials::new(user, self.password()?)),
            None => None,
        };
        let connect = EtcdConnect {
            endpoints: endpoints.to_vec(),
            tls: EtcdTls { ca_pem, identity },
            credentials,
        };
        connect.validate()?;
        Ok(connect)
    }

    fn password(&self) -> Result<String> {
        let password = match &self.etcd_password_file {
            Some(file) => std::fs::read_to_string(file)
                .with_context(|| format!("reading --etcd-password-file {}", file.display()))?,
            None => std::env::var(ETCD_PASSWORD_ENV).map_err(|_| {
                anyhow::anyhow!(
                    "--etcd-user needs a password: pass --etcd-password-file or set ${ETCD_PASSWORD_ENV}"
                )
            })?,
        };
        let password = password.trim_end_matches(['\r', '\n']).to_string();
        if password.is_empty() {
            bail!("the etcd password (--etcd-password-file or ${ETCD_PASSWORD_ENV}) is empty");
        }
        Ok(password)
    }
}

fn read_pem(path: &Path, flag: &str) -> Result<Vec<u8>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))?;
    if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
        bail!("{flag} {} is not a PEM file", path.display());
    }
    Ok(pem)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_password() {
        let c = EtcdCredentials::new("root", "hunter2-secret");
        let connect = EtcdConnect {
            credentials: Some(c),
            ..EtcdConnect::new(vec!["http://127.0.0.1:2379".into()])
        };
        let text = format!("{connect:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("root"), "{text}");
    }

    #[test]
    fn tls_material_needs_an_https_endpoint() {
        let mut c = EtcdConnect::new(vec!["http://127.0.0.1:2379".into()]);
        c.tls.ca_pem = Some(b"-----BEGIN CERTIFICATE-----".to_vec());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("https://"), "{e}");
        c.endpoints.push("HTTPS://127.0.0.1:2380".into());
        c.validate().unwrap();
        assert!(EtcdConnect::new(vec![]).validate().is_err());
    }

    #[test]
    fn the_password_comes_from_its_file_without_the_newline() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let args = EtcdArgs {
            etcd_user: Some("root".into()),
            etcd_password_file: Some(file),
            ..Default::default()
        };
        let c = args.connect(&["http://127.0.0.1:2379".into()]).unwrap();
        assert_eq!(c.credentials.unwrap().password(), "s3cret");
        let missing = EtcdArgs {
            etcd_ca: Some(dir.path().join("nope.pem")),
            ..Default::default()
        };
        let e = format!(
            "{:#}",
            missing.connect(&["https://h:1".into()]).unwrap_err()
        );
        assert!(e.contains("--etcd-ca"), "{e}");
    }
}
