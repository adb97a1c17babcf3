//! Where a token is sampled: rank 0, per sequence, from that sequence's last-position logits.
//!
//! Seeded sampling draws its uniform number from a counter-based generator keyed by
//! `(seed, output_index)`, never from a stream that batch order could shift: a request gets the
//! same tokens alone, in any batch, and after being recomputed. Penalties keep that property
//! because they read only the sequence's own context, which the coordinator sends with the step.
//!
//! Penalties (repetition, then frequency and presence, in vLLM's order) and then the logit bias
//! are applied to a copy of the logits before any decoding rule, so greedy decoding is
//! penalized (and biased) too. The counts come from
//! sorting the context (usually far shorter than the vocabulary) rather than from a vocab-sized
//! table: only the tokens that occur are touched, and the one vocab-sized allocation per token
//! is the penalized copy itself, which we need anyway because the raw logits must survive.
//!
//! They must survive because the reported log-probabilities, of the sampled token and of the
//! `top_logprobs` alternatives, are those of the model's unmodified distribution (log_softmax of
//! the raw logits), as vLLM reports by default: penalties, temperature and truncation are
//! decoding choices, and a caller comparing log-probabilities across requests wants the model's
//! belief, not one request's settings folded into it.

use helios_proto::v1::{SampledToken, SamplingParams, SequenceStep, TokenLogprob};

/// Samples one sequence's next token from its last-position `logits`, using `seq.sampling`
/// (greedy when absent) and, for penalties, `seq.context_token_ids`.
///
/// The returned `logprob` and `top_logprobs` are under the unmodified distribution (see the
/// module docs), and computed only when `logprobs` or `top_logprobs` asks for them. A context shorter than `output_index` or holding ids outside the vocabulary
/// is refused by plan validation; here it is tolerated (the output is what the context holds,
/// out-of-range ids are ignored) so that nothing a peer sends can panic the sampler.
pub fn sample(logits: &[f32], seq: &SequenceStep) -> SampledToken {
    let params = seq.sampling.as_ref();
    let adjusted = adjust(logits, 0, seq);
    let scores = adjusted.as_deref().unwrap_or(logits);
    let token_id = match params {
        Some(p) if p.temperature > 0.0 => sample_with(scores, p, seq.seq_id),
        _ => argmax(scores),
    };
    let n = params.map_or(0, |p| p.top_logprobs as usize);
    if !params.is_some_and(|p| p.logprobs) && n == 0 {
        return SampledToken {
            seq_id: seq.seq_id,
            token_id,
            ..Default::default()
        };
    }
    let norm = log_normalizer(logits);
    let logprob = |i: usize| (logits[i] as f64 - norm) as f32;
    SampledToken {
        seq_id: seq.seq_id,
        token_id,
        logprob: logprob(token_id as usize),
        top_logprobs: top_few(logits, n)
            .into_iter()
            .map(|i| TokenLogprob {
                token_id: i,
                logprob: logprob(i as usize),
            })
            .collect(),
    }
}

/// The scores sampling reads from `logits`, the logits of token ids `offset ..`: penalized,
/// and with the tokens a constraint forbids at -infinity (`seq.allowed_tokens`); `None` when
/// neither applies (no copy then).
fn adjust(logits: &[f32], offset: usize, seq: &SequenceStep) -> Option<Vec<f32>> {
    let penalized = seq
        .sampling
        .as_ref()
        .and_then(|p| penalize(logits, offset, p, &seq.context_token_ids));
    let mask = &seq.allowed_tokens;
    if mask.is_empty() {
        return penalized;
    }
    let mut out = penalized.unwrap_or_else(|| logits.to_vec());
    for (i, v) in out.iter_mut().enumerate() {
        if !allows(mask, offset + i) {
            *v = f32::NEG_INFINITY;
        }
    }
    Some(out)
}

/// Whether a constraint's bitset (`SequenceStep.allowed_tokens`) allows token `id`; ids past
/// its end are not allowed.
pub fn allows(mask: &[u8], id: usize) -> bool {
    mask.get(id / 8).is_some_and(|b| b >> (id % 8) & 1 == 1)
}

