//! A step's input, checked and laid out for the forward pass.
//!
//! The coordinator sends each sequence's new tokens, their start position and its block table.
//! Here that becomes flat tensors over all the step's tokens (ids, positions, KV slots to write)
//! and, per sequence, the slots of its whole context and its causal mask. Every check happens
//! here, before any rank starts the forward pass: all ranks see the same plan, so they all
//! reject it alike and none is left waiting in an all-reduce.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use helios_proto::v1::{SamplingParams, SequenceStep, StepPlan};

use crate::block_tables::TableView;
use crate::prompt_logprobs::{self, ScoredSeq};

/// What a plan is checked against.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    pub vocab_size: usize,
    pub max_positions: usize,
    pub num_blocks: usize,
    pub block_size: usize,
    /// Width of one KV row on this rank: kv_heads_local * head_dim.
    pub kv_row_width: usize,
}

/// One sequence's part of the step.
pub struct SeqSlice {
    /// Rows of this sequence's new tokens within the step.
    pub q_start: usize,
    pub q_len: usize,
    /// Position of the first new token.
    pub start_pos: usize,
    /// KV slots of positions `0 .. start_pos + q_len`.
    pub slots: Vec<u32>,
    /// For the tensor-op attention (non-CPU devices): the slots as u32 `[ctx]`, and the additive
    /// causal mask `[q_len, ctx]` (`None` for a single token, which sees everything).
    pub gather: Option<(Tensor, Option<Tensor>)>,
}

pub struct StepBatch {
    /// u32 `[T]`.
    pub tokens: Tensor,
    /// u32 `[T]`.
    pub positions: Tensor,
    /// u32 `[T, kv_row_width]`: each token's KV slot, repeated across the row.
    pub write_slots: Tensor,
    pub seqs: Vec<SeqSlice>,
    /// u32 `[N + S]`: the rows whose logits are computed: first the last row of every
    /// sequence that needs logits (`output_seqs`), then the `S` rows scored for prompt logprobs
    /// (`scored`, in order).
    pub output_rows: Tensor,
    /// Plan index of the sequence behind each of the first `N` output rows.
    pub output_seqs: Vec<usize>,
    /// The sequences whose input is scored, in plan order: one output row per target.
    pub scored: Vec<ScoredSeq>,
}

impl StepBatch {
    /// Whether the forward pass computes any logits.
    pub fn has_output(&self) -> bool {
        !self.output_seqs.is_empty() || self.scored.iter().any(|s| !s.targets.is_empty())
    }
}

/// A plan that cannot run; the step is refused, the worker stays healthy.
#[derive(Debug, thiserror::Error)]
#[error("invalid step plan: {0}")]
pub struct InvalidPlan(pub String);

pub(crate) fn invalid(msg: String) -> anyhow::Error {
    InvalidPlan(msg).into()
}

/// The penalty fields and the context they read. Rank 0 would survive a bad value (the sampler
/// ignores what it cannot use), but a NaN penalty or a context too short to hold the output
/// would silently sample from the wrong distribution; refusing says so instead. The context is
/// only read when sampling, so a prefill chunk that does not sample is not held to it.
fn check_sampling(
    id: u64,
    sample: bool,
    p: &SamplingParams,
    context: &[u32],
    lim: &BatchLimits,
) -> Result<()> {
    for (name, v) in [
        ("repetition_penalty", p.repetition_penalty),
        ("frequency_penalty", p.frequency_penalty),
        ("presence_penalty", p.presence_penalty),
    ] {
        if !v.is_finite() {
            return Err(invalid(format!("sequence {id}: {name} {v} is not finite")));
        }
    }
    if p.repetition_penalty < 0.0 {
        return Err(invalid(format!(
            "sequence {id}: repetition_penalty {} is negative",
            p.repetition_penalty
        )));
    }
    if let Some((t, b)) = p
        .logit_bias
        .iter()
        .find(|(&t, b)| t as usize >= lim.vocab_size || !b.is_finite())
    {
        return Err(invalid(format!(
            "sequence {id}: logit_bias {t}: {b} is outside the vocabulary of {} or not finite",
            lim.vocab_size
        )));
    }
    if let Some(t) = context.iter().find(|&&t| t as usize >= lim.vocab_size) {
        return Err(invalid(format!(
            "sequence {id}: context token {t} is outside the vocabulary of {}",
            lim.vocab_size
        )));
    }
    if sample && p.penalized() && context.len() < p.output_index as usize {
        return Err(invalid(format!(
            "sequence {id} has a penalty and {} output tokens, but a context of {}",
            p.output_index,
            context.len()
        )));
    }
    Ok(())
}

