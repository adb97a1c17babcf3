//! The paged KV layout, owned by the coordinator: which physical blocks hold a sequence, and
//! which of them other sequences may share (prefix caching).
//!
//! Workers hold the memory; this decides its use. A sequence's block table maps its logical
//! block `i` (positions `i*block_size ..`) to a physical block id that every rank uses alike.
//!
//! Prefix caching is vLLM's scheme in nano-vllm's shape. A full block whose KV has been computed
//! is keyed by a chained hash of (its parent block's hash, its tokens), so equal keys mean equal
//! prefixes. A new sequence whose first blocks have cached keys takes those blocks (one more
//! reference each) instead of recomputing them. A block whose last user leaves keeps its KV and
//! its key until its memory is needed: free blocks form one queue, plain blocks at the front
//! (they hold nothing worth keeping, so they are reused first) and cached blocks at the back in
//! the order they were freed, so the least recently used cached block is evicted first.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};

use anyhow::{bail, Result};

use crate::prefix_index::PrefixIndex;

/// The parent hash of a sequence's first block.
pub const ROOT_HASH: u64 = 0x6865_6c69_6f73_0001;
/// "No block" in the free queue's links.
const NIL: u32 = u32::MAX;

/// The chained hash of a full block: its parent's hash and its tokens.
pub fn block_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// What a cached block holds; kept whole so a hash collision can never hand out wrong KV.
#[derive(Debug, PartialEq, Eq)]
struct Key {
    hash: u64,
    parent: u64,
    tokens: Box<[u32]>,
}

#[derive(Debug)]
struct Block {
    /// Block tables that hold this block.
    refs: u32,
    /// Set while the block is in the prefix cache.
    key: Option<Key>,
    /// Links of the free queue (only while `refs == 0`).
    prev: u32,
    next: u32,
}

