//! Where a request waits, and what each step computes: iteration-level scheduling over the paged
//! KV cache (vLLM V1's shape).
//!
//! - **Waiting**: ordered by (priority, arrival); lower priority values run first, FCFS within a
//!   priority. The head is admitted when its next prompt chunk fits in the free blocks; it
//!   first takes whatever full blocks of its tokens the prefix cache holds.
//! - **Each step** fills a token budget: one token for every running sequence that is decoding,
//!   in priority order, then chunks of prompts still being read (chunked prefill), then new
//!   sequences from the waiting queue.
//! - **Preemption by recompute**: a decode that needs a block when none is free takes one from
//!   the lowest-priority, newest running sequence, which gives back all its blocks and returns
//!   to the waiting queue with its generated tokens kept. When it runs again it recomputes
//!   prompt and output (most of it from the prefix cache) and goes on sampling at the same
//!   output index, so a seeded or greedy request gets the same tokens, only later.
//! - **One step may be in flight while the next is planned** (overlap). A sequence's
//!   `computed` counts positions scheduled, not answered, as vLLM V1 does; a token sampled in a
//!   step whose answer has not come back is `pending`, and the next step feeds it by reference
//!   (`SequenceStep.feed_sampled`: rank 0 has it). Full blocks enter the prefix cache only once
//!   the step that wrote them is answered (`confirmed`).

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use helios_proto::v1::{
    PromptLogprobs, SampledLogprobs, SampledToken, SamplingParams, SequenceStep, StepPlan,
    StepResult, TokenLogprob,
};

use crate::block_manager::BlockManager;
use crate::constraint::TokenConstraint;

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
    /// Lower runs first (vLLM's convention).
    pub priority: i32,
    /// When the client stops waiting: past it the sequence is dropped, wherever it is.
    pub deadline: Option<Instant>,
    /// Rank 0 returns the whole logits row of every token sampled for it (debugging and
    /// tests: `helios logits`); a step carries logits only when one of its sequences asks.
    pub return_logits: bool,
    /// Structured outputs: which tokens may come next (see [`crate::constraint`]).
    pub constraint: Option<TokenConstraint>,
    /// Prompt logprobs: each prompt token's, and this many most likely tokens at each position.
    /// The prompt is then computed whole, never read from the prefix cache, until they are
    /// delivered with the first sampled token.
    pub prompt_logprobs: Option<u32>,
}

pub struct Sequence {
    pub id: u64,
    /// Prompt then generated tokens (those whose answer has come back).
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Positions whose KV is computed or being computed by a planned step.
    computed: usize,
    /// Positions whose KV an answered step wrote.
    confirmed: usize,
    /// Tokens sampled by planned steps whose answer has not come back (0 to 2).
    pending: usize,
    table: Vec<u32>,
    /// Chained hashes of the first `hashes.len()` blocks of `table` (cached or taken from the
    /// cache).
    hashes: Vec<u64>,
    /// Entries of `table` the ranks were sent (they keep them; a step sends only the rest).
    sent_blocks: usize,
    running: bool,
    params: SequenceParams,
    /// Another choice of the same request (its first): this one waits until that one's prompt
    /// blocks are in the prefix cache, then takes them instead of computing them again.
    leader: Option<u64>,
    /// Prompt logprobs answered so far: entry `j` is the prompt token at position `j + 1`'s.
    prompt_scores: Vec<SampledLogprobs>,
}

impl Sequence {
    pub fn new(id: u64, prompt: Vec<u32>, params: SequenceParams) -> Self {
        Self {
            id,
            prompt_len: prompt.len(),
            tokens: prompt,
            computed: 0,
            confirmed: 0,
            pending: 0,
            table: Vec::new(),
            hashes: Vec::new(),
            sent_blocks: 0,
            running: false,
            params,
            leader: None,
            prompt_scores: Vec::new(),
        }
    }

    /// A further choice of the request whose first choice is `leader`: it shares the prompt.
    pub fn following(mut self, leader: u64) -> Self {
        self.leader = Some(leader);
        self
    }

    /// Positions this sequence may fill: prompt + max_new_tokens.
    fn final_len(&self) -> usize {
        self.prompt_len + self.params.max_new_tokens
    }

