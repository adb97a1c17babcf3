//! The replicas behind the front door: a list that changes at run time (replicas join when
//! ready and leave after draining), and the state they add up to.
//!
//! The front door's state is the best of its replicas' ([`best_state`]): it serves while any
//! replica serves. gRPC health and `/health` follow it through one watch channel that every
//! replica's lifecycle changes wake ([`Replicas::watch`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};

use tokio::sync::watch;

use crate::replica::{Replica, ReplicaState};

pub struct Replicas {
    list: RwLock<Vec<Replica>>,
    state: watch::Sender<ReplicaState>,
    /// The front door is shutting down: it is draining whatever its replicas say.
    draining: AtomicBool,
}

impl Default for Replicas {
    fn default() -> Self {
        Self {
            list: RwLock::default(),
            state: watch::Sender::new(ReplicaState::Starting),
            draining: AtomicBool::new(false),
        }
    }
}

impl Replicas {
    /// Every replica now, in id order.
    pub fn all(&self) -> Vec<Replica> {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn get(&self, id: u32) -> Option<Replica> {
        self.list
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|r| r.id() == id)
            .cloned()
    }

    /// Adds a started replica (replacing one of the same id) and follows its lifecycle.
    pub fn add(self: &Arc<Self>, replica: Replica) {
        {
            let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
            list.retain(|r| r.id() != replica.id());
            list.push(replica.clone());
            list.sort_by_key(Replica::id);
        }
        self.refresh();
        let (weak, mut changes) = (Arc::downgrade(self), replica.watch());
        tokio::spawn(async move {
            while changes.changed().await.is_ok() {
                match Weak::upgrade(&weak) {
                    Some(replicas) => replicas.refresh(),
                    None => return,
                }
            }
        });
    }

    /// Takes replica `id` out of the list; it gets no more requests.
    pub fn remove(&self, id: u32) -> Option<Replica> {
        let removed = {
            let mut list = self.list.write().unwrap_or_else(PoisonError::into_inner);
            let i = list.iter().position(|r| r.id() == id)?;
            list.remove(i)
        };
        self.refresh();
        Some(removed)
    }

    /// The front door is shutting down.
    pub fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
        self.refresh();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// The state the replicas add up to, now.
    pub fn state(&self) -> ReplicaState {
        self.state_of(&self.all())
    }

    /// The state `list` (these replicas, as [`Self::all`] gave them) adds up to.
    pub fn state_of(&self, list: &[Replica]) -> ReplicaState {
        if self.is_draining() {
            return ReplicaState::Draining;
        }
        best_state(list.iter().map(Replica::state))
    }

    /// A receiver of that state, woken when it changes.
    pub fn watch(&self) -> watch::Receiver<ReplicaState> {
        self.state.subscribe()
    }

    fn refresh(&self) {
        let now = self.state();
        self.state.send_if_modified(|s| {
            let changed = *s != now;
            *s = now;
            changed
        });
    }
}

/// The best of several replicas' states: serving if one serves, else recovering (requests
/// wait), draining, starting, and down only when all are down. No replica: starting.
pub fn best_state(states: impl IntoIterator<Item = ReplicaState>) -> ReplicaState {
    let rank = |s: &ReplicaState| match s {
        ReplicaState::Serving => 4,
        ReplicaState::Recovering(_) => 3,
        ReplicaState::Draining => 2,
        ReplicaState::Starting => 1,
        ReplicaState::Down(_) => 0,
    };
    states
        .into_iter()
        .max_by_key(rank)
        .unwrap_or(ReplicaState::Starting)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_door_serves_while_any_replica_serves() {
        let down = || ReplicaState::Down("gone".into());
        let recovering = || ReplicaState::Recovering("rank 1".into());
        assert_eq!(best_state([]), ReplicaState::Starting);
        assert_eq!(
            best_state([down(), ReplicaState::Serving]),
            ReplicaState::Serving
        );
        assert_eq!(best_state([down(), recovering()]), recovering());
        assert_eq!(
            best_state([down(), ReplicaState::Starting]),
            ReplicaState::Starting
        );
        assert_eq!(best_state([down()]), down());
    }
}
