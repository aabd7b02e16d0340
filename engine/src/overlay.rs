//! Online updates of a served version: changed embedding and wide rows in an overlay the gathers
//! consult before the read-only mapped file, and dense layers replaced whole.
//!
//! [`Model::apply`] makes a new `Model` from an old one and a [`Delta`]: the same mapped file,
//! the old overlays with the delta's rows written over them (a table the delta does not touch
//! shares its overlay with the old model), new dense layers packed for the kernel. The caller
//! publishes the new `Model` in place of the old with one pointer swap, so a request sees the
//! version either before or after a delta, never half of one. A table without an overlay takes
//! the engine's ordinary path: the check is once per table per chunk of rows, not per row.

use std::collections::HashMap;
use std::sync::Arc;

use rankd_formats::delta::{Delta, DeltaError, TableKind};

use crate::{kernel, Model};

/// Changed rows of one table: row id to its values, f32 whatever the table's stored type.
#[derive(Clone, Debug, Default)]
pub struct RowOverlay {
    dim: usize,
    index: HashMap<u32, u32, foldhash::fast::FixedState>,
    values: Vec<f32>,
}

impl RowOverlay {
    fn new(dim: usize) -> RowOverlay {
        RowOverlay {
            dim,
            ..RowOverlay::default()
        }
    }

