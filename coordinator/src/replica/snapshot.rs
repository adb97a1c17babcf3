//! A replica's state as everyone else sees it: one [`ReplicaSnapshot`], published through a
//! `tokio::sync::watch` channel ([`Published`]).
//!
//! Writers: the step loop (the scheduler's numbers after every plan, step totals after every
//! answer, the replica going down), each rank's stream reader (its rank up or not), and the
//! replica's lifecycle (starting, serving, draining). Readers: ModelInfo, `/metrics`, `/health`,
//! gRPC health, and the router of replicas. Numbers change in place without waking anyone (a
//! reader sees them at its next read: a scrape, a ModelInfo call); a lifecycle change wakes every
//! watcher.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use crate::error::ServeError;
use crate::scheduler::SchedulerStats;

/// Where a replica is in its life.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ReplicaState {
    /// Its workers are loading the model.
    #[default]
    Starting,
    Serving,
    /// Shutting down: requests in flight finish, new ones are refused.
    Draining,
    /// Rebuilding itself after losing a rank; requests wait. The reason.
    Recovering(String),
    /// A rank (or the step loop) failed and it cannot serve; the reason.
    Down(String),
}

impl ReplicaState {
    /// Why a new request cannot be accepted now, if it cannot. A recovering replica accepts
    /// requests: they wait in its queue until it serves again.
    pub fn refusal(&self) -> Option<ServeError> {
        match self {
            Self::Serving => None,
            Self::Starting => Some(ServeError::Starting),
            Self::Draining => Some(ServeError::Draining),
            Self::Recovering(_) => None,
            Self::Down(why) => Some(ServeError::ReplicaDown(why.clone())),
        }
    }

    /// Its name in `/health` and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Starting => "starting",
            Self::Serving => "serving",
            Self::Draining => "draining",
            Self::Recovering(_) => "recovering",
            Self::Down(_) => "down",
        }
    }

    /// The reason it is recovering or down.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Self::Recovering(why) | Self::Down(why) => Some(why),
            _ => None,
        }
    }
}

/// Totals over the steps the ranks answered, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StepTotals {
    pub steps: u64,
    /// The slowest rank's time on each step.
    pub compute_us: u64,
    /// Rank 0's wait between back-to-back steps: the coordinator's turnaround.
    pub gap_us: u64,
    /// The longest wait of any rank between back-to-back steps.
    pub rank_wait_us: u64,
}

/// Everything a replica publishes, read by every reader alike.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplicaSnapshot {
    pub state: ReplicaState,
    /// When it entered its state (the router stops sending to a replica recovering too long).
    pub state_since: Option<Instant>,
    pub scheduler: SchedulerStats,
    pub steps: StepTotals,
    /// Whether each rank's step stream is open, in rank order (`helios_worker_up`).
    pub ranks_up: Vec<bool>,
}

/// The writing end of a replica's snapshot; cheap to clone.
#[derive(Debug, Clone)]
pub struct Published(Arc<watch::Sender<ReplicaSnapshot>>);

impl Published {
    /// A starting replica of `world` ranks, none of them up yet.
    pub fn new(world: usize) -> Self {
        Self(Arc::new(watch::Sender::new(ReplicaSnapshot {
            ranks_up: vec![false; world],
            ..Default::default()
        })))
    }

    /// Changes numbers in place: readers see them at their next read; watchers are not woken.
    pub fn update(&self, change: impl FnOnce(&mut ReplicaSnapshot)) {
        self.0.send_if_modified(|s| {
            change(s);
            false
        });
    }

    pub fn set_rank_up(&self, rank: usize, up: bool) {
        self.update(|s| {
            if let Some(r) = s.ranks_up.get_mut(rank) {
                *r = up;
            }
        });
    }

    /// Moves the lifecycle to `state` and wakes every watcher.
    pub fn set_state(&self, state: ReplicaState) {
        self.move_if(|_| true, state);
    }