    /// Tokens it can feed now, counting a pending one.
    fn feedable(&self) -> usize {
        (self.tokens.len() + self.pending).saturating_sub(self.computed)
    }

    /// Whether its last sampled token is its last: nothing more to plan, its answer ends it.
    fn at_length(&self) -> bool {
        self.tokens.len() + self.pending - self.prompt_len >= self.params.max_new_tokens
    }

    fn key(&self) -> (i32, u64) {
        (self.params.priority, self.id)
    }

    /// It asked for prompt logprobs and has not delivered them (they go with its first
    /// sampled token): its prompt steps score their input, and it reads no prefix cache.
    fn scores_prompt(&self) -> bool {
        self.params.prompt_logprobs.is_some() && self.tokens.len() == self.prompt_len
    }
}

/// A sequence on its way to another replica: its prompt and the tokens generated so far
/// (`tokens[..prompt_len]` is the prompt), and what it asks.
#[derive(Debug, Clone)]
pub struct Departing {
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    pub params: SequenceParams,
}

/// A token rank 0 sampled for a sequence, and whether that ended it.
#[derive(Debug, Clone)]
pub struct Sampled {
    pub token: SampledToken,
    pub finish: Option<FinishReason>,
    /// The logits it was sampled from, when the sequence asked for them.
    pub logits: Option<Vec<f32>>,
    /// With a sequence's first token, when it asked for them: the logprobs of its prompt
    /// tokens after the first (entry `j` is position `j + 1`'s).
    pub prompt_logprobs: Option<Vec<SampledLogprobs>>,
}

/// Why a sequence was not queued.
#[derive(Debug, thiserror::Error)]
pub enum AddError {
    #[error("the request needs {need} KV blocks (prompt + max_new_tokens = {len} positions); the whole cache has {total}")]
    NeverFits {
        need: usize,
        len: usize,
        total: usize,
    },
    #[error("the waiting queue is full ({0} requests)")]
    QueueFull(usize),
    #[error("the prompt is empty")]
    EmptyPrompt,
}

/// A step that did not come back right; its sequences are lost.
#[derive(Debug, thiserror::Error)]
#[error("{error:#}")]
pub struct StepFailed {
    pub seq_ids: Vec<u64>,
    pub error: anyhow::Error,
}

/// Tokens one step may feed, when not configured: decodes first, then chunks of prompts.
pub const DEFAULT_MAX_BATCH_TOKENS: usize = 512;
/// Sequences one step may hold, when not configured.
pub const DEFAULT_MAX_RUNNING: usize = 256;
/// Requests that may wait for a place, when not configured; beyond it new ones are refused.
pub const DEFAULT_MAX_WAITING: usize = 1024;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub max_batch_tokens: usize,
    pub max_running: usize,
    /// New requests beyond this many waiting are refused (preempted ones always return).
    pub max_waiting: usize,
    pub prefix_caching: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: DEFAULT_MAX_BATCH_TOKENS,
            max_running: DEFAULT_MAX_RUNNING,
            max_waiting: DEFAULT_MAX_WAITING,
            prefix_caching: true,
        }
    }
}

/// What the scheduler holds now, and its counters since start: the scheduler's part of a
/// replica's published snapshot.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerStats {
    pub running: u32,
    pub waiting: u32,
    pub kv_blocks_free: u32,
    pub kv_blocks_total: u32,
    pub preemptions: u64,
    /// Sequences sent back to the queue because the replica lost a rank.
    pub requeued: u64,
    /// Tokens of sequences looked up in the prefix cache when (re)admitted, and those found.
    pub prefix_query_tokens: u64,
    pub prefix_hit_tokens: u64,
}

#[derive(Debug, Clone, Copy)]
struct Planned {
    id: u64,
    tokens: usize,
    sample: bool,
    /// It samples and wants the logits it samples from.
    logits: bool,
    /// It samples under a constraint.
    constrained: bool,
    /// Its input is scored: the step's first position, and the prompt logprobs the answer
    /// must hold for it.
    scored: Option<(usize, usize)>,
}

struct PlannedStep {
    step_id: u64,
    seqs: Vec<Planned>,
    /// It samples a constrained sequence, whose next mask needs that token.
    constrained: bool,
}

