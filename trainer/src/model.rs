//! Parameters, the forward and backward passes ([`Compute`], with the CPU implementation
//! [`CpuCompute`]) and the optimizers: Adam for the dense layers, Adagrad applied sparsely (only
//! the rows a batch touched) for embeddings and wide weights.
//!
//! The math is the serving math of `docs/model.md`; the test `served_scores_equal_trainer_eval`
//! proves the written model scores the same in `rankd`.

use std::collections::HashMap;

use rankd_engine::cpu::{matmul, matmul_strided};
use rankd_feature_ops::{CompiledSpec, SlotBatch};
use rankd_formats::config::{ModelConfig, TensorMap};
use rankd_formats::synth::Rng;
use rankd_formats::Pooling;

use crate::error::{Result, TrainError};

mod multitask;
pub use multitask::{init as init_mt, set_base_rates, MtSpec};

/// An embedding table's place in the network.
#[derive(Clone, Debug)]
pub struct EmbSpec {
    /// Its slot.
    pub slot: usize,
    /// Slot name.
    pub name: String,
    /// Rows (the slot's id count).
    pub rows: usize,
    /// Dimension.
    pub dim: usize,
    /// Mean pooling (else sum).
    pub mean: bool,
    /// First column in the deep input.
    pub col: usize,
}

/// DCN-v2 cross layers in the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CrossSpec {
    /// How many layers.
    pub layers: usize,
    /// 0: full-rank; `r`: `W = U Vᵀ`.
    pub rank: usize,
    /// Parallel to the deep tower (else stacked below it).
    pub parallel: bool,
}

impl CrossSpec {
    /// Tensors per layer: `weight, bias` or `u, v, bias`.
    pub fn per_layer(&self) -> usize {
        if self.rank == 0 {
            2
        } else {
            3
        }
    }

    /// Names, shapes and whether L2 applies, of every cross tensor of a deep input of width
    /// `d`, in [`Params::cross`] order (the model config's order).
    pub fn tensors(&self, d: usize) -> Vec<(String, Vec<usize>, bool)> {
        let mut out = Vec::new();
        for i in 0..self.layers {
            if self.rank == 0 {
                out.push((format!("cross.{i}.weight"), vec![d, d], true));
            } else {
                out.push((format!("cross.{i}.u"), vec![d, self.rank], true));
                out.push((format!("cross.{i}.v"), vec![d, self.rank], true));
            }
            out.push((format!("cross.{i}.bias"), vec![d], false));
        }
        if self.parallel {
            out.push(("cross.output".into(), vec![d], true));
        }
        out
    }
}

/// The shapes of the network, from the model config.
#[derive(Clone, Debug)]
pub struct Layout {
    /// Embedding tables.
    pub emb: Vec<EmbSpec>,
    /// Dense slots and their deep-input column.
    pub dense: Vec<(usize, usize)>,
    /// Wide slots: (slot, name, rows).
    pub wide: Vec<(usize, String, usize)>,
    /// Whether there is a wide part (and so a wide bias).
    pub has_wide: bool,
    /// Deep layers (in, out).
    pub layers: Vec<(usize, usize)>,
    /// The FM term.
    pub fm: bool,
    /// Deep input width.
    pub deep_in: usize,
    /// DCN-v2 cross layers over the deep input.
    pub cross: Option<CrossSpec>,
    /// Batch normalization of every hidden layer's pre-activation in training (a training
    /// setting, `[train] batch_norm`: the written model has it folded into the layers).
    pub batch_norm: bool,
    /// Dropout on the hidden layers' outputs in training (`[train] dropout`; inverted: kept
    /// units scaled by `1 / (1 - dropout)`, so serving computes nothing for it).
    pub dropout: f32,
    /// Multi-task heads (then `layers` is empty: the experts and towers are here).
    pub mt: Option<MtSpec>,
}

impl Layout {
    /// Hidden layers (every deep layer but the output layer).
    pub fn hidden(&self) -> usize {
        self.layers.len().saturating_sub(1)
    }

    /// Labels and predictions per example: the number of heads (1 for a single-task model).
    pub fn heads(&self) -> usize {
        self.mt.as_ref().map_or(1, |m| m.heads.len())
    }

    /// The layout of `config` over the compiled spec.
    pub fn new(config: &ModelConfig, spec: &CompiledSpec) -> Result<Layout> {
        config.tensors()?;
        let slot = |n: &str| spec.slot_index(n).expect("checked by ModelConfig::tensors");
        let ids = |s: usize| spec.slots()[s].kind.num_ids().unwrap_or(0) as usize;
        let mut col = 0;
        let mut emb = Vec::new();
        for e in &config.embeddings {
            let s = slot(&e.slot);
            emb.push(EmbSpec {
                slot: s,
                name: e.slot.clone(),
                rows: ids(s),
                dim: e.dim as usize,
                mean: e.pooling == Pooling::Mean,
                col,
            });
            col += e.dim as usize;
        }
        let mut dense = Vec::new();
        let mut layers = Vec::new();
        if let Some(d) = &config.deep {
            for n in &d.dense {
                dense.push((slot(n), col));
                col += 1;
            }
            if config.multitask().is_none() {
                let mut width = col;
                for &out in &d.layers {
                    layers.push((width, out as usize));
                    width = out as usize;
                }
            }
        }
        let wide = config
            .wide
            .as_ref()
            .map(|w| {
                w.slots
                    .iter()
                    .map(|n| (slot(n), n.clone(), ids(slot(n))))
                    .collect()
            })
            .unwrap_or_default();
        if config.fm && emb.windows(2).any(|w| w[0].dim != w[1].dim) {
            return Err(TrainError::Config("fm needs equal embedding dims".into()));
        }
        Ok(Layout {
            emb,
            dense,
            wide,
            has_wide: config.wide.is_some(),
            layers,
            fm: config.fm,
            deep_in: col,
            batch_norm: false,
            dropout: 0.0,
            mt: MtSpec::new(config, col),
            cross: config.cross.as_ref().map(|c| CrossSpec {
                layers: c.layers as usize,
                rank: c.rank as usize,
                parallel: c.structure == rankd_formats::CrossStructure::Parallel,
            }),
        })
    }
}

/// All trainable parameters.
#[derive(Clone, Debug, Default)]
pub struct Params {
    /// Embedding tables, row-major.
    pub emb: Vec<Vec<f32>>,
    /// Wide weights per wide slot.
    pub wide: Vec<Vec<f32>>,
    /// Wide bias.
    pub wide_bias: f32,
    /// Layer weights `[out][in]`.
    pub w: Vec<Vec<f32>>,
    /// Layer biases.
    pub b: Vec<Vec<f32>>,
    /// Cross tensors, in [`CrossSpec::tensors`] order.
    pub cross: Vec<Vec<f32>>,
    /// Batch normalization: per hidden layer its scale γ and shift β (`[γ0, β0, γ1, β1, ...]`);
    /// empty without it.
    pub bn: Vec<Vec<f32>>,
    /// Batch normalization's running mean and variance per hidden layer (`[μ0, σ²0, ...]`).
    pub bn_stats: Vec<Vec<f32>>,
    /// Multi-task tensors, in [`MtSpec::tensors`] order.
    pub mt: Vec<Vec<f32>>,
}

/// Batch normalization's ε.
pub const BN_EPS: f32 = 1e-5;
/// The running statistics' momentum: `stat = m * stat + (1 - m) * batch`.
pub const BN_MOMENTUM: f32 = 0.9;

impl Params {
    /// Random initialization: small uniform embeddings, zero wide weights, Glorot-uniform
    /// layers, and the wide bias at the logit of `base_rate`. Every embedding row and every
    /// layer is drawn from a generator of its own ([`init_row`], [`init_layer`]), so a parameter
    /// server shard can create a row the first time it is touched and get the same values.
    pub fn init(layout: &Layout, seed: u64, base_rate: f32) -> Params {
        Params {
            emb: layout
                .emb
                .iter()
                .enumerate()
                .map(|(t, e)| {
                    let mut v = vec![0.0; e.rows * e.dim];
                    for (r, row) in v.chunks_exact_mut(e.dim.max(1)).enumerate() {
                        init_row(seed, t, r as u64, row);
                    }
                    v
                })
                .collect(),
            wide: layout.wide.iter().map(|(_, _, n)| vec![0.0; *n]).collect(),
            wide_bias: initial_wide_bias(layout, base_rate),
            w: (0..layout.layers.len())
                .map(|i| init_layer(layout, seed, i))
                .collect(),
            b: layout.layers.iter().map(|&(_, o)| vec![0.0; o]).collect(),
            cross: init_cross(layout, seed),
            bn: bn_init(layout, 1.0, 0.0),
            bn_stats: bn_init(layout, 0.0, 1.0),
            mt: multitask::init(layout, seed),
        }
    }

    /// Every parameter tensor, in a fixed order (for checkpoints). The wide bias is a
    /// one-element slice.
    pub fn tensors_mut(&mut self) -> Vec<&mut [f32]> {
        let mut v: Vec<&mut [f32]> = Vec::new();
        v.extend(self.emb.iter_mut().map(|t| t.as_mut_slice()));
        v.extend(self.wide.iter_mut().map(|t| t.as_mut_slice()));
        v.push(std::slice::from_mut(&mut self.wide_bias));
        v.extend(self.w.iter_mut().map(|t| t.as_mut_slice()));
        v.extend(self.b.iter_mut().map(|t| t.as_mut_slice()));
        v.extend(self.cross.iter_mut().map(|t| t.as_mut_slice()));
        v.extend(self.bn.iter_mut().map(|t| t.as_mut_slice()));
        v.extend(self.bn_stats.iter_mut().map(|t| t.as_mut_slice()));
        v.extend(self.mt.iter_mut().map(|t| t.as_mut_slice()));
        v
    }

