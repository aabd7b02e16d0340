//! The host side of a device's share of a step: which sparse rows it touches (pulled from the
//! parameter server before the step, their gradients pushed after it), each example's ids as
//! indices into the pulled rows, the occurrence lists the sparse gradient is reduced over, the
//! dense inputs and the labels. Built by an input thread per device ahead of the step; only the
//! pull (copying the rows' current values) waits for the previous step's push, so a
//! synchronous run sees exactly the rows the CPU trainer would.

use rankd_feature_ops::SlotBatch;

use crate::model::{Layout, Params};

/// One sparse table's part of a share.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct TableShare {
    /// The rows touched, ascending.
    pub rows: Vec<u32>,
    /// Per example, where its ids start in `local` (`n + 1` offsets).
    pub offsets: Vec<u32>,
    /// Each example's ids as indices into `rows`, in the example's order.
    pub local: Vec<u32>,
    /// Per touched row, where its occurrences start in `occ_ex` (`rows.len() + 1` offsets).
    pub occ_offsets: Vec<u32>,
    /// The example of each occurrence: grouped by row, in example order (and an id repeated in
    /// one example appears as often as it is there).
    pub occ_ex: Vec<u32>,
    /// The gradient's weight of each occurrence: 1, or `1 / ids` for mean pooling.
    pub occ_scale: Vec<f32>,
    /// The pulled values of `rows` (`rows.len() × dim`), filled by [`Share::pull`].
    pub values: Vec<f32>,
}

impl TableShare {
    /// The table over `examples`, whose ids `ids_of` gives.
    fn build<'a>(
        ids_of: impl Fn(usize) -> &'a [u32],
        examples: &[usize],
        mean: bool,
    ) -> TableShare {
        let mut t = TableShare::default();
        let mut all: Vec<(u32, u32, f32)> = Vec::new();
        for (b, &r) in examples.iter().enumerate() {
            let ids = ids_of(r);
            let scale = if mean { 1.0 / ids.len() as f32 } else { 1.0 };
            all.extend(ids.iter().map(|&id| (id, b as u32, scale)));
        }
        // Stable: within a row, occurrences stay in example order.
        let mut by_row: Vec<usize> = (0..all.len()).collect();
        by_row.sort_by_key(|&i| all[i].0);
        let mut local_of = vec![0u32; all.len()];
        t.occ_offsets.push(0);
        for &i in &by_row {
            let (id, b, scale) = all[i];
            if t.rows.last() != Some(&id) {
                if !t.rows.is_empty() {
                    t.occ_offsets.push(t.occ_ex.len() as u32);
                }
                t.rows.push(id);
            }
            local_of[i] = (t.rows.len() - 1) as u32;
            t.occ_ex.push(b);
            t.occ_scale.push(scale);
        }
        if !t.rows.is_empty() {
            t.occ_offsets.push(t.occ_ex.len() as u32);
        }
        t.offsets.push(0);
        let mut at = 0;
        for &r in examples {
            let k = ids_of(r).len();
            t.local.extend_from_slice(&local_of[at..at + k]);
            at += k;
            t.offsets.push(at as u32);
        }
        t
    }

    /// Copies the current values of `rows` from `table` (`dim` wide).
    fn pull(&mut self, table: &[f32], dim: usize) {
        self.values.clear();
        for &r in &self.rows {
            let at = r as usize * dim;
            self.values.extend_from_slice(&table[at..at + dim]);
        }
    }
}

/// A device's share of one step.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Share {
    /// Examples.
    pub n: usize,
    /// Per embedding table.
    pub emb: Vec<TableShare>,
    /// Per wide slot.
    pub wide: Vec<TableShare>,
    /// Dense inputs, slot by slot (`dense slots × n`).
    pub dense: Vec<f32>,
    /// Labels (a multi-task model's: one per head, example by example).
    pub labels: Vec<f32>,
    /// Dropout masks per hidden layer (`n × out`, 0 or `1 / (1 - dropout)`); empty without
    /// dropout. Drawn by [`Share::draw_masks`].
    pub masks: Vec<Vec<f32>>,
}

