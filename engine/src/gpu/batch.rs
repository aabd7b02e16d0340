//! A GPU batch on the host: the transformed rows of one or more jobs (same model, same plan)
//! laid out in one staging buffer of 32-bit words, and the list of device operations
//! ([`Op`]) that turns it into scores. The CUDA executor uploads the words in one copy and
//! runs the ops as kernels and cuBLAS calls; the host executor ([`super::sim`]) runs the same
//! ops on the CPU, which is how every part of the GPU path but the kernels' CUDA C is tested
//! on machines without a GPU.
//!
//! Staging layout (word offsets are recorded in the ops, nothing is implied):
//! - per staged slot and side (items, users): CSR `offsets` (rows + 1 words, relative to the
//!   slot's ids) and `ids`, or one f32 value per row for a dense slot;
//! - `row_req`: for each item row, the index of its request in the batch;
//! - descriptors of the fills ([`FILL_DESC_WORDS`] words each:
//!   `kind, dim, col, table_lo, table_hi, offs_at, ids_at, 0`, kind 0 sum, 1 mean, 2 dense
//!   with the values at `ids_at`) and of the wide sums ([`WIDE_DESC_WORDS`] words each:
//!   `table_lo, table_hi, offs_at, ids_at`).
//!
//! Table offsets count f32 elements into the model's weight arena ([`ArenaLayout`]).

use rankd_feature_ops::SlotBatch;

use crate::cpu::Seg;
use crate::plan::Plan;
use crate::Model;

/// Words per fill descriptor.
pub(crate) const FILL_DESC_WORDS: usize = 8;
/// Words per wide-sum descriptor.
pub(crate) const WIDE_DESC_WORDS: usize = 4;

/// Fill kinds.
pub(crate) const KIND_SUM: u32 = 0;
pub(crate) const KIND_MEAN: u32 = 1;
pub(crate) const KIND_DENSE: u32 = 2;

/// Where a model's weights lie in its one device allocation, in f32 elements. Blobs are
/// placed in model order, each at a multiple of 64 elements (256 bytes, cuBLAS's preferred
/// alignment).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ArenaLayout {
    pub emb: Vec<u64>,
    pub wide: Vec<u64>,
    pub layer_w: Vec<u64>,
    pub layer_b: Vec<u64>,
    /// A multi-task model: each expert's layers after the first, and each head's tower, as
    /// (weight, bias) offsets. (Its first layer is the fused one of the plan's parts, its bias
    /// the experts' and gates' first biases back to back at `layer_b[0]`.)
    pub mt_upper: Vec<Vec<(u64, u64)>>,
    pub mt_tower: Vec<Vec<(u64, u64)>>,
    /// DCN-v2: per cross layer its weight (full rank; 0 otherwise), `u`, `v` (low rank) and
    /// bias offsets, and a parallel network's output weights.
    pub cross: Vec<[u64; 4]>,
    pub cross_out: Option<u64>,
    /// Total length in f32 elements.
    pub len: u64,
    /// Every placed blob: (arena offset, blob, and the embedding table it holds when that is
    /// stored as f16 or int8: the device holds it converted to f32), in arena order.
    pub blobs: Vec<(u64, rankd_formats::BlobRef, Option<usize>)>,
}