    /// Every dense tensor trained with Adam, in a fixed order: the layers' weights, their
    /// biases, the cross tensors, batch normalization's γ and β per hidden layer, the
    /// multi-task tensors ([`Optimizer::dense_moments_mut`] gives their state in the same
    /// order).
    pub fn dense(&self) -> Vec<&Vec<f32>> {
        self.w
            .iter()
            .chain(&self.b)
            .chain(&self.cross)
            .chain(&self.bn)
            .chain(&self.mt)
            .collect()
    }

    /// [`Params::dense`], to write.
    pub fn dense_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.split_mut().0
    }

    /// [`Params::dense_mut`] and, beside it, the sparse tables, the wide bias and the running
    /// statistics: `(dense, emb, wide, wide_bias, bn_stats)`.
    #[allow(clippy::type_complexity)]
    fn split_mut(
        &mut self,
    ) -> (
        Vec<&mut Vec<f32>>,
        &mut [Vec<f32>],
        &mut [Vec<f32>],
        &mut f32,
        &mut [Vec<f32>],
    ) {
        let Params {
            emb,
            wide,
            wide_bias,
            w,
            b,
            cross,
            bn,
            bn_stats,
            mt,
        } = self;
        let dense = w
            .iter_mut()
            .chain(b.iter_mut())
            .chain(cross.iter_mut())
            .chain(bn.iter_mut())
            .chain(mt.iter_mut())
            .collect();
        (dense, emb, wide, wide_bias, bn_stats)
    }

    /// Deep layer `i`'s weights and bias as served: with batch normalization folded in
    /// (`W' = diag(s) W`, `b' = s (b - μ) + β`, `s = γ / sqrt(σ² + ε)`), else as they are.
    pub fn served_layer(&self, layout: &Layout, i: usize) -> (Vec<f32>, Vec<f32>) {
        if self.bn.is_empty() || i >= layout.hidden() {
            return (self.w[i].clone(), self.b[i].clone());
        }
        let (inp, out) = layout.layers[i];
        let (gamma, beta) = (&self.bn[2 * i], &self.bn[2 * i + 1]);
        let (mean, var) = (&self.bn_stats[2 * i], &self.bn_stats[2 * i + 1]);
        let mut w = self.w[i].clone();
        let mut b = self.b[i].clone();
        for o in 0..out {
            let s = gamma[o] / (var[o] + BN_EPS).sqrt();
            w[o * inp..(o + 1) * inp].iter_mut().for_each(|x| *x *= s);
            b[o] = (b[o] - mean[o]) * s + beta[o];
        }
        (w, b)
    }

    /// The tensors `rankd_formats::config::write_model` expects.
    pub fn tensors(&self, layout: &Layout) -> TensorMap {
        let mut t = TensorMap::new();
        for (e, v) in layout.emb.iter().zip(&self.emb) {
            t.insert(
                format!("embedding.{}", e.name),
                (vec![e.rows as u64, e.dim as u64], v.clone()),
            );
        }
        for ((_, name, n), v) in layout.wide.iter().zip(&self.wide) {
            t.insert(format!("wide.{name}"), (vec![*n as u64], v.clone()));
        }
        if layout.has_wide {
            t.insert("wide.bias".into(), (vec![1], vec![self.wide_bias]));
        }
        for (i, &(inp, out)) in layout.layers.iter().enumerate() {
            let (w, b) = self.served_layer(layout, i);
            t.insert(
                format!("deep.{i}.weight"),
                (vec![out as u64, inp as u64], w),
            );
            t.insert(format!("deep.{i}.bias"), (vec![out as u64], b));
        }
        if let Some(c) = &layout.cross {
            for ((name, shape, _), v) in c.tensors(layout.deep_in).into_iter().zip(&self.cross) {
                t.insert(name, (shape.iter().map(|&x| x as u64).collect(), v.clone()));
            }
        }
        if let Some(m) = &layout.mt {
            for ((name, shape, _), v) in m.tensors(layout.deep_in).into_iter().zip(&self.mt) {
                t.insert(name, (shape.iter().map(|&x| x as u64).collect(), v.clone()));
            }
        }
        t
    }
}

/// The initial values of row `row` of embedding table `table`: uniform in `[-0.05, 0.05)` from a
/// generator seeded by the seed, the table and the row alone.
pub fn init_row(seed: u64, table: usize, row: u64, out: &mut [f32]) {
    let mut rng = Rng::new(
        (seed ^ 0x7261_6e6b)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add((table as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93))
            .wrapping_add(row.wrapping_mul(0xA076_1D64_78BD_642F)),
    );
    out.iter_mut().for_each(|v| *v = rng.uniform(0.05));
}

/// The initial weights of deep layer `i` (Glorot-uniform, `[out][in]`).
pub fn init_layer(layout: &Layout, seed: u64, i: usize) -> Vec<f32> {
    let (inp, out) = layout.layers[i];
    let mut rng = Rng::new((seed ^ 0x006c_6179_6572).wrapping_add(i as u64 + 1));
    rng.vec(inp * out, (6.0 / (inp + out) as f32).sqrt())
}

/// Per hidden layer two vectors of its width, filled with `a` and `b` (empty without batch
/// normalization).
fn bn_init(layout: &Layout, a: f32, b: f32) -> Vec<Vec<f32>> {
    if !layout.batch_norm {
        return Vec::new();
    }
    layout.layers[..layout.hidden()]
        .iter()
        .flat_map(|&(_, o)| [vec![a; o], vec![b; o]])
        .collect()
}

/// The initial cross tensors: weights Glorot-uniform, biases zero, each from a generator of its
/// own.
pub fn init_cross(layout: &Layout, seed: u64) -> Vec<Vec<f32>> {
    let Some(c) = &layout.cross else {
        return Vec::new();
    };
    c.tensors(layout.deep_in)
        .into_iter()
        .enumerate()
        .map(|(i, (_, shape, weight))| {
            let n: usize = shape.iter().product();
            if !weight {
                return vec![0.0; n];
            }
            let fan = shape[0] + shape.get(1).copied().unwrap_or(1);
            let mut rng = Rng::new((seed ^ 0x0063_726f_7373).wrapping_add(i as u64 + 1));
            rng.vec(n, (6.0 / fan as f32).sqrt())
        })
        .collect()
}

/// The wide bias before training: the logit of `base_rate` (0 without a wide part).
pub fn initial_wide_bias(layout: &Layout, base_rate: f32) -> f32 {
    let p = base_rate.clamp(1e-4, 1.0 - 1e-4);
    if layout.has_wide {
        (p / (1.0 - p)).ln()
    } else {
        0.0
    }
}

/// Rounds the embedding tables the model file stores as f16 or int8 to what the file will hold,
/// in place: the weights then equal what the daemon serves (the trainer evaluates those).
pub fn round_stored_tables(config: &ModelConfig, params: &mut Params) {
    for (e, t) in config.embeddings.iter().zip(params.emb.iter_mut()) {
        round_as_stored(e.weight_type, e.dim as usize, t);
    }
}

/// Rounds a table of rows of `dim` values as `weight_type` stores it.
pub fn round_as_stored(weight_type: rankd_formats::WeightType, dim: usize, v: &mut [f32]) {
    match weight_type {
        rankd_formats::WeightType::F32 => {}
        rankd_formats::WeightType::F16 => round_f16(v),
        rankd_formats::WeightType::I8 => {
            let mut q = Vec::new();
            for row in v.chunks_exact_mut(dim.max(1)) {
                let scale = rankd_formats::quantize_row(row, &mut q);
                for (x, &q) in row.iter_mut().zip(&q) {
                    *x = f32::from(q) * scale;
                }
            }
        }
    }
}

