//! Embedding tables folded into the first deep layer (`ModelOptions::fold_bytes`): which tables
//! fold within a budget, and a folded model scores what the same model unfolded scores, on every
//! kernel build and split mode, with sum and mean pooling, f16 and int8 tables, several heads,
//! and after online updates of folded rows or of the first layer.

mod common;
use common::scores;

use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::kernel::Isa;
use rankd_engine::request::DenseRequest;
use rankd_engine::{Model, ModelOptions};
use rankd_formats::delta::{Delta, LayerUpdate, RowUpdate, TableKind};
use rankd_formats::synth::{feed, ModelKind};
use rankd_formats::{ModelFile, WeightType};

fn open(path: &std::path::Path, fold_bytes: usize) -> Model {
    Model::with_options(ModelFile::open(path).unwrap(), ModelOptions { fold_bytes })
}

/// The largest difference between `a`'s and `b`'s scores on every ISA and split mode.
fn max_difference(a: &Model, b: &Model, reqs: &[DenseRequest<'_>]) -> f32 {
    let mut worst = 0f32;
    for isa in Isa::available() {
        for split in [Split::RequestLevel, Split::Off] {
            let x = scores(&mut CpuEngine::with_split(split).with_isa(isa), a, reqs);
            let y = scores(&mut CpuEngine::with_split(split).with_isa(isa), b, reqs);
            assert_eq!(x.len(), y.len());
            assert!(!x.is_empty());
            for (p, q) in x.iter().zip(&y) {
                worst = worst.max((p - q).abs());
            }
        }
    }
    worst
}

#[test]
fn tables_fold_smallest_first_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.rkm");
    feed::write(&path).unwrap();
    // The feed model: 13 vocabulary tables of 1,101 rows (1,000 values, 100 out-of-vocabulary
    // buckets, one for a missing value), 13 hashed ones of 100,001; first layer 256 wide.
    let one = 1101 * 256 * 4;
    assert_eq!(open(&path, 64 << 20).folded_bytes(), 13 * one);
    assert_eq!(open(&path, 5 * one + one / 2).folded_bytes(), 5 * one);
    assert_eq!(open(&path, one - 1).folded_bytes(), 0);
    assert_eq!(open(&path, 0).folded_bytes(), 0);
    assert_eq!(Model::open(&path).unwrap().folded_bytes(), 13 * one);
    // Room for one hashed table (100,001 rows) more.
    let more = 13 * one + 100_001 * 256 * 4;
    assert_eq!(open(&path, more + one).folded_bytes(), more);
}

#[test]
fn a_folded_model_scores_what_it_scores_unfolded() {
    let dir = tempfile::tempdir().unwrap();
    let values = common::feed_requests(&[1, 40, 300]);
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    for wt in [WeightType::F32, WeightType::F16, WeightType::I8] {
        let path = dir.path().join(format!("feed-{wt:?}.rkm"));
        feed::write_typed(&path, 1, 17, wt).unwrap();
        let (folded, plain) = (open(&path, 64 << 20), open(&path, 0));
        assert!(folded.folded_bytes() > 0);
        let d = max_difference(&folded, &plain, &reqs);
        assert!(d <= 2e-6, "{wt:?}: max difference {d}");
        // And the f64 reference (which never folds) agrees.
        for r in &reqs {
            let want = rankd_engine::reference::score(&plain, r).unwrap();
            let got = scores(&mut CpuEngine::new(), &folded, std::slice::from_ref(r));
            for (g, w) in got.iter().zip(&want) {
                assert!((f64::from(*g) - w).abs() < common::TOLERANCE, "{g} vs {w}");
            }
        }
    }
}

