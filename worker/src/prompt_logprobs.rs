//! Prompt logprobs: how likely each input token was under the distribution at the position
//! before it (completions' `echo` with `logprobs`, vLLM's `prompt_logprobs`, the log-likelihood
//! scoring of evaluation harnesses).
//!
//! A scored row needs the log-softmax normalizer of the whole vocabulary, which no rank holds:
//! the lm_head is split by vocabulary ([`crate::vocab_parallel`]). Rather than gather whole
//! rows (`vocab / tp` floats each, for every prompt position), each rank sends a fixed-size
//! share per scored row, [`Share`]: its slice's maximum and sum of exponentials, the target
//! token's logit when its slice holds it, and its slice's `n` best. Rank 0 merges them:
//! `log Z = m + ln Σ_r s_r·e^(m_r − m)` with `m` the largest maximum, and the top `n` of the
//! whole row are among the slices' top `n`. That is `16 + 8n` bytes per row and rank, alike on
//! every rank and fixed by the plan, so the all-gather needs no sizes exchanged first. At one
//! rank the same share and merge run, so there is one way to score.

use anyhow::{bail, Result};
use helios_proto::v1::{PromptLogprobs, SampledLogprobs, TokenLogprob};

use crate::sampling;

/// One sequence's scored rows in a step: row `k` (of the step's scored rows for it) predicts
/// `targets[k]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredSeq {
    pub seq_id: u64,
    pub targets: Vec<u32>,
    /// Most likely tokens returned per row besides the target.
    pub top: usize,
}

/// What one rank knows of one scored row: the share of its vocabulary slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    /// The slice's largest logit (−∞ for an empty slice).
    pub max: f32,
    /// `Σ e^(logit − max)` over the slice (0 for an empty slice).
    pub sum: f64,
    /// The target's logit, when the slice holds it.
    pub target: Option<f32>,
    /// The slice's best `(id, logit)`, best first, ties to the lower id.
    pub best: Vec<(u32, f32)>,
}

/// The most likely tokens a scored row may ask for: the bound keeps a step's message small
/// whatever a plan says.
pub const MAX_TOP: usize = 256;

/// Bytes of a share's fixed part (max, sum, target) and of one of its candidates.
const HEAD: usize = 16;
const CANDIDATE: usize = 8;
/// Marks a candidate place a slice had no token for.
const NO_ID: u32 = u32::MAX;

/// The share of `row`, the logits of ids `offset ..`, for a row predicting `target`.
pub fn share(row: &[f32], offset: usize, target: u32, top: usize) -> Share {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum = sampling::sum_exp(row, max);
    let target = (target as usize)
        .checked_sub(offset)
        .and_then(|i| row.get(i).copied());
    let best = sampling::top_few(row, top)
        .into_iter()
        .map(|i| (offset as u32 + i, row[i as usize]))
        .collect();
    Share {
        max,
        sum,
        target,
        best,
    }
}

/// The target's logprob and the whole row's top `top`, from every slice's share.
pub fn merge(shares: &[Share], target: u32, top: usize) -> Result<SampledLogprobs> {
    let max = shares
        .iter()
        .map(|s| s.max)
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = shares
        .iter()
        .filter(|s| s.sum > 0.0)
        .map(|s| s.sum * (s.max as f64 - max).exp())
        .sum();
    let norm = max + sum.ln();
    let Some(logit) = shares.iter().find_map(|s| s.target) else {
        bail!("no rank holds the logit of token {target}");
    };
    let mut best: Vec<(u32, f32)> = shares.iter().flat_map(|s| s.best.iter().copied()).collect();
    best.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    best.truncate(top);
    let logprob = |v: f32| (v as f64 - norm) as f32;
    Ok(SampledLogprobs {
        sampled: Some(TokenLogprob {
            token_id: target,
            logprob: logprob(logit),
        }),
        top: best
            .into_iter()
            .map(|(token_id, v)| TokenLogprob {
                token_id,
                logprob: logprob(v),
            })
            .collect(),
    })
}

fn record_len(top: usize) -> usize {
    HEAD + top * CANDIDATE
}

