//! Dense layers on weights packed once, with the bias and ReLU fused into the product.
//!
//! The deep layers of a ranking model are skinny products: a few hundred item rows times a
//! weight matrix of a few hundred columns. A general GEMM packs both operands on every call;
//! here the weights are packed once (per model, or per request shape for the first layer) into
//! panels of [`NR`] output columns, 64-byte aligned, and the item rows are read in place. The
//! micro-kernel keeps an `MR x NR` block of the output in registers over the whole inner
//! dimension and writes it once, bias added and ReLU applied.
//!
//! There are three builds of the kernel: AVX-512 and AVX2+FMA intrinsics, and a portable loop
//! (also the reference the others are tested against); the widest the CPU has is picked at run
//! time.

/// Output columns per packed panel (two AVX-512 vectors).
pub const NR: usize = 32;

/// One packed row of a panel: `NR` weights, cache-line aligned.
#[derive(Clone, Copy, Debug)]
#[repr(C, align(64))]
struct Lane([f32; NR]);

/// A `k x n` weight matrix in panels of [`NR`] columns: panel `p` holds, for each `kk` in
/// `0..k`, the weights of columns `p * NR .. p * NR + NR` (zero past `n`).
#[derive(Clone, Debug, Default)]
pub struct Packed {
    k: usize,
    n: usize,
    lanes: Vec<Lane>,
}

impl Packed {
    /// Packs the matrix whose element `(kk, j)` (input `kk`, output `j`) is `get(kk, j)`.
    pub fn new(k: usize, n: usize, get: impl Fn(usize, usize) -> f32) -> Packed {
        let panels = n.div_ceil(NR);
        let mut lanes = vec![Lane([0.0; NR]); panels * k];
        for p in 0..panels {
            for kk in 0..k {
                let lane = &mut lanes[p * k + kk].0;
                for (jj, w) in lane.iter_mut().enumerate() {
                    let j = p * NR + jj;
                    if j < n {
                        *w = get(kk, j);
                    }
                }
            }
        }
        Packed { k, n, lanes }
    }

    /// Packs a PyTorch `nn.Linear` weight: `w[o][i]`, `out x inp`, row-major.
    pub fn from_out_in(w: &[f32], out: usize, inp: usize) -> Packed {
        Packed::new(inp, out, |kk, j| w[j * inp + kk])
    }

    /// Inner dimension (inputs).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Output columns.
    pub fn n(&self) -> usize {
        self.n
    }
}

/// The instruction sets the kernel is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512F.
    Avx512,
    /// AVX2 with FMA.
    Avx2,
    /// Whatever the target baseline has.
    Generic,
}

impl Default for Isa {
    fn default() -> Isa {
        Isa::detect()
    }
}

impl Isa {
    /// Whether the running CPU can run this build.
    pub fn supported(self) -> bool {
        match self {
            Isa::Generic => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// The widest the running CPU supports.
    pub fn detect() -> Isa {
        [Isa::Avx512, Isa::Avx2]
            .into_iter()
            .find(|i| i.supported())
            .unwrap_or(Isa::Generic)
    }

    /// Every instruction set this CPU can run (for tests that cover all of them).
    pub fn available() -> Vec<Isa> {
        [Isa::Generic, Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|i| i.supported())
            .collect()
    }
}

/// `c[i][j] = act(Σ_kk a[i * a_rs + kk] · B[kk][j] + bias(i)[j])` for `i < m`, `j < b.n()`, with
/// `c` row-major of row stride `b.n()` and `act` ReLU when `relu`. `bias(i)` is the bias row of
/// output row `i` (at least `b.n()` long): one vector for a plain layer, the per-request part
/// for the split first layer.
///
/// # Panics
/// If `a` or `c` is too short for `m` rows, or `a_rs < b.k()`.
#[allow(clippy::too_many_arguments)]
pub fn dense<'b>(
    isa: Isa,
    m: usize,
    a: &[f32],
    a_rs: usize,
    b: &Packed,
    bias: impl Fn(usize) -> &'b [f32],
    relu: bool,
    c: &mut [f32],
) {
    dense_plus(isa, m, a, a_rs, b, bias, RowAdds::default(), relu, c);
}

/// Rows added to the output rows of [`dense_plus`] before the activation: output row `i` adds
/// `scale · row[j]` to column `j` for every `(row, scale)` of `rows[starts[i]..starts[i + 1]]`
/// (each `row` at least `b.n()` long). The CPU engine adds its folded tables' rows
/// ([`crate::fold`]) to the first layer this way: read while the kernel computes (each block asks
/// for the next block's rows ahead) instead of in a memory-bound pass of their own.
#[derive(Clone, Copy, Debug, Default)]
pub struct RowAdds<'a> {
    /// `m + 1` offsets into `rows` (or none at all: nothing is added).
    pub starts: &'a [u32],
    /// The rows with their scales.
    pub rows: &'a [(&'a [f32], f32)],
}

