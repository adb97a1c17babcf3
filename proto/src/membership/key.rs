//! Where a worker's record lives in etcd: `/helios/{cluster}/replicas/{replica}/ranks/{rank}`.
//!
//! One key per (cluster, replica, rank), so that claiming a rank is one etcd transaction
//! ("create if absent") and two workers can never hold the same rank. Every prefix ends with
//! `/`, so replica 1's prefix never matches replica 10's keys. Numbers are written in decimal
//! without leading zeros, and parsing insists on that form, so one rank has exactly one key.

use std::fmt;

/// The root of everything Helios writes in etcd.
pub const ROOT: &str = "/helios/";

/// The longest cluster name: a DNS label's length, so a name fits wherever operators reuse it.
pub const MAX_CLUSTER_NAME_LEN: usize = 63;

/// A key (or a cluster name) that is not Helios' layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error(
        "invalid cluster name {name:?}: it must be 1 to {MAX_CLUSTER_NAME_LEN} characters of \
         A-Z, a-z, 0-9, '.', '_' or '-'"
    )]
    ClusterName { name: String },
    #[error("{key:?} is not a Helios rank key (/helios/CLUSTER/replicas/N/ranks/N): {why}")]
    Malformed { key: String, why: &'static str },
}

/// Checks a cluster name: it becomes one path segment of every key, so it may not contain `/`
/// (nor anything else that would make keys awkward to read or to type in `etcdctl`).
pub fn validate_cluster(name: &str) -> Result<(), KeyError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_CLUSTER_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::ClusterName {
            name: name.to_string(),
        })
    }
}

/// One rank of one replica of one cluster: the unit a worker claims.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RankKey {
    pub cluster: String,
    pub replica: u32,
    pub rank: u32,
}

impl RankKey {
    /// A key for `rank` of `replica` in `cluster`; fails on an invalid cluster name.
    pub fn new(cluster: &str, replica: u32, rank: u32) -> Result<RankKey, KeyError> {
        validate_cluster(cluster)?;
        Ok(RankKey {
            cluster: cluster.to_string(),
            replica,
            rank,
        })
    }

    /// The etcd key: `/helios/{cluster}/replicas/{replica}/ranks/{rank}`.
    pub fn key(&self) -> String {
        format!(
            "{}ranks/{}",
            Self::replica_prefix(&self.cluster, self.replica),
            self.rank
        )
    }

    /// The prefix of every rank of one replica: `/helios/{cluster}/replicas/{replica}/`.
    pub fn replica_prefix(cluster: &str, replica: u32) -> String {
        format!("{}replicas/{replica}/", Self::cluster_prefix(cluster))
    }

    /// The prefix of every replica's ranks: `/helios/{cluster}/replicas/`.
    pub fn replicas_prefix(cluster: &str) -> String {
        format!("{}replicas/", Self::cluster_prefix(cluster))
    }

    /// The key that tells the coordinators of a cluster to drain a replica and let it go
    /// (`helios drain`): `/helios/{cluster}/drain/{replica}`. Its value does not matter.
    pub fn drain_key(cluster: &str, replica: u32) -> String {
        format!("{}drain/{replica}", Self::cluster_prefix(cluster))
    }

    /// The prefix of every drain key: `/helios/{cluster}/drain/`.
    pub fn drain_prefix(cluster: &str) -> String {
        format!("{}drain/", Self::cluster_prefix(cluster))
    }

    /// The prefix of everything of one cluster: `/helios/{cluster}/`.
    pub fn cluster_prefix(cluster: &str) -> String {
        format!("{ROOT}{cluster}/")
    }

    /// Parses a key written by [`RankKey::key`]; anything else is an error, never a panic
    /// (keys come from etcd, where anyone may write anything).
    pub fn parse(key: &str) -> Result<RankKey, KeyError> {
        let bad = |why| KeyError::Malformed {
            key: key.to_string(),
            why,
        };
        let rest = key
            .strip_prefix(ROOT)
            .ok_or_else(|| bad("not under /helios/"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [cluster, "replicas", replica, "ranks", rank] = parts.as_slice() else {
            return Err(bad("wrong shape"));
        };
        validate_cluster(cluster).map_err(|_| bad("invalid cluster name"))?;
        Ok(RankKey {
            cluster: cluster.to_string(),
            replica: parse_number(replica).ok_or_else(|| bad("replica is not a number"))?,
            rank: parse_number(rank).ok_or_else(|| bad("rank is not a number"))?,
        })
    }
}

/// A canonical decimal u32: no sign, no leading zeros (so `01` is not a second key for 1).
fn parse_number(s: &str) -> Option<u32> {
    let n: u32 = s.parse().ok()?;
    (n.to_string() == s).then_some(n)
}

impl fmt::Display for RankKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rank {} of replica {} in cluster {:?}",
            self.rank, self.replica, self.cluster
        )
    }
}

/// The end of the etcd range holding every key that starts with `prefix` (etcd's `range_end`):
/// the prefix with its last byte below 0xff incremented, or `\0` (to the end) if there is none.
pub fn prefix_range_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_layout_round_trips() {
        let k = RankKey::new("demo", 0, 1).unwrap();
        assert_eq!(k.key(), "/helios/demo/replicas/0/ranks/1");
        assert_eq!(RankKey::parse(&k.key()).unwrap(), k);
        assert!(k.key().starts_with(&RankKey::replica_prefix("demo", 0)));
        assert!(k.key().starts_with(&RankKey::cluster_prefix("demo")));
        assert!(!RankKey::new("demo", 10, 0)
            .unwrap()
            .key()
            .starts_with(&RankKey::replica_prefix("demo", 1)));
        assert_eq!(
            k.to_string(),
            "rank 1 of replica 0 in cluster \"demo\"".to_string()
        );
    }

    #[test]
    fn malformed_keys_are_errors() {
        for key in [
            "",
            "/helios/",
            "/other/demo/replicas/0/ranks/1",
            "/helios/demo/replicas/0/ranks/",
            "/helios/demo/replicas/0/ranks/x",
            "/helios/demo/replicas/0/ranks/01",
            "/helios/demo/replicas/0/ranks/+1",
            "/helios/demo/replicas/0/ranks/-1",
            "/helios/demo/replicas/0/ranks/4294967296",
            "/helios/demo/replicas/0/ranks/1/extra",
            "/helios/demo/replica/0/ranks/1",
            "/helios//replicas/0/ranks/1",
            "/helios/de mo/replicas/0/ranks/1",
        ] {
            assert!(
                matches!(RankKey::parse(key), Err(KeyError::Malformed { .. })),
                "{key:?} parsed"
            );
        }
    }

    #[test]
    fn cluster_names_are_validated() {
        for ok in ["demo", "a", "prod-eu.1_b", &"x".repeat(63)] {
            validate_cluster(ok).unwrap();
        }
        for bad in ["", "a/b", "a b", "é", &"x".repeat(64)] {
            let e = validate_cluster(bad).unwrap_err();
            assert!(e.to_string().contains("invalid cluster name"), "{e}");
        }
        assert!(RankKey::new("a/b", 0, 0).is_err());
    }

    #[test]
    fn prefix_range_end_covers_the_prefix() {
        assert_eq!(prefix_range_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_range_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_range_end(b"\xff"), vec![0]);
    }
}
