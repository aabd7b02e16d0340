//! The CPU engine against the plain f64 reference, for every model kind, with multi-valued
//! slots, missing values, unknown categories, request-level overrides, split on and off, and
//! several requests per batch.

use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::kernel::Isa;
use rankd_engine::{reference, BatchOutput, EngineError, InferenceBackend, Model, Request};
use rankd_feature_ops::Value;
use rankd_formats::synth::ModelKind;

mod common;
use common::{model, owned, request, TOLERANCE};

fn check(model: &Model, engine: &mut CpuEngine, reqs: &[&dyn Request]) {
    let mut out = BatchOutput::default();
    engine.score(model, reqs, &mut out);
    assert_eq!(out.results.len(), reqs.len());
    for (i, r) in reqs.iter().enumerate() {
        let want = reference::score(model, *r).unwrap();
        let got = out.get(i).unwrap();
        assert_eq!(got.len(), want.len());
        for (j, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() <= TOLERANCE,
                "{} request {i} item {j}: engine {g} vs reference {w}",
                model.file().spec().architecture.kind()
            );
        }
    }
}

#[test]
fn engine_matches_reference_for_every_kind_split_and_isa() {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(64);
    for kind in [
        ModelKind::Wide,
        ModelKind::Deep,
        ModelKind::WideDeep,
        ModelKind::DeepFm,
    ] {
        let m = model(kind, dir.path());
        let modes = [Split::RequestLevel, Split::Off]
            .into_iter()
            .flat_map(|s| Isa::available().into_iter().map(move |i| (s, i)));
        for (split, isa) in modes {
            let mut engine = CpuEngine::with_split(split).with_isa(isa);
            for (n, variant) in [(1, 0), (17, 1), (64, 2), (3, 3)] {
                let r = request(&o, n, variant);
                check(&m, &mut engine, &[&r]);
            }
            // Several requests in one call, with different shapes (one carries no item
            // override, so its plan differs).
            let a = request(&o, 9, 0);
            let b = request(&o, 2, 1);
            let mut c = request(&o, 5, 2);
            for item in &mut c.items {
                item[1] = Value::Missing;
            }
            let d = request(&o, 30, 4);
            check(&m, &mut engine, &[&a, &b, &c, &d]);
        }
    }
}

#[test]
fn the_split_does_not_change_scores() {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(50);
    let m = model(ModelKind::DeepFm, dir.path());
    let r = request(&o, 50, 1);
    let mut a = BatchOutput::default();
    let mut b = BatchOutput::default();
    CpuEngine::with_split(Split::RequestLevel).score(&m, &[&r], &mut a);
    CpuEngine::with_split(Split::Off).score(&m, &[&r], &mut b);
    let (a, b) = (a.get(0).unwrap(), b.get(0).unwrap());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-6, "{x} vs {y}");
    }
    // Scores vary across items (the test is not comparing constants).
    assert!(a.iter().any(|&x| (x - a[0]).abs() > 1e-4));
}

#[test]
fn a_bad_request_fails_alone() {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(10);
    let m = model(ModelKind::WideDeep, dir.path());
    let good = request(&o, 10, 0);
    let mut bad_item = request(&o, 10, 1);
    bad_item.items[4][3] = Value::Str("not-an-int");
    let mut bad_user = request(&o, 3, 2);
    bad_user.user[0] = Value::Str("old");
    let mut engine = CpuEngine::new();
    let mut out = BatchOutput::default();
    engine.score(&m, &[&good, &bad_item, &bad_user, &good], &mut out);
    match &out.results[1] {
        Err(EngineError::Item { item: 4, source }) => {
            assert!(source.to_string().contains("`item_id`"), "{source}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(&out.results[2], Err(EngineError::User(_))));
    let want = reference::score(&m, &good).unwrap();
    for i in [0, 3] {
        let got = out.get(i).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((f64::from(*g) - w).abs() <= TOLERANCE);
        }
    }
    // The engine is reusable after errors.
    out.clear();
    engine.score(&m, &[&good], &mut out);
    assert_eq!(out.get(0).unwrap().len(), 10);
}

#[test]
fn empty_requests_and_batches() {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(1);
    let m = model(ModelKind::Deep, dir.path());
    let empty = request(&o, 0, 0);
    let mut out = BatchOutput::default();
    CpuEngine::new().score(&m, &[&empty], &mut out);
    assert_eq!(out.get(0).unwrap(), &[] as &[f32]);
    out.clear();
    CpuEngine::new().score(&m, &[], &mut out);
    assert!(out.results.is_empty());
}

/// Requests larger than one chunk of rows (the engine runs gather, layers and FM a chunk at a
/// time to stay in L2): the feed model's 429-wide input makes chunks of about a hundred rows.
#[test]
fn requests_spanning_many_chunks_match_the_reference() {
    use rankd_formats::synth::feed;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.rkm");
    feed::write(&path).unwrap();
    let m = Model::open(&path).unwrap();
    // Two requests of different users: rows of the second chunk onwards must see their own
    // request's part of the first layer.
    let values = [feed::request(300, 11), feed::request(250, 12)];
    let reqs: Vec<rankd_engine::request::DenseRequest<'_>> = values
        .iter()
        .map(rankd_engine::request::DenseRequest::from)
        .collect();
    for split in [Split::RequestLevel, Split::Off] {
        for isa in Isa::available() {
            check(
                &m,
                &mut CpuEngine::with_split(split).with_isa(isa),
                &[&reqs[0], &reqs[1]],
            );
        }
    }
    // The deep layers alone, chunked, against the same layers unchunked through the engine's
    // no-split path is covered above; here against a plain f64 product of the first layer.
    let mut e = CpuEngine::new();
    let x: Vec<f32> = (0..300 * m.deep_input_dim())
        .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut a = Vec::new();
    e.forward_dense(&m, &x, 300, &mut a);
    let mut b = Vec::new();
    for row in 0..300 {
        let mut one = Vec::new();
        e.forward_dense(
            &m,
            &x[row * m.deep_input_dim()..(row + 1) * m.deep_input_dim()],
            1,
            &mut one,
        );
        b.push(one[0]);
    }
    for (i, (p, q)) in a.iter().zip(&b).enumerate() {
        assert!(
            (p - q).abs() <= 1e-4 * p.abs().max(1.0),
            "row {i}: {p} vs {q}"
        );
    }
}