/// Every scored row of `seqs` in order: the token it predicts, and how many most likely
/// tokens it returns.
pub fn rows_of(seqs: &[ScoredSeq]) -> Vec<(u32, usize)> {
    seqs.iter()
        .flat_map(|s| s.targets.iter().map(move |&t| (t, s.top)))
        .collect()
}

/// The length of a rank's message for `seqs` (alike on every rank).
pub fn message_len(seqs: &[ScoredSeq]) -> usize {
    seqs.iter()
        .map(|s| s.targets.len() * record_len(s.top))
        .sum()
}

/// Appends the shares of scored rows to this rank's message: `rows[i]` (the logits of ids
/// `offset ..`) predicts `scored[i]`. The engine computes the rows a slice at a time, so a long
/// prompt never holds every row's logits at once.
pub fn encode_into(out: &mut Vec<u8>, rows: &[Vec<f32>], scored: &[(u32, usize)], offset: usize) {
    for (i, &(t, top)) in scored.iter().enumerate() {
        let row = rows.get(i).map_or(&[][..], Vec::as_slice);
        let sh = share(row, offset, t, top);
        let end = out.len() + record_len(top);
        out.extend_from_slice(&sh.max.to_le_bytes());
        out.extend_from_slice(&sh.sum.to_le_bytes());
        out.extend_from_slice(&sh.target.unwrap_or(f32::NAN).to_le_bytes());
        for (id, v) in sh.best {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&v.to_le_bytes());
        }
        while out.len() < end {
            out.extend_from_slice(&NO_ID.to_le_bytes());
            out.extend_from_slice(&0f32.to_le_bytes());
        }
    }
}

/// This rank's whole message: the share of every scored row (`rows`, in the order of `seqs`
/// and their targets), its logits those of ids `offset ..`.
pub fn encode(rows: &[Vec<f32>], seqs: &[ScoredSeq], offset: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(message_len(seqs));
    encode_into(&mut out, rows, &rows_of(seqs), offset);
    out
}

