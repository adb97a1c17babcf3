//! etcd mode with replicas that come and go: which replicas of the cluster the front door
//! serves.
//!
//! Every [`POLL`] the coordinator lists the cluster's rank keys and drain keys:
//! - a replica all of whose ranks (`--tp`) are registered, and which is not marked to drain,
//!   joins: its own [`EtcdMembers`] watches its ranks (waiting for acceptable workers, taking a
//!   lost rank as lost) and the front door starts it; it takes requests once its workers have
//!   loaded the model;
//! - a replica marked to drain (`/helios/{cluster}/drain/{replica}`, which `helios drain`
//!   writes) takes no new requests, finishes those it holds (for up to the drain grace), and
//!   is let go; its workers may then be stopped. Once the mark is deleted and its ranks are
//!   registered, it joins again.
//!
//! Listing beats watching here: this is the coordinator alone asking for a few keys once in a
//! while, a joining replica takes seconds to load anyway, and a listing after an etcd outage
//! needs no catching up. A rank's loss is not found here but by the replica's own watch, its
//! step streams and its health probes (see [`super::etcd`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use anyhow::Result;
use helios_proto::membership::{
    is_auth_refused, EtcdClient, EtcdConnect, RankKey, DEFAULT_RPC_TIMEOUT,
};
use tokio::sync::mpsc;

use super::{EtcdMembers, EtcdOptions, Membership};
use crate::front_door::FrontDoor;

/// How often the cluster's replicas are listed.
pub const POLL: Duration = Duration::from_millis(500);

/// What one listing found.
#[derive(Debug, Default, PartialEq, Eq)]
struct ClusterView {
    /// Replica → the ranks registered.
    ranks: BTreeMap<u32, BTreeSet<u32>>,
    /// Replicas marked to drain.
    drain: BTreeSet<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Joining,
    Joined,
    Leaving,
}

/// How a replica's join or leave ended.
enum Outcome {
    Joined,
    /// It left, or failed to join (logged): it may join again.
    Gone,
}

/// Serves every complete replica of the cluster behind `front` as it comes and goes; runs until
/// the front door shuts down. `template` is every replica's etcd options but its number;
/// `grace` bounds a draining replica's wait for its requests.
pub async fn follow(front: FrontDoor, template: EtcdOptions, grace: Duration) {
    let mut known: HashMap<u32, Phase> = HashMap::new();
    let (report, mut reports) = mpsc::unbounded_channel();
    let mut client: Option<EtcdClient> = None;
    let mut unreachable = false;
    loop {
        while let Ok((id, outcome)) = reports.try_recv() {
            match outcome {
                Outcome::Joined => known.insert(id, Phase::Joined),
                Outcome::Gone => known.remove(&id),
            };
        }
        if front.is_draining() {
            return;
        }
        match list(&mut client, &template).await {
            Ok(view) => {
                if unreachable {
                    tracing::info!("etcd reachable again: following the cluster's replicas");
                    unreachable = false;
                }
                act(&front, &template, grace, &view, &mut known, &report);
            }
            Err(e) => {
                client = None;
                if !unreachable {
                    tracing::warn!("listing the cluster's replicas in etcd: {e:#}; retrying");
                    unreachable = true;
                }
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Starts the replicas that are complete and new, and lets go those marked to drain.
fn act(
    front: &FrontDoor,
    template: &EtcdOptions,
    grace: Duration,
    view: &ClusterView,
    known: &mut HashMap<u32, Phase>,
    report: &mpsc::UnboundedSender<(u32, Outcome)>,
) {
    let world = template.world as u32;
    for (&id, ranks) in &view.ranks {
        let complete = (0..world).all(|r| ranks.contains(&r));
        if !complete || view.drain.contains(&id) || known.contains_key(&id) {
            continue;
        }
        known.insert(id, Phase::Joining);
        let (front, report) = (front.clone(), report.clone());
        let opts = EtcdOptions {
            replica: id,
            ..template.clone()
        };
        tokio::spawn(async move {
            let outcome = match join(&front, id, opts).await {
                Ok(()) => Outcome::Joined,
                Err(e) => {
                    tracing::error!(replica = id, "replica {id} could not join: {e:#}");
                    Outcome::Gone
                }
            };
            let _ = report.send((id, outcome));
        });
    }
    for (&id, phase) in known.iter_mut() {
        if *phase == Phase::Joined && view.drain.contains(&id) {
            *phase = Phase::Leaving;
            let (front, report) = (front.clone(), report.clone());
            tokio::spawn(async move {
                front.remove_replica(id, grace).await;
                let _ = report.send((id, Outcome::Gone));
            });
        }
    }
}

async fn join(front: &FrontDoor, id: u32, opts: EtcdOptions) -> Result<()> {
    tracing::info!(
        replica = id,
        "replica {id} is registered in etcd: starting it"
    );
    let members = EtcdMembers::start(opts).await?;
    front.add_replica(id, Membership::Etcd(members)).await?;
    Ok(())
}

/// Refuses credentials etcd refuses (they never fix themselves, and `follow` would retry them
/// forever); an etcd that cannot be reached yet is `follow`'s to wait for.
pub async fn check_credentials(etcd: &EtcdConnect) -> Result<()> {
    match EtcdClient::connect(etcd, DEFAULT_RPC_TIMEOUT).await {
        Err(e) if is_auth_refused(&e) => Err(e),
        _ => Ok(()),
    }
}

/// Lists the cluster's rank keys and drain keys (connecting first if need be).
async fn list(client: &mut Option<EtcdClient>, opts: &EtcdOptions) -> Result<ClusterView> {
    if client.is_none() {
        *client = Some(EtcdClient::connect(&opts.etcd, DEFAULT_RPC_TIMEOUT).await?);
    }
    let Some(etcd) = client.as_ref() else {
        anyhow::bail!("no etcd client");
    };
    let mut view = ClusterView::default();
    let (ranks, _) = etcd
        .get_prefix(&RankKey::replicas_prefix(&opts.cluster))
        .await?;
    for kv in ranks {
        // Anything else under the prefix was written by someone else: not ours to read.
        if let Ok(k) = RankKey::parse(&String::from_utf8_lossy(&kv.key)) {
            view.ranks.entry(k.replica).or_default().insert(k.rank);
        }
    }
    let prefix = RankKey::drain_prefix(&opts.cluster);
    let (drains, _) = etcd.get_prefix(&prefix).await?;
    for kv in drains {
        let key = String::from_utf8_lossy(&kv.key);
        if let Some(Ok(id)) = key.strip_prefix(&prefix).map(str::parse::<u32>) {
            view.drain.insert(id);
        }
    }
    Ok(view)
}
