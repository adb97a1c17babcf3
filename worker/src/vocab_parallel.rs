//! The vocabulary-parallel lm_head: each rank holds the lm_head rows of its slice of the
//! vocabulary and computes those logits; rank 0 gathers only what sampling needs.
//!
//! Before, rank 0 held the whole lm_head and ran it alone while the other ranks waited (on a CPU
//! at tp 3, about 13 % of every step when this was planned; on GPUs, the whole table's memory
//! on one). Now the
//! lm_head costs each rank `1/tp`, and what crosses the wire per sequence is fixed by the plan
//! alone ([`sampling::need`]), so every rank sends the same number of bytes without asking:
//!
//! - greedy: each slice's argmax, 8 bytes per rank;
//! - top-k sampling (k ≤ [`sampling::MAX_BEST`]): each slice's best `k`, penalties applied on
//!   the slice (they are per token, so a slice can apply them);
//! - log-probabilities, sampling without top-k, returned logits: the whole raw row.
//!
//! Rank 0 then samples exactly what [`sampling::sample`] over the whole row gives (the
//! candidates hold the row's best, and the sampler reads nothing else of it; tested against it
//! on random and real logits for every sampling option). Logits are bit-identical at every tp:
//! each one is its own dot product over one lm_head row, whichever rank holds the row.

use std::ops::Range;

use anyhow::{bail, Result};
use helios_proto::v1::SequenceStep;

use crate::sampling::{self, Need};
use crate::weights::Split;

/// The ids of `vocab` whose lm_head rows rank `rank` of `world` holds (the model loads them
/// with this split).
pub fn slice_of(vocab: usize, rank: usize, world: usize) -> Range<usize> {
    Split::Rows { rank, parts: world }.rows(vocab)
}

/// What rank 0 has of one output row once gathered.
#[derive(Debug, Clone, PartialEq)]
pub enum Gathered {
    Nothing,
    /// Every slice's best candidates, `(id, penalized score)`.
    Best(Vec<(u32, f32)>),
    /// The whole raw row.
    Full(Vec<f32>),
}

/// Bytes of one candidate: its id and its score.
const CANDIDATE: usize = 8;
/// Marks a candidate place a slice had no token for (a slice shorter than `k`).
const NO_ID: u32 = u32::MAX;

/// The bytes one row needs from every rank: alike on every rank.
fn record_len(need: Need, vocab: usize, world: usize) -> usize {
    match need {
        Need::Nothing => 0,
        Need::Best(k) => k * CANDIDATE,
        Need::Full => vocab.div_ceil(world) * 4,
    }
}

/// This rank's message: for each output row (its local logits `rows[i]`, the scores of ids
/// `offset ..`, of sequence `seqs[i]`) what `needs[i]` asks, padded to the common length.
pub fn encode(
    rows: &[Vec<f32>],
    seqs: &[&SequenceStep],
    needs: &[Need],
    offset: usize,
    vocab: usize,
    world: usize,
) -> Vec<u8> {
    let total = needs.iter().map(|&n| record_len(n, vocab, world)).sum();
    let mut out = Vec::with_capacity(total);
    for ((row, seq), &need) in rows.iter().zip(seqs).zip(needs) {
        let end = out.len() + record_len(need, vocab, world);
        match need {
            Need::Nothing => {}
            Need::Best(k) => {
                for (id, score) in sampling::best_of_slice(row, offset, seq, k) {
                    out.extend_from_slice(&id.to_le_bytes());
                    out.extend_from_slice(&score.to_le_bytes());
                }
                while out.len() < end {
                    out.extend_from_slice(&NO_ID.to_le_bytes());
                    out.extend_from_slice(&0f32.to_le_bytes());
                }
            }
            Need::Full => row
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        }
        out.resize(end, 0);
    }
    out
}