/// A constraint's mask must cover the vocabulary exactly and allow at least one token of it:
/// an empty choice would leave the sampler nothing to draw.
fn check_allowed(id: u64, mask: &[u8], lim: &BatchLimits) -> Result<()> {
    if mask.is_empty() {
        return Ok(());
    }
    let want = lim.vocab_size.div_ceil(8);
    if mask.len() != want {
        return Err(invalid(format!(
            "sequence {id}: allowed_tokens has {} bytes, the vocabulary of {} needs {want}",
            mask.len(),
            lim.vocab_size
        )));
    }
    // Bits past the vocabulary (the last byte's padding) do not count.
    let tail = match lim.vocab_size % 8 {
        0 => 0xFF,
        used => (1u8 << used) - 1,
    };
    let (last, full) = mask.split_last().unwrap_or((&0, &[]));
    if full.iter().all(|&b| b == 0) && last & tail == 0 {
        return Err(invalid(format!(
            "sequence {id}: allowed_tokens allows no token"
        )));
    }
    Ok(())
}

/// The targets of a sequence whose input is scored: each input token after the first, then
/// the token after the step's last position when the plan names it.
fn scored_seq(s: &SequenceStep, lim: &BatchLimits) -> Result<Option<ScoredSeq>> {
    let Some(top) = s.prompt_logprobs else {
        return Ok(None);
    };
    let id = s.seq_id;
    if top as usize > prompt_logprobs::MAX_TOP {
        return Err(invalid(format!(
            "sequence {id}: prompt_logprobs {top} is above the most, {}",
            prompt_logprobs::MAX_TOP
        )));
    }
    if let Some(t) = s
        .next_prompt_token
        .filter(|&t| t as usize >= lim.vocab_size)
    {
        return Err(invalid(format!(
            "sequence {id}: next_prompt_token {t} is outside the vocabulary of {}",
            lim.vocab_size
        )));
    }
    let mut targets: Vec<u32> = s.token_ids.iter().skip(1).copied().collect();
    targets.extend(s.next_prompt_token);
    Ok(Some(ScoredSeq {
        seq_id: id,
        targets,
        top: top as usize,
    }))
}

