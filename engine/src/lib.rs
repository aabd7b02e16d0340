//! Inference: a [`Model`] (an open model file plus the views the engines need) and the
//! [`InferenceBackend`] trait that the CPU engine ([`cpu::CpuEngine`]) implements, and the GPU
//! backend ([`gpu`]: cuBLAS and our own kernels, fed by every core).
//!
//! The math is in `docs/model.md`. [`reference`] is an independent, deliberately plain f64
//! implementation the tests compare against.

pub mod cpu;
mod fold;
pub mod gpu;
pub mod json;
pub mod kernel;
pub mod overlay;
mod plan;
pub mod reference;
pub mod request;

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use rankd_feature_ops::CompiledSpec;
use rankd_formats::{Activation, BlobRef, ModelFile, Pooling};

pub use request::{FeatureSet, ItemRow, ItemRows, Request, UserRow};

/// Why a request could not be scored.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A request-level feature is bad.
    #[error("request features: {0}")]
    User(#[source] rankd_feature_ops::Error),
    /// An item's feature is bad.
    #[error("item {item}: {source}")]
    Item {
        /// Index of the item in the request.
        item: usize,
        /// What is wrong.
        #[source]
        source: rankd_feature_ops::Error,
    },
    /// The GPU failed this request's batch.
    #[error("GPU: {0}")]
    Device(#[source] gpu::GpuError),
}

/// What a backend produced for a batch of requests: one result per request, each a range of
/// `scores` (one score per item; a multi-task model's default head) or the error that stopped
/// that request alone. A multi-task model's other heads are in `heads`.
#[derive(Debug, Default)]
pub struct BatchOutput {
    /// Scores of all scored requests, back to back.
    pub scores: Vec<f32>,
    /// Per request, in input order.
    pub results: Vec<Result<Range<usize>, EngineError>>,
    /// A multi-task model's heads after the default one: request `i`'s values start at
    /// `head_at[i]`, head by head, one score per item each (see [`BatchOutput::head`]).
    pub heads: Vec<f32>,
    /// Per request, parallel to `results`: where its other heads start in `heads`, and how many
    /// there are (0 for a single-task model).
    pub head_at: Vec<(usize, u32)>,
}

impl BatchOutput {
    /// Clears for reuse, keeping the allocations.
    pub fn clear(&mut self) {
        self.scores.clear();
        self.results.clear();
        self.heads.clear();
        self.head_at.clear();
    }

    /// Adds `n` results, each `Ok(0..0)` until a backend fills it.
    pub(crate) fn begin(&mut self, n: usize) {
        self.results.extend((0..n).map(|_| Ok(0..0)));
        self.head_at.resize(self.results.len(), (0, 0));
    }

    /// Request `i`'s scores of head `h` (0: the default head, the same as [`Self::get`]); `None`
    /// when the model has no head `h`.
    pub fn head(&self, i: usize, h: usize) -> Option<Result<&[f32], &EngineError>> {
        let scores = match self.get(i) {
            Ok(s) => s,
            Err(e) => return Some(Err(e)),
        };
        if h == 0 {
            return Some(Ok(scores));
        }
        let (at, more) = self.head_at.get(i).copied().unwrap_or((0, 0));
        if h > more as usize {
            return None;
        }
        let n = scores.len();
        let start = at + (h - 1) * n;
        Some(Ok(&self.heads[start..start + n]))
    }

    /// The scores of request `i`, or its error.
    pub fn get(&self, i: usize) -> Result<&[f32], &EngineError> {
        match &self.results[i] {
            Ok(r) => Ok(&self.scores[r.clone()]),
            Err(e) => Err(e),
        }
    }
}

/// Scores requests against models. One instance per core: it owns scratch buffers reused
/// across calls, so it takes `&mut self`.
pub trait InferenceBackend {
    /// Short name for logs and metrics (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// Scores every request of `requests` against `model`, appending to `out` one result per
    /// request. A bad request fails alone; the others are scored.
    fn score(&mut self, model: &Model, requests: &[&dyn Request], out: &mut BatchOutput);
}

/// An embedding table as the engines use it.
#[derive(Clone, Debug)]
pub(crate) struct EmbView {
    pub slot: usize,
    pub dim: usize,
    pub mean: bool,
    pub table: BlobRef,
    pub rows: u64,
    /// How `table` stores the values (f16: two per word; int8: four, with `scales`).
    pub weight_type: rankd_formats::WeightType,
    /// An int8 table's per-row scales.
    pub scales: Option<BlobRef>,
    /// First column of its pooled output in the deep input.
    pub col: usize,
}

/// An embedding table's values as stored.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Table<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    I8(&'a [i8], &'a [f32]),
}

