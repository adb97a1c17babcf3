//! Where a token is sampled: rank 0, per sequence, from that sequence's last-position logits.
//!
//! Seeded sampling draws its uniform number from a counter-based generator keyed by
//! `(seed, output_index)`, never from a stream that batch order could shift: a request gets the
//! same tokens alone, in any batch, and after being recomputed.

use helios_proto::v1::SamplingParams;

/// The chosen token and its log-probability under the unmodified distribution.
pub fn sample(logits: &[f32], params: Option<&SamplingParams>, seq_id: u64) -> (u32, f32) {
    let greedy = params.is_none_or(|p| p.temperature <= 0.0);
    let token = match params {
        Some(p) if !greedy => sample_with(logits, p, seq_id),
        _ => argmax(logits),
    };
    (token, log_softmax_at(logits, token as usize))
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

fn log_softmax_at(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&v| (v as f64 - max).exp()).sum();
    (logits[i] as f64 - max - sum.ln()) as f32
}

fn sample_with(logits: &[f32], p: &SamplingParams, seq_id: u64) -> u32 {
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

/// A uniform number in [0, 1) that depends only on `(seed, counter)`.
pub fn uniform(seed: u64, counter: u64) -> f64 {
    let x = splitmix64(splitmix64(seed) ^ counter.wrapping_mul(0xD1B5_4A32_D192_ED03));
    (x >> 11) as f64 / (1u64 << 53) as f64
}

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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

    #[test]
    fn greedy_takes_the_argmax_and_its_logprob() {
        let logits = [0.0f32, 2.0, 1.0];
        let (t, lp) = sample(&logits, None, 7);
        assert_eq!(t, 1);
        let expect = 2.0 - (1.0f64 + 2f64.exp() + 1f64.exp()).ln();
        assert!((lp as f64 - expect).abs() < 1e-6);
    }

    #[test]
    fn seeded_draws_depend_only_on_seed_and_index() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let a: Vec<u32> = (0..20)
            .map(|i| sample(&logits, Some(&params(1.0, 0, 1.0, 42, i)), 1).0)
            .collect();
        let b: Vec<u32> = (0..20)
            .map(|i| sample(&logits, Some(&params(1.0, 0, 1.0, 42, i)), 999).0)
            .collect();
        assert_eq!(a, b);
        let c: Vec<u32> = (0..20)
            .map(|i| sample(&logits, Some(&params(1.0, 0, 1.0, 43, i)), 1).0)
            .collect();
        assert_ne!(a, c);
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        for i in 0..10 {
            let (t, _) = sample(&logits, Some(&params(1.5, 1, 1.0, 5, i)), 1);
            assert_eq!(t, argmax(&logits));
        }
    }

    #[test]
    fn uniform_is_roughly_uniform() {
        let n = 10_000;
        let mean: f64 = (0..n).map(|i| uniform(3, i)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.02, "{mean}");
    }
}
