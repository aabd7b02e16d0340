//! The request-level split: which slots, deep-input columns and first-layer weights are per item
//! and which are computed once per request, for a given set of item-carried features.
//!
//! A slot is *item-level* when any raw feature it depends on is carried by an item of the
//! request; otherwise it is the same for every item and is computed once. The first deep layer
//! is split accordingly: `h1 = relu(W_item x_item + (W_user x_user + b))`, the bracket once per
//! request. Plans are cached per core, keyed by model and feature set, because a client sends
//! the same shape of request again and again; each model also keeps the plans built for it so
//! far, so that a shape is packed once per model, not once per core, and the warm-up of a new
//! version (which replays recent requests before it is published) builds the plans the cores
//! will need.

use std::sync::Arc;

use super::kernel::Packed;
use super::{FeatureSet, Model};

#[derive(Debug)]
pub(crate) struct Plan {
    /// Slots computed per item (item-level slots and the inputs of item-level crosses).
    pub item_mask: Vec<bool>,
    /// Slots computed once per request.
    pub user_mask: Vec<bool>,
    /// Embedding tables (indices into `Model::emb`) per item / per request, with the column of
    /// their pooled output in the item matrix X or in the user vector.
    pub item_emb: Vec<(usize, usize)>,
    pub user_emb: Vec<(usize, usize)>,
    /// Dense slots (indices into `Model::dense`) with their column in X / the user vector.
    pub item_dense: Vec<(usize, usize)>,
    pub user_dense: Vec<(usize, usize)>,
    /// Wide slots (indices into `Model::wide`).
    pub item_wide: Vec<usize>,
    pub user_wide: Vec<usize>,
    /// Widths of X (per item) and of the user vector.
    pub k_item: usize,
    pub k_user: usize,
    /// First-layer weights for X's columns, packed for the kernel.
    pub w1_item: Packed,
    /// First-layer weights for the user vector's columns, `[k_user][out]`.
    pub w1_user: Vec<f32>,
    /// Deep-input columns (model order) of X and of the user vector.
    pub item_cols: Vec<usize>,
    pub user_cols: Vec<usize>,
    /// DCN-v2: the first cross layer's first product split like the first deep layer: `W_0`
    /// (full rank, `d` outputs) or `V_0ᵀ` (rank `r`, `r` outputs) over X's columns, packed, and
    /// over the user vector's, `[k_user][width]`.
    pub cross0_item: Packed,
    pub cross0_user: Vec<f32>,
    pub cross0_width: usize,
    /// The CPU engine's X when item-level tables are folded into the first layer; `None` when
    /// none is (X is then laid out as above, which the GPU backend always uses).
    pub folded: Option<Folded>,
}

/// X without the folded tables' columns: what the CPU engine gathers per item when some
/// item-level tables are folded into the first layer (see [`crate::fold`]).
#[derive(Debug)]
pub(crate) struct Folded {
    /// Gathered tables and dense slots with their column in X, as `item_emb`/`item_dense`.
    pub emb: Vec<(usize, usize)>,
    pub dense: Vec<(usize, usize)>,
    /// Folded item-level tables: their rows are added to each item's first-layer bias.
    pub tables: Vec<usize>,
    /// Width of X.
    pub k: usize,
    /// First-layer weights for X's columns, packed.
    pub w1: Packed,
}

/// The item layout the CPU engine runs: [`Folded`]'s when the plan has one, else the plan's.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Layout<'a> {
    pub emb: &'a [(usize, usize)],
    pub dense: &'a [(usize, usize)],
    pub folded: &'a [usize],
    pub k: usize,
    pub w1: &'a Packed,
}

