//! `--workload shared-prefix`: many users behind a few system prompts, the case a prefix cache
//! and a cache-aware router exist for.
//!
//! `--system-prompts K` random system prompts of `--system-prompt-len L` tokens are drawn once
//! from the seed; request `i` is system prompt `i % K` (round robin, so every group is equally
//! hot and the groups interleave in time) followed by a fresh random user message of
//! `--input-len` tokens. Within a group the first L tokens are identical (over HTTP the user
//! text is chosen so that it does not merge with the end of the system prompt, so the server
//! sees the same L tokens, BOS included), and different groups differ from the first token on.
//! `--system-prompts 1` makes one hot prefix.
//!
//! With `--users U` request `i` carries the session id `user-<i % U>` (a router keeps a user on
//! one replica); without it, none, and the router is free to follow the cache alone.
//!
//! Warm-up requests use system prompts of their own, drawn apart from the measured ones, so the
//! measured phase starts with a cold cache for its prefixes, as a fresh deployment would.

use anyhow::{bail, Result};

use super::dataset::{request_seed, Input, Prompt, Random, WARMUP_SALT};

/// Mixed into the salt of system prompts' seeds, so they are not any request's user message.
const SYSTEM_SALT: u64 = 0x5EED_5157_E3A0_0001;

/// The session id of request `i` among `users` users.
pub fn user_id(i: u64, users: usize) -> String {
    format!("user-{}", i % users as u64)
}

/// The prompts of a shared-prefix run.
pub struct SharedPrefix {
    random: Random,
    seed: u64,
    input_len: usize,
    output_len: usize,
    users: Option<usize>,
    /// The measured requests' system prompts.
    systems: Vec<Input>,
    /// The warm-up requests' system prompts.
    warmup_systems: Vec<Input>,
}

/// The workload's shape, as the flags give it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub system_prompts: usize,
    pub system_len: usize,
    pub input_len: usize,
    pub output_len: usize,
    pub users: Option<usize>,
}

impl SharedPrefix {
    /// Draws the system prompts (those of the warm-up too) from `seed`.
    pub fn new(random: Random, seed: u64, shape: Shape) -> Result<Self> {
        if shape.system_prompts == 0 || shape.system_len == 0 || shape.input_len == 0 {
            bail!("--system-prompts, --system-prompt-len and --input-len must be positive");
        }
        if shape.users == Some(0) {
            bail!("--users must be positive");
        }
        let systems = |salt: u64| -> Result<Vec<Input>> {
            (0..shape.system_prompts as u64)
                .map(|j| {
                    random.message(request_seed(seed, salt ^ SYSTEM_SALT, j), shape.system_len)
                })
                .collect()
        };
        Ok(SharedPrefix {
            systems: systems(0)?,
            warmup_systems: systems(WARMUP_SALT)?,
            random,
            seed,
            input_len: shape.input_len,
            output_len: shape.output_len,
            users: shape.users,
        })
    }

    /// The system prompt group of request `i`.
    pub fn group(&self, i: u64) -> usize {
        (i % self.systems.len() as u64) as usize
    }

