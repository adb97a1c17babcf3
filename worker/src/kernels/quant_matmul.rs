//! Quantized weight × f32 activation matmuls for the CPU (Q4_1 and Q8_0).
//!
//! GGUF blocks hold 32 weights: Q4_1 4-bit `q` with an f16 scale `d` and minimum `m`
//! (`w = d·q + m`; byte `j` holds element `j` in its low nibble and `j + 16` in its high one);
//! Q8_0 8-bit `q` and an f16 `d` (`w = d·q`). Activations are quantized per block to 8 bits
//! (`x ≈ d8·q8`, `s8 = d8·Σq8`), so a block's dot product is `d·d8·Σ q·q8 + m·s8`: an exact
//! integer sum, then float multiply-adds.
//!
//! **Layout.** At load the rows are repacked in groups of [`GROUP`] (8): per block, the group's
//! eight `d` (and `m`), then its quants interleaved four bytes per row, so that one 256-bit
//! register holds four consecutive weights of each of the eight rows. One `vpdpbusd` (or, without
//! VNNI, `pmaddubsw` + `pmaddwd`) against four activation bytes broadcast to every lane then
//! adds four products to each row's integer sum: eight rows advance together, with no shuffles
//! and no horizontal sums, and the scales of eight rows are one vector multiply. A CPU that is
//! not starved for memory bandwidth is bound by those instructions: the kernel alone runs 2.8×
//! faster than it did a row at a time (`helios-bench kernel`, bench/RESULTS.md). Q8_0 quants are stored offset by 128 (unsigned, as
//! `vpdpbusd` wants them) and the block's `128·Σq8` is taken off the sum after.
//!
//! **Same bits everywhere.** Every output is `acc + mins` where, block by block in order,
//! `acc = fma(isum, d·d8, acc)` and `mins = fma(m, s8, mins)`, with `isum` exact. That does not
//! depend on the number of rows, the tokens in the batch, the tensor-parallel split
//! (segments), or the instruction set: AVX-512 VNNI, AVX-VNNI, AVX2 and the scalar path give the
//! same bits (tested), so dispatch happens at run time and a cluster of mixed CPUs agrees.
//!
//! Rows are spread over candle's CPU thread pool, so no second pool competes for the cores.

use std::ops::Range;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use half::f16;

pub const BLOCK: usize = 32;
/// Rows interleaved in the repacked layout: one 32-bit lane of a 256-bit register per row.
pub const GROUP: usize = 8;
/// Tokens whose dot products share one pass over a group's weights.
const TOKENS_PER_PASS: usize = 4;

/// A weight block format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Q4_1,
    Q8_0,
}

impl Format {
    /// Bytes of one GGUF block (and, per row, of the repacked layout).
    pub fn block_bytes(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }

    /// Where a group's block keeps its quants: after the eight `d` (and, Q4_1, eight `m`).
    fn quants_at(self) -> usize {
        match self {
            Format::Q4_1 => 4 * GROUP,
            Format::Q8_0 => 2 * GROUP,
        }
    }
}

/// Caps the instruction set the kernels use (`scalar`, `avx2`, `avxvnni`, `avx512vnni`): to
/// measure what a CPU without VNNI gets, on one with it. Results are the same bits either way.
pub const ISA_ENV: &str = "HELIOS_CPU_KERNEL";

/// The instruction set a kernel runs with, from the least to the most it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    Scalar,
    Avx2,
    AvxVnni,
    Avx512Vnni,
}

