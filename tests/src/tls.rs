//! Certificates for tests, made with rcgen: a CA, a server certificate for 127.0.0.1 and
//! `localhost`, a client certificate, and a key of neither (for a mismatched pair), as PEM
//! files in a temporary folder.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};

fn subject(common: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common);
    dn
}

pub struct TestPki {
    dir: tempfile::TempDir,
}

impl TestPki {
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name = subject("Helios test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem);
        write("ca.pem", ca.pem())?;
        for (name, sans) in [
            (
                "server",
                vec!["127.0.0.1".to_string(), "localhost".to_string()],
            ),
            ("client", vec!["helios-test-client".to_string()]),
        ] {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(sans)?;
            // A subject of its own: one equal to the CA's reads as self-signed.
            params.distinguished_name = subject(&format!("Helios test {name}"));
            let cert = params.signed_by(&key, &ca)?;
            write(&format!("{name}.pem"), cert.pem())?;
            write(&format!("{name}.key"), key.serialize_pem())?;
        }
        write("other.key", KeyPair::generate()?.serialize_pem())?;
        Ok(Self { dir })
    }

    /// `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`, `other.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `path(name)` as a `&str` argument.
    pub fn arg(&self, name: &str) -> String {
        self.path(name).to_string_lossy().into_owned()
    }
}