impl ArenaLayout {
    pub fn new(model: &Model) -> ArenaLayout {
        let mut a = ArenaLayout::default();
        // `len`: the blob's length on the device, in f32 values.
        let place =
            |b: rankd_formats::BlobRef, len: u64, table: Option<usize>, a: &mut ArenaLayout| {
                let at = a.len;
                a.blobs.push((at, b, table));
                a.len = (at + len).div_ceil(64) * 64;
                at
            };
        for (ei, e) in model.emb.iter().enumerate() {
            let at = if e.weight_type == rankd_formats::WeightType::F32 {
                place(e.table, e.table.len, None, &mut a)
            } else {
                place(e.table, e.rows * e.dim as u64, Some(ei), &mut a)
            };
            a.emb.push(at);
        }
        for &(_, b) in &model.wide {
            let at = place(b, b.len, None, &mut a);
            a.wide.push(at);
        }
        if let Some(c) = model.file().spec().architecture.cross.as_ref() {
            let opt = |b: Option<rankd_formats::BlobRef>, a: &mut ArenaLayout| {
                b.map_or(0, |b| place(b, b.len, None, a))
            };
            for l in &c.layers {
                let w = opt(l.weight, &mut a);
                let u = opt(l.u, &mut a);
                let v = opt(l.v, &mut a);
                let b = place(l.bias, l.bias.len, None, &mut a);
                a.cross.push([w, u, v, b]);
            }
            a.cross_out = c.output.map(|o| place(o, o.len, None, &mut a));
        }
        let Some(m) = model.file().spec().architecture.multitask.as_ref() else {
            for l in &model.layers {
                let w = place(l.weight, l.weight.len, None, &mut a);
                let b = place(l.bias, l.bias.len, None, &mut a);
                a.layer_w.push(w);
                a.layer_b.push(b);
            }
            return a;
        };
        // The fused first layer's bias: every expert's first bias, then every gate's, back to
        // back (the order of `MultiTaskView`'s fused rows).
        let first = m.experts.iter().map(|e| &e.layers[0]);
        let gates = m.heads.iter().filter_map(|h| h.gate.as_ref());
        a.layer_w.push(0);
        a.layer_b.push(a.len);
        for l in first.chain(gates) {
            let at = a.len;
            a.blobs.push((at, l.bias, None));
            a.len = at + l.bias.len;
        }
        a.len = a.len.div_ceil(64) * 64;
        let pair = |l: &rankd_formats::DenseLayer, a: &mut ArenaLayout| {
            (
                place(l.weight, l.weight.len, None, a),
                place(l.bias, l.bias.len, None, a),
            )
        };
        for e in &m.experts {
            let upper = e.layers[1..].iter().map(|l| pair(l, &mut a)).collect();
            a.mt_upper.push(upper);
        }
        for h in &m.heads {
            let tower = h.tower.iter().map(|l| pair(l, &mut a)).collect();
            a.mt_tower.push(tower);
        }
        a
    }

    /// Bytes on the device.
    pub fn bytes(&self) -> u64 {
        self.len * 4
    }
}

/// A plan's weights on a device: the first layer's and the first cross product's, each split
/// into the item and the request columns.
#[derive(Debug, Default)]
pub(crate) struct PlanParts<T> {
    pub w1_item: T,
    pub w1_user: T,
    pub c0_item: T,
    pub c0_user: T,
}

/// The plan's parts as the device uses them (see [`first_layer_parts`]; the first cross
/// product's the same way, `[k][m]` with `m` its width).
pub(crate) fn plan_parts(model: &Model, plan: &Plan) -> PlanParts<Vec<f32>> {
    let (w1_item, w1_user) = first_layer_parts(model, plan);
    let (mut c0_item, mut c0_user) = (Vec::new(), Vec::new());
    if let Some(first) = model
        .file()
        .spec()
        .architecture
        .cross
        .as_ref()
        .and_then(|c| c.layers.first())
    {
        let (d, r, m) = (first.dim as usize, first.rank as usize, plan.cross0_width);
        // Element (input column c, output o) of the first product, as the plan reads it.
        let (values, cs, os) = if r == 0 {
            (model.weights(first.weight.expect("validated")), 1, d)
        } else {
            (model.weights(first.v.expect("validated")), r, 1)
        };
        c0_item = plan
            .item_cols
            .iter()
            .flat_map(|&c| (0..m).map(move |o| values[c * cs + o * os]))
            .collect();
        c0_user = plan.cross0_user.clone();
    }
    PlanParts {
        w1_item,
        w1_user,
        c0_item,
        c0_user,
    }
}

/// The plan's first-layer weights as the device uses them: `[k][out]` row-major, which
/// cuBLAS reads as the column-major `out x k` matrix `W`, so `Hᵀ = W · Xᵀ` needs no
/// transposition.
fn first_layer_parts(model: &Model, plan: &Plan) -> (Vec<f32>, Vec<f32>) {
    let Some(l) = model.layers.first() else {
        return (Vec::new(), Vec::new());
    };
    // A multi-task model's is the fused first layer (no online updates on a GPU).
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
    (gather(&plan.item_cols), gather(&plan.user_cols))
}

/// A matrix of the per-batch work space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Mat {
    /// Item rows of the deep input, `rows x k_item`.
    X,
    /// Request rows of the deep input, `reqs x k_user`.
    U,
    /// Per request: the request-level part of the first layer, bias included.
    Ub,
    /// Layer outputs, alternately.
    H0,
    H1,
    /// Per request: wide sum (bias included), FM square sum, FM sums.
    Ut,
    /// Multi-task: every expert's output (expert `e`'s rows from `e * rows * width`), a head's
    /// mixture of them, and a third layer buffer.
    E,
    M,
    T,
    /// DCN-v2: the deep input in model column order, the running cross output `x_l`, a
    /// layer's product `t_l`, a low-rank layer's middle, and per request the first product's
    /// request-level part.
    X0,
    Xl,
    Ct,
    Cp,
    Cu,
}