impl Plan {
    pub fn new(model: &Model, item_features: &FeatureSet) -> Plan {
        let spec = model.features();
        let n = model.num_slots();
        let mut item_level = vec![false; n];
        for (s, info) in spec.slots().iter().enumerate() {
            item_level[s] = info.features.iter().any(|&f| item_features.contains(f));
        }
        let mut item_mask = item_level.clone();
        // Crosses read their inputs' ids from the same batch: item-level crosses need their
        // inputs per item too. Inputs come before the cross, so one backward pass suffices.
        for s in (0..n).rev() {
            if item_mask[s] {
                for &i in &spec.slots()[s].inputs {
                    item_mask[i] = true;
                }
            }
        }
        let user_mask: Vec<bool> = item_level.iter().map(|&x| !x).collect();

        let mut plan = Plan {
            item_mask,
            user_mask,
            item_emb: Vec::new(),
            user_emb: Vec::new(),
            item_dense: Vec::new(),
            user_dense: Vec::new(),
            item_wide: Vec::new(),
            user_wide: Vec::new(),
            k_item: 0,
            k_user: 0,
            w1_item: Packed::default(),
            w1_user: Vec::new(),
            item_cols: Vec::new(),
            user_cols: Vec::new(),
            cross0_item: Packed::default(),
            cross0_user: Vec::new(),
            cross0_width: 0,
            folded: None,
        };
        // Deep-input columns in model order, split in two.
        let mut item_cols = Vec::new();
        let mut user_cols = Vec::new();
        for (i, e) in model.emb.iter().enumerate() {
            let (list, cols) = if item_level[e.slot] {
                (&mut plan.item_emb, &mut item_cols)
            } else {
                (&mut plan.user_emb, &mut user_cols)
            };
            list.push((i, cols.len()));
            cols.extend(e.col..e.col + e.dim);
        }
        for (i, &(slot, col)) in model.dense.iter().enumerate() {
            let (list, cols) = if item_level[slot] {
                (&mut plan.item_dense, &mut item_cols)
            } else {
                (&mut plan.user_dense, &mut user_cols)
            };
            list.push((i, cols.len()));
            cols.push(col);
        }
        for (i, &(slot, _)) in model.wide.iter().enumerate() {
            if item_level[slot] {
                plan.item_wide.push(i);
            } else {
                plan.user_wide.push(i);
            }
        }
        plan.k_item = item_cols.len();
        plan.k_user = user_cols.len();
        if let Some(l) = model.layers.first() {
            let w = model.layer_weight(0);
            let gather = |cols: &[usize]| {
                let mut out = vec![0f32; cols.len() * l.out_dim];
                for (j, &c) in cols.iter().enumerate() {
                    for o in 0..l.out_dim {
                        out[j * l.out_dim + o] = w[o * l.in_dim + c];
                    }
                }
                out
            };
            plan.w1_item = first_layer_over(model, &item_cols);
            plan.w1_user = gather(&user_cols);
        }
        if let Some(first) = model
            .cross
            .as_ref()
            .and_then(|_| model.file().spec().architecture.cross.as_ref())
            .and_then(|c| c.layers.first())
        {
            let d = first.dim as usize;
            let r = first.rank as usize;
            // Element (input column c, output o) of the first product is values[c * cs + o * os].
            let (m, values, cs, os) = if r == 0 {
                let w = model.weights(first.weight.expect("validated: full rank has a weight"));
                (d, w, 1, d)
            } else {
                let v = model.weights(first.v.expect("validated: low rank has v"));
                (r, v, r, 1)
            };
            plan.cross0_item = Packed::new(item_cols.len(), m, |kk, o| {
                values[item_cols[kk] * cs + o * os]
            });
            plan.cross0_user = user_cols
                .iter()
                .flat_map(|&c| (0..m).map(move |o| values[c * cs + o * os]))
                .collect();
            plan.cross0_width = m;
        }
        plan.folded = Folded::new(model, &plan);
        plan.item_cols = item_cols;
        plan.user_cols = user_cols;
        plan
    }

    /// The item layout the CPU engine runs.
    pub fn cpu_layout(&self) -> Layout<'_> {
        match &self.folded {
            Some(f) => Layout {
                emb: &f.emb,
                dense: &f.dense,
                folded: &f.tables,
                k: f.k,
                w1: &f.w1,
            },
            None => Layout {
                emb: &self.item_emb,
                dense: &self.item_dense,
                folded: &[],
                k: self.k_item,
                w1: &self.w1_item,
            },
        }
    }
}

impl Folded {
    /// The folded layout of `plan`'s item columns, when `model` folds any item-level table.
    fn new(model: &Model, plan: &Plan) -> Option<Folded> {
        if !plan
            .item_emb
            .iter()
            .any(|&(ei, _)| model.folded(ei).is_some())
        {
            return None;
        }
        // (A model folds tables only when it has a first layer.)
        let mut f = Folded {
            emb: Vec::new(),
            dense: Vec::new(),
            tables: Vec::new(),
            k: 0,
            w1: Packed::default(),
        };
        let mut cols = Vec::new();
        for &(ei, _) in &plan.item_emb {
            if model.folded(ei).is_some() {
                f.tables.push(ei);
            } else {
                let e = &model.emb[ei];
                f.emb.push((ei, cols.len()));
                cols.extend(e.col..e.col + e.dim);
            }
        }
        for &(di, _) in &plan.item_dense {
            f.dense.push((di, cols.len()));
            cols.push(model.dense[di].1);
        }
        f.k = cols.len();
        f.w1 = first_layer_over(model, &cols);
        Some(f)
    }
}

