//! Paged attention on the CPU, straight from the KV cache's slots.
//!
//! The candle path (gather a sequence's K/V rows, transpose, batched matmuls, mask, softmax)
//! costs a dozen tensor ops per sequence per layer, which dominates decode on small models. Here
//! each (sequence, query head) is one work item: scores against the context's key rows, a
//! softmax, a weighted sum of value rows, reading the cache in place. Every item is computed the
//! same way whatever else is in the batch and however heads are split across ranks.

use candle_core::utils::barrier_pool;

/// One sequence's share of the step.
pub struct SeqAttention<'a> {
    /// First row of its queries in the step, and how many.
    pub q_start: usize,
    pub q_len: usize,
    /// Position of its first query; query `i` sees positions `0 ..= start_pos + i`.
    pub start_pos: usize,
    /// Cache slot of every position `0 .. start_pos + q_len`.
    pub slots: &'a [u32],
}

/// Shapes: `q` is `[T, heads, head_dim]`; cache rows are `kv_heads * head_dim` wide.
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Returns `[T, heads * head_dim]`.
pub fn paged_attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[SeqAttention<'_>],
    s: &AttentionShape,
) -> Vec<f32> {
    let t: usize = seqs.iter().map(|x| x.q_start + x.q_len).max().unwrap_or(0);
    let mut out = vec![0f32; t * s.heads * s.head_dim];
    let work = Work {
        q,
        k_cache,
        v_cache,
        seqs,
        shape: s,
        out: SyncPtr(out.as_mut_ptr()),
    };
    let avx2 = has_avx2();
    barrier_pool().execute_chunked(seqs.len() * s.heads, |items| {
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            // SAFETY: the CPU has AVX2 (checked once).
            return unsafe { work.items_avx2(items) };
        }
        let _ = avx2;
        work.items(items)
    });
    out
}

/// Whether the CPU runs the AVX2 copy of [`Work::items`]. The same arithmetic, eight lanes at
/// a time instead of four: the same bits (no operation is fused or reordered).
fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| std::is_x86_feature_detected!("avx2"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One call's inputs and output, shared by the pool's threads.
struct Work<'a> {
    q: &'a [f32],
    k_cache: &'a [f32],
    v_cache: &'a [f32],
    seqs: &'a [SeqAttention<'a>],
    shape: &'a AttentionShape,
    out: SyncPtr,
}

impl Work<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn items_avx2(&self, items: std::ops::Range<usize>) {
        self.items(items)
    }

    /// Work items `items` (sequence × query head): scores against the context's key rows, a
    /// softmax, a weighted sum of value rows, written to `out`.
    #[inline(always)]
    fn items(&self, items: std::ops::Range<usize>) {
        let Work {
            q,
            k_cache,
            v_cache,
            seqs,
            shape: s,
            ref out,
        } = *self;
        let (h, d) = (s.heads, s.head_dim);
        let row = s.kv_heads * d;
        let groups = h / s.kv_heads;
        let mut scores = Vec::new();
        let mut acc = vec![0f32; d];
        for item in items {
            let (seq, head) = (&seqs[item / h], item % h);
            let kv_off = (head / groups) * d;
            for i in 0..seq.q_len {
                let tq = seq.q_start + i;
                let qv = &q[(tq * h + head) * d..(tq * h + head + 1) * d];
                let ctx = seq.start_pos + i + 1;
                scores.clear();
                let mut max = f32::NEG_INFINITY;
                for &slot in &seq.slots[..ctx] {
                    let base = slot as usize * row + kv_off;
                    let sc = dot(qv, &k_cache[base..base + d]) * s.scale;
                    max = max.max(sc);
                    scores.push(sc);
                }
                let mut sum = 0f32;
                for sc in scores.iter_mut() {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                for (&slot, &p) in seq.slots[..ctx].iter().zip(&scores) {
                    let base = slot as usize * row + kv_off;
                    for (a, v) in acc.iter_mut().zip(&v_cache[base..base + d]) {
                        *a += p * v;
                    }
                }
                let inv = 1.0 / sum;
                let dst = (tq * h + head) * d;
                for (j, a) in acc.iter().enumerate() {
                    // SAFETY: each (token, head) row is written by exactly one work item, and
                    // `out` outlives the pool call.
                    unsafe { *out.0.add(dst + j) = a * inv };
                }
            }
        }
    }
}