/// A dense layer as the engines use it.
#[derive(Clone, Debug)]
pub(crate) struct LayerView {
    pub in_dim: usize,
    pub out_dim: usize,
    pub relu: bool,
    pub weight: BlobRef,
    pub bias: BlobRef,
}

/// One DCN-v2 cross layer as the CPU engine runs it.
#[derive(Clone, Debug)]
pub(crate) struct CrossLayerView {
    /// 0: full-rank (`w` packed `[d][d]`); `r`: `v` (`d` to `r`) then `u` (`r` to `d`).
    pub rank: usize,
    pub w: kernel::Packed,
    pub v: kernel::Packed,
    pub u: kernel::Packed,
    pub bias: BlobRef,
    /// `rank` zeros: the bias of the first low-rank product.
    pub zeros: Vec<f32>,
}

/// The cross network as the CPU engine runs it.
#[derive(Clone, Debug)]
pub(crate) struct CrossView {
    pub layers: Vec<CrossLayerView>,
    /// Parallel: the output weights; stacked: `None`.
    pub output: Option<BlobRef>,
    /// Stacked: the first deep layer packed over the whole deep input in model column order (it
    /// takes the cross output, which has no request-level part).
    pub w1_full: kernel::Packed,
}

impl CrossView {
    fn new(file: &ModelFile, c: &rankd_formats::Cross, deep: &[LayerView]) -> CrossView {
        let layers = c
            .layers
            .iter()
            .map(|l| {
                let d = l.dim as usize;
                let r = l.rank as usize;
                let mut view = CrossLayerView {
                    rank: r,
                    w: kernel::Packed::default(),
                    v: kernel::Packed::default(),
                    u: kernel::Packed::default(),
                    bias: l.bias,
                    zeros: vec![0.0; r],
                };
                if r == 0 {
                    let w = file.weights(l.weight.expect("validated: full rank has a weight"));
                    view.w = kernel::Packed::from_out_in(w, d, d);
                } else {
                    let v = file.weights(l.v.expect("validated: low rank has v"));
                    let u = file.weights(l.u.expect("validated: low rank has u"));
                    view.v = kernel::Packed::new(d, r, |kk, j| v[kk * r + j]);
                    view.u = kernel::Packed::from_out_in(u, d, r);
                }
                view
            })
            .collect();
        let w1_full = match (c.output, deep.first()) {
            (None, Some(l)) => {
                kernel::Packed::from_out_in(file.weights(l.weight), l.out_dim, l.in_dim)
            }
            _ => kernel::Packed::default(),
        };
        CrossView {
            layers,
            output: c.output,
            w1_full,
        }
    }
}

/// A dense layer after the first, packed for the kernel, with its bias.
#[derive(Clone, Debug)]
pub(crate) struct PackedLayer {
    pub packed: kernel::Packed,
    pub bias: Vec<f32>,
    pub out_dim: usize,
}

/// A multi-task head as the CPU engine runs it.
#[derive(Clone, Debug)]
pub(crate) struct HeadView {
    pub name: String,
    /// Its gate's first column in the fused first layer's output (with more than one expert).
    pub gate_col: usize,
    /// Its tower's hidden layers.
    pub hidden: Vec<PackedLayer>,
    /// Its tower's one-wide output layer: weights and bias.
    pub out_w: Vec<f32>,
    pub out_b: f32,
}

