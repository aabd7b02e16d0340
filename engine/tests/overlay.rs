//! Online updates: a version with a delta applied ([`Model::apply`]) scores exactly what a model
//! file written with the changed parameters scores, on every kernel build and split mode; bad
//! deltas are refused whole and leave the version as it was.

mod common;
use common::{scores as score, touched};

use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::kernel::Isa;
use rankd_engine::request::DenseRequest;
use rankd_engine::Model;
use rankd_formats::config::{write_model, TensorMap};
use rankd_formats::delta::{Delta, DeltaError, LayerUpdate, RowUpdate, TableKind};
use rankd_formats::synth::{feed, Rng};
use rankd_formats::Metadata;

fn write(path: &std::path::Path, t: &TensorMap) -> Model {
    let meta = Metadata {
        name: "feed".into(),
        version: 1,
        ..Metadata::default()
    };
    write_model(&feed::config(), meta, t, path).unwrap();
    Model::open(path).unwrap()
}

struct Case {
    base: Model,
    patched: Model,
    delta: Delta,
    _dir: tempfile::TempDir,
}

/// A base model, a delta changing half of the rows the requests touch in every table (user- and
/// item-level), the wide bias and the first two layers, and the model file written with the
/// changed parameters.
fn case(reqs: &[DenseRequest<'_>]) -> Case {
    let dir = tempfile::tempdir().unwrap();
    let t0 = feed::tensors(&feed::config(), 17).unwrap();
    let base = write(&dir.path().join("base.rkm"), &t0);
    let config = feed::config();
    let ids = touched(&base, reqs);
    let mut t1 = t0.clone();
    let mut rng = Rng::new(99);
    let mut delta = Delta {
        model: "feed".into(),
        base_version: 1,
        sequence: 1,
        ..Delta::default()
    };
    let spec = base.features();
    for (i, e) in config.embeddings.iter().enumerate() {
        let slot = spec.slot_index(&e.slot).unwrap();
        let dim = e.dim as usize;
        let rows: Vec<u32> = ids[slot].iter().copied().step_by(2).collect();
        let values = rng.vec(rows.len() * dim, 0.1);
        let table = &mut t1.get_mut(&format!("embedding.{}", e.slot)).unwrap().1;
        for (r, v) in rows.iter().zip(values.chunks(dim)) {
            table[*r as usize * dim..(*r as usize + 1) * dim].copy_from_slice(v);
        }
        delta.tables.push(RowUpdate {
            kind: TableKind::Embedding,
            index: i as u32,
            dim: dim as u32,
            rows,
            values,
        });
    }
    for (i, s) in config.wide.as_ref().unwrap().slots.iter().enumerate() {
        let slot = spec.slot_index(s).unwrap();
        let rows: Vec<u32> = ids[slot].iter().copied().skip(1).step_by(2).collect();
        let values = rng.vec(rows.len(), 0.5);
        let table = &mut t1.get_mut(&format!("wide.{s}")).unwrap().1;
        for (r, v) in rows.iter().zip(&values) {
            table[*r as usize] = *v;
        }
        delta.tables.push(RowUpdate {
            kind: TableKind::Wide,
            index: i as u32,
            dim: 1,
            rows,
            values,
        });
    }
    delta.wide_bias = Some(-0.75);
    t1.get_mut("wide.bias").unwrap().1[0] = -0.75;
    for i in 0..2 {
        let (shape, w) = t1.get_mut(&format!("deep.{i}.weight")).unwrap();
        let (out_dim, in_dim) = (shape[0] as u32, shape[1] as u32);
        w.iter_mut().for_each(|v| *v *= 0.9);
        let w = w.clone();
        let b = &mut t1.get_mut(&format!("deep.{i}.bias")).unwrap().1;
        b.iter_mut().for_each(|v| *v += 0.01);
        delta.layers.push(LayerUpdate {
            index: i,
            out_dim,
            in_dim,
            weight: w,
            bias: b.clone(),
        });
    }
    let patched = write(&dir.path().join("patched.rkm"), &t1);
    Case {
        base,
        patched,
        delta,
        _dir: dir,
    }
}

#[test]
fn an_applied_delta_scores_what_a_file_with_those_parameters_scores() {
    let values = [
        feed::request(300, 11),
        feed::request(40, 12),
        feed::request(1, 13),
    ];
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let c = case(&reqs);
    // Warm a plan on the base first: the updated version must rebuild it (layer 0 changed).
    let before = score(&mut CpuEngine::new(), &c.base, &reqs);
    let updated = c.base.apply(&c.delta).unwrap();
    assert_eq!(updated.version(), 1);
    let stats = updated.update_stats();
    assert_eq!(stats.sequence, 1);
    assert_eq!(stats.overlay_rows as usize, c.delta.changed_rows());
    for isa in Isa::available() {
        for split in [Split::RequestLevel, Split::Off] {
            let mut e = CpuEngine::with_split(split).with_isa(isa);
            let got = score(&mut e, &updated, &reqs);
            let want = score(&mut e, &c.patched, &reqs);
            let max = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(max <= 1e-6, "{isa:?} {split:?}: max difference {max}");
        }
    }
    // The f64 reference reads the overlays too.
    for r in &reqs {
        let a = rankd_engine::reference::score(&updated, r).unwrap();
        let b = rankd_engine::reference::score(&c.patched, r).unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-12, "{x} vs {y}");
        }
    }
    // The delta matters, and the base version is untouched by it.
    let changed = score(&mut CpuEngine::new(), &updated, &reqs);
    assert!(changed.iter().zip(&before).filter(|(a, b)| a != b).count() > before.len() / 2);
    assert_eq!(score(&mut CpuEngine::new(), &c.base, &reqs), before);
}

