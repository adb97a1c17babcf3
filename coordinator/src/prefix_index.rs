//! What a replica's prefix cache holds, readable from outside its step loop: the chained hashes
//! of its cached blocks ([`crate::block_manager`]), mirrored as they come and go.
//!
//! The router asks each replica how many leading blocks of a prompt it holds
//! ([`PrefixIndex::cached_blocks`]) and prefers the one with the most: the coordinator knows
//! this exactly, where a router outside it (SGLang's, vLLM's production stack) keeps an
//! approximate tree of what it sent where. The step loop writes (a block cached, evicted, the
//! cache emptied after a rebuild); readers take a read lock for one walk over a prompt's block
//! hashes, a few hundred nanoseconds.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};

use crate::block_manager::{block_hash, ROOT_HASH};

/// A shared set of cached block hashes; cheap to clone (every clone is the same set).
#[derive(Debug, Clone, Default)]
pub struct PrefixIndex(Arc<RwLock<HashSet<u64>>>);

impl PrefixIndex {
    pub fn insert(&self, hash: u64) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(hash);
    }

    pub fn remove(&self, hash: u64) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&hash);
    }

    pub fn clear(&self) {
        self.0
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    pub fn len(&self) -> usize {
        self.0.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many of `hashes` (a prompt's chained block hashes, [`prompt_hashes`]) are cached
    /// from the first on: the blocks a request would not recompute here.
    pub fn cached_blocks(&self, hashes: &[u64]) -> usize {
        let set = self.0.read().unwrap_or_else(PoisonError::into_inner);
        hashes.iter().take_while(|h| set.contains(h)).count()
    }
}

/// The chained hashes of the full blocks of `tokens`, as the block manager keys them.
pub fn prompt_hashes(tokens: &[u32], block_size: usize) -> Vec<u64> {
    let mut parent = ROOT_HASH;
    tokens
        .chunks_exact(block_size.max(1))
        .map(|chunk| {
            parent = block_hash(parent, chunk);
            parent
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block_manager::BlockManager;

    #[test]
    fn mirrors_what_the_block_manager_caches_and_evicts() {
        let index = PrefixIndex::default();
        let mut m = BlockManager::new(2, 2);
        m.publish_to(index.clone());
        let tokens = [1, 2, 3, 4, 5];
        let hashes = prompt_hashes(&tokens, 2);
        assert_eq!(hashes.len(), 2, "the partial last block has no hash");
        let mut table = Vec::new();
        m.ensure(&mut table, 4).expect("fits");
        let h0 = m.register(table[0], None, &tokens[..2]);
        assert_eq!(index.cached_blocks(&hashes), 1);
        m.register(table[1], Some(h0), &tokens[2..4]);
        assert_eq!(index.cached_blocks(&hashes), 2);
        assert_eq!(index.cached_blocks(&prompt_hashes(&[1, 2, 9, 9], 2)), 1);
        assert_eq!(index.cached_blocks(&prompt_hashes(&[9, 2, 3, 4], 2)), 0);
        // Freed blocks stay cached until their memory is taken for other tokens.
        m.release(&mut table);
        assert_eq!(index.cached_blocks(&hashes), 2);
        m.ensure(&mut table, 2).expect("fits");
        assert_eq!(index.len(), 1, "one cached block was evicted for reuse");
        m.forget_cached();
        assert!(index.is_empty());
    }
}
