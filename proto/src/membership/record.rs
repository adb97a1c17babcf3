//! What a worker publishes about itself under its rank key: a JSON [`WorkerRecord`].
//!
//! JSON, not protobuf, so that an operator can read and write records with `etcdctl` alone.
//! Decoding rejects unknown shapes with an error (a record is input from etcd, which anyone
//! with access may write); unknown extra fields are ignored, so a newer worker's record still
//! reads in an older coordinator.

use std::hash::{BuildHasher, Hasher};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One worker process, as the coordinator needs to find and check it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkerRecord {
    /// The worker's gRPC address, `host:port`, reachable from the coordinator.
    pub grpc_addr: String,
    /// The worker's communicator (all-reduce) address, reachable from the other ranks.
    pub comm_addr: String,
    /// The model as the worker was told it (a path on the worker's machine).
    pub model_path: String,
    /// [`super::model_fingerprint`] of that model: ranks of one replica must agree on it even
    /// when their paths differ (other machines, other mounts).
    pub model_fingerprint: String,
    /// The worker's version (`CARGO_PKG_VERSION`), so mixed versions can be refused.
    pub version: String,
    /// Unique per worker process ([`instance_id`]): tells a worker's own record (say, after
    /// an etcd outage) from another worker's claim of the same rank.
    pub instance: String,
}

impl WorkerRecord {
    /// The record as stored in etcd.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a struct of strings always serializes")
    }

    /// A record read from etcd; an error (never a panic) if it is not one.
    pub fn from_json(bytes: &[u8]) -> anyhow::Result<WorkerRecord> {
        Ok(serde_json::from_slice(bytes)?)
    }
}

/// A fresh instance id for this process: `{hostname}-{pid}-{8 random hex digits}`. The random
/// part tells apart two processes that reuse a pid (containers often start as pid 1).
pub fn instance_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown-host".to_string());
    // std's RandomState is seeded from the OS's randomness: enough for a tiebreaker, no crate.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    h.write_u32(std::process::id());
    format!(
        "{host}-{}-{:08x}",
        std::process::id(),
        h.finish() & 0xffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> WorkerRecord {
        WorkerRecord {
            grpc_addr: "10.0.0.1:50051".into(),
            comm_addr: "10.0.0.1:50052".into(),
            model_path: "/models/m".into(),
            model_fingerprint: "fp1-0123456789abcdef".into(),
            version: "0.1.0".into(),
            instance: "host-1-abcdef01".into(),
        }
    }

    #[test]
    fn json_round_trips_and_rejects_garbage() {
        let r = record();
        assert_eq!(WorkerRecord::from_json(&r.to_json()).unwrap(), r);
        assert!(WorkerRecord::from_json(b"not json").is_err());
        assert!(WorkerRecord::from_json(b"{\"grpc_addr\":\"a\"}").is_err());
        let mut extra: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        extra["future_field"] = 1.into();
        assert_eq!(
            WorkerRecord::from_json(&serde_json::to_vec(&extra).unwrap()).unwrap(),
            r
        );
    }

    #[test]
    fn instance_ids_differ() {
        let a = instance_id();
        let b = instance_id();
        assert_ne!(a, b);
        assert!(a.contains(&format!("-{}-", std::process::id())), "{a}");
    }
}
