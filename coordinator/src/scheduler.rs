//! Where a request waits, and what each step computes: iteration-level scheduling over the paged
//! KV cache (vLLM V1's shape).
//!
//! A sequence waits in `waiting` (FCFS) until the KV cache can promise it every block it may
//! need (prompt + max_new_tokens), then runs. Each step fills a token budget: one token for every
//! running sequence whose prompt is done (decode), then chunks of prompts still being read
//! (chunked prefill). Reserving a sequence's final size at admission means a running sequence
//! never runs out of blocks mid-generation; blocks themselves are taken only as positions are
//! written, so `free` blocks in ModelInfo are the truth. Preemption, which would let the cache
//! be overcommitted, comes with the scheduler issue.

use std::collections::VecDeque;

use anyhow::{bail, Context, Result};
use helios_proto::v1::{SampledToken, SamplingParams, SequenceStep, StepPlan, StepResult};

use crate::block_manager::BlockAllocator;

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Length,
    Eos,
    /// A stop string (decided by the caller, which sees the text).
    Stop,
}

/// What a sequence asks of every step it takes part in.
#[derive(Debug, Clone, Default)]
pub struct SequenceParams {
    pub max_new_tokens: usize,
    /// Sent to rank 0; `output_index` is filled in per step.
    pub sampling: SamplingParams,
    /// The sequence ends after emitting one of these (EOS unless ignored, plus the request's).
    pub stop_token_ids: Vec<u32>,
}

pub struct Sequence {
    pub id: u64,
    /// Prompt then generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose KV is in the cache.
    computed: usize,
    table: Vec<u32>,
    /// Entries of `table` the ranks were sent (they keep them; a step sends only the rest).
    sent_blocks: usize,
    params: SequenceParams,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>, params: SequenceParams) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            table: Vec::new(),
            sent_blocks: 0,
            params,
        }
    }

    fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Positions this sequence may fill: prompt + max_new_tokens.
    fn final_len(&self) -> usize {
        self.prompt_len + self.params.max_new_tokens
    }
}

/// A token rank 0 sampled for a sequence, and whether that ended it.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub token: SampledToken,
    pub finish: Option<FinishReason>,
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    index: usize,
    id: u64,
    tokens: usize,
    sample: bool,
}

pub struct Scheduler {
    blocks: BlockAllocator,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    /// Blocks promised to running sequences at their final size.
    reserved: usize,
    max_batch_tokens: usize,
    max_running: usize,
    next_step: u64,
    /// The last plan, in plan order: each sequence's index in `running`, its id, how many
    /// tokens it feeds, and whether it samples.
    planned: Vec<Planned>,
    /// Sequences the ranks hold block tables for that ended since the last plan.
    forgotten: Vec<u64>,
}

impl Scheduler {
    pub fn new(blocks: BlockAllocator, max_batch_tokens: usize, max_running: usize) -> Self {
        Self {
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            max_batch_tokens: max_batch_tokens.max(1),
            max_running: max_running.max(1),
            next_step: 0,
            planned: Vec::new(),
            forgotten: Vec::new(),
        }
    }

