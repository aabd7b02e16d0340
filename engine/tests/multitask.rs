//! Multi-task heads (a shared bottom and MMoE, towers with and without hidden layers) in the
//! CPU engine, on every kernel build this CPU runs, with the request-level split of the fused
//! first layer and without, against the f64 reference head by head; a bad request fails alone
//! with the other requests' heads in place; and every head on the GPU backend (emulated devices
//! here, real ones where there are any) equal to the CPU engine's.

mod common;

use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::kernel::Isa;
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model, Request};
use rankd_formats::synth::feed;

fn model(
    dir: &std::path::Path,
    experts: u32,
    layers: &[u32],
    tower: &[u32],
    heads: usize,
) -> Model {
    let config = feed::multitask_config(experts, layers, tower, heads);
    let path = dir.join(format!("mt-{experts}-{layers:?}-{tower:?}.rkm"));
    feed::write_config(&path, &config, 1, 9).unwrap();
    let m = Model::open(&path).unwrap();
    assert_eq!(m.file().header().version, 4);
    m
}

#[test]
fn every_head_scores_what_the_reference_scores_on_every_isa() {
    let dir = tempfile::tempdir().unwrap();
    let values = [
        feed::request(130, 3),
        feed::request(7, 4),
        feed::request(41, 5),
    ];
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let refs: Vec<&dyn Request> = reqs.iter().map(|r| r as &dyn Request).collect();
    for (experts, layers, tower, heads) in [
        (4, &[64, 32][..], &[16, 1][..], 3),
        (1, &[48][..], &[1][..], 2),
        (3, &[40][..], &[8, 8, 1][..], 4),
        (1, &[32, 16][..], &[16, 1][..], 1),
    ] {
        let m = model(dir.path(), experts, layers, tower, heads);
        assert_eq!(m.num_heads(), heads);
        let want: Vec<Vec<Vec<f64>>> = reqs
            .iter()
            .map(|r| rankd_engine::reference::score_heads(&m, r).unwrap())
            .collect();
        // The heads differ from one another (a mixture or tower that ignored its head would not).
        if heads > 1 {
            let apart = want[0][0]
                .iter()
                .zip(&want[0][1])
                .map(|(a, b)| (a - b).abs())
                .fold(0f64, f64::max);
            assert!(apart > 0.01, "heads 0 and 1 agree: {apart}");
        }
        for (isa, split) in Isa::available()
            .into_iter()
            .flat_map(|i| [(i, Split::RequestLevel), (i, Split::Off)])
        {
            let mut e = CpuEngine::with_split(split).with_isa(isa);
            let mut out = BatchOutput::default();
            e.score(&m, &refs, &mut out);
            for (i, want) in want.iter().enumerate() {
                for (h, want) in want.iter().enumerate() {
                    let got = out.head(i, h).expect("a head").unwrap();
                    assert_eq!(got.len(), want.len());
                    let max = got
                        .iter()
                        .zip(want)
                        .map(|(g, w)| (f64::from(*g) - w).abs())
                        .fold(0f64, f64::max);
                    assert!(
                        max < 2e-5,
                        "{experts} experts {layers:?} {tower:?} {isa:?} {split:?} request {i} \
                         head {h}: max difference {max}"
                    );
                }
                assert!(out.head(i, heads).is_none());
                assert_eq!(out.get(i).unwrap(), out.head(i, 0).unwrap().unwrap());
            }
        }
    }
}

#[test]
fn a_bad_request_fails_alone_and_the_others_keep_their_heads() {
    let dir = tempfile::tempdir().unwrap();
    let m = model(dir.path(), 2, &[32], &[8, 1], 3);
    let good = [feed::request(20, 1), feed::request(9, 2)];
    let mut bad = feed::request(5, 3);
    // A string where the first numeric feature is expected.
    bad.items[2][0] = feed::Cell::Str("not a number".into());
    let reqs = [
        DenseRequest::from(&good[0]),
        DenseRequest::from(&bad),
        DenseRequest::from(&good[1]),
    ];
    let refs: Vec<&dyn Request> = reqs.iter().map(|r| r as &dyn Request).collect();
    let mut out = BatchOutput::default();
    CpuEngine::new().score(&m, &refs, &mut out);
    assert!(
        matches!(out.head(1, 2), Some(Err(_))),
        "the bad request fails"
    );
    for (i, r) in [(0, &reqs[0]), (2, &reqs[2])] {
        let want = rankd_engine::reference::score_heads(&m, r).unwrap();
        for (h, want) in want.iter().enumerate() {
            let got = out.head(i, h).unwrap().unwrap();
            for (g, w) in got.iter().zip(want) {
                assert!((f64::from(*g) - w).abs() < 2e-5, "request {i} head {h}");
            }
        }
    }
}