    /// Moves the lifecycle from `from` to `to`, only if it is at `from`; whether it moved.
    pub fn transition(&self, from: &ReplicaState, to: ReplicaState) -> bool {
        self.move_if(|s| s == from, to)
    }

    /// Starts a drain: a serving or recovering replica turns draining (one starting or down
    /// stays as it is). Whether it moved.
    pub fn start_draining(&self) -> bool {
        let drains =
            |s: &ReplicaState| matches!(s, ReplicaState::Serving | ReplicaState::Recovering(_));
        self.move_if(drains, ReplicaState::Draining)
    }

    /// Moves between serving and recovering, unless the replica is draining: a drain outlasts
    /// a recovery (the replica rebuilds itself and finishes its requests, and takes no new
    /// ones). Whether it moved.
    pub fn set_state_unless_draining(&self, state: ReplicaState) -> bool {
        self.move_if(|s| *s != ReplicaState::Draining, state)
    }

    /// Moves the lifecycle to `to` when `allowed` says so of the state now, noting when, and
    /// wakes every watcher; whether it moved.
    fn move_if(&self, allowed: impl FnOnce(&ReplicaState) -> bool, to: ReplicaState) -> bool {
        self.0.send_if_modified(|s| {
            let moved = allowed(&s.state);
            if moved {
                s.state = to;
                s.state_since = Some(Instant::now());
            }
            moved
        })
    }

    /// The snapshot now.
    pub fn get(&self) -> ReplicaSnapshot {
        self.0.borrow().clone()
    }

    /// Reads the snapshot in place (no copy).
    pub fn read<R>(&self, f: impl FnOnce(&ReplicaSnapshot) -> R) -> R {
        f(&self.0.borrow())
    }

    /// The state now, without copying the rest.
    pub fn state(&self) -> ReplicaState {
        self.0.borrow().state.clone()
    }

    /// A receiver that wakes on every lifecycle change.
    pub fn subscribe(&self) -> watch::Receiver<ReplicaSnapshot> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_change_quietly_and_lifecycle_changes_wake_watchers() {
        let p = Published::new(2);
        let mut rx = p.subscribe();
        p.set_rank_up(1, true);
        p.update(|s| s.steps.steps += 3);
        assert!(!rx.has_changed().expect("open"), "numbers woke a watcher");
        assert_eq!(rx.borrow().steps.steps, 3, "a read sees the numbers");
        assert_eq!(rx.borrow().ranks_up, [false, true]);
        p.set_state(ReplicaState::Serving);
        assert!(rx.has_changed().expect("open"));
        assert_eq!(rx.borrow_and_update().state, ReplicaState::Serving);
        assert!(!p.transition(&ReplicaState::Starting, ReplicaState::Draining));
        assert!(p.transition(&ReplicaState::Serving, ReplicaState::Draining));
        assert_eq!(p.state(), ReplicaState::Draining);
        assert!(rx.has_changed().expect("open"));
        assert_eq!(p.state().refusal(), Some(ServeError::Draining));
    }

    #[test]
    fn a_drain_outlasts_a_recovery_but_not_a_failure() {
        let p = Published::new(1);
        assert!(
            !p.start_draining(),
            "a starting replica has nothing to drain"
        );
        p.set_state(ReplicaState::Serving);
        assert!(p.set_state_unless_draining(ReplicaState::Recovering("rank 0".into())));
        assert!(p.start_draining(), "a recovering replica drains too");
        assert!(!p.set_state_unless_draining(ReplicaState::Serving));
        assert!(!p.set_state_unless_draining(ReplicaState::Recovering("again".into())));
        assert_eq!(p.state(), ReplicaState::Draining);
        p.set_state(ReplicaState::Down("gone".into()));
        assert!(!p.start_draining());
        assert_eq!(p.state(), ReplicaState::Down("gone".into()));
    }
}