/// Rounds every value to the nearest f16 (ties to even), kept as f32.
pub fn round_f16(v: &mut [f32]) {
    for x in v {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

/// The Adagrad accumulator's starting value, of every sparse row and of the wide bias.
pub const ADAGRAD_INIT: f32 = 0.1;

/// Gradients of the rows of one table that a batch touched.
#[derive(Clone, Debug, Default)]
pub struct SparseGrad {
    dim: usize,
    index: HashMap<u32, usize>,
    /// Touched rows, in first-touch order.
    pub rows: Vec<u32>,
    /// Their gradients, `rows.len() * dim`.
    pub values: Vec<f32>,
}

impl SparseGrad {
    /// Empty gradients of a table of dimension `dim`.
    pub fn new(dim: usize) -> Self {
        SparseGrad {
            dim,
            ..Default::default()
        }
    }

    /// The table's dimension.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Forgets every row, keeping the allocations.
    pub fn clear(&mut self) {
        self.index.clear();
        self.rows.clear();
        self.values.clear();
    }

    /// Replaces the contents (gradients received from another process).
    pub fn set(&mut self, rows: Vec<u32>, values: Vec<f32>) -> std::result::Result<(), String> {
        if values.len() != rows.len() * self.dim {
            return Err(format!(
                "{} values for {} rows of dim {}",
                values.len(),
                rows.len(),
                self.dim
            ));
        }
        self.index = rows.iter().enumerate().map(|(i, &r)| (r, i)).collect();
        if self.index.len() != rows.len() {
            return Err("a row appears twice".into());
        }
        self.rows = rows;
        self.values = values;
        Ok(())
    }

    /// Adds `scale` times every row of `other`.
    pub fn merge(&mut self, other: &SparseGrad, scale: f32) {
        for (j, &row) in other.rows.iter().enumerate() {
            self.add(
                row,
                scale,
                &other.values[j * other.dim..(j + 1) * other.dim],
            );
        }
    }

    fn add(&mut self, row: u32, scale: f32, g: &[f32]) {
        let dim = self.dim;
        let at = *self.index.entry(row).or_insert_with(|| {
            self.rows.push(row);
            self.values.resize(self.values.len() + dim, 0.0);
            self.rows.len() - 1
        });
        for (d, v) in self.values[at * dim..(at + 1) * dim].iter_mut().zip(g) {
            *d += scale * v;
        }
    }
}

/// The gradients of one step.
#[derive(Clone, Debug)]
pub struct Grads {
    /// Per embedding table.
    pub emb: Vec<SparseGrad>,
    /// Per wide slot.
    pub wide: Vec<SparseGrad>,
    /// Wide bias.
    pub wide_bias: f32,
    /// Layer weights.
    pub w: Vec<Vec<f32>>,
    /// Layer biases.
    pub b: Vec<Vec<f32>>,
    /// Cross tensors.
    pub cross: Vec<Vec<f32>>,
    /// Batch normalization's γ and β.
    pub bn: Vec<Vec<f32>>,
    /// The batch's mean and variance per hidden layer (averaged like gradients when workers'
    /// gradients are merged), which the optimizer folds into the running statistics.
    pub bn_batch: Vec<Vec<f32>>,
    /// Multi-task tensors.
    pub mt: Vec<Vec<f32>>,
}

impl Grads {
    /// Zero gradients for `layout`.
    pub fn new(layout: &Layout) -> Grads {
        Grads {
            emb: layout.emb.iter().map(|e| SparseGrad::new(e.dim)).collect(),
            wide: layout.wide.iter().map(|_| SparseGrad::new(1)).collect(),
            wide_bias: 0.0,
            w: layout
                .layers
                .iter()
                .map(|&(i, o)| vec![0.0; i * o])
                .collect(),
            b: layout.layers.iter().map(|&(_, o)| vec![0.0; o]).collect(),
            cross: layout.cross.map_or(Vec::new(), |c| {
                c.tensors(layout.deep_in)
                    .iter()
                    .map(|(_, s, _)| vec![0.0; s.iter().product()])
                    .collect()
            }),
            bn: bn_init(layout, 0.0, 0.0),
            bn_batch: bn_init(layout, 0.0, 0.0),
            mt: layout.mt.as_ref().map_or(Vec::new(), |m| {
                m.tensors(layout.deep_in)
                    .iter()
                    .map(|(_, s, _)| vec![0.0; s.iter().product()])
                    .collect()
            }),
        }
    }

    /// Adds `scale` times `other` (the gradients of another worker's shard).
    pub fn merge(&mut self, other: &Grads, scale: f32) {
        for (a, b) in self.emb.iter_mut().zip(&other.emb) {
            a.merge(b, scale);
        }
        for (a, b) in self.wide.iter_mut().zip(&other.wide) {
            a.merge(b, scale);
        }
        self.wide_bias += scale * other.wide_bias;
        for (a, b) in self
            .w
            .iter_mut()
            .chain(self.b.iter_mut())
            .chain(self.cross.iter_mut())
            .chain(self.bn.iter_mut())
            .chain(self.bn_batch.iter_mut())
            .chain(self.mt.iter_mut())
            .zip(
                other
                    .w
                    .iter()
                    .chain(&other.b)
                    .chain(&other.cross)
                    .chain(&other.bn)
                    .chain(&other.bn_batch)
                    .chain(&other.mt),
            )
        {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += scale * y);
        }
    }

    /// The dense gradients, in `Params::dense` order (layers' weights, biases, cross tensors,
    /// batch normalization's γ and β, multi-task tensors).
    pub fn dense(&self) -> Vec<&Vec<f32>> {
        self.w
            .iter()
            .chain(&self.b)
            .chain(&self.cross)
            .chain(&self.bn)
            .chain(&self.mt)
            .collect()
    }

    /// [`Grads::dense`], to write.
    pub fn dense_mut(&mut self) -> Vec<&mut Vec<f32>> {
        self.w
            .iter_mut()
            .chain(self.b.iter_mut())
            .chain(self.cross.iter_mut())
            .chain(self.bn.iter_mut())
            .chain(self.mt.iter_mut())
            .collect()
    }

    /// Multiplies every gradient by `scale`.
    pub fn scale(&mut self, scale: f32) {
        for g in self.emb.iter_mut().chain(self.wide.iter_mut()) {
            g.values.iter_mut().for_each(|v| *v *= scale);
        }
        self.wide_bias *= scale;
        for a in self
            .w
            .iter_mut()
            .chain(self.b.iter_mut())
            .chain(self.cross.iter_mut())
            .chain(self.bn.iter_mut())
            .chain(self.bn_batch.iter_mut())
            .chain(self.mt.iter_mut())
        {
            a.iter_mut().for_each(|v| *v *= scale);
        }
    }

    fn clear(&mut self) {
        self.emb.iter_mut().for_each(SparseGrad::clear);
        self.wide.iter_mut().for_each(SparseGrad::clear);
        self.wide_bias = 0.0;
        self.w.iter_mut().for_each(|g| g.fill(0.0));
        self.b.iter_mut().for_each(|g| g.fill(0.0));
        self.cross.iter_mut().for_each(|g| g.fill(0.0));
        self.bn.iter_mut().for_each(|g| g.fill(0.0));
        self.bn_batch.iter_mut().for_each(|g| g.fill(0.0));
        self.mt.iter_mut().for_each(|g| g.fill(0.0));
    }
}

/// Worker compute: the forward and backward passes of a batch. The CPU implementation is
/// [`CpuCompute`]; a cuBLAS one can take its place.
pub trait Compute {
    /// Computes the gradients of the mean log loss over `rows` into `grads` (cleared first)
    /// and returns the summed loss.
    fn step(
        &mut self,
        layout: &Layout,
        params: &Params,
        slots: &SlotBatch,
        labels: &[f32],
        rows: &[usize],
        grads: &mut Grads,
    ) -> f64;
    /// Predicted probabilities of `rows`.
    fn predict(
        &mut self,
        layout: &Layout,
        params: &Params,
        slots: &SlotBatch,
        rows: &[usize],
        out: &mut Vec<f32>,
    );
}

/// The CPU worker, with its activations kept between forward and backward.
#[derive(Debug, Default)]
pub struct CpuCompute {
    /// Whether the pass is a training step (batch statistics, dropout) or a prediction.
    training: bool,
    /// The state of the dropout masks' generator.
    rng_state: u64,
    /// Batch normalization, per hidden layer: the normalized pre-activations, the inverse
    /// standard deviations, and the batch's mean and variance (`[μ0, σ²0, ...]`).
    bn_xhat: Vec<Vec<f32>>,
    bn_inv: Vec<Vec<f32>>,
    bn_batch: Vec<Vec<f32>>,
    x: Vec<f32>,
    /// Cross layers: the inputs `x_l` of each layer and the last output, each layer's product
    /// `t_l = W x_l + b`, and a low-rank layer's middle `p_l = V x_l`.
    xs: Vec<Vec<f32>>,
    ts: Vec<Vec<f32>>,
    ps: Vec<Vec<f32>>,
    hs: Vec<Vec<f32>>,
    logits: Vec<f32>,
    fm_sum: Vec<f32>,
    dz: Vec<f32>,
    dh: Vec<f32>,
    dx: Vec<f32>,
    /// Multi-task activations.
    mt: multitask::Cache,
}

fn sigmoid(x: f32) -> f32 {
    rankd_engine::sigmoid(x)
}

impl CpuCompute {
    fn forward(&mut self, l: &Layout, p: &Params, slots: &SlotBatch, rows: &[usize]) {
        let n = rows.len();
        let k = l.deep_in;
        self.x.clear();
        self.x.resize(n * k, 0.0);
        for (t, e) in l.emb.iter().enumerate() {
            let table = &p.emb[t];
            for (b, &r) in rows.iter().enumerate() {
                let ids = slots.ids(e.slot, r);
                let dst = &mut self.x[b * k + e.col..b * k + e.col + e.dim];
                for &id in ids {
                    let row = &table[id as usize * e.dim..(id as usize + 1) * e.dim];
                    dst.iter_mut().zip(row).for_each(|(d, v)| *d += v);
                }
                if e.mean && ids.len() > 1 {
                    let c = ids.len() as f32;
                    dst.iter_mut().for_each(|d| *d /= c);
                }
            }
        }
        for &(slot, col) in &l.dense {
            for (b, &r) in rows.iter().enumerate() {
                self.x[b * k + col] = slots.dense(slot, r);
            }
        }
        if let Some(m) = &l.mt {
            self.mt_forward(l, m, p, n);
            return;
        }
        self.logits.clear();
        self.logits.resize(n, 0.0);
        if let Some(c) = l.cross {
            self.cross_forward(&c, k, p, n);
        }
        let stacked = l.cross.is_some_and(|c| !c.parallel);
        self.hs.resize(l.layers.len(), Vec::new());
        for (i, &(inp, out)) in l.layers.iter().enumerate() {
            let (prev, rest) = self.hs.split_at_mut(i);
            let input: &[f32] = match i {
                0 if stacked => &self.xs[l.cross.map_or(0, |c| c.layers)],
                0 => &self.x,
                _ => &prev[i - 1],
            };
            let h = &mut rest[0];
            h.clear();
            for _ in 0..n {
                h.extend_from_slice(&p.b[i]);
            }
            matmul(n, out, inp, h, input, inp, &p.w[i], 1, inp as isize, true);
            if i + 1 < l.layers.len() {
                if l.batch_norm {
                    self.bn_xhat.resize(l.hidden(), Vec::new());
                    self.bn_inv.resize(l.hidden(), Vec::new());
                    self.bn_batch.resize(2 * l.hidden(), Vec::new());
                    let (xh, inv) = (&mut self.bn_xhat[i], &mut self.bn_inv[i]);
                    xh.resize(n * out, 0.0);
                    inv.resize(out, 0.0);
                    let (mean, var) = if self.training {
                        let mut mean = vec![0f32; out];
                        let mut var = vec![0f32; out];
                        for row in h.chunks_exact(out) {
                            mean.iter_mut().zip(row).for_each(|(m, v)| *m += v);
                        }
                        mean.iter_mut().for_each(|m| *m /= n as f32);
                        for row in h.chunks_exact(out) {
                            for ((s, v), m) in var.iter_mut().zip(row).zip(&mean) {
                                *s += (v - m) * (v - m);
                            }
                        }
                        var.iter_mut().for_each(|s| *s /= n as f32);
                        self.bn_batch[2 * i] = mean.clone();
                        self.bn_batch[2 * i + 1] = var.clone();
                        (mean, var)
                    } else {
                        (p.bn_stats[2 * i].clone(), p.bn_stats[2 * i + 1].clone())
                    };
                    for (o, iv) in inv.iter_mut().enumerate() {
                        *iv = 1.0 / (var[o] + BN_EPS).sqrt();
                    }
                    let (gamma, beta) = (&p.bn[2 * i], &p.bn[2 * i + 1]);
                    for (row, xrow) in h.chunks_exact_mut(out).zip(xh.chunks_exact_mut(out)) {
                        for o in 0..out {
                            xrow[o] = (row[o] - mean[o]) * inv[o];
                            row[o] = gamma[o] * xrow[o] + beta[o];
                        }
                    }
                }
                h.iter_mut().for_each(|v| *v = v.max(0.0));
                if self.training && l.dropout > 0.0 {
                    let mut rng = Rng::from_state(self.rng_state);
                    let keep = 1.0 / (1.0 - l.dropout);
                    let cut = (f64::from(l.dropout) * u64::MAX as f64) as u64;
                    for v in h.iter_mut() {
                        *v = if rng.next_u64() < cut { 0.0 } else { *v * keep };
                    }
                    self.rng_state = rng.state();
                }
            }
        }
        if let Some(last) = self.hs.last() {
            self.logits.copy_from_slice(&last[..n]);
        }
        if let Some(c) = l.cross.filter(|c| c.parallel) {
            let w = p
                .cross
                .last()
                .expect("a parallel cross network has output weights");
            for (b, logit) in self.logits.iter_mut().enumerate() {
                *logit += self.xs[c.layers][b * k..(b + 1) * k]
                    .iter()
                    .zip(w)
                    .map(|(x, w)| x * w)
                    .sum::<f32>();
            }
        }
        if l.has_wide {
            for (b, &r) in rows.iter().enumerate() {
                let mut w = p.wide_bias;
                for (j, (slot, _, _)) in l.wide.iter().enumerate() {
                    for &id in slots.ids(*slot, r) {
                        w += p.wide[j][id as usize];
                    }
                }
                self.logits[b] += w;
            }
        }
        if l.fm {
            let dim = l.emb[0].dim;
            self.fm_sum.clear();
            self.fm_sum.resize(n * dim, 0.0);
            for b in 0..n {
                let mut sq = 0.0;
                for e in &l.emb {
                    let v = &self.x[b * k + e.col..b * k + e.col + dim];
                    let acc = &mut self.fm_sum[b * dim..(b + 1) * dim];
                    for (a, x) in acc.iter_mut().zip(v) {
                        *a += x;
                        sq += x * x;
                    }
                }
                let total: f32 = self.fm_sum[b * dim..(b + 1) * dim]
                    .iter()
                    .map(|s| s * s)
                    .sum();
                self.logits[b] += 0.5 * (total - sq);
            }
        }
    }
}

/// The starting state of the dropout masks' generator of a worker seeded by `seed`.
pub fn dropout_state(seed: u64) -> u64 {
    Rng::new(seed ^ 0x0064_726f_706f_7574).state()
}

/// Draws the dropout masks of one training step of `n` examples from the generator state
/// `state` (advanced): per hidden layer, in order, one value per output (row-major), 0 for a
/// dropped unit and `1 / (1 - dropout)` for a kept one; exactly the draws `CpuCompute` makes.
pub fn dropout_masks(layout: &Layout, n: usize, state: &mut u64) -> Vec<Vec<f32>> {
    if layout.dropout <= 0.0 {
        return Vec::new();
    }
    let mut rng = Rng::from_state(*state);
    let keep = 1.0 / (1.0 - layout.dropout);
    let cut = (f64::from(layout.dropout) * u64::MAX as f64) as u64;
    let masks = layout.layers[..layout.hidden()]
        .iter()
        .map(|&(_, out)| {
            (0..n * out)
                .map(|_| if rng.next_u64() < cut { 0.0 } else { keep })
                .collect()
        })
        .collect();
    *state = rng.state();
    masks
}

impl CpuCompute {
    /// A worker whose dropout masks ([`Layout::dropout`]) come from a generator seeded by
    /// `seed` (workers of one run take different seeds).
    pub fn with_seed(seed: u64) -> CpuCompute {
        CpuCompute {
            rng_state: dropout_state(seed),
            ..CpuCompute::default()
        }
    }

    /// The cross layers on the deep input `self.x` (`n` rows of `d`): `x_{l+1} = x0 ⊙ (W x_l +
    /// b) + x_l`, keeping what the backward pass needs.
    fn cross_forward(&mut self, c: &CrossSpec, d: usize, p: &Params, n: usize) {
        let per = c.per_layer();
        self.xs.resize(c.layers + 1, Vec::new());
        self.ts.resize(c.layers, Vec::new());
        self.ps.resize(c.layers, Vec::new());
        self.xs[0].clear();
        self.xs[0].extend_from_slice(&self.x);
        for li in 0..c.layers {
            let base = li * per;
            let bias = &p.cross[base + per - 1];
            let t = &mut self.ts[li];
            t.clear();
            for _ in 0..n {
                t.extend_from_slice(bias);
            }
            if c.rank == 0 {
                // t += x_l Wᵀ.
                matmul(
                    n,
                    d,
                    d,
                    t,
                    &self.xs[li],
                    d,
                    &p.cross[base],
                    1,
                    d as isize,
                    true,
                );
            } else {
                let r = c.rank;
                let pm = &mut self.ps[li];
                pm.clear();
                pm.resize(n * r, 0.0);
                // p = x_l V (V is [d][r]); t += p Uᵀ (U is [d][r]).
                matmul(
                    n,
                    r,
                    d,
                    pm,
                    &self.xs[li],
                    d,
                    &p.cross[base + 1],
                    r as isize,
                    1,
                    false,
                );
                matmul(n, d, r, t, pm, r, &p.cross[base], 1, r as isize, true);
            }
            let (done, next) = self.xs.split_at_mut(li + 1);
            let next = &mut next[0];
            next.clear();
            next.extend(
                done[li]
                    .iter()
                    .zip(&self.x)
                    .zip(self.ts[li].iter())
                    .map(|((xl, x0), t)| xl + x0 * t),
            );
        }
    }

    /// The cross layers' gradients, from `g` (the gradient of the last layer's output) and, for
    /// a parallel network, `dlogit`; adds the gradient of the deep input to `dx0`.
    #[allow(clippy::too_many_arguments)]
    fn cross_backward(
        &mut self,
        c: &CrossSpec,
        d: usize,
        p: &Params,
        gr: &mut Grads,
        n: usize,
        mut g: Vec<f32>,
        dx0: &mut [f32],
    ) {
        let per = c.per_layer();
        let mut dt = vec![0f32; n * d];
        let mut prev = vec![0f32; n * d];
        for li in (0..c.layers).rev() {
            let base = li * per;
            let t = &self.ts[li];
            for i in 0..n * d {
                dt[i] = g[i] * self.x[i];
                dx0[i] += g[i] * t[i];
            }
            let db = &mut gr.cross[base + per - 1];
            db.fill(0.0);
            for row in dt.chunks_exact(d) {
                db.iter_mut().zip(row).for_each(|(s, v)| *s += v);
            }
            let xl = &self.xs[li];
            if c.rank == 0 {
                // dW = dtᵀ x_l; dx_l = g + dt W.
                matmul_strided(
                    d,
                    d,
                    n,
                    &mut gr.cross[base],
                    &dt,
                    (1, d as isize),
                    xl,
                    (d as isize, 1),
                    false,
                );
                matmul(
                    n,
                    d,
                    d,
                    &mut prev,
                    &dt,
                    d,
                    &p.cross[base],
                    d as isize,
                    1,
                    false,
                );
            } else {
                let r = c.rank;
                let pm = &self.ps[li];
                // dU = dtᵀ p; dp = dt U; dV = x_lᵀ dp; dx_l = g + dp Vᵀ.
                matmul_strided(
                    d,
                    r,
                    n,
                    &mut gr.cross[base],
                    &dt,
                    (1, d as isize),
                    pm,
                    (r as isize, 1),
                    false,
                );
                let mut dp = vec![0f32; n * r];
                matmul(
                    n,
                    r,
                    d,
                    &mut dp,
                    &dt,
                    d,
                    &p.cross[base],
                    r as isize,
                    1,
                    false,
                );
                matmul_strided(
                    d,
                    r,
                    n,
                    &mut gr.cross[base + 1],
                    xl,
                    (1, d as isize),
                    &dp,
                    (r as isize, 1),
                    false,
                );
                matmul(
                    n,
                    d,
                    r,
                    &mut prev,
                    &dp,
                    r,
                    &p.cross[base + 1],
                    1,
                    r as isize,
                    false,
                );
            }
            for (pv, gv) in prev.iter_mut().zip(&g) {
                *pv += gv;
            }
            std::mem::swap(&mut g, &mut prev);
        }
        // x_0 is the deep input itself.
        dx0.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
    }
}

impl Compute for CpuCompute {
    fn step(
        &mut self,
        l: &Layout,
        p: &Params,
        slots: &SlotBatch,
        labels: &[f32],
        rows: &[usize],
        g: &mut Grads,
    ) -> f64 {
        g.clear();
        self.training = true;
        self.forward(l, p, slots, rows);
        self.training = false;
        let n = rows.len();
        let k = l.deep_in;
        if l.mt.is_some() {
            let mut dx = std::mem::take(&mut self.dx);
            dx.clear();
            dx.resize(n * k, 0.0);
            let loss = self.mt_backward(l, p, labels, rows, g, &mut dx);
            scatter_emb(l, slots, rows, &dx, g);
            self.dx = dx;
            return loss;
        }
        let inv = 1.0 / n as f32;
        let mut loss = 0f64;
        // dL/dlogit per example.
        let mut dlogit = vec![0f32; n];
        for (b, &r) in rows.iter().enumerate() {
            let y = labels[r];
            let z = self.logits[b];
            let pr = sigmoid(z);
            // log(1 + e^-|z|) + max(z, 0) - y z: the stable form of the log loss.
            loss += f64::from((-z.abs()).exp().ln_1p() + z.max(0.0) - y * z);
            dlogit[b] = (pr - y) * inv;
        }
        // Wide.
        if l.has_wide {
            g.wide_bias = dlogit.iter().sum();
            for (j, (slot, _, _)) in l.wide.iter().enumerate() {
                for (b, &r) in rows.iter().enumerate() {
                    for &id in slots.ids(*slot, r) {
                        g.wide[j].add(id, dlogit[b], &[1.0]);
                    }
                }
            }
        }
        // Deep, from the top. `dx`: the gradient of the deep input's embedding columns.
        let emb_width: usize = l.emb.iter().map(|e| e.dim).sum();
        let mut dx = std::mem::take(&mut self.dx);
        dx.clear();
        dx.resize(n * k, 0.0);
        if !l.layers.is_empty() {
            self.dz.clear();
            self.dz.extend_from_slice(&dlogit);
            for i in (0..l.layers.len()).rev() {
                let (inp, out) = l.layers[i];
                let input: &[f32] = match (i, l.cross) {
                    (0, Some(c)) if !c.parallel => &self.xs[c.layers],
                    (0, _) => &self.x,
                    _ => &self.hs[i - 1],
                };
                // dW = dZᵀ H_in, dZᵀ read through its strides (no copy).
                matmul_strided(
                    out,
                    inp,
                    n,
                    &mut g.w[i],
                    &self.dz,
                    (1, out as isize),
                    input,
                    (inp as isize, 1),
                    false,
                );
                // db: dZ's column sums.
                g.b[i].fill(0.0);
                for row in self.dz.chunks_exact(out) {
                    g.b[i].iter_mut().zip(row).for_each(|(s, d)| *s += d);
                }
                // dH_in = dZ W. Below the first layer only the embedding columns (the first
                // `emb_width` of the input) have anything to learn: the dense inputs' columns
                // are not computed (none at all for a model without embeddings); under cross
                // layers every column is.
                let width = if i == 0 && l.cross.is_none() {
                    emb_width
                } else {
                    inp
                };
                self.dh.clear();
                self.dh.resize(n * width, 0.0);
                matmul(
                    n,
                    width,
                    out,
                    &mut self.dh,
                    &self.dz,
                    out,
                    &p.w[i],
                    inp as isize,
                    1,
                    false,
                );
                if i == 0 {
                    if width > 0 && l.cross.is_none() {
                        for (d, h) in dx.chunks_exact_mut(k).zip(self.dh.chunks_exact(width)) {
                            d[..width].copy_from_slice(h);
                        }
                    }
                } else {
                    // Through the dropout and the ReLU of the layer below (a dropped unit is
                    // 0, a kept one was scaled).
                    let below = &self.hs[i - 1];
                    let keep = 1.0 / (1.0 - l.dropout);
                    self.dz.clear();
                    self.dz.extend(self.dh.iter().zip(below).map(|(d, h)| {
                        if *h > 0.0 {
                            *d * keep
                        } else {
                            0.0
                        }
                    }));
                    // Through its batch normalization, with the batch's statistics.
                    if l.batch_norm {
                        let j = i - 1;
                        let out = l.layers[j].1;
                        let (xh, inv) = (&self.bn_xhat[j], &self.bn_inv[j]);
                        let gamma = &p.bn[2 * j];
                        let (dgamma, dbeta) = {
                            let (a, b) = g.bn.split_at_mut(2 * j + 1);
                            (&mut a[2 * j], &mut b[0])
                        };
                        dgamma.fill(0.0);
                        dbeta.fill(0.0);
                        let mut sum_dx = vec![0f32; out];
                        let mut sum_dx_x = vec![0f32; out];
                        for (dy, xrow) in self.dz.chunks_exact(out).zip(xh.chunks_exact(out)) {
                            for o in 0..out {
                                dgamma[o] += dy[o] * xrow[o];
                                dbeta[o] += dy[o];
                                let dx = dy[o] * gamma[o];
                                sum_dx[o] += dx;
                                sum_dx_x[o] += dx * xrow[o];
                            }
                        }
                        let nf = n as f32;
                        for (dy, xrow) in self.dz.chunks_exact_mut(out).zip(xh.chunks_exact(out)) {
                            for o in 0..out {
                                let dx = dy[o] * gamma[o];
                                dy[o] = inv[o] / nf * (nf * dx - sum_dx[o] - xrow[o] * sum_dx_x[o]);
                            }
                        }
                    }
                }
            }
        }
        // Cross layers: stacked, the deep layers' input gradient is the cross output's; parallel,
        // it is the deep input's, and the output weights carry the logit's gradient.
        if let Some(c) = l.cross {
            let dmlp = std::mem::take(&mut self.dh);
            let g_last = if c.parallel {
                dx.copy_from_slice(&dmlp[..n * k]);
                let w = p.cross.last().expect("output weights");
                let gw = g.cross.last_mut().expect("output weights");
                gw.fill(0.0);
                let xl = &self.xs[c.layers];
                let mut gl = vec![0f32; n * k];
                for b in 0..n {
                    for j in 0..k {
                        gw[j] += dlogit[b] * xl[b * k + j];
                        gl[b * k + j] = dlogit[b] * w[j];
                    }
                }
                gl
            } else {
                dmlp[..n * k].to_vec()
            };
            self.cross_backward(&c, k, p, g, n, g_last, &mut dx);
            self.dh = dmlp;
        }
        // FM: d fm / d e_f = S - e_f.
        if l.fm {
            let dim = l.emb[0].dim;
            for b in 0..n {
                for e in &l.emb {
                    for d in 0..dim {
                        let v = self.x[b * k + e.col + d];
                        dx[b * k + e.col + d] += dlogit[b] * (self.fm_sum[b * dim + d] - v);
                    }
                }
            }
        }
        scatter_emb(l, slots, rows, &dx, g);
        self.dx = dx;
        for (gb, b) in g.bn_batch.iter_mut().zip(&self.bn_batch) {
            gb.copy_from_slice(b);
        }
        loss
    }

    fn predict(
        &mut self,
        l: &Layout,
        p: &Params,
        slots: &SlotBatch,
        rows: &[usize],
        out: &mut Vec<f32>,
    ) {
        self.forward(l, p, slots, rows);
        out.extend(self.logits.iter().map(|&z| sigmoid(z)));
    }
}

/// Scatters the deep input's gradient `dx` (`rows` rows) into the embedding rows the examples
/// pooled.
fn scatter_emb(l: &Layout, slots: &SlotBatch, rows: &[usize], dx: &[f32], g: &mut Grads) {
    let k = l.deep_in;
    for (t, e) in l.emb.iter().enumerate() {
        for (b, &r) in rows.iter().enumerate() {
            let ids = slots.ids(e.slot, r);
            let scale = if e.mean { 1.0 / ids.len() as f32 } else { 1.0 };
            let gv = &dx[b * k + e.col..b * k + e.col + e.dim];
            for &id in ids {
                g.emb[t].add(id, scale, gv);
            }
        }
    }
}

/// One step's constants: Adam's bias corrections and the learning rates at that step.
#[derive(Clone, Copy, Debug)]
pub struct Hyper {
    pub(crate) c1: f32,
    pub(crate) c2: f32,
    pub(crate) lr_dense: f32,
    pub(crate) lr_sparse: f32,
    pub(crate) l2: f32,
}

/// Adam on one dense tensor; `decay`: whether L2 applies (weights, not biases).
pub fn adam(h: &Hyper, w: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], decay: bool) {
    let (b1, b2, eps) = (0.9f32, 0.999f32, 1e-8f32);
    for i in 0..w.len() {
        let gi = g[i] + if decay { h.l2 * w[i] } else { 0.0 };
        m[i] = b1 * m[i] + (1.0 - b1) * gi;
        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        w[i] -= h.lr_dense * (m[i] / h.c1) / ((v[i] / h.c2).sqrt() + eps);
    }
}

