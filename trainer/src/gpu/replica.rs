//! One device's replica: the dense parameters (resident, with their Adam moments), the step's
//! buffers, and the step itself as a sequence of [`Device`] operations: the forward and backward
//! passes of `model::CpuCompute` for wide, deep, wide & deep and DeepFM models.

use super::device::{AdamStep, DResult, Device, Gemm, Pool, Seg};
use super::prep::{Share, TableShare};
use crate::model::{Hyper, Layout, Params};

/// A sparse table's buffers on the device.
struct TableBufs<D: Device> {
    offsets: D::U,
    local: D::U,
    occ_offsets: D::U,
    occ_ex: D::U,
    occ_scale: D::F,
    values: D::F,
    grad: D::F,
}

impl<D: Device> TableBufs<D> {
    fn new(dev: &mut D) -> DResult<Self> {
        Ok(TableBufs {
            offsets: dev.words()?,
            local: dev.words()?,
            occ_offsets: dev.words()?,
            occ_ex: dev.words()?,
            occ_scale: dev.zeros(1)?,
            values: dev.zeros(1)?,
            grad: dev.zeros(1)?,
        })
    }

    fn upload(&mut self, dev: &mut D, t: &TableShare, dim: usize) -> DResult {
        dev.put_u32(&mut self.offsets, &t.offsets)?;
        dev.put_u32(&mut self.local, &t.local)?;
        dev.put_u32(&mut self.occ_offsets, &t.occ_offsets)?;
        dev.put_u32(&mut self.occ_ex, &t.occ_ex)?;
        dev.put(&mut self.occ_scale, &t.occ_scale)?;
        dev.put(&mut self.values, &t.values)?;
        dev.ensure(&mut self.grad, (t.rows.len() * dim).max(1))
    }
}

/// A dense tensor with its gradient and Adam moments.
struct Dense<D: Device> {
    w: D::F,
    g: D::F,
    m: D::F,
    v: D::F,
    len: usize,
}

/// What one step of a replica leaves for the host: the summed loss and, per sparse table, the
/// gradients of its pulled rows (already weighted by the share's part of the batch).
#[derive(Debug, Default, Clone)]
pub struct Pushed {
    /// Summed log loss of the share's examples.
    pub loss: f64,
    /// Per embedding table, `rows × dim`.
    pub emb: Vec<Vec<f32>>,
    /// Per wide slot, one per row.
    pub wide: Vec<Vec<f32>>,
    /// The wide bias's gradient.
    pub wide_bias: f32,
}

/// Per layer, the weights' and the biases' gradients.
pub type LayerGrads = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// One device's state.
pub struct Replica<D: Device> {
    /// The device.
    pub dev: D,
    weights: Vec<Dense<D>>,
    biases: Vec<Dense<D>>,
    emb: Vec<TableBufs<D>>,
    wide: Vec<TableBufs<D>>,
    x: D::F,
    hs: Vec<D::F>,
    logits: D::F,
    wide_acc: D::F,
    fm_sum: D::F,
    fm_cols: D::U,
    dlogit: D::F,
    loss: D::F,
    dz: D::F,
    dh: D::F,
    dx: D::F,
    dense_in: D::F,
    labels: D::F,
    host: Vec<f32>,
}

impl<D: Device> std::fmt::Debug for Replica<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("device", &self.dev.name())
            .finish_non_exhaustive()
    }
}

/// Whether the device step computes `layout` (else the CPU does, and this says why).
pub fn unsupported(layout: &Layout) -> Option<&'static str> {
    if layout.cross.is_some() {
        Some("cross layers")
    } else if layout.mt.is_some() {
        Some("multi-task heads")
    } else if layout.batch_norm {
        Some("batch_norm")
    } else if layout.dropout > 0.0 {
        Some("dropout")
    } else {
        None
    }
}

