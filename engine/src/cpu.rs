//! The CPU engine: feature transforms, embedding gather straight from the mapped tables, and the
//! MLP on the dense kernel ([`super::kernel`]), one instance per core with scratch reused across
//! calls.
//!
//! Per request group (requests that share a plan, see [`super::plan`]):
//! 1. transform the request-level row once and the items slot by slot (item-level slots only);
//! 2. gather and pool embeddings into X (`[items][k_item]`) and into one user vector per request;
//! 3. `H1 = X W1_itemᵀ + (W1_user x_user + b1)` with the bracket once per request as each row's
//!    bias, then the other layers, bias and ReLU fused into the kernel's store;
//! 4. add the wide and FM terms and apply the sigmoid.
//!
//! In steady state nothing here allocates: every buffer lives in [`CpuEngine`] and only grows.

use crate::Table;
use std::sync::Arc;

use rankd_feature_ops::SlotBatch;

use super::kernel::{self, Isa};
use super::plan::{Plan, PlanCache};
use super::{
    sigmoid, BatchOutput, EngineError, FeatureSet, InferenceBackend, ItemRows, Model, Request,
    UserRow,
};

/// Whether request-level slots are computed once per request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Split {
    /// Compute request-level slots and the first layer's request-level part once (default).
    #[default]
    RequestLevel,
    /// Treat every slot as per item (for benchmarks and cross-checks).
    Off,
}

#[derive(Debug, Default)]
struct Scratch {
    key: FeatureSet,
    next_key: FeatureSet,
    user: SlotBatch,
    items: SlotBatch,
    x: Vec<f32>,
    user_vec: Vec<f32>,
    u: Vec<f32>,
    wide_user: Vec<f32>,
    fm_user: Vec<f32>,
    fm_sum: Vec<f32>,
    h: Vec<f32>,
    h2: Vec<f32>,
    /// With folded tables, a chunk's folded rows (with their scales) for the kernel to add to
    /// each row's first layer, and where each row's start (see [`kernel::RowAdds`]). Empty
    /// between calls: it only keeps its allocation (see [`recycle`]).
    adds: Vec<(&'static [f32], f32)>,
    add_starts: Vec<u32>,
    /// Cross layers: the running output `x_l`, a layer's product, a low-rank layer's middle.
    xc: Vec<f32>,
    ct: Vec<f32>,
    cp: Vec<f32>,
    /// Cross layers with the split: each request's part of the first product, its user vector,
    /// and a chunk's deep input in model column order.
    cu: Vec<f32>,
    uv_all: Vec<f32>,
    x0: Vec<f32>,
    logits: Vec<f32>,
    /// Multi-task heads: every expert's output of a chunk, two layer buffers, a head's logits.
    experts: Vec<f32>,
    ma: Vec<f32>,
    mb: Vec<f32>,
    head_logits: Vec<f32>,
    segs: Vec<Seg>,
    /// For each item row of the group, the index of its request in `segs`.
    row_seg: Vec<u32>,
}

/// The shape of a request for the split: the features its items carry (or every feature when
/// the split is off).
fn shape(model: &Model, req: &dyn Request, split: Split, key: &mut FeatureSet) {
    let n = model.features().features().len();
    key.reset(n);
    match split {
        Split::RequestLevel => req.item_features(key),
        Split::Off => key.insert_all(n),
    }
}

/// The end of the group of requests starting at `start`: it extends while the next request has
/// the same shape. `key` is left holding the group's shape; `next` is scratch.
pub(crate) fn group_end(
    model: &Model,
    requests: &[&dyn Request],
    start: usize,
    split: Split,
    key: &mut FeatureSet,
    next: &mut FeatureSet,
) -> usize {
    shape(model, requests[start], split, key);
    let mut end = start + 1;
    while end < requests.len() {
        shape(model, requests[end], split, next);
        if next != key {
            break;
        }
        end += 1;
    }
    end
}

/// One request of a group: where its rows are.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Seg {
    /// Index of the request in the engine call.
    pub request: usize,
    /// Its row of request-level slots.
    pub user_row: usize,
    /// Its item rows.
    pub start: usize,
    pub len: usize,
}

/// Transforms the requests `group` of one plan: the request-level row once per request into
/// `user`, the items into `items`, one [`Seg`] per transformed request. A request with a bad
/// feature gets its error in `out.results[base + r]` and leaves no rows behind.
#[allow(clippy::too_many_arguments)]
pub(crate) fn transform_group(
    model: &Model,
    plan: &Plan,
    requests: &[&dyn Request],
    group: std::ops::Range<usize>,
    user: &mut SlotBatch,
    items: &mut SlotBatch,
    segs: &mut Vec<Seg>,
    out: &mut BatchOutput,
    base: usize,
) {
    let spec = model.features();
    user.clear();
    items.clear();
    segs.clear();
    for r in group {
        let req = requests[r];
        let user_row = user.rows();
        if let Err(e) = spec.transform_row_masked(&UserRow(req), Some(&plan.user_mask), user) {
            out.results[base + r] = Err(EngineError::User(e));
            continue;
        }
        let start = items.rows();
        if let Err(e) = spec.transform_rows_masked(&ItemRows(req), Some(&plan.item_mask), items) {
            user.truncate(user_row);
            out.results[base + r] = Err(EngineError::Item {
                item: e.row,
                source: e.error,
            });
            continue;
        }
        segs.push(Seg {
            request: r,
            user_row,
            start,
            len: req.num_items(),
        });
    }
}