impl Mat {
    /// Every work matrix.
    pub const ALL: [Mat; 14] = [
        Mat::X,
        Mat::U,
        Mat::Ub,
        Mat::H0,
        Mat::H1,
        Mat::Ut,
        Mat::E,
        Mat::M,
        Mat::T,
        Mat::X0,
        Mat::Xl,
        Mat::Ct,
        Mat::Cp,
        Mat::Cu,
    ];
}

/// An operand of a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Src {
    Mat(Mat),
    /// A work matrix from this element on.
    MatAt(Mat, u32),
    /// The model's weight arena from this element on.
    Arena(u64),
    /// The plan's first-layer weights for the item / request columns.
    W1Item,
    W1User,
    /// The plan's first cross product's weights for the item / request columns.
    C0Item,
    C0User,
}

/// One device operation. Shapes are in elements; `*_at` are word offsets into the staging
/// buffer.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Op {
    /// `dst[row][col + j]` = pooled embedding (or the dense value) of each descriptor.
    Fill {
        dst: Mat,
        rows: u32,
        width: u32,
        descs_at: u32,
        ndesc: u32,
    },
    /// cuBLAS `sgemm` semantics (column-major), `alpha = 1`, `beta = 0` (`1` when
    /// `accumulate`): `c = op(a) · b (+ c)`, `op(a)` being `a` transposed when `transa`.
    /// `k == 0` writes zeros (or leaves `c`).
    Gemm {
        accumulate: bool,
        transa: bool,
        m: u32,
        n: u32,
        k: u32,
        a: Src,
        lda: u32,
        b: Src,
        ldb: u32,
        c: Mat,
        /// Where in `c` the product starts.
        c_at: u32,
        ldc: u32,
    },
    /// `dst[r][j] = act(dst[r][j] + bias[j])`, the bias row being `bias` itself or, with
    /// `row_req_at`, row `row_req[r]` of the `bias` matrix; `dst` from element `dst_at` on.
    AddBias {
        dst: Mat,
        dst_at: u32,
        rows: u32,
        width: u32,
        bias: Src,
        row_req_at: Option<u32>,
        relu: bool,
    },
    /// Per request `r`: `Ut[r] = [wide_bias + wide sums, Σ v², Σ v (fm_dim values)]` over the
    /// request-level wide slots and embeddings (read from `U`).
    UserTerms {
        reqs: u32,
        u_width: u32,
        u_descs_at: u32,
        u_ndesc: u32,
        wide_at: u32,
        nwide: u32,
        wide_bias: f32,
        fm_dim: u32,
    },
    /// `dst[r][j] = max(dst[r][j], 0)` for the first `cols` columns of each row (a multi-task
    /// model's fused first layer: the experts' columns, not the gates').
    Relu {
        dst: Mat,
        rows: u32,
        width: u32,
        cols: u32,
    },
    /// A head's mixture of the experts: `out[r] = sum over e of softmax(g_r)[e] x_e[r]`, where
    /// `g_r` is the `k` values of `gates` row `r` (row stride `gate_ld`) from column `gate_col`,
    /// and `x_e[r]` the `width` values of `experts` at `e * step + r * ld`; `out` rows are
    /// `width` apart.
    Mix {
        rows: u32,
        k: u32,
        width: u32,
        gates: Mat,
        gate_col: u32,
        gate_ld: u32,
        experts: Mat,
        step: u32,
        ld: u32,
        out: Mat,
    },
    /// `scores[at + r] = sigmoid(src[r])` (a multi-task head's scores: head `h` at
    /// `h * rows`).
    Score { src: Mat, rows: u32, at: u32 },
    /// DCN-v2's deep input in model column order: `X0[r][cols[j]] = X[r][j]` for the
    /// `x_width` item columns and `X0[r][cols[x_width + j]] = U[req(r)][j]` for the `u_width`
    /// request columns (`cols` the words at `cols_at`, `req(r)` at `row_req_at`).
    Scatter {
        rows: u32,
        d: u32,
        x_width: u32,
        u_width: u32,
        cols_at: u32,
        row_req_at: u32,
    },
    /// A cross layer's update of `Xl` (`rows x d`): `Xl = X0 + X0 ⊙ Ct` for the first layer,
    /// `Xl += X0 ⊙ Ct` for the others.
    CrossUpdate { rows: u32, d: u32, first: bool },
    /// Per item row: `score = sigmoid(deep + wide + Ut[req][0] + fm)`, into the scores.
    Finish {
        rows: u32,
        deep: Option<Mat>,
        x_width: u32,
        x_descs_at: u32,
        x_ndesc: u32,
        wide_at: u32,
        nwide: u32,
        row_req_at: u32,
        fm_dim: u32,
    },
}

