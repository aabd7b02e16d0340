//! What a training device does: buffers, copies and the operations of a training step, and
//! [`HostDevice`], which runs them on the host.
//!
//! The step ([`super::replica`]) is written once against [`Device`]; the CUDA executor
//! ([`super::cuda`]) runs each operation as a kernel of ours or a cuBLAS call, and the host
//! executor runs it as the loops below. The host executor is the operations' contract: the
//! tests compare a step on it with [`crate::model::CpuCompute`] on every machine, and the same
//! tests run on real GPUs where there are any. Keep the kernels and these loops in step.
//!
//! Matrices are row-major. Every operation either overwrites its output or says that it adds.

use std::fmt;

/// What went wrong on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceError(pub String);

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Shorthand.
pub type DResult<T = ()> = Result<T, DeviceError>;

/// `C[m×n] = op(A)[m×k] · op(B)[k×n] + beta · C`, row-major with leading dimensions: `ta`: A is
/// stored `[k×m]`, `tb`: B is stored `[n×k]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gemm {
    /// Rows of C.
    pub m: usize,
    /// Columns of C.
    pub n: usize,
    /// The inner dimension.
    pub k: usize,
    /// A transposed.
    pub ta: bool,
    /// B transposed.
    pub tb: bool,
    /// Leading dimensions (row strides).
    pub lda: usize,
    /// See `lda`.
    pub ldb: usize,
    /// See `lda`.
    pub ldc: usize,
    /// 0: overwrite C; 1: add to it.
    pub beta: f32,
}

impl Gemm {
    /// `C = A Bᵀ`: A `[m×k]`, B `[n×k]` (a layer's forward product), packed.
    pub fn nt(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            m,
            n,
            k,
            ta: false,
            tb: true,
            lda: k,
            ldb: k,
            ldc: n,
            beta: 0.0,
        }
    }

    /// `C = Aᵀ B`: A `[k×m]`, B `[k×n]` (a weight gradient), packed.
    pub fn tn(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            ta: true,
            tb: false,
            lda: m,
            ldb: n,
            ..Gemm::nt(m, n, k)
        }
    }

    /// `C = A B`: A `[m×k]`, B `[k×n]` (an input gradient), packed.
    pub fn nn(m: usize, n: usize, k: usize) -> Gemm {
        Gemm {
            tb: false,
            ldb: n,
            ..Gemm::nt(m, n, k)
        }
    }

    /// With B's rows `ldb` apart (B read as the first columns of a wider matrix).
    pub fn ldb(self, ldb: usize) -> Gemm {
        Gemm { ldb, ..self }
    }

    /// With C's rows `ldc` apart (C written as the first columns of a wider matrix).
    pub fn ldc(self, ldc: usize) -> Gemm {
        Gemm { ldc, ..self }
    }

    /// Adding to C.
    pub fn add(self) -> Gemm {
        Gemm { beta: 1.0, ..self }
    }
}

/// Sum or mean pooling of one table into columns `col..col + dim` of the `n × width` input:
/// example `b` pools the rows `ids[offsets[b]..offsets[b + 1]]` of `table` (`dim` wide).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool {
    /// Examples.
    pub n: usize,
    /// Row width of the input.
    pub width: usize,
    /// First column.
    pub col: usize,
    /// Table width.
    pub dim: usize,
    /// Mean (else sum); a mean over one row or none is that row or zeros.
    pub mean: bool,
}

/// A segmented reduction, the sparse gradient of a table: for every pulled row `u`,
/// `out[u][d] = Σ scale[j] · src[ex[j] · width + col + d]` over `j` in
/// `occ[offsets[u]..offsets[u + 1]]`, in that order (deterministic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Rows.
    pub rows: usize,
    /// Their width.
    pub dim: usize,
    /// Row width of the source.
    pub width: usize,
    /// First source column.
    pub col: usize,
}

/// Whose labels a loss reads: example `b`'s label at `labels[b · stride + at]` (a multi-task
/// model's head `at` of `stride`; NaN: no label, no loss and no gradient), and the head's
/// weight in the loss.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Head {
    /// Labels per example.
    pub stride: usize,
    /// This head's.
    pub at: usize,
    /// Its weight.
    pub weight: f32,
}

