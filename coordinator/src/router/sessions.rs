//! Sticky sessions: the replica each session (a conversation, a user) was last sent to.
//!
//! Bounded without a clock or an LRU list: two generations of a map. Lookups read both; a
//! session used in the current generation stays, one not used for a whole generation is
//! forgotten when the current map fills and becomes the previous one. Session ids are kept as
//! hashes only: they may name a user, and nothing here needs them back.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Mutex, PoisonError};

/// Sessions remembered per generation (so at most twice this in all).
pub const SESSIONS_PER_GENERATION: usize = 1 << 16;

#[derive(Default)]
struct Generations {
    current: HashMap<u64, u32>,
    previous: HashMap<u64, u32>,
}

/// Session → replica id; shared by every request task.
pub struct Sessions {
    maps: Mutex<Generations>,
    capacity: usize,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::with_capacity(SESSIONS_PER_GENERATION)
    }
}

impl Sessions {
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            maps: Mutex::default(),
            capacity: capacity.max(1),
        }
    }

    /// The replica `session` was last sent to, if remembered.
    pub fn get(&self, session: &str) -> Option<u32> {
        let key = key(session);
        let maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        maps.current
            .get(&key)
            .or_else(|| maps.previous.get(&key))
            .copied()
    }

    /// Remembers that `session` went to `replica`.
    pub fn set(&self, session: &str, replica: u32) {
        let key = key(session);
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        if maps.current.len() >= self.capacity && !maps.current.contains_key(&key) {
            maps.previous = std::mem::take(&mut maps.current);
        }
        maps.current.insert(key, replica);
    }
}

fn key(session: &str) -> u64 {
    let mut h = DefaultHasher::new();
    session.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_recent_sessions_within_two_generations() {
        let s = Sessions::with_capacity(2);
        s.set("a", 1);
        s.set("b", 0);
        assert_eq!((s.get("a"), s.get("b")), (Some(1), Some(0)));
        s.set("c", 1); // a and b move to the previous generation
        assert_eq!((s.get("a"), s.get("c")), (Some(1), Some(1)));
        s.set("a", 0); // a is used again: current
        s.set("d", 0); // current is full: {c, a} become previous; b is forgotten
        assert_eq!(s.get("b"), None);
        assert_eq!(
            (s.get("a"), s.get("c"), s.get("d")),
            (Some(0), Some(1), Some(0))
        );
        assert_eq!(s.get("nobody"), None);
    }
}
