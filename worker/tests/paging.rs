//! The paged KV cache, in-process on one rank: however a prompt is cut into chunks, whatever
//! the block size, and whatever else shares the batch, a sequence gets the same logits.
//! Also checks the single-rank forward pass against the independent NumPy reference.

use helios_proto::v1::{SequenceStep, StepPlan};
use helios_tests::{make_tiny_model, max_rel_err, reference_logits};
use helios_worker::comm::SingleRank;
use helios_worker::engine::{Engine, EngineOptions};

fn engine(model: &std::path::Path, block_size: usize, num_blocks: usize) -> Engine {
    let mut opts = EngineOptions::cpu(model);
    opts.block_size = block_size;
    opts.num_kv_blocks = Some(num_blocks);
    Engine::load(&opts, Box::new(SingleRank)).expect("engine loads")
}

/// A sequence being fed: its tokens, how many are in the cache, its blocks (and how many of
/// them the engine was told: each step sends only the blocks it adds, as the coordinator does).
struct Feed {
    id: u64,
    tokens: Vec<u32>,
    done: usize,
    table: Vec<u32>,
    block_size: usize,
    sent: usize,
}

impl Feed {
    fn new(id: u64, tokens: Vec<u32>, first_block: u32, block_size: usize) -> Self {
        let n = (tokens.len().div_ceil(block_size)) as u32;
        Self {
            id,
            tokens,
            done: 0,
            table: (first_block..first_block + n).collect(),
            block_size,
            sent: 0,
        }
    }

    /// The next `n` tokens (or what is left) as one sequence's share of a step.
    fn next(&mut self, n: usize) -> SequenceStep {
        let n = n.min(self.tokens.len() - self.done);
        let needed = (self.done + n).div_ceil(self.block_size);
        let s = SequenceStep {
            seq_id: self.id,
            token_ids: self.tokens[self.done..self.done + n].to_vec(),
            start_pos: self.done as u32,
            block_table: self.table[self.sent..needed].to_vec(),
            append_blocks: self.sent > 0,
            sample: self.done + n == self.tokens.len(),
            sampling: None,
            ..Default::default()
        };
        self.done += n;
        self.sent = needed;
        s
    }
}

fn step(e: &mut Engine, id: u64, seqs: Vec<SequenceStep>) -> Vec<(u64, Vec<f32>)> {
    let r = e
        .step(StepPlan {
            step_id: id,
            seqs,
            return_logits: true,
            ..Default::default()
        })
        .expect("step runs");
    r.logits.into_iter().map(|l| (l.seq_id, l.values)).collect()
}

/// Last-position logits of `tokens`, fed `chunk` tokens at a time.
fn chunked_logits(e: &mut Engine, tokens: &[u32], chunk: usize, block_size: usize) -> Vec<f32> {
    let mut f = Feed::new(0, tokens.to_vec(), 0, block_size);
    let mut last = Vec::new();
    let mut i = 0;
    while f.done < tokens.len() {
        last = step(e, i, vec![f.next(chunk)]).pop().expect("logits").1;
        i += 1;
    }
    last
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    max_rel_err(a, &b64)
}

fn prompt(n: usize, salt: u32) -> Vec<u32> {
    (0..n as u32)
        .map(|i| (i * 37 + salt * 11 + 5) % 300)
        .collect()
}

#[test]
fn chunking_and_block_size_do_not_change_logits() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 1, &[]).unwrap();
    let tokens = prompt(45, 0);
    let whole = chunked_logits(&mut engine(dir.path(), 16, 8), &tokens, 1000, 16);
    for (chunk, bs, blocks) in [
        (7, 16, 8),
        (1000, 1, 64),
        (1000, 32, 4),
        (7, 1, 64),
        (3, 32, 4),
    ] {
        let got = chunked_logits(&mut engine(dir.path(), bs, blocks), &tokens, chunk, bs);
        let err = rel(&got, &whole);
        assert!(
            err < 1e-5,
            "chunk {chunk}, block size {bs}: relative error {err}"
        );
    }
    // And the single-rank forward pass agrees with the NumPy reference.
    let want = reference_logits(dir.path(), &tokens).unwrap();
    let err = max_rel_err(&whole, &want);
    assert!(err < 1e-4, "against the reference: relative error {err}");
}

#[test]
fn a_batch_gives_each_sequence_its_own_logits() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 2, &[]).unwrap();
    let bs = 16;
    let lens = [1usize, 5, 17, 33, 2, 40, 9, 16];
    let prompts: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| prompt(n, i as u32))
        .collect();
    // Alone.
    let alone: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| chunked_logits(&mut engine(dir.path(), bs, 8), p, 1000, bs))
        .collect();
    // Together: blocks laid out one after another, chunks of 6 per sequence per step, so
    // steps mix first chunks, middle chunks and single-token tails of different lengths.
    let mut e = engine(dir.path(), bs, 64);
    let mut next_block = 0u32;
    let mut feeds: Vec<Feed> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = Feed::new(i as u64, p.clone(), next_block, bs);
            next_block += f.table.len() as u32;
            f
        })
        .collect();
    let mut got: Vec<Option<Vec<f32>>> = vec![None; prompts.len()];
    let mut step_id = 0;
    while feeds.iter().any(|f| f.done < f.tokens.len()) {
        let seqs: Vec<SequenceStep> = feeds
            .iter_mut()
            .filter(|f| f.done < f.tokens.len())
            .map(|f| f.next(6))
            .collect();
        let finishing: Vec<u64> = seqs.iter().filter(|s| s.sample).map(|s| s.seq_id).collect();
        for (id, logits) in step(&mut e, step_id, seqs) {
            if finishing.contains(&id) {
                got[id as usize] = Some(logits);
            }
        }
        step_id += 1;
    }
    for (i, (g, a)) in got.iter().zip(&alone).enumerate() {
        let g = g.as_ref().expect("every sequence finished");
        let err = rel(g, a);
        assert!(
            err < 1e-5,
            "sequence {i} (length {}): relative error {err}",
            lens[i]
        );
    }
}

#[test]
fn invalid_plans_are_refused_and_the_engine_stays_usable() {
    let dir = tempfile::tempdir().unwrap();
    make_tiny_model(dir.path(), 3, &[]).unwrap();
    let mut e = engine(dir.path(), 16, 4);
    let bad = |token_ids: Vec<u32>, start_pos: u32, block_table: Vec<u32>| StepPlan {
        step_id: 0,
        seqs: vec![SequenceStep {
            seq_id: 9,
            token_ids,
            start_pos,
            block_table,
            sample: true,
            sampling: None,
            ..Default::default()
        }],
        return_logits: false,
        ..Default::default()
    };
    for (plan, words) in [
        (bad(vec![5000], 0, vec![0]), "outside the vocabulary"),
        (bad(vec![1; 20], 0, vec![0]), "needs 2 blocks"),
        (bad(vec![1], 0, vec![7]), "beyond the cache"),
        (bad(vec![], 0, vec![0]), "no tokens"),
        (bad(vec![1], 600, vec![0; 40]), "beyond the model"),
    ] {
        let err = e.step(plan).unwrap_err().to_string();
        assert!(err.contains(words), "{err:?} should mention {words:?}");
    }
    let ok = e.step(bad(vec![1, 2, 3], 0, vec![0])).unwrap();
    assert_eq!(ok.tokens.len(), 1);
}