impl<D: Device> Replica<D> {
    /// A replica of `params`' dense layers (and zero moments) on `dev`.
    pub fn new(mut dev: D, layout: &Layout, params: &Params) -> DResult<Self> {
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for (w, b) in params.w.iter().zip(&params.b) {
            for (v, list) in [(w, &mut weights), (b, &mut biases)] {
                let mut t = Dense {
                    w: dev.zeros(v.len().max(1))?,
                    g: dev.zeros(v.len().max(1))?,
                    m: dev.zeros(v.len().max(1))?,
                    v: dev.zeros(v.len().max(1))?,
                    len: v.len(),
                };
                dev.put(&mut t.w, v)?;
                list.push(t);
            }
        }
        let cols: Vec<u32> = layout.emb.iter().map(|e| e.col as u32).collect();
        let mut fm_cols = dev.words()?;
        dev.put_u32(&mut fm_cols, &cols)?;
        let mut emb = Vec::new();
        for _ in &layout.emb {
            emb.push(TableBufs::new(&mut dev)?);
        }
        let mut wide = Vec::new();
        for _ in &layout.wide {
            wide.push(TableBufs::new(&mut dev)?);
        }
        let mut hs = Vec::new();
        for _ in &layout.layers {
            hs.push(dev.zeros(1)?);
        }
        Ok(Replica {
            weights,
            biases,
            emb,
            wide,
            x: dev.zeros(1)?,
            hs,
            logits: dev.zeros(1)?,
            wide_acc: dev.zeros(1)?,
            fm_sum: dev.zeros(1)?,
            fm_cols,
            dlogit: dev.zeros(1)?,
            loss: dev.zeros(1)?,
            dz: dev.zeros(1)?,
            dh: dev.zeros(1)?,
            dx: dev.zeros(1)?,
            dense_in: dev.zeros(1)?,
            labels: dev.zeros(1)?,
            host: Vec::new(),
            dev,
        })
    }

    /// Loads the dense layers and their Adam moments (`[m, v, mb, vb]`, as
    /// `Optimizer::layer_moments_mut`) onto the device.
    pub fn load(&mut self, params: &Params, moments: &[&mut Vec<Vec<f32>>; 4]) -> DResult {
        for (i, t) in self.weights.iter_mut().enumerate() {
            self.dev.put(&mut t.w, &params.w[i])?;
            self.dev.put(&mut t.m, &moments[0][i])?;
            self.dev.put(&mut t.v, &moments[1][i])?;
        }
        for (i, t) in self.biases.iter_mut().enumerate() {
            self.dev.put(&mut t.w, &params.b[i])?;
            self.dev.put(&mut t.m, &moments[2][i])?;
            self.dev.put(&mut t.v, &moments[3][i])?;
        }
        Ok(())
    }

    /// Brings the dense layers and their moments back to the host.
    pub fn store(&mut self, params: &mut Params, moments: [&mut Vec<Vec<f32>>; 4]) -> DResult {
        let [m, v, mb, vb] = moments;
        for (i, t) in self.weights.iter().enumerate() {
            self.dev.get(&t.w, &mut params.w[i])?;
            self.dev.get(&t.m, &mut m[i])?;
            self.dev.get(&t.v, &mut v[i])?;
        }
        for (i, t) in self.biases.iter().enumerate() {
            self.dev.get(&t.w, &mut params.b[i])?;
            self.dev.get(&t.m, &mut mb[i])?;
            self.dev.get(&t.v, &mut vb[i])?;
        }
        Ok(())
    }

    /// The dense gradients of the last step, layer by layer (weights, then biases): for tests.
    pub fn dense_grads(&mut self) -> DResult<LayerGrads> {
        let mut out = (Vec::new(), Vec::new());
        for (list, dst) in [(&self.weights, &mut out.0), (&self.biases, &mut out.1)] {
            for t in list {
                let mut v = vec![0.0; t.len];
                self.dev.get(&t.g, &mut v)?;
                dst.push(v);
            }
        }
        Ok(out)
    }

