//! The engine's steady state: after a warm-up call, scoring the same shape of request again
//! allocates nothing at all (the dense kernel works on weights packed once per model and on
//! the engine's own scratch). A counting global allocator watches.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rankd_engine::cpu::CpuEngine;
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model};
use rankd_feature_ops::Value;
use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static SIZES: [AtomicUsize; 8] = [const { AtomicUsize::new(0) }; 8];

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            let n = ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            if n < 8 {
                SIZES[n].store(layout.size(), Ordering::Relaxed);
            }
        }
        // SAFETY: the caller's contract is passed through to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations of each of ten steady-state calls scoring two 50-item requests on a model of
/// `kind`.
fn allocations_per_call(kind: ModelKind) -> Vec<usize> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.rkm");
    write_synthetic(
        &path,
        &SynthOptions {
            kind,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    let model = Model::open(&path).unwrap();
    let tags: Vec<Vec<String>> = (0..50)
        .map(|i| vec![format!("t{i}"), "news".into()])
        .collect();
    let req = DenseRequest {
        user: vec![Value::F64(30.0), Value::Str("Paris"), Value::Int(9)],
        items: (0..50)
            .map(|i| {
                vec![
                    Value::Missing,
                    Value::Missing,
                    Value::Missing,
                    Value::Int(i),
                    Value::StrList(&tags[i as usize]),
                    Value::F64(i as f64),
                ]
            })
            .collect(),
    };
    count(&model, &req)
}

/// Allocations of each of ten steady-state calls scoring `req` twice in one batch.
fn count(model: &Model, req: &DenseRequest<'_>) -> Vec<usize> {
    let mut engine = CpuEngine::new();
    let mut out = BatchOutput::default();
    for _ in 0..3 {
        out.clear();
        engine.score(model, &[req, req], &mut out);
    }
    let mut per_call = Vec::new();
    for _ in 0..10 {
        out.clear();
        let before = ALLOCATIONS.load(Ordering::SeqCst);
        COUNTING.store(true, Ordering::SeqCst);
        engine.score(model, &[req, req], &mut out);
        COUNTING.store(false, Ordering::SeqCst);
        per_call.push(ALLOCATIONS.load(Ordering::SeqCst) - before);
    }
    assert_eq!(out.get(1).unwrap().len(), req.items.len());
    per_call
}

#[test]
fn scoring_in_steady_state_does_not_allocate() {
    for kind in [
        ModelKind::Wide,
        ModelKind::Deep,
        ModelKind::WideDeep,
        ModelKind::DeepFm,
    ] {
        let counts = allocations_per_call(kind);
        let sizes: Vec<usize> = SIZES.iter().map(|s| s.load(Ordering::SeqCst)).collect();
        assert!(
            counts.iter().all(|&n| n == 0),
            "{kind:?} model: {counts:?}; first sizes {sizes:?}"
        );
    }
    // f16 tables (converted row by row on a stack buffer), in the same test: the counter is
    // global, so no other test of this binary may run while it counts.
    use rankd_formats::{synth::feed, WeightType};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f16.rkm");
    feed::write_typed(&path, 1, 17, WeightType::F16).unwrap();
    let model = Model::open(&path).unwrap();
    // Its vocabulary tables are folded into the first layer: that path counts too.
    assert!(model.folded_bytes() > 0);
    let v = feed::request(50, 3);
    let req = DenseRequest::from(&v);
    let counts = count(&model, &req);
    assert!(counts.iter().all(|&n| n == 0), "f16 feed model: {counts:?}");
    // A version with online updates applied (overlays on every table, a replaced layer).
    use rankd_formats::delta::{Delta, LayerUpdate, RowUpdate, TableKind};
    let mut delta = Delta {
        model: "feed".into(),
        base_version: 1,
        sequence: 1,
        ..Delta::default()
    };
    for i in 0..feed::CATEGORICAL as u32 {
        delta.tables.push(RowUpdate {
            kind: TableKind::Embedding,
            index: i,
            dim: 16,
            rows: (0..1000).collect(),
            values: vec![0.01; 16_000],
        });
        delta.tables.push(RowUpdate {
            kind: TableKind::Wide,
            index: i,
            dim: 1,
            rows: (0..1000).collect(),
            values: vec![0.01; 1000],
        });
    }
    delta.layers.push(LayerUpdate {
        index: 1,
        out_dim: 128,
        in_dim: 256,
        weight: vec![0.001; 128 * 256],
        bias: vec![0.0; 128],
    });
    let updated = model.apply(&delta).unwrap();
    let counts = count(&updated, &req);
    assert!(
        counts.iter().all(|&n| n == 0),
        "updated feed model: {counts:?}"
    );
    // DCN-v2 cross layers, full-rank stacked and low-rank parallel.
    for (rank, structure) in [
        (0, rankd_formats::CrossStructure::Stacked),
        (8, rankd_formats::CrossStructure::Parallel),
    ] {
        let mut config = feed::config();
        config.cross = Some(rankd_formats::config::CrossConfig {
            layers: 2,
            rank,
            structure,
        });
        let path = dir.path().join(format!("cross-{rank}.rkm"));
        feed::write_config(&path, &config, 1, 1).unwrap();
        let cross = Model::open(&path).unwrap();
        let counts = count(&cross, &req);
        assert!(
            counts.iter().all(|&n| n == 0),
            "cross rank {rank}: {counts:?}"
        );
    }
    // Multi-task heads: MMoE with towers, and a shared bottom.
    for (experts, layers, tower) in [(3, &[64, 32][..], &[16, 1][..]), (1, &[32][..], &[1][..])] {
        let config = feed::multitask_config(experts, layers, tower, 3);
        let path = dir.path().join(format!("mt-{experts}.rkm"));
        feed::write_config(&path, &config, 1, 1).unwrap();
        let mt = Model::open(&path).unwrap();
        let counts = count(&mt, &req);
        assert!(
            counts.iter().all(|&n| n == 0),
            "multi-task, {experts} experts: {counts:?}"
        );
        // With a delta of its first layer applied.
        let l = &mt
            .file()
            .spec()
            .architecture
            .multitask
            .as_ref()
            .unwrap()
            .experts[0]
            .layers[0];
        let (o, i) = (l.out_dim, l.in_dim);
        let delta = rankd_formats::delta::Delta {
            model: "feed".into(),
            base_version: 1,
            sequence: 1,
            layers: vec![rankd_formats::delta::LayerUpdate {
                index: 0,
                out_dim: o,
                in_dim: i,
                weight: vec![0.001; (o * i) as usize],
                bias: vec![0.0; o as usize],
            }],
            ..Default::default()
        };
        let counts = count(&mt.apply(&delta).unwrap(), &req);
        assert!(
            counts.iter().all(|&n| n == 0),
            "updated multi-task, {experts} experts: {counts:?}"
        );
    }
}