    /// Request `i`'s prompt (`salt` 0: measured, [`WARMUP_SALT`]: warm-up, with no session id).
    pub fn prompt(&self, i: u64, salt: u64) -> Result<Prompt> {
        let warmup = salt != 0;
        let systems = if warmup {
            &self.warmup_systems
        } else {
            &self.systems
        };
        let system = &systems[self.group(i)];
        let (input, prompt_len) =
            self.random
                .extend(system, request_seed(self.seed, salt, i), self.input_len)?;
        Ok(Prompt {
            input,
            prompt_len,
            output_len: self.output_len,
            session_id: self.users.filter(|_| !warmup).map(|u| user_id(i, u)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::dataset::tests::tokenizer;

    const VOCAB: u32 = 49152;

    fn shape(system_prompts: usize, users: Option<usize>) -> Shape {
        Shape {
            system_prompts,
            system_len: 32,
            input_len: 8,
            output_len: 4,
            users,
        }
    }

    fn ids(p: &Prompt) -> &[u32] {
        match &p.input {
            Input::Ids(ids) => ids,
            Input::Text(_) => panic!("ids expected"),
        }
    }

    #[test]
    fn groups_share_exactly_the_system_prompt() {
        let random = Random::ids(VOCAB).expect("random");
        let sp = SharedPrefix::new(random, 5, shape(3, None)).expect("workload");
        let prompts: Vec<Prompt> = (0..9).map(|i| sp.prompt(i, 0).expect("prompt")).collect();
        for (i, p) in prompts.iter().enumerate() {
            assert_eq!(p.prompt_len, 40);
            assert_eq!(ids(p).len(), 40);
            assert_eq!(sp.group(i as u64), i % 3, "round robin");
            assert_eq!(p.session_id, None);
        }
        for (a, pa) in prompts.iter().enumerate() {
            for (b, pb) in prompts.iter().enumerate().skip(a + 1) {
                let common = ids(pa)
                    .iter()
                    .zip(ids(pb))
                    .take_while(|(x, y)| x == y)
                    .count();
                if a % 3 == b % 3 {
                    // The same system prompt, then different user messages (random ids agree
                    // on a first token once in 47,000).
                    assert_eq!(common, 32, "requests {a} and {b}");
                } else {
                    assert!(common < 32, "requests {a} and {b} share {common} tokens");
                    assert_ne!(ids(pa)[..32], ids(pb)[..32]);
                }
            }
        }
        // The same seed, the same prompts; another seed, others.
        let again = SharedPrefix::new(Random::ids(VOCAB).expect("random"), 5, shape(3, None))
            .expect("workload");
        assert_eq!(again.prompt(4, 0).expect("p4").input, prompts[4].input);
        let other = SharedPrefix::new(Random::ids(VOCAB).expect("random"), 6, shape(3, None))
            .expect("workload");
        assert_ne!(
            ids(&other.prompt(0, 0).expect("p0"))[..32],
            ids(&prompts[0])[..32]
        );
        // Warm-up prompts share nothing with the measured ones.
        let w = sp.prompt(0, WARMUP_SALT).expect("warm-up");
        assert_ne!(ids(&w)[..32], ids(&prompts[0])[..32]);
    }

    #[test]
    fn one_system_prompt_is_one_hot_prefix_and_users_are_session_ids() {
        let random = Random::ids(VOCAB).expect("random");
        let sp = SharedPrefix::new(random, 1, shape(1, Some(3))).expect("workload");
        let first = sp.prompt(0, 0).expect("p0");
        for i in 0..7 {
            let p = sp.prompt(i, 0).expect("prompt");
            assert_eq!(ids(&p)[..32], ids(&first)[..32]);
            assert_eq!(p.session_id, Some(format!("user-{}", i % 3)));
        }
        assert_eq!(sp.prompt(0, WARMUP_SALT).expect("warm-up").session_id, None);
        for bad in [shape(0, None), shape(1, Some(0))] {
            assert!(SharedPrefix::new(Random::ids(VOCAB).expect("random"), 0, bad).is_err());
        }
    }

    #[test]
    fn text_prompts_keep_the_system_prompt_tokens_exactly() {
        let tok = tokenizer();
        let random = Random::text(tok.clone()).expect("random");
        let sp = SharedPrefix::new(random, 9, shape(2, None)).expect("workload");
        let encoded: Vec<Vec<u32>> = (0..4)
            .map(|i| {
                let p = sp.prompt(i, 0).expect("prompt");
                let Input::Text(text) = &p.input else {
                    panic!("text expected")
                };
                let ids = tok.encode(text).expect("encode");
                assert_eq!(ids.len(), 40, "{text:?}");
                assert_eq!(p.prompt_len, 40);
                ids
            })
            .collect();
        // Requests 0 and 2 share system prompt 0, 1 and 3 system prompt 1.
        assert_eq!(encoded[0][..32], encoded[2][..32]);
        assert_eq!(encoded[1][..32], encoded[3][..32]);
        assert_ne!(encoded[0][..32], encoded[1][..32]);
        assert_ne!(encoded[0][32..], encoded[2][32..]);
    }
}
