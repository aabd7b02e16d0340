//! Multi-task heads in training: a shared bottom or MMoE experts over the deep input, a softmax
//! gate per head over the experts, a tower per head, and the loss a weighted sum of the heads'
//! log losses. The serving math is `docs/model.md`; the engine computes the same.

use rankd_engine::cpu::{matmul, matmul_strided};
use rankd_formats::synth::Rng;

use super::{sigmoid, CpuCompute, Grads, Layout, Params};

/// The multi-task part of the layout.
#[derive(Clone, Debug, PartialEq)]
pub struct MtSpec {
    /// Experts (1: a shared bottom).
    pub experts: usize,
    /// Each expert's layers `(in, out)`, all with ReLU.
    pub layers: Vec<(usize, usize)>,
    /// Each head's tower `(in, out)`: hidden layers with ReLU, then one output.
    pub tower: Vec<(usize, usize)>,
    /// Head names, the default head first.
    pub heads: Vec<String>,
    /// Each head's weight in the loss.
    pub weights: Vec<f32>,
}

impl MtSpec {
    /// From the config's `[deep]`, `[multitask]` and `[[heads]]` (checked by
    /// `ModelConfig::tensors`).
    pub fn new(config: &rankd_formats::config::ModelConfig, deep_in: usize) -> Option<MtSpec> {
        let m = config.multitask()?;
        let d = config.deep.as_ref()?;
        let chain = |widths: &[u32], mut width: usize| {
            widths
                .iter()
                .map(|&o| {
                    let l = (width, o as usize);
                    width = o as usize;
                    l
                })
                .collect::<Vec<_>>()
        };
        let layers = chain(&d.layers, deep_in);
        let bottom = layers.last().map_or(deep_in, |l| l.1);
        Some(MtSpec {
            experts: m.experts as usize,
            tower: chain(&m.tower, bottom),
            layers,
            heads: config.heads.iter().map(|h| h.name.clone()).collect(),
            weights: config.heads.iter().map(|h| h.weight).collect(),
        })
    }

    /// A gate's tensors: weight and bias with more than one expert, none with one.
    fn gate_tensors(&self) -> usize {
        if self.experts > 1 {
            2
        } else {
            0
        }
    }

    /// Tensors of one head: its gate's (with more than one expert), then its tower's.
    fn per_head(&self) -> usize {
        self.gate_tensors() + 2 * self.tower.len()
    }

    /// Index in [`Params::mt`] of expert `k`'s layer `i` weight (its bias follows).
    pub fn expert(&self, k: usize, i: usize) -> usize {
        2 * (k * self.layers.len() + i)
    }

    /// Index of head `h`'s gate weight (its bias follows).
    pub fn gate(&self, h: usize) -> usize {
        2 * self.experts * self.layers.len() + h * self.per_head()
    }

    /// Index of head `h`'s tower layer `i` weight (its bias follows).
    pub fn tower(&self, h: usize, i: usize) -> usize {
        self.gate(h) + self.gate_tensors() + 2 * i
    }

    /// Names, shapes and whether L2 applies (weights, not biases) of every tensor, in
    /// [`Params::mt`] order; the names are the model config's.
    pub fn tensors(&self, d: usize) -> Vec<(String, Vec<usize>, bool)> {
        let mut out = Vec::new();
        let mut layer = |name: String, (i, o): (usize, usize)| {
            out.push((format!("{name}.weight"), vec![o, i], true));
            out.push((format!("{name}.bias"), vec![o], false));
        };
        for k in 0..self.experts {
            for (i, &l) in self.layers.iter().enumerate() {
                layer(format!("expert.{k}.{i}"), l);
            }
        }
        for h in &self.heads {
            if self.experts > 1 {
                layer(format!("gate.{h}"), (d, self.experts));
            }
            for (i, &l) in self.tower.iter().enumerate() {
                layer(format!("tower.{h}.{i}"), l);
            }
        }
        out
    }
}

/// The initial multi-task tensors: weights Glorot-uniform, biases zero, each from a generator of
/// its own; a gate's weights start at zero (every expert weighed equally).
pub fn init(layout: &Layout, seed: u64) -> Vec<Vec<f32>> {
    let Some(m) = &layout.mt else {
        return Vec::new();
    };
    m.tensors(layout.deep_in)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, weight))| {
            let n: usize = shape.iter().product();
            if !weight || name.starts_with("gate.") {
                return vec![0.0; n];
            }
            let fan = shape[0] + shape[1];
            let mut rng = Rng::new((seed ^ 0x6d75_6c74_6974).wrapping_add(i as u64 + 1));
            rng.vec(n, (6.0 / fan as f32).sqrt())
        })
        .collect()
}

/// Sets each head's output bias to the logit of its base rate (the labels' mean).
pub fn set_base_rates(layout: &Layout, params: &mut Params, rates: &[f32]) {
    let Some(m) = &layout.mt else {
        return;
    };
    for (h, &r) in rates.iter().enumerate().take(m.heads.len()) {
        let p = r.clamp(1e-4, 1.0 - 1e-4);
        params.mt[m.tower(h, m.tower.len() - 1) + 1][0] = (p / (1.0 - p)).ln();
    }
}