/// The penalized copy of `logits`, the scores of token ids `offset ..` (a rank's slice of the
/// vocabulary, or all of it from 0), or `None` when `p` sets no penalty and no bias (no copy
/// then).
///
/// Repetition (whole context): a positive logit is divided by the penalty, any other multiplied,
/// so a penalty > 1 always lowers it. Then frequency and presence (the output only, the last
/// `output_index` tokens of the context): `logit -= frequency * count + presence`. Then the
/// logit bias, as vLLM orders it: `logit += bias`, each entry on the slice that holds its id,
/// so a slice's best candidates are those of the biased whole row.
fn penalize(
    logits: &[f32],
    offset: usize,
    p: &SamplingParams,
    context: &[u32],
) -> Option<Vec<f32>> {
    if !p.reshaped() {
        return None;
    }
    let mut out = logits.to_vec();
    let at = |t: u32| (t as usize).checked_sub(offset);
    if p.repetition_penalized() {
        let r = p.repetition_penalty;
        let mut seen = context.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            if let Some(v) = at(t).and_then(|i| out.get_mut(i)) {
                *v = if *v > 0.0 { *v / r } else { *v * r };
            }
        }
    }
    if p.frequency_penalty != 0.0 || p.presence_penalty != 0.0 {
        let start = context.len().saturating_sub(p.output_index as usize);
        let mut output = context[start..].to_vec();
        output.sort_unstable();
        for run in output.chunk_by(|a, b| a == b) {
            if let Some(v) = at(run[0]).and_then(|i| out.get_mut(i)) {
                *v -= p.frequency_penalty * run.len() as f32 + p.presence_penalty;
            }
        }
    }
    // Each id once (a map), so the order of the entries cannot change the sums.
    for (&t, &bias) in &p.logit_bias {
        if let Some(v) = at(t).and_then(|i| out.get_mut(i)) {
            *v += bias;
        }
    }
    Some(out)
}

/// What rank 0 needs of one sequence's logits from every rank's slice of the vocabulary
/// (vocabulary-parallel lm_head, `crate::vocab_parallel`), so that it samples exactly what
/// [`sample`] over the whole row would.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Nothing: no token is sampled and no logits are returned.
    Nothing,
    /// Each slice's `k` best penalized scores: greedy (`k` = 1) and top-k sampling read no
    /// other token, since the best `k` of the whole row are among the slices' best `k`.
    Best(usize),
    /// The whole raw row: log-probabilities need the full distribution's normalizer, sampling
    /// without top-k its full sum, returned logits every value, and a large top-k as much.
    Full,
}

/// The largest top-k served from the slices' best candidates; larger ones gather whole rows.
pub const MAX_BEST: usize = 256;

/// What `seq` needs gathered (see [`Need`]); `return_logits`: the plan returns logits.
pub fn need(seq: &SequenceStep, return_logits: bool) -> Need {
    let p = seq.sampling.as_ref();
    if return_logits || p.is_some_and(|p| p.logprobs || p.top_logprobs > 0) {
        return Need::Full;
    }
    if !seq.sample {
        return Need::Nothing;
    }
    match p {
        Some(p) if p.temperature > 0.0 => match p.top_k as usize {
            k if k > 0 && k <= MAX_BEST => Need::Best(k),
            _ => Need::Full,
        },
        _ => Need::Best(1),
    }
}

/// The best `k` (token id, penalized score) of one slice of a row: the scores of ids
/// `offset ..`. Greedy: the slice's argmax (the first of equal maxima, as [`argmax`]);
/// sampling: the best `k` by score, ties to the lower id, as the sampler orders them.
pub fn best_of_slice(
    slice: &[f32],
    offset: usize,
    seq: &SequenceStep,
    k: usize,
) -> Vec<(u32, f32)> {
    let params = seq.sampling.as_ref();
    let adjusted = adjust(slice, offset, seq);
    let scores = adjusted.as_deref().unwrap_or(slice);
    let id = |i: u32| offset as u32 + i;
    if !params.is_some_and(|p| p.temperature > 0.0) {
        if scores.is_empty() {
            return Vec::new();
        }
        let i = argmax(scores);
        return vec![(id(i), scores[i as usize])];
    }
    top_n(scores, k)
        .into_iter()
        .map(|i| (id(i), scores[i as usize]))
        .collect()
}

