//! DCN-v2 cross layers (full-rank and low-rank, stacked and parallel) in the CPU engine, on
//! every kernel build this CPU runs, with the request-level split of the first cross product and
//! without, against the f64 reference; and a cross model is refused by
//! the GPU backend's placement (it is served by the CPU engine).

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

#[test]
fn a_cross_model_stays_on_the_cpu_engine_when_gpus_serve() {
    use rankd_engine::gpu::{BatchSettings, Gpus};
    let dir = tempfile::tempdir().unwrap();
    let m = std::sync::Arc::new(model(dir.path(), 8, CrossStructure::Parallel));
    let gpus = Gpus::emulated(1, BatchSettings::default());
    let err = gpus.load(&m).unwrap_err();
    assert!(err.to_string().contains("cross"), "{err}");
    assert_eq!(m.backend(), "cpu");
    assert!(m.placement_note().is_some_and(|n| n.contains("cross")));
}