/// Sizes of the work space a batch needs, in f32 elements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sizes {
    pub rows: usize,
    pub reqs: usize,
    pub x: usize,
    pub u: usize,
    pub ub: usize,
    pub h: usize,
    pub ut: usize,
    /// Multi-task: the experts' outputs, a mixture, the third layer buffer.
    pub e: usize,
    pub m: usize,
    pub t: usize,
    /// DCN-v2: `X0`, `Xl` and `Ct` (each `rows x d`), `Cp`, `Cu`.
    pub xd: usize,
    pub cp: usize,
    pub cu: usize,
    /// Scores per row: the heads (1 for a single-task model). The scores are head by head:
    /// head `h` of row `r` at `h * rows + r`.
    pub heads: usize,
}

impl Sizes {
    pub fn of(&self, m: Mat) -> usize {
        match m {
            Mat::X => self.x,
            Mat::U => self.u,
            Mat::Ub => self.ub,
            Mat::H0 | Mat::H1 => self.h,
            Mat::Ut => self.ut,
            Mat::E => self.e,
            Mat::M => self.m,
            Mat::T => self.t,
            Mat::X0 | Mat::Xl | Mat::Ct => self.xd,
            Mat::Cp => self.cp,
            Mat::Cu => self.cu,
        }
    }

    /// Scores of the batch: a row's per head.
    pub fn scores(&self) -> usize {
        self.rows * self.heads.max(1)
    }
}

/// The transformed rows of one job: request `i` of the job is user row `i` and item rows
/// `segs[i]`.
#[derive(Debug, Default)]
pub(crate) struct Rows {
    pub user: SlotBatch,
    pub items: SlotBatch,
    /// Each transformed request: its index in the core's call, user row and item rows.
    pub segs: Vec<Seg>,
    /// The scores of the item rows, filled by the device worker.
    pub scores: Vec<f32>,
}

impl Rows {
    pub fn clear(&mut self) {
        self.user.clear();
        self.items.clear();
        self.segs.clear();
        self.scores.clear();
    }

    pub fn items(&self) -> usize {
        self.items.rows()
    }
}