    /// Uploads `share` (pulled) and runs the forward pass; leaves the logits.
    fn forward(&mut self, l: &Layout, share: &Share, wide_bias: f32) -> DResult {
        let n = share.n;
        let k = l.deep_in;
        let d = &mut self.dev;
        for ((bufs, t), e) in self.emb.iter_mut().zip(&share.emb).zip(&l.emb) {
            bufs.upload(d, t, e.dim)?;
        }
        for (bufs, t) in self.wide.iter_mut().zip(&share.wide) {
            bufs.upload(d, t, 1)?;
        }
        d.put(&mut self.labels, &share.labels)?;
        d.put(&mut self.dense_in, &share.dense)?;
        d.ensure(&mut self.x, (n * k).max(1))?;
        d.ensure(&mut self.logits, n.max(1))?;
        d.ensure(&mut self.wide_acc, n.max(1))?;
        for (bufs, e) in self.emb.iter().zip(&l.emb) {
            let p = Pool {
                n,
                width: k,
                col: e.col,
                dim: e.dim,
                mean: e.mean,
            };
            d.pool(p, &bufs.offsets, &bufs.local, &bufs.values, &mut self.x)?;
        }
        for (j, &(_, col)) in l.dense.iter().enumerate() {
            d.set_col(&mut self.x, n, k, col, &self.dense_in, j * n)?;
        }
        for (i, &(inp, out)) in l.layers.iter().enumerate() {
            let (prev, rest) = self.hs.split_at_mut(i);
            let h = &mut rest[0];
            d.ensure(h, (n * out).max(1))?;
            let input = if i == 0 { &self.x } else { &prev[i - 1] };
            let g = Gemm {
                m: n,
                n: out,
                k: inp,
                ta: false,
                tb: true,
                lda: inp,
                ldb: inp,
                ldc: out,
                beta: 0.0,
            };
            d.gemm(g, input, &self.weights[i].w, h)?;
            let relu = i + 1 < l.layers.len();
            d.bias_act(h, n, out, &self.biases[i].w, relu)?;
        }
        // The wide sum starts at the bias; the logit is the deep output plus it.
        d.zero(&mut self.wide_acc, n)?;
        for bufs in &self.wide {
            d.add_rows(
                &mut self.wide_acc,
                n,
                &bufs.offsets,
                &bufs.local,
                &bufs.values,
            )?;
        }
        let bias = if l.has_wide { wide_bias } else { 0.0 };
        match self.hs.last() {
            Some(last) => {
                d.copy_add(&mut self.logits, last, n, 0.0)?;
                if l.has_wide {
                    d.ensure(&mut self.dz, n.max(1))?;
                    d.copy_add(&mut self.dz, &self.wide_acc, n, bias)?;
                    d.add(&mut self.logits, &self.dz, n)?;
                }
            }
            None => d.copy_add(&mut self.logits, &self.wide_acc, n, bias)?,
        }
        if l.fm {
            let dim = l.emb[0].dim;
            d.ensure(&mut self.fm_sum, (n * dim).max(1))?;
            d.fm_forward(
                &mut self.logits,
                &mut self.fm_sum,
                &self.x,
                n,
                k,
                &self.fm_cols,
                l.emb.len(),
                dim,
            )?;
        }
        Ok(())
    }

    /// Predicted logits of a pulled share (for tests and eval on the device).
    pub fn logits(&mut self, l: &Layout, share: &Share, wide_bias: f32) -> DResult<Vec<f32>> {
        self.forward(l, share, wide_bias)?;
        let mut out = vec![0.0; share.n];
        self.dev.get(&self.logits, &mut out)?;
        Ok(out)
    }