impl Share {
    /// Draws the share's dropout masks from the device's generator `state` (advanced), as the
    /// CPU worker with that state draws them.
    pub fn draw_masks(&mut self, layout: &Layout, state: &mut u64) {
        self.masks = crate::model::dropout_masks(layout, self.n, state);
    }

    /// The share of `examples` (rows of `slots`, labels in `labels`).
    pub fn build(layout: &Layout, slots: &SlotBatch, labels: &[f32], examples: &[usize]) -> Share {
        Share {
            n: examples.len(),
            emb: layout
                .emb
                .iter()
                .map(|e| TableShare::build(|r| slots.ids(e.slot, r), examples, e.mean))
                .collect(),
            wide: layout
                .wide
                .iter()
                .map(|&(slot, _, _)| TableShare::build(|r| slots.ids(slot, r), examples, false))
                .collect(),
            dense: layout
                .dense
                .iter()
                .flat_map(|&(slot, _)| examples.iter().map(move |&r| slots.dense(slot, r)))
                .collect(),
            labels: {
                let h = layout.heads();
                examples
                    .iter()
                    .flat_map(|&r| labels[r * h..(r + 1) * h].iter().copied())
                    .collect()
            },
            masks: Vec::new(),
        }
    }

    /// Pulls the current values of every touched row from the parameters (the in-process
    /// parameter server).
    pub fn pull(&mut self, layout: &Layout, params: &Params) {
        pull(std::slice::from_mut(self), layout, params, 1);
    }
}

/// Pulls every share's touched rows, tables spread over `threads` threads.
pub fn pull(shares: &mut [Share], layout: &Layout, params: &Params, threads: usize) {
    let mut work: Vec<(&mut TableShare, &[f32], usize)> = Vec::new();
    for s in shares {
        let emb = s.emb.iter_mut().zip(&layout.emb).zip(&params.emb);
        work.extend(emb.map(|((t, e), table)| (t, table.as_slice(), e.dim)));
        let wide = s.wide.iter_mut().zip(&params.wide);
        work.extend(wide.map(|(t, w)| (t, w.as_slice(), 1)));
    }
    par_each(work, threads, |(t, table, dim)| t.pull(table, dim));
}

/// Pulls again the rows of `shares` that a step updated after they were pulled (`touched`: per
/// table, embedding tables then wide slots, ascending).
pub fn refresh(shares: &mut [Share], layout: &Layout, params: &Params, touched: &[Vec<u32>]) {
    for s in shares {
        let emb = s.emb.iter_mut().zip(&layout.emb).zip(&params.emb);
        let emb = emb.map(|((t, e), table)| (t, table.as_slice(), e.dim));
        let wide = s.wide.iter_mut().zip(&params.wide);
        let wide = wide.map(|(t, w)| (t, w.as_slice(), 1));
        for ((t, table, dim), updated) in emb.chain(wide).zip(touched) {
            // Both lists ascending: one pass.
            let mut u = updated.iter().peekable();
            for (j, &row) in t.rows.iter().enumerate() {
                while u.next_if(|&&r| r < row).is_some() {}
                if u.peek() == Some(&&row) {
                    let at = row as usize * dim;
                    t.values[j * dim..(j + 1) * dim].copy_from_slice(&table[at..at + dim]);
                }
            }
        }
    }
}

/// A range of a table's rows to update: its weights and accumulators from row `first` on, the
/// rows (ascending), their gradients, the width.
pub type RowRange<'a> = (
    &'a mut [f32],
    &'a mut [f32],
    u32,
    &'a [u32],
    &'a [f32],
    usize,
);

