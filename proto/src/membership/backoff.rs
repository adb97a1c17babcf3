//! Exponential backoff with jitter between retries against etcd.
//!
//! Doubling keeps a long outage from flooding logs and etcd; the cap keeps recovery prompt once
//! etcd is back; the jitter keeps many workers that lost etcd at the same moment from retrying
//! in lockstep when it returns.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

pub(crate) struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(first: Duration, max: Duration) -> Backoff {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The next delay: the current step plus up to a quarter of it at random, then doubled.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        step + step.mul_f64(jitter() * 0.25)
    }

    /// Back to the first delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.first;
    }
}

/// A number in [0, 1) from std's randomly seeded hasher (no RNG crate for this).
fn jitter() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(100), ms(350));
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay()).collect();
        for (got, base) in d.iter().zip([100, 200, 350, 350]) {
            assert!(
                *got >= ms(base) && *got <= ms(base) * 5 / 4,
                "{got:?} vs {base}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= ms(125));
    }
}