/// Adagrad on one sparse row (L2 on the weights the step touches).
pub fn adagrad_row(h: &Hyper, w: &mut [f32], acc: &mut [f32], g: &[f32]) {
    for ((w, a), g) in w.iter_mut().zip(acc.iter_mut()).zip(g) {
        let gi = g + h.l2 * *w;
        *a += gi * gi;
        *w -= h.lr_sparse * gi / a.sqrt();
    }
}

/// Adagrad on the rows `rows` (distinct) of a table of width `dim` whose weights and
/// accumulators from row `first` on are `w` and `acc`, the rows' gradients `values`
/// (`rows.len() × dim`, row by row): [`adagrad_row`] on each, the rows a few ahead asked of the
/// cache first (a row of a large table is a miss to memory).
pub fn adagrad_rows(
    h: &Hyper,
    w: &mut [f32],
    acc: &mut [f32],
    dim: usize,
    rows: &[u32],
    first: u32,
    values: &[f32],
) {
    const AHEAD: usize = 8;
    for (j, &r) in rows.iter().enumerate() {
        if let Some(&next) = rows.get(j + AHEAD) {
            let at = (next - first) as usize * dim;
            rankd_engine::cpu::prefetch(&w[at..at + dim]);
            rankd_engine::cpu::prefetch(&acc[at..at + dim]);
        }
        let at = (r - first) as usize * dim;
        adagrad_row(
            h,
            &mut w[at..at + dim],
            &mut acc[at..at + dim],
            &values[j * dim..(j + 1) * dim],
        );
    }
}