/// Cuts the update of `rows` (ascending, distinct; gradients `values`, `dim` wide) of a table
/// (`w`, `acc`) into ranges of at most `per` rows, each with the slices of the table it touches
/// alone, so that the ranges can be updated in parallel.
pub fn row_ranges<'a>(
    w: &'a mut [f32],
    acc: &'a mut [f32],
    rows: &'a [u32],
    values: &'a [f32],
    dim: usize,
    per: usize,
) -> Vec<RowRange<'a>> {
    let per = per.max(1);
    let (mut w, mut acc) = (w, acc);
    let mut first = 0u32;
    let mut out = Vec::new();
    for (k, chunk) in rows.chunks(per).enumerate() {
        // This range's weights: from its first row up to the next range's first row.
        let end = rows.get((k + 1) * per).map_or(u32::MAX, |&r| r);
        let cut = (end.min((w.len() / dim) as u32 + first) - first) as usize * dim;
        let (wa, wb) = std::mem::take(&mut w).split_at_mut(cut);
        let (aa, ab) = std::mem::take(&mut acc).split_at_mut(cut);
        let vals = &values[k * per * dim..(k * per + chunk.len()) * dim];
        out.push((wa, aa, first, chunk, vals, dim));
        (w, acc, first) = (wb, ab, end);
    }
    out
}

/// Runs `f` on every item, the items dealt round-robin to at most `threads` scoped threads (the
/// calling thread takes the first share).
pub fn par_each<T: Send>(items: Vec<T>, threads: usize, f: impl Fn(T) + Sync) {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        items.into_iter().for_each(f);
        return;
    }
    let mut groups: Vec<Vec<T>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, item) in items.into_iter().enumerate() {
        groups[i % threads].push(item);
    }
    let f = &f;
    std::thread::scope(|scope| {
        let mut groups = groups.into_iter();
        let first = groups.next().unwrap_or_default();
        for g in groups {
            scope.spawn(move || g.into_iter().for_each(f));
        }
        first.into_iter().for_each(f);
    });
}

/// The rows of several devices' pushes of one table (each run's rows ascending and distinct)
/// as one ascending list with their gradients (`dim` wide) summed in run order.
pub fn merge(runs: &[(&[u32], &[f32])], dim: usize) -> (Vec<u32>, Vec<f32>) {
    if let [(rows, values)] = runs {
        return (rows.to_vec(), values.to_vec());
    }
    let mut all: Vec<(u32, usize, usize)> = Vec::new();
    for (d, (rows, _)) in runs.iter().enumerate() {
        all.extend(rows.iter().enumerate().map(|(j, &r)| (r, d, j)));
    }
    // Stable: equal rows stay in run order.
    all.sort_by_key(|&(r, _, _)| r);
    let mut rows: Vec<u32> = Vec::new();
    let mut values: Vec<f32> = Vec::new();
    for (r, d, j) in all {
        let g = &runs[d].1[j * dim..(j + 1) * dim];
        if rows.last() == Some(&r) {
            let at = values.len() - dim;
            values[at..].iter_mut().zip(g).for_each(|(a, v)| *a += v);
        } else {
            rows.push(r);
            values.extend_from_slice(g);
        }
    }
    (rows, values)
}