/// The token [`sample`] draws from a whole row, from the union of every slice's
/// [`best_of_slice`] (penalties already applied there). In id order the candidates keep the
/// row's order of ties, the row's maximum is among them, and top-k reads only them, so greedy
/// and top-k draws are the same. Never asked for log-probabilities ([`need`]).
pub fn sample_best(mut candidates: Vec<(u32, f32)>, seq: &SequenceStep) -> SampledToken {
    candidates.sort_unstable_by_key(|c| c.0);
    let scores: Vec<f32> = candidates.iter().map(|c| c.1).collect();
    let j = match seq.sampling.as_ref() {
        Some(p) if p.temperature > 0.0 => sample_with(&scores, p, seq.seq_id),
        _ => argmax(&scores),
    };
    SampledToken {
        seq_id: seq.seq_id,
        token_id: candidates.get(j as usize).map_or(0, |c| c.0),
        ..Default::default()
    }
}

fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// `log(sum(exp(logits)))`, computed stably: `logits[i] - this` is log_softmax at `i`.
fn log_normalizer(logits: &[f32]) -> f64 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    max as f64 + sum_exp(logits, max).ln()
}

/// `Σ e^(v − max)` over `logits` (`max` their largest; 0 when it is −∞). A pass over the whole
/// vocabulary per logprob asked for, so it is written to vectorize: f32 exponentials in 16
/// lanes ([`exp_nonpositive`]), each block of 1024 summed into an f64 (relative error below
/// 1e-6, where an f64 `exp` per logit costs ten times as much).
pub(crate) fn sum_exp(logits: &[f32], max: f32) -> f64 {
    if max == f32::NEG_INFINITY {
        return 0.0;
    }
    const LANES: usize = 16;
    let mut total = 0f64;
    for block in logits.chunks(1024) {
        let mut acc = [0f32; LANES];
        let mut lanes = block.chunks_exact(LANES);
        for c in &mut lanes {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += exp_nonpositive(v - max);
            }
        }
        let rest: f32 = lanes
            .remainder()
            .iter()
            .map(|&v| exp_nonpositive(v - max))
            .sum();
        total += acc.iter().map(|&a| a as f64).sum::<f64>() + rest as f64;
    }
    total
}

/// `e^x` for `x ≤ 0` in f32, without a branch or a library call (so loops over it vectorize):
/// `x = k·ln 2 + r` with `|r| ≤ ln 2 / 2` (k rounded by the 1.5·2^23 trick), a degree-7
/// Taylor polynomial for `e^r` (relative error below 1e-7), `2^k` from exponent bits. Below
/// −87 (where `e^x` leaves f32's normal range) it gives `e^-87`, less than 2e-38, which no sum
/// of logits notices. NaN gives `e^-87` too.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Not `clamp`: `max` and `min` take a NaN to a bound (and vectorize), `clamp` keeps it.
    #[allow(clippy::manual_clamp)]
    let x = x.max(-87.0).min(0.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let k = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let kf = shifted - ROUND;
    let r = x - kf * LN2_HI - kf * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    p * f32::from_bits(((k + 127) as u32) << 23)
}

/// [`top_n`] for the few most likely tokens logprobs return (up to 32): one pass that keeps
/// the best `n` seen so far and looks at a logit only when it beats the worst of them, which
/// for a whole vocabulary is nearly always a single comparison. Larger `n` take [`top_n`].
pub(crate) fn top_few(logits: &[f32], n: usize) -> Vec<u32> {
    const FEW: usize = 32;
    let n = n.min(logits.len());
    if n > FEW {
        return top_n(logits, n);
    }
    if n == 0 {
        return Vec::new();
    }
    // Best first; ties keep the lower id first, as ids come in order.
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(n + 1);
    for (i, &v) in logits.iter().enumerate() {
        if best.len() == n && best[n - 1].0.total_cmp(&v).is_ge() {
            continue;
        }
        let at = best.partition_point(|&(b, _)| b.total_cmp(&v).is_ge());
        best.insert(at, (v, i as u32));
        best.truncate(n);
    }
    best.into_iter().map(|(_, i)| i).collect()
}

/// The ids of the `n` largest logits (at most the vocabulary), largest first, ties to the lower
/// id. Partial selection keeps this O(vocab) however large the vocabulary; only the `n` chosen
/// are sorted.
pub(crate) fn top_n(logits: &[f32], n: usize) -> Vec<u32> {
    let n = n.min(logits.len());
    if n == 0 {
        return Vec::new();
    }
    let better = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
    idx.select_nth_unstable_by(n - 1, better);
    idx.truncate(n);
    idx.sort_unstable_by(better);
    idx
}

