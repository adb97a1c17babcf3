//! Quantized weight × f32 activation matmuls for the CPU (Q4_1 and Q8_0), llama.cpp's way.
//!
//! Weights stay in GGUF's 32-element blocks. A Q4_1 block holds 4-bit `q` with an f16 scale `d`
//! and minimum `m` (`w = d·q + m`; byte `j` holds element `j` in its low nibble and `j + 16` in
//! its high one); a Q8_0 block holds 8-bit `q` and an f16 `d` (`w = d·q`). Activations are
//! quantized per block to 8 bits (`x ≈ d8·q8`, with `s8 = d8·Σq8`), so a block's dot product is
//! `d·d8·Σ q·q8 + m·s8`: integer multiply-adds, then one float FMA.
//!
//! Every output element is one dot product over its row's blocks in a fixed order (two
//! accumulators, even and odd blocks), whatever the number of rows or tokens: results do not
//! depend on the tensor-parallel split or the batch. Rows are spread over candle's CPU thread
//! pool, so no second pool competes for the cores. candle has no SIMD Q4_1 kernel and its Q8_0
//! one takes a row at a time, which is why these exist.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use half::f16;

pub const BLOCK: usize = 32;

/// A weight block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_1,
    Q8_0,
}

impl Format {
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => Q41::BYTES,
            Format::Q8_0 => Q80::BYTES,
        }
    }
}