pub struct Scheduler {
    blocks: BlockManager,
    config: SchedulerConfig,
    seqs: HashMap<u64, Sequence>,
    waiting: BTreeSet<(i32, u64)>,
    /// Running sequence ids in (priority, arrival) order: the preemption victim is the last.
    running: Vec<u64>,
    /// Sequences with a deadline, soonest first: a step looks at the expired ones only.
    deadlines: BTreeSet<(Instant, u64)>,
    /// Planned steps not yet answered, oldest first (at most two: one running, one next).
    planned: VecDeque<PlannedStep>,
    /// Sequences the ranks hold block tables for that ended since the last plan.
    forgotten: Vec<u64>,
    next_step: u64,
    stats: SchedulerStats,
    /// Sequences preempted since the caller last asked ([`Self::take_preempted`]).
    preempted: Vec<u64>,
}

impl Scheduler {
    pub fn new(blocks: BlockManager, config: SchedulerConfig) -> Self {
        Self {
            blocks,
            config: SchedulerConfig {
                max_batch_tokens: config.max_batch_tokens.max(1),
                max_running: config.max_running.max(1),
                ..config
            },
            seqs: HashMap::new(),
            waiting: BTreeSet::new(),
            running: Vec::new(),
            deadlines: BTreeSet::new(),
            planned: VecDeque::new(),
            forgotten: Vec::new(),
            next_step: 0,
            stats: SchedulerStats::default(),
            preempted: Vec::new(),
        }
    }

    /// What it holds now (running, waiting, free blocks) and its counters: the one way to read
    /// its numbers, for the replica's snapshot and for tests alike.
    pub fn stats(&self) -> SchedulerStats {
        let n = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
        SchedulerStats {
            running: n(self.running.len()),
            waiting: n(self.waiting.len()),
            kv_blocks_free: n(self.blocks.num_free()),
            kv_blocks_total: n(self.blocks.num_total()),
            ..self.stats
        }
    }

    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// Queues a sequence; refused if it could never fit in the whole cache or the queue is
    /// full. Admission control checks the first so clients get a clear message early.
    pub fn add(&mut self, seq: Sequence) -> Result<(), AddError> {
        self.add_all(vec![seq])
    }

    /// Queues the sequences of one request (its choices) all or none: the waiting limit counts
    /// every one of them.
    pub fn add_all(&mut self, seqs: Vec<Sequence>) -> Result<(), AddError> {
        if self.waiting.len() + seqs.len() > self.config.max_waiting {
            return Err(AddError::QueueFull(self.waiting.len()));
        }
        seqs.iter().try_for_each(|s| self.check(s))?;
        for seq in seqs {
            self.enqueue(seq, false)?;
        }
        Ok(())
    }

    /// Whether `seq` could ever run here.
    fn check(&self, seq: &Sequence) -> Result<(), AddError> {
        let need = seq.final_len().div_ceil(self.blocks.block_size());
        if seq.prompt_len == 0 {
            return Err(AddError::EmptyPrompt);
        }
        if need > self.blocks.num_total() {
            return Err(AddError::NeverFits {
                need,
                len: seq.final_len(),
                total: self.blocks.num_total(),
            });
        }
        Ok(())
    }

    /// Queues `seq`; with `limited`, only within `max_waiting`.
    fn enqueue(&mut self, seq: Sequence, limited: bool) -> Result<(), AddError> {
        self.check(&seq)?;
        if limited && self.waiting.len() >= self.config.max_waiting {
            return Err(AddError::QueueFull(self.waiting.len()));
        }
        self.waiting.insert(seq.key());
        if let Some(d) = seq.params.deadline {
            self.deadlines.insert((d, seq.id));
        }
        self.seqs.insert(seq.id, seq);
        Ok(())
    }

    /// Drops a sequence wherever it is and frees its blocks; false if it is not here.
    pub fn abort(&mut self, id: u64) -> bool {
        self.remove(id).is_some()
    }

    /// Takes a sequence out wherever it is, its blocks freed.
    fn remove(&mut self, id: u64) -> Option<Sequence> {
        let mut s = self.seqs.remove(&id)?;
        if let Some(d) = s.params.deadline {
            self.deadlines.remove(&(d, id));
        }
        if s.running {
            if let Some(i) = self.running.iter().position(|&r| r == id) {
                self.running.remove(i);
            }
            self.free_blocks(&mut s);
        } else {
            self.waiting.remove(&s.key());
        }
        Some(s)
    }