/// Adagrad on the wide bias (no L2).
pub fn adagrad_bias(h: &Hyper, w: &mut f32, acc: &mut f32, g: f32) {
    *acc += g * g;
    *w -= h.lr_sparse * g / acc.sqrt();
}

/// A dense tensor's update: weights, gradient, Adam moments, whether L2 applies.
type DenseWork<'a> = (
    &'a mut Vec<f32>,
    &'a Vec<f32>,
    &'a mut Vec<f32>,
    &'a mut Vec<f32>,
    bool,
);
/// A row range of a sparse table: weights, Adagrad accumulators, first row, the gradients.
type SparseWork<'a> = (&'a mut [f32], &'a mut [f32], u32, &'a SparseGrad);

/// Applies one shard's updates: Adam on its dense tensors, Adagrad on the touched rows of its
/// row ranges.
fn run_shard(h: &Hyper, dense: Vec<DenseWork<'_>>, sparse: Vec<SparseWork<'_>>) {
    for (w, g, m, v, decay) in dense {
        adam(h, w, g, m, v, decay);
    }
    for (w, acc, first, sg) in sparse {
        let dim = sg.dim.max(1);
        let rows = (w.len() / dim) as u32;
        for (j, &row) in sg.rows.iter().enumerate() {
            if row < first || row >= first + rows {
                continue;
            }
            let base = (row - first) as usize * dim;
            adagrad_row(
                h,
                &mut w[base..base + dim],
                &mut acc[base..base + dim],
                &sg.values[j * dim..(j + 1) * dim],
            );
        }
    }
}