/// The CPU inference backend. One per core.
#[derive(Debug, Default)]
pub struct CpuEngine {
    split: Split,
    isa: Isa,
    plans: PlanCache,
    s: Scratch,
}

impl CpuEngine {
    /// An engine with the request-level split on.
    pub fn new() -> Self {
        Self::default()
    }

    /// An engine with the given split mode.
    pub fn with_split(split: Split) -> Self {
        CpuEngine {
            split,
            ..Self::default()
        }
    }

    /// The same engine running the dense kernel compiled for `isa` instead of the widest the
    /// CPU has (for tests and benchmarks of the narrower builds).
    ///
    /// # Panics
    /// If the CPU lacks `isa` (see [`Isa::available`]).
    pub fn with_isa(mut self, isa: Isa) -> Self {
        assert!(isa.supported(), "this CPU cannot run the {isa:?} kernels");
        self.isa = isa;
        self
    }

    fn score_group(
        &mut self,
        model: &Model,
        plan: &Plan,
        requests: &[&dyn Request],
        group: std::ops::Range<usize>,
        out: &mut BatchOutput,
        base: usize,
    ) {
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx512 {
            // SAFETY: `self.isa` is always one the CPU supports: `Isa::detect` by default, and
            // `with_isa` refuses any other.
            unsafe { self.score_group_avx512(model, plan, requests, group, out, base) };
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if self.isa == Isa::Avx2 {
            // SAFETY: as above: the CPU has AVX2 and FMA.
            unsafe { self.score_group_avx2(model, plan, requests, group, out, base) };
            return;
        }
        self.score_group_impl(model, plan, requests, group, out, base);
    }

    /// [`Self::score_group_impl`] compiled for AVX2 and FMA: the gathers, pooling and wide sums
    /// in 8-wide vectors (without it an AVX2 machine ran them as baseline x86-64 code).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn score_group_avx2(
        &mut self,
        model: &Model,
        plan: &Plan,
        requests: &[&dyn Request],
        group: std::ops::Range<usize>,
        out: &mut BatchOutput,
        base: usize,
    ) {
        self.score_group_impl(model, plan, requests, group, out, base);
    }