    /// Drops every sequence and frees their blocks.
    pub fn abort_all(&mut self) {
        let ids: Vec<u64> = self.seqs.keys().copied().collect();
        for id in ids {
            self.abort(id);
        }
    }

    /// Drops every sequence whose deadline is before `now`; returns their ids.
    pub fn expire(&mut self, now: Instant) -> Vec<u64> {
        let late: Vec<u64> = self
            .deadlines
            .iter()
            .take_while(|&&(d, _)| d <= now)
            .map(|&(_, id)| id)
            .collect();
        for &id in &late {
            self.abort(id);
        }
        late
    }

    fn free_blocks(&mut self, s: &mut Sequence) {
        if s.sent_blocks > 0 {
            self.forgotten.push(s.id);
        }
        self.blocks.release(&mut s.table);
        s.hashes.clear();
        s.sent_blocks = 0;
        s.computed = 0;
        s.confirmed = 0;
        s.running = false;
    }

    /// Sends the newest, lowest-priority running sequence back to the waiting queue.
    fn preempt_last(&mut self) -> Option<u64> {
        let id = self.running.pop()?;
        let mut s = self.seqs.remove(&id)?;
        self.free_blocks(&mut s);
        self.waiting.insert(s.key());
        self.seqs.insert(id, s);
        self.stats.preemptions += 1;
        self.preempted.push(id);
        Some(id)
    }

    /// The ranks lost their KV (the replica lost a rank and is rebuilt): every running sequence
    /// returns to the waiting queue with the tokens it has, as in preemption; unanswered steps
    /// are forgotten (the tokens they would have sampled are sampled again, at the same output
    /// index, so the same for a greedy or seeded request); the prefix cache is emptied, and the
    /// ranks, which start the new build with no block tables, are sent every table whole.
    /// Returns the sequences that were running.
    pub fn requeue_all(&mut self) -> Vec<u64> {
        self.planned.clear();
        let running = std::mem::take(&mut self.running);
        for &id in &running {
            if let Some(mut s) = self.seqs.remove(&id) {
                self.free_blocks(&mut s);
                self.waiting.insert(s.key());
                self.seqs.insert(id, s);
            }
        }
        // `free_blocks` noted the tables as ranks' to forget: the new build holds none.
        self.forgotten.clear();
        for s in self.seqs.values_mut() {
            s.pending = 0;
        }
        self.blocks.forget_cached();
        self.stats.requeued += running.len() as u64;
        running
    }

    /// Takes every sequence out, to move it to another replica (this one is lost): each leaves
    /// with the tokens it has (unanswered steps are forgotten, as in [`Self::requeue_all`]) and
    /// its parameters, in (priority, arrival) order. An unseeded sampled sequence keeps the
    /// seed it had here (its id), so it samples on the same draws elsewhere.
    pub fn take_all(&mut self) -> Vec<(u64, Departing)> {
        let mut keys: Vec<(i32, u64)> = self.seqs.values().map(Sequence::key).collect();
        keys.sort_unstable();
        let out = keys
            .into_iter()
            .filter_map(|(_, id)| {
                let mut s = self.remove(id)?;
                s.params.sampling.seed.get_or_insert(id);
                let departing = Departing {
                    tokens: s.tokens,
                    prompt_len: s.prompt_len,
                    params: s.params,
                };
                Some((id, departing))
            })
            .collect();
        // No rank will run what was planned, nor needs telling what to forget.
        self.planned.clear();
        self.forgotten.clear();
        out
    }

    /// Queues a sequence that comes from another replica with the tokens it had there; it
    /// recomputes them and samples on. Like a preempted sequence it is not held to the waiting
    /// limit: it was accepted already.
    pub fn add_resumed(&mut self, id: u64, d: Departing) -> Result<(), AddError> {
        let mut seq = Sequence::new(id, d.tokens, d.params);
        seq.prompt_len = d.prompt_len.min(seq.tokens.len());
        self.enqueue(seq, false)
    }