#[test]
fn deltas_in_sequence_equal_one_delta_and_tables_not_touched_share_their_overlay() {
    let values = [feed::request(100, 21)];
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let c = case(&reqs);
    // The same changes in two deltas: the tables in the first, the rest in the second.
    let mut first = c.delta.clone();
    first.layers.clear();
    first.wide_bias = None;
    let mut second = c.delta.clone();
    second.sequence = 2;
    second.tables.truncate(3);
    let one = c.base.apply(&c.delta).unwrap();
    let two = c.base.apply(&first).unwrap().apply(&second).unwrap();
    assert_eq!(two.update_stats().sequence, 2);
    assert_eq!(
        two.update_stats().overlay_rows,
        one.update_stats().overlay_rows
    );
    let mut e = CpuEngine::new();
    assert_eq!(score(&mut e, &two, &reqs), score(&mut e, &one, &reqs));
}

#[test]
fn bad_deltas_are_refused_whole() {
    let values = [feed::request(50, 31)];
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let c = case(&reqs);
    let mut e = CpuEngine::new();
    let before = score(&mut e, &c.base, &reqs);
    type Edit = Box<dyn Fn(&mut Delta)>;
    let edits: Vec<(&str, Edit)> = vec![
        ("model", Box::new(|d| d.model = "other".into())),
        ("version", Box::new(|d| d.base_version = 2)),
        ("table index", Box::new(|d| d.tables[0].index = 99)),
        ("row", Box::new(|d| d.tables[1].rows[0] = u32::MAX)),
        (
            "dim",
            Box::new(|d| {
                d.tables[0].dim = 8;
            }),
        ),
        (
            "values",
            Box::new(|d| d.tables[0].values.pop().map_or((), drop)),
        ),
        ("nan", Box::new(|d| d.tables[2].values[0] = f32::NAN)),
        ("wide nan", Box::new(|d| d.wide_bias = Some(f32::INFINITY))),
        ("layer", Box::new(|d| d.layers[1].index = 7)),
        ("layer shape", Box::new(|d| d.layers[0].in_dim = 3)),
        ("layer nan", Box::new(|d| d.layers[1].bias[0] = f32::NAN)),
    ];
    for (what, edit) in edits {
        let mut d = c.delta.clone();
        edit(&mut d);
        // Valid in every table but the last one edited: nothing may be half-applied.
        let err = c.base.apply(&d).unwrap_err();
        assert!(matches!(err, DeltaError::Mismatch(_)), "{what}: {err}");
    }
    assert_eq!(score(&mut e, &c.base, &reqs), before);
}