/// A multi-task model as the CPU engine runs it. Every expert's first layer and every gate read
/// the deep input, so they run as one fused first layer (`[K e1 + H K][d]`, experts first, then
/// the gates head by head) and take the request-level split together; the rest runs per expert
/// and per head.
#[derive(Clone, Debug)]
pub(crate) struct MultiTaskView {
    /// Experts (1: a shared bottom).
    pub experts: usize,
    /// Width of an expert's first layer.
    pub e1: usize,
    /// Width of an expert's output.
    pub e_out: usize,
    /// The fused first layer, `[out][in]`, and its bias.
    pub w0: Vec<f32>,
    pub b0: Vec<f32>,
    /// Per expert, its layers after the first.
    pub upper: Vec<Vec<PackedLayer>>,
    pub heads: Vec<HeadView>,
}

/// The layers of a multi-task model in their flat order (the order online deltas index them):
/// each expert's layers, expert by expert, then per head its gate (with more than one expert)
/// and its tower's layers.
pub(crate) fn multitask_layers(m: &rankd_formats::MultiTask) -> Vec<&rankd_formats::DenseLayer> {
    let experts = m.experts.iter().flat_map(|e| &e.layers);
    let heads = m.heads.iter().flat_map(|h| h.gate.iter().chain(&h.tower));
    experts.chain(heads).collect()
}

impl MultiTaskView {
    /// The view of `m`, each layer's weights and bias (by flat index, see [`multitask_layers`])
    /// from `layer`.
    fn new<'a>(
        m: &rankd_formats::MultiTask,
        layer: impl Fn(usize) -> (&'a [f32], &'a [f32]),
    ) -> MultiTaskView {
        let k = m.experts.len();
        let flat = multitask_layers(m);
        let index = |l: &rankd_formats::DenseLayer| {
            flat.iter()
                .position(|x| std::ptr::eq(*x, l))
                .expect("a layer of the model")
        };
        let e1 = m.experts[0].layers[0].out_dim as usize;
        let width = k * e1 + if k > 1 { m.heads.len() * k } else { 0 };
        let mut w0 = Vec::with_capacity(width * flat[0].in_dim as usize);
        let mut b0 = Vec::with_capacity(width);
        let first = m.experts.iter().map(|e| &e.layers[0]);
        let gates = m.heads.iter().filter_map(|h| h.gate.as_ref());
        for l in first.chain(gates) {
            let (w, b) = layer(index(l));
            w0.extend_from_slice(w);
            b0.extend_from_slice(b);
        }
        let packed = |l: &rankd_formats::DenseLayer| {
            let (w, b) = layer(index(l));
            PackedLayer {
                packed: kernel::Packed::from_out_in(w, l.out_dim as usize, l.in_dim as usize),
                bias: b.to_vec(),
                out_dim: l.out_dim as usize,
            }
        };
        let upper = m
            .experts
            .iter()
            .map(|e| e.layers[1..].iter().map(packed).collect())
            .collect();
        let heads = m
            .heads
            .iter()
            .enumerate()
            .map(|(h, head)| {
                let (out, hidden) = head.tower.split_last().expect("validated: a tower");
                let (w, b) = layer(index(out));
                HeadView {
                    name: head.name.clone(),
                    gate_col: k * e1 + h * k,
                    hidden: hidden.iter().map(packed).collect(),
                    out_w: w.to_vec(),
                    out_b: b[0],
                }
            })
            .collect();
        MultiTaskView {
            experts: k,
            e1,
            e_out: m.experts[0].layers.last().expect("validated").out_dim as usize,
            w0,
            b0,
            upper,
            heads,
        }
    }

    /// The fused first layer's width.
    pub fn width(&self) -> usize {
        self.b0.len()
    }
}

static NEXT_MODEL_ID: AtomicU64 = AtomicU64::new(1);