    /// Mirrors the prefix cache's block hashes into `index` (the router reads it).
    pub fn publish_prefixes(&mut self, index: crate::prefix_index::PrefixIndex) {
        self.blocks.publish_to(index);
    }

    /// The sequences preempted since the previous call, in order (a request's trace shows it).
    pub fn take_preempted(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.preempted)
    }

    /// The next step, or None when nothing can run. At most one earlier step may still be
    /// unanswered.
    pub fn schedule(&mut self) -> Result<Option<StepPlan>> {
        if self.planned.len() >= 2 {
            bail!("two planned steps are still unanswered");
        }
        if self.awaits_constrained_token() {
            return Ok(None);
        }
        let mut budget = self.config.max_batch_tokens;
        let mut steps = Vec::new();
        let mut planned = Vec::new();
        let mut prefilling = Vec::new();
        let mut preempted = false;
        // Decodes, in priority order, preempting from the back when blocks run out.
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let s = &self.seqs[&id];
            let n = s.feedable();
            if n > 1 {
                prefilling.push(id);
            }
            if n != 1 || s.pending > 1 || s.at_length() {
                i += 1;
                continue;
            }
            let want = s.computed + 1;
            let mut ok = true;
            while self.blocks.needed(self.seqs[&id].table.len(), want) > self.blocks.num_free() {
                preempted = true;
                if self.preempt_last() == Some(id) {
                    ok = false;
                    break;
                }
            }
            if ok {
                self.plan_one(id, 1, &mut steps, &mut planned)?;
                budget -= 1;
            }
            i += 1;
        }
        // Prompt chunks of running sequences, within the blocks there are.
        for id in prefilling {
            if budget == 0 {
                break;
            }
            let Some(s) = self.seqs.get(&id).filter(|s| s.running) else {
                continue;
            };
            let reach = self.blocks.reachable(s.table.len());
            let n = s
                .feedable()
                .min(budget)
                .min(reach.saturating_sub(s.computed));
            if n > 0 {
                self.plan_one(id, n, &mut steps, &mut planned)?;
                budget -= n;
            }
        }
        // New sequences, unless this step had to preempt (they would only be preempted next).
        while !preempted && budget > 0 && self.running.len() < self.config.max_running {
            let Some(&(_, id)) = self.waiting.first() else {
                break;
            };
            if self.awaits_leader(id) {
                break;
            }
            let Some(n) = self.admit(id, budget) else {
                break;
            };
            self.plan_one(id, n, &mut steps, &mut planned)?;
            budget -= n;
        }
        if steps.is_empty() {
            // Running sequences, none of them able to take a block and nothing in flight to
            // free one: give the newest one's blocks to the others rather than wait forever.
            if self.planned.is_empty() && self.running.len() > 1 && !preempted {
                self.preempt_last();
                return self.schedule();
            }
            return Ok(None);
        }
        let step_id = self.next_step;
        self.next_step += 1;
        let return_logits = planned.iter().any(|p| p.logits);
        self.planned.push_back(PlannedStep {
            step_id,
            constrained: planned.iter().any(|p| p.constrained),
            seqs: planned,
        });
        Ok(Some(StepPlan {
            step_id,
            seqs: steps,
            return_logits,
            finished_seq_ids: std::mem::take(&mut self.forgotten),
            trace_context: Default::default(),
            // The sharded client stamps the build of the replica it sends the plan to.
            generation: 0,
        }))
    }

    /// Whether an unanswered step samples a constrained sequence: its next mask depends on
    /// that token, so no step is planned until the answer is applied (overlap pauses while
    /// constrained sequences run; the step in flight is not delayed). Read from the planned
    /// steps, so that a step without constrained sequences pays nothing for the check.
    fn awaits_constrained_token(&self) -> bool {
        self.planned.iter().any(|p| p.constrained)
    }

    /// Whether waiting sequence `id` is a further choice whose leader (the request's first
    /// choice, ahead of it in the queue) is running but has not yet put every full block of the
    /// prompt the two share into the prefix cache. It waits at the head for a step or two, so
    /// that the prompt is computed once; when the leader has ended, been aborted or is waiting
    /// itself (preempted, requeued), it simply runs.
    fn awaits_leader(&self, id: u64) -> bool {
        let Some(s) = self.seqs.get(&id) else {
            return false;
        };
        if s.scores_prompt() {
            return false; // it computes its prompt itself
        }
        let leader = s.leader.and_then(|l| self.seqs.get(&l));
        let shared = s.prompt_len.saturating_sub(1) / self.blocks.block_size();
        self.config.prefix_caching && leader.is_some_and(|l| l.running && l.hashes.len() < shared)
    }

    /// Moves the head of the waiting queue to running if its next chunk fits, after taking
    /// what the prefix cache holds of it; returns the chunk's length.
    fn admit(&mut self, id: u64, budget: usize) -> Option<usize> {
        let bs = self.blocks.block_size();
        let mut s = self.seqs.remove(&id)?;
        // Its last sampled token is still on its way back (preempted while in flight).
        if s.pending > 0 {
            self.seqs.insert(id, s);
            return None;
        }
        let mut hits = 0;
        let cached = self.config.prefix_caching && !s.scores_prompt();
        if cached {
            // Leave at least one token to compute: its logits give the next token.
            let max = (s.tokens.len() - 1) / bs;
            hits = self
                .blocks
                .take_cached(&s.tokens, max, &mut s.table, &mut s.hashes);
        }
        s.computed = hits * bs;
        s.confirmed = s.computed;
        let reach = self.blocks.reachable(s.table.len());
        let n = s
            .feedable()
            .min(budget)
            .min(reach.saturating_sub(s.computed));
        if n == 0 {
            self.blocks.release(&mut s.table);
            s.hashes.clear();
            s.computed = 0;
            s.confirmed = 0;
            self.seqs.insert(id, s);
            return None;
        }
        if cached {
            self.stats.prefix_query_tokens += s.tokens.len() as u64;
            self.stats.prefix_hit_tokens += s.computed as u64;
        }
        self.waiting.remove(&s.key());
        let at = self
            .running
            .partition_point(|r| self.seqs[r].key() < s.key());
        self.running.insert(at, id);
        s.running = true;
        self.seqs.insert(id, s);
        Some(n)
    }

    /// Adds `n` tokens of running sequence `id` to the step being planned.
    fn plan_one(
        &mut self,
        id: u64,
        n: usize,
        steps: &mut Vec<SequenceStep>,
        planned: &mut Vec<Planned>,
    ) -> Result<()> {
        let s = self.seqs.get_mut(&id).context("planned sequence is gone")?;
        self.blocks.ensure(&mut s.table, s.computed + n)?;
        let end = s.computed + n;
        let feed_sampled = s.computed == s.tokens.len();
        let sample = end == s.tokens.len() + s.pending;
        let mut sampling = s.params.sampling.clone();
        sampling.output_index = end.saturating_sub(s.prompt_len) as u32;
        let allowed_tokens = match &mut s.params.constraint {
            Some(c) if sample => c.allowed()?,
            _ => Vec::new(),
        };
        // Prompt logprobs: rows of this chunk score the prompt token after them; the last row
        // the next chunk's first token, or nothing when it samples.
        let scoring = s
            .params
            .prompt_logprobs
            .filter(|_| s.scores_prompt() && s.computed < s.prompt_len);
        let next_prompt_token = scoring
            .and(s.tokens.get(end).copied())
            .filter(|_| end < s.prompt_len);
        let scored = scoring.map(|_| {
            let first = s.computed;
            (first, n - 1 + usize::from(next_prompt_token.is_some()))
        });
        let constrained = !allowed_tokens.is_empty();
        steps.push(SequenceStep {
            seq_id: id,
            token_ids: if feed_sampled {
                Vec::new()
            } else {
                s.tokens[s.computed..end].to_vec()
            },
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
            feed_sampled,
            allowed_tokens,
            prompt_logprobs: scoring,
            next_prompt_token,
        });
        s.sent_blocks = s.table.len();
        s.computed = end;
        s.pending += usize::from(sample);
        planned.push(Planned {
            id,
            tokens: n,
            sample,
            logits: sample && s.params.return_logits,
            constrained,
            scored,
        });
        Ok(())
    }

    /// Planned steps not yet answered (or failed).
    pub fn num_unanswered(&self) -> usize {
        self.planned.len()
    }

    /// Ids of the oldest unanswered step's sequences.
    pub fn planned_ids(&self) -> Vec<u64> {
        self.planned
            .front()
            .map(|p| p.seqs.iter().map(|s| s.id).collect())
            .unwrap_or_default()
    }

    /// Gives up on the oldest unanswered step (it failed on the ranks) and on every
    /// sequence in it, and on the newer step if one was planned; returns the sequences.
    pub fn fail_planned(&mut self) -> Vec<u64> {
        let mut ids: Vec<u64> = self
            .planned
            .drain(..)
            .flat_map(|p| p.seqs.into_iter().map(|s| s.id))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        for &id in &ids {
            self.abort(id);
        }
        ids
    }

    /// Applies rank 0's answer to the oldest unanswered step: advances its sequences, appends
    /// the sampled tokens, caches blocks it filled, and retires sequences that reached EOS or
    /// their length. On a malformed answer the step's sequences (and those of the step
    /// planned after it) are dropped and named in the error.
    pub fn apply(&mut self, result: StepResult) -> Result<Vec<Sampled>, StepFailed> {
        if let Err(error) = self.check_answer(&result) {
            let seq_ids = self.fail_planned();
            return Err(StepFailed { seq_ids, error });
        }
        let step = self.planned.pop_front().unwrap_or(PlannedStep {
            step_id: result.step_id,
            seqs: Vec::new(),
            constrained: false,
        });
        let mut tokens = result.tokens.into_iter();
        // Rows come in plan order (when some sequence asked): each is found by reading on.
        let mut rows = result.logits.into_iter();
        let mut scores = result.prompt_logprobs.into_iter();
        let mut out = Vec::new();
        for p in step.seqs {
            let t = if p.sample { tokens.next() } else { None };
            let scored = p.scored.and_then(|_| scores.next());
            let Some(s) = self.seqs.get_mut(&p.id) else {
                continue; // aborted since: its token is dropped
            };
            if let (Some((first, _)), Some(scored)) = (p.scored, scored) {
                add_prompt_scores(s, first, scored);
            }
            // A sequence preempted since is not running: it cannot have been admitted again
            // before this answer, as a third step is planned only after it.
            if s.running {
                s.confirmed += p.tokens;
                if self.config.prefix_caching {
                    cache_full_blocks(&mut self.blocks, s);
                }
            }
            let Some(t) = t else { continue };
            s.pending = s.pending.saturating_sub(1);
            let prompt_logprobs = s
                .scores_prompt()
                .then(|| std::mem::take(&mut s.prompt_scores));
            s.tokens.push(t.token_id);
            let eos = s.params.stop_token_ids.contains(&t.token_id);
            let complete = !eos && s.params.constraint.as_mut().is_some_and(|c| accept(c, &t));
            let finish = if eos || complete {
                Some(FinishReason::Eos)
            } else if s.tokens.len() - s.prompt_len >= s.params.max_new_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            let logits = if p.logits {
                rows.find(|l| l.seq_id == p.id).map(|l| l.values)
            } else {
                None
            };
            out.push(Sampled {
                token: t,
                finish,
                logits,
                prompt_logprobs,
            });
        }
        for s in &out {
            if s.finish.is_some() {
                self.abort(s.token.seq_id);
            }
        }
        Ok(out)
    }

    /// An answer must be for the oldest unanswered step and sample exactly the sequences
    /// that asked, in plan order.
    fn check_answer(&self, result: &StepResult) -> Result<()> {
        let step = self
            .planned
            .front()
            .context("an answer to no planned step")?;
        if result.step_id != step.step_id {
            bail!(
                "answer to step {} when step {} was next",
                result.step_id,
                step.step_id
            );
        }
        let mut tokens = result.tokens.iter();
        for p in step.seqs.iter().filter(|p| p.sample) {
            let t = tokens
                .next()
                .with_context(|| format!("rank 0 sampled nothing for sequence {}", p.id))?;
            if t.seq_id != p.id {
                bail!("rank 0 answered sequence {} for {}", t.seq_id, p.id);
            }
        }
        if let Some(t) = tokens.next() {
            bail!(
                "rank 0 sampled for sequence {}, which did not ask",
                t.seq_id
            );
        }
        let mut scores = result.prompt_logprobs.iter();
        for (p, (_, want)) in step.seqs.iter().filter_map(|p| Some((p, p.scored?))) {
            let got = scores
                .next()
                .with_context(|| format!("rank 0 scored no prompt of sequence {}", p.id))?;
            if got.seq_id != p.id || got.tokens.len() != want {
                bail!(
                    "rank 0 scored {} prompt tokens of sequence {} for {want} of sequence {}",
                    got.tokens.len(),
                    got.seq_id,
                    p.id
                );
            }
        }
        if let Some(extra) = scores.next() {
            bail!("rank 0 scored sequence {}, which did not ask", extra.seq_id);
        }
        Ok(())
    }

    /// Checks the block manager against every sequence's table, and the scheduler's own
    /// bookkeeping (tests).
    pub fn audit(&self) -> Result<()> {
        self.blocks
            .audit(self.seqs.values().map(|s| s.table.as_slice()))?;
        for s in self.seqs.values() {
            let listed = if s.running {
                self.running.contains(&s.id)
            } else {
                self.waiting.contains(&s.key())
            };
            if !listed {
                bail!("sequence {} is in neither queue it claims", s.id);
            }
            if !s.running && !s.table.is_empty() {
                bail!("waiting sequence {} holds blocks", s.id);
            }
            if s.table.len() * self.blocks.block_size() < s.computed {
                bail!("sequence {} computed past its blocks", s.id);
            }
        }
        if self.running.len() + self.waiting.len() != self.seqs.len() {
            bail!("queues and sequences disagree");
        }
        let with_deadline = self.seqs.values().filter(|s| s.params.deadline.is_some());
        if with_deadline.count() != self.deadlines.len() {
            bail!("the deadline index and the sequences disagree");
        }
        Ok(())
    }
}

