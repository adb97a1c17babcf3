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

impl BlockTables {
    /// Each sequence's whole table for `plan`, in plan order (nothing is changed yet).
    pub fn resolve(&self, plan: &StepPlan) -> Result<Vec<Vec<u32>>> {
        plan.seqs
            .iter()
            .map(|s| {
                if !s.append_blocks {
                    return Ok(s.block_table.clone());
                }
                let kept = self.tables.get(&s.seq_id).ok_or_else(|| {
                    invalid(format!(
                        "sequence {} appends blocks to a table this rank does not have",
                        s.seq_id
                    ))
                })?;
                let mut t = Vec::with_capacity(kept.len() + s.block_table.len());
                t.extend_from_slice(kept);
                t.extend_from_slice(&s.block_table);
                Ok(t)
            })
            .collect()
    }

    /// Keeps `tables` (from [`Self::resolve`]) and forgets the plan's finished sequences.
    pub fn commit(&mut self, plan: &StepPlan, tables: Vec<Vec<u32>>) {
        for id in &plan.finished_seq_ids {
            self.tables.remove(id);
        }
        for (s, t) in plan.seqs.iter().zip(tables) {
            self.tables.insert(s.seq_id, t);
        }
    }

    pub fn len(&self) -> usize {
        self.tables.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
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

    #[test]
    fn tables_are_sent_once_then_extended_then_forgotten() {
        let mut t = BlockTables::default();
        let first = StepPlan {
            seqs: vec![step(1, vec![4, 5], false), step(2, vec![9], false)],
            ..Default::default()
        };
        let r = t.resolve(&first).unwrap();
        assert_eq!(r, vec![vec![4, 5], vec![9]]);
        t.commit(&first, r);
        let next = StepPlan {
            seqs: vec![step(1, vec![], true), step(2, vec![3], true)],
            ..Default::default()
        };
        let r = t.resolve(&next).unwrap();
        assert_eq!(r, vec![vec![4, 5], vec![9, 3]]);
        t.commit(&next, r);
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
        let r = t.resolve(&after).unwrap();
        t.commit(&after, r);
        assert_eq!(t.len(), 1);
        let again = StepPlan {
            seqs: vec![step(2, vec![], true)],
            ..Default::default()
        };
        assert!(t.resolve(&again).is_err(), "a finished table must be gone");
        assert_eq!(
            t.resolve(&StepPlan {
                seqs: vec![step(1, vec![], true)],
                ..Default::default()
            })
            .unwrap(),
            vec![vec![4, 5, 6]]
        );
    }
}