impl<'a> RowAdds<'a> {
    /// The rows added to output row `i`.
    #[inline(always)]
    fn of(&self, i: usize) -> &'a [(&'a [f32], f32)] {
        if self.starts.is_empty() {
            &[]
        } else {
            &self.rows[self.starts[i] as usize..self.starts[i + 1] as usize]
        }
    }
}

/// [`dense`] with `adds` added to each output row with its bias:
/// `c[i][j] = act(Σ_kk a[i][kk] · B[kk][j] + (bias(i)[j] + Σ scale · row[j]))`, the bracket
/// summed in the order of `adds`.
///
/// # Panics
/// As [`dense`], and if `adds` has offsets but not `m + 1` of them, or a row is too short.
#[allow(clippy::too_many_arguments)]
pub fn dense_plus<'b>(
    isa: Isa,
    m: usize,
    a: &[f32],
    a_rs: usize,
    b: &Packed,
    bias: impl Fn(usize) -> &'b [f32],
    adds: RowAdds<'_>,
    relu: bool,
    c: &mut [f32],
) {
    if m == 0 || b.n == 0 {
        return;
    }
    assert!(
        a_rs >= b.k && a.len() >= (m - 1) * a_rs + b.k,
        "a too short"
    );
    assert!(c.len() >= m * b.n, "c too short");
    assert!(
        adds.starts.is_empty() || adds.starts.len() == m + 1,
        "one start per output row and an end"
    );
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.supported());
            // SAFETY: the CPU has AVX-512F, checked just above.
            unsafe { x86::dense_avx512(m, a, a_rs, b, &bias, adds, relu, c) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.supported());
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { x86::dense_avx2(m, a, a_rs, b, &bias, adds, relu, c) }
        }
        _ => dense_generic(m, a, a_rs, b, &bias, adds, relu, c),
    }
}

/// `out[i] = Σ_kk a[i * a_rs + kk] · w[kk]` for `i < out.len()`: a one-wide layer (the output
/// layer of a ranking MLP) without bias or activation.
///
/// # Panics
/// If `a` is too short for `out.len()` rows of `w.len()` values with stride `a_rs`.
pub fn dot_rows(isa: Isa, a: &[f32], a_rs: usize, w: &[f32], out: &mut [f32]) {
    let (m, k) = (out.len(), w.len());
    if m == 0 {
        return;
    }
    assert!(a_rs >= k && a.len() >= (m - 1) * a_rs + k, "a too short");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(isa.supported());
            // SAFETY: the CPU has AVX-512F, checked just above.
            unsafe { x86::dot_rows_avx512(a, a_rs, w, out) }
        }
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => {
            assert!(isa.supported());
            // SAFETY: the CPU has AVX2 and FMA, checked just above.
            unsafe { x86::dot_rows_avx2(a, a_rs, w, out) }
        }
        _ => {
            for (i, o) in out.iter_mut().enumerate() {
                *o = dot(&a[i * a_rs..i * a_rs + k], w);
            }
        }
    }
}

/// A dot product with eight independent partial sums (vectorizable without reassociation).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (ca, cb) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for i in chunks..a.len() {
        sum += a[i] * b[i];
    }
    sum
}

/// Splits the output into register blocks: for each panel, blocks of up to `max_rows` rows.
/// `block(i0, rows, panel, p)` computes rows `i0..i0 + rows` against panel `p`.
#[inline(always)]
fn for_blocks(
    m: usize,
    b: &Packed,
    max_rows: usize,
    mut block: impl FnMut(usize, usize, &[Lane], usize),
) {
    let k = b.k;
    for p in 0..b.n.div_ceil(NR) {
        let panel = &b.lanes[p * k..(p + 1) * k];
        let mut i = 0;
        while i < m {
            let r = max_rows.min(m - i);
            block(i, r, panel, p);
            i += r;
        }
    }
}