/// Lays out `parts` (all for `model` and `plan`) into `words` and writes the ops into `ops`.
/// Both are cleared first and keep their capacity.
pub(crate) fn assemble(
    model: &Model,
    plan: &Plan,
    arena: &ArenaLayout,
    parts: &[&Rows],
    words: &mut Vec<u32>,
    ops: &mut Vec<Op>,
) -> Sizes {
    words.clear();
    ops.clear();
    let rows: usize = parts.iter().map(|p| p.items.rows()).sum();
    let reqs: usize = parts.iter().map(|p| p.segs.len()).sum();

    // Ids (or values) of every slot the plan reads, once per slot and side.
    let mut staged: Vec<(usize, bool, u32, u32)> = Vec::new(); // (slot, item side, offs_at, ids_at)
    let mut stage = |slot: usize, item: bool, dense: bool, words: &mut Vec<u32>| -> (u32, u32) {
        if let Some(&(_, _, o, i)) = staged.iter().find(|s| s.0 == slot && s.1 == item) {
            return (o, i);
        }
        let (offs_at, ids_at);
        if dense {
            offs_at = 0;
            ids_at = words.len() as u32;
            for p in parts {
                let b = side(p, item);
                let col = &b.column(slot).dense;
                words.extend(col[..b.rows()].iter().map(|v| v.to_bits()));
            }
        } else {
            offs_at = words.len() as u32;
            let mut base = 0u32;
            words.push(0);
            for p in parts {
                let b = side(p, item);
                let c = b.column(slot);
                for r in 0..b.rows() {
                    words.push(base + c.offsets[r + 1]);
                }
                base += c.offsets[b.rows()];
            }
            ids_at = words.len() as u32;
            for p in parts {
                let b = side(p, item);
                let c = b.column(slot);
                words.extend_from_slice(&c.ids[..c.offsets[b.rows()] as usize]);
            }
        }
        staged.push((slot, item, offs_at, ids_at));
        (offs_at, ids_at)
    };

    // Fill descriptors: embeddings, then dense columns.
    let mut fill_descs =
        |emb: &[(usize, usize)], dense: &[(usize, usize)], item: bool, words: &mut Vec<u32>| {
            let mut descs = Vec::new();
            for &(ei, col) in emb {
                let e = &model.emb[ei];
                let (offs_at, ids_at) = stage(e.slot, item, false, words);
                let t = arena.emb[ei];
                descs.extend_from_slice(&[
                    if e.mean { KIND_MEAN } else { KIND_SUM },
                    e.dim as u32,
                    col as u32,
                    t as u32,
                    (t >> 32) as u32,
                    offs_at,
                    ids_at,
                    0,
                ]);
            }
            for &(di, col) in dense {
                let (_, vals_at) = stage(model.dense[di].0, item, true, words);
                descs.extend_from_slice(&[KIND_DENSE, 1, col as u32, 0, 0, 0, vals_at, 0]);
            }
            descs
        };
    let x_descs = fill_descs(&plan.item_emb, &plan.item_dense, true, words);
    let u_descs = fill_descs(&plan.user_emb, &plan.user_dense, false, words);
    let mut wide_descs = |list: &[usize], item: bool, words: &mut Vec<u32>| {
        let mut descs = Vec::new();
        for &wi in list {
            let (offs_at, ids_at) = stage(model.wide[wi].0, item, false, words);
            let t = arena.wide[wi];
            descs.extend_from_slice(&[t as u32, (t >> 32) as u32, offs_at, ids_at]);
        }
        descs
    };
    let item_wide = wide_descs(&plan.item_wide, true, words);
    let user_wide = wide_descs(&plan.user_wide, false, words);

    let row_req_at = words.len() as u32;
    let mut req = 0u32;
    for p in parts {
        for seg in &p.segs {
            words.extend(std::iter::repeat_n(req, seg.len));
            req += 1;
        }
    }
    let put = |d: &[u32], words: &mut Vec<u32>| {
        let at = words.len() as u32;
        words.extend_from_slice(d);
        at
    };
    let x_at = put(&x_descs, words);
    let u_at = put(&u_descs, words);
    let iw_at = put(&item_wide, words);
    let uw_at = put(&user_wide, words);
    // DCN-v2: the model columns of X's and U's columns.
    let cols: Vec<u32> = plan
        .item_cols
        .iter()
        .chain(&plan.user_cols)
        .map(|&c| c as u32)
        .collect();
    let cols_at = put(&cols, words);

    let (k_item, k_user) = (plan.k_item as u32, plan.k_user as u32);
    let (rows32, reqs32) = (rows as u32, reqs as u32);
    let fm_dim = if model.fm { model.emb[0].dim as u32 } else { 0 };
    let out1 = model.layers.first().map_or(0, |l| l.out_dim);
    let widest = model.layers.iter().map(|l| l.out_dim).max().unwrap_or(0);
    let mt = model.mt.as_deref();
    let mt_widest = mt.map_or(0, |m| {
        let upper = m.upper.iter().flatten().map(|l| l.out_dim);
        let towers = m
            .heads
            .iter()
            .flat_map(|h| h.hidden.iter().map(|l| l.out_dim));
        upper.chain(towers).max().unwrap_or(0).max(1)
    });
    let sizes = Sizes {
        rows,
        reqs,
        x: rows * plan.k_item,
        u: reqs * plan.k_user,
        ub: reqs * out1,
        h: rows * widest.max(mt_widest),
        ut: reqs * (fm_dim as usize + 2),
        e: mt.map_or(0, |m| m.experts * rows * m.e_out),
        m: mt.map_or(0, |m| rows * m.e_out),
        t: rows * mt_widest,
        heads: model.num_heads(),
        xd: if model.cross.is_some() {
            rows * model.deep_in
        } else {
            0
        },
        cp: model.cross.as_ref().map_or(0, |c| {
            rows * c
                .layers
                .iter()
                .map(|l| l.rank)
                .max()
                .unwrap_or(0)
                .max(plan.cross0_width)
        }),
        cu: reqs * plan.cross0_width,
    };

    ops.push(Op::Fill {
        dst: Mat::X,
        rows: rows32,
        width: k_item,
        descs_at: x_at,
        ndesc: (x_descs.len() / FILL_DESC_WORDS) as u32,
    });
    ops.push(Op::Fill {
        dst: Mat::U,
        rows: reqs32,
        width: k_user,
        descs_at: u_at,
        ndesc: (u_descs.len() / FILL_DESC_WORDS) as u32,
    });
    let mut deep = None;
    if let Some(c) = &model.cross {
        cross_ops(
            model, c, plan, arena, rows32, reqs32, cols_at, row_req_at, ops,
        );
    }
    let stacked = model.cross.as_ref().is_some_and(|c| c.output.is_none());
    if let (Some(l0), true) = (model.layers.first(), stacked) {
        // The deep layers on the last cross output: the whole first layer per item.
        let d = model.deep_in as u32;
        ops.push(Op::Gemm {
            accumulate: false,
            transa: true,
            m: l0.out_dim as u32,
            n: rows32,
            k: d,
            a: Src::Arena(arena.layer_w[0]),
            lda: d,
            b: Src::Mat(Mat::Xl),
            ldb: d,
            c: Mat::H0,
            c_at: 0,
            ldc: l0.out_dim as u32,
        });
        ops.push(Op::AddBias {
            dst: Mat::H0,
            dst_at: 0,
            rows: rows32,
            width: l0.out_dim as u32,
            bias: Src::Arena(arena.layer_b[0]),
            row_req_at: None,
            relu: l0.relu,
        });
    }
    if let Some(l0) = model.layers.first() {
        let out1 = l0.out_dim as u32;
        // (Computed above for a stacked cross network.)
        if !stacked {
            // The request-level part once per request: Ubᵀ = W1_user · Uᵀ, plus the bias.
            ops.push(Op::Gemm {
                accumulate: false,
                transa: false,
                m: out1,
                n: reqs32,
                k: k_user,
                a: Src::W1User,
                lda: out1,
                b: Src::Mat(Mat::U),
                ldb: k_user.max(1),
                c: Mat::Ub,
                c_at: 0,
                ldc: out1,
            });
            ops.push(Op::AddBias {
                dst: Mat::Ub,
                dst_at: 0,
                rows: reqs32,
                width: out1,
                bias: Src::Arena(arena.layer_b[0]),
                row_req_at: None,
                relu: false,
            });
            // H1ᵀ = W1_item · Xᵀ, each row's bias its request's row of Ub.
            ops.push(Op::Gemm {
                accumulate: false,
                transa: false,
                m: out1,
                n: rows32,
                k: k_item,
                a: Src::W1Item,
                lda: out1,
                b: Src::Mat(Mat::X),
                ldb: k_item.max(1),
                c: Mat::H0,
                c_at: 0,
                ldc: out1,
            });
            ops.push(Op::AddBias {
                dst: Mat::H0,
                dst_at: 0,
                rows: rows32,
                width: out1,
                bias: Src::Mat(Mat::Ub),
                row_req_at: Some(row_req_at),
                relu: l0.relu,
            });
        }
        if let Some(m) = mt {
            multitask_ops(m, arena, rows32, ops);
            return sizes;
        }
        let mut cur = Mat::H0;
        for (i, l) in model.layers.iter().enumerate().skip(1) {
            let next = if cur == Mat::H0 { Mat::H1 } else { Mat::H0 };
            // The weight is `out x in` row-major: column-major `in x out`, transposed.
            ops.push(Op::Gemm {
                accumulate: false,
                transa: true,
                m: l.out_dim as u32,
                n: rows32,
                k: l.in_dim as u32,
                a: Src::Arena(arena.layer_w[i]),
                lda: l.in_dim as u32,
                b: Src::Mat(cur),
                ldb: l.in_dim as u32,
                c: next,
                c_at: 0,
                ldc: l.out_dim as u32,
            });
            ops.push(Op::AddBias {
                dst: next,
                dst_at: 0,
                rows: rows32,
                width: l.out_dim as u32,
                bias: Src::Arena(arena.layer_b[i]),
                row_req_at: None,
                relu: l.relu,
            });
            cur = next;
        }
        // A parallel cross network's output joins the deep logit: `cur += o · Xl`.
        if let Some(o) = arena.cross_out {
            let d = model.deep_in as u32;
            ops.push(Op::Gemm {
                accumulate: true,
                transa: true,
                m: 1,
                n: rows32,
                k: d,
                a: Src::Arena(o),
                lda: d,
                b: Src::Mat(Mat::Xl),
                ldb: d,
                c: cur,
                c_at: 0,
                ldc: 1,
            });
        }
        deep = Some(cur);
    }
    ops.push(Op::UserTerms {
        reqs: reqs32,
        u_width: k_user,
        u_descs_at: u_at,
        u_ndesc: (u_descs.len() / FILL_DESC_WORDS) as u32,
        wide_at: uw_at,
        nwide: (user_wide.len() / WIDE_DESC_WORDS) as u32,
        wide_bias: model.wide_bias.unwrap_or(0.0),
        fm_dim,
    });
    ops.push(Op::Finish {
        rows: rows32,
        deep,
        x_width: k_item,
        x_descs_at: x_at,
        x_ndesc: (x_descs.len() / FILL_DESC_WORDS) as u32,
        wide_at: iw_at,
        nwide: (item_wide.len() / WIDE_DESC_WORDS) as u32,
        row_req_at,
        fm_dim,
    });
    sizes
}