/// Advances a constrained sequence past its sampled token; true when nothing may follow (the
/// grammar is complete, or the token broke it: ranks honour the mask, so that means a bug
/// rather than a client's input, and ending the output keeps it valid as far as it goes).
fn accept(c: &mut TokenConstraint, t: &SampledToken) -> bool {
    match c.accept(t.token_id) {
        Ok(()) => c.is_complete(),
        Err(e) => {
            tracing::warn!(
                seq = t.seq_id,
                "a sampled token broke its constraint: {e:#}"
            );
            true
        }
    }
}

/// Adds the prompt logprobs a step answered for `s`, its rows from position `first` on: each
/// scores the token one position later. A recompute (after a preemption or a lost rank)
/// scores positions again that were answered before; those are kept as first answered.
fn add_prompt_scores(s: &mut Sequence, first: usize, scored: PromptLogprobs) {
    if !s.scores_prompt() {
        return;
    }
    // Entry j of `prompt_scores` is position j + 1's; this answer's k-th, position first + 1 + k.
    let have = s.prompt_scores.len();
    if first > have {
        return; // a gap: an earlier answer was lost, so the recompute from 0 fills it
    }
    s.prompt_scores
        .extend(scored.tokens.into_iter().skip(have - first));
}

/// Puts the sequence's full, answered blocks into the prefix cache.
fn cache_full_blocks(blocks: &mut BlockManager, s: &mut Sequence) {
    let bs = blocks.block_size();
    let full = s.confirmed.min(s.tokens.len()) / bs;
    while s.hashes.len() < full {
        let i = s.hashes.len();
        let parent = s.hashes.last().copied();
        let hash = blocks.register(s.table[i], parent, &s.tokens[i * bs..(i + 1) * bs]);
        s.hashes.push(hash);
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
        prompt_logprobs: plan
            .seqs
            .iter()
            .filter(|s| s.prompt_logprobs.is_some())
            .map(|s| PromptLogprobs {
                seq_id: s.seq_id,
                tokens: s
                    .token_ids
                    .iter()
                    .skip(1)
                    .chain(&s.next_prompt_token)
                    .map(|&token_id| SampledLogprobs {
                        sampled: Some(TokenLogprob {
                            token_id,
                            logprob: 0.0,
                        }),
                        top: Vec::new(),
                    })
                    .collect(),
            })
            .collect(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests;