    /// [`Self::score_group_impl`] compiled for AVX-512: the gathers, pooling and wide sums in
    /// 16-wide vectors.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn score_group_avx512(
        &mut self,
        model: &Model,
        plan: &Plan,
        requests: &[&dyn Request],
        group: std::ops::Range<usize>,
        out: &mut BatchOutput,
        base: usize,
    ) {
        self.score_group_impl(model, plan, requests, group, out, base);
    }

    #[inline(always)]
    fn score_group_impl(
        &mut self,
        model: &Model,
        plan: &Plan,
        requests: &[&dyn Request],
        group: std::ops::Range<usize>,
        out: &mut BatchOutput,
        base: usize,
    ) {
        let s = &mut self.s;
        transform_group(
            model,
            plan,
            requests,
            group,
            &mut s.user,
            &mut s.items,
            &mut s.segs,
            out,
            base,
        );
        let rows = s.items.rows();
        if s.segs.is_empty() {
            return;
        }

        let lay = plan.cpu_layout();
        let k = lay.k;
        // Per request: the user vector, its first-layer contribution, wide and FM parts.
        let out1 = model.layers.first().map_or(0, |l| l.out_dim);
        let fm_dim = if model.fm { model.emb[0].dim } else { 0 };
        let nseg = s.segs.len();
        s.u.clear();
        s.u.resize(nseg * out1, 0.0);
        s.wide_user.clear();
        s.wide_user.resize(nseg, 0.0);
        s.fm_user.clear();
        s.fm_user.resize(nseg * (fm_dim + 1), 0.0);
        let cw = plan.cross0_width;
        if model.cross.is_some() {
            s.cu.clear();
            s.cu.resize(nseg * cw, 0.0);
            s.uv_all.clear();
            s.uv_all.resize(nseg * plan.k_user, 0.0);
        }
        for (g, seg) in s.segs.iter().enumerate() {
            let ku = plan.k_user;
            s.user_vec.clear();
            s.user_vec.resize(ku, 0.0);
            for &(ei, off) in &plan.user_emb {
                let e = &model.emb[ei];
                let ids = s.user.ids(e.slot, seg.user_row);
                let dst = &mut s.user_vec[off..off + e.dim];
                match model.emb_overlay(ei) {
                    None => pool(model.table(e), e.dim, ids, e.mean, dst),
                    Some(o) => pool_overlay(model.table(e), o, e.dim, ids, e.mean, dst),
                }
            }
            for &(di, off) in &plan.user_dense {
                s.user_vec[off] = s.user.dense(model.dense[di].0, seg.user_row);
            }
            // The first cross product's request-level part (with the bias, for full rank).
            if let Some(c) = &model.cross {
                let cu = &mut s.cu[g * cw..(g + 1) * cw];
                if c.layers[0].rank == 0 {
                    cu.copy_from_slice(model.weights(c.layers[0].bias));
                }
                for (j, &xj) in s.user_vec.iter().enumerate() {
                    if xj != 0.0 {
                        axpy(xj, &plan.cross0_user[j * cw..(j + 1) * cw], cu);
                    }
                }
                let ku = plan.k_user;
                s.uv_all[g * ku..(g + 1) * ku].copy_from_slice(&s.user_vec);
            }
            if !model.layers.is_empty() {
                let u = &mut s.u[g * out1..(g + 1) * out1];
                u.copy_from_slice(model.layer_bias(0));
                for (j, &xj) in s.user_vec.iter().enumerate() {
                    if xj != 0.0 {
                        axpy(xj, &plan.w1_user[j * out1..(j + 1) * out1], u);
                    }
                }
            }
            let mut w = model.wide_bias.unwrap_or(0.0);
            for &wi in &plan.user_wide {
                let slot = model.wide[wi].0;
                for &id in s.user.ids(slot, seg.user_row) {
                    w += model.wide_weight(wi, id);
                }
            }
            s.wide_user[g] = w;
            if model.fm {
                let acc = &mut s.fm_user[g * (fm_dim + 1)..(g + 1) * (fm_dim + 1)];
                for &(ei, off) in &plan.user_emb {
                    let v = &s.user_vec[off..off + model.emb[ei].dim];
                    for d in 0..fm_dim {
                        acc[d] += v[d];
                        acc[fm_dim] += v[d] * v[d];
                    }
                }
            }
        }

        // One logit per item and head (one head for a single-task model).
        let nh = model.num_heads();
        s.logits.clear();
        s.logits.resize(rows * nh, 0.0);
        s.row_seg.clear();
        for (g, seg) in s.segs.iter().enumerate() {
            s.row_seg.extend(std::iter::repeat_n(g as u32, seg.len));
        }
        // The item rows go through gather, deep layers and FM a chunk at a time, so that a
        // chunk's input and layer outputs stay in the core's L2 whatever the request size.
        // With folded tables each row's folded rows (a first layer's width) pass through the
        // cache alongside X.
        let chunk = chunk_rows(if lay.folded.is_empty() { k } else { k + out1 });
        // Every element of X and H of a chunk is written before it is read: grow only.
        grow(&mut s.x, chunk.min(rows) * k);
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + chunk).min(rows);
            let n = r1 - r0;
            // X: pooled item-level embeddings and dense values.
            for &(ei, xoff) in lay.emb {
                let e = &model.emb[ei];
                let table = model.table(e);
                let col = s.items.column(e.slot);
                // A table without changed rows (every table of a version as loaded) takes the
                // plain gather; the overlay is looked up once per table and chunk.
                let (dim, mean) = (e.dim, e.mean);
                let x = &mut s.x;
                match model.emb_overlay(ei) {
                    None => pool_rows(
                        r0..r1,
                        k,
                        xoff,
                        dim,
                        x,
                        |r| col.row_ids(r),
                        |ids| table.prefetch_rows(ids, dim),
                        |ids, dst| pool(table, dim, ids, mean, dst),
                    ),
                    Some(o) => pool_rows(
                        r0..r1,
                        k,
                        xoff,
                        dim,
                        x,
                        |r| col.row_ids(r),
                        |ids| table.prefetch_rows(ids, dim),
                        |ids, dst| pool_overlay(table, o, dim, ids, mean, dst),
                    ),
                }
            }
            for &(di, xoff) in lay.dense {
                let slot = model.dense[di].0;
                let dense = &s.items.column(slot).dense;
                for (i, &v) in dense[r0..r1].iter().enumerate() {
                    s.x[i * k + xoff] = v;
                }
            }
            // Cross layers: x_{l+1} = x0 ⊙ (W x_l + b) + x_l over the deep input in model
            // column order; the first product split like the first deep layer.
            let d = model.deep_in;
            if let Some(c) = &model.cross {
                cross_layers(
                    model,
                    c,
                    plan,
                    self.isa,
                    CrossChunk {
                        n,
                        k,
                        r0,
                        x: &s.x,
                        row_seg: &s.row_seg,
                        cu: &s.cu,
                        uv_all: &s.uv_all,
                    },
                    &mut s.x0,
                    &mut s.xc,
                    &mut s.ct,
                    &mut s.cp,
                );
            }
            let stacked = model.cross.as_ref().is_some_and(|c| c.output.is_none());
            // Deep part: the request-level part (bias included) is each row's bias.
            if let Some(l0) = model.layers.first() {
                grow(&mut s.h, n * out1);
                let (u, row_seg) = (&s.u, &s.row_seg);
                if stacked {
                    // On the cross output: every column per item.
                    let c = model.cross.as_ref().expect("stacked cross");
                    let b = model.layer_bias(0);
                    kernel::dense(self.isa, n, &s.xc, d, &c.w1_full, |_| b, l0.relu, &mut s.h);
                } else if lay.folded.is_empty() {
                    kernel::dense(
                        self.isa,
                        n,
                        &s.x,
                        k,
                        lay.w1,
                        |i| {
                            let g = row_seg[r0 + i] as usize;
                            &u[g * out1..(g + 1) * out1]
                        },
                        l0.relu,
                        &mut s.h,
                    );
                } else {
                    // Each row's bias: its request's part plus its folded tables' rows, which
                    // the kernel adds as it finishes the row's blocks (asking for the next
                    // block's rows ahead, so that they arrive under the multiply-adds).
                    let mut adds = recycle(std::mem::take(&mut s.adds));
                    s.add_starts.clear();
                    s.add_starts.push(0);
                    for r in r0..r1 {
                        for &ei in lay.folded {
                            let e = &model.emb[ei];
                            let ids = s.items.column(e.slot).row_ids(r);
                            let p = model.folded(ei).expect("the plan folds only folded tables");
                            let scale = if e.mean && ids.len() > 1 {
                                1.0 / ids.len() as f32
                            } else {
                                1.0
                            };
                            for &id in ids {
                                let at = id as usize * out1;
                                adds.push((&p[at..at + out1], scale));
                            }
                        }
                        s.add_starts.push(adds.len() as u32);
                    }
                    kernel::dense_plus(
                        self.isa,
                        n,
                        &s.x,
                        k,
                        lay.w1,
                        |i| {
                            let g = row_seg[r0 + i] as usize;
                            &u[g * out1..(g + 1) * out1]
                        },
                        kernel::RowAdds {
                            starts: &s.add_starts,
                            rows: &adds,
                        },
                        l0.relu,
                        &mut s.h,
                    );
                    s.adds = recycle(adds);
                }
                match &model.mt {
                    Some(mt) => multitask_heads(
                        mt,
                        self.isa,
                        n,
                        &mut s.h,
                        MtScratch {
                            experts: &mut s.experts,
                            a: &mut s.ma,
                            b: &mut s.mb,
                            t: &mut s.head_logits,
                        },
                        &mut s.logits[r0 * nh..r1 * nh],
                    ),
                    None => upper_layers(
                        model,
                        self.isa,
                        &mut s.h,
                        &mut s.h2,
                        &mut s.logits[r0..r1],
                        n,
                    ),
                }
            }
            // A parallel cross network's output joins the logit.
            if let Some(out) = model.cross.as_ref().and_then(|c| c.output) {
                let w = model.weights(out);
                for (i, logit) in s.logits[r0..r1].iter_mut().enumerate() {
                    *logit += s.xc[i * d..(i + 1) * d]
                        .iter()
                        .zip(w)
                        .map(|(x, w)| x * w)
                        .sum::<f32>();
                }
            }
            // FM: the request's sums plus the item's fields.
            if model.fm {
                let fm_sum = &mut s.fm_sum;
                for row in r0..r1 {
                    let g = s.row_seg[row] as usize;
                    let user = &s.fm_user[g * (fm_dim + 1)..(g + 1) * (fm_dim + 1)];
                    fm_sum.clear();
                    fm_sum.extend_from_slice(&user[..fm_dim]);
                    let mut sq = user[fm_dim];
                    for &(ei, xoff) in lay.emb {
                        let at = (row - r0) * k + xoff;
                        let v = &s.x[at..at + model.emb[ei].dim];
                        for d in 0..fm_dim {
                            fm_sum[d] += v[d];
                            sq += v[d] * v[d];
                        }
                    }
                    let total: f32 = fm_sum.iter().map(|x| x * x).sum();
                    s.logits[row] += 0.5 * (total - sq);
                }
            }
            r0 = r1;
        }

        // Wide: slot by slot, so each table is resolved once.
        for &wi in &plan.item_wide {
            let (slot, blob) = model.wide[wi];
            let col = s.items.column(slot);
            if model.wide_overlay(wi).is_some() {
                for (row, logit) in s.logits.iter_mut().enumerate() {
                    for &id in col.row_ids(row) {
                        *logit += model.wide_weight(wi, id);
                    }
                }
                continue;
            }
            let weights = model.weights(blob);
            let rows = s.logits.len();
            for (row, logit) in s.logits.iter_mut().enumerate() {
                if row + WIDE_AHEAD < rows {
                    for &id in col.row_ids(row + WIDE_AHEAD) {
                        if let Some(w) = weights.get(id as usize) {
                            prefetch(std::slice::from_ref(w));
                        }
                    }
                }
                for &id in col.row_ids(row) {
                    *logit += weights[id as usize];
                }
            }
        }

        // The request-level wide part, sigmoid.
        if nh > 1 {
            // A multi-task model (no wide part): the default head to `scores`, the others to
            // `heads`, head by head.
            for seg in &s.segs {
                let rows = seg.start..seg.start + seg.len;
                let begin = out.scores.len();
                out.scores
                    .extend(rows.clone().map(|row| sigmoid(s.logits[row * nh])));
                out.results[base + seg.request] = Ok(begin..out.scores.len());
                out.head_at[base + seg.request] = (out.heads.len(), (nh - 1) as u32);
                for h in 1..nh {
                    out.heads
                        .extend(rows.clone().map(|row| sigmoid(s.logits[row * nh + h])));
                }
            }
            return;
        }
        for (g, seg) in s.segs.iter().enumerate() {
            let begin = out.scores.len();
            for row in seg.start..seg.start + seg.len {
                out.scores.push(sigmoid(s.logits[row] + s.wide_user[g]));
            }
            out.results[base + seg.request] = Ok(begin..out.scores.len());
        }
    }
}