/// Rank 0's view of every row from all ranks' messages (`all`: the ranks' equally long
/// messages in rank order, as `Communicator::all_gather` gives them).
pub fn decode(all: &[u8], needs: &[Need], vocab: usize, world: usize) -> Result<Vec<Gathered>> {
    let len: usize = needs.iter().map(|&n| record_len(n, vocab, world)).sum();
    if all.len() != len * world {
        bail!(
            "gathered {} bytes of logits, expected {world} × {len}",
            all.len()
        );
    }
    let f32_at = |b: &[u8], i: usize| f32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let mut at = 0;
    let mut out = Vec::with_capacity(needs.len());
    for &need in needs {
        let n = record_len(need, vocab, world);
        let record = |r: usize| &all[r * len + at..r * len + at + n];
        out.push(match need {
            Need::Nothing => Gathered::Nothing,
            Need::Best(_) => {
                let candidates: Vec<(u32, f32)> = (0..world)
                    .flat_map(|r| record(r).chunks_exact(CANDIDATE))
                    .map(|c| (u32::from_le_bytes([c[0], c[1], c[2], c[3]]), f32_at(c, 4)))
                    .filter(|&(id, _)| id != NO_ID && (id as usize) < vocab)
                    .collect();
                // Some rank holds part of a non-empty vocabulary, and it names a candidate.
                if candidates.is_empty() {
                    bail!("no rank sent a candidate token in the vocabulary of {vocab}");
                }
                Gathered::Best(candidates)
            }
            Need::Full => {
                let mut row = Vec::with_capacity(vocab);
                for r in 0..world {
                    let b = record(r);
                    row.extend((0..slice_of(vocab, r, world).len()).map(|i| f32_at(b, 4 * i)));
                }
                Gathered::Full(row)
            }
        });
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use helios_proto::v1::{SampledToken, SamplingParams};

    /// Test support: rank 0's token for `seq` when `world` ranks hold the slices of `row`, through
    /// the same encode and decode the engine uses (the wire is a concatenation, as the gather).
    fn sample_split(row: &[f32], seq: &SequenceStep, world: usize) -> Option<Gathered> {
        let vocab = row.len();
        let need = sampling::need(seq, false);
        let all: Vec<u8> = (0..world)
            .flat_map(|r| {
                let s = slice_of(vocab, r, world);
                encode(
                    &[row[s.clone()].to_vec()],
                    &[seq],
                    &[need],
                    s.start,
                    vocab,
                    world,
                )
            })
            .collect();
        decode(&all, &[need], vocab, world).ok()?.pop()
    }

    /// What rank 0 samples from the gathered pieces, as `Engine::run` does.
    fn split_token(row: &[f32], seq: &SequenceStep, world: usize) -> SampledToken {
        match sample_split(row, seq, world).expect("decodes") {
            Gathered::Full(full) => {
                assert_eq!(full, row, "the whole row comes back as it was");
                sampling::sample(&full, seq)
            }
            Gathered::Best(c) => sampling::sample_best(c, seq),
            Gathered::Nothing => panic!("a sampled sequence needs something"),
        }
    }

    /// Rows of `vocab` scores: spread, peaked, with ties and repeated maxima.
    fn rows(vocab: usize) -> Vec<Vec<f32>> {
        let mut next = crate::sampling::test_uniform(7);
        let spread: Vec<f32> = (0..vocab).map(|_| next() * 8.0 - 4.0).collect();
        let peaked: Vec<f32> = (0..vocab)
            .map(|i| {
                if i % 97 == 5 {
                    12.0 + next()
                } else {
                    next() * 2.0 - 6.0
                }
            })
            .collect();
        // Few distinct values: ties everywhere, the maximum at many ids across slices.
        let ties: Vec<f32> = (0..vocab).map(|i| (i * 7 % 5) as f32).collect();
        let negative: Vec<f32> = (0..vocab).map(|i| -1.0 - (i % 13) as f32 * 0.5).collect();
        vec![spread, peaked, ties, negative]
    }

    /// Every sampling option, alone and combined, with penalties on tokens of every slice, and
    /// logit biases (`top`: the row's argmax, `vocab`: its length) that ban the argmax, lift
    /// tokens of every slice, or do both under penalties.
    fn options(top: u32, vocab: u32) -> Vec<SamplingParams> {
        let base = |t: f32, k: u32, p: f32, min_p: f32| SamplingParams {
            temperature: t,
            top_k: k,
            top_p: p,
            min_p,
            seed: Some(11),
            ..Default::default()
        };
        let mut out = vec![
            base(0.0, 0, 1.0, 0.0),
            base(0.0, 40, 0.5, 0.0),
            base(0.7, 1, 1.0, 0.0),
            base(0.7, 5, 1.0, 0.0),
            base(1.3, 50, 0.9, 0.0),
            base(1.0, 256, 1.0, 0.1),
            base(1.0, 257, 1.0, 0.0),
            base(0.8, 0, 0.95, 0.0),
            base(1.0, 0, 1.0, 0.05),
            base(1.0, 0, 1.0, 0.0),
        ];
        let penalties = [(1.3, 0.0, 0.0), (1.0, 0.7, 0.0), (0.8, 0.2, 1.5)];
        for (r, f, pr) in penalties {
            for p in [
                base(0.0, 0, 1.0, 0.0),
                base(0.9, 20, 0.8, 0.0),
                base(0.9, 0, 0.8, 0.0),
            ] {
                out.push(SamplingParams {
                    repetition_penalty: r,
                    frequency_penalty: f,
                    presence_penalty: pr,
                    output_index: 6,
                    ..p
                });
            }
        }
        let biases = [
            vec![(top, -100.0)],
            vec![(3, 4.0), (vocab / 2, 6.0), (vocab - 1, -3.0), (17, 1.5)],
            vec![(top, -100.0), (vocab - 1, 100.0)],
        ];
        for bias in biases {
            for p in [
                base(0.0, 0, 1.0, 0.0),
                base(0.9, 20, 0.8, 0.0),
                base(0.9, 0, 0.8, 0.0),
                SamplingParams {
                    repetition_penalty: 1.3,
                    frequency_penalty: 0.7,
                    output_index: 6,
                    ..base(0.8, 5, 1.0, 0.0)
                },
                SamplingParams {
                    top_logprobs: 3,
                    ..base(0.0, 0, 1.0, 0.0)
                },
            ] {
                out.push(SamplingParams {
                    logit_bias: bias.iter().copied().collect(),
                    ..p
                });
            }
        }
        for p in [base(0.0, 0, 1.0, 0.0), base(0.9, 20, 1.0, 0.0)] {
            out.push(SamplingParams {
                logprobs: true,
                ..p.clone()
            });
            out.push(SamplingParams {
                top_logprobs: 5,
                ..p
            });
        }
        out
    }

    /// The oracle: today's sampler over the whole row.
    fn check(row: &[f32], world: usize) {
        let vocab = row.len();
        // Context tokens in every slice, the argmax among them, some repeated.
        let top = (0..vocab)
            .max_by(|&a, &b| row[a].total_cmp(&row[b]))
            .unwrap() as u32;
        let context = [
            3,
            top,
            (vocab / 2) as u32,
            top,
            (vocab - 1) as u32,
            3,
            17,
            top,
        ];
        // A constraint that forbids the argmax and most of every slice.
        let mut mask = vec![0u8; vocab.div_ceil(8)];
        for t in (0..vocab).filter(|&t| t % 7 == 3 && t != top as usize) {
            mask[t / 8] |= 1 << (t % 8);
        }
        for (n, p) in options(top, vocab as u32).into_iter().enumerate() {
            for (draw, allowed) in (0..4).flat_map(|d| [(d, Vec::new()), (d, mask.clone())]) {
                let seq = SequenceStep {
                    seq_id: 9,
                    sample: true,
                    sampling: Some(SamplingParams {
                        output_index: p.output_index + draw,
                        ..p.clone()
                    }),
                    context_token_ids: context.to_vec(),
                    allowed_tokens: allowed,
                    ..Default::default()
                };
                let want = sampling::sample(row, &seq);
                if !seq.allowed_tokens.is_empty() {
                    assert!(sampling::allows(&mask, want.token_id as usize), "{want:?}");
                }
                assert_eq!(
                    split_token(row, &seq, world),
                    want,
                    "option {n} {p:?}, draw {draw}, masked {}, world {world}",
                    !seq.allowed_tokens.is_empty()
                );
            }
        }
        let greedy = SequenceStep {
            seq_id: 1,
            sample: true,
            ..Default::default()
        };
        assert_eq!(
            split_token(row, &greedy, world),
            sampling::sample(row, &greedy)
        );
    }

    #[test]
    fn split_sampling_equals_whole_row_sampling_for_every_option() {
        for vocab in [300, 1001] {
            for row in rows(vocab) {
                for world in 1..=5 {
                    check(&row, world);
                }
            }
        }
    }

    /// Real logits: SmolLM2's last-position rows for a few prompts (49152 ids, split 1 to 5 ways).
    #[test]
    fn split_sampling_equals_whole_row_sampling_on_real_logits() {
        use crate::comm::SingleRank;
        use crate::engine::{Engine, EngineOptions};
        use helios_proto::v1::StepPlan;
        let model = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/SmolLM2-135M-Instruct.Q4_1.gguf"
        );
        assert!(
            std::path::Path::new(model).exists(),
            "{model} is missing: scripts/fetch-model.sh fetches it"
        );
        let mut opts = EngineOptions::cpu(model);
        opts.num_kv_blocks = Some(16);
        let mut engine = Engine::load(&opts, Box::new(SingleRank)).unwrap();
        let prompts: [&[u32]; 3] = [
            &[1, 9690, 314, 260, 3575],
            &[504, 3458, 282],
            &[28, 253, 1004, 17, 9, 2],
        ];
        let seqs = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| SequenceStep {
                seq_id: i as u64,
                token_ids: p.to_vec(),
                block_table: vec![i as u32],
                ..Default::default()
            })
            .collect();
        let plan = StepPlan {
            step_id: 1,
            seqs,
            return_logits: true,
            ..Default::default()
        };
        let logits = engine.step(plan).unwrap().logits;
        assert_eq!(logits.len(), 3);
        for l in logits {
            assert_eq!(l.values.len(), 49152);
            for world in [1, 2, 3, 4, 5] {
                check(&l.values, world);
            }
        }
    }

    #[test]
    fn what_is_gathered_depends_on_the_options() {
        let seq = |p: Option<SamplingParams>| SequenceStep {
            sample: true,
            sampling: p,
            ..Default::default()
        };
        let t = |temperature, top_k| SamplingParams {
            temperature,
            top_k,
            ..Default::default()
        };
        assert_eq!(sampling::need(&seq(None), false), Need::Best(1));
        assert_eq!(sampling::need(&seq(Some(t(0.0, 9))), false), Need::Best(1));
        assert_eq!(sampling::need(&seq(Some(t(1.0, 9))), false), Need::Best(9));
        assert_eq!(sampling::need(&seq(Some(t(1.0, 0))), false), Need::Full);
        assert_eq!(sampling::need(&seq(None), true), Need::Full);
        let quiet = SequenceStep::default();
        assert_eq!(sampling::need(&quiet, false), Need::Nothing);
        // Greedy over 4 ranks: 8 bytes from each.
        let row = vec![0.5f32; 64];
        let s = slice_of(64, 2, 4);
        let mine = encode(
            &[row[s.clone()].to_vec()],
            &[&seq(None)],
            &[Need::Best(1)],
            s.start,
            64,
            4,
        );
        assert_eq!(mine.len(), 8);
    }

    #[test]
    fn a_short_or_hostile_gather_is_an_error_or_ignored() {
        assert!(decode(&[0u8; 7], &[Need::Best(1)], 10, 1).is_err());
        // Ids outside the vocabulary are dropped, not indexed; none left is an error.
        let candidate = |id: u32| [id.to_le_bytes(), 1f32.to_le_bytes()].concat();
        let bytes = [candidate(99), candidate(3)].concat();
        assert_eq!(
            decode(&bytes, &[Need::Best(1)], 10, 2).unwrap(),
            vec![Gathered::Best(vec![(3, 1.0)])]
        );
        assert!(decode(&candidate(99), &[Need::Best(1)], 10, 1).is_err());
    }
}