/// Optimizer state: Adam for the dense layers, Adagrad for embeddings and wide weights.
#[derive(Debug, Clone, Default)]
pub struct Optimizer {
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    mb: Vec<Vec<f32>>,
    vb: Vec<Vec<f32>>,
    t: i32,
    /// Adam moments of the cross tensors.
    mc: Vec<Vec<f32>>,
    vc: Vec<Vec<f32>>,
    /// Whether L2 applies to each cross tensor, then to each multi-task tensor.
    named_decay: Vec<bool>,
    /// Adam moments of batch normalization's γ and β.
    mbn: Vec<Vec<f32>>,
    vbn: Vec<Vec<f32>>,
    /// Adam moments of the multi-task tensors.
    mm: Vec<Vec<f32>>,
    vm: Vec<Vec<f32>>,
    acc_emb: Vec<Vec<f32>>,
    acc_wide: Vec<Vec<f32>>,
    acc_bias: f32,
    t_f32: f32,
    lr_dense: f32,
    lr_sparse: f32,
    warmup_steps: u32,
    decay: f32,
    decay_steps: u32,
    shards: usize,
    l2: f32,
}

impl Optimizer {
    /// State for `params`.
    pub fn new(params: &Params, lr_dense: f32, lr_sparse: f32, l2: f32) -> Optimizer {
        let zeros = |v: &Vec<Vec<f32>>| v.iter().map(|x| vec![0.0; x.len()]).collect::<Vec<_>>();
        Optimizer {
            m: zeros(&params.w),
            v: zeros(&params.w),
            mb: zeros(&params.b),
            vb: zeros(&params.b),
            t: 0,
            mc: zeros(&params.cross),
            vc: zeros(&params.cross),
            named_decay: Vec::new(),
            mbn: zeros(&params.bn),
            vbn: zeros(&params.bn),
            mm: zeros(&params.mt),
            vm: zeros(&params.mt),
            acc_emb: params
                .emb
                .iter()
                .map(|x| vec![ADAGRAD_INIT; x.len()])
                .collect(),
            acc_wide: params
                .wide
                .iter()
                .map(|x| vec![ADAGRAD_INIT; x.len()])
                .collect(),
            acc_bias: ADAGRAD_INIT,
            t_f32: 0.0,
            lr_dense,
            lr_sparse,
            warmup_steps: 0,
            decay: 1.0,
            decay_steps: 1,
            shards: 1,
            l2,
        }
    }

    /// A learning-rate schedule, a function of the step count only (so worker replicas and
    /// resumed runs follow it exactly): linear warm-up over `warmup_steps`, then a factor of
    /// `decay` every `decay_steps` steps.
    pub fn with_schedule(mut self, warmup_steps: u32, decay: f32, decay_steps: u32) -> Self {
        self.warmup_steps = warmup_steps;
        self.decay = decay;
        self.decay_steps = decay_steps.max(1);
        self
    }

    /// The learning-rate multiplier at step `t` (1-based).
    pub fn lr_factor(&self, t: i32) -> f32 {
        let t = t.max(1) as f32;
        let warm = if self.warmup_steps > 0 {
            (t / self.warmup_steps as f32).min(1.0)
        } else {
            1.0
        };
        warm * self.decay.powf(t / self.decay_steps as f32)
    }

    /// Every state tensor, in a fixed order (for checkpoints); the step count and the bias
    /// accumulator travel as one-element slices (the step as f32: exact up to 2^24 steps).
    pub fn tensors_mut(&mut self) -> Vec<&mut [f32]> {
        self.t_f32 = self.t as f32;
        let mut v: Vec<&mut [f32]> = Vec::new();
        for group in [
            &mut self.m,
            &mut self.v,
            &mut self.mb,
            &mut self.vb,
            &mut self.acc_emb,
            &mut self.acc_wide,
            &mut self.mc,
            &mut self.vc,
            &mut self.mbn,
            &mut self.vbn,
            &mut self.mm,
            &mut self.vm,
        ] {
            v.extend(group.iter_mut().map(|t| t.as_mut_slice()));
        }
        v.push(std::slice::from_mut(&mut self.acc_bias));
        v.push(std::slice::from_mut(&mut self.t_f32));
        v
    }

    /// Takes the step count back after [`Self::tensors_mut`] was loaded.
    pub fn sync_step(&mut self) {
        self.t = self.t_f32 as i32;
    }

    /// Which cross and multi-task tensors L2 applies to (weights, not biases), from the layout.
    pub fn with_layout(mut self, layout: &Layout) -> Self {
        let cross = layout
            .cross
            .map_or(Vec::new(), |c| c.tensors(layout.deep_in));
        let mt = layout
            .mt
            .as_ref()
            .map_or(Vec::new(), |m| m.tensors(layout.deep_in));
        self.named_decay = cross.into_iter().chain(mt).map(|(_, _, w)| w).collect();
        self
    }

    /// Hold and update the parameters as `shards` shards (dense tensors by name, embedding and
    /// wide rows by id range), each shard updated by its own thread. The result is the same as
    /// one shard: every element's update is independent of the others.
    pub fn with_shards(mut self, shards: usize) -> Self {
        self.shards = shards.max(1);
        self
    }

    /// The constants of step `t` (1-based).
    pub fn hyper(&self, t: i32) -> Hyper {
        let (b1, b2) = (0.9f32, 0.999f32);
        let factor = self.lr_factor(t);
        Hyper {
            c1: 1.0 - b1.powi(t),
            c2: 1.0 - b2.powi(t),
            lr_dense: self.lr_dense * factor,
            lr_sparse: self.lr_sparse * factor,
            l2: self.l2,
        }
    }

    /// The step count (steps applied so far).
    pub fn steps(&self) -> i32 {
        self.t
    }

    /// Starts a step whose dense update happens elsewhere (on the GPUs): counts it and returns
    /// its constants, for [`Self::apply_sparse`] and the devices' Adam.
    pub fn begin_step(&mut self) -> Hyper {
        self.t += 1;
        self.hyper(self.t)
    }