/// A chunk of rows as the cross layers see it: `n` rows of X (item columns in plan order, row
/// stride `k`) starting at group row `r0`, each row's request, and the requests' parts of the
/// first product (`cu`) and user vectors (`uv_all`).
struct CrossChunk<'a> {
    n: usize,
    k: usize,
    r0: usize,
    x: &'a [f32],
    row_seg: &'a [u32],
    cu: &'a [f32],
    uv_all: &'a [f32],
}

/// The cross layers on a chunk: `x0` becomes the deep input in model column order (X's columns
/// and the request's user vector put back in place) and `xc` the last layer's output. The first
/// product takes X's columns per item and the request-level part once per request. `ct` and
/// `cp` are scratch.
#[allow(clippy::too_many_arguments)]
fn cross_layers(
    model: &Model,
    c: &crate::CrossView,
    plan: &Plan,
    isa: Isa,
    ch: CrossChunk<'_>,
    x0: &mut Vec<f32>,
    xc: &mut Vec<f32>,
    ct: &mut Vec<f32>,
    cp: &mut Vec<f32>,
) {
    let (n, k, d, cw) = (ch.n, ch.k, model.deep_in, plan.cross0_width);
    let ku = plan.k_user;
    grow(x0, n * d);
    for i in 0..n {
        let g = ch.row_seg[ch.r0 + i] as usize;
        let row = &mut x0[i * d..(i + 1) * d];
        for (kk, &col) in plan.item_cols.iter().enumerate() {
            row[col] = ch.x[i * k + kk];
        }
        for (j, &col) in plan.user_cols.iter().enumerate() {
            row[col] = ch.uv_all[g * ku + j];
        }
    }
    grow(xc, n * d);
    grow(ct, n * d);
    let per_request = |i: usize| {
        let g = ch.row_seg[ch.r0 + i] as usize;
        &ch.cu[g * cw..(g + 1) * cw]
    };
    for (li, l) in c.layers.iter().enumerate() {
        let bias = model.weights(l.bias);
        let input: &[f32] = if li == 0 { &x0[..n * d] } else { &xc[..n * d] };
        match (li, l.rank) {
            (0, 0) => kernel::dense(isa, n, ch.x, k, &plan.cross0_item, per_request, false, ct),
            (0, r) => {
                grow(cp, n * r);
                kernel::dense(isa, n, ch.x, k, &plan.cross0_item, per_request, false, cp);
                kernel::dense(isa, n, cp, r, &l.u, |_| bias, false, ct);
            }
            (_, 0) => kernel::dense(isa, n, input, d, &l.w, |_| bias, false, ct),
            (_, r) => {
                grow(cp, n * r);
                kernel::dense(isa, n, input, d, &l.v, |_| &l.zeros, false, cp);
                kernel::dense(isa, n, cp, r, &l.u, |_| bias, false, ct);
            }
        }
        if li == 0 {
            for ((x, &t), &x0) in xc[..n * d].iter_mut().zip(&ct[..n * d]).zip(&x0[..n * d]) {
                *x = x0 + x0 * t;
            }
        } else {
            for ((x, &t), &x0) in xc[..n * d].iter_mut().zip(&ct[..n * d]).zip(&x0[..n * d]) {
                *x += x0 * t;
            }
        }
    }
}