/// A `[rows, cols]` quantized matrix in GGUF's byte layout.
pub struct QuantMatrix {
    format: Format,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

/// One activation block: `x ≈ d·q`, `s = d·Σq`.
#[derive(Clone, Copy)]
pub struct Q8Block {
    d: f32,
    s: f32,
    q: [i8; BLOCK],
}

impl QuantMatrix {
    pub fn new(format: Format, data: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        let need = rows * cols / BLOCK * format.block_bytes();
        if !cols.is_multiple_of(BLOCK) || data.len() != need {
            bail!(
                "{format:?} matrix [{rows}, {cols}] needs {need} bytes, got {}",
                data.len()
            );
        }
        Ok(Self {
            format,
            data,
            rows,
            cols,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The bytes its blocks take.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Stacks matrices of one format and width along the rows (fusing q/k/v or gate/up).
    pub fn concat_rows(parts: Vec<QuantMatrix>) -> Result<Self> {
        let (format, cols) = match parts.first() {
            Some(p) => (p.format, p.cols),
            None => bail!("nothing to stack"),
        };
        if parts.iter().any(|p| p.cols != cols || p.format != format) {
            bail!("matrices of different formats or widths cannot be stacked");
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let data = parts.into_iter().flat_map(|p| p.data).collect();
        Self::new(format, data, rows, cols)
    }

    /// `x`: f32 `[T, cols]` → `[T, rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_segments(x, 1)?.squeeze(0)?)
    }

    /// The products of `segments` equal column ranges separately: `[segments, T, rows]`, each
    /// exactly what a matrix holding only that column range would give.
    pub fn forward_segments(&self, x: &Tensor, segments: usize) -> Result<Tensor> {
        match self.format {
            Format::Q4_1 => self.forward_as::<Q41>(x, segments),
            Format::Q8_0 => self.forward_as::<Q80>(x, segments),
        }
    }

    fn forward_as<F: BlockFormat>(&self, x: &Tensor, segments: usize) -> Result<Tensor> {
        let (t, cols) = x.dims2()?;
        if cols != self.cols {
            bail!(
                "quantized matmul: input has {cols} columns, weight {}",
                self.cols
            );
        }
        let nb = cols / BLOCK;
        if segments == 0 || !nb.is_multiple_of(segments) {
            bail!("{nb} blocks per row do not split into {segments} segments");
        }
        let nbs = nb / segments;
        let seg_bytes = nbs * F::BYTES;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let acts: Vec<Q8Block> = xs.chunks_exact(BLOCK).map(quantize_block).collect();
        let rows = self.rows;
        let mut out = vec![0f32; segments * t * rows];
        let out_ptr = SyncPtr(out.as_mut_ptr());
        let row_bytes = nb * F::BYTES;
        let simd = has_avx2();
        candle_core::utils::barrier_pool().execute_chunked(rows, |range| {
            let out_ptr = &out_ptr;
            let mut dots = [0f32; TOKENS_PER_PASS];
            let mut range = range;
            // Decode: one token, rows in fours, so independent rows keep the core busy.
            if t == 1 && simd {
                while range.len() >= DECODE_ROWS {
                    let r = range.start;
                    for p in 0..segments {
                        let seg = |j: usize| {
                            let start = (r + j) * row_bytes + p * seg_bytes;
                            &self.data[start..start + seg_bytes]
                        };
                        let dots =
                            dot_rows::<F, DECODE_ROWS>(std::array::from_fn(seg), &acts[p * nbs..]);
                        for (j, v) in dots.iter().enumerate() {
                            // SAFETY: as below.
                            unsafe { *out_ptr.0.add(p * rows + r + j) = *v };
                        }
                    }
                    range.start += DECODE_ROWS;
                }
            }
            for r in range {
                let row = &self.data[r * row_bytes..(r + 1) * row_bytes];
                for (p, seg) in row.chunks_exact(seg_bytes).enumerate() {
                    // A few tokens per pass over the row: its blocks are unpacked once for all.
                    for t0 in (0..t).step_by(TOKENS_PER_PASS) {
                        let n = TOKENS_PER_PASS.min(t - t0);
                        let acts = &acts[t0 * nb + p * nbs..];
                        dot_row_tokens::<F>(simd, seg, acts, nb, &mut dots[..n]);
                        for (k, v) in dots[..n].iter().enumerate() {
                            // SAFETY: each (segment, token, row) is written by exactly one
                            // thread (rows are split into disjoint ranges), and `out`
                            // outlives the pool call.
                            unsafe { *out_ptr.0.add((p * t + t0 + k) * rows + r) = *v };
                        }
                    }
                }
            }
        });
        Ok(Tensor::from_vec(out, (segments, t, rows), &Device::Cpu)?)
    }
}

struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes from the pool's threads (see `forward_as`).
unsafe impl Sync for SyncPtr {}

fn quantize_block(x: &[f32]) -> Q8Block {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    let mut sum = 0i32;
    for (qi, &v) in q.iter_mut().zip(x) {
        let r = (v * id).round() as i32;
        *qi = r as i8;
        sum += r;
    }
    Q8Block {
        d,
        s: d * sum as f32,
        q,
    }
}

/// Tokens whose dot products share one pass over a weight row.
const TOKENS_PER_PASS: usize = 8;
/// Rows computed together for a single token (decode).
const DECODE_ROWS: usize = 4;

fn has_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVX2: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVX2.get_or_init(|| {
            std::is_x86_feature_detected!("avx2")
                && std::is_x86_feature_detected!("fma")
                && std::is_x86_feature_detected!("f16c")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// How one weight block multiplies one activation block.
trait BlockFormat {
    const BYTES: usize;
    /// `(Σ w_q·x_q, d, m)`.
    fn block_scalar(b: &[u8], a: &Q8Block) -> (i32, f32, f32);
    /// The same with AVX2: eight lanes of partial integer sums, `d` and `m`.
    #[cfg(target_arch = "x86_64")]
    unsafe fn block_avx2(
        p: *const u8,
        xq: std::arch::x86_64::__m256i,
    ) -> (std::arch::x86_64::__m256i, f32, f32);
}

struct Q41;
struct Q80;

impl BlockFormat for Q41 {
    /// f16 d, f16 m, 16 bytes of nibbles.
    const BYTES: usize = 20;

    fn block_scalar(b: &[u8], a: &Q8Block) -> (i32, f32, f32) {
        let mut isum = 0i32;
        for j in 0..16 {
            isum += (b[4 + j] & 0x0F) as i32 * a.q[j] as i32;
            isum += (b[4 + j] >> 4) as i32 * a.q[j + 16] as i32;
        }
        (isum, f16_at(b, 0), f16_at(b, 2))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_avx2(
        p: *const u8,
        xq: std::arch::x86_64::__m256i,
    ) -> (std::arch::x86_64::__m256i, f32, f32) {
        use std::arch::x86_64::*;
        let dm = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        let low = _mm_set1_epi8(0x0F);
        let qs = _mm_loadu_si128(p.add(4) as *const __m128i);
        let wq = _mm256_set_m128i(
            _mm_and_si128(_mm_srli_epi16(qs, 4), low),
            _mm_and_si128(qs, low),
        );
        let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(wq, xq), _mm256_set1_epi16(1));
        (
            p32,
            _mm_cvtss_f32(dm),
            _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)),
        )
    }
}

impl BlockFormat for Q80 {
    /// f16 d, 32 signed bytes.
    const BYTES: usize = 34;

    fn block_scalar(b: &[u8], a: &Q8Block) -> (i32, f32, f32) {
        let isum = (0..BLOCK)
            .map(|j| b[2 + j] as i8 as i32 * a.q[j] as i32)
            .sum();
        (isum, f16_at(b, 0), 0.0)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block_avx2(
        p: *const u8,
        xq: std::arch::x86_64::__m256i,
    ) -> (std::arch::x86_64::__m256i, f32, f32) {
        use std::arch::x86_64::*;
        let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
            (p as *const u16).read_unaligned() as i32,
        )));
        let w = _mm256_loadu_si256(p.add(2) as *const __m256i);
        // maddubs wants an unsigned operand: |w| times x carrying w's sign.
        let p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
        (_mm256_madd_epi16(p16, _mm256_set1_epi16(1)), d, 0.0)
    }
}

/// `out[k]` = row · token `k`, whose activation blocks start at `acts[k * nb]`. Each token's
/// sum runs over the row's blocks in order, exactly as it would alone.
fn dot_row_tokens<F: BlockFormat>(
    simd: bool,
    row: &[u8],
    acts: &[Q8Block],
    nb: usize,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if simd {
            // SAFETY: `simd` is true only when the CPU has the features the function uses.
            unsafe {
                match out.len() {
                    1 => dot_row_tokens_avx2::<F, 1>(row, acts, nb, out),
                    2 => dot_row_tokens_avx2::<F, 2>(row, acts, nb, out),
                    3 => dot_row_tokens_avx2::<F, 3>(row, acts, nb, out),
                    4 => dot_row_tokens_avx2::<F, 4>(row, acts, nb, out),
                    5 => dot_row_tokens_avx2::<F, 5>(row, acts, nb, out),
                    6 => dot_row_tokens_avx2::<F, 6>(row, acts, nb, out),
                    7 => dot_row_tokens_avx2::<F, 7>(row, acts, nb, out),
                    _ => dot_row_tokens_avx2::<F, 8>(row, acts, nb, out),
                }
            }
            return;
        }
    }
    let _ = simd;
    for (k, o) in out.iter_mut().enumerate() {
        *o = dot_row_scalar::<F>(row, &acts[k * nb..]);
    }
}

fn dot_row_scalar<F: BlockFormat>(row: &[u8], acts: &[Q8Block]) -> f32 {
    let mut sum = 0f32;
    for (b, a) in row.chunks_exact(F::BYTES).zip(acts) {
        let (isum, d, m) = F::block_scalar(b, a);
        sum += d * a.d * isum as f32 + m * a.s;
    }
    sum
}

/// `R` rows against one token, each computed exactly as `dot_row_tokens_avx2::<F, 1>` would.
fn dot_rows<F: BlockFormat, const R: usize>(rows: [&[u8]; R], acts: &[Q8Block]) -> [f32; R] {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only called when `has_avx2()` holds.
        unsafe { dot_rows_avx2::<F, R>(rows, acts) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        rows.map(|r| dot_row_scalar::<F>(r, acts))
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_rows_avx2<F: BlockFormat, const R: usize>(
    rows: [&[u8]; R],
    acts: &[Q8Block],
) -> [f32; R] {
    use std::arch::x86_64::*;
    // [row][even/odd block]
    let mut acc = [[_mm256_setzero_ps(); 2]; R];
    let mut mins = [[0f32; 2]; R];
    let nb = rows[0].len() / F::BYTES;
    for i in 0..nb {
        let act = acts.get_unchecked(i);
        let xq = _mm256_loadu_si256(act.q.as_ptr() as *const __m256i);
        for j in 0..R {
            let (p32, d, m) = F::block_avx2(rows[j].as_ptr().add(i * F::BYTES), xq);
            mins[j][i & 1] += m * act.s;
            acc[j][i & 1] = _mm256_fmadd_ps(
                _mm256_set1_ps(d * act.d),
                _mm256_cvtepi32_ps(p32),
                acc[j][i & 1],
            );
        }
    }
    let mut out = [0f32; R];
    for j in 0..R {
        out[j] = hsum(_mm256_add_ps(acc[j][0], acc[j][1])) + (mins[j][0] + mins[j][1]);
    }
    out
}

/// The sum of a vector's eight lanes, in one fixed order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn hsum(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    _mm_cvtss_f32(h)
}

/// `N` tokens against one row. Each token keeps two sets of accumulators (even and odd blocks)
/// so consecutive blocks do not wait on each other's adds; the order is the same for every `N`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_row_tokens_avx2<F: BlockFormat, const N: usize>(
    row: &[u8],
    acts: &[Q8Block],
    nb: usize,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm256_setzero_ps(); N]; 2];
    let mut summs = [[0f32; N]; 2];
    for i in 0..row.len() / F::BYTES {
        let p = row.as_ptr().add(i * F::BYTES);
        let (lane, mins) = (&mut acc[i & 1], &mut summs[i & 1]);
        for k in 0..N {
            let a = acts.get_unchecked(k * nb + i);
            let xq = _mm256_loadu_si256(a.q.as_ptr() as *const __m256i);
            let (p32, d, m) = F::block_avx2(p, xq);
            mins[k] += m * a.s;
            lane[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * a.d), _mm256_cvtepi32_ps(p32), lane[k]);
        }
    }
    for k in 0..N {
        out[k] = hsum(_mm256_add_ps(acc[0][k], acc[1][k])) + (summs[0][k] + summs[1][k]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator for test data.
    fn lcg(seed: u64) -> impl FnMut() -> u32 {
        let mut state = seed;
        move || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u32
        }
    }

    /// `got` (`[T][rows]`) is `x · wᵀ` up to activation rounding: at most half a step of
    /// 1/127 of each block's largest |x|, so relative to Σ|w·x|.
    fn assert_close_to_dense(got: &[Vec<f32>], w: &[f32], x: &[f32], cols: usize) {
        for (ti, row_out) in got.iter().enumerate() {
            for (r, &g) in row_out.iter().enumerate() {
                let terms = (0..cols).map(|c| w[r * cols + c] * x[ti * cols + c]);
                let exact: f32 = terms.clone().sum();
                let mag: f32 = terms.map(f32::abs).sum();
                assert!(
                    (g - exact).abs() < 0.01 * mag + 1e-3,
                    "({ti},{r}): {g} vs {exact}"
                );
            }
        }
    }

    /// Random Q4_1 bytes and the f32 weights they stand for.
    /// `n` activations: `i * step % modulus`, centred, divided by `div`.
    fn activations(n: usize, step: usize, modulus: usize, div: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * step % modulus) as f32 - (modulus / 2) as f32) / div)
            .collect()
    }

    /// `m` applied to the tokens of `x` (`cols` values each), as rows.
    fn apply(m: &QuantMatrix, x: &[f32], cols: usize) -> Vec<Vec<f32>> {
        let xt = Tensor::from_vec(x.to_vec(), (x.len() / cols, cols), &Device::Cpu).unwrap();
        m.forward(&xt).unwrap().to_vec2::<f32>().unwrap()
    }

    fn random_q41(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut next = lcg(seed);
        let mut bytes = Vec::new();
        let mut dense = Vec::new();
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 20000.0);
            let m = f16::from_f32(-((next() % 1000) as f32) / 10000.0);
            bytes.extend_from_slice(&d.to_bits().to_le_bytes());
            bytes.extend_from_slice(&m.to_bits().to_le_bytes());
            let qs: Vec<u8> = (0..16).map(|_| (next() % 256) as u8).collect();
            let mut block = [0f32; BLOCK];
            for j in 0..16 {
                block[j] = (qs[j] & 0x0F) as f32 * d.to_f32() + m.to_f32();
                block[j + 16] = (qs[j] >> 4) as f32 * d.to_f32() + m.to_f32();
            }
            bytes.extend_from_slice(&qs);
            dense.extend_from_slice(&block);
        }
        (bytes, dense)
    }

    #[test]
    fn matches_the_dense_product_within_activation_rounding() {
        let (rows, cols, t) = (37, 256, 5);
        let (bytes, w) = random_q41(rows, cols, 1);
        let x = activations(t * cols, 7, 23, 7.0);
        let m = QuantMatrix::new(Format::Q4_1, bytes, rows, cols).unwrap();
        let got = apply(&m, &x, cols);
        assert_close_to_dense(&got, &w, &x, cols);
    }

    #[test]
    fn simd_and_scalar_agree_and_rows_do_not_depend_on_the_batch() {
        let (rows, cols) = (8, 128);
        let (bytes, _) = random_q41(rows, cols, 2);
        let x = activations(3 * cols, 13, 31, 9.0);
        let m = QuantMatrix::new(Format::Q4_1, bytes.clone(), rows, cols).unwrap();
        let all = apply(&m, &x, cols);
        let one = apply(&m, &x[cols..2 * cols], cols);
        // One token goes through the two-row decode kernel, three through the token-group one.
        assert_eq!(all[1], one[0], "a row's result depends on the batch");
        let nb = cols / BLOCK;
        let acts: Vec<Q8Block> = x.chunks_exact(BLOCK).map(quantize_block).collect();
        let row_bytes = nb * Q41::BYTES;
        for r in 0..rows {
            let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
            let mut simd = [0f32; 3];
            dot_row_tokens::<Q41>(has_avx2(), row, &acts, nb, &mut simd);
            for (k, a) in simd.iter().enumerate() {
                let b = dot_row_scalar::<Q41>(row, &acts[k * nb..(k + 1) * nb]);
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "row {r}: {a} vs {b}"
                );
            }
        }
    }

    #[test]
    fn segments_equal_separate_matrices_and_stacking_equals_separate_calls() {
        let (rows, cols, t) = (5, 192, 3);
        let (bytes, _) = random_q41(rows, cols, 3);
        let x = activations(t * cols, 17, 29, 5.0);
        let xt = Tensor::from_vec(x.clone(), (t, cols), &Device::Cpu).unwrap();
        let whole = QuantMatrix::new(Format::Q4_1, bytes.clone(), rows, cols).unwrap();
        let segs = whole
            .forward_segments(&xt, 3)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let row_bytes = cols / BLOCK * Q41::BYTES;
        for p in 0..3 {
            // The matrix holding only columns p*64 .. (p+1)*64.
            let part: Vec<u8> = (0..rows)
                .flat_map(|r| {
                    bytes[r * row_bytes..][p * row_bytes / 3..(p + 1) * row_bytes / 3].to_vec()
                })
                .collect();
            let m = QuantMatrix::new(Format::Q4_1, part, rows, cols / 3).unwrap();
            let xp = xt.narrow(1, p * 64, 64).unwrap().contiguous().unwrap();
            let alone = m.forward(&xp).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(segs[p], alone, "segment {p}");
        }
        let (b2, _) = random_q41(4, cols, 4);
        let other = QuantMatrix::new(Format::Q4_1, b2.clone(), 4, cols).unwrap();
        let a = whole.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
        let b = other.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
        let stacked = QuantMatrix::concat_rows(vec![
            QuantMatrix::new(Format::Q4_1, bytes, rows, cols).unwrap(),
            other,
        ])
        .unwrap()
        .forward(&xt)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        for i in 0..t {
            assert_eq!(stacked[i], [a[i].clone(), b[i].clone()].concat());
        }
    }

    /// Random Q8_0 bytes and the f32 weights they stand for.
    fn random_q80(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut next = lcg(seed);
        let (mut bytes, mut dense) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 50000.0);
            bytes.extend_from_slice(&d.to_bits().to_le_bytes());
            for _ in 0..BLOCK {
                let q = (next() % 255) as i32 - 127;
                bytes.push(q as i8 as u8);
                dense.push(q as f32 * d.to_f32());
            }
        }
        (bytes, dense)
    }

    #[test]
    fn q8_0_matches_the_dense_product_and_its_scalar_path() {
        let (rows, cols, t) = (9, 128, 3);
        let (bytes, w) = random_q80(rows, cols, 5);
        let x = activations(t * cols, 11, 19, 4.0);
        let m = QuantMatrix::new(Format::Q8_0, bytes.clone(), rows, cols).unwrap();
        let xt = Tensor::from_vec(x.clone(), (t, cols), &Device::Cpu).unwrap();
        let got = m.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
        let nb = cols / BLOCK;
        let acts: Vec<Q8Block> = x.chunks_exact(BLOCK).map(quantize_block).collect();
        assert_close_to_dense(&got, &w, &x, cols);
        for ti in 0..t {
            for r in 0..rows {
                let row = &bytes[r * nb * Q80::BYTES..(r + 1) * nb * Q80::BYTES];
                let scalar = dot_row_scalar::<Q80>(row, &acts[ti * nb..]);
                assert!((got[ti][r] - scalar).abs() <= 1e-4 * (1.0 + scalar.abs()));
            }
        }
        // One token (the four-row decode kernel) gives what a batch gives.
        let one = m
            .forward(&xt.narrow(0, 2, 1).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(one[0], got[2]);
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(QuantMatrix::new(Format::Q4_1, vec![0; 19], 1, 32).is_err());
        assert!(QuantMatrix::new(Format::Q4_1, vec![0; 20], 1, 31).is_err());
        assert!(QuantMatrix::new(Format::Q8_0, vec![0; 33], 1, 32).is_err());
    }
}