/// Rank 0's prompt logprobs of every scored sequence from all ranks' messages (`all`: the
/// ranks' equally long messages in rank order, as `Communicator::all_gather` gives them).
pub fn decode(all: &[u8], seqs: &[ScoredSeq], world: usize) -> Result<Vec<PromptLogprobs>> {
    let len = message_len(seqs);
    if all.len() != len * world {
        bail!(
            "gathered {} bytes of prompt scores, expected {world} × {len}",
            all.len()
        );
    }
    let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    let f32_at = |b: &[u8], i: usize| f32::from_bits(u32_at(b, i));
    let read = |b: &[u8]| {
        let mut sum = [0u8; 8];
        sum.copy_from_slice(&b[4..12]);
        let target = f32_at(b, 12);
        Share {
            max: f32_at(b, 0),
            sum: f64::from_le_bytes(sum),
            target: (!target.is_nan()).then_some(target),
            best: b[HEAD..]
                .chunks_exact(CANDIDATE)
                .map(|c| (u32_at(c, 0), f32_at(c, 4)))
                .filter(|&(id, _)| id != NO_ID)
                .collect(),
        }
    };
    let mut at = 0;
    let mut out = Vec::with_capacity(seqs.len());
    for s in seqs {
        let n = record_len(s.top);
        let mut tokens = Vec::with_capacity(s.targets.len());
        for &t in &s.targets {
            let shares: Vec<Share> = (0..world)
                .map(|r| read(&all[r * len + at..r * len + at + n]))
                .collect();
            tokens.push(merge(&shares, t, s.top)?);
            at += n;
        }
        out.push(PromptLogprobs {
            seq_id: s.seq_id,
            tokens,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vocab_parallel::slice_of;

    /// Prompt logprobs of `rows` through `world` ranks' slices, as the engine gets them.
    fn split(rows: &[Vec<f32>], seq: &ScoredSeq, world: usize) -> Vec<SampledLogprobs> {
        let vocab = rows[0].len();
        let all: Vec<u8> = (0..world)
            .flat_map(|r| {
                let s = slice_of(vocab, r, world);
                let mine: Vec<Vec<f32>> = rows.iter().map(|row| row[s.clone()].to_vec()).collect();
                encode(&mine, std::slice::from_ref(seq), s.start)
            })
            .collect();
        let mut out = decode(&all, std::slice::from_ref(seq), world).expect("decodes");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].seq_id, seq.seq_id);
        out.pop().unwrap().tokens
    }

    /// The log-softmax of `row` in f64, the brute-force way.
    fn log_softmax(row: &[f32]) -> Vec<f64> {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row
            .iter()
            .map(|&v| (v as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        row.iter().map(|&v| v as f64 - z).collect()
    }

    fn rows(vocab: usize, n: usize) -> Vec<Vec<f32>> {
        let mut next = crate::sampling::test_uniform(11);
        (0..n)
            .map(|k| {
                (0..vocab)
                    .map(|i| match k % 3 {
                        0 => next() * 30.0 - 15.0,
                        // Ties: few distinct values.
                        1 => (i * 7 % 5) as f32,
                        _ => {
                            if i % 89 == 3 {
                                40.0 + next()
                            } else {
                                next() - 20.0
                            }
                        }
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn shares_merge_to_the_log_softmax_of_the_whole_row_at_every_split() {
        let vocab = 1000;
        let rows = rows(vocab, 6);
        let seq = ScoredSeq {
            seq_id: 9,
            targets: vec![0, 999, 333, 500, 3, 1],
            top: 5,
        };
        for world in [1, 2, 3, 4, 7] {
            let got = split(&rows, &seq, world);
            assert_eq!(got.len(), rows.len());
            for ((row, lp), &t) in rows.iter().zip(&got).zip(&seq.targets) {
                let want = log_softmax(row);
                let s = lp.sampled.expect("the target is scored");
                assert_eq!(s.token_id, t);
                assert!(
                    (s.logprob as f64 - want[t as usize]).abs() < 1e-4,
                    "world {world}"
                );
                // The true top 5 of the whole row, ties to the lower id.
                let mut order: Vec<usize> = (0..vocab).collect();
                order.sort_by(|&a, &b| want[b].total_cmp(&want[a]).then(a.cmp(&b)));
                let ids: Vec<u32> = lp.top.iter().map(|t| t.token_id).collect();
                let want_ids: Vec<u32> = order[..5].iter().map(|&i| i as u32).collect();
                assert_eq!(ids, want_ids, "world {world}");
                for t in &lp.top {
                    assert!((t.logprob as f64 - want[t.token_id as usize]).abs() < 1e-4);
                }
            }
        }
    }

    #[test]
    fn more_ranks_than_tokens_and_no_top_still_score() {
        let rows = vec![vec![1.0, 2.0, 3.0]];
        let seq = ScoredSeq {
            seq_id: 1,
            targets: vec![2],
            top: 0,
        };
        let want = log_softmax(&rows[0])[2];
        for world in [1, 3, 5] {
            let got = split(&rows, &seq, world);
            assert!(got[0].top.is_empty());
            assert!((got[0].sampled.unwrap().logprob as f64 - want).abs() < 1e-6);
        }
    }

    #[test]
    fn a_short_or_foreign_message_is_an_error_not_a_panic() {
        let seq = ScoredSeq {
            seq_id: 1,
            targets: vec![0, 1],
            top: 2,
        };
        let one = encode(
            &[vec![0.5, 1.0], vec![2.0, 0.0]],
            std::slice::from_ref(&seq),
            0,
        );
        assert!(decode(&one, std::slice::from_ref(&seq), 1).is_ok());
        assert!(decode(&one[1..], std::slice::from_ref(&seq), 1).is_err());
        assert!(decode(&one, std::slice::from_ref(&seq), 2).is_err());
        // A target no rank holds (outside the logits sent).
        let far = ScoredSeq {
            targets: vec![7, 1],
            ..seq
        };
        let msg = encode(
            &[vec![0.5, 1.0], vec![2.0, 0.0]],
            std::slice::from_ref(&far),
            0,
        );
        assert!(decode(&msg, std::slice::from_ref(&far), 1).is_err());
    }
}
