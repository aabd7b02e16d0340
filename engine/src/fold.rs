//! Embedding tables folded into the first deep layer.
//!
//! The first layer is linear in each embedding slot's pooled vector, so the part of
//! `W1 x` that slot `s` contributes is `W1[:, cols(s)] · pool(E_s[ids])`, and with sum or mean
//! pooling that equals `pool(P_s[ids])` for the *folded* table `P_s = E_s W1[:, cols(s)]ᵀ`
//! (`rows x out`, one first-layer contribution per row). Gathering a row of `P_s` costs `out`
//! additions where multiplying the gathered embedding costs `dim x out` multiply-adds: on the
//! feed model (dim 16, 256 outputs) each folded item-level slot takes 4,096 multiply-adds per
//! item off the dense kernel, which runs at the core's FMA peak already, for 256 additions.
//!
//! A folded table takes `out / dim` times the memory of its embedding table, so the CPU engine
//! folds only tables that fit a per-model budget ([`crate::ModelOptions::fold_bytes`]),
//! smallest first (every table saves the same work per lookup, so the small ones give the most
//! per byte): vocabulary tables of a few thousand rows, not hashed tables of millions. Models
//! whose embeddings are read by something else than the first layer (the FM term, DCN-v2
//! cross layers) fold nothing. The GPU backend reads the embedding tables as stored.
//!
//! Folded tables are built when a model opens (with the dense kernel: a few milliseconds for
//! the feed model's 13 tables) and again, for the tables concerned, after an online update
//! changes a folded table's rows or the first layer ([`crate::Model::apply`]), reading rows
//! through the update's overlay; the scores are those of the unfolded math, summed in another
//! order.

use std::sync::Arc;

use crate::kernel::{self, Isa, Packed};
use crate::Model;

/// Rows projected per call of the kernel (bounds the scratch of [`project`]).
const BLOCK: usize = 1024;

/// Which tables of `model` to fold within `budget` bytes, per embedding table.
pub(crate) fn choose(model: &Model, budget: usize) -> Vec<bool> {
    let mut pick = vec![false; model.emb.len()];
    let Some(l0) = model.layers.first() else {
        return pick;
    };
    if model.fm || model.cross.is_some() {
        return pick;
    }
    let bytes = |ei: usize| (model.emb[ei].rows as usize).saturating_mul(l0.out_dim * 4);
    let mut order: Vec<usize> = (0..model.emb.len()).collect();
    order.sort_by_key(|&ei| (bytes(ei), ei));
    let mut left = budget;
    for ei in order {
        let b = bytes(ei);
        if b > left {
            break;
        }
        left -= b;
        pick[ei] = true;
    }
    pick
}

/// A folded table: `rows x out` floats whose first element is 64-byte aligned, so that a row of
/// a multiple of 16 floats covers whole cache lines (one line fewer per row than a row straddling
/// them, and no vector load split across two lines). The buffer is over-allocated by up to a
/// line and `start` skips to the first aligned float.
#[derive(Clone, Debug)]
pub(crate) struct FoldedTable {
    buf: Arc<[f32]>,
    start: usize,
    len: usize,
}

impl FoldedTable {
    /// A zeroed table of `len` floats.
    fn zeroed(len: usize) -> FoldedTable {
        const LINE: usize = 64 / std::mem::size_of::<f32>();
        let buf: Arc<[f32]> = vec![0f32; len + LINE - 1].into();
        let misaligned = (buf.as_ptr() as usize % 64) / std::mem::size_of::<f32>();
        let start = (LINE - misaligned) % LINE;
        FoldedTable { buf, start, len }
    }

    /// The table's floats.
    pub(crate) fn as_slice(&self) -> &[f32] {
        &self.buf[self.start..self.start + self.len]
    }

    /// The table's floats, to write while it has one owner (before it is shared).
    fn as_mut_slice(&mut self) -> &mut [f32] {
        let buf = Arc::get_mut(&mut self.buf).expect("a table is written before it is shared");
        &mut buf[self.start..self.start + self.len]
    }
}

/// The folded tables of `model` for the tables in `which` (`None` elsewhere).
pub(crate) fn build(model: &Model, which: impl Fn(usize) -> bool) -> Vec<Option<FoldedTable>> {
    (0..model.emb.len())
        .map(|ei| which(ei).then(|| project(model, ei)))
        .collect()
}

/// The folded tables of `new`, made from `old` by a delta that changed the rows of the tables
/// in `touched` and, when `first_changed`, the first layer: the same tables as `old`, those the
/// delta changed projected again, the others shared.
pub(crate) fn rebuild(
    new: &Model,
    old: &Model,
    touched: &[bool],
    first_changed: bool,
) -> Vec<Option<FoldedTable>> {
    old.folded
        .iter()
        .enumerate()
        .map(|(ei, p)| match p {
            Some(_) if first_changed || touched[ei] => Some(project(new, ei)),
            p => p.clone(),
        })
        .collect()
}

/// `P = E W1[:, cols]ᵀ` for embedding table `ei`: its rows as served (through the model's
/// overlay of changed rows) times the first layer's weights for its columns, `rows x out`.
fn project(model: &Model, ei: usize) -> FoldedTable {
    let e = &model.emb[ei];
    let l0 = &model.layers[0];
    let (dim, out) = (e.dim, l0.out_dim);
    let w = model.layer_weight(0);
    let packed = Packed::new(dim, out, |kk, o| w[o * l0.in_dim + e.col + kk]);
    let zeros = vec![0f32; out];
    let table = model.table(e);
    let overlay = model.emb_overlay(ei);
    let rows = e.rows as usize;
    let mut table_out = FoldedTable::zeroed(rows * out);
    let p = table_out.as_mut_slice();
    let mut x = vec![0f32; BLOCK.min(rows) * dim];
    for r0 in (0..rows).step_by(BLOCK) {
        let n = BLOCK.min(rows - r0);
        for (i, dst) in x[..n * dim].chunks_exact_mut(dim).enumerate() {
            let id = (r0 + i) as u32;
            match overlay.and_then(|o| o.get(id)) {
                Some(row) => dst.copy_from_slice(row),
                None => table.read_row(id, dst),
            }
        }
        kernel::dense(
            Isa::detect(),
            n,
            &x,
            dim,
            &packed,
            |_| &zeros,
            false,
            &mut p[r0 * out..(r0 + n) * out],
        );
    }
    table_out
}

#[cfg(test)]
mod tests {
    use super::FoldedTable;

    #[test]
    fn folded_tables_start_on_a_cache_line() {
        for len in [1, 15, 16, 17, 256, 4096 + 3] {
            let t = FoldedTable::zeroed(len);
            assert_eq!(t.as_slice().len(), len);
            assert_eq!(t.as_slice().as_ptr() as usize % 64, 0, "len {len}");
            assert!(t.as_slice().iter().all(|&x| x == 0.0));
        }
    }
}