    /// Blocks a sequence of `tokens` positions needs.
    fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.blocks.block_size())
    }

    pub fn max_batch_tokens(&self) -> usize {
        self.max_batch_tokens
    }

    pub fn num_free_blocks(&self) -> usize {
        self.blocks.num_free()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a sequence. One that could never be admitted (more blocks than the cache has) is
    /// refused; admission control checks this first so clients get a clear message.
    pub fn add(&mut self, seq: Sequence) -> Result<()> {
        let need = self.blocks_for(seq.final_len());
        if seq.prompt_len == 0 || need > self.blocks.num_total() {
            bail!(
                "sequence {} needs {need} KV blocks; the cache has {}",
                seq.id,
                self.blocks.num_total()
            );
        }
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Drops a sequence wherever it is and frees its blocks; false if it is not here.
    pub fn abort(&mut self, id: u64) -> bool {
        if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            self.waiting.remove(i);
            return true;
        }
        match self.running.iter().position(|s| s.id == id) {
            Some(i) => {
                let mut s = self.running.remove(i);
                self.release(&mut s);
                true
            }
            None => false,
        }
    }

    /// Drops every sequence and frees their blocks.
    pub fn abort_all(&mut self) {
        self.waiting.clear();
        for mut s in std::mem::take(&mut self.running) {
            self.release(&mut s);
        }
    }

    /// The allocator, for callers that plan their own steps (teacher forcing) on an idle
    /// scheduler.
    pub fn blocks_mut(&mut self) -> Option<&mut BlockAllocator> {
        self.is_idle().then_some(&mut self.blocks)
    }

    /// A fresh step id (ids only need to be unique on the stream).
    pub fn next_step_id(&mut self) -> u64 {
        self.next_step += 1;
        self.next_step - 1
    }

    fn release(&mut self, s: &mut Sequence) {
        if s.sent_blocks > 0 {
            self.forgotten.push(s.id);
        }
        self.blocks.release(&mut s.table);
        self.reserved -= self.blocks_for(s.final_len());
    }

    /// The next step, or None when nothing can run.
    pub fn schedule(&mut self) -> Result<Option<StepPlan>> {
        while self.running.len() < self.max_running {
            let Some(next) = self.waiting.front() else {
                break;
            };
            let need = self.blocks_for(next.final_len());
            if self.reserved + need > self.blocks.num_total() {
                break;
            }
            self.reserved += need;
            let seq = self.waiting.pop_front().context("waiting queue is empty")?;
            self.running.push(seq);
        }
        self.planned.clear();
        let decoding = |s: &Sequence| s.computed >= s.prompt_len;
        let order: Vec<usize> = (0..self.running.len())
            .filter(|&i| decoding(&self.running[i]))
            .chain((0..self.running.len()).filter(|&i| !decoding(&self.running[i])))
            .collect();
        let mut budget = self.max_batch_tokens;
        let mut seqs = Vec::new();
        for i in order {
            if budget == 0 {
                break;
            }
            let s = &mut self.running[i];
            let n = (s.tokens.len() - s.computed).min(budget);
            self.blocks.ensure(&mut s.table, s.computed + n)?;
            budget -= n;
            let end = s.computed + n;
            let sample = end == s.tokens.len();
            let mut sampling = s.params.sampling;
            sampling.output_index = (s.tokens.len() - s.prompt_len) as u32;
            seqs.push(SequenceStep {
                seq_id: s.id,
                token_ids: s.tokens[s.computed..end].to_vec(),
                start_pos: s.computed as u32,
                block_table: s.table[s.sent_blocks..].to_vec(),
                append_blocks: s.sent_blocks > 0,
                sample,
                sampling: Some(sampling),
                context_token_ids: if sample && s.params.sampling.penalized() {
                    s.tokens.clone()
                } else {
                    Vec::new()
                },
            });
            s.sent_blocks = s.table.len();
            self.planned.push(Planned {
                index: i,
                id: s.id,
                tokens: n,
                sample,
            });
        }
        if seqs.is_empty() {
            return Ok(None);
        }
        Ok(Some(StepPlan {
            step_id: self.next_step_id(),
            seqs,
            return_logits: false,
            finished_seq_ids: std::mem::take(&mut self.forgotten),
        }))
    }

    /// Ids of the last plan's sequences.
    pub fn planned_ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.planned.iter().map(|p| p.id)
    }

    /// Applies rank 0's answer to the last planned step: advances every planned sequence,
    /// appends the sampled tokens, and retires sequences that reached EOS or their length.
    pub fn apply(&mut self, result: StepResult) -> Result<Vec<Sampled>> {
        let mut tokens = result.tokens.into_iter();
        let mut out = Vec::new();
        let mut finished = false;
        // `planned` stays until the whole answer is applied: on an error the caller fails
        // exactly these sequences.
        for k in 0..self.planned.len() {
            let p = self.planned[k];
            let s = self
                .running
                .get_mut(p.index)
                .context("planned sequence is gone")?;
            if s.id != p.id {
                bail!("the plan no longer matches the running sequences");
            }
            s.computed += p.tokens;
            if !p.sample {
                continue;
            }
            let t = tokens
                .next()
                .with_context(|| format!("rank 0 sampled nothing for sequence {}", s.id))?;
            if t.seq_id != s.id {
                bail!("rank 0 answered sequence {} for {}", t.seq_id, s.id);
            }
            s.tokens.push(t.token_id);
            let finish = if s.params.stop_token_ids.contains(&t.token_id) {
                Some(FinishReason::Eos)
            } else if s.generated().len() >= s.params.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            finished |= finish.is_some();
            out.push(Sampled { token: t, finish });
        }
        if let Some(t) = tokens.next() {
            bail!(
                "rank 0 sampled for sequence {}, which did not ask",
                t.seq_id
            );
        }
        self.planned.clear();
        if finished {
            for s in &out {
                if s.finish.is_some() {
                    self.abort(s.token.seq_id);
                }
            }
        }
        Ok(out)
    }
}

