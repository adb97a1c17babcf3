//! The paged KV layout, owned by the coordinator: which physical blocks hold a sequence.
//!
//! Workers hold the memory; this decides its use. A sequence's block table maps its logical
//! block `i` (positions `i*block_size ..`) to a physical block id that every rank uses alike.

use anyhow::{bail, Result};

pub struct BlockAllocator {
    block_size: usize,
    /// Free block ids; popped from the end.
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            free: (0..num_blocks as u32).rev().collect(),
            total: num_blocks,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    pub fn num_total(&self) -> usize {
        self.total
    }

    /// Grows `table` to cover `num_tokens` positions.
    pub fn ensure(&mut self, table: &mut Vec<u32>, num_tokens: usize) -> Result<()> {
        let needed = num_tokens.div_ceil(self.block_size);
        if needed > table.len() {
            let extra = needed - table.len();
            if extra > self.free.len() {
                bail!(
                    "out of KV blocks: need {extra} more, {} free of {}",
                    self.free.len(),
                    self.total
                );
            }
            let at = self.free.len() - extra;
            table.extend(self.free.drain(at..).rev());
        }
        Ok(())
    }

    /// Returns a sequence's blocks.
    pub fn release(&mut self, table: &mut Vec<u32>) {
        self.free.extend(table.drain(..).rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_grow_by_blocks_and_come_back() {
        let mut a = BlockAllocator::new(4, 16);
        let mut t = Vec::new();
        a.ensure(&mut t, 1).unwrap();
        assert_eq!(t, vec![0]);
        a.ensure(&mut t, 16).unwrap();
        assert_eq!(t.len(), 1);
        a.ensure(&mut t, 17).unwrap();
        assert_eq!(t, vec![0, 1]);
        assert!(a.ensure(&mut t, 16 * 5).is_err());
        assert_eq!(a.num_free(), 2, "a failed grow takes nothing");
        a.release(&mut t);
        assert!(t.is_empty());
        assert_eq!(a.num_free(), 4);
    }
}