/// The epilogue of one output row: `out[j] = act(acc[j] + (bias[j] + Σ scale · row[col0 + j]))`
/// for the first `out.len()` columns of a block (a panel, or half of one) starting at column
/// `col0`.
#[inline(always)]
fn finish_row(
    acc: &[f32],
    bias: &[f32],
    adds: &[(&[f32], f32)],
    col0: usize,
    relu: bool,
    out: &mut [f32],
) {
    for (j, ((o, &a), &b)) in out.iter_mut().zip(acc).zip(bias).enumerate() {
        let mut t = b;
        for &(row, scale) in adds {
            t += row[col0 + j] * scale;
        }
        let v = a + t;
        *o = if relu { v.max(0.0) } else { v };
    }
}

/// Portable kernel (no SIMD assumed): the reference the vector kernels are tested against.
#[allow(clippy::too_many_arguments)]
fn dense_generic<'b>(
    m: usize,
    a: &[f32],
    a_rs: usize,
    b: &Packed,
    bias: &impl Fn(usize) -> &'b [f32],
    adds: RowAdds<'_>,
    relu: bool,
    c: &mut [f32],
) {
    let (k, n) = (b.k, b.n);
    for_blocks(m, b, 1, |i, _, panel, p| {
        let row = &a[i * a_rs..i * a_rs + k];
        let mut acc = [0f32; NR];
        for (x, lane) in row.iter().zip(panel) {
            for (acc, w) in acc.iter_mut().zip(&lane.0) {
                *acc += x * w;
            }
        }
        let col0 = p * NR;
        let cols = NR.min(n - col0);
        finish_row(
            &acc,
            &bias(i)[col0..col0 + cols],
            adds.of(i),
            col0,
            relu,
            &mut c[i * n + col0..i * n + col0 + cols],
        );
    });
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! The vector kernels. Each keeps `R` rows x [`NR`] columns of accumulators in registers
    //! over the whole inner dimension: per inner index, the panel's lane is loaded once and
    //! every row's input is broadcast into fused multiply-adds.

    use std::arch::x86_64::*;

    use super::{finish_row, for_blocks, Lane, Packed, RowAdds, NR};

    /// Rows per block: 8 x 2 zmm accumulators.
    const MR_512: usize = 8;
    /// Rows per block of the AVX2 kernel: 6 rows x 2 ymm accumulators (16 columns).
    const MR_256: usize = 6;

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    pub(super) fn dense_avx512<'b>(
        m: usize,
        a: &[f32],
        a_rs: usize,
        b: &Packed,
        bias: &impl Fn(usize) -> &'b [f32],
        adds: RowAdds<'_>,
        relu: bool,
        c: &mut [f32],
    ) {
        let (k, n) = (b.k, b.n);
        for_blocks(m, b, MR_512, |i0, rows, panel, p| {
            let col0 = p * NR;
            let cols = NR.min(n - col0);
            // The next block's added rows (after a panel's last block, the first block's in
            // the next panel): two lines of each.
            if i0 + rows < m {
                prefetch_adds(&adds, i0 + rows..(i0 + 2 * rows).min(m), col0, NR);
            } else if col0 + NR < n {
                prefetch_adds(&adds, 0..MR_512.min(m), col0 + NR, NR);
            }
            macro_rules! go {
                ($r:literal) => {{
                    let acc = block512::<$r>(a, a_rs, i0, k, panel);
                    for (r, acc) in acc.iter().enumerate() {
                        let i = i0 + r;
                        let out = &mut c[i * n + col0..i * n + col0 + cols];
                        let bias = &bias(i)[col0..col0 + cols];
                        store512(acc, bias, adds.of(i), col0, relu, out);
                    }
                }};
            }
            match rows {
                8 => go!(8),
                7 => go!(7),
                6 => go!(6),
                5 => go!(5),
                4 => go!(4),
                3 => go!(3),
                2 => go!(2),
                _ => go!(1),
            }
        });
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn block512<const R: usize>(
        a: &[f32],
        a_rs: usize,
        i0: usize,
        k: usize,
        panel: &[Lane],
    ) -> [[__m512; 2]; R] {
        // The rows' starts, each with `k` readable values (sliced here, so a short `a` panics
        // before any unchecked read).
        let rows: [*const f32; R] = std::array::from_fn(|r| a[(i0 + r) * a_rs..][..k].as_ptr());
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        for (kk, lane) in panel[..k].iter().enumerate() {
            // SAFETY: a lane is NR = 32 floats, 64-byte aligned: two full vectors.
            let (w0, w1) = unsafe {
                let ptr = lane.0.as_ptr();
                (_mm512_load_ps(ptr), _mm512_load_ps(ptr.add(16)))
            };
            for r in 0..R {
                // SAFETY: kk < k, and row r has k values from rows[r].
                let x = _mm512_set1_ps(unsafe { *rows[r].add(kk) });
                acc[r][0] = _mm512_fmadd_ps(x, w0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(x, w1, acc[r][1]);
            }
        }
        acc
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    fn store512(
        acc: &[__m512; 2],
        bias: &[f32],
        adds: &[(&[f32], f32)],
        col0: usize,
        relu: bool,
        out: &mut [f32],
    ) {
        if out.len() == NR && bias.len() == NR {
            for (h, acc) in acc.iter().enumerate() {
                // SAFETY: `bias` and `out` hold NR = 32 floats: two full unaligned vectors, and
                // so does each added row's slice from `col0`.
                unsafe {
                    let mut t = _mm512_loadu_ps(bias.as_ptr().add(16 * h));
                    for &(row, scale) in adds {
                        let row = &row[col0..col0 + NR];
                        let x = _mm512_loadu_ps(row.as_ptr().add(16 * h));
                        t = _mm512_fmadd_ps(x, _mm512_set1_ps(scale), t);
                    }
                    let mut v = _mm512_add_ps(*acc, t);
                    if relu {
                        v = _mm512_max_ps(v, _mm512_setzero_ps());
                    }
                    _mm512_storeu_ps(out.as_mut_ptr().add(16 * h), v);
                }
            }
        } else {
            let mut tmp = [0f32; NR];
            // SAFETY: `tmp` holds NR = 32 floats: two full unaligned vectors.
            unsafe {
                _mm512_storeu_ps(tmp.as_mut_ptr(), acc[0]);
                _mm512_storeu_ps(tmp.as_mut_ptr().add(16), acc[1]);
            }
            finish_row(&tmp, bias, adds, col0, relu, out);
        }
    }

    /// [`super::dot_rows`] in 8-wide FMA vectors, two accumulators, scalar tail.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dot_rows_avx2(a: &[f32], a_rs: usize, w: &[f32], out: &mut [f32]) {
        let k = w.len();
        let full = k / 16 * 16;
        let eight = k / 8 * 8;
        for (i, o) in out.iter_mut().enumerate() {
            let row = &a[i * a_rs..i * a_rs + k];
            let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            for kk in (0..full).step_by(16) {
                // SAFETY: `kk + 16 <= full <= k`: every load lies inside `row` and `w`.
                unsafe {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(row.as_ptr().add(kk)),
                        _mm256_loadu_ps(w.as_ptr().add(kk)),
                        acc0,
                    );
                    acc1 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(row.as_ptr().add(kk + 8)),
                        _mm256_loadu_ps(w.as_ptr().add(kk + 8)),
                        acc1,
                    );
                }
            }
            if full < eight {
                // SAFETY: `full + 8 <= eight <= k`: both loads lie inside `row` and `w`.
                unsafe {
                    acc0 = _mm256_fmadd_ps(
                        _mm256_loadu_ps(row.as_ptr().add(full)),
                        _mm256_loadu_ps(w.as_ptr().add(full)),
                        acc0,
                    );
                }
            }
            let acc = _mm256_add_ps(acc0, acc1);
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds exactly 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
            let mut sum: f32 = lanes.iter().sum();
            for kk in eight..k {
                sum += row[kk] * w[kk];
            }
            *o = sum;
        }
    }

    #[target_feature(enable = "avx512f")]
    pub(super) fn dot_rows_avx512(a: &[f32], a_rs: usize, w: &[f32], out: &mut [f32]) {
        let k = w.len();
        let full = k / 16 * 16;
        // Lanes of the last, partial vector.
        let tail: __mmask16 = ((1u32 << (k - full)) - 1) as __mmask16;
        for (i, o) in out.iter_mut().enumerate() {
            let row = &a[i * a_rs..i * a_rs + k];
            let mut acc = _mm512_setzero_ps();
            for kk in (0..full).step_by(16) {
                // SAFETY: `kk + 16 <= full <= k`: both loads lie inside `row` and `w`.
                unsafe {
                    acc = _mm512_fmadd_ps(
                        _mm512_loadu_ps(row.as_ptr().add(kk)),
                        _mm512_loadu_ps(w.as_ptr().add(kk)),
                        acc,
                    );
                }
            }
            if full < k {
                // SAFETY: masked loads read only the `k - full` lanes inside `row` and `w`.
                unsafe {
                    acc = _mm512_fmadd_ps(
                        _mm512_maskz_loadu_ps(tail, row.as_ptr().add(full)),
                        _mm512_maskz_loadu_ps(tail, w.as_ptr().add(full)),
                        acc,
                    );
                }
            }
            *o = _mm512_reduce_add_ps(acc);
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn dense_avx2<'b>(
        m: usize,
        a: &[f32],
        a_rs: usize,
        b: &Packed,
        bias: &impl Fn(usize) -> &'b [f32],
        adds: RowAdds<'_>,
        relu: bool,
        c: &mut [f32],
    ) {
        // Each 32-column panel in two halves of 16 columns, each half in blocks of 6 rows:
        // 6 x 2 ymm accumulators, 2 weight vectors and a broadcast fit the 16 ymm registers, and
        // 12 independent FMA chains cover the FMA latency of both ports (the 2 x 32 block of 8
        // chains did not).
        let (k, n) = (b.k, b.n);
        for p in 0..n.div_ceil(NR) {
            let panel = &b.lanes[p * k..(p + 1) * k];
            let col0 = p * NR;
            let cols = NR.min(n - col0);
            for half in 0..cols.div_ceil(HALF) {
                let c0 = col0 + half * HALF;
                let width = HALF.min(cols - half * HALF);
                let mut i0 = 0;
                while i0 < m {
                    let rows = MR_256.min(m - i0);
                    // The next block's added rows (after the last block of a half, the first
                    // block's in the next half).
                    if i0 + rows < m {
                        prefetch_adds(&adds, i0 + rows..(i0 + 2 * rows).min(m), c0, HALF);
                    } else if c0 + HALF < n {
                        prefetch_adds(&adds, 0..MR_256.min(m), c0 + HALF, HALF);
                    }
                    macro_rules! go {
                        ($r:literal) => {{
                            let acc = block256::<$r>(a, a_rs, i0, k, panel, half);
                            for (r, acc) in acc.iter().enumerate() {
                                let i = i0 + r;
                                if width == HALF {
                                    // A full half: bias and ReLU in registers, stored in place.
                                    let bias = &bias(i)[c0..c0 + HALF];
                                    let out = &mut c[i * n + c0..i * n + c0 + HALF];
                                    // SAFETY: `bias` and `out` hold HALF = 16 floats: two
                                    // full vectors at 0 and 8, and so does each added row's
                                    // slice from `c0`.
                                    unsafe {
                                        let mut t = [
                                            _mm256_loadu_ps(bias.as_ptr()),
                                            _mm256_loadu_ps(bias.as_ptr().add(8)),
                                        ];
                                        // Each added row's line once, both vectors from it.
                                        for &(row, scale) in adds.of(i) {
                                            let row = &row[c0..c0 + HALF];
                                            let scale = _mm256_set1_ps(scale);
                                            for (h, t) in t.iter_mut().enumerate() {
                                                let x = _mm256_loadu_ps(row.as_ptr().add(8 * h));
                                                *t = _mm256_fmadd_ps(x, scale, *t);
                                            }
                                        }
                                        for (h, (v, t)) in acc.iter().zip(t).enumerate() {
                                            let mut v = _mm256_add_ps(*v, t);
                                            if relu {
                                                v = _mm256_max_ps(v, _mm256_setzero_ps());
                                            }
                                            _mm256_storeu_ps(out.as_mut_ptr().add(8 * h), v);
                                        }
                                    }
                                    continue;
                                }
                                let mut tmp = [0f32; HALF];
                                for (h, v) in acc.iter().enumerate() {
                                    // SAFETY: `tmp` holds 16 floats: two full vectors.
                                    unsafe { _mm256_storeu_ps(tmp.as_mut_ptr().add(8 * h), *v) };
                                }
                                finish_row(
                                    &tmp,
                                    &bias(i)[c0..c0 + width],
                                    adds.of(i),
                                    c0,
                                    relu,
                                    &mut c[i * n + c0..i * n + c0 + width],
                                );
                            }
                        }};
                    }
                    match rows {
                        6 => go!(6),
                        5 => go!(5),
                        4 => go!(4),
                        3 => go!(3),
                        2 => go!(2),
                        _ => go!(1),
                    }
                    i0 += rows;
                }
            }
        }
    }

    /// Half a panel's columns.
    const HALF: usize = NR / 2;

    /// Asks for the cache lines of columns `col0..col0 + width` of every row added to the
    /// output rows `rows` (a block's: the next one's are asked for while this one computes, so
    /// that the lines of rows read from L3 or memory arrive under the block's multiply-adds).
    #[inline(always)]
    fn prefetch_adds(adds: &RowAdds<'_>, rows: std::ops::Range<usize>, col0: usize, width: usize) {
        if adds.starts.is_empty() {
            return;
        }
        for i in rows {
            for &(row, _) in adds.of(i) {
                // A line per 16 floats from `col0`, here rather than through the slice-based
                // `cpu::prefetch`, which measured 7% slower at 200 and 1,000 items.
                for x in (col0..col0 + width).step_by(16).filter_map(|j| row.get(j)) {
                    // SAFETY: a prefetch reads nothing; the address is inside `row`.
                    unsafe { _mm_prefetch::<_MM_HINT_T0>((x as *const f32).cast()) };
                }
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn block256<const R: usize>(
        a: &[f32],
        a_rs: usize,
        i0: usize,
        k: usize,
        panel: &[Lane],
        half: usize,
    ) -> [[__m256; 2]; R] {
        // The rows' starts: each row has `k` readable values from there (`dense` asserted
        // `a` covers `m` rows of stride `a_rs >= k`).
        let rows: [*const f32; R] = std::array::from_fn(|r| a[(i0 + r) * a_rs..][..k].as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let w0 = HALF * half;
        for (kk, lane) in panel[..k].iter().enumerate() {
            // SAFETY: a lane is NR = 32 floats, 64-byte aligned; `half` is 0 or 1, so the two
            // vectors at 16 * half and 16 * half + 8 are full and 32-byte aligned.
            let w: [__m256; 2] =
                std::array::from_fn(|h| unsafe { _mm256_load_ps(lane.0.as_ptr().add(w0 + 8 * h)) });
            for r in 0..R {
                // SAFETY: kk < k, and row r has k values from rows[r] (sliced above).
                let x = unsafe { _mm256_broadcast_ss(&*rows[r].add(kk)) };
                for h in 0..2 {
                    acc[r][h] = _mm256_fmadd_ps(x, w[h], acc[r][h]);
                }
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: &[f32],
        w: &[f32],
        bias: &[f32],
        relu: bool,
    ) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = f64::from(bias[j]);
                for kk in 0..k {
                    s += f64::from(a[i * k + kk]) * f64::from(w[j * k + kk]);
                }
                c[i * n + j] = if relu { s.max(0.0) as f32 } else { s as f32 };
            }
        }
        c
    }

    #[test]
    fn every_isa_matches_a_plain_loop_on_odd_shapes() {
        for isa in Isa::available() {
            for &(m, k, n) in &[
                (1, 1, 1),
                (5, 0, 40),
                (7, 5, 3),
                (8, 33, 32),
                (9, 64, 65),
                (23, 17, 100),
                (200, 40, 256),
            ] {
                let a: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.1)
                    .collect();
                let w: Vec<f32> = (0..n * k)
                    .map(|i| ((i * 11) % 19) as f32 * 0.05 - 0.45)
                    .collect();
                let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01 - 0.3).collect();
                let packed = Packed::from_out_in(&w, n, k);
                for relu in [false, true] {
                    let want = naive(m, k, n, &a, &w, &bias, relu);
                    let mut c = vec![f32::NAN; m * n];
                    dense(isa, m, &a, k, &packed, |_| &bias, relu, &mut c);
                    for (x, y) in c.iter().zip(&want) {
                        assert!((x - y).abs() < 1e-4, "{isa:?} {m}x{k}x{n}: {x} vs {y}");
                    }
                }
            }
        }
    }

    #[test]
    fn added_rows_join_the_bias_on_every_isa() {
        // Shapes with full and partial panels and halves, blocks of every height; rows with no,
        // one and three added rows, scaled and not.
        for &(m, k, n) in &[(1, 3, 16), (7, 5, 40), (13, 17, 64), (20, 9, 100)] {
            let a: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7) % 13) as f32 * 0.1 - 0.6)
                .collect();
            let w: Vec<f32> = (0..n * k)
                .map(|i| ((i * 5) % 11) as f32 * 0.1 - 0.5)
                .collect();
            let packed = Packed::from_out_in(&w, n, k);
            let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.02 - 0.4).collect();
            let table: Vec<f32> = (0..4 * n)
                .map(|i| ((i * 3) % 17) as f32 * 0.05 - 0.4)
                .collect();
            let row = |r: usize| &table[r * n..(r + 1) * n];
            let mut starts = vec![0u32];
            let mut rows = Vec::new();
            for i in 0..m {
                match i % 3 {
                    0 => {}
                    1 => rows.push((row(i % 4), 1.0)),
                    _ => {
                        for r in 0..3 {
                            rows.push((row((i + r) % 4), 1.0 / 3.0));
                        }
                    }
                }
                starts.push(rows.len() as u32);
            }
            let adds = RowAdds {
                starts: &starts,
                rows: &rows,
            };
            for isa in Isa::available() {
                for relu in [false, true] {
                    let mut c = vec![f32::NAN; m * n];
                    dense_plus(isa, m, &a, k, &packed, |_| &bias, adds, relu, &mut c);
                    for i in 0..m {
                        let (s, e) = (starts[i] as usize, starts[i + 1] as usize);
                        for j in 0..n {
                            let mut want: f32 = bias[j]
                                + (0..k).map(|kk| a[i * k + kk] * w[j * k + kk]).sum::<f32>();
                            want += rows[s..e].iter().map(|(r, x)| r[j] * x).sum::<f32>();
                            if relu {
                                want = want.max(0.0);
                            }
                            let got = c[i * n + j];
                            assert!(
                                (got - want).abs() < 1e-4,
                                "{isa:?} {m}x{k}x{n} ({i},{j}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn dot_rows_matches_a_plain_loop() {
        for isa in Isa::available() {
            for &(m, k, rs) in &[
                (1, 1, 1),
                (3, 15, 20),
                (5, 16, 16),
                (7, 33, 40),
                (200, 128, 128),
            ] {
                let a: Vec<f32> = (0..m * rs)
                    .map(|i| ((i * 13) % 17) as f32 * 0.1 - 0.8)
                    .collect();
                let w: Vec<f32> = (0..k).map(|i| (i % 7) as f32 * 0.3 - 0.9).collect();
                let mut out = vec![f32::NAN; m];
                dot_rows(isa, &a, rs, &w, &mut out);
                for (i, o) in out.iter().enumerate() {
                    let want: f32 = (0..k).map(|kk| a[i * rs + kk] * w[kk]).sum();
                    assert!((o - want).abs() < 1e-4, "{isa:?} {m}x{k}: {o} vs {want}");
                }
            }
        }
    }

    #[test]
    fn row_stride_and_per_row_bias_are_honoured() {
        let (m, k, n, rs) = (11, 6, 40, 9);
        let a: Vec<f32> = (0..m * rs).map(|i| (i % 7) as f32 - 3.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 5) as f32 * 0.5 - 1.0).collect();
        let biases: Vec<Vec<f32>> = (0..m).map(|i| vec![i as f32; n]).collect();
        let packed = Packed::from_out_in(&w, n, k);
        for isa in Isa::available() {
            let mut c = vec![0f32; m * n];
            dense(isa, m, &a, rs, &packed, |i| &biases[i], false, &mut c);
            for i in 0..m {
                for j in 0..n {
                    let s: f32 =
                        (0..k).map(|kk| a[i * rs + kk] * w[j * k + kk]).sum::<f32>() + i as f32;
                    assert!((c[i * n + j] - s).abs() < 1e-4, "{isa:?} ({i},{j})");
                }
            }
        }
    }
}
