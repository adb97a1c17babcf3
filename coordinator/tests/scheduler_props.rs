//! Property tests of the scheduler and block manager against a fake engine.
//!
//! Random arrivals (with shared prefixes and priorities), cancellations, deadlines, EOS and
//! length finishes, on a KV cache small enough that preemption is common, with up to two
//! unanswered steps (overlap). The fake engine keeps what a worker keeps: block tables as the
//! plans sent them, rank 0's last sampled tokens, and a KV cache whose every slot records the
//! token written there. After every operation:
//! - the block manager's refcounts match the sequences' tables, no block is leaked or free twice;
//! - every plan stays within the token budget and `max_running`, a sequence at most once;
//! - every step attends over exactly its own tokens: each context position's slot holds the
//!   sequence's token at that position, however it got there (computed, shared from the prefix
//!   cache, recomputed after preemption);
//! - in the end every accepted request finished (with exactly the tokens its id and output
//!   index determine, so preemption changed nothing) or was cancelled or expired.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use helios_coordinator::block_manager::BlockManager;
use helios_coordinator::scheduler::{
    answer_with, FinishReason, Scheduler, SchedulerConfig, Sequence, SequenceParams,
};
use helios_proto::v1::StepPlan;
use proptest::prelude::*;

const EOS: u32 = 0;
const BLOCK: usize = 4;

/// The token the fake rank 0 samples: fixed by the sequence and output index, EOS about one
/// time in 40.
fn token(seq: u64, index: u32) -> u32 {
    let h = (seq.wrapping_mul(0x9E37_79B9) ^ u64::from(index).wrapping_mul(0x85EB_CA6B)) % 40;
    h as u32
}

#[derive(Debug, Clone)]
enum Op {
    Add {
        /// Shares the first `shared` tokens with every other request that does.
        shared: usize,
        own: usize,
        max_new: usize,
        priority: i32,
        deadline: Option<u64>,
    },
    Plan,
    Answer,
    Cancel(usize),
    Tick(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..=12usize, 1..10usize, 1..12usize, -1..=1i32, prop::option::weighted(0.2, 1..40u64))
            .prop_map(|(shared, own, max_new, priority, deadline)| Op::Add {
                shared, own, max_new, priority, deadline,
            }),
        4 => Just(Op::Plan),
        4 => Just(Op::Answer),
        1 => any::<usize>().prop_map(Op::Cancel),
        1 => (1..5u64).prop_map(Op::Tick),
    ]
}

/// What a worker keeps, checked at every step.
#[derive(Default)]
struct FakeEngine {
    tables: HashMap<u64, Vec<u32>>,
    /// Per physical block and slot: (sequence, position, token) written there.
    kv: HashMap<(u32, usize), u32>,
    last_sampled: HashMap<u64, u32>,
}

struct Harness {
    sched: Scheduler,
    engine: FakeEngine,
    config: SchedulerConfig,
    in_flight: VecDeque<StepPlan>,
    /// Every accepted request's true tokens (prompt; output follows from `token`).
    prompts: HashMap<u64, Vec<u32>>,
    max_new: HashMap<u64, usize>,
    live: Vec<u64>,
    outputs: HashMap<u64, Vec<u32>>,
    finished: HashMap<u64, FinishReason>,
    dropped: HashSet<u64>,
    next_id: u64,
    start: Instant,
    now: u64,
    total_blocks: usize,
}

impl Harness {
    fn new(blocks: usize, config: SchedulerConfig) -> Self {
        Self {
            sched: Scheduler::new(BlockManager::new(blocks, BLOCK), config),
            engine: FakeEngine::default(),
            config,
            in_flight: VecDeque::new(),
            prompts: HashMap::new(),
            max_new: HashMap::new(),
            live: Vec::new(),
            outputs: HashMap::new(),
            finished: HashMap::new(),
            dropped: HashSet::new(),
            next_id: 0,
            start: Instant::now(),
            now: 0,
            total_blocks: blocks,
        }
    }