/// Rows per chunk: the chunk's deep input in about 192 KiB, so that it stays in the core's L2
/// (512 KiB and up on x86 servers) while every weight panel of the first layer streams past it.
/// Measured on the feed model (AVX2, 2-core EPYC): 96 KiB to 384 KiB are within noise of each
/// other; no chunking loses 30% of the deep layers' rate at 10,000 items, 768 KiB 10% at 1,000.
fn chunk_rows(k: usize) -> usize {
    const BYTES: usize = 192 << 10;
    (BYTES / (4 * k.max(1))).clamp(16, 4096) / 8 * 8
}

impl InferenceBackend for CpuEngine {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn score(&mut self, model: &Model, requests: &[&dyn Request], out: &mut BatchOutput) {
        let base = out.results.len();
        out.begin(requests.len());
        let mut start = 0;
        let mut key = std::mem::take(&mut self.s.key);
        let mut next = std::mem::take(&mut self.s.next_key);
        while start < requests.len() {
            let end = group_end(model, requests, start, self.split, &mut key, &mut next);
            let plan: Arc<Plan> = self.plans.get(model, &key);
            self.score_group(model, &plan, requests, start..end, out, base);
            start = end;
        }
        self.s.key = key;
        self.s.next_key = next;
    }
}

/// Scratch of [`multitask_heads`].
struct MtScratch<'a> {
    experts: &'a mut Vec<f32>,
    a: &'a mut Vec<f32>,
    b: &'a mut Vec<f32>,
    t: &'a mut Vec<f32>,
}