/// How many tokens a truncated-sampling draw looks at first; most draws never need more.
const FIRST_CANDIDATES: usize = 64;

/// Temperature sampling with top-k, min-p and top-p, drawn by inverse CDF over the candidates
/// in order of likelihood (ties to the lower id) with the seeded uniform.
///
/// Sorting the whole vocabulary for every sampled token is what a sampler does first, and it
/// is slow on a CPU (`helios-bench sampling`: 1.4 ms for SmolLM2's 49k logits, four times the
/// whole top-p draw below). The order only matters up to where the truncation cuts, or,
/// without truncation, up to where the draw lands, which for a peaked distribution is a
/// handful of tokens: so the most likely [`FIRST_CANDIDATES`] are selected (O(vocab)) and
/// sorted, and the set grows only when that did not decide the draw. The result is the token a
/// full sort would give (tested against one).
fn sample_with(logits: &[f32], p: &SamplingParams, seq_id: u64) -> u32 {
    let n = logits.len();
    let t = p.temperature as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let weight = |i: u32| ((logits[i as usize] as f64 - max) / t).exp();
    let better = |a: &u32, b: &u32| {
        logits[*b as usize]
            .total_cmp(&logits[*a as usize])
            .then(a.cmp(b))
    };
    let u = uniform(p.seed.unwrap_or(seq_id), p.output_index as u64);
    // The candidates: the top k, or every token (normalised over all of them).
    let (limit, all_total) = if p.top_k > 0 {
        ((p.top_k as usize).min(n), None)
    } else {
        (n, Some((0..n as u32).map(weight).sum::<f64>()))
    };
    let mut k = if p.top_k > 0 {
        limit
    } else {
        limit.min(FIRST_CANDIDATES)
    };
    let mut idx: Vec<u32> = (0..n as u32).collect();
    loop {
        if k < n {
            idx.select_nth_unstable_by(k - 1, better);
        }
        let head = &mut idx[..k];
        head.sort_unstable_by(better);
        let weights: Vec<f64> = head.iter().map(|&i| weight(i)).collect();
        let total = all_total.unwrap_or_else(|| weights.iter().sum());
        let probs: Vec<f64> = weights.iter().map(|w| w / total).collect();
        let keep = kept(&probs, p, k == limit);
        // Without truncation every token is kept and the kept mass is 1: the draw can land
        // in the head before the cut is known.
        let mass = match keep {
            Some(keep) => probs[..keep].iter().sum(),
            None if !truncates(p) => 1.0,
            None => {
                k = grow(k, limit);
                continue;
            }
        };
        let mut target = u * mass;
        for (j, q) in probs[..keep.unwrap_or(k)].iter().enumerate() {
            if target < *q {
                return head[j];
            }
            target -= q;
        }
        match keep {
            // Rounding left the target past the last kept token.
            Some(keep) => return head[keep - 1],
            None => k = grow(k, limit),
        }
    }
}

/// The next candidate count: four times as many, or all of them once that is most of them.
fn grow(k: usize, limit: usize) -> usize {
    if k * 4 >= limit / 4 {
        limit
    } else {
        k * 4
    }
}

/// Whether min-p or top-p may cut the candidates.
fn truncates(p: &SamplingParams) -> bool {
    p.min_p > 0.0 || (p.top_p > 0.0 && p.top_p < 1.0)
}

/// How many of the most likely candidates (probabilities `probs`, most likely first) min-p and
/// top-p keep, or None when that depends on candidates beyond `probs` (`complete` is false
/// and no rule cut inside them).
fn kept(probs: &[f64], p: &SamplingParams, complete: bool) -> Option<usize> {
    let mut keep = probs.len();
    let mut cut = false;
    if p.min_p > 0.0 {
        let floor = p.min_p as f64 * probs[0];
        let above = probs.iter().take_while(|&&q| q >= floor).count().max(1);
        if above < keep {
            (keep, cut) = (above, true);
        }
    }
    if p.top_p > 0.0 && p.top_p < 1.0 {
        let mut acc = 0.0;
        if let Some(m) = probs[..keep].iter().position(|q| {
            acc += q;
            acc >= p.top_p as f64
        }) {
            (keep, cut) = (m + 1, true);
        }
    }
    (cut || complete).then_some(keep)
}