/// The first layer's weights for deep-input columns `cols` (in that order), packed.
fn first_layer_over(model: &Model, cols: &[usize]) -> Packed {
    let l = &model.layers[0];
    let w = model.layer_weight(0);
    Packed::new(cols.len(), l.out_dim, |kk, o| w[o * l.in_dim + cols[kk]])
}

/// A small per-core cache of plans, least recently used first out. A miss looks in the model's
/// shared list (filled by the warm-up of a new version and by other cores) before it builds.
#[derive(Debug, Default)]
pub(crate) struct PlanCache {
    entries: Vec<(u64, std::sync::Weak<()>, FeatureSet, Arc<Plan>)>,
}

const PLAN_CACHE_LEN: usize = 16;

impl PlanCache {
    pub fn get(&mut self, model: &Model, key: &FeatureSet) -> Arc<Plan> {
        if let Some(pos) = self
            .entries
            .iter()
            .position(|(id, _, k, _)| *id == model.id() && k == key)
        {
            if pos != 0 {
                let e = self.entries.remove(pos);
                self.entries.insert(0, e);
            }
            return self.entries[0].3.clone();
        }
        let plan = shared(model, key);
        // Plans of unloaded models hold copies of their first layer: drop them now.
        self.entries
            .retain(|(_, alive, _, _)| alive.strong_count() > 0);
        if self.entries.len() == PLAN_CACHE_LEN {
            self.entries.pop();
        }
        self.entries
            .insert(0, (model.id(), model.alive(), key.clone(), plan.clone()));
        plan
    }
}

/// The model's shared plan for `key`, built (outside the lock) and shared when there is none.
fn shared(model: &Model, key: &FeatureSet) -> Arc<Plan> {
    let find = |plans: &mut Vec<(FeatureSet, Arc<Plan>)>| {
        plans.iter().find(|(k, _)| k == key).map(|(_, p)| p.clone())
    };
    if let Some(p) = with_plans(model, find).flatten() {
        return p;
    }
    let plan = Arc::new(Plan::new(model, key));
    with_plans(model, |plans| {
        // Another core may have built it meanwhile.
        find(plans).or_else(|| {
            // Bounded like the per-core caches: a client sending ever new shapes builds per core.
            if plans.len() < PLAN_CACHE_LEN {
                plans.push((key.clone(), plan.clone()));
            }
            None
        })
    })
    .flatten()
    .unwrap_or(plan)
}

/// Runs `f` on the model's shared plans unless another thread holds them. A core never waits:
/// the warm-up runs at idle priority and could be descheduled while holding the lock.
fn with_plans<R>(
    model: &Model,
    f: impl FnOnce(&mut Vec<(FeatureSet, Arc<Plan>)>) -> R,
) -> Option<R> {
    match model.plans.try_lock() {
        Ok(mut plans) => Some(f(&mut plans)),
        // A panic while pushing leaves the list intact.
        Err(std::sync::TryLockError::Poisoned(e)) => Some(f(&mut e.into_inner())),
        Err(std::sync::TryLockError::WouldBlock) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankd_formats::synth::{write_synthetic, SynthOptions};

    fn model(dir: &std::path::Path, seed: u64) -> Model {
        let path = dir.join(format!("m{seed}.rkm"));
        write_synthetic(
            &path,
            &SynthOptions {
                seed,
                ..SynthOptions::default()
            },
        )
        .unwrap();
        Model::open(&path).unwrap()
    }

    /// A shape is packed once per model: a second core (a second cache) gets the first one's
    /// plan; another shape or another model gets its own.
    #[test]
    fn cores_share_the_plans_built_for_a_model() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (model(dir.path(), 1), model(dir.path(), 2));
        let n = a.features().features().len();
        let mut all = FeatureSet::with_capacity(n);
        all.insert_all(n);
        let mut one = FeatureSet::with_capacity(n);
        one.insert(0);

        let (mut core0, mut core1) = (PlanCache::default(), PlanCache::default());
        let p0 = core0.get(&a, &all);
        assert!(Arc::ptr_eq(&p0, &core1.get(&a, &all)));
        assert!(!Arc::ptr_eq(&p0, &core1.get(&a, &one)));
        assert!(!Arc::ptr_eq(&p0, &core1.get(&b, &all)));
        assert_eq!(a.plans.lock().unwrap().len(), 2);

        // While another thread holds the list, a core builds its own plan instead of waiting.
        let held = a.plans.lock().unwrap();
        let mut core2 = PlanCache::default();
        let own = core2.get(&a, &all);
        assert!(!Arc::ptr_eq(&p0, &own));
        drop(held);
        assert_eq!(own.k_item, p0.k_item);
    }
}