/// The DCN-v2 cross layers (docs/model.md) into `Xl`: the deep input put together in model
/// column order (`X0`), the first product split like the first layer (its request-level part
/// once per request, with the bias for a full-rank layer), then per layer the product and the
/// update `Xl (+)= X0 ⊙ (t + b)`.
#[allow(clippy::too_many_arguments)]
fn cross_ops(
    model: &Model,
    c: &crate::CrossView,
    plan: &Plan,
    arena: &ArenaLayout,
    rows: u32,
    reqs: u32,
    cols_at: u32,
    row_req_at: u32,
    ops: &mut Vec<Op>,
) {
    let (d, cw) = (model.deep_in as u32, plan.cross0_width as u32);
    let (k_item, k_user) = (plan.k_item as u32, plan.k_user as u32);
    ops.push(Op::Scatter {
        rows,
        d,
        x_width: k_item,
        u_width: k_user,
        cols_at,
        row_req_at,
    });
    let gemm = |transa, m, k, a, lda, b, ldb, c: Mat| Op::Gemm {
        accumulate: false,
        transa,
        m,
        n: if c == Mat::Cu { reqs } else { rows },
        k,
        a,
        lda,
        b,
        ldb,
        c,
        c_at: 0,
        ldc: m,
    };
    let bias = |dst: Mat, n: u32, width: u32, bias: Src, row_req_at: Option<u32>| Op::AddBias {
        dst,
        dst_at: 0,
        rows: n,
        width,
        bias,
        row_req_at,
        relu: false,
    };
    for (li, l) in c.layers.iter().enumerate() {
        let [w, u, v, b] = arena.cross[li];
        let r = l.rank as u32;
        if li == 0 {
            // The request-level part once per request (with the bias for full rank), then
            // each item's part with its request's row as the bias.
            ops.push(gemm(
                false,
                cw,
                k_user,
                Src::C0User,
                cw,
                Src::Mat(Mat::U),
                k_user.max(1),
                Mat::Cu,
            ));
            if r == 0 {
                ops.push(bias(Mat::Cu, reqs, cw, Src::Arena(b), None));
            }
            let first = if r == 0 { Mat::Ct } else { Mat::Cp };
            ops.push(gemm(
                false,
                cw,
                k_item,
                Src::C0Item,
                cw,
                Src::Mat(Mat::X),
                k_item.max(1),
                first,
            ));
            ops.push(bias(first, rows, cw, Src::Mat(Mat::Cu), Some(row_req_at)));
        } else if r == 0 {
            ops.push(gemm(
                true,
                d,
                d,
                Src::Arena(w),
                d,
                Src::Mat(Mat::Xl),
                d,
                Mat::Ct,
            ));
        } else {
            // p = Vᵀ x (V `[d][r]` is the column-major `r x d` Vᵀ).
            ops.push(gemm(
                false,
                r,
                d,
                Src::Arena(v),
                r,
                Src::Mat(Mat::Xl),
                d,
                Mat::Cp,
            ));
        }
        if r > 0 {
            // t = U p (U `[d][r]` read transposed).
            ops.push(gemm(
                true,
                d,
                r,
                Src::Arena(u),
                r,
                Src::Mat(Mat::Cp),
                r,
                Mat::Ct,
            ));
        }
        if li > 0 || r > 0 {
            ops.push(bias(Mat::Ct, rows, d, Src::Arena(b), None));
        }
        ops.push(Op::CrossUpdate {
            rows,
            d,
            first: li == 0,
        });
    }
}

