//! Static membership: workers started separately, listed by address in rank order
//! (`helios coordinator --workers A,B,C`).
//!
//! Addresses may be names: the sharded client resolves them at every connect, so a name that
//! moves to a new IP (a Kubernetes headless service whose pod was replaced) keeps working. A
//! lost rank is waited for at its address: whoever serves there next (the same worker
//! restarted, or a new pod under the same name) is the replacement.

use anyhow::{bail, Context, Result};

pub struct FixedAddresses {
    addrs: Vec<String>,
}

impl FixedAddresses {
    /// `host:port` or `http://host:port`, by rank.
    pub fn new(addrs: &[String]) -> Result<Self> {
        if addrs.is_empty() {
            bail!("no worker addresses");
        }
        let addrs = addrs
            .iter()
            .map(|a| {
                let a = a.trim();
                if a.is_empty() {
                    bail!("an empty worker address");
                }
                Ok(if a.contains("://") {
                    a.to_string()
                } else {
                    format!("http://{a}")
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { addrs })
    }

    pub fn world_size(&self) -> usize {
        self.addrs.len()
    }

    pub fn addresses(&self) -> Vec<String> {
        self.addrs.clone()
    }

    pub fn address(&self, rank: usize) -> Result<String> {
        self.addrs
            .get(rank)
            .cloned()
            .with_context(|| format!("no rank {rank} among {} workers", self.addrs.len()))
    }
}