impl Head {
    /// A single-task model's.
    pub const ONE: Head = Head {
        stride: 1,
        at: 0,
        weight: 1.0,
    };
}

/// Adam's constants for one tensor at one step (see `model::adam`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamStep {
    /// `1 - β1^t`.
    pub c1: f32,
    /// `1 - β2^t`.
    pub c2: f32,
    /// The learning rate at that step.
    pub lr: f32,
    /// L2 penalty (0 for biases).
    pub l2: f32,
}

/// A training device: f32 and u32 buffers and the step's operations on them. Operations may
/// run asynchronously; [`Device::get`] waits for everything queued before it.
pub trait Device {
    /// A buffer of floats on the device.
    type F;
    /// A buffer of 32-bit words on the device.
    type U;

    /// For logs: `cuda:0 (NVIDIA H200)`, `emulated:1`.
    fn name(&self) -> String;
    /// A zeroed buffer.
    fn zeros(&mut self, len: usize) -> DResult<Self::F>;
    /// An empty word buffer.
    fn words(&mut self) -> DResult<Self::U>;
    /// Copies `src` to the start of `dst`, growing it first when it is too short.
    fn put(&mut self, dst: &mut Self::F, src: &[f32]) -> DResult;
    /// Copies `src` to the start of `dst`, growing it first when it is too short.
    fn put_u32(&mut self, dst: &mut Self::U, src: &[u32]) -> DResult;
    /// Makes `buf` at least `len` long (contents unspecified after growing).
    fn ensure(&mut self, buf: &mut Self::F, len: usize) -> DResult;
    /// Copies the first `out.len()` values of `src` to `out`, after every queued operation.
    fn get(&mut self, src: &Self::F, out: &mut [f32]) -> DResult;
    /// Zeroes the first `len` values.
    fn zero(&mut self, buf: &mut Self::F, len: usize) -> DResult;
    /// The matrix product [`Gemm`].
    fn gemm(&mut self, g: Gemm, a: &Self::F, b: &Self::F, c: &mut Self::F) -> DResult;
    /// [`Pool`]: overwrites the table's columns of `x`.
    fn pool(
        &mut self,
        p: Pool,
        offsets: &Self::U,
        ids: &Self::U,
        table: &Self::F,
        x: &mut Self::F,
    ) -> DResult;
    /// `x[b][col] = src[at + b]` for `b < n` (a dense input into the `n × width` input).
    fn set_col(
        &mut self,
        x: &mut Self::F,
        n: usize,
        width: usize,
        col: usize,
        src: &Self::F,
        at: usize,
    ) -> DResult;
    /// `h[b][o] += bias[o]`, then `max(h, 0)` when `relu`.
    fn bias_act(
        &mut self,
        h: &mut Self::F,
        n: usize,
        out: usize,
        bias: &Self::F,
        relu: bool,
    ) -> DResult;
    /// `acc[b] += Σ w[ids[i]]` over `i` in `offsets[b]..offsets[b + 1]` (wide weights).
    fn add_rows(
        &mut self,
        acc: &mut Self::F,
        n: usize,
        offsets: &Self::U,
        ids: &Self::U,
        w: &Self::F,
    ) -> DResult;
    /// `dst[i] = src[i] + add` for `i < n`.
    fn copy_add(&mut self, dst: &mut Self::F, src: &Self::F, n: usize, add: f32) -> DResult;
    /// `dst[i] += src[i]` for `i < n`.
    fn add(&mut self, dst: &mut Self::F, src: &Self::F, n: usize) -> DResult;
    /// The FM term: for each example, `s = Σ_f e_f` over the fields whose first columns of the
    /// `n × width` input are `cols` (each `dim` wide), kept in `sum` (`n × dim`), and
    /// `logits[b] += ½ (|s|² - Σ_f |e_f|²)`.
    #[allow(clippy::too_many_arguments)]
    fn fm_forward(
        &mut self,
        logits: &mut Self::F,
        sum: &mut Self::F,
        x: &Self::F,
        n: usize,
        width: usize,
        cols: &Self::U,
        fields: usize,
        dim: usize,
    ) -> DResult;
    /// Its gradient: `dx[b][c + d] += dlogit[b] · (sum[b][d] - x[b][c + d])` for each field's
    /// first column `c`.
    #[allow(clippy::too_many_arguments)]
    fn fm_backward(
        &mut self,
        dx: &mut Self::F,
        x: &Self::F,
        sum: &Self::F,
        dlogit: &Self::F,
        n: usize,
        width: usize,
        cols: &Self::U,
        fields: usize,
        dim: usize,
    ) -> DResult;
    /// The log loss of `n` logits against `head`'s labels: each example's loss (`w ·` the stable
    /// form `log(1 + e^-|z|) + max(z, 0) - y z`) into `loss` and `w (σ(z) - y) · scale` into
    /// `dlogit`; both 0 where the label is NaN.
    #[allow(clippy::too_many_arguments)]
    fn loss_grad(
        &mut self,
        logits: &Self::F,
        labels: &Self::F,
        head: Head,
        n: usize,
        scale: f32,
        dlogit: &mut Self::F,
        loss: &mut Self::F,
    ) -> DResult;
    /// The softmax of each of the `n` rows of `x` (`k` wide), in place (max subtracted first).
    fn softmax_rows(&mut self, x: &mut Self::F, n: usize, k: usize) -> DResult;
    /// `dst[b][j] += p[b][e] · src[b][j]` (`p` is `n × k`, `dst` and `src` `n × width`): an
    /// expert's share of a gated mixture, or of its gradient.
    #[allow(clippy::too_many_arguments)]
    fn axpy_rows(
        &mut self,
        dst: &mut Self::F,
        p: &Self::F,
        e: usize,
        k: usize,
        src: &Self::F,
        n: usize,
        width: usize,
    ) -> DResult;
    /// `ds[b][e] = Σ_j a[b][j] · c[b][j]` (`ds` is `n × k`).
    #[allow(clippy::too_many_arguments)]
    fn row_dot(
        &mut self,
        ds: &mut Self::F,
        e: usize,
        k: usize,
        a: &Self::F,
        c: &Self::F,
        n: usize,
        width: usize,
    ) -> DResult;
    /// Through a softmax: `da[b][e] = p[b][e] · (ds[b][e] - Σ_f p[b][f] ds[b][f])`.
    fn softmax_back(
        &mut self,
        da: &mut Self::F,
        p: &Self::F,
        ds: &Self::F,
        n: usize,
        k: usize,
    ) -> DResult;
    /// `dst[o] = Σ_b src[b][o]` (rows in order).
    fn col_sum(&mut self, src: &Self::F, n: usize, width: usize, dst: &mut Self::F) -> DResult;
    /// Through a ReLU and inverted dropout: `dz[i] = h[i] > 0 ? dh[i] · keep : 0` for `i < len`
    /// (`h` after the dropout: a dropped unit is 0; `keep` is 1 without dropout).
    fn relu_back(
        &mut self,
        dz: &mut Self::F,
        dh: &Self::F,
        h: &Self::F,
        len: usize,
        keep: f32,
    ) -> DResult;
    /// `dst[i] *= src[i]` for `i < len` (a dropout mask).
    fn mul(&mut self, dst: &mut Self::F, src: &Self::F, len: usize) -> DResult;
    /// Batch normalization of the `n × out` pre-activations `h` in training, then the ReLU: per
    /// column the batch's mean and variance (rows in order, divided by `n`), `inv = 1 /
    /// sqrt(var + 1e-5)`, `xhat = (h - mean) · inv`, `h = max(γ · xhat + β, 0)`; keeps `xhat`
    /// and `inv`, and writes `mean · weight` and `var · weight` to `stats` (`[mean | var]`).
    #[allow(clippy::too_many_arguments)]
    fn bn_forward(
        &mut self,
        h: &mut Self::F,
        xhat: &mut Self::F,
        inv: &mut Self::F,
        stats: &mut Self::F,
        gamma: &Self::F,
        beta: &Self::F,
        n: usize,
        out: usize,
        weight: f32,
    ) -> DResult;
    /// Its gradient, in place on `dz` (the gradient of the normalized output): per column
    /// `dγ = Σ dz · xhat`, `dβ = Σ dz` (overwritten), and `dz = inv / n · (n · dz · γ - Σ dz · γ
    /// - xhat · Σ dz · γ · xhat)`.
    #[allow(clippy::too_many_arguments)]
    fn bn_backward(
        &mut self,
        dz: &mut Self::F,
        xhat: &Self::F,
        inv: &Self::F,
        gamma: &Self::F,
        dgamma: &mut Self::F,
        dbeta: &mut Self::F,
        n: usize,
        out: usize,
    ) -> DResult;
    /// A cross layer's output: `next[i] = xl[i] + x0[i] · t[i]` for `i < len`.
    fn cross_mix(
        &mut self,
        next: &mut Self::F,
        xl: &Self::F,
        x0: &Self::F,
        t: &Self::F,
        len: usize,
    ) -> DResult;
    /// Its gradient: `dt[i] = g[i] · x0[i]` and `dx0[i] += g[i] · t[i]` for `i < len`.
    fn cross_back(
        &mut self,
        dt: &mut Self::F,
        dx0: &mut Self::F,
        g: &Self::F,
        x0: &Self::F,
        t: &Self::F,
        len: usize,
    ) -> DResult;
    /// [`Seg`]: overwrites `out` (`rows × dim`).
    #[allow(clippy::too_many_arguments)]
    fn seg_reduce(
        &mut self,
        s: Seg,
        offsets: &Self::U,
        ex: &Self::U,
        scale: &Self::F,
        src: &Self::F,
        out: &mut Self::F,
    ) -> DResult;
    /// Adam on `len` parameters (as `model::adam`).
    fn adam(
        &mut self,
        a: AdamStep,
        w: &mut Self::F,
        g: &Self::F,
        m: &mut Self::F,
        v: &mut Self::F,
        len: usize,
    ) -> DResult;
    /// Sums every listed buffer's first `len` values over all devices, leaving the sums on every
    /// one (NCCL's all-reduce on GPUs): per device, in rank order, the device and its buffers,
    /// the same list on each.
    #[allow(clippy::type_complexity)]
    fn all_reduce(group: &mut [(&mut Self, Vec<(&mut Self::F, usize)>)]) -> DResult
    where
        Self: Sized;
}