/// The ops of a multi-task model after its fused first layer (in `H0`, bias added, no
/// activation): the experts' ReLU, their later layers, each head's mixture and tower, and the
/// heads' scores (docs/model.md).
fn multitask_ops(m: &crate::MultiTaskView, arena: &ArenaLayout, rows: u32, ops: &mut Vec<Op>) {
    let (k, e1, eo, w0) = (
        m.experts as u32,
        m.e1 as u32,
        m.e_out as u32,
        m.width() as u32,
    );
    ops.push(Op::Relu {
        dst: Mat::H0,
        rows,
        width: w0,
        cols: k * e1,
    });
    // The other of the two layer buffers.
    let other = |m: Mat| if m == Mat::H1 { Mat::T } else { Mat::H1 };
    // Where each expert's output is: its columns of H0 (one-layer experts), or `E`.
    let deep = !m.upper[0].is_empty();
    let (experts, step, ld) = if deep {
        (Mat::E, rows * eo, eo)
    } else {
        (Mat::H0, e1, w0)
    };
    if deep {
        for (e, upper) in m.upper.iter().enumerate() {
            // From the expert's columns of H0, in place, to its rows of `E`.
            let mut input = Input {
                src: Mat::H0,
                at: e as u32 * e1,
                ld: w0,
                width: e1,
            };
            for (i, l) in upper.iter().enumerate() {
                let dst = if i + 1 == upper.len() {
                    (Mat::E, e as u32 * rows * eo)
                } else {
                    (other(input.src), 0)
                };
                input = layer_ops(
                    arena.mt_upper[e][i],
                    l.out_dim as u32,
                    true,
                    rows,
                    input,
                    dst,
                    ops,
                );
            }
        }
    }
    for (h, head) in m.heads.iter().enumerate() {
        // The head's input: the mixture, or the one expert's output.
        let mut input = if k > 1 {
            ops.push(Op::Mix {
                rows,
                k,
                width: eo,
                gates: Mat::H0,
                gate_col: head.gate_col as u32,
                gate_ld: w0,
                experts,
                step,
                ld,
                out: Mat::M,
            });
            Input {
                src: Mat::M,
                at: 0,
                ld: eo,
                width: eo,
            }
        } else {
            Input {
                src: experts,
                at: 0,
                ld,
                width: eo,
            }
        };
        let tower = &arena.mt_tower[h];
        for (i, l) in head.hidden.iter().enumerate() {
            let dst = (other(input.src), 0);
            input = layer_ops(tower[i], l.out_dim as u32, true, rows, input, dst, ops);
        }
        // The one-wide output: a row of logits with its bias, then the head's scores.
        let dst = other(input.src);
        layer_ops(
            tower[head.hidden.len()],
            1,
            false,
            rows,
            input,
            (dst, 0),
            ops,
        );
        ops.push(Op::Score {
            src: dst,
            rows,
            at: h as u32 * rows,
        });
    }
}