/// Scores `reqs` of every multi-task model on `gpus` and compares every head with the CPU
/// engine: one-layer and deeper experts, one expert and several, towers with and without hidden
/// layers; requests of different shapes merged into one device batch.
fn gpu_heads_equal_the_cpu_engine(gpus: &std::sync::Arc<rankd_engine::gpu::Gpus>, tolerance: f32) {
    let dir = tempfile::tempdir().unwrap();
    let values = common::feed_requests(&[130, 7, 1, 300]);
    let reqs: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    let refs: Vec<&dyn Request> = reqs.iter().map(|r| r as &dyn Request).collect();
    for (experts, layers, tower, heads) in [
        (4, &[64, 32][..], &[16, 1][..], 3),
        (1, &[48][..], &[1][..], 2),
        (3, &[40][..], &[8, 8, 1][..], 4),
        (1, &[32, 16, 8][..], &[16, 1][..], 2),
    ] {
        let m = std::sync::Arc::new(model(dir.path(), experts, layers, tower, heads));
        gpus.load(&m).unwrap();
        assert_ne!(m.backend(), "cpu");
        let mut got = BatchOutput::default();
        gpus.core().score_blocking(&m, &refs, &mut got);
        let mut want = BatchOutput::default();
        CpuEngine::new().score(&m, &refs, &mut want);
        for i in 0..refs.len() {
            for h in 0..heads {
                let (g, w) = (
                    got.head(i, h).unwrap().unwrap(),
                    want.head(i, h).unwrap().unwrap(),
                );
                assert_eq!(g.len(), w.len());
                for (j, (a, b)) in g.iter().zip(w).enumerate() {
                    assert!(
                        (a - b).abs() <= tolerance,
                        "{experts} experts {layers:?} {tower:?}: request {i} head {h} item {j}: \
                         gpu {a} vs cpu {b}"
                    );
                }
            }
            assert!(got.head(i, heads).is_none());
        }
    }
}

#[test]
fn every_head_on_the_emulated_gpu_equals_the_cpu_engine() {
    use rankd_engine::gpu::{BatchSettings, Gpus};
    gpu_heads_equal_the_cpu_engine(&Gpus::emulated(2, BatchSettings::default()), 1e-5);
}

/// The same on real GPUs, where the CUDA driver finds one.
#[test]
fn every_head_on_cuda_equals_the_cpu_engine() {
    if let Some(gpus) = common::real_gpus() {
        gpu_heads_equal_the_cpu_engine(&gpus, 1e-4);
    }
}

/// Jobs from several cores merge into shared device batches, and each gets every head of its
/// own rows back.
#[test]
fn merged_device_batches_give_each_core_its_heads() {
    use rankd_engine::gpu::{BatchSettings, Gpus};
    use std::sync::Arc;
    let gpus = Gpus::emulated(
        1,
        BatchSettings {
            max_batch_items: 4096,
            max_wait: std::time::Duration::from_millis(5),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(model(dir.path(), 3, &[32, 16], &[8, 1], 3));
    gpus.load(&m).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (gpus, m) = (gpus.clone(), m.clone());
            std::thread::spawn(move || {
                let mut core = gpus.core();
                let mut cpu = CpuEngine::new();
                for round in 0..15 {
                    let v = feed::request(10 + t * 7, (round * 4 + t) as u64);
                    let r = DenseRequest::from(&v);
                    let (mut g, mut c) = (BatchOutput::default(), BatchOutput::default());
                    core.score_blocking(&m, &[&r], &mut g);
                    cpu.score(&m, &[&r], &mut c);
                    for h in 0..3 {
                        let (a, b) = (
                            g.head(0, h).unwrap().unwrap(),
                            c.head(0, h).unwrap().unwrap(),
                        );
                        for (x, y) in a.iter().zip(b) {
                            assert!((x - y).abs() <= 1e-5, "thread {t} round {round} head {h}");
                        }
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let metrics = gpus.metrics();
    let jobs = metrics.jobs.load(std::sync::atomic::Ordering::Relaxed);
    let batches = metrics.batches.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(jobs, 60);
    assert!(
        batches < jobs,
        "{batches} device batches for {jobs} jobs: nothing merged"
    );
}
