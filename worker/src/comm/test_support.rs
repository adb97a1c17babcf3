//! Test support, not used by the worker itself: a TCP mesh of ranks on 127.0.0.1 inside one
//! process, each rank on its own thread.
//!
//! The communicator's unit tests and the integration tests that join engines over TCP
//! (`worker/tests`) both need it, and integration tests cannot see `#[cfg(test)]` items, so it
//! is an ordinary public module (hidden from the docs).

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use anyhow::Result;
use helios_proto::auth::ClusterSecret;

use super::{MeshCall, TcpCommunicator, TcpListenerSlot};

/// One rank's place in a local mesh: its bound listener and every rank's address, what a worker
/// holds at Init.
pub struct LocalSeat {
    rank: usize,
    slot: Arc<TcpListenerSlot>,
    addrs: Vec<String>,
}

impl LocalSeat {
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Its listener's address.
    pub fn local_addr_for_tests(&self) -> String {
        self.addrs[self.rank].clone()
    }

    /// Joins the mesh. Blocks until every other rank joins too, so call it on one thread per
    /// rank.
    pub fn join(self) -> Result<TcpCommunicator> {
        self.join_generation(0, &AtomicU64::new(0))
    }

    /// Joins the mesh of `generation` (the seat can join again: its listener stays bound);
    /// `newest` is the newest generation this rank was asked for.
    pub fn join_generation(&self, generation: u64, newest: &AtomicU64) -> Result<TcpCommunicator> {
        let call = MeshCall {
            rank: self.rank,
            peer_addrs: &self.addrs,
            generation,
            newest,
        };
        TcpCommunicator::connect(&self.slot, &call)
    }
}

/// Runs `f(rank, communicator)` for every rank of a `world`-rank [`local_mesh`], each on its
/// own thread; the results by rank. Fails if a rank cannot join or panics.
pub fn on_local_mesh<T: Send + 'static>(
    world: usize,
    f: impl Fn(usize, TcpCommunicator) -> T + Send + Clone + 'static,
) -> Result<Vec<T>> {
    let handles: Vec<_> = local_mesh(world)?
        .into_iter()
        .map(|seat| {
            let f = f.clone();
            std::thread::spawn(move || Ok(f(seat.rank(), seat.join()?)))
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().map_err(|_| anyhow::anyhow!("a rank panicked"))?)
        .collect()
}

/// The seats of a `world`-rank mesh on free ports of 127.0.0.1, by rank (no cluster secret).
pub fn local_mesh(world: usize) -> Result<Vec<LocalSeat>> {
    local_mesh_with(world, || None)
}

/// [`local_mesh`] whose ranks hold `secret()`.
pub fn local_mesh_with(
    world: usize,
    secret: impl Fn() -> Option<ClusterSecret>,
) -> Result<Vec<LocalSeat>> {
    let slots = (0..world)
        .map(|_| TcpListenerSlot::bind("127.0.0.1:0", secret()))
        .collect::<Result<Vec<_>>>()?;
    let addrs = slots
        .iter()
        .map(|s| Ok(s.local_addr()?.to_string()))
        .collect::<Result<Vec<_>>>()?;
    Ok(slots
        .into_iter()
        .enumerate()
        .map(|(rank, slot)| LocalSeat {
            rank,
            slot: Arc::new(slot),
            addrs: addrs.clone(),
        })
        .collect())
}