/// A layer's input: `width` values a row in `src` from element `at`, rows `ld` apart.
#[derive(Clone, Copy)]
struct Input {
    src: Mat,
    at: u32,
    ld: u32,
    width: u32,
}

/// `act(W x + b)` of a layer (arena offsets of `W` and `b`) with `out` outputs over `rows` rows
/// of `input`, into `dst` (a matrix and an element offset, rows `out` apart). Returns where its
/// output is, as the next layer's input.
fn layer_ops(
    (w, b): (u64, u64),
    out: u32,
    relu: bool,
    rows: u32,
    input: Input,
    (dst, dst_at): (Mat, u32),
    ops: &mut Vec<Op>,
) -> Input {
    ops.push(Op::Gemm {
        accumulate: false,
        transa: true,
        m: out,
        n: rows,
        k: input.width,
        a: Src::Arena(w),
        lda: input.width,
        b: Src::MatAt(input.src, input.at),
        ldb: input.ld,
        c: dst,
        c_at: dst_at,
        ldc: out,
    });
    ops.push(Op::AddBias {
        dst,
        dst_at,
        rows,
        width: out,
        bias: Src::Arena(b),
        row_req_at: None,
        relu,
    });
    Input {
        src: dst,
        at: dst_at,
        ld: out,
        width: out,
    }
}

fn side(p: &Rows, item: bool) -> &SlotBatch {
    if item {
        &p.items
    } else {
        &p.user
    }
}