    /// The values of row `id`, when it changed.
    #[inline]
    pub fn get(&self, id: u32) -> Option<&[f32]> {
        let at = *self.index.get(&id)? as usize * self.dim;
        Some(&self.values[at..at + self.dim])
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether no row is held.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Heap bytes held (values and the index's table).
    pub fn bytes(&self) -> usize {
        self.values.capacity() * 4 + self.index.capacity() * (4 + 4 + 1)
    }

    fn set(&mut self, rows: &[u32], values: &[f32]) {
        self.index.reserve(rows.len());
        // At most every row is new: one allocation instead of doublings (and no slack of up to
        // half the values after the last one).
        self.values.reserve(rows.len() * self.dim);
        for (&id, v) in rows.iter().zip(values.chunks_exact(self.dim)) {
            let next = (self.values.len() / self.dim) as u32;
            let at = *self.index.entry(id).or_insert(next) as usize * self.dim;
            if at == self.values.len() {
                self.values.extend_from_slice(v);
            } else {
                self.values[at..at + self.dim].copy_from_slice(v);
            }
        }
    }
}

/// A dense layer's weights replaced by a delta.
#[derive(Debug)]
pub(crate) struct OwnedLayer {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// What deltas changed in a version so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Updates {
    /// Per embedding table (empty: none changed).
    pub emb: Vec<Option<Arc<RowOverlay>>>,
    /// Per wide slot (empty: none changed).
    pub wide: Vec<Option<Arc<RowOverlay>>>,
    /// Per deep layer (empty: none changed).
    pub layers: Vec<Option<Arc<OwnedLayer>>>,
    /// The last delta applied: its sequence number, creation time and newest sample's time.
    pub last: Option<(u64, u64, u64)>,
}

/// What a version's updates amount to, for `/models` and the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UpdateStats {
    /// The last delta applied: its sequence number (0: none).
    pub sequence: u64,
    /// When the trainer built it (Unix ms; 0: none).
    pub created_ms: u64,
    /// The arrival time of the newest sample it reflects (Unix ms; 0: unknown).
    pub newest_sample_ms: u64,
    /// Rows held in overlays, over all tables.
    pub overlay_rows: u64,
    /// Heap bytes of the overlays and replaced layers.
    pub overlay_bytes: u64,
}

impl Model {
    /// This version with `delta` applied: a new `Model` on the same mapped file. The delta must
    /// name this model and version and fit its shapes, with finite values; otherwise nothing is
    /// applied. Sequence numbers are the caller's to check (it knows which came before).
    pub fn apply(&self, delta: &Delta) -> Result<Model, DeltaError> {
        let bad = |m: String| Err(DeltaError::Mismatch(m));
        if delta.model != self.name() {
            return bad(format!(
                "delta for model `{}`, this is `{}`",
                delta.model,
                self.name()
            ));
        }
        if delta.base_version != self.version() {
            return bad(format!(
                "delta for version {}, this is version {}",
                delta.base_version,
                self.version()
            ));
        }
        if self.cross.is_some() {
            return bad(
                "online updates of a model with DCN-v2 cross layers are not supported".into(),
            );
        }
        // The layers a delta indexes: the deep layers, or a multi-task model's layers in their
        // flat order (docs/online.md), each as (outputs, inputs).
        let mt_spec = self.file.spec().architecture.multitask.as_ref();
        let shapes: Vec<(usize, usize)> = match mt_spec {
            Some(m) => crate::multitask_layers(m)
                .iter()
                .map(|l| (l.out_dim as usize, l.in_dim as usize))
                .collect(),
            None => self.layers.iter().map(|l| (l.out_dim, l.in_dim)).collect(),
        };
        let mut up = self.updates.clone();
        up.emb.resize(self.emb.len(), None);
        up.wide.resize(self.wide.len(), None);
        up.layers.resize(shapes.len(), None);
        let mut emb_new: Vec<Option<RowOverlay>> = vec![None; self.emb.len()];
        let mut wide_new: Vec<Option<RowOverlay>> = vec![None; self.wide.len()];
        for (n, t) in delta.tables.iter().enumerate() {
            let (rows, dim, slot) = match t.kind {
                TableKind::Embedding => {
                    let Some(e) = self.emb.get(t.index as usize) else {
                        return bad(format!("table {n}: no embedding table {}", t.index));
                    };
                    (
                        e.rows,
                        e.dim,
                        emb_new[t.index as usize].get_or_insert_with(|| {
                            up.emb[t.index as usize]
                                .as_deref()
                                .cloned()
                                .unwrap_or_else(|| RowOverlay::new(e.dim))
                        }),
                    )
                }
                TableKind::Wide => {
                    let Some(&(_, blob)) = self.wide.get(t.index as usize) else {
                        return bad(format!("table {n}: no wide slot {}", t.index));
                    };
                    (
                        blob.len,
                        1,
                        wide_new[t.index as usize].get_or_insert_with(|| {
                            up.wide[t.index as usize]
                                .as_deref()
                                .cloned()
                                .unwrap_or_else(|| RowOverlay::new(1))
                        }),
                    )
                }
            };
            if t.dim as usize != dim || t.values.len() != t.rows.len() * dim {
                return bad(format!(
                    "table {n}: {} rows of dimension {} with {} values, the table's dimension is {dim}",
                    t.rows.len(),
                    t.dim,
                    t.values.len()
                ));
            }
            if let Some(r) = t.rows.iter().find(|&&r| u64::from(r) >= rows) {
                return bad(format!("table {n}: row {r} of a table of {rows} rows"));
            }
            if t.values.iter().any(|v| !v.is_finite()) {
                return bad(format!("table {n}: a value is not finite"));
            }
            slot.set(&t.rows, &t.values);
        }
        let mut wide_bias = self.wide_bias;
        if let Some(b) = delta.wide_bias {
            if self.wide_bias.is_none() {
                return bad("a wide bias for a model without a wide part".into());
            }
            if !b.is_finite() {
                return bad("the wide bias is not finite".into());
            }
            wide_bias = Some(b);
        }
        let mut packed = self.packed.clone();
        for l in &delta.layers {
            let i = l.index as usize;
            let Some(&(out_dim, in_dim)) = shapes.get(i) else {
                return bad(format!("no deep layer {i}"));
            };
            if (l.out_dim as usize, l.in_dim as usize) != (out_dim, in_dim)
                || l.weight.len() != out_dim * in_dim
                || l.bias.len() != out_dim
            {
                return bad(format!(
                    "layer {i} is {}x{} in the delta, {out_dim}x{in_dim} in the model",
                    l.out_dim, l.in_dim
                ));
            }
            if l.weight.iter().chain(&l.bias).any(|v| !v.is_finite()) {
                return bad(format!("layer {i}: a value is not finite"));
            }
            if mt_spec.is_none() && i != 0 && i + 1 != self.layers.len() {
                packed[i] = kernel::Packed::from_out_in(&l.weight, out_dim, in_dim);
            }
            up.layers[i] = Some(Arc::new(OwnedLayer {
                weight: l.weight.clone(),
                bias: l.bias.clone(),
            }));
        }
        let touched: Vec<bool> = emb_new.iter().map(Option::is_some).collect();
        for (slot, new) in up.emb.iter_mut().zip(emb_new) {
            if let Some(o) = new {
                *slot = Some(Arc::new(o));
            }
        }
        for (slot, new) in up.wide.iter_mut().zip(wide_new) {
            if let Some(o) = new {
                *slot = Some(Arc::new(o));
            }
        }
        up.last = Some((delta.sequence, delta.created_ms, delta.newest_sample_ms));
        // A multi-task model's view again over the new layers (every one may feed the fused
        // first layer, so its plans are built again too).
        let mt = match (mt_spec, delta.layers.is_empty()) {
            (Some(m), false) => {
                let flat = crate::multitask_layers(m);
                let file = &self.file;
                let layers = &up.layers;
                Some(Arc::new(crate::MultiTaskView::new(m, |i| {
                    match &layers[i] {
                        Some(l) => (&l.weight[..], &l.bias[..]),
                        None => (file.weights(flat[i].weight), file.weights(flat[i].bias)),
                    }
                })))
            }
            _ => self.mt.clone(),
        };
        let first_changed =
            delta.layers.iter().any(|l| l.index == 0) || (mt.is_some() && !delta.layers.is_empty());
        let mut model = Model {
            id: crate::NEXT_MODEL_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            alive: Arc::new(()),
            file: self.file.clone(),
            emb: self.emb.clone(),
            dense: self.dense.clone(),
            wide: self.wide.clone(),
            wide_bias,
            layers: self.layers.clone(),
            packed,
            fm: self.fm,
            cross: self.cross.clone(),
            mt,
            deep_in: self.deep_in,
            plans: std::sync::Mutex::new(Vec::new()),
            placement: crate::gpu::Placement::default(),
            updates: up,
            folded: Vec::new(),
        };
        // Folded tables follow their rows and the first layer.
        model.folded = crate::fold::rebuild(&model, self, &touched, first_changed);
        // The plans of the shapes served so far: shared when the first layer is unchanged
        // (a plan depends on nothing else that a delta changes), built again otherwise, so that
        // no core packs a first layer on the request path after a swap.
        let old = self.plans.lock().map(|p| p.clone()).unwrap_or_default();
        let plans = old
            .into_iter()
            .map(|(key, plan)| {
                if first_changed {
                    let fresh = Arc::new(crate::plan::Plan::new(&model, &key));
                    (key, fresh)
                } else {
                    (key, plan)
                }
            })
            .collect();
        *model.plans.lock().unwrap_or_else(|e| e.into_inner()) = plans;
        Ok(model)
    }