    /// Forward and backward of a pulled share, its mean gradient weighted by `weight` (its part
    /// of the batch): dense gradients stay on the device for the all-reduce; the sparse ones and
    /// the loss are queued for [`Replica::push`].
    pub fn step(&mut self, l: &Layout, share: &Share, wide_bias: f32, weight: f32) -> DResult {
        let n = share.n;
        for t in self.weights.iter_mut().chain(self.biases.iter_mut()) {
            self.dev.zero(&mut t.g, t.len)?;
        }
        if n == 0 {
            return Ok(());
        }
        self.forward(l, share, wide_bias)?;
        let k = l.deep_in;
        let d = &mut self.dev;
        d.ensure(&mut self.dlogit, n)?;
        d.ensure(&mut self.loss, n)?;
        d.loss_grad(
            &self.logits,
            &self.labels,
            n,
            weight / n as f32,
            &mut self.dlogit,
            &mut self.loss,
        )?;
        let emb_width: usize = l.emb.iter().map(|e| e.dim).sum();
        d.ensure(&mut self.dx, (n * k).max(1))?;
        d.zero(&mut self.dx, n * k)?;
        if !l.layers.is_empty() {
            d.ensure(&mut self.dz, n)?;
            d.copy_add(&mut self.dz, &self.dlogit, n, 0.0)?;
            for i in (0..l.layers.len()).rev() {
                let (inp, out) = l.layers[i];
                let input = if i == 0 { &self.x } else { &self.hs[i - 1] };
                // dW = dZᵀ H_in.
                let g = Gemm {
                    m: out,
                    n: inp,
                    k: n,
                    ta: true,
                    tb: false,
                    lda: out,
                    ldb: inp,
                    ldc: inp,
                    beta: 0.0,
                };
                d.gemm(g, &self.dz, input, &mut self.weights[i].g)?;
                d.col_sum(&self.dz, n, out, &mut self.biases[i].g)?;
                // dH_in = dZ W; below the first layer only the embedding columns.
                let width = if i == 0 { emb_width } else { inp };
                if width == 0 {
                    continue;
                }
                let g = Gemm {
                    m: n,
                    n: width,
                    k: out,
                    ta: false,
                    tb: false,
                    lda: out,
                    ldb: inp,
                    ldc: if i == 0 { k } else { width },
                    beta: 0.0,
                };
                if i == 0 {
                    d.gemm(g, &self.dz, &self.weights[i].w, &mut self.dx)?;
                } else {
                    d.ensure(&mut self.dh, n * width)?;
                    d.gemm(g, &self.dz, &self.weights[i].w, &mut self.dh)?;
                    d.ensure(&mut self.dz, n * width)?;
                    d.relu_back(&mut self.dz, &self.dh, &self.hs[i - 1], n * width)?;
                }
            }
        }
        if l.fm {
            let dim = l.emb[0].dim;
            d.fm_backward(
                &mut self.dx,
                &self.x,
                &self.fm_sum,
                &self.dlogit,
                n,
                k,
                &self.fm_cols,
                l.emb.len(),
                dim,
            )?;
        }
        for ((bufs, t), e) in self.emb.iter_mut().zip(&share.emb).zip(&l.emb) {
            let s = Seg {
                rows: t.rows.len(),
                dim: e.dim,
                width: k,
                col: e.col,
            };
            d.seg_reduce(
                s,
                &bufs.occ_offsets,
                &bufs.occ_ex,
                &bufs.occ_scale,
                &self.dx,
                &mut bufs.grad,
            )?;
        }
        for (bufs, t) in self.wide.iter_mut().zip(&share.wide) {
            let s = Seg {
                rows: t.rows.len(),
                dim: 1,
                width: 1,
                col: 0,
            };
            d.seg_reduce(
                s,
                &bufs.occ_offsets,
                &bufs.occ_ex,
                &bufs.occ_scale,
                &self.dlogit,
                &mut bufs.grad,
            )?;
        }
        Ok(())
    }

    /// The device and the dense gradients (to all-reduce across devices), with their lengths.
    pub fn grads_mut(&mut self) -> (&mut D, Vec<(&mut D::F, usize)>) {
        let grads = self
            .weights
            .iter_mut()
            .chain(self.biases.iter_mut())
            .map(|t| (&mut t.g, t.len))
            .collect();
        (&mut self.dev, grads)
    }

    /// Adam on every dense tensor with the step's constants (weights with L2, biases without).
    pub fn adam(&mut self, h: &Hyper) -> DResult {
        for (t, decay) in self
            .weights
            .iter_mut()
            .map(|t| (t, true))
            .chain(self.biases.iter_mut().map(|t| (t, false)))
        {
            let a = AdamStep {
                c1: h.c1,
                c2: h.c2,
                lr: h.lr_dense,
                l2: if decay { h.l2 } else { 0.0 },
            };
            self.dev
                .adam(a, &mut t.w, &t.g, &mut t.m, &mut t.v, t.len)?;
        }
        Ok(())
    }

    /// Waits for the step and copies its loss and sparse gradients to the host.
    pub fn push(&mut self, l: &Layout, share: &Share) -> DResult<Pushed> {
        let n = share.n;
        let mut out = Pushed::default();
        if n > 0 {
            self.host.resize(n, 0.0);
            self.dev.get(&self.loss, &mut self.host)?;
            out.loss = self.host.iter().map(|&v| f64::from(v)).sum();
            if l.has_wide {
                self.dev.get(&self.dlogit, &mut self.host)?;
                out.wide_bias = self.host.iter().sum();
            }
        }
        for ((bufs, t), e) in self.emb.iter().zip(&share.emb).zip(&l.emb) {
            let mut v = vec![0.0; t.rows.len() * e.dim];
            if n > 0 {
                self.dev.get(&bufs.grad, &mut v)?;
            }
            out.emb.push(v);
        }
        for (bufs, t) in self.wide.iter().zip(&share.wide) {
            let mut v = vec![0.0; t.rows.len()];
            if n > 0 {
                self.dev.get(&bufs.grad, &mut v)?;
            }
            out.wide.push(v);
        }
        Ok(out)
    }
}