    fn run(&mut self, op: Op) -> Result<(), TestCaseError> {
        match op {
            Op::Add {
                shared,
                own,
                max_new,
                priority,
                deadline,
            } => {
                let id = self.next_id;
                self.next_id += 1;
                let prompt: Vec<u32> = (0..shared as u32)
                    .map(|i| 100 + i)
                    .chain((0..own as u32).map(|i| 1000 + id as u32 * 16 + i))
                    .collect();
                let params = SequenceParams {
                    max_new_tokens: max_new,
                    stop_token_ids: vec![EOS],
                    priority,
                    deadline: deadline.map(|d| self.start + Duration::from_millis(self.now + d)),
                    ..Default::default()
                };
                if self
                    .sched
                    .add(Sequence::new(id, prompt.clone(), params))
                    .is_ok()
                {
                    self.prompts.insert(id, prompt);
                    self.max_new.insert(id, max_new);
                    self.live.push(id);
                }
            }
            Op::Plan => {
                if self.in_flight.len() < 2 {
                    if let Some(plan) = self.sched.schedule().map_err(fail)? {
                        self.check_plan(&plan)?;
                        self.in_flight.push_back(plan);
                    }
                }
            }
            Op::Answer => {
                if let Some(plan) = self.in_flight.pop_front() {
                    let answer = self.execute(&plan)?;
                    for s in self.sched.apply(answer).map_err(fail)? {
                        let id = s.token.seq_id;
                        prop_assert!(!self.dropped.contains(&id), "a token for dropped {id}");
                        self.outputs.entry(id).or_default().push(s.token.token_id);
                        if let Some(f) = s.finish {
                            self.finished.insert(id, f);
                            self.live.retain(|&l| l != id);
                        }
                    }
                }
            }
            Op::Cancel(i) => {
                if !self.live.is_empty() {
                    let id = self.live.remove(i % self.live.len());
                    prop_assert!(self.sched.abort(id));
                    self.dropped.insert(id);
                }
            }
            Op::Tick(ms) => {
                self.now += ms;
                let now = self.start + Duration::from_millis(self.now);
                for id in self.sched.expire(now) {
                    prop_assert!(self.live.contains(&id));
                    self.live.retain(|&l| l != id);
                    self.dropped.insert(id);
                }
            }
        }
        self.sched.audit().map_err(fail)?;
        Ok(())
    }

    fn check_plan(&self, plan: &StepPlan) -> Result<(), TestCaseError> {
        let tokens: usize = plan
            .seqs
            .iter()
            .map(|s| s.token_ids.len() + usize::from(s.feed_sampled))
            .sum();
        prop_assert!(tokens <= self.config.max_batch_tokens, "{tokens} tokens");
        prop_assert!(plan.seqs.len() <= self.config.max_running);
        let ids: HashSet<u64> = plan.seqs.iter().map(|s| s.seq_id).collect();
        prop_assert_eq!(ids.len(), plan.seqs.len(), "a sequence twice in a step");
        Ok(())
    }

    /// Runs a plan as a worker would: tables, context check, KV writes, rank 0's samples.
    fn execute(&mut self, plan: &StepPlan) -> Result<helios_proto::v1::StepResult, TestCaseError> {
        let e = &mut self.engine;
        for id in &plan.finished_seq_ids {
            e.tables.remove(id);
        }
        let mut sampled = HashMap::new();
        for s in &plan.seqs {
            let e = &mut self.engine;
            let table = if s.append_blocks {
                let t = e.tables.get_mut(&s.seq_id);
                prop_assert!(t.is_some(), "append to an unknown table");
                let t = t.unwrap_or_else(|| unreachable!());
                t.extend_from_slice(&s.block_table);
                t.clone()
            } else {
                e.tables.insert(s.seq_id, s.block_table.clone());
                s.block_table.clone()
            };
            let fed: Vec<u32> = if s.feed_sampled {
                let t = e.last_sampled.get(&s.seq_id);
                prop_assert!(t.is_some(), "feed_sampled without a sample");
                vec![*t.unwrap_or_else(|| unreachable!())]
            } else {
                s.token_ids.clone()
            };
            let start = s.start_pos as usize;
            prop_assert!(table.len() * BLOCK >= start + fed.len(), "table too short");
            // The context this step attends over is the sequence's own.
            for pos in 0..start {
                let slot = (table[pos / BLOCK], pos % BLOCK);
                let want = (s.seq_id, pos);
                prop_assert_eq!(
                    self.engine.kv.get(&slot).copied(),
                    Some(truth(&self.prompts, want.0, want.1)),
                    "sequence {} position {} reads the wrong KV",
                    s.seq_id,
                    pos
                );
            }
            for (k, &t) in fed.iter().enumerate() {
                let pos = start + k;
                prop_assert_eq!(t, truth(&self.prompts, s.seq_id, pos), "fed a wrong token");
                self.engine.kv.insert((table[pos / BLOCK], pos % BLOCK), t);
            }
            if s.sample {
                let idx = s.sampling.as_ref().map_or(0, |p| p.output_index);
                prop_assert_eq!(
                    idx as usize,
                    start + fed.len() - self.prompts[&s.seq_id].len(),
                    "sampling at the wrong output index"
                );
                sampled.insert(s.seq_id, token(s.seq_id, idx));
            }
        }
        let answer = answer_with(plan, |s| sampled[&s.seq_id]);
        self.engine.last_sampled = sampled;
        Ok(answer)
    }