    /// The updates applied to this version so far.
    pub fn update_stats(&self) -> UpdateStats {
        let (sequence, created_ms, newest_sample_ms) = self.updates.last.unwrap_or_default();
        let tables = self.updates.emb.iter().chain(&self.updates.wide).flatten();
        let layers: usize = self
            .updates
            .layers
            .iter()
            .flatten()
            .map(|l| 4 * (l.weight.capacity() + l.bias.capacity()))
            .sum();
        UpdateStats {
            sequence,
            created_ms,
            newest_sample_ms,
            overlay_rows: tables.clone().map(|t| t.len() as u64).sum(),
            overlay_bytes: tables.map(|t| t.bytes() as u64).sum::<u64>() + layers as u64,
        }
    }

    /// Embedding table `ei`'s changed rows, if any.
    #[inline]
    pub(crate) fn emb_overlay(&self, ei: usize) -> Option<&RowOverlay> {
        self.updates.emb.get(ei)?.as_deref()
    }

    /// Wide slot `wi`'s changed weights, if any.
    #[inline]
    pub(crate) fn wide_overlay(&self, wi: usize) -> Option<&RowOverlay> {
        self.updates.wide.get(wi)?.as_deref()
    }

    /// Deep layer `i`'s weights `[out][in]`: replaced by a delta, or the file's.
    #[inline]
    pub(crate) fn layer_weight(&self, i: usize) -> &[f32] {
        // A multi-task model's one layer is the fused first layer (its updates index the
        // multi-task layers; see `mt_layer`).
        match (&self.mt, self.updates.layers.get(i)) {
            (Some(m), _) => &m.w0,
            (None, Some(Some(l))) => &l.weight,
            _ => self.file.weights(self.layers[i].weight),
        }
    }

    /// A multi-task model's layer `i` in the flat order of `multitask_layers`: weights and
    /// bias, replaced by a delta or the file's.
    pub(crate) fn mt_layer(&self, i: usize) -> (&[f32], &[f32]) {
        if let Some(Some(l)) = self.updates.layers.get(i) {
            return (&l.weight, &l.bias);
        }
        let m = self
            .file
            .spec()
            .architecture
            .multitask
            .as_ref()
            .expect("a multi-task model");
        let l = crate::multitask_layers(m)[i];
        (self.file.weights(l.weight), self.file.weights(l.bias))
    }

    /// Deep layer `i`'s bias.
    #[inline]
    pub(crate) fn layer_bias(&self, i: usize) -> &[f32] {
        match (&self.mt, self.updates.layers.get(i)) {
            (Some(m), _) => &m.b0,
            (None, Some(Some(l))) => &l.bias,
            _ => self.file.weights(self.layers[i].bias),
        }
    }

    /// Wide slot `wi`'s weight for `id`, through its overlay.
    #[inline]
    pub(crate) fn wide_weight(&self, wi: usize, id: u32) -> f32 {
        if let Some(v) = self.wide_overlay(wi).and_then(|o| o.get(id)) {
            return v[0];
        }
        self.file.weights(self.wide[wi].1)[id as usize]
    }
}
