//! Where a replica's workers come from, and how a lost one comes back.
//!
//! Three modes, one code path after discovery: each gives the replica one gRPC address per
//! rank, and, when a rank is lost, the address of its replacement. Everything after that (the
//! sharded client, Init, the step loop, recovery) is the same whatever the mode.
//!
//! - **local** ([`LocalWorkers`]): `helios serve` spawns one `helios-worker` per rank on this
//!   host; a lost one is killed for good (a stopped process would hold its ports) and spawned
//!   again, with backoff and a restart limit.
//! - **static** ([`FixedAddresses`]): `helios coordinator --workers A,B,C` (rank = list
//!   order). A name is resolved at every connect, so a Kubernetes headless-service name that
//!   moves to a new pod keeps working; a lost rank is waited for at the same address.
//! - **etcd** ([`EtcdMembers`]): workers register themselves under a lease; the coordinator
//!   watches its replica's prefix, waits for every rank, refuses a worker of another model or
//!   version, and takes a lease that expires as a lost rank. A lost rank is replaced by the
//!   next worker that claims it. Replicas join when all their ranks are registered and
//!   leave, drained, when marked to ([`discovery`]).

pub mod discovery;
mod etcd;
mod fixed;
pub mod local;

use std::time::Duration;

use anyhow::Result;

pub use self::etcd::{EtcdMembers, EtcdOptions};
pub use self::fixed::FixedAddresses;
pub use self::local::LocalWorkers;

/// How a replica finds its workers.
pub enum Membership {
    Local(LocalWorkers),
    Static(FixedAddresses),
    Etcd(EtcdMembers),
}

impl Membership {
    /// Ranks in the replica.
    pub fn world_size(&self) -> usize {
        match self {
            Self::Local(m) => m.world_size(),
            Self::Static(m) => m.world_size(),
            Self::Etcd(m) => m.world_size(),
        }
    }

    /// Every rank's worker address (`http://host:port`), by rank, once all are present.
    pub async fn addresses(&mut self) -> Result<Vec<String>> {
        match self {
            Self::Local(m) => Ok(m.addresses()),
            Self::Static(m) => Ok(m.addresses()),
            Self::Etcd(m) => m.addresses().await,
        }
    }

    /// Rank `rank` is lost: makes sure it is gone for good where that is ours to do, then
    /// waits for its replacement and returns its address. An error means it cannot come back
    /// (a restart limit was reached); waiting is bounded by the caller.
    pub async fn replace(&mut self, rank: usize) -> Result<String> {
        match self {
            Self::Local(m) => m.respawn(rank).await,
            Self::Static(m) => m.address(rank),
            Self::Etcd(m) => m.replacement(rank).await,
        }
    }

    /// Resolves with a rank that is lost outside any step: its etcd lease expired (hung or
    /// partitioned). Never resolves in the other modes, where a lost rank shows in its step
    /// stream and in its health.
    pub async fn lost(&mut self) -> usize {
        match self {
            Self::Etcd(m) => m.lost().await,
            Self::Local(_) | Self::Static(_) => std::future::pending().await,
        }
    }

    /// The replica is done with its workers: local ones are let go (they exit once their
    /// stdin closes, and are killed after `grace`).
    pub async fn release(&mut self, grace: Duration) {
        if let Self::Local(m) = self {
            m.stop(grace).await;
        }
    }
}