    /// The sparse half of [`Self::apply`] for the step [`Self::begin_step`] started: Adagrad on
    /// the touched rows of the embedding tables and wide weights, and on the wide bias. With
    /// the dense half done by Adam on the same constants, the two equal one [`Self::apply`].
    pub fn apply_sparse(&mut self, h: &Hyper, p: &mut Params, g: &Grads) {
        let tables = p
            .emb
            .iter_mut()
            .zip(self.acc_emb.iter_mut())
            .zip(&g.emb)
            .chain(p.wide.iter_mut().zip(self.acc_wide.iter_mut()).zip(&g.wide));
        let sparse: Vec<SparseWork<'_>> = tables
            .map(|((w, acc), sg)| (w.as_mut_slice(), acc.as_mut_slice(), 0, sg))
            .collect();
        run_shard(h, Vec::new(), sparse);
        adagrad_bias(h, &mut p.wide_bias, &mut self.acc_bias, g.wide_bias);
    }

    /// The sparse state: Adagrad's accumulators of the embedding tables, of the wide weights,
    /// and of the wide bias (the GPU trainer updates the rows its devices pushed).
    pub fn sparse_state_mut(&mut self) -> (&mut [Vec<f32>], &mut [Vec<f32>], &mut f32) {
        let (_, emb, wide, bias) = self.state_mut();
        (emb, wide, bias)
    }

    /// Adam's state of every dense tensor, in [`Params::dense`] order: the moments `(m, v)` and
    /// whether L2 applies (the GPU trainer keeps them on the devices and brings them back for
    /// checkpoints).
    pub fn dense_moments_mut(&mut self) -> Vec<(&mut Vec<f32>, &mut Vec<f32>, bool)> {
        self.state_mut().0
    }

    /// [`Self::dense_moments_mut`] and, beside it, [`Self::sparse_state_mut`].
    #[allow(clippy::type_complexity)]
    fn state_mut(
        &mut self,
    ) -> (
        Vec<(&mut Vec<f32>, &mut Vec<f32>, bool)>,
        &mut [Vec<f32>],
        &mut [Vec<f32>],
        &mut f32,
    ) {
        let Optimizer {
            m,
            v,
            mb,
            vb,
            mc,
            vc,
            mbn,
            vbn,
            mm,
            vm,
            named_decay,
            acc_emb,
            acc_wide,
            acc_bias,
            ..
        } = self;
        // Cross tensors, then multi-task tensors: L2 as the layout says (`with_layout`).
        let named = |i: usize| named_decay.get(i).copied().unwrap_or(true);
        let cross = mc.len();
        let mut out: Vec<(&mut Vec<f32>, &mut Vec<f32>, bool)> = Vec::new();
        out.extend(m.iter_mut().zip(v.iter_mut()).map(|(m, v)| (m, v, true)));
        out.extend(mb.iter_mut().zip(vb.iter_mut()).map(|(m, v)| (m, v, false)));
        let crosses = mc.iter_mut().zip(vc.iter_mut()).enumerate();
        out.extend(crosses.map(|(i, (m, v))| (m, v, named(i))));
        out.extend(
            mbn.iter_mut()
                .zip(vbn.iter_mut())
                .map(|(m, v)| (m, v, false)),
        );
        let tasks = mm.iter_mut().zip(vm.iter_mut()).enumerate();
        out.extend(tasks.map(|(i, (m, v))| (m, v, named(cross + i))));
        (out, acc_emb, acc_wide, acc_bias)
    }

    /// Applies one step of gradients.
    pub fn apply(&mut self, p: &mut Params, g: &Grads) {
        self.t += 1;
        let h = self.hyper(self.t);
        let shards = self.shards;
        let (moments, acc_emb, acc_wide, acc_bias) = self.state_mut();
        // Dense tensors, dealt to the shards by their place in the list (every tensor's update
        // is independent of the others').
        let mut dense: Vec<Vec<DenseWork<'_>>> = (0..shards).map(|_| Vec::new()).collect();
        let (params, emb, wide, wide_bias, bn_stats) = p.split_mut();
        let work = params.into_iter().zip(g.dense()).zip(moments);
        for (k, ((w, g), (m, v, decay))) in work.enumerate() {
            dense[k % shards].push((w, g, m, v, decay));
        }
        // The running statistics follow the batches.
        for (s, b) in bn_stats.iter_mut().zip(&g.bn_batch) {
            for (s, b) in s.iter_mut().zip(b) {
                *s = BN_MOMENTUM * *s + (1.0 - BN_MOMENTUM) * b;
            }
        }
        // Sparse tables, cut into one contiguous row range per shard.
        let mut sparse: Vec<Vec<SparseWork<'_>>> = (0..shards).map(|_| Vec::new()).collect();
        let tables = emb
            .iter_mut()
            .zip(acc_emb.iter_mut())
            .zip(&g.emb)
            .chain(wide.iter_mut().zip(acc_wide.iter_mut()).zip(&g.wide));
        for ((w, acc), sg) in tables {
            let dim = sg.dim.max(1);
            let rows = w.len() / dim;
            let per = rows.div_ceil(shards).max(1);
            for (s, (wc, ac)) in w
                .chunks_mut(per * dim)
                .zip(acc.chunks_mut(per * dim))
                .enumerate()
            {
                sparse[s].push((wc, ac, (s * per) as u32, sg));
            }
        }
        if shards == 1 {
            run_shard(
                &h,
                dense.pop().unwrap_or_default(),
                sparse.pop().unwrap_or_default(),
            );
        } else {
            std::thread::scope(|scope| {
                for (d, sp) in dense.into_iter().zip(sparse) {
                    let h = &h;
                    scope.spawn(move || run_shard(h, d, sp));
                }
            });
        }
        adagrad_bias(&h, wide_bias, acc_bias, g.wide_bias);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Finite-difference checks of every gradient.

    use super::*;
    use rankd_feature_ops::Value;
    use rankd_formats::config::{DeepConfig, EmbeddingConfig, WideConfig};
    use rankd_formats::synth::synthetic_features;

    fn setup() -> (Layout, Params, SlotBatch, Vec<f32>) {
        setup_with(None, false, 0.0)
    }

    fn setup_with(
        cross: Option<rankd_formats::config::CrossConfig>,
        batch_norm: bool,
        dropout: f32,
    ) -> (Layout, Params, SlotBatch, Vec<f32>) {
        setup_config(cross, batch_norm, dropout, |_| {})
    }

    /// A multi-task variant: no wide part or FM, `[5, 4]` experts, three heads with labels
    /// row by row.
    pub(crate) fn setup_mt(experts: u32, tower: &[u32]) -> (Layout, Params, SlotBatch, Vec<f32>) {
        let (l, p, s, _) = setup_config(None, false, 0.0, |c| {
            c.wide = None;
            c.fm = false;
            if let Some(d) = c.deep.as_mut() {
                d.layers = vec![5, 4];
            }
            c.heads = ["click", "like", "share"]
                .iter()
                .enumerate()
                .map(|(i, n)| rankd_formats::config::HeadConfig {
                    name: (*n).into(),
                    label: None,
                    threshold: None,
                    weight: 1.0 - 0.3 * i as f32,
                })
                .collect();
            c.multitask = Some(rankd_formats::config::MultiTaskConfig {
                experts,
                tower: tower.to_vec(),
            });
        });
        let y = vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0];
        (l, p, s, y)
    }

    /// A small model of every part (four embedding tables, one mean-pooled; wide; deep with
    /// two dense inputs; FM) as `edit` changes it, with parameters, four examples and labels.
    pub(crate) fn setup_config(
        cross: Option<rankd_formats::config::CrossConfig>,
        batch_norm: bool,
        dropout: f32,
        edit: impl FnOnce(&mut ModelConfig),
    ) -> (Layout, Params, SlotBatch, Vec<f32>) {
        let features = synthetic_features(40);
        let mut config = ModelConfig {
            hash_seed: 0,
            features: features.features.clone(),
            slots: features.slots.clone(),
            embeddings: ["age_bucket", "city", "tags", "item"]
                .iter()
                .map(|s| EmbeddingConfig {
                    slot: (*s).into(),
                    dim: 3,
                    pooling: if *s == "tags" {
                        Pooling::Mean
                    } else {
                        Pooling::Sum
                    },
                    weight_type: Default::default(),
                })
                .collect(),
            wide: Some(WideConfig {
                slots: vec!["age_x_city".into(), "hour".into()],
            }),
            deep: Some(DeepConfig {
                dense: vec!["age".into(), "price".into()],
                layers: vec![5, 4, 1],
            }),
            fm: true,
            cross,
            heads: vec![],
            multitask: None,
        };
        edit(&mut config);
        let spec = CompiledSpec::compile(&config.feature_spec()).unwrap();
        let mut layout = Layout::new(&config, &spec).unwrap();
        layout.batch_norm = batch_norm;
        layout.dropout = dropout;
        let mut params = Params::init(&layout, 3, 0.3);
        let mut rng = Rng::new(9);
        for w in &mut params.wide {
            for v in w.iter_mut() {
                *v = rng.uniform(0.3);
            }
        }
        let mut slots = SlotBatch::new();
        let tags = [
            vec!["news", "film"],
            vec![],
            vec!["zzz"],
            vec!["sport", "news", "food"],
        ];
        let cities = ["Paris", "Oslo", "Nowhere", "Lima"];
        for i in 0..4 {
            let row = vec![
                Value::F64(20.0 + 11.0 * i as f64),
                Value::Str(cities[i]),
                Value::Int(i as i64 * 5),
                Value::Int(i as i64),
                Value::StrList(&tags[i]),
                Value::F64(i as f64),
            ];
            spec.transform_row(&row, &mut slots).unwrap();
        }
        (layout, params, slots, vec![1.0, 0.0, 0.0, 1.0])
    }