struct SyncPtr(*mut f32);
// SAFETY: only disjoint writes from the pool's threads (see `paged_attention`).
unsafe impl Sync for SyncPtr {}

/// Dot product in 8 independent lanes (vectorizes; fixed order).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            lanes[k] += x[k] * y[k];
        }
    }
    let mut sum = lanes.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        sum += x * y;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 copy computes the same bits as the plain one.
    #[test]
    fn the_avx2_copy_gives_the_same_bits() {
        let (h, kvh, d) = (6, 2, 64);
        let val = |i: usize| ((i * 2654435761usize) % 1000) as f32 / 300.0 - 1.5;
        let k: Vec<f32> = (0..50 * kvh * d).map(val).collect();
        let v: Vec<f32> = (0..50 * kvh * d).map(|i| val(i + 3)).collect();
        let slots: Vec<u32> = (0..45).map(|p| ((p * 11 + 5) % 50) as u32).collect();
        let q: Vec<f32> = (0..3 * h * d).map(|i| val(i + 17)).collect();
        let shape = AttentionShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            scale: 0.125,
        };
        let seqs = [SeqAttention {
            q_start: 0,
            q_len: 3,
            start_pos: 42,
            slots: &slots,
        }];
        let run = |avx2: bool| {
            let mut out = vec![0f32; 3 * h * d];
            let work = Work {
                q: &q,
                k_cache: &k,
                v_cache: &v,
                seqs: &seqs,
                shape: &shape,
                out: SyncPtr(out.as_mut_ptr()),
            };
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                unsafe { work.items_avx2(0..h) };
                return out;
            }
            let _ = avx2;
            work.items(0..h);
            out
        };
        let plain: Vec<u32> = run(false).iter().map(|x| x.to_bits()).collect();
        #[cfg(target_arch = "x86_64")]
        assert!(has_avx2(), "x86-64 machines this runs on have AVX2");
        let wide: Vec<u32> = run(true).iter().map(|x| x.to_bits()).collect();
        assert_eq!(plain, wide);
    }

    /// Textbook attention in f64 for one sequence, slots in a scrambled order.
    #[test]
    fn matches_textbook_attention_over_scrambled_slots() {
        let (h, kvh, d) = (4, 2, 16);
        let row = kvh * d;
        let n_slots = 40;
        let val = |i: usize| ((i * 2654435761usize) % 1000) as f32 / 500.0 - 1.0;
        let k: Vec<f32> = (0..n_slots * row).map(val).collect();
        let v: Vec<f32> = (0..n_slots * row).map(|i| val(i + 7)).collect();
        let slots: Vec<u32> = (0..12).map(|p| ((p * 7 + 3) % n_slots) as u32).collect();
        // Two queries at positions 10 and 11 (context 11 and 12).
        let (start, q_len) = (10, 2);
        let q: Vec<f32> = (0..q_len * h * d).map(|i| val(i + 13)).collect();
        let shape = AttentionShape {
            heads: h,
            kv_heads: kvh,
            head_dim: d,
            scale: 0.25,
        };
        let seqs = [SeqAttention {
            q_start: 0,
            q_len,
            start_pos: start,
            slots: &slots,
        }];
        let got = paged_attention(&q, &k, &v, &seqs, &shape);
        for i in 0..q_len {
            for head in 0..h {
                let kv = head / (h / kvh);
                let qv = &q[(i * h + head) * d..][..d];
                let ctx = start + i + 1;
                let sc: Vec<f64> = (0..ctx)
                    .map(|p| {
                        let base = slots[p] as usize * row + kv * d;
                        (0..d)
                            .map(|j| qv[j] as f64 * k[base + j] as f64)
                            .sum::<f64>()
                            * 0.25
                    })
                    .collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for j in 0..d {
                    let want: f64 = (0..ctx)
                        .map(|p| e[p] / z * v[slots[p] as usize * row + kv * d + j] as f64)
                        .sum();
                    let g = got[(i * h + head) * d + j] as f64;
                    assert!((g - want).abs() < 1e-5, "q{i} h{head} [{j}]: {g} vs {want}");
                }
            }
        }
    }
}