/// A multi-task model (MMoE): a delta with rows of every table and some of its layers in their
/// flat order (docs/online.md: each expert's layers, then per head its gate and tower) scores,
/// every head, what a file written with those parameters scores; the f64 reference reads the
/// changed layers too; a layer of the wrong shape is refused whole.
#[test]
fn a_multitask_model_takes_deltas_of_its_layers() {
    let dir = tempfile::tempdir().unwrap();
    let config = feed::multitask_config(3, &[32, 16], &[8, 1], 2);
    let t0 = feed::tensors(&config, 5).unwrap();
    let meta = |v| Metadata {
        name: "feed".into(),
        version: v,
        ..Metadata::default()
    };
    let base_path = dir.path().join("base.rkm");
    write_model(&config, meta(1), &t0, &base_path).unwrap();
    let base = Model::open(&base_path).unwrap();
    let values = [feed::request(40, 8), feed::request(9, 9)];
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let ids = touched(&base, &reqs);
    // Flat layer order: expert 0 (2 layers), expert 1, expert 2, then per head gate, tower 0,
    // tower 1. Change expert 0's first layer (fused), expert 2's second, the second head's gate
    // (fused) and the first head's tower output.
    let flat = [
        "expert.0.0",
        "expert.0.1",
        "expert.1.0",
        "expert.1.1",
        "expert.2.0",
        "expert.2.1",
        "gate.click",
        "tower.click.0",
        "tower.click.1",
        "gate.like",
        "tower.like.0",
        "tower.like.1",
    ];
    let mut t1 = t0.clone();
    let mut delta = Delta {
        model: "feed".into(),
        base_version: 1,
        sequence: 1,
        ..Delta::default()
    };
    let mut rng = Rng::new(3);
    let e = &config.embeddings[4];
    let slot = base.features().slot_index(&e.slot).unwrap();
    let rows: Vec<u32> = ids[slot].iter().copied().step_by(2).collect();
    let dim = e.dim as usize;
    let vals = rng.vec(rows.len() * dim, 0.1);
    let table = &mut t1.get_mut(&format!("embedding.{}", e.slot)).unwrap().1;
    for (r, v) in rows.iter().zip(vals.chunks(dim)) {
        table[*r as usize * dim..(*r as usize + 1) * dim].copy_from_slice(v);
    }
    delta.tables.push(RowUpdate {
        kind: TableKind::Embedding,
        index: 4,
        dim: dim as u32,
        rows,
        values: vals,
    });
    for i in [0usize, 5, 9, 8] {
        let name = flat[i];
        let (shape, w) = t1.get_mut(&format!("{name}.weight")).unwrap();
        let (out_dim, in_dim) = (shape[0] as u32, shape[1] as u32);
        w.iter_mut().for_each(|v| *v = -*v * 1.3);
        let w = w.clone();
        let b = &mut t1.get_mut(&format!("{name}.bias")).unwrap().1;
        b.iter_mut().for_each(|v| *v += 0.2);
        delta.layers.push(LayerUpdate {
            index: i as u32,
            out_dim,
            in_dim,
            weight: w,
            bias: b.clone(),
        });
    }
    let patched_path = dir.path().join("patched.rkm");
    write_model(&config, meta(1), &t1, &patched_path).unwrap();
    let patched = Model::open(&patched_path).unwrap();
    let updated = base.apply(&delta).unwrap();
    let heads = |m: &Model, split| common::scores(&mut CpuEngine::with_split(split), m, &reqs);
    for split in [Split::RequestLevel, Split::Off] {
        let (got, want, old) = (
            heads(&updated, split),
            heads(&patched, split),
            heads(&base, split),
        );
        let max = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(max <= 1e-6, "{split:?}: updated vs patched {max}");
        assert!(
            got.iter().zip(&old).any(|(a, b)| (a - b).abs() > 1e-3),
            "the delta changed nothing"
        );
    }
    for r in &reqs {
        let got = rankd_engine::reference::score_heads(&updated, r).unwrap();
        let want = rankd_engine::reference::score_heads(&patched, r).unwrap();
        for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
            assert!((g - w).abs() < 1e-9, "reference: {g} vs {w}");
        }
    }
    // A layer of the wrong shape: refused whole.
    let mut bad = delta.clone();
    bad.layers[1].bias.push(0.0);
    let e = base.apply(&bad).unwrap_err();
    assert!(matches!(e, DeltaError::Mismatch(_)), "{e}");
    bad = delta;
    bad.layers[0].index = 12;
    assert!(base
        .apply(&bad)
        .unwrap_err()
        .to_string()
        .contains("no deep layer 12"));
}