impl StepBatch {
    /// Lays out `plan`; `tables[i]` is the block table of `plan.seqs[i]` (see
    /// [`crate::block_tables`]).
    pub fn build(
        plan: &StepPlan,
        tables: &[TableView<'_>],
        lim: &BatchLimits,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if plan.seqs.is_empty() {
            return Err(invalid("no sequences".into()));
        }
        if tables.len() != plan.seqs.len() {
            return Err(invalid("a block table per sequence is needed".into()));
        }
        let bs = lim.block_size;
        let mut tokens = Vec::new();
        let mut positions = Vec::new();
        let mut write_slots = Vec::new();
        let mut seqs = Vec::with_capacity(plan.seqs.len());
        let mut output_rows = Vec::new();
        let mut output_seqs = Vec::new();
        let mut scored = Vec::new();
        let mut scored_rows = Vec::new();
        for (i, (s, table)) in plan.seqs.iter().zip(tables).enumerate() {
            let id = s.seq_id;
            let q_len = s.token_ids.len();
            let start = s.start_pos as usize;
            let ctx = start + q_len;
            if q_len == 0 {
                return Err(invalid(format!("sequence {id} has no tokens")));
            }
            if ctx > lim.max_positions {
                return Err(invalid(format!(
                    "sequence {id} reaches position {ctx}, beyond the model's {}",
                    lim.max_positions
                )));
            }
            if let Some(t) = s.token_ids.iter().find(|&&t| t as usize >= lim.vocab_size) {
                return Err(invalid(format!(
                    "sequence {id}: token {t} is outside the vocabulary of {}",
                    lim.vocab_size
                )));
            }
            if let Some(p) = &s.sampling {
                check_sampling(id, s.sample, p, &s.context_token_ids, lim)?;
            }
            check_allowed(id, &s.allowed_tokens, lim)?;
            let needed = ctx.div_ceil(bs);
            if table.len() < needed {
                return Err(invalid(format!(
                    "sequence {id} needs {needed} blocks for {ctx} positions, the plan gives {}",
                    table.len()
                )));
            }
            // Kept blocks were checked when they arrived.
            if let Some(b) = table.added.iter().find(|&&b| b as usize >= lim.num_blocks) {
                return Err(invalid(format!(
                    "sequence {id}: block {b} is beyond the cache's {} blocks",
                    lim.num_blocks
                )));
            }
            let slot = |p: usize| table.get(p / bs) * bs as u32 + (p % bs) as u32;
            let q_start = tokens.len();
            for (j, &t) in s.token_ids.iter().enumerate() {
                let p = start + j;
                tokens.push(t);
                positions.push(p as u32);
                write_slots.extend(std::iter::repeat_n(slot(p), lim.kv_row_width));
            }
            let slots: Vec<u32> = (0..ctx).map(slot).collect();
            let gather = if device.is_cpu() {
                None
            } else {
                let mask = if q_len > 1 {
                    let mut m = Vec::with_capacity(q_len * ctx);
                    for qi in 0..q_len {
                        for kj in 0..ctx {
                            m.push(if kj > start + qi {
                                f32::NEG_INFINITY
                            } else {
                                0.0
                            });
                        }
                    }
                    Some(Tensor::from_vec(m, (q_len, ctx), device)?.to_dtype(dtype)?)
                } else {
                    None
                };
                Some((Tensor::new(slots.as_slice(), device)?, mask))
            };
            if s.sample || plan.return_logits {
                output_rows.push((q_start + q_len - 1) as u32);
                output_seqs.push(i);
            }
            if let Some(sc) = scored_seq(s, lim)? {
                scored_rows.extend((0..sc.targets.len()).map(|j| (q_start + j) as u32));
                scored.push(sc);
            }
            seqs.push(SeqSlice {
                q_start,
                q_len,
                start_pos: start,
                slots,
                gather,
            });
        }
        let t = tokens.len();
        output_rows.extend(scored_rows);
        Ok(Self {
            tokens: Tensor::new(tokens.as_slice(), device)?,
            positions: Tensor::new(positions.as_slice(), device)?,
            write_slots: Tensor::from_vec(write_slots, (t, lim.kv_row_width), device)?,
            seqs,
            output_rows: Tensor::new(output_rows.as_slice(), device)?,
            output_seqs,
            scored,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use helios_proto::v1::SequenceStep;

    const LIM: BatchLimits = BatchLimits {
        vocab_size: 10,
        max_positions: 64,
        num_blocks: 4,
        block_size: 4,
        kv_row_width: 2,
    };

    /// A step of sequence 5 alone, `seq` from its block 0.
    fn build_one(seq: SequenceStep) -> Result<StepBatch> {
        let plan = StepPlan {
            seqs: vec![SequenceStep {
                seq_id: 5,
                block_table: vec![0],
                ..seq
            }],
            ..Default::default()
        };
        let table = TableView {
            kept: &[],
            added: &[0],
        };
        StepBatch::build(&plan, &[table], &LIM, DType::F32, &Device::Cpu)
    }

    /// A one-token decode step at position 2 with `p` and `context`.
    fn build(p: SamplingParams, context: &[u32], sample: bool) -> Result<StepBatch> {
        build_one(SequenceStep {
            token_ids: vec![1],
            start_pos: 2,
            sample,
            sampling: Some(p),
            context_token_ids: context.to_vec(),
            ..Default::default()
        })
    }

    fn refused(r: Result<StepBatch>) -> bool {
        r.is_err_and(|e| e.downcast_ref::<InvalidPlan>().is_some())
    }

    #[test]
    fn a_constraint_mask_must_cover_the_vocabulary_and_allow_a_token_of_it() {
        let with_mask = |mask: Vec<u8>| {
            build_one(SequenceStep {
                token_ids: vec![1],
                start_pos: 2,
                sample: true,
                allowed_tokens: mask,
                ..Default::default()
            })
        };
        // Ten tokens: two bytes, the second with two bits that count.
        assert!(with_mask(Vec::new()).is_ok(), "no constraint");
        assert!(with_mask(vec![0, 0b10]).is_ok(), "token 9");
        assert!(with_mask(vec![0b1000_0000, 0]).is_ok(), "token 7");
        assert!(refused(with_mask(vec![0, 0])), "nothing allowed");
        assert!(
            refused(with_mask(vec![0, 0b1111_1100])),
            "only ids past the vocabulary"
        );
        assert!(refused(with_mask(vec![0xFF])), "too short");
        assert!(refused(with_mask(vec![0xFF; 3])), "too long");
    }

    #[test]
    fn penalties_and_their_context_are_validated() {
        let pen = |r: f32, f: f32, pr: f32, out: u32| SamplingParams {
            repetition_penalty: r,
            frequency_penalty: f,
            presence_penalty: pr,
            output_index: out,
            ..Default::default()
        };
        assert!(build(pen(1.2, 0.5, 0.5, 1), &[3, 4, 1], true).is_ok());
        assert!(
            build(pen(0.0, 0.0, 0.0, 3), &[], true).is_ok(),
            "no penalty, no context"
        );
        assert!(refused(build(pen(f32::NAN, 0.0, 0.0, 0), &[3, 4, 1], true)));
        assert!(refused(build(
            pen(1.0, f32::INFINITY, 0.0, 0),
            &[3, 4, 1],
            true
        )));
        assert!(refused(build(
            pen(1.0, 0.0, f32::NEG_INFINITY, 0),
            &[3, 4, 1],
            true
        )));
        assert!(refused(build(pen(-1.5, 0.0, 0.0, 0), &[3, 4, 1], true)));
        assert!(refused(build(pen(1.2, 0.0, 0.0, 0), &[3, 10, 1], true)));
        // Two output tokens claimed, one in the context.
        assert!(refused(build(pen(1.0, 0.5, 0.0, 2), &[1], true)));
        // A chunk that does not sample never reads the context.
        assert!(build(pen(1.0, 0.5, 0.0, 2), &[], false).is_ok());
    }

    #[test]
    fn a_scored_step_names_its_targets_and_its_bounds_are_checked() {
        let with = |top: Option<u32>, next: Option<u32>| {
            build_one(SequenceStep {
                token_ids: vec![1, 2, 3],
                prompt_logprobs: top,
                next_prompt_token: next,
                ..Default::default()
            })
        };
        let b = with(Some(2), Some(7)).unwrap();
        assert_eq!(b.scored.len(), 1);
        assert_eq!(b.scored[0].targets, [2, 3, 7]);
        assert_eq!(b.output_rows.to_vec1::<u32>().unwrap(), [0, 1, 2]);
        assert!(b.has_output());
        // The chunk that samples: its last row is not scored.
        let b = with(Some(0), None).unwrap();
        assert_eq!(b.scored[0].targets, [2, 3]);
        assert_eq!(b.output_rows.to_vec1::<u32>().unwrap(), [0, 1]);
        assert!(with(None, None).unwrap().scored.is_empty());
        assert!(
            refused(with(Some(2), Some(10))),
            "next token outside the vocabulary"
        );
        let too_many = crate::prompt_logprobs::MAX_TOP as u32 + 1;
        assert!(refused(with(Some(too_many), None)));
    }
}