impl Isa {
    /// The best this CPU has (checked once), or the one [`ISA_ENV`] names if it can run it.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(
            || match std::env::var(ISA_ENV).ok().and_then(|v| Isa::parse(&v)) {
                Some(asked) if asked.runs_here() => asked,
                _ => Self::best(),
            },
        )
    }

    fn parse(name: &str) -> Option<Isa> {
        match name {
            "scalar" => Some(Isa::Scalar),
            "avx2" => Some(Isa::Avx2),
            "avxvnni" => Some(Isa::AvxVnni),
            "avx512vnni" => Some(Isa::Avx512Vnni),
            _ => None,
        }
    }

    /// Whether this CPU has what `self` needs (checked once).
    pub fn runs_here(self) -> bool {
        static HAS: std::sync::OnceLock<[bool; 4]> = std::sync::OnceLock::new();
        HAS.get_or_init(|| {
            #[cfg(target_arch = "x86_64")]
            {
                use std::arch::is_x86_feature_detected as has;
                let avx2 = has!("avx2") && has!("fma") && has!("f16c");
                [
                    true,
                    avx2,
                    avx2 && has!("avxvnni"),
                    avx2 && has!("avx512vnni") && has!("avx512vl"),
                ]
            }
            #[cfg(not(target_arch = "x86_64"))]
            [true, false, false, false]
        })[self as usize]
    }

    /// Every instruction set this CPU can run (for tests and benchmarks).
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni]
            .into_iter()
            .filter(|i| i.runs_here())
            .collect()
    }

    /// The best of [`Self::available`].
    fn best() -> Isa {
        Self::available().pop().unwrap_or(Isa::Scalar)
    }
}

/// A `[rows, cols]` quantized matrix, repacked in groups of [`GROUP`] rows (see the module docs).
pub struct QuantMatrix {
    format: Format,
    data: Vec<u8>,
    rows: usize,
    cols: usize,
}

/// One activation block: `x ≈ d·q`, `s = d·Σq`, `sum128 = 128·Σq`.
#[derive(Clone, Copy)]
pub struct Q8Block {
    d: f32,
    s: f32,
    sum128: i32,
    q: [i8; BLOCK],
}

impl QuantMatrix {
    /// `gguf`: the rows in GGUF's block layout.
    pub fn new(format: Format, gguf: Vec<u8>, rows: usize, cols: usize) -> Result<Self> {
        let need = rows * cols / BLOCK * format.block_bytes();
        if !cols.is_multiple_of(BLOCK) || gguf.len() != need {
            bail!(
                "{format:?} matrix [{rows}, {cols}] needs {need} bytes, got {}",
                gguf.len()
            );
        }
        Ok(Self {
            data: repack(format, &gguf, rows, cols),
            format,
            rows,
            cols,
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    /// The bytes it holds (rows padded to a whole group).
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Bytes a `[rows, cols]` matrix of `format` holds once repacked.
    pub fn bytes_for(format: Format, rows: usize, cols: usize) -> usize {
        rows.div_ceil(GROUP) * GROUP * cols / BLOCK * format.block_bytes()
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
        let gguf = parts.iter().flat_map(QuantMatrix::to_gguf).collect();
        Self::new(format, gguf, rows, cols)
    }

    /// The rows back in GGUF's layout.
    fn to_gguf(&self) -> Vec<u8> {
        let nb = self.cols / BLOCK;
        let bb = self.format.block_bytes();
        let mut out = vec![0u8; self.rows * nb * bb];
        for r in 0..self.rows {
            for b in 0..nb {
                let dst = &mut out[(r * nb + b) * bb..][..bb];
                let group = &self.data[((r / GROUP) * nb + b) * GROUP * bb..][..GROUP * bb];
                for (bytes, at, flip) in pieces(self.format, r % GROUP) {
                    let n = bytes.len();
                    copy_piece(&mut dst[bytes], &group[at..at + n], flip);
                }
            }
        }
        out
    }

    /// `x`: f32 `[T, cols]` → `[T, rows]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_segments(x, 1)?.squeeze(0)?)
    }

    /// The products of `segments` equal column ranges separately: `[segments, T, rows]`, each
    /// exactly what a matrix holding only that column range would give.
    pub fn forward_segments(&self, x: &Tensor, segments: usize) -> Result<Tensor> {
        self.forward_with(x, segments, Isa::detect())
    }

    /// [`Self::forward_segments`] with a given instruction set (one this CPU has).
    pub fn forward_with(&self, x: &Tensor, segments: usize, isa: Isa) -> Result<Tensor> {
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
        if !isa.runs_here() {
            bail!("this CPU cannot run {isa:?}");
        }
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let acts: Vec<Q8Block> = xs.chunks_exact(BLOCK).map(quantize_block).collect();
        let rows = self.rows;
        let mut out = vec![0f32; segments * t * rows];
        let job = Job {
            m: self,
            acts: &acts,
            t,
            nbs: nb / segments,
            segments,
            out: SyncPtr(out.as_mut_ptr()),
        };
        candle_core::utils::barrier_pool()
            .execute_chunked(rows.div_ceil(GROUP), |groups| job.run(groups, isa));
        Ok(Tensor::from_vec(out, (segments, t, rows), &Device::Cpu)?)
    }
}

/// Where the bytes of row `lane`'s GGUF block go in its group's block, in pieces:
/// `(bytes of the GGUF block, where they start in the group block, stored + 128)`.
fn pieces(format: Format, lane: usize) -> impl Iterator<Item = (Range<usize>, usize, bool)> {
    let q = format.quants_at();
    let d = std::iter::once((0..2, 2 * lane, false));
    let (m, chunks, quants_at) = match format {
        // d, m, then bytes 4c .. 4c+4 of the 16 nibble bytes.
        Format::Q4_1 => (Some((2..4, 2 * GROUP + 2 * lane, false)), 4, 4),
        // d, then bytes 4c .. 4c+4 of the 32 quants, stored + 128.
        Format::Q8_0 => (None, 8, 2),
    };
    let flip = format == Format::Q8_0;
    d.chain(m).chain((0..chunks).map(move |c| {
        let at = quants_at + 4 * c;
        (at..at + 4, q + 32 * c + 4 * lane, flip)
    }))
}

/// Copies `src` to `dst`, adding 128 to every byte (mod 256) when `flip`.
fn copy_piece(dst: &mut [u8], src: &[u8], flip: bool) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = if flip { s ^ 0x80 } else { *s };
    }
}