#[test]
fn mean_pooled_lists_and_missing_values_fold_too() {
    // The synthetic model: a mean-pooled tag list of 0 to 3 tags (some out of vocabulary),
    // missing ids, an item overriding a request-level feature.
    let dir = tempfile::tempdir().unwrap();
    let model = common::model(ModelKind::WideDeep, dir.path());
    let path = dir.path().join("WideDeep.rkm");
    let (folded, plain) = (open(&path, 64 << 20), open(&path, 0));
    assert!(folded.folded_bytes() > 0);
    assert_eq!(model.folded_bytes(), folded.folded_bytes());
    let o = common::owned(50);
    let reqs: Vec<DenseRequest<'_>> = (0..3).map(|v| common::request(&o, 50, v)).collect();
    let d = max_difference(&folded, &plain, &reqs);
    assert!(d <= 1e-6, "max difference {d}");
    // The FM term reads the embeddings themselves: a DeepFM model folds nothing.
    let fm = common::model(ModelKind::DeepFm, dir.path());
    assert_eq!(fm.folded_bytes(), 0);
}

#[test]
fn a_multitask_model_folds_into_its_fused_first_layer() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mmoe.rkm");
    let config = feed::multitask_config(3, &[64, 32], &[16, 1], 2);
    feed::write_config(&path, &config, 1, 5).unwrap();
    let (folded, plain) = (open(&path, 64 << 20), open(&path, 0));
    // 3 experts of 64 and 2 gates of 3: the fused first layer is 198 wide.
    assert_eq!(folded.folded_bytes(), 13 * 1101 * 198 * 4);
    let values = common::feed_requests(&[1, 70]);
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let d = max_difference(&folded, &plain, &reqs);
    assert!(d <= 2e-6, "max difference {d}");
}

/// A delta changing `rows` rows of every vocabulary table the requests touch (user- and
/// item-level), and, with `first_layer`, the first layer.
fn delta(model: &Model, reqs: &[DenseRequest<'_>], first_layer: bool) -> Delta {
    let mut d = Delta {
        model: "feed".into(),
        base_version: 1,
        sequence: 1,
        ..Delta::default()
    };
    let spec = model.features();
    let config = feed::config();
    let mut rng = rankd_formats::synth::Rng::new(3);
    let touched = common::touched(model, reqs);
    for (i, e) in config.embeddings.iter().enumerate() {
        let ids = &touched[spec.slot_index(&e.slot).unwrap()];
        let rows: Vec<u32> = ids.iter().copied().step_by(2).collect();
        d.tables.push(RowUpdate {
            kind: TableKind::Embedding,
            index: i as u32,
            dim: 16,
            values: rng.vec(rows.len() * 16, 0.2),
            rows,
        });
    }
    if first_layer {
        let (out_dim, in_dim) = (256, 429);
        d.layers.push(LayerUpdate {
            index: 0,
            out_dim,
            in_dim,
            weight: rng.vec((out_dim * in_dim) as usize, 0.05),
            bias: rng.vec(out_dim as usize, 0.05),
        });
    }
    d
}

#[test]
fn online_updates_fold_again_what_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.rkm");
    feed::write(&path).unwrap();
    let (folded, plain) = (open(&path, 64 << 20), open(&path, 0));
    let values = common::feed_requests(&[1, 60]);
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    // Rows only (the folded tables they touch are projected again, the first layer is
    // unchanged), then the first layer too (every folded table again).
    let rows = delta(&folded, &reqs, false);
    let mut layer = delta(&folded, &reqs, true);
    layer.sequence = 2;
    let (f1, p1) = (folded.apply(&rows).unwrap(), plain.apply(&rows).unwrap());
    assert_eq!(f1.folded_bytes(), folded.folded_bytes());
    let d = max_difference(&f1, &p1, &reqs);
    assert!(d <= 2e-6, "rows: max difference {d}");
    // The update changed the scores (a fold left stale would fail above, not here).
    let before = scores(&mut CpuEngine::new(), &folded, &reqs);
    let after = scores(&mut CpuEngine::new(), &f1, &reqs);
    assert!(before.iter().zip(&after).filter(|(a, b)| a != b).count() > before.len() / 2);
    let (f2, p2) = (f1.apply(&layer).unwrap(), p1.apply(&layer).unwrap());
    let d = max_difference(&f2, &p2, &reqs);
    assert!(d <= 2e-6, "first layer: max difference {d}");
    // The old versions are untouched.
    assert_eq!(scores(&mut CpuEngine::new(), &folded, &reqs), before);
}