/// The host executor: buffers are vectors, operations are loops. An emulated device
/// (`device = "emulated:N"`) is one of these.
#[derive(Debug)]
pub struct HostDevice {
    index: usize,
}

impl HostDevice {
    /// Emulated device `index`.
    pub fn new(index: usize) -> HostDevice {
        HostDevice { index }
    }
}

fn grow<T: Default + Clone>(v: &mut Vec<T>, len: usize) {
    if v.len() < len {
        v.resize(len, T::default());
    }
}

impl Device for HostDevice {
    type F = Vec<f32>;
    type U = Vec<u32>;

    fn name(&self) -> String {
        format!("emulated:{}", self.index)
    }

    fn zeros(&mut self, len: usize) -> DResult<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn words(&mut self) -> DResult<Vec<u32>> {
        Ok(Vec::new())
    }

    fn put(&mut self, dst: &mut Vec<f32>, src: &[f32]) -> DResult {
        grow(dst, src.len());
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn put_u32(&mut self, dst: &mut Vec<u32>, src: &[u32]) -> DResult {
        grow(dst, src.len());
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }

    fn ensure(&mut self, buf: &mut Vec<f32>, len: usize) -> DResult {
        grow(buf, len);
        Ok(())
    }

    fn get(&mut self, src: &Vec<f32>, out: &mut [f32]) -> DResult {
        let n = out.len();
        out.copy_from_slice(&src[..n]);
        Ok(())
    }

    fn zero(&mut self, buf: &mut Vec<f32>, len: usize) -> DResult {
        buf[..len].fill(0.0);
        Ok(())
    }

    fn gemm(&mut self, g: Gemm, a: &Vec<f32>, b: &Vec<f32>, c: &mut Vec<f32>) -> DResult {
        // Row by row of C, the inner dimension ascending for every element.
        let mut acc = vec![0f32; g.n];
        for i in 0..g.m {
            acc.fill(0.0);
            for p in 0..g.k {
                let av = if g.ta {
                    a[p * g.lda + i]
                } else {
                    a[i * g.lda + p]
                };
                if g.tb {
                    for (j, s) in acc.iter_mut().enumerate() {
                        *s += av * b[j * g.ldb + p];
                    }
                } else {
                    let row = &b[p * g.ldb..p * g.ldb + g.n];
                    acc.iter_mut().zip(row).for_each(|(s, bv)| *s += av * bv);
                }
            }
            let crow = &mut c[i * g.ldc..i * g.ldc + g.n];
            for (cv, s) in crow.iter_mut().zip(&acc) {
                *cv = if g.beta == 0.0 { *s } else { g.beta * *cv + s };
            }
        }
        Ok(())
    }

    fn pool(
        &mut self,
        p: Pool,
        offsets: &Vec<u32>,
        ids: &Vec<u32>,
        table: &Vec<f32>,
        x: &mut Vec<f32>,
    ) -> DResult {
        for b in 0..p.n {
            let (from, to) = (offsets[b] as usize, offsets[b + 1] as usize);
            let dst = &mut x[b * p.width + p.col..b * p.width + p.col + p.dim];
            dst.fill(0.0);
            for &id in &ids[from..to] {
                let row = &table[id as usize * p.dim..(id as usize + 1) * p.dim];
                dst.iter_mut().zip(row).for_each(|(d, v)| *d += v);
            }
            if p.mean && to - from > 1 {
                let c = (to - from) as f32;
                dst.iter_mut().for_each(|d| *d /= c);
            }
        }
        Ok(())
    }

    fn set_col(
        &mut self,
        x: &mut Vec<f32>,
        n: usize,
        width: usize,
        col: usize,
        src: &Vec<f32>,
        at: usize,
    ) -> DResult {
        for b in 0..n {
            x[b * width + col] = src[at + b];
        }
        Ok(())
    }

    fn bias_act(
        &mut self,
        h: &mut Vec<f32>,
        n: usize,
        out: usize,
        bias: &Vec<f32>,
        relu: bool,
    ) -> DResult {
        for row in h[..n * out].chunks_exact_mut(out) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
                if relu {
                    *v = v.max(0.0);
                }
            }
        }
        Ok(())
    }

    fn add_rows(
        &mut self,
        acc: &mut Vec<f32>,
        n: usize,
        offsets: &Vec<u32>,
        ids: &Vec<u32>,
        w: &Vec<f32>,
    ) -> DResult {
        for (b, a) in acc[..n].iter_mut().enumerate() {
            for &id in &ids[offsets[b] as usize..offsets[b + 1] as usize] {
                *a += w[id as usize];
            }
        }
        Ok(())
    }

    fn copy_add(&mut self, dst: &mut Vec<f32>, src: &Vec<f32>, n: usize, add: f32) -> DResult {
        for (d, s) in dst[..n].iter_mut().zip(src) {
            *d = s + add;
        }
        Ok(())
    }

    fn add(&mut self, dst: &mut Vec<f32>, src: &Vec<f32>, n: usize) -> DResult {
        for (d, s) in dst[..n].iter_mut().zip(src) {
            *d += s;
        }
        Ok(())
    }

    fn fm_forward(
        &mut self,
        logits: &mut Vec<f32>,
        sum: &mut Vec<f32>,
        x: &Vec<f32>,
        n: usize,
        width: usize,
        cols: &Vec<u32>,
        fields: usize,
        dim: usize,
    ) -> DResult {
        for b in 0..n {
            let s = &mut sum[b * dim..(b + 1) * dim];
            s.fill(0.0);
            let mut sq = 0f32;
            for &c in &cols[..fields] {
                let v = &x[b * width + c as usize..b * width + c as usize + dim];
                for (a, x) in s.iter_mut().zip(v) {
                    *a += x;
                    sq += x * x;
                }
            }
            let total: f32 = s.iter().map(|v| v * v).sum();
            logits[b] += 0.5 * (total - sq);
        }
        Ok(())
    }

    fn fm_backward(
        &mut self,
        dx: &mut Vec<f32>,
        x: &Vec<f32>,
        sum: &Vec<f32>,
        dlogit: &Vec<f32>,
        n: usize,
        width: usize,
        cols: &Vec<u32>,
        fields: usize,
        dim: usize,
    ) -> DResult {
        for b in 0..n {
            for &c in &cols[..fields] {
                for d in 0..dim {
                    let at = b * width + c as usize + d;
                    dx[at] += dlogit[b] * (sum[b * dim + d] - x[at]);
                }
            }
        }
        Ok(())
    }

    fn loss_grad(
        &mut self,
        logits: &Vec<f32>,
        labels: &Vec<f32>,
        head: Head,
        n: usize,
        scale: f32,
        dlogit: &mut Vec<f32>,
        loss: &mut Vec<f32>,
    ) -> DResult {
        let w = head.weight;
        for b in 0..n {
            let (z, y) = (logits[b], labels[b * head.stride + head.at]);
            if y.is_nan() {
                loss[b] = 0.0;
                dlogit[b] = 0.0;
                continue;
            }
            loss[b] = w * ((-z.abs()).exp().ln_1p() + z.max(0.0) - y * z);
            dlogit[b] = w * (rankd_engine::sigmoid(z) - y) * scale;
        }
        Ok(())
    }

    fn softmax_rows(&mut self, x: &mut Vec<f32>, n: usize, k: usize) -> DResult {
        for row in x[..n * k].chunks_exact_mut(k) {
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            row.iter_mut().for_each(|v| *v = (*v - max).exp());
            let sum: f32 = row.iter().sum();
            row.iter_mut().for_each(|v| *v /= sum);
        }
        Ok(())
    }

    fn axpy_rows(
        &mut self,
        dst: &mut Vec<f32>,
        p: &Vec<f32>,
        e: usize,
        k: usize,
        src: &Vec<f32>,
        n: usize,
        width: usize,
    ) -> DResult {
        for b in 0..n {
            let pe = p[b * k + e];
            let row = &src[b * width..(b + 1) * width];
            for (d, v) in dst[b * width..(b + 1) * width].iter_mut().zip(row) {
                *d += pe * v;
            }
        }
        Ok(())
    }

    fn row_dot(
        &mut self,
        ds: &mut Vec<f32>,
        e: usize,
        k: usize,
        a: &Vec<f32>,
        c: &Vec<f32>,
        n: usize,
        width: usize,
    ) -> DResult {
        for b in 0..n {
            let (x, y) = (
                &a[b * width..(b + 1) * width],
                &c[b * width..(b + 1) * width],
            );
            ds[b * k + e] = x.iter().zip(y).map(|(x, y)| x * y).sum();
        }
        Ok(())
    }

    fn softmax_back(
        &mut self,
        da: &mut Vec<f32>,
        p: &Vec<f32>,
        ds: &Vec<f32>,
        n: usize,
        k: usize,
    ) -> DResult {
        for b in 0..n {
            let (s, d) = (&p[b * k..(b + 1) * k], &ds[b * k..(b + 1) * k]);
            let mean: f32 = s.iter().zip(d).map(|(a, b)| a * b).sum();
            for e in 0..k {
                da[b * k + e] = s[e] * (d[e] - mean);
            }
        }
        Ok(())
    }

    fn col_sum(&mut self, src: &Vec<f32>, n: usize, width: usize, dst: &mut Vec<f32>) -> DResult {
        dst[..width].fill(0.0);
        for row in src[..n * width].chunks_exact(width) {
            dst.iter_mut().zip(row).for_each(|(s, v)| *s += v);
        }
        Ok(())
    }

    fn relu_back(
        &mut self,
        dz: &mut Vec<f32>,
        dh: &Vec<f32>,
        h: &Vec<f32>,
        len: usize,
        keep: f32,
    ) -> DResult {
        for i in 0..len {
            dz[i] = if h[i] > 0.0 { dh[i] * keep } else { 0.0 };
        }
        Ok(())
    }

    fn mul(&mut self, dst: &mut Vec<f32>, src: &Vec<f32>, len: usize) -> DResult {
        for (d, s) in dst[..len].iter_mut().zip(src) {
            *d *= s;
        }
        Ok(())
    }

    fn bn_forward(
        &mut self,
        h: &mut Vec<f32>,
        xhat: &mut Vec<f32>,
        inv: &mut Vec<f32>,
        stats: &mut Vec<f32>,
        gamma: &Vec<f32>,
        beta: &Vec<f32>,
        n: usize,
        out: usize,
        weight: f32,
    ) -> DResult {
        for o in 0..out {
            let mut mean = 0f32;
            for b in 0..n {
                mean += h[b * out + o];
            }
            mean /= n as f32;
            let mut var = 0f32;
            for b in 0..n {
                let d = h[b * out + o] - mean;
                var += d * d;
            }
            var /= n as f32;
            let iv = 1.0 / (var + crate::model::BN_EPS).sqrt();
            inv[o] = iv;
            for b in 0..n {
                let at = b * out + o;
                let xh = (h[at] - mean) * iv;
                xhat[at] = xh;
                h[at] = (gamma[o] * xh + beta[o]).max(0.0);
            }
            stats[o] = mean * weight;
            stats[out + o] = var * weight;
        }
        Ok(())
    }

    fn bn_backward(
        &mut self,
        dz: &mut Vec<f32>,
        xhat: &Vec<f32>,
        inv: &Vec<f32>,
        gamma: &Vec<f32>,
        dgamma: &mut Vec<f32>,
        dbeta: &mut Vec<f32>,
        n: usize,
        out: usize,
    ) -> DResult {
        let nf = n as f32;
        for o in 0..out {
            let (mut dg, mut db, mut sum_dx, mut sum_dx_x) = (0f32, 0f32, 0f32, 0f32);
            for b in 0..n {
                let (dy, xh) = (dz[b * out + o], xhat[b * out + o]);
                dg += dy * xh;
                db += dy;
                let dx = dy * gamma[o];
                sum_dx += dx;
                sum_dx_x += dx * xh;
            }
            dgamma[o] = dg;
            dbeta[o] = db;
            for b in 0..n {
                let at = b * out + o;
                let dx = dz[at] * gamma[o];
                dz[at] = inv[o] / nf * (nf * dx - sum_dx - xhat[at] * sum_dx_x);
            }
        }
        Ok(())
    }

    fn cross_mix(
        &mut self,
        next: &mut Vec<f32>,
        xl: &Vec<f32>,
        x0: &Vec<f32>,
        t: &Vec<f32>,
        len: usize,
    ) -> DResult {
        for i in 0..len {
            next[i] = xl[i] + x0[i] * t[i];
        }
        Ok(())
    }

    fn cross_back(
        &mut self,
        dt: &mut Vec<f32>,
        dx0: &mut Vec<f32>,
        g: &Vec<f32>,
        x0: &Vec<f32>,
        t: &Vec<f32>,
        len: usize,
    ) -> DResult {
        for i in 0..len {
            dt[i] = g[i] * x0[i];
            dx0[i] += g[i] * t[i];
        }
        Ok(())
    }

    fn seg_reduce(
        &mut self,
        s: Seg,
        offsets: &Vec<u32>,
        ex: &Vec<u32>,
        scale: &Vec<f32>,
        src: &Vec<f32>,
        out: &mut Vec<f32>,
    ) -> DResult {
        for u in 0..s.rows {
            let dst = &mut out[u * s.dim..(u + 1) * s.dim];
            dst.fill(0.0);
            for j in offsets[u] as usize..offsets[u + 1] as usize {
                let at = ex[j] as usize * s.width + s.col;
                for (d, v) in dst.iter_mut().zip(&src[at..at + s.dim]) {
                    *d += scale[j] * v;
                }
            }
        }
        Ok(())
    }

    fn adam(
        &mut self,
        a: AdamStep,
        w: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        len: usize,
    ) -> DResult {
        let h = crate::model::Hyper {
            c1: a.c1,
            c2: a.c2,
            lr_dense: a.lr,
            lr_sparse: 0.0,
            l2: a.l2,
        };
        crate::model::adam(
            &h,
            &mut w[..len],
            &g[..len],
            &mut m[..len],
            &mut v[..len],
            a.l2 != 0.0,
        );
        Ok(())
    }

    fn all_reduce(group: &mut [(&mut Self, Vec<(&mut Vec<f32>, usize)>)]) -> DResult {
        let Some(((_, first), rest)) = group.split_first_mut() else {
            return Ok(());
        };
        for (t, (sum, len)) in first.iter_mut().enumerate() {
            for (_, bufs) in rest.iter() {
                sum[..*len]
                    .iter_mut()
                    .zip(&bufs[t].0[..*len])
                    .for_each(|(a, v)| *a += v);
            }
            for (_, bufs) in rest.iter_mut() {
                bufs[t].0[..*len].copy_from_slice(&sum[..*len]);
            }
        }
        Ok(())
    }
}
