//! DCN-v2 cross layers (full-rank and low-rank, stacked and parallel) in the CPU engine, on
//! every kernel build this CPU runs, with the request-level split of the first cross product and
//! without, against the f64 reference; and on the GPU backend (emulated devices here, real ones
//! where there are any) equal to the CPU engine.

mod common;

use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::kernel::Isa;
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model};
use rankd_formats::config::{write_model, CrossConfig, TensorMap};
use rankd_formats::synth::{feed, Rng};
use rankd_formats::{CrossStructure, Metadata};

fn model(dir: &std::path::Path, rank: u32, structure: CrossStructure) -> Model {
    let mut config = feed::config();
    config.cross = Some(CrossConfig {
        layers: 2,
        rank,
        structure,
    });
    let mut rng = Rng::new(5);
    let mut t = TensorMap::new();
    for s in config.tensors().unwrap() {
        let n = s.numel() as usize;
        let scale = if s.name.starts_with("deep.") && s.name.ends_with("weight") {
            (2.0 / s.shape[1] as f32).sqrt()
        } else if s.name.starts_with("cross.") {
            0.05
        } else {
            0.2
        };
        t.insert(s.name, (s.shape, rng.vec(n, scale)));
    }
    let path = dir.join(format!("cross-{rank}-{structure:?}.rkm"));
    let meta = Metadata {
        name: "feed".into(),
        version: 1,
        ..Metadata::default()
    };
    write_model(&config, meta, &t, &path).unwrap();
    let m = Model::open(&path).unwrap();
    assert_eq!(m.file().header().version, 3);
    m
}

#[test]
fn cross_models_score_what_the_reference_scores_on_every_isa() {
    let dir = tempfile::tempdir().unwrap();
    let values = [feed::request(130, 3), feed::request(7, 4)];
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    for (rank, structure) in [
        (0, CrossStructure::Stacked),
        (0, CrossStructure::Parallel),
        (16, CrossStructure::Stacked),
        (16, CrossStructure::Parallel),
    ] {
        let m = model(dir.path(), rank, structure);
        let want: Vec<f64> = reqs
            .iter()
            .flat_map(|r| rankd_engine::reference::score(&m, r).unwrap())
            .collect();
        let spread = want.iter().fold(0f64, |a, &p| a.max((p - 0.5).abs()));
        assert!(spread > 0.05, "degenerate scores: {spread}");
        for (isa, split) in Isa::available()
            .into_iter()
            .flat_map(|i| [(i, Split::RequestLevel), (i, Split::Off)])
        {
            let mut e = CpuEngine::with_split(split).with_isa(isa);
            let refs: Vec<&dyn rankd_engine::Request> = reqs
                .iter()
                .map(|r| r as &dyn rankd_engine::Request)
                .collect();
            let mut out = BatchOutput::default();
            e.score(&m, &refs, &mut out);
            let got: Vec<f32> = (0..reqs.len())
                .flat_map(|i| out.get(i).unwrap().to_vec())
                .collect();
            let max = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (f64::from(*g) - w).abs())
                .fold(0f64, f64::max);
            assert!(
                max < 2e-5,
                "rank {rank} {structure:?} {isa:?} {split:?}: max difference {max}"
            );
        }
    }
}

/// Every cross variant on `gpus` against the CPU engine: requests of several shapes in one call
/// (the first product split by request), merged into device batches.
fn gpu_equals_the_cpu_engine(gpus: &std::sync::Arc<rankd_engine::gpu::Gpus>, tolerance: f32) {
    let dir = tempfile::tempdir().unwrap();
    let values = common::feed_requests(&[130, 7, 1, 300]);
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let refs: Vec<&dyn rankd_engine::Request> = reqs
        .iter()
        .map(|r| r as &dyn rankd_engine::Request)
        .collect();
    for (rank, structure) in [
        (0, CrossStructure::Stacked),
        (0, CrossStructure::Parallel),
        (16, CrossStructure::Stacked),
        (16, CrossStructure::Parallel),
    ] {
        let m = std::sync::Arc::new(model(dir.path(), rank, structure));
        gpus.load(&m).unwrap();
        assert_ne!(m.backend(), "cpu");
        let mut got = BatchOutput::default();
        gpus.core().score_blocking(&m, &refs, &mut got);
        let mut want = BatchOutput::default();
        CpuEngine::new().score(&m, &refs, &mut want);
        for i in 0..refs.len() {
            let (g, w) = (got.get(i).unwrap(), want.get(i).unwrap());
            assert_eq!(g.len(), w.len());
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= tolerance,
                    "rank {rank} {structure:?}: request {i} item {j}: gpu {a} vs cpu {b}"
                );
            }
        }
    }
}

#[test]
fn cross_models_on_the_emulated_gpu_equal_the_cpu_engine() {
    use rankd_engine::gpu::{BatchSettings, Gpus};
    gpu_equals_the_cpu_engine(&Gpus::emulated(2, BatchSettings::default()), 1e-5);
}

/// The same on real GPUs, where the CUDA driver finds one.
#[test]
fn cross_models_on_cuda_equal_the_cpu_engine() {
    if let Some(gpus) = common::real_gpus() {
        gpu_equals_the_cpu_engine(&gpus, 1e-4);
    }
}
