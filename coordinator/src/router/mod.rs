//! The router: which replica a request goes to.
//!
//! Policies (`--router`):
//! - **cache-aware** (the default): the replica whose prefix cache holds the most leading
//!   blocks of the prompt. The coordinator knows every replica's cached block hashes exactly
//!   ([`PrefixIndex`]), so this is a lookup of the prompt's chained block hashes, not the
//!   approximate per-worker radix tree of SGLang's router. Balanced against load so that one
//!   hot prefix does not pile everything onto one replica: the cache's choice is overruled by
//!   the least loaded replica when it holds more than `--router-balance` requests beyond it
//!   (SGLang's `balance_abs_threshold`), or when its free KV blocks cannot hold what the prompt
//!   would add there. A prompt no replica holds any of goes to the least loaded.
//! - **least-load**: the replica holding the fewest requests (accepted, not ended), then the
//!   fewest cached blocks (so that new prefixes spread), then the most free KV blocks.
//! - **round-robin**: each replica in turn.
//!
//! A request with a session id (gRPC `session_id`, OpenAI `user`) goes where its session went
//! before while that replica serves ([`sessions`]); otherwise the policy chooses and the
//! session follows.
//!
//! Only replicas that serve are chosen. When none does, one that is recovering but not yet for
//! `--failover-after` takes requests into its queue (with one replica this is the recovery of
//! a lost worker, unchanged); when none is, one recovering for longer does, which hands them
//! to the front door to wait for a replica that serves (the requests it held wait there too).
//! A replica down, draining or starting gets none.

pub mod sessions;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::prefix_index::{prompt_hashes, PrefixIndex};
use crate::replica::{ReplicaSnapshot, ReplicaState};

pub use self::sessions::Sessions;

/// How the router chooses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Policy {
    #[default]
    CacheAware,
    LeastLoad,
    RoundRobin,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Self::CacheAware => "cache-aware",
            Self::LeastLoad => "least-load",
            Self::RoundRobin => "round-robin",
        }
    }
}

/// Requests a replica may hold beyond the least loaded one and still win on its cache.
pub const DEFAULT_BALANCE: usize = 8;
/// Seconds a replica may be recovering before its requests move to another.
pub const DEFAULT_FAILOVER_AFTER: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy)]
pub struct RouterOptions {
    pub policy: Policy,
    /// `--router-balance` (see the module doc).
    pub balance: usize,
    /// A replica recovering this long gets no new requests and hands its own to the others;
    /// `None`: never (one replica, nowhere else to go).
    pub failover_after: Option<Duration>,
}

impl Default for RouterOptions {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            balance: DEFAULT_BALANCE,
            failover_after: None,
        }
    }
}

/// Why a replica was chosen (the `reason` label of `helios_requests_routed_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// It holds the longest cached prefix of the prompt.
    Cache,
    /// It is the least loaded.
    Load,
    /// The request's session went there before.
    Session,
    RoundRobin,
    /// Moved off a lost replica.
    Moved,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Self::Cache,
        Self::Load,
        Self::Session,
        Self::RoundRobin,
        Self::Moved,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Cache => "cache",
            Self::Load => "load",
            Self::Session => "session",
            Self::RoundRobin => "round_robin",
            Self::Moved => "moved",
        }
    }
}

/// Whether a replica takes new requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Accepts {
    No,
    /// Recovering for longer than `failover_after`: only when no other replica takes requests
    /// (it passes them on to wait at the front door for one that serves).
    Late,
    /// Recovering, not yet for `failover_after`: only when no replica serves.
    Queueing,
    Serving,
}

impl Accepts {
    /// What a replica in snapshot `now` takes, given the failover threshold.
    pub fn of(now: &ReplicaSnapshot, failover_after: Option<Duration>) -> Self {
        match &now.state {
            ReplicaState::Serving => Self::Serving,
            ReplicaState::Recovering(_) => {
                let fresh = match (failover_after, now.state_since) {
                    (Some(after), Some(since)) => since.elapsed() < after,
                    _ => true,
                };
                if fresh {
                    Self::Queueing
                } else {
                    Self::Late
                }
            }
            _ => Self::No,
        }
    }
}

/// A replica as the router sees it.
#[derive(Debug, Clone, Copy)]
pub struct ReplicaView<'a> {
    pub id: u32,
    pub accepts: Accepts,
    /// Requests it holds (accepted, not ended).
    pub load: usize,
    pub kv_blocks_free: usize,
    /// Its cached blocks. Among equally loaded replicas a new prefix goes to the one holding
    /// fewest, so new prefixes spread instead of evicting each other on one.
    pub prefixes: &'a PrefixIndex,
}