/// A uniform number in [0, 1) that depends only on `(seed, counter)`.
pub fn uniform(seed: u64, counter: u64) -> f64 {
    let x = splitmix64(splitmix64(seed) ^ counter.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

/// One step of splitmix64: a well-mixed 64-bit value of `z` (also seeds the dummy weights).
pub(crate) fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Test support: a fixed stream of uniform numbers in [0, 1) from `seed` (an LCG), for
/// random but repeatable logits.
#[cfg(test)]
pub(crate) fn test_uniform(seed: u64) -> impl FnMut() -> f32 {
    let mut state = seed;
    move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: u32, top_p: f32, seed: u64, idx: u32) -> SamplingParams {
        SamplingParams {
            temperature,
            top_k,
            top_p,
            min_p: 0.0,
            seed: Some(seed),
            output_index: idx,
            ..Default::default()
        }
    }

    fn seq(sampling: Option<SamplingParams>, context: &[u32], seq_id: u64) -> SequenceStep {
        SequenceStep {
            seq_id,
            sampling,
            context_token_ids: context.to_vec(),
            ..Default::default()
        }
    }

    /// Greedy with the given penalties; `output_index` = how many context tokens are output.
    fn penalized_greedy(logits: &[f32], p: SamplingParams, context: &[u32]) -> u32 {
        sample(logits, &seq(Some(p), context, 1)).token_id
    }

    fn repetition(r: f32, output_index: u32) -> SamplingParams {
        SamplingParams {
            repetition_penalty: r,
            output_index,
            ..Default::default()
        }
    }

    fn freq_presence(f: f32, pr: f32, output_index: u32) -> SamplingParams {
        SamplingParams {
            frequency_penalty: f,
            presence_penalty: pr,
            output_index,
            ..Default::default()
        }
    }

    /// The straightforward sampler (sort every token), the oracle for [`sample_with`].
    fn full_sort_sample(logits: &[f32], p: &SamplingParams, seq_id: u64) -> u32 {
        let t = p.temperature as f64;
        // Candidates sorted by logit, best first (ties by index, for determinism).
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        if p.top_k > 0 {
            idx.truncate(p.top_k as usize);
        }
        let max = logits[idx[0]] as f64;
        let mut probs: Vec<f64> = idx
            .iter()
            .map(|&i| ((logits[i] as f64 - max) / t).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = p.min_p as f64 * probs[0];
            keep = keep.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        if p.top_p > 0.0 && p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut n = 0;
            for q in &probs[..keep] {
                acc += q;
                n += 1;
                if acc >= p.top_p as f64 {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mass: f64 = probs[..keep].iter().sum();
        let seed = p.seed.unwrap_or(seq_id);
        let mut u = uniform(seed, p.output_index as u64) * mass;
        for (k, q) in probs[..keep].iter().enumerate() {
            if u < *q {
                return idx[k] as u32;
            }
            u -= q;
        }
        idx[keep - 1] as u32
    }

    #[test]
    fn partial_selection_draws_what_a_full_sort_draws() {
        let mut state = 17u64;
        let mut next = move || {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as u32
        };
        for case in 0..400u32 {
            let n = [3, 50, 300, 5000][case as usize % 4];
            // Peaked and flat distributions, with ties.
            let spread = [0.5f32, 4.0, 12.0][case as usize % 3];
            let logits: Vec<f32> = (0..n)
                .map(|_| (next() % 64) as f32 / 64.0 * spread)
                .collect();
            let p = SamplingParams {
                temperature: [0.3f32, 1.0, 2.5][case as usize % 3],
                top_k: [0, 0, 5, 100][(case / 3) as usize % 4],
                top_p: [1.0f32, 0.0, 0.5, 0.95][(case / 5) as usize % 4],
                min_p: [0.0f32, 0.0, 0.1][(case / 7) as usize % 3],
                seed: Some(case as u64),
                output_index: next() % 1000,
                ..Default::default()
            };
            assert_eq!(
                sample_with(&logits, &p, 0),
                full_sort_sample(&logits, &p, 0),
                "case {case}: {p:?}"
            );
        }
    }

    fn brute_log_softmax(logits: &[f32]) -> Vec<f64> {
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
        logits.iter().map(|&v| v as f64 - max - sum.ln()).collect()
    }

    #[test]
    fn greedy_takes_the_argmax_and_its_logprob() {
        let logits = [0.0f32, 2.0, 1.0];
        let asked = SamplingParams {
            logprobs: true,
            ..Default::default()
        };
        let t = sample(&logits, &seq(Some(asked), &[], 7));
        assert_eq!((t.seq_id, t.token_id), (7, 1));
        let expect = 2.0 - (1.0f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((t.logprob as f64 - expect).abs() < 1e-6);
        assert!(t.top_logprobs.is_empty());
        // Not asked: the same token, no pass over the vocabulary for its logprob.
        let t = sample(&logits, &seq(None, &[], 7));
        assert_eq!((t.token_id, t.logprob), (1, 0.0));
    }

    #[test]
    fn seeded_draws_depend_only_on_seed_and_index() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let draw = |seed, seq_id| -> Vec<u32> {
            (0..20)
                .map(|i| {
                    let p = params(1.0, 0, 1.0, seed, i);
                    sample(&logits, &seq(Some(p), &[], seq_id)).token_id
                })
                .collect()
        };
        let a = draw(42, 1);
        assert_eq!(a, draw(42, 999));
        assert_ne!(a, draw(43, 1));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        for i in 0..10 {
            let p = params(1.5, 1, 1.0, 5, i);
            assert_eq!(
                sample(&logits, &seq(Some(p), &[], 1)).token_id,
                argmax(&logits)
            );
        }
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits() {
        // Positive: 2.0 / 2 = 1.0 falls below 1.5, so the argmax moves to token 1.
        let pos = [2.0f32, 1.5, 0.0];
        assert_eq!(penalized_greedy(&pos, repetition(1.0, 0), &[0]), 0);
        assert_eq!(penalized_greedy(&pos, repetition(2.0, 0), &[0]), 1);
        // Negative: -1.0 * 2 = -2.0 falls below -1.5 (dividing would have raised it to -0.5).
        let neg = [-1.0f32, -1.5, -3.0];
        assert_eq!(penalized_greedy(&neg, repetition(2.0, 0), &[0]), 1);
        // A repeated token is penalized once, not once per occurrence.
        let out = penalize(
            &[4.0, -4.0, 0.0, 4.0],
            0,
            &repetition(2.0, 0),
            &[0, 0, 1, 1, 2],
        );
        assert_eq!(out, Some(vec![2.0, -8.0, 0.0, 4.0]));
        // 0 and 1 are off: no copy, nothing changes.
        assert_eq!(penalize(&pos, 0, &repetition(0.0, 0), &[0]), None);
        assert_eq!(penalize(&pos, 0, &repetition(1.0, 0), &[0]), None);
    }

    #[test]
    fn frequency_penalty_scales_with_count_presence_does_not() {
        let ctx = [1, 1, 1, 2];
        let zeros = [0.0f32; 4];
        let f = penalize(&zeros, 0, &freq_presence(0.5, 0.0, 4), &ctx);
        assert_eq!(f, Some(vec![0.0, -1.5, -0.5, 0.0]));
        let p = penalize(&zeros, 0, &freq_presence(0.0, 0.5, 4), &ctx);
        assert_eq!(p, Some(vec![0.0, -0.5, -0.5, 0.0]));
        let both = penalize(&zeros, 0, &freq_presence(0.5, 0.25, 4), &ctx);
        assert_eq!(both, Some(vec![0.0, -1.75, -0.75, 0.0]));
        // Token 0 leads by 0.2 and occurred twice: 0.15 per occurrence flips the argmax,
        // 0.15 once does not.
        let logits = [1.0f32, 0.8];
        assert_eq!(
            penalized_greedy(&logits, freq_presence(0.15, 0.0, 2), &[0, 0]),
            1
        );
        assert_eq!(
            penalized_greedy(&logits, freq_presence(0.0, 0.15, 2), &[0, 0]),
            0
        );
    }

    #[test]
    fn only_the_output_counts_for_frequency_and_presence_but_the_whole_context_for_repetition() {
        // Prompt [0, 0, 3], output [1, 2]: the last `output_index` = 2 tokens.
        let ctx = [0, 0, 3, 1, 2];
        let logits = [2.0f32; 5];
        let fp = penalize(&logits, 0, &freq_presence(1.0, 0.5, 2), &ctx);
        assert_eq!(fp, Some(vec![2.0, 0.5, 0.5, 2.0, 2.0]));
        let rep = penalize(&logits, 0, &repetition(2.0, 2), &ctx);
        assert_eq!(rep, Some(vec![1.0, 1.0, 1.0, 1.0, 2.0]));
        // A prompt token does not trip frequency: greedy keeps token 0 (it leads only by 0.1).
        let lead = [2.1f32, 2.0];
        assert_eq!(
            penalized_greedy(&lead, freq_presence(5.0, 5.0, 1), &[0, 1]),
            0
        );
        // A context shorter than output_index (refused by validation) must not panic.
        let short = penalize(&logits, 0, &freq_presence(1.0, 0.0, 9), &[4, 7]);
        assert_eq!(short, Some(vec![2.0, 2.0, 2.0, 2.0, 1.0]));
    }

    #[test]
    fn repetition_applies_before_frequency_and_presence() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 1.0,
            presence_penalty: 0.5,
            output_index: 1,
            ..Default::default()
        };
        // 4 / 2 - 1 - 0.5 = 0.5 (the other order would give (4 - 1.5) / 2 = 1.25);
        // 1 / 2 = 0.5 for the prompt-only token 1.
        assert_eq!(
            penalize(&[4.0, 1.0, 1.0], 0, &p, &[1, 0]),
            Some(vec![0.5, 0.5, 1.0])
        );
    }

    #[test]
    fn logit_bias_comes_after_the_penalties_and_leaves_logprobs_alone() {
        let bias = |entries: &[(u32, f32)]| SamplingParams {
            logit_bias: entries.iter().copied().collect(),
            ..Default::default()
        };
        let logits = [3.0f32, 1.0, 2.0];
        // +100 forces a token, -100 bans one; ids outside the slice are ignored.
        assert_eq!(penalized_greedy(&logits, bias(&[(1, 100.0)]), &[]), 1);
        assert_eq!(penalized_greedy(&logits, bias(&[(0, -100.0)]), &[]), 2);
        assert_eq!(
            penalize(&logits, 0, &bias(&[(2, 0.5), (9, 1.0)]), &[]),
            Some(vec![3.0, 1.0, 2.5])
        );
        // On a slice starting at id 1 the entry for id 2 lands on its second score.
        assert_eq!(
            penalize(&logits[1..], 1, &bias(&[(2, 0.5), (0, 7.0)]), &[]),
            Some(vec![1.0, 2.5])
        );
        // After repetition: 4 / 2 + 1 = 3 (before it, (4 + 1) / 2 = 2.5).
        let both = SamplingParams {
            repetition_penalty: 2.0,
            ..bias(&[(0, 1.0)])
        };
        assert_eq!(penalize(&[4.0, 0.0], 0, &both, &[0]), Some(vec![3.0, 0.0]));
        // The sampled token moves; its reported logprob is the unbiased one.
        let asked = SamplingParams {
            logprobs: true,
            top_logprobs: 1,
            ..bias(&[(1, 100.0)])
        };
        let t = sample(&logits, &seq(Some(asked), &[], 1));
        let lsm = brute_log_softmax(&logits);
        assert_eq!(t.token_id, 1);
        assert!((t.logprob as f64 - lsm[1]).abs() < 1e-6);
        assert_eq!(t.top_logprobs[0].token_id, 0);
    }

    #[test]
    fn logprobs_come_from_the_unpenalized_distribution() {
        let logits: Vec<f32> = (0..40).map(|i| (i as f32 * 0.71).cos() * 3.0).collect();
        let lsm = brute_log_softmax(&logits);
        let top = argmax(&logits);
        let p = SamplingParams {
            repetition_penalty: 10.0,
            frequency_penalty: 2.0,
            output_index: 1,
            top_logprobs: 3,
            ..Default::default()
        };
        let plain = sample(&logits, &seq(Some(p.clone()), &[], 1));
        let pen = sample(&logits, &seq(Some(p), &[top], 1));
        assert_eq!(plain.token_id, top);
        assert_ne!(pen.token_id, top, "the penalty moves greedy off the argmax");
        let lp = pen.logprob as f64;
        assert!((lp - lsm[pen.token_id as usize]).abs() < 1e-5);
        assert_eq!(plain.top_logprobs, pen.top_logprobs);
        assert_eq!(pen.top_logprobs[0].token_id, top);
    }

    #[test]
    fn the_fast_normalizer_and_top_few_agree_with_the_plain_ones() {
        let mut next = crate::sampling::test_uniform(3);
        let rows: Vec<Vec<f32>> = vec![
            (0..49_152).map(|_| next() * 40.0 - 20.0).collect(),
            (0..1000)
                .map(|i| ((i * 7919) % 97) as f32 * 0.1 - 4.0)
                .collect(),
            (0..77).map(|i| -(i as f32) * 3.0).collect(),
            vec![-1e30, 0.0, -200.0, f32::NEG_INFINITY],
            (0..300).map(|i| (i % 5) as f32).collect(),
        ];
        for row in &rows {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let plain: f64 = row.iter().map(|&v| (v as f64 - max as f64).exp()).sum();
            let fast = sum_exp(row, max);
            assert!((fast / plain - 1.0).abs() < 1e-6, "{fast} vs {plain}");
            for n in [1, 2, 5, 20, 32, 33, 100] {
                assert_eq!(top_few(row, n), top_n(row, n), "n = {n}");
            }
        }
        for x in [0.0f32, -1e-8, -0.3, -0.35, -1.0, -10.5, -50.0, -86.9] {
            let rel = (exp_nonpositive(x) as f64 / (x as f64).exp() - 1.0).abs();
            assert!(rel < 2e-7, "e^{x}: relative error {rel}");
        }
        assert_eq!(sum_exp(&[f32::NEG_INFINITY; 3], f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn top_logprobs_are_the_true_top_n_of_log_softmax() {
        // 1000 tokens with many exact ties (97 distinct values).
        let logits: Vec<f32> = (0..1000u32)
            .map(|i| ((i * 7919) % 97) as f32 * 0.1 - 4.0)
            .collect();
        let lsm = brute_log_softmax(&logits);
        let mut order: Vec<u32> = (0..1000).collect();
        order.sort_by(|&a, &b| lsm[b as usize].total_cmp(&lsm[a as usize]).then(a.cmp(&b)));
        for n in [1u32, 2, 5, 20] {
            let p = SamplingParams {
                top_logprobs: n,
                ..Default::default()
            };
            let got = sample(&logits, &seq(Some(p), &[], 1)).top_logprobs;
            let ids: Vec<u32> = got.iter().map(|t| t.token_id).collect();
            assert_eq!(ids, order[..n as usize], "n = {n}");
            for t in &got {
                assert!((t.logprob as f64 - lsm[t.token_id as usize]).abs() < 1e-5);
            }
        }
        // More than the vocabulary clamps to all of it: a permutation whose mass is 1.
        let p = SamplingParams {
            top_logprobs: 5000,
            ..Default::default()
        };
        let all = sample(&logits, &seq(Some(p), &[], 1)).top_logprobs;
        let ids: Vec<u32> = all.iter().map(|t| t.token_id).collect();
        assert_eq!(ids, order);
        let mass: f64 = all.iter().map(|t| (t.logprob as f64).exp()).sum();
        assert!((mass - 1.0).abs() < 1e-4, "{mass}");
    }

    #[test]
    fn seeded_sampling_with_penalties_depends_only_on_seed_and_index() {
        let mut logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        logits[7] = 12.0; // dominant: without penalties nearly every draw is 7
        let ctx = [3u32, 7, 7, 9];
        let draw = |seed, seq_id, penalized: bool| -> Vec<u32> {
            (0..30)
                .map(|i| {
                    let mut p = params(1.0, 0, 1.0, seed, i);
                    if penalized {
                        p.repetition_penalty = 1.3;
                        p.frequency_penalty = 8.0;
                        p.presence_penalty = 0.5;
                    }
                    p.output_index = 2;
                    sample(&logits, &seq(Some(p), &ctx, seq_id)).token_id
                })
                .collect()
        };
        let a = draw(42, 1, true);
        assert_eq!(a, draw(42, 999, true));
        assert_ne!(a, draw(43, 1, true));
        // The penalties reached the temperature path: 7 (12 / 1.3 - 16.5 < -7) is now rare.
        assert!(draw(42, 1, false).iter().filter(|&&t| t == 7).count() >= 28);
        assert!(a.iter().filter(|&&t| t == 7).count() <= 3, "{a:?}");
    }

    #[test]
    fn uniform_is_roughly_uniform() {
        let n = 10_000;
        let mean: f64 = (0..n).map(|i| uniform(3, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
