//! One device's replica: the dense parameters (resident, with their Adam moments), the step's
//! buffers, and the step itself as a sequence of [`Device`] operations: the forward and backward
//! passes of `model::CpuCompute` for wide, deep, wide & deep, DeepFM and DCN-v2 models, with
//! batch normalization and dropout.

use super::device::{AdamStep, DResult, Device, DeviceError, Gemm, Head, Pool, Seg};
use super::prep::{Share, TableShare};
use crate::model::{CrossSpec, Hyper, Layout, MtSpec, Optimizer, Params};

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

/// A dense tensor with its gradient, Adam moments and whether L2 applies.
struct Dense<D: Device> {
    w: D::F,
    g: D::F,
    m: D::F,
    v: D::F,
    len: usize,
    decay: bool,
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

/// A multi-task model's buffers: per expert and layer its output (`e * L + i`), per head the
/// gate's softmax, the head's input, its tower's outputs (`h * T + i`) and loss; per expert the
/// gradient of its output; the gate's gradients.
struct MtBufs<D: Device> {
    expert: Vec<D::F>,
    probs: Vec<D::F>,
    input: Vec<D::F>,
    tower: Vec<D::F>,
    loss: Vec<D::F>,
    d_expert: Vec<D::F>,
    ds: D::F,
    da: D::F,
    /// Index of the first multi-task tensor in the dense list.
    base: usize,
}

/// One device's state.
pub struct Replica<D: Device> {
    /// The device.
    pub dev: D,
    /// Every dense tensor, in `Params::dense` order: layer weights, layer biases, cross tensors,
    /// batch normalization's γ and β per hidden layer.
    dense: Vec<Dense<D>>,
    layers: usize,
    cross_tensors: usize,
    emb: Vec<TableBufs<D>>,
    wide: Vec<TableBufs<D>>,
    x: D::F,
    hs: Vec<D::F>,
    /// Batch normalization per hidden layer: normalized pre-activations, inverse standard
    /// deviations, and the share's `[mean | var]` weighted by its part of the batch.
    xhat: Vec<D::F>,
    inv: Vec<D::F>,
    stats: Vec<D::F>,
    /// Dropout masks per hidden layer.
    masks: Vec<D::F>,
    /// Cross layers: inputs `x_l` (and the last output), products `t_l`, low-rank middles.
    xs: Vec<D::F>,
    ts: Vec<D::F>,
    ps: Vec<D::F>,
    cross_g: D::F,
    cross_prev: D::F,
    cross_dt: D::F,
    cross_dp: D::F,
    mt: MtBufs<D>,
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
    if layout.cross.is_some() && layout.layers.is_empty() {
        Some("cross layers without deep layers")
    } else {
        None
    }
}

fn bufs<D: Device>(dev: &mut D, n: usize) -> DResult<Vec<D::F>> {
    (0..n).map(|_| dev.zeros(1)).collect()
}

impl<D: Device> Replica<D> {
    /// A replica of `params`' dense tensors (and zero moments) on `dev`. Its Adam needs the
    /// optimizer's state first ([`Replica::load`]: moments and which tensors L2 applies to); a
    /// worker process's replica only computes gradients and never runs it.
    pub fn new(mut dev: D, layout: &Layout, params: &Params) -> DResult<Self> {
        let mut dense = Vec::new();
        for v in params.dense() {
            let mut t = Dense {
                w: dev.zeros(v.len().max(1))?,
                g: dev.zeros(v.len().max(1))?,
                m: dev.zeros(v.len().max(1))?,
                v: dev.zeros(v.len().max(1))?,
                len: v.len(),
                decay: false,
            };
            dev.put(&mut t.w, v)?;
            dense.push(t);
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
        let hidden = layout.hidden();
        let bn = if layout.batch_norm { hidden } else { 0 };
        let drop = if layout.dropout > 0.0 { hidden } else { 0 };
        let cross = layout.cross.map_or(0, |c| c.layers);
        let (experts, heads) = layout
            .mt
            .as_ref()
            .map_or((0, 0), |m| (m.experts, m.heads.len()));
        let (nl, nt) = layout
            .mt
            .as_ref()
            .map_or((0, 0), |m| (m.layers.len(), m.tower.len()));
        let mt = MtBufs {
            expert: bufs(&mut dev, experts * nl)?,
            probs: bufs(&mut dev, heads)?,
            input: bufs(&mut dev, heads)?,
            tower: bufs(&mut dev, heads * nt)?,
            loss: bufs(&mut dev, heads)?,
            d_expert: bufs(&mut dev, experts)?,
            ds: dev.zeros(1)?,
            da: dev.zeros(1)?,
            base: dense.len() - params.mt.len(),
        };
        Ok(Replica {
            mt,
            dense,
            layers: layout.layers.len(),
            cross_tensors: params.cross.len(),
            emb,
            wide,
            x: dev.zeros(1)?,
            hs: bufs(&mut dev, layout.layers.len())?,
            xhat: bufs(&mut dev, bn)?,
            inv: bufs(&mut dev, bn)?,
            stats: bufs(&mut dev, bn)?,
            masks: bufs(&mut dev, drop)?,
            xs: bufs(&mut dev, if cross > 0 { cross + 1 } else { 0 })?,
            ts: bufs(&mut dev, cross)?,
            ps: bufs(&mut dev, cross)?,
            cross_g: dev.zeros(1)?,
            cross_prev: dev.zeros(1)?,
            cross_dt: dev.zeros(1)?,
            cross_dp: dev.zeros(1)?,
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

    /// Loads the dense tensors and their Adam moments onto the device, and which tensors L2
    /// applies to.
    pub fn load(&mut self, params: &Params, opt: &mut Optimizer) -> DResult {
        let moments = opt.dense_moments_mut();
        for ((t, w), (m, v, decay)) in self.dense.iter_mut().zip(params.dense()).zip(moments) {
            t.decay = decay;
            self.dev.put(&mut t.w, w)?;
            self.dev.put(&mut t.m, m)?;
            self.dev.put(&mut t.v, v)?;
        }
        Ok(())
    }

    /// Loads the dense tensors only (a worker process's pulled parameters: the shards keep the
    /// moments and apply the updates).
    pub fn load_weights(&mut self, params: &Params) -> DResult {
        for (t, w) in self.dense.iter_mut().zip(params.dense()) {
            self.dev.put(&mut t.w, w)?;
        }
        Ok(())
    }

    /// Brings the dense tensors and their moments back to the host.
    pub fn store(&mut self, params: &mut Params, opt: &mut Optimizer) -> DResult {
        let moments = opt.dense_moments_mut();
        for ((t, w), (m, v, _)) in self.dense.iter().zip(params.dense_mut()).zip(moments) {
            self.dev.get(&t.w, w)?;
            self.dev.get(&t.m, m)?;
            self.dev.get(&t.v, v)?;
        }
        Ok(())
    }

    /// The dense gradients of the last step, in `Params::dense` order (tests).
    pub fn dense_grads(&mut self) -> DResult<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for t in &self.dense {
            let mut v = vec![0.0; t.len];
            self.dev.get(&t.g, &mut v)?;
            out.push(v);
        }
        Ok(out)
    }

    /// The last step's batch statistics per hidden layer (`[mean | var]`, weighted by the
    /// share's part of the batch and, after the all-reduce, summed over the devices).
    pub fn bn_stats(&mut self, l: &Layout) -> DResult<Vec<Vec<f32>>> {
        let mut out = Vec::new();
        for (s, &(_, o)) in self.stats.iter().zip(&l.layers) {
            let mut v = vec![0.0; 2 * o];
            self.dev.get(s, &mut v)?;
            out.push(v);
        }
        Ok(out)
    }

    /// The experts, gates and towers of a multi-task model on the deep input `x` (`n` rows of
    /// `d`): each head's logits end in its tower's last output.
    fn mt_forward(&mut self, m: &MtSpec, d: usize, n: usize) -> DResult {
        let (k, nl, nt) = (m.experts, m.layers.len(), m.tower.len());
        let base = self.mt.base;
        let (dev, mt, dense) = (&mut self.dev, &mut self.mt, &self.dense);
        for e in 0..k {
            for (i, &shape) in m.layers.iter().enumerate() {
                let (done, rest) = mt.expert.split_at_mut(e * nl + i);
                let input = if i == 0 {
                    &self.x
                } else {
                    &done[e * nl + i - 1]
                };
                let t = base + m.expert(e, i);
                layer_forward(dev, n, shape, input, dense, t, true, &mut rest[0])?;
            }
        }
        let eo = m.layers[nl - 1].1;
        for h in 0..m.heads.len() {
            dev.ensure(&mut mt.input[h], n * eo)?;
            if k == 1 {
                dev.copy_add(&mut mt.input[h], &mt.expert[nl - 1], n * eo, 0.0)?;
            } else {
                let g = base + m.gate(h);
                layer_forward(dev, n, (d, k), &self.x, dense, g, false, &mut mt.probs[h])?;
                dev.softmax_rows(&mut mt.probs[h], n, k)?;
                dev.zero(&mut mt.input[h], n * eo)?;
                for e in 0..k {
                    let out = &mt.expert[e * nl + nl - 1];
                    dev.axpy_rows(&mut mt.input[h], &mt.probs[h], e, k, out, n, eo)?;
                }
            }
            for (i, &shape) in m.tower.iter().enumerate() {
                let (done, rest) = mt.tower.split_at_mut(h * nt + i);
                let input = if i == 0 {
                    &mt.input[h]
                } else {
                    &done[h * nt + i - 1]
                };
                let t = base + m.tower(h, i);
                layer_forward(dev, n, shape, input, dense, t, i + 1 < nt, &mut rest[0])?;
            }
        }
        Ok(())
    }

    /// A multi-task model's loss and gradients (the share's weighted by `weight`): every
    /// multi-task tensor's, and the deep input's into `dx`.
    fn mt_backward(&mut self, m: &MtSpec, d: usize, n: usize, weight: f32) -> DResult {
        let (k, nl, nt, nh) = (m.experts, m.layers.len(), m.tower.len(), m.heads.len());
        let base = self.mt.base;
        let eo = m.layers[nl - 1].1;
        let (dev, mt, dense) = (&mut self.dev, &mut self.mt, &mut self.dense);
        dev.ensure(&mut self.dx, (n * d).max(1))?;
        dev.zero(&mut self.dx, n * d)?;
        for g in &mut mt.d_expert {
            dev.ensure(g, n * eo)?;
            dev.zero(g, n * eo)?;
        }
        let scale = weight / n as f32;
        for h in 0..nh {
            let head = Head {
                stride: nh,
                at: h,
                weight: m.weights[h],
            };
            dev.ensure(&mut self.dz, n)?;
            dev.ensure(&mut mt.loss[h], n)?;
            let z = &mt.tower[h * nt + nt - 1];
            dev.loss_grad(
                z,
                &self.labels,
                head,
                n,
                scale,
                &mut self.dz,
                &mut mt.loss[h],
            )?;
            for i in (0..nt).rev() {
                let input = if i == 0 {
                    &mt.input[h]
                } else {
                    &mt.tower[h * nt + i - 1]
                };
                let t = base + m.tower(h, i);
                let shape = m.tower[i];
                layer_backward(dev, n, shape, input, dense, t, &self.dz, &mut self.dh)?;
                if i > 0 {
                    dev.ensure(&mut self.dz, n * shape.0)?;
                    dev.relu_back(&mut self.dz, &self.dh, input, n * shape.0, 1.0)?;
                } else {
                    std::mem::swap(&mut self.dz, &mut self.dh);
                }
            }
            // `dz` is now the gradient of the head's input.
            if k == 1 {
                dev.add(&mut mt.d_expert[0], &self.dz, n * eo)?;
                continue;
            }
            dev.ensure(&mut mt.ds, n * k)?;
            dev.ensure(&mut mt.da, n * k)?;
            for e in 0..k {
                let out = &mt.expert[e * nl + nl - 1];
                dev.row_dot(&mut mt.ds, e, k, &self.dz, out, n, eo)?;
                dev.axpy_rows(&mut mt.d_expert[e], &mt.probs[h], e, k, &self.dz, n, eo)?;
            }
            dev.softmax_back(&mut mt.da, &mt.probs[h], &mt.ds, n, k)?;
            let g = base + m.gate(h);
            layer_backward(dev, n, (d, k), &self.x, dense, g, &mt.da, &mut self.dh)?;
            dev.add(&mut self.dx, &self.dh, n * d)?;
        }
        for e in 0..k {
            let last = &mt.expert[e * nl + nl - 1];
            dev.ensure(&mut self.dz, n * eo)?;
            dev.relu_back(&mut self.dz, &mt.d_expert[e], last, n * eo, 1.0)?;
            for i in (0..nl).rev() {
                let input = if i == 0 {
                    &self.x
                } else {
                    &mt.expert[e * nl + i - 1]
                };
                let t = base + m.expert(e, i);
                let shape = m.layers[i];
                layer_backward(dev, n, shape, input, dense, t, &self.dz, &mut self.dh)?;
                if i > 0 {
                    dev.ensure(&mut self.dz, n * shape.0)?;
                    dev.relu_back(&mut self.dz, &self.dh, input, n * shape.0, 1.0)?;
                } else {
                    dev.add(&mut self.dx, &self.dh, n * d)?;
                }
            }
        }
        Ok(())
    }

    /// The cross layers on the deep input `x` (`n` rows of `d`).
    fn cross_forward(&mut self, c: &CrossSpec, d: usize, n: usize) -> DResult {
        let per = c.per_layer();
        let dev = &mut self.dev;
        dev.ensure(&mut self.xs[0], n * d)?;
        dev.copy_add(&mut self.xs[0], &self.x, n * d, 0.0)?;
        for li in 0..c.layers {
            let base = 2 * self.layers + li * per;
            let t = &mut self.ts[li];
            dev.ensure(t, n * d)?;
            if c.rank == 0 {
                // t = x_l Wᵀ.
                let g = Gemm::nt(n, d, d);
                dev.gemm(g, &self.xs[li], &self.dense[base].w, t)?;
            } else {
                let r = c.rank;
                // p = x_l V (V is [d][r]); t = p Uᵀ (U is [d][r]).
                let pm = &mut self.ps[li];
                dev.ensure(pm, n * r)?;
                let g = Gemm::nn(n, r, d);
                dev.gemm(g, &self.xs[li], &self.dense[base + 1].w, pm)?;
                let g = Gemm::nt(n, d, r);
                dev.gemm(g, pm, &self.dense[base].w, t)?;
            }
            dev.bias_act(t, n, d, &self.dense[base + per - 1].w, false)?;
            let (done, next) = self.xs.split_at_mut(li + 1);
            dev.ensure(&mut next[0], n * d)?;
            dev.cross_mix(&mut next[0], &done[li], &self.x, t, n * d)?;
        }
        Ok(())
    }

    /// Uploads `share` (pulled) and runs the forward pass, in training (batch statistics,
    /// dropout; batch statistics weighted by `weight`) or not; leaves the logits.
    fn forward(
        &mut self,
        l: &Layout,
        share: &Share,
        wide_bias: f32,
        training: bool,
        weight: f32,
    ) -> DResult {
        if l.batch_norm && !training {
            return Err(DeviceError(
                "predictions of a batch-normalized network are made on the CPU".into(),
            ));
        }
        let n = share.n;
        let k = l.deep_in;
        {
            let d = &mut self.dev;
            for ((bufs, t), e) in self.emb.iter_mut().zip(&share.emb).zip(&l.emb) {
                bufs.upload(d, t, e.dim)?;
            }
            for (bufs, t) in self.wide.iter_mut().zip(&share.wide) {
                bufs.upload(d, t, 1)?;
            }
            d.put(&mut self.labels, &share.labels)?;
            d.put(&mut self.dense_in, &share.dense)?;
            if training {
                for (buf, m) in self.masks.iter_mut().zip(&share.masks) {
                    d.put(buf, m)?;
                }
            }
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
        }
        if let Some(m) = &l.mt {
            return self.mt_forward(m, k, n);
        }
        if let Some(c) = &l.cross {
            self.cross_forward(c, k, n)?;
        }
        let stacked = l.cross.filter(|c| !c.parallel).map(|c| c.layers);
        let nl = self.layers;
        let d = &mut self.dev;
        for (i, &(inp, out)) in l.layers.iter().enumerate() {
            let (prev, rest) = self.hs.split_at_mut(i);
            let h = &mut rest[0];
            d.ensure(h, (n * out).max(1))?;
            let input = match (i, stacked) {
                (0, Some(last)) => &self.xs[last],
                (0, None) => &self.x,
                _ => &prev[i - 1],
            };
            let g = Gemm::nt(n, out, inp);
            d.gemm(g, input, &self.dense[i].w, h)?;
            let hidden = i + 1 < l.layers.len();
            if hidden && l.batch_norm {
                d.bias_act(h, n, out, &self.dense[nl + i].w, false)?;
                let bn = 2 * nl + self.cross_tensors + 2 * i;
                d.ensure(&mut self.xhat[i], n * out)?;
                d.ensure(&mut self.inv[i], out)?;
                d.ensure(&mut self.stats[i], 2 * out)?;
                d.bn_forward(
                    h,
                    &mut self.xhat[i],
                    &mut self.inv[i],
                    &mut self.stats[i],
                    &self.dense[bn].w,
                    &self.dense[bn + 1].w,
                    n,
                    out,
                    weight,
                )?;
            } else {
                d.bias_act(h, n, out, &self.dense[nl + i].w, hidden)?;
            }
            if hidden && training && l.dropout > 0.0 {
                d.mul(h, &self.masks[i], n * out)?;
            }
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
                if let Some(c) = l.cross.filter(|c| c.parallel) {
                    // The cross network's output weights: logits += x_L · w.
                    let g = Gemm::nn(n, 1, k).add();
                    let w = &self.dense[2 * nl + self.cross_tensors - 1].w;
                    d.gemm(g, &self.xs[c.layers], w, &mut self.logits)?;
                }
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

    /// Predicted logits of a pulled share (tests; evaluation runs on the CPU).
    pub fn logits(&mut self, l: &Layout, share: &Share, wide_bias: f32) -> DResult<Vec<f32>> {
        self.forward(l, share, wide_bias, false, 1.0)?;
        let n = share.n;
        let Some(m) = &l.mt else {
            let mut out = vec![0.0; n];
            self.dev.get(&self.logits, &mut out)?;
            return Ok(out);
        };
        // Head by head, interleaved: example `b`'s head `h` at `b * heads + h`.
        let (nh, nt) = (m.heads.len(), m.tower.len());
        let mut out = vec![0.0; n * nh];
        let mut head = vec![0.0; n];
        for h in 0..nh {
            self.dev.get(&self.mt.tower[h * nt + nt - 1], &mut head)?;
            for (b, &z) in head.iter().enumerate() {
                out[b * nh + h] = z;
            }
        }
        Ok(out)
    }

    /// The cross layers' gradients from `cross_g` (the gradient of the last layer's output);
    /// adds the deep input's gradient to `dx`.
    fn cross_backward(&mut self, c: &CrossSpec, d: usize, n: usize) -> DResult {
        let per = c.per_layer();
        let len = n * d;
        let dev = &mut self.dev;
        dev.ensure(&mut self.cross_dt, len)?;
        dev.ensure(&mut self.cross_prev, len)?;
        for li in (0..c.layers).rev() {
            let base = 2 * self.layers + li * per;
            let (g, prev, dt) = (&mut self.cross_g, &mut self.cross_prev, &mut self.cross_dt);
            dev.cross_back(dt, &mut self.dx, g, &self.x, &self.ts[li], len)?;
            dev.col_sum(dt, n, d, &mut self.dense[base + per - 1].g)?;
            let xl = &self.xs[li];
            if c.rank == 0 {
                // dW = dtᵀ x_l; prev = dt W.
                let g1 = Gemm::tn(d, d, n);
                dev.gemm(g1, dt, xl, &mut self.dense[base].g)?;
                let g2 = Gemm::nn(n, d, d);
                dev.gemm(g2, dt, &self.dense[base].w, prev)?;
            } else {
                let r = c.rank;
                let pm = &self.ps[li];
                dev.ensure(&mut self.cross_dp, n * r)?;
                // dU = dtᵀ p; dp = dt U; dV = x_lᵀ dp; prev = dp Vᵀ.
                let gu = Gemm::tn(d, r, n);
                dev.gemm(gu, dt, pm, &mut self.dense[base].g)?;
                let gp = Gemm::nn(n, r, d);
                dev.gemm(gp, dt, &self.dense[base].w, &mut self.cross_dp)?;
                let gv = Gemm::tn(d, r, n);
                dev.gemm(gv, xl, &self.cross_dp, &mut self.dense[base + 1].g)?;
                let gx = Gemm::nt(n, d, r);
                dev.gemm(gx, &self.cross_dp, &self.dense[base + 1].w, prev)?;
            }
            dev.add(prev, g, len)?;
            std::mem::swap(&mut self.cross_g, &mut self.cross_prev);
        }
        // x_0 is the deep input itself.
        dev.add(&mut self.dx, &self.cross_g, len)
    }

    /// Forward and backward of a pulled share, its mean gradient weighted by `weight` (its part
    /// of the batch): dense gradients (and batch statistics) stay on the device for the
    /// all-reduce; the sparse ones and the loss are queued for [`Replica::push`].
    pub fn step(&mut self, l: &Layout, share: &Share, wide_bias: f32, weight: f32) -> DResult {
        let n = share.n;
        for t in &mut self.dense {
            self.dev.zero(&mut t.g, t.len)?;
        }
        if n == 0 {
            for (s, &(_, out)) in self.stats.iter_mut().zip(&l.layers) {
                self.dev.ensure(s, 2 * out)?;
                self.dev.zero(s, 2 * out)?;
            }
            return Ok(());
        }
        self.forward(l, share, wide_bias, true, weight)?;
        let k = l.deep_in;
        if let Some(m) = &l.mt {
            self.mt_backward(m, k, n, weight)?;
            return self.sparse_grads(l, share);
        }
        let nl = self.layers;
        let keep = 1.0 / (1.0 - l.dropout);
        let stacked = l.cross.filter(|c| !c.parallel).map(|c| c.layers);
        {
            let d = &mut self.dev;
            d.ensure(&mut self.dlogit, n)?;
            d.ensure(&mut self.loss, n)?;
            d.loss_grad(
                &self.logits,
                &self.labels,
                Head::ONE,
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
                    let input = match (i, stacked) {
                        (0, Some(last)) => &self.xs[last],
                        (0, None) => &self.x,
                        _ => &self.hs[i - 1],
                    };
                    // dW = dZᵀ H_in.
                    let g = Gemm::tn(out, inp, n);
                    d.gemm(g, &self.dz, input, &mut self.dense[i].g)?;
                    d.col_sum(&self.dz, n, out, &mut self.dense[nl + i].g)?;
                    // dH_in = dZ W; below the first layer only the embedding columns, unless
                    // cross layers take it (every column).
                    let width = if i == 0 && l.cross.is_none() {
                        emb_width
                    } else {
                        inp
                    };
                    if width == 0 {
                        continue;
                    }
                    let g = Gemm::nn(n, width, out)
                        .ldb(inp)
                        .ldc(if i == 0 && l.cross.is_none() {
                            k
                        } else {
                            width
                        });
                    if i == 0 && l.cross.is_none() {
                        d.gemm(g, &self.dz, &self.dense[i].w, &mut self.dx)?;
                        continue;
                    }
                    d.ensure(&mut self.dh, n * width)?;
                    d.gemm(g, &self.dz, &self.dense[i].w, &mut self.dh)?;
                    if i == 0 {
                        continue;
                    }
                    // Through the dropout and the ReLU of the layer below, then its batch
                    // normalization.
                    d.ensure(&mut self.dz, n * width)?;
                    d.relu_back(&mut self.dz, &self.dh, &self.hs[i - 1], n * width, keep)?;
                    if l.batch_norm {
                        let j = i - 1;
                        let bn = 2 * nl + self.cross_tensors + 2 * j;
                        let (a, b) = self.dense.split_at_mut(bn + 1);
                        let (gamma, beta) = (&mut a[bn], &mut b[0]);
                        d.bn_backward(
                            &mut self.dz,
                            &self.xhat[j],
                            &self.inv[j],
                            &gamma.w,
                            &mut gamma.g,
                            &mut beta.g,
                            n,
                            width,
                        )?;
                    }
                }
            }
        }
        // Cross layers: stacked, their output's gradient is the deep layers' input gradient;
        // parallel, the deep input gets that and the output weights carry the logit's.
        if let Some(c) = l.cross {
            let d = &mut self.dev;
            d.ensure(&mut self.cross_g, n * k)?;
            if c.parallel {
                d.copy_add(&mut self.dx, &self.dh, n * k, 0.0)?;
                let last = 2 * nl + self.cross_tensors - 1;
                let gw = Gemm::tn(1, k, n);
                d.gemm(
                    gw,
                    &self.dlogit,
                    &self.xs[c.layers],
                    &mut self.dense[last].g,
                )?;
                let gl = Gemm::nn(n, k, 1);
                d.gemm(gl, &self.dlogit, &self.dense[last].w, &mut self.cross_g)?;
            } else {
                d.copy_add(&mut self.cross_g, &self.dh, n * k, 0.0)?;
            }
            self.cross_backward(&c, k, n)?;
        }
        if l.fm {
            let d = &mut self.dev;
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
        self.sparse_grads(l, share)
    }

    /// The sparse gradients from the deep input's (`dx`) and the logits' (`dlogit`): each
    /// pulled row's, reduced over its occurrences.
    fn sparse_grads(&mut self, l: &Layout, share: &Share) -> DResult {
        let k = l.deep_in;
        let d = &mut self.dev;
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

    /// The device and what the all-reduce sums, with lengths: the dense gradients and the
    /// batch statistics.
    #[allow(clippy::type_complexity)]
    pub fn grads_mut(&mut self, l: &Layout) -> (&mut D, Vec<(&mut D::F, usize)>) {
        let mut list: Vec<(&mut D::F, usize)> =
            self.dense.iter_mut().map(|t| (&mut t.g, t.len)).collect();
        list.extend(
            self.stats
                .iter_mut()
                .zip(&l.layers)
                .map(|(s, &(_, out))| (s, 2 * out)),
        );
        (&mut self.dev, list)
    }

    /// Adam on every dense tensor with the step's constants (L2 where it applies).
    pub fn adam(&mut self, h: &Hyper) -> DResult {
        for t in &mut self.dense {
            let a = AdamStep {
                c1: h.c1,
                c2: h.c2,
                lr: h.lr_dense,
                l2: if t.decay { h.l2 } else { 0.0 },
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
        if n > 0 && l.mt.is_some() {
            self.host.resize(n, 0.0);
            for loss in &self.mt.loss {
                self.dev.get(loss, &mut self.host)?;
                for &v in &self.host {
                    out.loss += f64::from(v);
                }
            }
        } else if n > 0 {
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

/// `out = act(input Wᵀ + b)` for `n` rows, `W` and `b` dense tensors `t` and `t + 1`.
#[allow(clippy::too_many_arguments)]
fn layer_forward<D: Device>(
    dev: &mut D,
    n: usize,
    (inp, out): (usize, usize),
    input: &D::F,
    dense: &[Dense<D>],
    t: usize,
    relu: bool,
    dst: &mut D::F,
) -> DResult {
    dev.ensure(dst, (n * out).max(1))?;
    let g = Gemm::nt(n, out, inp);
    dev.gemm(g, input, &dense[t].w, dst)?;
    dev.bias_act(dst, n, out, &dense[t + 1].w, relu)
}

/// A layer's gradients from `dz` (`n × out`, its pre-activation's): `dW = dzᵀ input` and `db`
/// (the column sums) into dense tensors `t` and `t + 1`, and the input's gradient `dz W` into
/// `dinput`.
#[allow(clippy::too_many_arguments)]
fn layer_backward<D: Device>(
    dev: &mut D,
    n: usize,
    (inp, out): (usize, usize),
    input: &D::F,
    dense: &mut [Dense<D>],
    t: usize,
    dz: &D::F,
    dinput: &mut D::F,
) -> DResult {
    let g = Gemm::tn(out, inp, n);
    dev.gemm(g, dz, input, &mut dense[t].g)?;
    dev.col_sum(dz, n, out, &mut dense[t + 1].g)?;
    dev.ensure(dinput, (n * inp).max(1))?;
    let g = Gemm::nn(n, inp, out);
    dev.gemm(g, dz, &dense[t].w, dinput)
}