/// A request as the router sees it.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest<'a> {
    pub prompt: &'a [u32],
    pub session: Option<&'a str>,
    /// A request moving off a lost replica: never to one recovering too long (which would only
    /// hand it back; the replica it left is one from the moment it hands its requests over, or
    /// down), so it waits at the front door until one serves.
    pub moving: bool,
}

pub struct Router {
    opts: RouterOptions,
    block_size: usize,
    sessions: Sessions,
    next: AtomicUsize,
}

impl Router {
    /// A router over replicas whose KV blocks hold `block_size` positions.
    pub fn new(opts: RouterOptions, block_size: usize) -> Self {
        Self {
            opts,
            block_size: block_size.max(1),
            sessions: Sessions::default(),
            next: AtomicUsize::new(0),
        }
    }

    pub fn options(&self) -> &RouterOptions {
        &self.opts
    }

    /// The index in `replicas` of the replica for `req`, and why; `None` when none takes
    /// requests.
    pub fn choose(
        &self,
        replicas: &[ReplicaView<'_>],
        req: RouteRequest<'_>,
    ) -> Option<(usize, Reason)> {
        // The best any replica offers, and the replicas that offer it.
        let level = replicas.iter().map(|r| r.accepts).max()?;
        let lowest = if req.moving {
            Accepts::Queueing
        } else {
            Accepts::Late
        };
        if level < lowest {
            return None;
        }
        let candidates: Vec<usize> = (0..replicas.len())
            .filter(|&i| replicas[i].accepts == level)
            .collect();
        if let Some(session) = req.session {
            let sticky = self.sessions.get(session).and_then(|id| {
                candidates
                    .iter()
                    .copied()
                    .find(|&i| replicas[i].id == id && replicas[i].accepts == Accepts::Serving)
            });
            if let Some(i) = sticky {
                return Some((i, Reason::Session));
            }
        }
        let chosen = match self.opts.policy {
            Policy::CacheAware => self.cache_aware(replicas, &candidates, req.prompt),
            Policy::LeastLoad => (least_loaded(replicas, &candidates), Reason::Load),
            Policy::RoundRobin => {
                let n = self.next.fetch_add(1, Ordering::Relaxed);
                (candidates[n % candidates.len()], Reason::RoundRobin)
            }
        };
        if let Some(session) = req.session {
            self.sessions.set(session, replicas[chosen.0].id);
        }
        Some(chosen)
    }

    fn cache_aware(
        &self,
        replicas: &[ReplicaView<'_>],
        candidates: &[usize],
        prompt: &[u32],
    ) -> (usize, Reason) {
        let hashes = prompt_hashes(prompt, self.block_size);
        let least = least_loaded(replicas, candidates);
        // The most cached blocks; among equals, the least loaded.
        let (best, cached) = candidates
            .iter()
            .map(|&i| (i, replicas[i].prefixes.cached_blocks(&hashes)))
            .max_by(|a, b| {
                a.1.cmp(&b.1)
                    .then(replicas[b.0].load.cmp(&replicas[a.0].load))
            })
            .unwrap_or((least, 0));
        if cached == 0 {
            return (least, Reason::Load);
        }
        let (b, l) = (&replicas[best], &replicas[least]);
        let needs = prompt
            .len()
            .div_ceil(self.block_size)
            .saturating_sub(cached);
        let overloaded = b.load > l.load + self.opts.balance;
        let short_of_kv = b.kv_blocks_free < needs && l.kv_blocks_free > b.kv_blocks_free;
        if overloaded || short_of_kv {
            (least, Reason::Load)
        } else {
            (best, Reason::Cache)
        }
    }
}

/// The candidate holding the fewest requests, then the fewest cached blocks, then the most
/// free KV blocks, then the lowest id.
fn least_loaded(replicas: &[ReplicaView<'_>], candidates: &[usize]) -> usize {
    candidates
        .iter()
        .copied()
        .min_by(|&a, &b| {
            let (a, b) = (&replicas[a], &replicas[b]);
            a.load
                .cmp(&b.load)
                .then(a.prefixes.len().cmp(&b.prefixes.len()))
                .then(b.kv_blocks_free.cmp(&a.kv_blocks_free))
                .then(a.id.cmp(&b.id))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