pub struct BlockManager {
    block_size: usize,
    blocks: Vec<Block>,
    /// Full computed blocks by chained hash.
    cached: HashMap<u64, u32>,
    /// The free queue (every block with no reference): a doubly linked list through `blocks`,
    /// so a cached block taken back by a hit leaves it in O(1).
    head: u32,
    tail: u32,
    num_free: usize,
    /// Where the keys of `cached` are mirrored for the router (a replica's; none in tests).
    index: Option<PrefixIndex>,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        let mut m = Self {
            block_size: block_size.max(1),
            blocks: Vec::with_capacity(num_blocks),
            cached: HashMap::new(),
            head: NIL,
            tail: NIL,
            num_free: 0,
            index: None,
        };
        for b in 0..num_blocks as u32 {
            m.blocks.push(Block {
                refs: 0,
                key: None,
                prev: NIL,
                next: NIL,
            });
            m.push_back(b);
        }
        m
    }

    /// Mirrors the hashes of the cached blocks into `index` from now on.
    pub fn publish_to(&mut self, index: PrefixIndex) {
        index.clear();
        for &hash in self.cached.keys() {
            index.insert(hash);
        }
        self.index = Some(index);
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks nobody holds, cached ones included (their memory can be taken at any time).
    pub fn num_free(&self) -> usize {
        self.num_free
    }

    pub fn num_total(&self) -> usize {
        self.blocks.len()
    }

    /// Blocks whose KV is in the prefix cache, held or not.
    pub fn num_cached(&self) -> usize {
        self.cached.len()
    }

    /// Blocks a table of `table_len` blocks needs to cover `num_tokens` positions.
    pub fn needed(&self, table_len: usize, num_tokens: usize) -> usize {
        num_tokens
            .div_ceil(self.block_size)
            .saturating_sub(table_len)
    }

    /// Positions a table of `table_len` blocks can cover with every free block added.
    pub fn reachable(&self, table_len: usize) -> usize {
        (table_len + self.num_free) * self.block_size
    }

    /// Starts an empty table with the cached blocks that hold `tokens`' first full blocks, at
    /// most `max_blocks` of them; their chained hashes go to `hashes`. Returns how many.
    pub fn take_cached(
        &mut self,
        tokens: &[u32],
        max_blocks: usize,
        table: &mut Vec<u32>,
        hashes: &mut Vec<u64>,
    ) -> usize {
        debug_assert!(table.is_empty() && hashes.is_empty());
        let mut parent = ROOT_HASH;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let hash = block_hash(parent, chunk);
            let Some(&b) = self.cached.get(&hash) else {
                break;
            };
            let same = self.blocks[b as usize]
                .key
                .as_ref()
                .is_some_and(|k| k.parent == parent && *k.tokens == *chunk);
            if !same {
                break;
            }
            if self.blocks[b as usize].refs == 0 {
                self.unlink(b);
            }
            self.blocks[b as usize].refs += 1;
            table.push(b);
            hashes.push(hash);
            parent = hash;
        }
        table.len()
    }

    /// Grows `table` with fresh blocks to cover `num_tokens` positions, evicting the least
    /// recently used cached blocks if it must. Takes nothing if it cannot take all.
    pub fn ensure(&mut self, table: &mut Vec<u32>, num_tokens: usize) -> Result<()> {
        let extra = self.needed(table.len(), num_tokens);
        if extra > self.num_free {
            bail!(
                "out of KV blocks: need {extra} more, {} free of {}",
                self.num_free,
                self.blocks.len()
            );
        }
        for _ in 0..extra {
            let b = self.head;
            self.unlink(b);
            let block = &mut self.blocks[b as usize];
            if let Some(key) = block.key.take() {
                self.cached.remove(&key.hash);
                if let Some(index) = &self.index {
                    index.remove(key.hash);
                }
            }
            block.refs = 1;
            table.push(b);
        }
        Ok(())
    }

    /// Puts block `block`, now full of the computed KV of `tokens` after a block whose chained
    /// hash is `parent` (None: the first block), into the prefix cache. Returns its hash, the
    /// next block's parent. If another block already caches the same tokens this one stays
    /// private; its hash is the same.
    pub fn register(&mut self, block: u32, parent: Option<u64>, tokens: &[u32]) -> u64 {
        let parent = parent.unwrap_or(ROOT_HASH);
        let hash = block_hash(parent, tokens);
        let Some(b) = self.blocks.get_mut(block as usize) else {
            return hash;
        };
        if b.key.is_none() && !self.cached.contains_key(&hash) {
            b.key = Some(Key {
                hash,
                parent,
                tokens: tokens.into(),
            });
            self.cached.insert(hash, block);
            if let Some(index) = &self.index {
                index.insert(hash);
            }
        }
        hash
    }

    /// Returns a sequence's blocks. A block nobody else holds becomes free: plain blocks for
    /// reuse first, cached ones last-block-first to the back of the queue, so a prefix's head
    /// outlives its tail.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        for b in table.drain(..).rev() {
            let block = &mut self.blocks[b as usize];
            block.refs -= 1;
            if block.refs == 0 {
                if block.key.is_some() {
                    self.push_back(b);
                } else {
                    self.push_front(b);
                }
            }
        }
    }

    /// Empties the prefix cache: the ranks' KV is gone (the replica was rebuilt), so no block's
    /// content can be reused. Blocks keep their places in the free queue.
    pub fn forget_cached(&mut self) {
        for block in &mut self.blocks {
            block.key = None;
        }
        self.cached.clear();
        if let Some(index) = &self.index {
            index.clear();
        }
    }

    /// Checks every invariant against the tables of all sequences: each block's reference
    /// count is the number of tables holding it, the free queue holds exactly the unreferenced
    /// blocks once each, and the cache index and the blocks' keys agree.
    pub fn audit<'a>(&self, tables: impl IntoIterator<Item = &'a [u32]>) -> Result<()> {
        let mut refs = vec![0u32; self.blocks.len()];
        for t in tables {
            for &b in t {
                match refs.get_mut(b as usize) {
                    Some(r) => *r += 1,
                    None => bail!("block {b} is out of range"),
                }
            }
        }
        for (b, (block, &r)) in self.blocks.iter().zip(&refs).enumerate() {
            if block.refs != r {
                bail!("block {b}: refcount {} but {r} tables hold it", block.refs);
            }
        }
        let mut seen = vec![false; self.blocks.len()];
        let (mut b, mut prev, mut n) = (self.head, NIL, 0);
        while b != NIL {
            let block = &self.blocks[b as usize];
            if seen[b as usize] || block.refs != 0 || block.prev != prev {
                bail!("free queue is corrupt at block {b}");
            }
            seen[b as usize] = true;
            (prev, b, n) = (b, block.next, n + 1);
        }
        if prev != self.tail || n != self.num_free {
            bail!("free queue holds {n} blocks, counted {}", self.num_free);
        }
        if let Some(b) = refs.iter().zip(&seen).position(|(&r, &s)| r == 0 && !s) {
            bail!("block {b} is held by nobody and not free (leaked)");
        }
        for (&hash, &b) in &self.cached {
            if self.blocks[b as usize].key.as_ref().map(|k| k.hash) != Some(hash) {
                bail!("cache entry {hash:x} points at block {b}, which has another key");
            }
        }
        let keyed = self.blocks.iter().filter(|b| b.key.is_some()).count();
        if keyed != self.cached.len() {
            bail!(
                "{keyed} blocks have keys, the cache indexes {}",
                self.cached.len()
            );
        }
        Ok(())
    }

    fn push_back(&mut self, b: u32) {
        self.blocks[b as usize].prev = self.tail;
        self.blocks[b as usize].next = NIL;
        match self.tail {
            NIL => self.head = b,
            t => self.blocks[t as usize].next = b,
        }
        self.tail = b;
        self.num_free += 1;
    }

    fn push_front(&mut self, b: u32) {
        self.blocks[b as usize].prev = NIL;
        self.blocks[b as usize].next = self.head;
        match self.head {
            NIL => self.tail = b,
            h => self.blocks[h as usize].prev = b,
        }
        self.head = b;
        self.num_free += 1;
    }

    fn unlink(&mut self, b: u32) {
        let (prev, next) = (self.blocks[b as usize].prev, self.blocks[b as usize].next);
        match prev {
            NIL => self.head = next,
            p => self.blocks[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.blocks[n as usize].prev = prev,
        }
        self.blocks[b as usize].prev = NIL;
        self.blocks[b as usize].next = NIL;
        self.num_free -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_grow_by_blocks_and_come_back() {
        let mut a = BlockManager::new(4, 16);
        let mut t = Vec::new();
        a.ensure(&mut t, 1).unwrap();
        assert_eq!(t, vec![0]);
        a.ensure(&mut t, 16).unwrap();
        assert_eq!(t.len(), 1);
        a.ensure(&mut t, 17).unwrap();
        assert_eq!(t, vec![0, 1]);
        assert!(a.ensure(&mut t, 16 * 5).is_err());
        assert_eq!(a.num_free(), 2, "a failed grow takes nothing");
        a.audit([t.as_slice()]).unwrap();
        a.release(&mut t);
        assert!(t.is_empty());
        assert_eq!(a.num_free(), 4);
        a.audit([]).unwrap();
    }

    /// Writes `tokens` into a fresh table and caches its full blocks, as the scheduler does
    /// once their KV is computed.
    fn computed(m: &mut BlockManager, tokens: &[u32]) -> Vec<u32> {
        let mut t = Vec::new();
        m.ensure(&mut t, tokens.len()).unwrap();
        let mut parent = None;
        for (i, c) in tokens.chunks_exact(m.block_size()).enumerate() {
            parent = Some(m.register(t[i], parent, c));
        }
        t
    }

    #[test]
    fn shared_prefixes_take_the_same_blocks_and_survive_their_owner() {
        let mut m = BlockManager::new(8, 4);
        let a: Vec<u32> = (0..10).collect();
        let mut ta = computed(&mut m, &a);
        assert_eq!(
            m.num_cached(),
            2,
            "two full blocks of 4, the partial third is not cached"
        );
        // A second sequence with the same first 8 tokens and a different tail.
        let b: Vec<u32> = (0..8).chain([99, 98]).collect();
        let (mut tb, mut hb) = (Vec::new(), Vec::new());
        assert_eq!(m.take_cached(&b, 10, &mut tb, &mut hb), 2);
        assert_eq!(tb, ta[..2]);
        m.audit([ta.as_slice(), tb.as_slice()]).unwrap();
        // Different first token: nothing matches (the hash is chained).
        let c: Vec<u32> = [7].into_iter().chain(1..10).collect();
        let (mut tc, mut hc) = (Vec::new(), Vec::new());
        assert_eq!(m.take_cached(&c, 10, &mut tc, &mut hc), 0);
        // The owner leaves; its cached blocks stay cached while B holds them and after.
        m.release(&mut ta);
        m.release(&mut tb);
        m.audit([]).unwrap();
        assert_eq!(m.num_cached(), 2);
        let (mut td, mut hd) = (Vec::new(), Vec::new());
        assert_eq!(
            m.take_cached(&a, 1, &mut td, &mut hd),
            1,
            "at most max_blocks"
        );
        m.release(&mut td);
        // Taking all 8 blocks evicts them.
        let mut big = Vec::new();
        m.ensure(&mut big, 32).unwrap();
        assert_eq!(m.num_cached(), 0);
        m.audit([big.as_slice()]).unwrap();
    }

    #[test]
    fn plain_blocks_are_reused_before_cached_ones_and_the_oldest_cached_goes_first() {
        let mut m = BlockManager::new(4, 2);
        let mut old = computed(&mut m, &[1, 2]);
        let mut new = computed(&mut m, &[3, 4]);
        let mut plain = Vec::new();
        m.ensure(&mut plain, 1).unwrap();
        m.release(&mut old);
        m.release(&mut new);
        m.release(&mut plain);
        let mut t = Vec::new();
        m.ensure(&mut t, 6).unwrap();
        assert_eq!(
            m.num_cached(),
            1,
            "the plain blocks went first, then the older cached one"
        );
        let (mut tn, mut hn) = (Vec::new(), Vec::new());
        assert_eq!(m.take_cached(&[3, 4, 5], 1, &mut tn, &mut hn), 1);
        m.audit([t.as_slice(), tn.as_slice()]).unwrap();
    }
}