/// GGUF rows → groups of [`GROUP`] rows (rows past the end are zeros: they give 0).
fn repack(format: Format, gguf: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    let (nb, bb) = (cols / BLOCK, format.block_bytes());
    let mut out = vec![0u8; QuantMatrix::bytes_for(format, rows, cols)];
    for r in 0..rows {
        for b in 0..nb {
            let src = &gguf[(r * nb + b) * bb..][..bb];
            let group = &mut out[((r / GROUP) * nb + b) * GROUP * bb..][..GROUP * bb];
            for (bytes, at, flip) in pieces(format, r % GROUP) {
                copy_piece(&mut group[at..at + bytes.len()], &src[bytes], flip);
            }
        }
    }
    out
}

struct SyncPtr(*mut f32);
// SAFETY: used only for disjoint writes from the pool's threads (see `Job::run`).
unsafe impl Sync for SyncPtr {}

/// One matmul, shared by the pool's threads; each takes ranges of row groups.
struct Job<'a> {
    m: &'a QuantMatrix,
    acts: &'a [Q8Block],
    t: usize,
    /// Blocks per segment.
    nbs: usize,
    segments: usize,
    out: SyncPtr,
}

impl Job<'_> {
    fn run(&self, groups: Range<usize>, isa: Isa) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is one this CPU has (checked in `forward_with`).
        unsafe {
            match isa {
                Isa::Avx512Vnni => return simd::run_avx512vnni(self, groups),
                Isa::AvxVnni => return simd::run_avxvnni(self, groups),
                Isa::Avx2 => return simd::run_avx2(self, groups),
                Isa::Scalar => {}
            }
        }
        let _ = isa;
        self.each(groups, |g, acts| scalar_group(self.m.format, g, acts))
    }

    /// Calls `dots(group_blocks, tokens' activation blocks)` for every group, segment and pass
    /// of up to [`TOKENS_PER_PASS`] tokens, and writes its `[token][lane]` results.
    #[inline(always)]
    fn each(
        &self,
        groups: Range<usize>,
        mut dots: impl FnMut(&[u8], &[&[Q8Block]]) -> [[f32; GROUP]; TOKENS_PER_PASS],
    ) {
        let (m, nbs) = (self.m, self.nbs);
        let nb = nbs * self.segments;
        let gbb = GROUP * m.format.block_bytes();
        for g in groups {
            let group = &m.data[g * nb * gbb..(g + 1) * nb * gbb];
            for p in 0..self.segments {
                let blocks = &group[p * nbs * gbb..(p + 1) * nbs * gbb];
                for t0 in (0..self.t).step_by(TOKENS_PER_PASS) {
                    let n = TOKENS_PER_PASS.min(self.t - t0);
                    let mut acts: [&[Q8Block]; TOKENS_PER_PASS] = [&[]; TOKENS_PER_PASS];
                    for (k, a) in acts.iter_mut().take(n).enumerate() {
                        *a = &self.acts[(t0 + k) * nb + p * nbs..][..nbs];
                    }
                    let dots = dots(blocks, &acts[..n]);
                    for (k, lanes) in dots.iter().take(n).enumerate() {
                        for (lane, v) in lanes.iter().enumerate() {
                            let r = g * GROUP + lane;
                            if r < m.rows {
                                // SAFETY: each (segment, token, row) is written by exactly one
                                // thread (groups are split into disjoint ranges), inside `out`,
                                // which outlives the pool call.
                                unsafe { *self.out.0.add((p * self.t + t0 + k) * m.rows + r) = *v };
                            }
                        }
                    }
                }
            }
        }
    }
}

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
        sum128: 128 * sum,
        q,
    }
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// The reference arithmetic, lane by lane: what the SIMD kernels compute, bit for bit.
fn scalar_group(
    format: Format,
    blocks: &[u8],
    acts: &[&[Q8Block]],
) -> [[f32; GROUP]; TOKENS_PER_PASS] {
    let gbb = GROUP * format.block_bytes();
    let q = format.quants_at();
    let mut out = [[0f32; GROUP]; TOKENS_PER_PASS];
    for (k, acts) in acts.iter().enumerate() {
        for (lane, o) in out[k].iter_mut().enumerate() {
            let (mut acc, mut mins) = (0f32, 0f32);
            for (b, a) in blocks.chunks_exact(gbb).zip(acts.iter()) {
                let d = f16_at(b, 2 * lane);
                let weight = |j: usize| -> i32 {
                    let (c, i) = (j % 16 / 4, j % 4);
                    match format {
                        Format::Q4_1 => {
                            let byte = b[q + 32 * c + 4 * lane + i];
                            (if j < 16 { byte & 0x0F } else { byte >> 4 }) as i32
                        }
                        Format::Q8_0 => {
                            let c = j / 4;
                            (b[q + 32 * c + 4 * lane + i] ^ 0x80) as i8 as i32
                        }
                    }
                };
                let isum: i32 = (0..BLOCK).map(|j| weight(j) * a.q[j] as i32).sum();
                acc = (isum as f32).mul_add(d * a.d, acc);
                if format == Format::Q4_1 {
                    mins = f16_at(b, 2 * GROUP + 2 * lane).mul_add(a.s, mins);
                }
            }
            *o = acc + mins;
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
mod simd {
    //! The group kernels, compiled once per instruction set from one generic body.

    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{Format, Job, Q8Block, GROUP, TOKENS_PER_PASS};

    /// Four unsigned bytes times four signed bytes, added to each 32-bit lane.
    trait Dot {
        /// Whether [`Dot::dot_s8`] adds `Σ (w + 128)·a` (then `128·Σa` is taken off after).
        const OFFSET: bool;
        /// `w`: unsigned weights below 16; `a`: signed activations.
        unsafe fn dot_u4(acc: __m256i, w: __m256i, a: __m256i) -> __m256i;
        /// `w`: signed weights stored + 128; `a`: signed activations.
        unsafe fn dot_s8(acc: __m256i, w: __m256i, a: __m256i) -> __m256i;
    }

    struct Avx2;
    struct AvxVnni;
    struct Avx512Vnni;

    impl Dot for Avx2 {
        const OFFSET: bool = false;
        #[inline(always)]
        unsafe fn dot_u4(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
            // Pairs of products stay below 2·15·128: no saturation.
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(w, a), _mm256_set1_epi16(1));
            _mm256_add_epi32(acc, p)
        }
        #[inline(always)]
        unsafe fn dot_s8(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
            // |w| times a carrying w's sign: pairs stay below 2·128·127.
            let w = _mm256_xor_si256(w, _mm256_set1_epi8(-128));
            let p16 = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(a, w));
            _mm256_add_epi32(acc, _mm256_madd_epi16(p16, _mm256_set1_epi16(1)))
        }
    }

    impl Dot for AvxVnni {
        const OFFSET: bool = true;
        #[inline(always)]
        unsafe fn dot_u4(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(acc, w, a)
        }
        #[inline(always)]
        unsafe fn dot_s8(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
            _mm256_dpbusd_avx_epi32(acc, w, a)
        }
    }

    impl Dot for Avx512Vnni {
        const OFFSET: bool = true;
        #[inline(always)]
        unsafe fn dot_u4(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, w, a)
        }
        #[inline(always)]
        unsafe fn dot_s8(acc: __m256i, w: __m256i, a: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(acc, w, a)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn run_avx2(job: &Job, groups: Range<usize>) {
        run::<Avx2>(job, groups)
    }

    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(super) unsafe fn run_avxvnni(job: &Job, groups: Range<usize>) {
        run::<AvxVnni>(job, groups)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512vnni,avx512vl")]
    pub(super) unsafe fn run_avx512vnni(job: &Job, groups: Range<usize>) {
        run::<Avx512Vnni>(job, groups)
    }

    #[inline(always)]
    unsafe fn run<D: Dot>(job: &Job, groups: Range<usize>) {
        let format = job.m.format;
        job.each(
            groups,
            #[inline(always)]
            |blocks, acts| match (format, acts.len()) {
                (Format::Q4_1, 1) => q4_1::<D, 1>(blocks, acts),
                (Format::Q4_1, 2) => q4_1::<D, 2>(blocks, acts),
                (Format::Q4_1, 3) => q4_1::<D, 3>(blocks, acts),
                (Format::Q4_1, _) => q4_1::<D, 4>(blocks, acts),
                (Format::Q8_0, 1) => q8_0::<D, 1>(blocks, acts),
                (Format::Q8_0, 2) => q8_0::<D, 2>(blocks, acts),
                (Format::Q8_0, 3) => q8_0::<D, 3>(blocks, acts),
                (Format::Q8_0, _) => q8_0::<D, 4>(blocks, acts),
            },
        )
    }

    /// The four bytes of activations `4i ..` in every lane.
    #[inline(always)]
    unsafe fn bcast(a: &Q8Block, i: usize) -> __m256i {
        _mm256_set1_epi32((a.q.as_ptr() as *const i32).add(i).read_unaligned())
    }

    #[inline(always)]
    unsafe fn lanes<const N: usize>(v: [__m256; N]) -> [[f32; GROUP]; TOKENS_PER_PASS] {
        let mut out = [[0f32; GROUP]; TOKENS_PER_PASS];
        for k in 0..N {
            _mm256_storeu_ps(out[k].as_mut_ptr(), v[k]);
        }
        out
    }

    /// Q4_1 group block: `d` ×8 f16, `m` ×8 f16, then four 32-byte chunks, chunk `c` holding
    /// bytes `4c .. 4c+4` of each row (low nibbles: elements `4c ..`, high: `16 + 4c ..`).
    #[inline(always)]
    unsafe fn q4_1<D: Dot, const N: usize>(
        blocks: &[u8],
        acts: &[&[Q8Block]],
    ) -> [[f32; GROUP]; TOKENS_PER_PASS] {
        let mut acc = [_mm256_setzero_ps(); N];
        let mut mins = [_mm256_setzero_ps(); N];
        let low = _mm256_set1_epi8(0x0F);
        for (b, chunk) in blocks.chunks_exact(GROUP * 20).enumerate() {
            let p = chunk.as_ptr();
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let m = _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i));
            let mut w = [_mm256_setzero_si256(); 8];
            for c in 0..4 {
                let v = _mm256_loadu_si256(p.add(32 + 32 * c) as *const __m256i);
                w[c] = _mm256_and_si256(v, low);
                w[4 + c] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            }
            for k in 0..N {
                let a = acts.get_unchecked(k).get_unchecked(b);
                let mut isum = _mm256_setzero_si256();
                for (c, w) in w.iter().enumerate() {
                    isum = D::dot_u4(isum, *w, bcast(a, c));
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                acc[k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[k]);
                mins[k] = _mm256_fmadd_ps(m, _mm256_set1_ps(a.s), mins[k]);
            }
        }
        let mut out = [_mm256_setzero_ps(); N];
        for k in 0..N {
            out[k] = _mm256_add_ps(acc[k], mins[k]);
        }
        lanes(out)
    }

    /// Q8_0 group block: `d` ×8 f16, then eight 32-byte chunks, chunk `c` holding elements
    /// `4c .. 4c+4` of each row, stored + 128.
    #[inline(always)]
    unsafe fn q8_0<D: Dot, const N: usize>(
        blocks: &[u8],
        acts: &[&[Q8Block]],
    ) -> [[f32; GROUP]; TOKENS_PER_PASS] {
        let mut acc = [_mm256_setzero_ps(); N];
        let zero = _mm256_setzero_ps();
        for (b, chunk) in blocks.chunks_exact(GROUP * 34).enumerate() {
            let p = chunk.as_ptr();
            let d = _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i));
            let mut w = [_mm256_setzero_si256(); 8];
            for (c, w) in w.iter_mut().enumerate() {
                *w = _mm256_loadu_si256(p.add(16 + 32 * c) as *const __m256i);
            }
            for (k, acc) in acc.iter_mut().enumerate() {
                let a = acts.get_unchecked(k).get_unchecked(b);
                let mut isum = _mm256_setzero_si256();
                for (c, w) in w.iter().enumerate() {
                    isum = D::dot_s8(isum, *w, bcast(a, c));
                }
                if D::OFFSET {
                    isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(a.sum128));
                }
                let scale = _mm256_mul_ps(d, _mm256_set1_ps(a.d));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
            }
        }
        // `acc + 0`, as the scalar path adds its (zero) minimum term.
        for a in acc.iter_mut() {
            *a = _mm256_add_ps(*a, zero);
        }
        lanes(acc)
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

    /// `n` activations: `i * step % modulus`, centred, divided by `div`.
    fn activations(n: usize, step: usize, modulus: usize, div: f32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * step % modulus) as f32 - (modulus / 2) as f32) / div)
            .collect()
    }

    fn tensor(x: &[f32], cols: usize) -> Tensor {
        Tensor::from_vec(x.to_vec(), (x.len() / cols, cols), &Device::Cpu).unwrap()
    }

    /// `m` applied to the tokens of `x` (`cols` values each), as rows.
    fn apply(m: &QuantMatrix, x: &[f32], cols: usize) -> Vec<Vec<f32>> {
        m.forward(&tensor(x, cols))
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    }

    /// Random Q4_1 bytes and the f32 weights they stand for.
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

    /// Random Q8_0 bytes (every value from -128 to 127) and the f32 weights they stand for.
    fn random_q80(rows: usize, cols: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let mut next = lcg(seed);
        let (mut bytes, mut dense) = (Vec::new(), Vec::new());
        for _ in 0..rows * cols / BLOCK {
            let d = f16::from_f32((next() % 1000) as f32 / 50000.0);
            bytes.extend_from_slice(&d.to_bits().to_le_bytes());
            for _ in 0..BLOCK {
                let q = (next() % 256) as u8 as i8;
                bytes.push(q as u8);
                dense.push(q as f32 * d.to_f32());
            }
        }
        (bytes, dense)
    }

    #[test]
    fn both_formats_match_the_dense_product_within_activation_rounding() {
        let (rows, cols, t) = (37, 256, 5);
        let x = activations(t * cols, 7, 23, 7.0);
        let (bytes, w) = random_q41(rows, cols, 1);
        let m = QuantMatrix::new(Format::Q4_1, bytes, rows, cols).unwrap();
        assert_close_to_dense(&apply(&m, &x, cols), &w, &x, cols);
        let (bytes, w) = random_q80(rows, cols, 5);
        let m = QuantMatrix::new(Format::Q8_0, bytes, rows, cols).unwrap();
        assert_close_to_dense(&apply(&m, &x, cols), &w, &x, cols);
    }

    #[test]
    fn every_instruction_set_gives_the_scalar_bits_whatever_the_batch() {
        // 29 rows: three whole groups and a part; 1 to 9 tokens: whole passes and remainders.
        let (rows, cols) = (29, 192);
        let isas = Isa::available();
        eprintln!("instruction sets here: {isas:?}");
        for (format, (bytes, _)) in [
            (Format::Q4_1, random_q41(rows, cols, 2)),
            (Format::Q8_0, random_q80(rows, cols, 3)),
        ] {
            let m = QuantMatrix::new(format, bytes, rows, cols).unwrap();
            let x = activations(9 * cols, 13, 31, 9.0);
            let bits = |t: usize, segments: usize, isa: Isa| -> Vec<u32> {
                let out = m
                    .forward_with(&tensor(&x[..t * cols], cols), segments, isa)
                    .unwrap();
                let v = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                v.iter().map(|f| f.to_bits()).collect()
            };
            let all = bits(9, 1, Isa::Scalar);
            for isa in &isas {
                for t in 1..=9 {
                    for segments in [1, 3] {
                        assert_eq!(
                            bits(t, segments, *isa),
                            bits(t, segments, Isa::Scalar),
                            "{format:?} {isa:?}, {t} tokens, {segments} segments"
                        );
                    }
                    // A token's row does not depend on the batch it is in.
                    assert_eq!(
                        bits(t, 1, *isa),
                        all[..t * rows],
                        "{format:?} {isa:?}, {t} tokens"
                    );
                }
            }
        }
    }

    #[test]
    fn segments_equal_separate_matrices_and_stacking_equals_separate_calls() {
        let (rows, cols, t) = (5, 192, 3);
        let (bytes, _) = random_q41(rows, cols, 3);
        let x = activations(t * cols, 17, 29, 5.0);
        let xt = tensor(&x, cols);
        let whole = QuantMatrix::new(Format::Q4_1, bytes.clone(), rows, cols).unwrap();
        let segs = whole
            .forward_segments(&xt, 3)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        let row_bytes = cols / BLOCK * 20;
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
        let stacked = QuantMatrix::concat_rows(vec![whole, other]).unwrap();
        assert_eq!(
            stacked.to_gguf(),
            [bytes, b2].concat(),
            "stacking keeps the blocks"
        );
        let stacked = stacked.forward(&xt).unwrap().to_vec2::<f32>().unwrap();
        for i in 0..t {
            assert_eq!(stacked[i], [a[i].clone(), b[i].clone()].concat());
        }
    }

    #[test]
    fn repacking_keeps_every_byte_and_pads_to_whole_groups() {
        for (format, (bytes, _)) in [
            (Format::Q4_1, random_q41(11, 64, 6)),
            (Format::Q8_0, random_q80(11, 64, 7)),
        ] {
            let m = QuantMatrix::new(format, bytes.clone(), 11, 64).unwrap();
            assert_eq!(m.to_gguf(), bytes, "{format:?}");
            assert_eq!(m.bytes(), 16 * 2 * format.block_bytes());
            assert_eq!(m.bytes(), QuantMatrix::bytes_for(format, 11, 64));
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(QuantMatrix::new(Format::Q4_1, vec![0; 19], 1, 32).is_err());
        assert!(QuantMatrix::new(Format::Q4_1, vec![0; 20], 1, 31).is_err());
        assert!(QuantMatrix::new(Format::Q8_0, vec![0; 33], 1, 32).is_err());
        let m = QuantMatrix::new(Format::Q8_0, vec![0; 34], 1, 32).unwrap();
        let x = Tensor::zeros((1, 64), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(m.forward(&x).is_err(), "a wrong input width is refused");
    }
}
