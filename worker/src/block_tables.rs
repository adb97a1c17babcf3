//! The block tables of running sequences, as this rank was told them.
//!
//! The coordinator owns the KV layout; sending every table whole in every step would make the
//! step message grow with the context of every running sequence (26 KB per rank per step at
//! 256 sequences of ~570 positions, 186 KB at 4,096). So a plan sends a sequence's table once
//! and then only the blocks it gains, and names the sequences that ended. A plan is resolved
//! against the kept tables without changing them and committed only once it is known to be
//! valid, so a refused plan leaves every rank as it was.

use std::collections::HashMap;

use anyhow::Result;
use helios_proto::v1::StepPlan;

use crate::batch::invalid;

#[derive(Debug, Default)]
pub struct BlockTables {
    tables: HashMap<u64, Vec<u32>>,
}

/// One sequence's whole block table for a step, without copying it: the blocks this rank
/// kept, then those the step adds.
#[derive(Debug, Clone, Copy)]
pub struct TableView<'a> {
    pub kept: &'a [u32],
    pub added: &'a [u32],
}

impl TableView<'_> {
    pub fn len(&self) -> usize {
        self.kept.len() + self.added.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The physical block of logical block `i` (`i < len()`).
    pub fn get(&self, i: usize) -> u32 {
        match self.kept.get(i) {
            Some(&b) => b,
            None => self.added[i - self.kept.len()],
        }
    }
}

impl BlockTables {
    /// Each sequence's table for `plan`, in plan order; nothing changes until [`Self::commit`].
    pub fn resolve<'a>(&'a self, plan: &'a StepPlan) -> Result<Vec<TableView<'a>>> {
        plan.seqs
            .iter()
            .map(|s| {
                let kept: &[u32] = if s.append_blocks {
                    self.tables.get(&s.seq_id).ok_or_else(|| {
                        invalid(format!(
                            "sequence {} appends blocks to a table this rank does not have",
                            s.seq_id
                        ))
                    })?
                } else {
                    &[]
                };
                Ok(TableView {
                    kept,
                    added: &s.block_table,
                })
            })
            .collect()
    }

    /// Takes in a plan that [`Self::resolve`] accepted: extends or replaces its sequences'
    /// tables and forgets its finished ones.
    pub fn commit(&mut self, plan: &StepPlan) {
        for id in &plan.finished_seq_ids {
            self.tables.remove(id);
        }
        for s in &plan.seqs {
            if s.append_blocks {
                if let Some(t) = self.tables.get_mut(&s.seq_id) {
                    t.extend_from_slice(&s.block_table);
                }
            } else {
                self.tables.insert(s.seq_id, s.block_table.clone());
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.tables.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use helios_proto::v1::SequenceStep;

    fn step(seq_id: u64, block_table: Vec<u32>, append_blocks: bool) -> SequenceStep {
        SequenceStep {
            seq_id,
            block_table,
            append_blocks,
            ..Default::default()
        }
    }

    /// Every sequence's whole table, through the views.
    fn whole(t: &BlockTables, plan: &StepPlan) -> Vec<Vec<u32>> {
        t.resolve(plan)
            .unwrap()
            .iter()
            .map(|v| (0..v.len()).map(|i| v.get(i)).collect())
            .collect()
    }

    #[test]
    fn tables_are_sent_once_then_extended_then_forgotten() {
        let mut t = BlockTables::default();
        let first = StepPlan {
            seqs: vec![step(1, vec![4, 5], false), step(2, vec![9], false)],
            ..Default::default()
        };
        assert_eq!(whole(&t, &first), vec![vec![4, 5], vec![9]]);
        t.commit(&first);
        let next = StepPlan {
            seqs: vec![step(1, vec![], true), step(2, vec![3], true)],
            ..Default::default()
        };
        assert_eq!(whole(&t, &next), vec![vec![4, 5], vec![9, 3]]);
        t.commit(&next);
        let unknown = StepPlan {
            seqs: vec![step(7, vec![1], true)],
            ..Default::default()
        };
        assert!(t.resolve(&unknown).is_err());
        // Sequence 2 ended; 1 goes on; 2's id may come back as a new sequence.
        let after = StepPlan {
            seqs: vec![step(1, vec![6], true)],
            finished_seq_ids: vec![2],
            ..Default::default()
        };
        t.resolve(&after).unwrap();
        t.commit(&after);
        assert_eq!(t.len(), 1);
        let again = StepPlan {
            seqs: vec![step(2, vec![], true)],
            ..Default::default()
        };
        assert!(t.resolve(&again).is_err(), "a finished table must be gone");
        let last = StepPlan {
            seqs: vec![step(1, vec![], true)],
            ..Default::default()
        };
        assert_eq!(whole(&t, &last), vec![vec![4, 5, 6]]);
    }
}