/// Rank 0's answer to `plan` with `token(seq)` for every sequence that samples: the shape of a
/// real answer, for fake engines (benchmarks, tests).
pub fn answer_with(plan: &StepPlan, token: impl Fn(&SequenceStep) -> u32) -> StepResult {
    StepResult {
        step_id: plan.step_id,
        tokens: plan
            .seqs
            .iter()
            .filter(|s| s.sample)
            .map(|s| SampledToken {
                seq_id: s.seq_id,
                token_id: token(s),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(max_new_tokens: usize) -> SequenceParams {
        SequenceParams {
            max_new_tokens,
            stop_token_ids: vec![0],
            ..Default::default()
        }
    }

    /// A fake rank 0: samples `seq_id + 1` for every sequence that asks.
    fn answer(plan: &StepPlan) -> StepResult {
        answer_with(plan, |s| s.seq_id as u32 + 1)
    }

    #[test]
    fn decodes_go_first_then_prompt_chunks_within_the_budget() {
        let mut s = Scheduler::new(BlockAllocator::new(64, 4), 8, 16);
        s.add(Sequence::new(1, vec![5; 3], params(4))).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        assert_eq!(plan.seqs.len(), 1);
        assert!(plan.seqs[0].sample);
        s.apply(answer(&plan)).unwrap();
        s.add(Sequence::new(2, vec![5; 20], params(4))).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        let lens: Vec<(u64, usize, bool)> = plan
            .seqs
            .iter()
            .map(|q| (q.seq_id, q.token_ids.len(), q.sample))
            .collect();
        assert_eq!(lens, vec![(1, 1, true), (2, 7, false)]);
        assert_eq!(plan.seqs[1].start_pos, 0);
        s.apply(answer(&plan)).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        assert_eq!(plan.seqs[1].start_pos, 7);
    }

    #[test]
    fn finished_sequences_give_back_their_blocks() {
        let mut s = Scheduler::new(BlockAllocator::new(16, 4), 64, 16);
        s.add(Sequence::new(7, vec![1; 5], params(3))).unwrap();
        let mut generated = Vec::new();
        while let Some(plan) = s.schedule().unwrap() {
            for t in s.apply(answer(&plan)).unwrap() {
                generated.push((t.token.token_id, t.finish));
            }
        }
        assert_eq!(
            generated,
            vec![(8, None), (8, None), (8, Some(FinishReason::Length))]
        );
        assert!(s.is_idle());
        assert_eq!(s.num_free_blocks(), 16);
        // With its first token as a stop token, a sequence ends at the first sample.
        let mut p = params(10);
        p.stop_token_ids = vec![8];
        s.add(Sequence::new(7, vec![1; 5], p)).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        let out = s.apply(answer(&plan)).unwrap();
        assert_eq!(out[0].finish, Some(FinishReason::Eos));
        assert_eq!(s.num_free_blocks(), 16);
    }

    #[test]
    fn admission_waits_for_the_reservation_and_abort_frees() {
        // 4 blocks of 4: one sequence of 8 + 8 positions takes all of them.
        let mut s = Scheduler::new(BlockAllocator::new(4, 4), 64, 16);
        s.add(Sequence::new(1, vec![1; 8], params(8))).unwrap();
        s.add(Sequence::new(2, vec![1; 4], params(4))).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        assert_eq!(plan.seqs.len(), 1, "the second must wait");
        assert_eq!((s.num_running(), s.num_waiting()), (1, 1));
        s.apply(answer(&plan)).unwrap();
        assert_eq!(s.num_free_blocks(), 2, "blocks are taken as positions fill");
        assert!(s.abort(1));
        assert_eq!(s.num_free_blocks(), 4);
        let plan = s.schedule().unwrap().unwrap();
        assert_eq!(plan.seqs[0].seq_id, 2);
        assert!(s.add(Sequence::new(3, vec![1; 16], params(1))).is_err());
    }

    #[test]
    fn a_malformed_answer_is_an_error_naming_the_planned_sequences() {
        let mut s = Scheduler::new(BlockAllocator::new(16, 4), 64, 16);
        s.add(Sequence::new(3, vec![1; 2], params(4))).unwrap();
        s.add(Sequence::new(4, vec![1; 2], params(4))).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        let mut short = answer(&plan);
        short.tokens.pop();
        assert!(s.apply(short).is_err());
        assert_eq!(s.planned_ids().collect::<Vec<_>>(), vec![3, 4]);
        let plan = s.schedule().unwrap().unwrap();
        let mut long = answer(&plan);
        long.tokens.push(long.tokens[0].clone());
        assert!(s.apply(long).is_err());
    }

    #[test]
    fn block_tables_go_out_once_then_only_what_they_gain() {
        let mut s = Scheduler::new(BlockAllocator::new(16, 4), 64, 16);
        s.add(Sequence::new(1, vec![1; 6], params(8))).unwrap();
        let sent = |s: &mut Scheduler| {
            let plan = s.schedule().unwrap().unwrap();
            let q = &plan.seqs[0];
            let out = (
                q.block_table.clone(),
                q.append_blocks,
                plan.finished_seq_ids.clone(),
            );
            s.apply(answer(&plan)).unwrap();
            out
        };
        // Prompt of 6: two blocks, whole. Then positions 6, 7 stay in block 2; 8 needs a third.
        assert_eq!(sent(&mut s), (vec![0, 1], false, vec![]));
        assert_eq!(sent(&mut s), (vec![], true, vec![]));
        assert_eq!(sent(&mut s), (vec![], true, vec![]));
        assert_eq!(sent(&mut s), (vec![2], true, vec![]));
        // Once it ends, the next plan tells the ranks to forget it.
        assert!(s.abort(1));
        s.add(Sequence::new(2, vec![1; 2], params(2))).unwrap();
        assert_eq!(sent(&mut s), (vec![0], false, vec![1]));
    }

    #[test]
    fn penalties_carry_the_context_only_when_sampling() {
        let mut s = Scheduler::new(BlockAllocator::new(16, 4), 4, 16);
        let mut p = params(4);
        p.sampling.presence_penalty = 0.5;
        s.add(Sequence::new(1, vec![3, 4, 5, 6, 7, 8], p)).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        assert!(plan.seqs[0].context_token_ids.is_empty());
        s.apply(answer(&plan)).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        assert_eq!(plan.seqs[0].context_token_ids, vec![3, 4, 5, 6, 7, 8]);
        s.apply(answer(&plan)).unwrap();
        let plan = s.schedule().unwrap().unwrap();
        assert_eq!(plan.seqs[0].context_token_ids, vec![3, 4, 5, 6, 7, 8, 2]);
        assert_eq!(plan.seqs[0].sampling.unwrap().output_index, 1);
    }
}
