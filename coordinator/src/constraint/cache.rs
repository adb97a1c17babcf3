//! Compiled grammars kept for reuse: agents send the same schema with every call, and a
//! schema compiles in milliseconds that a cached parser skips.
//!
//! Bounded by entries, in memory only: vLLM's and others' grammar caches that grew on disk
//! (CVE-2025-29770) or without bound in memory are the failure to avoid. Least recently used
//! goes first; a lookup is a hash, eviction a scan of at most the bound.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use llguidance::TokenParser;

use super::ConstraintSpec;

pub struct GrammarCache {
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Default)]
struct Entries {
    map: HashMap<ConstraintSpec, (TokenParser, u64)>,
    clock: u64,
}

impl GrammarCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::default(),
        }
    }

    /// A fresh copy of the parser compiled for `spec`, if kept.
    pub fn get(&self, spec: &ConstraintSpec) -> Option<TokenParser> {
        let mut e = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        e.clock += 1;
        let now = e.clock;
        let (parser, used) = e.map.get_mut(spec)?;
        *used = now;
        Some(parser.deep_clone())
    }

    /// Whether it keeps anything (a size of 0 turns it off).
    pub fn keeps(&self) -> bool {
        self.capacity > 0
    }

    pub fn insert(&self, spec: ConstraintSpec, parser: TokenParser) {
        if self.capacity == 0 {
            return;
        }
        let mut e = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if e.map.len() >= self.capacity && !e.map.contains_key(&spec) {
            let oldest = e.map.iter().min_by_key(|(_, (_, used))| *used);
            if let Some(k) = oldest.map(|(k, _)| k.clone()) {
                e.map.remove(&k);
            }
        }
        e.clock += 1;
        let now = e.clock;
        e.map.insert(spec, (parser, now));
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |e| e.map.len())
    }
}

/// A counting semaphore for blocking threads (compiles run on admission's blocking pool).
pub struct Permits {
    free: Mutex<usize>,
    freed: Condvar,
}

/// Returns its permit when dropped.
pub struct Permit<'a>(&'a Permits);

impl Permits {
    pub fn new(n: usize) -> Self {
        Self {
            free: Mutex::new(n.max(1)),
            freed: Condvar::new(),
        }
    }

    /// A permit, waiting at most `wait`; None if none came free in time.
    pub fn acquire(&self, wait: Duration) -> Option<Permit<'_>> {
        let deadline = Instant::now() + wait;
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            let left = deadline.checked_duration_since(Instant::now())?;
            free = self
                .freed
                .wait_timeout(free, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= 1;
        Some(Permit(self))
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}