/// An open model, ready to score. Immutable; share it through `Arc`.
#[derive(Debug)]
pub struct Model {
    id: u64,
    alive: std::sync::Arc<()>,
    file: std::sync::Arc<ModelFile>,
    pub(crate) emb: Vec<EmbView>,
    /// Dense slots and their deep-input column.
    pub(crate) dense: Vec<(usize, usize)>,
    pub(crate) wide: Vec<(usize, BlobRef)>,
    pub(crate) wide_bias: Option<f32>,
    pub(crate) layers: Vec<LayerView>,
    /// The weights of the hidden layers after the first, packed for the kernel; empty for the
    /// first (packed per request shape by the plans) and the one-wide output layer (a dot
    /// product per row).
    pub(crate) packed: Vec<kernel::Packed>,
    pub(crate) fm: bool,
    /// DCN-v2 cross layers over the deep input (such a model runs without the request-level
    /// split: every cross layer mixes all columns).
    pub(crate) cross: Option<CrossView>,
    /// Multi-task heads: `layers` then holds one layer, the fused first layer (see
    /// [`MultiTaskView`]), and the heads' scores come from here.
    pub(crate) mt: Option<std::sync::Arc<MultiTaskView>>,
    pub(crate) deep_in: usize,
    /// Plans built for this model so far, by any core or by the warm-up before the model was
    /// published: a core meeting a request shape for the first time takes the plan from here
    /// instead of packing the first layer again on the request path.
    pub(crate) plans: std::sync::Mutex<Vec<(FeatureSet, std::sync::Arc<plan::Plan>)>>,
    /// Which GPUs hold this version (set by [`gpu::Gpus::load`]).
    pub(crate) placement: gpu::Placement,
    /// Rows and layers changed by online updates ([`Model::apply`]); empty for a version as
    /// loaded.
    pub(crate) updates: overlay::Updates,
    /// Per embedding table, the table folded into the first layer when the CPU engine folds it
    /// (see [`fold`]).
    pub(crate) folded: Vec<Option<fold::FoldedTable>>,
}

/// How a model is prepared for the engines ([`Model::with_options`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelOptions {
    /// Bytes of memory the CPU engine may spend on embedding tables folded into the first deep
    /// layer (a folded table holds each row's contribution to the first layer: `rows x
    /// first-layer width` f32 values), smallest tables first; 0 folds none. Default 64 MiB.
    pub fold_bytes: usize,
}

impl Default for ModelOptions {
    fn default() -> Self {
        ModelOptions {
            fold_bytes: 64 << 20,
        }
    }
}

impl Model {
    /// Wraps an opened (and so validated) model file, with the default [`ModelOptions`].
    pub fn new(file: ModelFile) -> Model {
        Model::with_options(file, ModelOptions::default())
    }