    fn loss(l: &Layout, p: &Params, s: &SlotBatch, y: &[f32]) -> f64 {
        let mut c = CpuCompute::default();
        let mut g = Grads::new(l);
        c.step(l, p, s, y, &[0, 1, 2, 3], &mut g) / 4.0
    }

    #[test]
    fn sharded_updates_equal_one_shard() {
        let (l, p, s, y) = setup();
        let mut c = CpuCompute::default();
        let mut g = Grads::new(&l);
        c.step(&l, &p, &s, &y, &[0, 1, 2, 3], &mut g);
        let mut one = (p.clone(), Optimizer::new(&p, 0.01, 0.1, 1e-3));
        let mut three = (
            p.clone(),
            Optimizer::new(&p, 0.01, 0.1, 1e-3).with_shards(3),
        );
        for _ in 0..3 {
            one.1.apply(&mut one.0, &g);
            three.1.apply(&mut three.0, &g);
        }
        assert_eq!(one.0.emb, three.0.emb);
        assert_eq!(one.0.wide, three.0.wide);
        assert_eq!(one.0.w, three.0.w);
        assert_eq!(one.0.b, three.0.b);
        assert_eq!(one.0.wide_bias, three.0.wide_bias);
        assert_ne!(one.0.w, p.w, "the updates changed something");
    }

    #[test]
    fn learning_rate_schedule() {
        let (_, p, _, _) = setup();
        let opt = Optimizer::new(&p, 1.0, 1.0, 0.0).with_schedule(10, 0.5, 100);
        assert!((opt.lr_factor(1) - 0.1 * 0.5f32.powf(0.01)).abs() < 1e-6);
        assert!((opt.lr_factor(10) - 0.5f32.powf(0.1)).abs() < 1e-6);
        assert!((opt.lr_factor(200) - 0.25).abs() < 1e-6);
        let flat = Optimizer::new(&p, 1.0, 1.0, 0.0);
        assert_eq!(flat.lr_factor(1), 1.0);
        assert_eq!(flat.lr_factor(12345), 1.0);
    }

    #[test]
    fn gradients_match_finite_differences() {
        use rankd_formats::config::CrossConfig;
        use rankd_formats::CrossStructure::{Parallel, Stacked};
        for cross in [
            None,
            Some((0, Stacked)),
            Some((0, Parallel)),
            Some((3, Stacked)),
            Some((3, Parallel)),
        ] {
            let cross = cross.map(|(rank, structure)| CrossConfig {
                layers: 2,
                rank,
                structure,
            });
            gradients_match_finite_differences_of(cross, false, 0.0);
        }
        // Batch normalization (batch statistics in training), dropout (the same masks in every
        // pass: each starts from a fresh generator), both with cross layers too.
        gradients_match_finite_differences_of(None, true, 0.0);
        gradients_match_finite_differences_of(None, false, 0.3);
        gradients_match_finite_differences_of(
            Some(CrossConfig {
                layers: 2,
                rank: 0,
                structure: Parallel,
            }),
            true,
            0.3,
        );
    }

    #[test]
    fn multitask_gradients_match_finite_differences() {
        // MMoE with a tower, MMoE with a bare output, a shared bottom.
        for (experts, tower) in [(3, &[3, 1][..]), (2, &[1][..]), (1, &[3, 1][..])] {
            let (l, mut p, s, y) = setup_mt(experts, tower);
            // Gates and biases away from zero, so that every path matters.
            let mut rng = Rng::new(17);
            for t in &mut p.mt {
                for v in t.iter_mut() {
                    *v += rng.uniform(0.3);
                }
            }
            check_gradients(&format!("{experts} experts {tower:?}"), &l, &p, &s, &y);
        }
        // Rows without a head's label (NaN) teach that head nothing and the others as usual.
        let (l, mut p, s, mut y) = setup_mt(3, &[3, 1]);
        let mut rng = Rng::new(17);
        for t in &mut p.mt {
            for v in t.iter_mut() {
                *v += rng.uniform(0.3);
            }
        }
        y[1] = f32::NAN;
        y[6] = f32::NAN;
        check_gradients("missing labels", &l, &p, &s, &y);
    }

    #[test]
    fn multitask_predictions_are_per_head_and_the_loss_is_the_weighted_sum() {
        let (l, p, s, y) = setup_mt(2, &[3, 1]);
        assert_eq!(l.heads(), 3);
        let mut c = CpuCompute::default();
        let mut preds = Vec::new();
        c.predict(&l, &p, &s, &[0, 1, 2, 3], &mut preds);
        assert_eq!(preds.len(), 12);
        let m = l.mt.as_ref().unwrap();
        let mut want = 0f64;
        for (i, (&pr, &y)) in preds.iter().zip(&y).enumerate() {
            let pr = f64::from(pr);
            let ll = -(f64::from(y) * pr.ln() + (1.0 - f64::from(y)) * (1.0 - pr).ln());
            want += f64::from(m.weights[i % 3]) * ll;
        }
        let got = loss(&l, &p, &s, &y) * 4.0;
        assert!((got - want).abs() < 1e-4, "{got} vs {want}");
        // A missing label drops its term, nothing else.
        let mut missing = y.clone();
        missing[4] = f32::NAN;
        let pr = f64::from(preds[4]);
        let term = f64::from(m.weights[1])
            * -(f64::from(y[4]) * pr.ln() + (1.0 - f64::from(y[4])) * (1.0 - pr).ln());
        let got = loss(&l, &p, &s, &missing) * 4.0;
        assert!(
            (got - (want - term)).abs() < 1e-4,
            "{got} vs {}",
            want - term
        );
    }

    fn gradients_match_finite_differences_of(
        cross: Option<rankd_formats::config::CrossConfig>,
        batch_norm: bool,
        dropout: f32,
    ) {
        let (l, mut p, s, y) = setup_with(cross.clone(), batch_norm, dropout);
        // Batch normalization's scale and shift away from 1 and 0.
        let mut rng = Rng::new(33);
        for t in &mut p.bn {
            for v in t.iter_mut() {
                *v += rng.uniform(0.3);
            }
        }
        // Nonzero cross biases, so that every product in the cross layers matters.
        let mut rng = Rng::new(21);
        for t in &mut p.cross {
            for v in t.iter_mut() {
                *v += rng.uniform(0.2);
            }
        }
        let label = format!("{cross:?} bn {batch_norm} dropout {dropout}");
        check_gradients(&label, &l, &p, &s, &y);
    }

    /// Every gradient of a step on the four examples against central differences of the loss.
    fn check_gradients(label: &str, l: &Layout, p: &Params, s: &SlotBatch, y: &[f32]) {
        let (l, p, s, y) = (l.clone(), p.clone(), s, y);
        let mut c = CpuCompute::default();
        let mut g = Grads::new(&l);
        c.step(&l, &p, s, y, &[0, 1, 2, 3], &mut g);
        // Small enough that no ReLU of the deep layers changes sides between the two probes.
        let h = 2e-4f32;
        let what = std::cell::RefCell::new(String::new());
        let check = |analytic: f32, f: &dyn Fn(&mut Params, f32)| {
            let mut a = p.clone();
            f(&mut a, h);
            let mut b = p.clone();
            f(&mut b, -h);
            let numeric = ((loss(&l, &a, s, y) - loss(&l, &b, s, y)) / (2.0 * f64::from(h))) as f32;
            assert!(
                (numeric - analytic).abs() <= 2e-3 + 0.02 * numeric.abs(),
                "{label} {}: numeric {numeric} vs analytic {analytic}",
                what.borrow()
            );
        };
        for i in 0..l.layers.len() {
            *what.borrow_mut() = format!("deep layer {i}");
            for j in [0, g.w[i].len() / 2, g.w[i].len() - 1] {
                check(g.w[i][j], &|p, d| p.w[i][j] += d);
            }
            check(g.b[i][0], &|p, d| p.b[i][0] += d);
        }
        for (t, gb) in g.bn.iter().enumerate() {
            for (j, &gv) in gb.iter().enumerate() {
                *what.borrow_mut() = format!("batch norm tensor {t} element {j}");
                check(gv, &|p, d| p.bn[t][j] += d);
            }
        }
        for (t, gc) in g.mt.iter().enumerate() {
            for j in [0, gc.len() / 3, gc.len() / 2, gc.len() - 1] {
                *what.borrow_mut() = format!("multi-task tensor {t} element {j}");
                check(gc[j], &|p, d| p.mt[t][j] += d);
            }
        }
        for (t, gc) in g.cross.iter().enumerate() {
            for j in [0, gc.len() / 3, gc.len() / 2, gc.len() - 1] {
                *what.borrow_mut() = format!("cross tensor {t} element {j}");
                check(gc[j], &|p, d| p.cross[t][j] += d);
            }
        }
        check(g.wide_bias, &|p, d| p.wide_bias += d);
        for (t, sg) in g.wide.iter().enumerate() {
            for (j, &row) in sg.rows.iter().enumerate() {
                check(sg.values[j], &|p, d| p.wide[t][row as usize] += d);
            }
        }
        for (t, sg) in g.emb.iter().enumerate() {
            *what.borrow_mut() = format!("embedding {t}");
            let dim = l.emb[t].dim;
            for (j, &row) in sg.rows.iter().enumerate() {
                for k in 0..dim {
                    check(sg.values[j * dim + k], &|p, d| {
                        p.emb[t][row as usize * dim + k] += d
                    });
                }
            }
        }
    }
}