    /// Answers and plans until nothing is left; then every request is accounted for.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..20_000 {
            if self.sched.is_idle() && self.in_flight.is_empty() {
                break;
            }
            self.run(Op::Plan)?;
            self.run(Op::Answer)?;
        }
        prop_assert!(self.sched.is_idle(), "stuck: requests left after 20k steps");
        prop_assert_eq!(
            self.sched.stats().kv_blocks_free as usize,
            self.total_blocks
        );
        for (&id, prompt) in &self.prompts {
            let out = self.outputs.get(&id).cloned().unwrap_or_default();
            let want: Vec<u32> = (0..out.len() as u32).map(|i| token(id, i)).collect();
            prop_assert_eq!(&out, &want, "sequence {} got other tokens", id);
            match (self.finished.get(&id), self.dropped.contains(&id)) {
                (Some(FinishReason::Length), false) => {
                    prop_assert_eq!(out.len(), self.max_new[&id]);
                    prop_assert!(!out.contains(&EOS));
                }
                (Some(FinishReason::Eos), false) => {
                    prop_assert_eq!(out.last(), Some(&EOS));
                    prop_assert!(out.len() <= self.max_new[&id]);
                }
                (None, true) => {}
                other => prop_assert!(false, "sequence {id} ({prompt:?}) ended as {other:?}"),
            }
        }
        Ok(())
    }
}

/// The sequence's true token at `pos`: its prompt's, then what `token` samples.
fn truth(prompts: &HashMap<u64, Vec<u32>>, id: u64, pos: usize) -> u32 {
    let p = &prompts[&id];
    match p.get(pos) {
        Some(&t) => t,
        None => token(id, (pos - p.len()) as u32),
    }
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{e:#}"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn scheduling_keeps_every_invariant(
        ops in prop::collection::vec(op(), 1..160),
        blocks in 8..24usize,
        max_batch_tokens in 1..24usize,
        max_running in 1..6usize,
        prefix_caching in any::<bool>(),
    ) {
        let config = SchedulerConfig {
            max_batch_tokens,
            max_running,
            max_waiting: 12,
            prefix_caching,
        };
        let mut h = Harness::new(blocks, config);
        for op in ops {
            h.run(op)?;
        }
        h.drain()?;
    }
}

/// The random workload above does reach what it is meant to test: preemptions, prefix-cache
/// hits, fed tokens, cancellations and expired deadlines all happen.
#[test]
fn the_random_workload_exercises_preemption_the_prefix_cache_and_deadlines() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let (mut preemptions, mut hits, mut fed, mut dropped) = (0, 0, 0, 0);
    for _ in 0..64 {
        let ops = prop::collection::vec(op(), 100..160)
            .new_tree(&mut runner)
            .unwrap()
            .current();
        let config = SchedulerConfig {
            max_batch_tokens: 8,
            max_running: 4,
            max_waiting: 12,
            prefix_caching: true,
        };
        let mut h = Harness::new(12, config);
        for op in ops {
            if matches!(op, Op::Plan) && !h.in_flight.is_empty() {
                fed += 1;
            }
            h.run(op).unwrap();
        }
        h.drain().unwrap();
        preemptions += h.sched.stats().preemptions;
        hits += h.sched.stats().prefix_hit_tokens;
        dropped += h.dropped.len();
    }
    assert!(preemptions > 0, "no preemption");
    assert!(hits > 0, "no prefix-cache hit");
    assert!(fed > 0, "never planned with a step in flight");
    assert!(dropped > 0, "nothing cancelled or expired");
    eprintln!("{preemptions} preemptions, {hits} hit tokens, {dropped} dropped");
}