/// Cuts a batch into `k` contiguous shares as the CPU's synchronous workers do (the last ones
/// may be shorter or empty).
pub fn split(batch: &[usize], k: usize) -> Vec<&[usize]> {
    let per = batch.len().div_ceil(k.max(1)).max(1);
    let mut out: Vec<&[usize]> = batch.chunks(per).collect();
    out.resize(k.max(1), &[]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_unique_and_sorted_and_occurrences_follow_examples() {
        let s: [&[u32]; 4] = [&[7, 3], &[3], &[], &[9, 3, 3]];
        let t = TableShare::build(|r| s[r], &[0, 1, 2, 3], true);
        assert_eq!(t.rows, [3, 7, 9]);
        assert_eq!(t.offsets, [0, 2, 3, 3, 6]);
        // Example ids through `rows` are the ids themselves.
        let ids: Vec<u32> = t.local.iter().map(|&l| t.rows[l as usize]).collect();
        assert_eq!(ids, [7, 3, 3, 9, 3, 3]);
        // Row 3: examples 0, 1, 3, 3; row 7: 0; row 9: 3.
        assert_eq!(t.occ_offsets, [0, 4, 5, 6]);
        assert_eq!(t.occ_ex, [0, 1, 3, 3, 0, 3]);
        let third = 1.0 / 3.0;
        assert_eq!(t.occ_scale, [0.5, 1.0, third, third, 0.5, third]);
    }

    #[test]
    fn a_share_of_other_rows_and_the_pull() {
        let s: [&[u32]; 3] = [&[1], &[4, 2], &[2]];
        let t = TableShare::build(|r| s[r], &[2, 1], false);
        assert_eq!(t.rows, [2, 4]);
        assert_eq!(t.offsets, [0, 1, 3]);
        assert_eq!(t.local, [0, 1, 0]);
        assert_eq!(t.occ_ex, [0, 1, 1]);
        assert_eq!(t.occ_scale, [1.0; 3]);
        let mut t = t;
        let table: Vec<f32> = (0..10).map(|v| v as f32).collect();
        t.pull(&table, 2);
        assert_eq!(t.values, [4.0, 5.0, 8.0, 9.0]);
        let empty = TableShare::build(|r| s[r], &[], false);
        assert_eq!(
            (empty.rows.len(), empty.offsets, empty.occ_offsets),
            (0, vec![0], vec![0])
        );
    }

    #[test]
    fn pushes_of_several_devices_merge_in_device_order() {
        let a: (&[u32], &[f32]) = (&[1, 4, 9], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let b: (&[u32], &[f32]) = (&[0, 4], &[10.0, 20.0, 30.0, 40.0]);
        let c: (&[u32], &[f32]) = (&[], &[]);
        let (rows, values) = merge(&[a, b, c], 2);
        assert_eq!(rows, [0, 1, 4, 9]);
        assert_eq!(values, [10.0, 20.0, 1.0, 2.0, 33.0, 44.0, 5.0, 6.0]);
        assert_eq!(merge(&[a], 2), (a.0.to_vec(), a.1.to_vec()));
        let mut seen = std::sync::Mutex::new(Vec::new());
        par_each((0..10).collect(), 3, |i| seen.lock().unwrap().push(i));
        seen.get_mut().unwrap().sort_unstable();
        assert_eq!(seen.into_inner().unwrap(), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn an_update_cut_into_row_ranges_equals_the_whole() {
        let h = crate::model::Optimizer::new(&Params::default(), 0.01, 0.1, 1e-3).hyper(1);
        let (dim, table) = (3, 40);
        let rows: Vec<u32> = vec![0, 2, 3, 9, 10, 11, 25, 39];
        let values: Vec<f32> = (0..rows.len() * dim)
            .map(|i| i as f32 * 0.1 - 1.0)
            .collect();
        let w0: Vec<f32> = (0..table * dim).map(|i| (i as f32 * 0.37).sin()).collect();
        let (mut w1, mut a1) = (w0.clone(), vec![0.1; table * dim]);
        crate::model::adagrad_rows(&h, &mut w1, &mut a1, dim, &rows, 0, &values);
        for per in [1, 2, 3, 7, 8, 100] {
            let (mut w2, mut a2) = (w0.clone(), vec![0.1; table * dim]);
            let ranges = row_ranges(&mut w2, &mut a2, &rows, &values, dim, per);
            assert_eq!(ranges.len(), rows.len().div_ceil(per));
            for (w, acc, first, r, v, d) in ranges {
                crate::model::adagrad_rows(&h, w, acc, d, r, first, v);
            }
            assert_eq!((&w1, &a1), (&w2, &a2), "{per} rows per range");
        }
        assert!(w1 != w0);
    }

    #[test]
    fn split_matches_the_cpu_workers() {
        let b: Vec<usize> = (0..10).collect();
        let parts = split(&b, 3);
        assert_eq!(parts, [&b[0..4], &b[4..8], &b[8..10]]);
        let parts = split(&b[..2], 4);
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1], parts[2]),
            (&b[0..1], &b[1..2], &b[2..2])
        );
    }
}