/// A multi-task model's experts, gates and towers on a chunk of `n` rows. `h` holds the fused
/// first layer's output (rows of `mt.width()`: every expert's first layer, then the gates; bias
/// added, no activation); each row's head logits go to `logits` (rows of one per head).
fn multitask_heads(
    mt: &crate::MultiTaskView,
    isa: Isa,
    n: usize,
    h: &mut [f32],
    sc: MtScratch<'_>,
    logits: &mut [f32],
) {
    let (k, e1, eo, w) = (mt.experts, mt.e1, mt.e_out, mt.width());
    let nh = mt.heads.len();
    // The experts' first layers take their ReLU here (the gates take none).
    for row in h[..n * w].chunks_exact_mut(w) {
        for v in &mut row[..k * e1] {
            *v = v.max(0.0);
        }
    }
    grow(sc.experts, k * n * eo);
    for e in 0..k {
        let dst = &mut sc.experts[e * n * eo..(e + 1) * n * eo];
        let Some((last, below)) = mt.upper[e].split_last() else {
            // One layer: the expert's output is its columns of `h`.
            for (d, row) in dst.chunks_exact_mut(eo).zip(h.chunks_exact(w)) {
                d.copy_from_slice(&row[e * e1..(e + 1) * e1]);
            }
            continue;
        };
        // Layers after the first, the first of them reading the expert's columns of `h` in
        // place (row stride `w`).
        let (mut input, mut stride): (&[f32], usize) = (&h[e * e1..], w);
        for l in below {
            grow(sc.a, n * l.out_dim);
            let b = &l.bias[..];
            kernel::dense(isa, n, input, stride, &l.packed, |_| b, true, sc.a);
            std::mem::swap(sc.a, sc.b);
            (input, stride) = (&sc.b[..], l.out_dim);
        }
        let b = &last.bias[..];
        kernel::dense(isa, n, input, stride, &last.packed, |_| b, true, dst);
    }
    for (hi, head) in mt.heads.iter().enumerate() {
        // The head's input: the one expert's output, or the experts' mixed by the gate's
        // softmax.
        let mixed: &[f32] = if k == 1 {
            &sc.experts[..n * eo]
        } else {
            grow(sc.a, n * eo);
            for (i, row) in sc.a[..n * eo].chunks_exact_mut(eo).enumerate() {
                let g = &h[i * w + head.gate_col..i * w + head.gate_col + k];
                let max = g.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                let sum: f32 = g.iter().map(|&v| (v - max).exp()).sum();
                row.fill(0.0);
                for (e, &gv) in g.iter().enumerate() {
                    let p = (gv - max).exp() / sum;
                    axpy(p, &sc.experts[(e * n + i) * eo..(e * n + i + 1) * eo], row);
                }
            }
            &sc.a[..n * eo]
        };
        let (mut input, mut width) = (mixed, eo);
        let mut hidden = std::mem::take(sc.b);
        let mut spare = std::mem::take(sc.t);
        for l in &head.hidden {
            grow(&mut hidden, n * l.out_dim);
            let b = &l.bias[..];
            kernel::dense(isa, n, input, width, &l.packed, |_| b, true, &mut hidden);
            std::mem::swap(&mut hidden, &mut spare);
            (input, width) = (&spare[..], l.out_dim);
        }
        let (wout, bout) = (&head.out_w[..], head.out_b);
        grow(&mut hidden, n);
        kernel::dot_rows(isa, input, width, wout, &mut hidden[..n]);
        for (i, &z) in hidden[..n].iter().enumerate() {
            logits[i * nh + hi] = z + bout;
        }
        *sc.b = hidden;
        *sc.t = spare;
    }
}

/// Runs layers `1..` on `h` (the first layer's activated output, `rows` rows) and writes the
/// final one-wide output to `logits`.
fn upper_layers(
    model: &Model,
    isa: Isa,
    h: &mut Vec<f32>,
    h2: &mut Vec<f32>,
    logits: &mut [f32],
    rows: usize,
) {
    let mut width = model.layers[0].out_dim;
    let last = model.layers.len() - 1;
    if last == 0 {
        // A single layer: its one-wide output is the logit.
        logits.copy_from_slice(&h[..rows]);
        return;
    }
    for (i, l) in model.layers.iter().enumerate().skip(1) {
        let w = model.layer_weight(i);
        let b = model.layer_bias(i);
        if i == last {
            // The output layer is one wide (validated): a dot product per row.
            kernel::dot_rows(isa, h, width, w, &mut logits[..rows]);
            for logit in &mut logits[..rows] {
                let v = *logit + b[0];
                *logit = if l.relu { v.max(0.0) } else { v };
            }
            return;
        }
        grow(h2, rows * l.out_dim);
        kernel::dense(isa, rows, h, width, &model.packed[i], |_| b, l.relu, h2);
        std::mem::swap(h, h2);
        width = l.out_dim;
    }
}

impl CpuEngine {
    /// Runs only the deep layers on a ready input matrix `x` (`rows` rows of
    /// [`Model::deep_input_dim`] values), without the split, and writes one logit per row to
    /// `out`. For benchmarks of the dense math alone and for cross-checking other backends.
    ///
    /// # Panics
    /// If the model has no deep part or multi-task heads, or `x` is shorter than `rows` rows.
    pub fn forward_dense(&mut self, model: &Model, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        let l0 = model.layers.first().expect("the model has a deep part");
        assert!(model.mt.is_none(), "forward_dense runs single-task models");
        // The unsplit plan packs the whole first layer in model column order.
        let mut key = std::mem::take(&mut self.s.key);
        let n = model.features().features().len();
        key.reset(n);
        key.insert_all(n);
        let plan = self.plans.get(model, &key);
        self.s.key = key;
        let s = &mut self.s;
        let bias = model.layer_bias(0);
        out.clear();
        out.resize(rows, 0.0);
        // In chunks that stay in L2, as in `score`.
        let chunk = chunk_rows(l0.in_dim);
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + chunk).min(rows);
            grow(&mut s.h, (r1 - r0) * l0.out_dim);
            kernel::dense(
                self.isa,
                r1 - r0,
                &x[r0 * l0.in_dim..],
                l0.in_dim,
                &plan.w1_item,
                |_| bias,
                l0.relu,
                &mut s.h,
            );
            upper_layers(
                model,
                self.isa,
                &mut s.h,
                &mut s.h2,
                &mut out[r0..r1],
                r1 - r0,
            );
            r0 = r1;
        }
    }
}