    /// Wraps an opened (and so validated) model file, prepared as `options` say.
    pub fn with_options(file: ModelFile, options: ModelOptions) -> Model {
        let spec = file.spec().clone();
        let compiled = file.compiled();
        let slot = |name: &str| {
            compiled
                .slot_index(name)
                .expect("slot names were validated at open")
        };
        let mut col = 0;
        let mut emb = Vec::new();
        for e in &spec.architecture.embeddings {
            emb.push(EmbView {
                slot: slot(&e.slot),
                dim: e.dim as usize,
                mean: e.pooling == Pooling::Mean,
                table: e.weights,
                rows: e.rows,
                weight_type: e.weight_type,
                scales: e.scales,
                col,
            });
            col += e.dim as usize;
        }
        let mut dense = Vec::new();
        for d in &spec.architecture.dense_inputs {
            dense.push((slot(d), col));
            col += 1;
        }
        let wide = spec
            .architecture
            .wide
            .as_ref()
            .map(|w| w.slots.iter().map(|s| (slot(&s.slot), s.weights)).collect())
            .unwrap_or_default();
        let mt = spec.architecture.multitask.as_ref().map(|m| {
            let flat = multitask_layers(m);
            std::sync::Arc::new(MultiTaskView::new(m, |i| {
                (file.weights(flat[i].weight), file.weights(flat[i].bias))
            }))
        });
        let mut layers: Vec<LayerView> = spec
            .architecture
            .deep
            .iter()
            .map(|l| LayerView {
                in_dim: l.in_dim as usize,
                out_dim: l.out_dim as usize,
                relu: l.activation == Activation::Relu,
                weight: l.weight,
                bias: l.bias,
            })
            .collect();
        if let (Some(m), Some(mtv)) = (&spec.architecture.multitask, &mt) {
            // The fused first layer; its weights are `mt.w0` (the blobs named here are expert
            // 0's, never read through this view).
            let l = &m.experts[0].layers[0];
            layers.push(LayerView {
                in_dim: col,
                out_dim: mtv.width(),
                relu: false,
                weight: l.weight,
                bias: l.bias,
            });
        }
        let last = layers.len().saturating_sub(1);
        let packed = layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                if i == 0 || i == last {
                    kernel::Packed::default()
                } else {
                    kernel::Packed::from_out_in(file.weights(l.weight), l.out_dim, l.in_dim)
                }
            })
            .collect();
        let cross = spec
            .architecture
            .cross
            .as_ref()
            .map(|c| CrossView::new(&file, c, &layers));
        let mut model = Model {
            id: NEXT_MODEL_ID.fetch_add(1, Ordering::Relaxed),
            alive: std::sync::Arc::new(()),
            emb,
            dense,
            wide,
            wide_bias: spec.architecture.wide.as_ref().map(|w| w.bias),
            layers,
            packed,
            fm: spec.architecture.fm,
            cross,
            mt,
            deep_in: col,
            plans: std::sync::Mutex::new(Vec::new()),
            placement: gpu::Placement::default(),
            updates: overlay::Updates::default(),
            file: std::sync::Arc::new(file),
            folded: Vec::new(),
        };
        let pick = fold::choose(&model, options.fold_bytes);
        model.folded = fold::build(&model, |ei| pick[ei]);
        model
    }

    /// Opens and validates a model file.
    pub fn open(path: impl AsRef<std::path::Path>) -> Result<Model, rankd_formats::FormatError> {
        Ok(Model::new(ModelFile::open(path)?))
    }

    /// A token that lives as long as the model: per-core caches keep a weak reference to it
    /// and drop their entries for models that are gone.
    pub(crate) fn alive(&self) -> std::sync::Weak<()> {
        std::sync::Arc::downgrade(&self.alive)
    }

    /// A process-unique id (engines key their per-model caches by it).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The model file.
    pub fn file(&self) -> &ModelFile {
        &self.file
    }

    /// The compiled feature spec.
    pub fn features(&self) -> &CompiledSpec {
        self.file.compiled()
    }

    /// The model's name.
    pub fn name(&self) -> &str {
        &self.file.spec().metadata.name
    }

    /// The model's version.
    pub fn version(&self) -> u64 {
        self.file.spec().metadata.version
    }

    /// The backend that scores this version: `cuda:0,1` (the GPUs holding it) or `cpu`.
    pub fn backend(&self) -> String {
        let bits = self.placement.gpus.load(Ordering::Relaxed);
        if bits == 0 {
            return "cpu".into();
        }
        let list: Vec<String> = (0..32)
            .filter(|i| bits & (1 << i) != 0)
            .map(|i| i.to_string())
            .collect();
        let kind = *self
            .placement
            .kind
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        format!("{kind}:{}", list.join(","))
    }

    /// Why this version is not on a GPU although GPUs are in use (refused at load, device
    /// lost); `None` when it is on one, or when no GPU was asked for.
    pub fn placement_note(&self) -> Option<String> {
        self.placement
            .note
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many request shapes have a plan built and shared (the warm-up of a new version
    /// builds the plans the cores will need).
    pub fn shared_plans(&self) -> usize {
        self.plans.lock().map_or(0, |p| p.len())
    }

    /// The heads' names, the default head first; empty for a single-task model.
    pub fn heads(&self) -> Vec<&str> {
        self.mt.as_ref().map_or(Vec::new(), |m| {
            m.heads.iter().map(|h| h.name.as_str()).collect()
        })
    }

    /// Scores per item: the number of heads, 1 for a single-task model.
    pub fn num_heads(&self) -> usize {
        self.mt.as_ref().map_or(1, |m| m.heads.len())
    }

    /// Width of the deep input (pooled embeddings, then dense values).
    pub fn deep_input_dim(&self) -> usize {
        self.deep_in
    }

    /// `(inputs, outputs)` of each deep layer, first to last.
    pub fn layer_dims(&self) -> Vec<(usize, usize)> {
        self.layers.iter().map(|l| (l.in_dim, l.out_dim)).collect()
    }

    /// Multiply-adds per item of the deep part without the request-level split.
    pub fn deep_macs_per_item(&self) -> u64 {
        let layers: u64 = self
            .layers
            .iter()
            .map(|l| (l.in_dim * l.out_dim) as u64)
            .sum();
        let Some(m) = &self.mt else {
            return layers;
        };
        let mut width = m.e1;
        let mut experts = 0;
        for l in &m.upper[0] {
            experts += (width * l.out_dim) as u64;
            width = l.out_dim;
        }
        let mut towers = 0;
        for h in &m.heads {
            let mut width = m.e_out;
            for l in &h.hidden {
                towers += (width * l.out_dim) as u64;
                width = l.out_dim;
            }
            towers += width as u64;
        }
        let mixture = if m.experts > 1 {
            (m.heads.len() * m.experts * m.e_out) as u64
        } else {
            0
        };
        layers + m.experts as u64 * experts + towers + mixture
    }

    pub(crate) fn weights(&self, b: BlobRef) -> &[f32] {
        self.file.weights(b)
    }

    /// Embedding table `e`'s values.
    pub(crate) fn table(&self, e: &EmbView) -> Table<'_> {
        use rankd_formats::WeightType;
        match e.weight_type {
            WeightType::F32 => Table::F32(self.file.weights(e.table)),
            WeightType::F16 => Table::F16(bytemuck::cast_slice(self.file.weights_f16(e.table))),
            WeightType::I8 => Table::I8(
                self.file.weights_i8(e.table),
                self.file.weights(
                    e.scales
                        .expect("validated at open: an int8 table has scales"),
                ),
            ),
        }
    }

    /// Embedding table `e` as f32 values, for a device that takes f32 only: borrowed when
    /// stored so, else converted (an f16 value exactly, an int8 one as `q * scale`).
    pub(crate) fn table_f32(&self, e: &EmbView) -> std::borrow::Cow<'_, [f32]> {
        use half::slice::HalfFloatSliceExt;
        let (values, dim) = (e.rows as usize * e.dim, e.dim);
        match self.table(e) {
            Table::F32(t) => std::borrow::Cow::Borrowed(t),
            Table::F16(t) => std::borrow::Cow::Owned(t[..values].to_f32_vec()),
            Table::I8(q, s) => std::borrow::Cow::Owned(
                q[..values]
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| f32::from(q) * s[i / dim])
                    .collect(),
            ),
        }
    }

    /// Embedding table `ei` folded into the first layer, when the CPU engine folds it.
    #[inline]
    pub(crate) fn folded(&self, ei: usize) -> Option<&[f32]> {
        self.folded
            .get(ei)?
            .as_ref()
            .map(fold::FoldedTable::as_slice)
    }

    /// Bytes held by the folded tables.
    pub fn folded_bytes(&self) -> usize {
        self.folded
            .iter()
            .flatten()
            .map(|p| p.as_slice().len() * 4)
            .sum()
    }

    pub(crate) fn num_slots(&self) -> usize {
        self.features().slots().len()
    }
}

/// The logistic function, computed so that large |x| neither overflows nor loses the sign.
#[inline]
pub fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}