/// What the forward pass keeps for the backward pass.
#[derive(Debug, Default)]
pub(super) struct Cache {
    /// Per expert and layer (`k * L + i`): the layer's output after ReLU.
    expert: Vec<Vec<f32>>,
    /// Per head: the gate's softmax (`[n][K]`), the head's input, the tower layers' outputs
    /// (`h * T + i`; hidden ones after ReLU, the last the logit).
    probs: Vec<Vec<f32>>,
    input: Vec<Vec<f32>>,
    tower: Vec<Vec<f32>>,
}

/// `out = act(input Wᵀ + b)` for `n` rows.
fn dense(
    n: usize,
    (inp, o): (usize, usize),
    input: &[f32],
    w: &[f32],
    b: &[f32],
    relu: bool,
    out: &mut Vec<f32>,
) {
    out.clear();
    for _ in 0..n {
        out.extend_from_slice(b);
    }
    matmul(n, o, inp, out, input, inp, w, 1, inp as isize, true);
    if relu {
        out.iter_mut().for_each(|v| *v = v.max(0.0));
    }
}

/// A layer's gradients from `dz` (`[n][out]`, the gradient of its pre-activation): `dW = dzᵀ
/// input`, `db` the column sums, and the input's gradient `dz W` into `dinput`.
#[allow(clippy::too_many_arguments)]
fn backward(
    n: usize,
    (inp, o): (usize, usize),
    input: &[f32],
    w: &[f32],
    dz: &[f32],
    gw: &mut [f32],
    gb: &mut [f32],
    dinput: &mut Vec<f32>,
) {
    matmul_strided(
        o,
        inp,
        n,
        gw,
        dz,
        (1, o as isize),
        input,
        (inp as isize, 1),
        false,
    );
    gb.fill(0.0);
    for row in dz.chunks_exact(o) {
        gb.iter_mut().zip(row).for_each(|(s, d)| *s += d);
    }
    dinput.clear();
    dinput.resize(n * inp, 0.0);
    matmul(n, inp, o, dinput, dz, o, w, inp as isize, 1, false);
}

impl CpuCompute {
    /// The experts, gates and towers on the deep input `self.x` (`n` rows); each row's head
    /// logits go to `self.logits` (`n` rows of one per head).
    pub(super) fn mt_forward(&mut self, l: &Layout, m: &MtSpec, p: &Params, n: usize) {
        let (k, nl, nt, nh) = (m.experts, m.layers.len(), m.tower.len(), m.heads.len());
        let c = &mut self.mt;
        c.expert.resize(k * nl, Vec::new());
        c.probs.resize(nh, Vec::new());
        c.input.resize(nh, Vec::new());
        c.tower.resize(nh * nt, Vec::new());
        for e in 0..k {
            for (i, &shape) in m.layers.iter().enumerate() {
                let (done, rest) = c.expert.split_at_mut(e * nl + i);
                let input: &[f32] = if i == 0 {
                    &self.x
                } else {
                    &done[e * nl + i - 1]
                };
                let t = m.expert(e, i);
                dense(n, shape, input, &p.mt[t], &p.mt[t + 1], true, &mut rest[0]);
            }
        }
        let eo = m.layers[nl - 1].1;
        self.logits.clear();
        self.logits.resize(n * nh, 0.0);
        for h in 0..nh {
            let input = &mut c.input[h];
            input.clear();
            if k == 1 {
                input.extend_from_slice(&c.expert[nl - 1]);
            } else {
                let g = m.gate(h);
                let probs = &mut c.probs[h];
                dense(
                    n,
                    (l.deep_in, k),
                    &self.x,
                    &p.mt[g],
                    &p.mt[g + 1],
                    false,
                    probs,
                );
                input.resize(n * eo, 0.0);
                for (b, row) in probs.chunks_exact_mut(k).enumerate() {
                    let max = row.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
                    row.iter_mut().for_each(|v| *v = (*v - max).exp());
                    let sum: f32 = row.iter().sum();
                    row.iter_mut().for_each(|v| *v /= sum);
                    for (e, &pe) in row.iter().enumerate() {
                        let out = &c.expert[e * nl + nl - 1][b * eo..(b + 1) * eo];
                        for (x, v) in input[b * eo..(b + 1) * eo].iter_mut().zip(out) {
                            *x += pe * v;
                        }
                    }
                }
            }
            for (i, &shape) in m.tower.iter().enumerate() {
                let (done, rest) = c.tower.split_at_mut(h * nt + i);
                let input: &[f32] = if i == 0 {
                    &c.input[h]
                } else {
                    &done[h * nt + i - 1]
                };
                let t = m.tower(h, i);
                dense(
                    n,
                    shape,
                    input,
                    &p.mt[t],
                    &p.mt[t + 1],
                    i + 1 < nt,
                    &mut rest[0],
                );
            }
            for (b, &z) in c.tower[h * nt + nt - 1].iter().enumerate() {
                self.logits[b * nh + h] = z;
            }
        }
    }