/// Asks the cache for the lines of `data` (a hint: no effect on results, none where the target
/// has no prefetch instruction).
#[inline(always)]
pub fn prefetch<T>(data: &[T]) {
    #[cfg(target_arch = "x86_64")]
    prefetch_lines::<{ std::arch::x86_64::_MM_HINT_T0 }, T>(data);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Asks the cache, with `line`, for rows `ids` of `values` (`width` values a row); ids past
/// the end are skipped (the gather reports them).
#[inline(always)]
fn prefetch_rows<T>(values: &[T], ids: &[u32], width: usize, line: impl Fn(&[T])) {
    for &id in ids {
        let start = id as usize * width;
        if let Some(row) = values.get(start..start + width) {
            line(row);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch_lines<const HINT: i32, T>(data: &[T]) {
    let start = data.as_ptr().cast::<i8>();
    for off in (0..std::mem::size_of_val(data)).step_by(64) {
        // SAFETY: a prefetch never faults and reads nothing into the program; the address is
        // inside `data` anyway.
        unsafe { std::arch::x86_64::_mm_prefetch::<HINT>(start.wrapping_add(off)) };
    }
}

/// Empties `v` and returns its allocation as a vector of references of another lifetime: the
/// scratch of rows borrowed from one call's model keeps its capacity for the next call without
/// holding any reference past the call. The element types have one layout, so collecting from
/// the emptied vector reuses its buffer (std's in-place collect; `tests/no_alloc.rs` checks that
/// the folded path allocates nothing).
fn recycle<'b>(mut v: Vec<(&[f32], f32)>) -> Vec<(&'b [f32], f32)> {
    v.clear();
    v.into_iter().map(|_| unreachable!("emptied")).collect()
}

/// Makes `v` at least `n` long without touching existing elements: for buffers whose first `n`
/// elements are about to be overwritten.
#[inline]
fn grow(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// `dst = src` for slices of exactly `N` values.
#[inline(always)]
fn copy_n<const N: usize>(src: &[f32], dst: &mut [f32]) {
    let src: &[f32; N] = src.try_into().expect("a row of N values");
    let dst: &mut [f32; N] = dst.try_into().expect("a row of N values");
    *dst = *src;
}

/// Sum (or mean) of the rows `ids` of `table` into `dst` (`dim` values each).
#[inline]
fn pool(table: Table<'_>, dim: usize, ids: &[u32], mean: bool, dst: &mut [f32]) {
    debug_assert_eq!(dst.len(), dim);
    if let [id] = ids {
        // One id (the common case): the row itself, with no zeroing and no read of `dst`.
        table.read_row(*id, dst);
        return;
    }
    dst.fill(0.0);
    for &id in ids {
        table.add_row(id, dst);
    }
    if mean && ids.len() > 1 {
        let n = ids.len() as f32;
        for d in dst.iter_mut() {
            *d /= n;
        }
    }
}

/// Rows ahead whose table rows the gathers ask the cache for: a hashed table's rows are spread
/// over megabytes, and a row read only when needed waits on memory.
const AHEAD: usize = 16;

/// The same for the wide weights (one addition a row: more rows ahead cover the same time).
/// (The folded rows are asked for by the kernel, a block of rows ahead: see
/// [`kernel::RowAdds`].)
const WIDE_AHEAD: usize = 32;

/// Pools `rows` of a chunk into X (row stride `k`, `dim` columns from `xoff`) with `pool_one`,
/// the ids of a row from `ids`, the table rows of the row [`AHEAD`] asked for with `prefetch`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn pool_rows<'a>(
    rows: std::ops::Range<usize>,
    k: usize,
    xoff: usize,
    dim: usize,
    x: &mut [f32],
    ids: impl Fn(usize) -> &'a [u32],
    prefetch: impl Fn(&[u32]),
    mut pool_one: impl FnMut(&[u32], &mut [f32]),
) {
    let (r0, end) = (rows.start, rows.end);
    for row in rows {
        if row + AHEAD < end {
            prefetch(ids(row + AHEAD));
        }
        let at = (row - r0) * k + xoff;
        pool_one(ids(row), &mut x[at..at + dim]);
    }
}

/// [`pool`] for a table with changed rows: each id's row from the overlay when it holds one,
/// else from the table.
#[inline]
fn pool_overlay(
    table: Table<'_>,
    overlay: &crate::overlay::RowOverlay,
    dim: usize,
    ids: &[u32],
    mean: bool,
    dst: &mut [f32],
) {
    debug_assert_eq!(dst.len(), dim);
    dst.fill(0.0);
    for &id in ids {
        match overlay.get(id) {
            Some(row) => dst.iter_mut().zip(row).for_each(|(d, v)| *d += v),
            None => table.add_row(id, dst),
        }
    }
    if mean && ids.len() > 1 {
        let n = ids.len() as f32;
        for d in dst.iter_mut() {
            *d /= n;
        }
    }
}

impl Table<'_> {
    /// Asks the cache for rows `ids` (`dim` values each).
    #[inline(always)]
    fn prefetch_rows(self, ids: &[u32], dim: usize) {
        match self {
            Table::F32(t) => prefetch_rows(t, ids, dim, prefetch),
            Table::F16(t) => prefetch_rows(t, ids, dim, prefetch),
            Table::I8(q, _) => prefetch_rows(q, ids, dim, prefetch),
        }
    }

    /// `dst` = row `id` in f32 (`dst.len()` values a row): an f16 value converted exactly, an
    /// int8 one as `q * scale`.
    #[inline]
    pub(crate) fn read_row(self, id: u32, dst: &mut [f32]) {
        let dim = dst.len();
        let start = id as usize * dim;
        match self {
            Table::F32(t) => {
                // The usual dimensions as fixed-size copies (a few vector moves, not a call to
                // memmove).
                let row = &t[start..start + dim];
                match dim {
                    8 => copy_n::<8>(row, dst),
                    16 => copy_n::<16>(row, dst),
                    32 => copy_n::<32>(row, dst),
                    64 => copy_n::<64>(row, dst),
                    _ => dst.copy_from_slice(row),
                }
            }
            Table::F16(t) => {
                use half::slice::HalfFloatSliceExt;
                t[start..start + dim].convert_to_f32_slice(dst);
            }
            Table::I8(q, scales) => {
                let s = scales[id as usize];
                for (d, &q) in dst.iter_mut().zip(&q[start..start + dim]) {
                    *d = f32::from(q) * s;
                }
            }
        }
    }

    /// `dst += row id`, summed in f32 as [`Self::read_row`] reads it.
    #[inline]
    fn add_row(self, id: u32, dst: &mut [f32]) {
        let dim = dst.len();
        let start = id as usize * dim;
        match self {
            Table::F32(t) => {
                for (d, v) in dst.iter_mut().zip(&t[start..start + dim]) {
                    *d += v;
                }
            }
            Table::F16(t) => {
                use half::slice::HalfFloatSliceExt;
                let mut row = [0f32; 64];
                for (src, out) in t[start..start + dim].chunks(64).zip(dst.chunks_mut(64)) {
                    let row = &mut row[..src.len()];
                    src.convert_to_f32_slice(row);
                    for (d, v) in out.iter_mut().zip(row.iter()) {
                        *d += v;
                    }
                }
            }
            Table::I8(q, scales) => {
                let s = scales[id as usize];
                for (d, &q) in dst.iter_mut().zip(&q[start..start + dim]) {
                    *d += f32::from(q) * s;
                }
            }
        }
    }
}

#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `dst[m][n] = lhs[m][k] · rhs[k][n]` (or `+=` when `accumulate`), with `dst` row-major (row stride `n`), `lhs` row-major
/// with row stride `lhs_rs`, and `rhs` addressed as `rhs[kk * rhs_rs + j * rhs_cs]`.
///
/// # Panics
/// If a slice is too short for the shape (a bug in the caller, never input-dependent: shapes
/// come from a validated model).
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    rhs_rs: isize,
    rhs_cs: isize,
    accumulate: bool,
) {
    assert!(k == 0 || m == 0 || lhs_rs >= k, "lhs rows overlap");
    matmul_strided(
        m,
        n,
        k,
        dst,
        lhs,
        (lhs_rs as isize, 1),
        rhs,
        (rhs_rs, rhs_cs),
        accumulate,
    );
}

/// Like [`matmul`] with `lhs` addressed as `lhs[i * lhs.0 + kk * lhs.1]` and `rhs` as
/// `rhs[kk * rhs.0 + j * rhs.1]` (row and column strides, both positive): a transposed operand
/// costs no copy (the trainer's weight gradients, `dZᵀ · H`).
///
/// # Panics
/// If a slice is too short for the shape or a stride is not positive.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    lhs: &[f32],
    lhs_strides: (isize, isize),
    rhs: &[f32],
    rhs_strides: (isize, isize),
    accumulate: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let (lhs_rs, lhs_cs) = lhs_strides;
    let (rhs_rs, rhs_cs) = rhs_strides;
    assert!(dst.len() >= m * n, "dst too short");
    assert!(lhs_rs > 0 && lhs_cs > 0, "lhs strides must be positive");
    assert!(rhs_rs > 0 && rhs_cs > 0, "rhs strides must be positive");
    let lhs_last = (m - 1) * lhs_rs as usize + (k - 1) * lhs_cs as usize;
    assert!(lhs.len() > lhs_last, "lhs too short");
    let rhs_last = (k - 1) * rhs_rs as usize + (n - 1) * rhs_cs as usize;
    assert!(rhs.len() > rhs_last, "rhs too short");
    // SAFETY: every element the product reads or writes lies inside the slices, as asserted
    // above for the given shapes and (positive) strides; `dst` is a unique borrow, so it
    // overlaps neither `lhs` nor `rhs`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs,
            lhs_rs,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_matches_a_plain_loop_for_both_rhs_layouts() {
        let (m, n, k) = (7, 5, 9);
        let lhs: Vec<f32> = (0..m * k).map(|i| (i % 13) as f32 * 0.25 - 1.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i % 7) as f32 * 0.5 - 1.5).collect(); // [n][k]
        let mut expected = vec![1.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                for kk in 0..k {
                    expected[i * n + j] += lhs[i * k + kk] * w[j * k + kk];
                }
            }
        }
        let mut dst = vec![1.0f32; m * n];
        matmul(m, n, k, &mut dst, &lhs, k, &w, 1, k as isize, true);
        for (a, b) in dst.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // Same with rhs transposed to [k][n].
        let mut wt = vec![0f32; k * n];
        for j in 0..n {
            for kk in 0..k {
                wt[kk * n + j] = w[j * k + kk];
            }
        }
        let mut dst = vec![1.0f32; m * n];
        matmul(m, n, k, &mut dst, &lhs, k, &wt, n as isize, 1, true);
        for (a, b) in dst.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
        // And with lhs stored transposed ([k][m]), read through its strides.
        let mut lt = vec![0f32; k * m];
        for i in 0..m {
            for kk in 0..k {
                lt[kk * m + i] = lhs[i * k + kk];
            }
        }
        let mut dst = vec![1.0f32; m * n];
        matmul_strided(
            m,
            n,
            k,
            &mut dst,
            &lt,
            (1, m as isize),
            &wt,
            (n as isize, 1),
            true,
        );
        for (a, b) in dst.iter().zip(&expected) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
}