    /// The loss of the heads' logits in `self.logits` against `labels` (row `r`'s head `h` at
    /// `labels[r * H + h]`; NaN: the row has no label for that head and teaches it nothing), and every multi-task gradient into `g.mt`; adds the deep input's
    /// gradient to `dx`. Returns the summed weighted loss.
    pub(super) fn mt_backward(
        &mut self,
        l: &Layout,
        p: &Params,
        labels: &[f32],
        rows: &[usize],
        g: &mut Grads,
        dx: &mut [f32],
    ) -> f64 {
        let m = l.mt.as_ref().expect("a multi-task layout");
        let n = rows.len();
        let (k, nl, nt, nh) = (m.experts, m.layers.len(), m.tower.len(), m.heads.len());
        let d = l.deep_in;
        let eo = m.layers[nl - 1].1;
        let inv = 1.0 / n as f32;
        let mut loss = 0f64;
        let c = &self.mt;
        let mut d_expert = vec![vec![0f32; n * eo]; k];
        let (mut dz, mut dinput) = (Vec::new(), Vec::new());
        for h in 0..nh {
            let w = m.weights[h];
            dz.clear();
            for (b, &r) in rows.iter().enumerate() {
                let (y, z) = (labels[r * nh + h], self.logits[b * nh + h]);
                // A row without this head's label (NaN) adds nothing to its loss.
                if y.is_nan() {
                    dz.push(0.0);
                    continue;
                }
                loss += f64::from(w * ((-z.abs()).exp().ln_1p() + z.max(0.0) - y * z));
                dz.push(w * (sigmoid(z) - y) * inv);
            }
            for i in (0..nt).rev() {
                let input: &[f32] = if i == 0 {
                    &c.input[h]
                } else {
                    &c.tower[h * nt + i - 1]
                };
                let t = m.tower(h, i);
                let (gw, gb) = pair(&mut g.mt, t);
                backward(n, m.tower[i], input, &p.mt[t], &dz, gw, gb, &mut dinput);
                if i > 0 {
                    relu_grad(&mut dinput, input);
                }
                std::mem::swap(&mut dz, &mut dinput);
            }
            // `dz` is now the gradient of the head's input.
            if k == 1 {
                d_expert[0].iter_mut().zip(&dz).for_each(|(a, b)| *a += b);
                continue;
            }
            let probs = &c.probs[h];
            let mut da = vec![0f32; n * k];
            for b in 0..n {
                let dm = &dz[b * eo..(b + 1) * eo];
                let s = &probs[b * k..(b + 1) * k];
                let mut ds = vec![0f32; k];
                for e in 0..k {
                    let out = &c.expert[e * nl + nl - 1][b * eo..(b + 1) * eo];
                    ds[e] = dm.iter().zip(out).map(|(a, v)| a * v).sum();
                    for (de, &v) in d_expert[e][b * eo..(b + 1) * eo].iter_mut().zip(dm) {
                        *de += s[e] * v;
                    }
                }
                let mean: f32 = s.iter().zip(&ds).map(|(a, b)| a * b).sum();
                for e in 0..k {
                    da[b * k + e] = s[e] * (ds[e] - mean);
                }
            }
            let t = m.gate(h);
            let (gw, gb) = pair(&mut g.mt, t);
            backward(n, (d, k), &self.x, &p.mt[t], &da, gw, gb, &mut dinput);
            dx.iter_mut().zip(&dinput).for_each(|(a, b)| *a += b);
        }
        for (e, de) in d_expert.into_iter().enumerate() {
            dz = de;
            relu_grad(&mut dz, &c.expert[e * nl + nl - 1]);
            for i in (0..nl).rev() {
                let input: &[f32] = if i == 0 {
                    &self.x
                } else {
                    &c.expert[e * nl + i - 1]
                };
                let t = m.expert(e, i);
                let (gw, gb) = pair(&mut g.mt, t);
                backward(n, m.layers[i], input, &p.mt[t], &dz, gw, gb, &mut dinput);
                if i > 0 {
                    relu_grad(&mut dinput, input);
                    std::mem::swap(&mut dz, &mut dinput);
                } else {
                    dx.iter_mut().zip(&dinput).for_each(|(a, b)| *a += b);
                }
            }
        }
        loss
    }
}

/// Zeroes the gradient where the ReLU's output was not positive.
fn relu_grad(grad: &mut [f32], out: &[f32]) {
    for (g, &o) in grad.iter_mut().zip(out) {
        if o <= 0.0 {
            *g = 0.0;
        }
    }
}

/// Tensors `t` and `t + 1` (a weight and its bias), both mutable.
fn pair(v: &mut [Vec<f32>], t: usize) -> (&mut [f32], &mut [f32]) {
    let (a, b) = v.split_at_mut(t + 1);
    (&mut a[t], &mut b[0])
}
