//! The GPU backend. Everything but the kernels runs here on every machine, through emulated
//! devices that execute the device operations on the host with the real batching, slots,
//! residency and error handling; the same checks then run on real GPUs where the CUDA driver
//! finds one, and are skipped with the reason printed where it does not.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{model, owned, real_gpus, request};
use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::gpu::{self, BatchSettings, Gpus};
use rankd_engine::{BatchOutput, EngineError, InferenceBackend, Model, Request};
use rankd_feature_ops::Value;
use rankd_formats::synth::ModelKind;

const KINDS: [ModelKind; 4] = [
    ModelKind::Wide,
    ModelKind::Deep,
    ModelKind::WideDeep,
    ModelKind::DeepFm,
];

/// Scores `reqs` on the GPUs and on the CPU engine (split on and off) and compares.
fn same_as_cpu(gpus: &Arc<Gpus>, m: &Arc<Model>, reqs: &[&dyn Request], tolerance: f32) {
    let mut core = gpus.core();
    assert_ne!(core.backend_for(m), "cpu", "{} is on a GPU", m.backend());
    let mut got = BatchOutput::default();
    core.score_blocking(m, reqs, &mut got);
    for split in [Split::RequestLevel, Split::Off] {
        let mut want = BatchOutput::default();
        CpuEngine::with_split(split).score(m, reqs, &mut want);
        for i in 0..reqs.len() {
            let (g, w) = (got.get(i).unwrap(), want.get(i).unwrap());
            assert_eq!(g.len(), w.len());
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                assert!(
                    (a - b).abs() <= tolerance,
                    "{} request {i} item {j} ({split:?}): gpu {a} vs cpu {b}",
                    m.file().spec().architecture.kind()
                );
            }
        }
    }
    // Not a comparison of constants.
    let all: Vec<f32> = (0..reqs.len())
        .flat_map(|i| got.get(i).unwrap().to_vec())
        .collect();
    if all.len() > 2 {
        assert!(all.iter().any(|&x| (x - all[0]).abs() > 1e-4));
    }
}

fn every_kind_and_size(gpus: &Arc<Gpus>, sizes: &[usize], tolerance: f32) {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(*sizes.iter().max().unwrap());
    for kind in KINDS {
        let m = Arc::new(model(kind, dir.path()));
        gpus.load(&m).unwrap();
        for (v, &n) in sizes.iter().enumerate() {
            let r = request(&o, n, v);
            same_as_cpu(gpus, &m, &[&r], tolerance);
        }
        // Several requests of different shapes in one call: one with no item override has a
        // plan of its own.
        let a = request(&o, 9, 0);
        let b = request(&o, 2, 1);
        let mut c = request(&o, 5, 2);
        for item in &mut c.items {
            item[1] = Value::Missing;
        }
        let d = request(&o, 30, 4);
        let empty = request(&o, 0, 3);
        same_as_cpu(gpus, &m, &[&a, &b, &c, &empty, &d], tolerance);
    }
}

#[test]
fn emulated_gpu_scores_equal_the_cpu_engine() {
    let gpus = Gpus::emulated(2, BatchSettings::default());
    every_kind_and_size(&gpus, &[1, 200, 4096], 1e-5);
}

#[test]
fn emulated_gpu_scores_a_65536_item_batch() {
    let gpus = Gpus::emulated(1, BatchSettings::default());
    let dir = tempfile::tempdir().unwrap();
    let o = owned(65_536);
    let m = Arc::new(model(ModelKind::DeepFm, dir.path()));
    gpus.load(&m).unwrap();
    let r = request(&o, 65_536, 1);
    same_as_cpu(&gpus, &m, &[&r], 1e-5);
}

/// Real GPUs, where there are any.
#[test]
fn cuda_scores_equal_the_cpu_engine() {
    let Some(gpus) = real_gpus() else { return };
    every_kind_and_size(&gpus, &[1, 200, 4096, 65_536], 1e-4);
}

#[test]
fn cuda_error_fails_the_batch_and_the_device_goes_on() {
    let Some(gpus) = real_gpus() else { return };
    fault_fails_one_batch(&gpus);
}

#[test]
fn emulated_fault_fails_the_batch_and_the_device_goes_on() {
    let gpus = Gpus::emulated(1, BatchSettings::default());
    fault_fails_one_batch(&gpus);
}

fn fault_fails_one_batch(gpus: &Arc<Gpus>) {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(50);
    let m = Arc::new(model(ModelKind::WideDeep, dir.path()));
    gpus.load(&m).unwrap();
    let r = request(&o, 50, 1);
    let mut core = gpus.core();
    gpus.inject_fault(0, gpu::Fault::Failed);
    let mut out = BatchOutput::default();
    core.score_blocking(&m, &[&r, &r], &mut out);
    for i in 0..2 {
        match &out.results[i] {
            Err(EngineError::Device(e)) => assert!(!e.message.is_empty()),
            other => panic!("request {i}: expected a device error, got {other:?}"),
        }
    }
    assert_eq!(
        gpus.metrics()
            .errors
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert!(!gpus.is_lost(0), "a failed launch does not lose the device");
    same_as_cpu(gpus, &m, &[&r], 1e-4);
}

/// Requests from several cores merge into shared device batches, and each core gets its own
/// scores back.
#[test]
fn jobs_from_many_cores_merge_into_device_batches() {
    let gpus = Gpus::emulated(
        1,
        BatchSettings {
            max_batch_items: 4096,
            max_wait: Duration::from_millis(5),
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let m = Arc::new(model(ModelKind::DeepFm, dir.path()));
    gpus.load(&m).unwrap();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (gpus, m) = (gpus.clone(), m.clone());
            std::thread::spawn(move || {
                let o = owned(60);
                let mut core = gpus.core();
                let mut cpu = CpuEngine::new();
                for round in 0..25 {
                    let r = request(&o, 20 + t * 10, round + t);
                    let (mut g, mut c) = (BatchOutput::default(), BatchOutput::default());
                    core.score_blocking(&m, &[&r], &mut g);
                    cpu.score(&m, &[&r], &mut c);
                    for (a, b) in g.get(0).unwrap().iter().zip(c.get(0).unwrap()) {
                        assert!(
                            (a - b).abs() <= 1e-5,
                            "thread {t} round {round}: {a} vs {b}"
                        );
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let jobs = gpus
        .metrics()
        .jobs
        .load(std::sync::atomic::Ordering::Relaxed);
    let batches = gpus
        .metrics()
        .batches
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(jobs, 100);
    assert!(
        batches < jobs,
        "{batches} device batches for {jobs} jobs: nothing merged"
    );
}

/// A version no device holds is scored by the core's CPU engine; a version's device copy is
/// freed once its last user is gone.
#[test]
fn residency_and_unload() {
    let gpus = Gpus::emulated(1, BatchSettings::default());
    let dir = tempfile::tempdir().unwrap();
    let o = owned(20);
    let m = Arc::new(model(ModelKind::Deep, dir.path()));
    let mut core = gpus.core();
    assert_eq!(core.backend_for(&m), "cpu");
    assert_eq!(m.backend(), "cpu");
    let r = request(&o, 20, 0);
    let mut out = BatchOutput::default();
    core.score_blocking(&m, &[&r], &mut out);
    assert_eq!(out.get(0).unwrap().len(), 20);
    assert_eq!(
        gpus.metrics()
            .batches
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );

    gpus.load(&m).unwrap();
    assert_eq!(m.backend(), "emulated:0");
    assert_eq!(m.placement_note(), None);
    core.score_blocking(&m, &[&r], &mut out);
    assert_eq!(
        gpus.metrics()
            .batches
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    drop(m);
    let start = Instant::now();
    while gpus
        .metrics()
        .unloads
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the device copy was never freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn device_selection() {
    use gpu::{select, DeviceInfo, DeviceSpec, Selection, Unavailable};
    for (s, want) in [
        ("auto", DeviceSpec::Auto),
        ("cpu", DeviceSpec::Cpu),
        ("cuda", DeviceSpec::Cuda(None)),
        ("cuda:0,1", DeviceSpec::Cuda(Some(vec![0, 1]))),
    ] {
        let spec: DeviceSpec = s.parse().unwrap();
        assert_eq!(spec, want);
        assert_eq!(spec.to_string(), s);
    }
    for bad in ["gpu", "cuda:", "cuda:x", "cuda:0,0", "cuda:99"] {
        assert!(bad.parse::<DeviceSpec>().is_err(), "{bad}");
    }
    let two = Ok(vec![
        DeviceInfo {
            ordinal: 0,
            name: "a".into(),
            total_bytes: 1,
        },
        DeviceInfo {
            ordinal: 1,
            name: "b".into(),
            total_bytes: 1,
        },
    ]);
    let none: Result<Vec<DeviceInfo>, Unavailable> = Err(Unavailable::NoDriver);
    let auto = DeviceSpec::Auto;
    assert_eq!(select(&auto, &two), Ok(Selection::Cuda(vec![0, 1])));
    match select(&auto, &none) {
        Ok(Selection::Cpu { reason }) => assert!(reason.contains("libcuda"), "{reason}"),
        other => panic!("{other:?}"),
    }
    let only1 = DeviceSpec::Cuda(Some(vec![1]));
    assert_eq!(select(&only1, &two), Ok(Selection::Cuda(vec![1])));
    assert!(select(&DeviceSpec::Cuda(Some(vec![2])), &two)
        .unwrap_err()
        .contains("no GPU 2"));
    assert!(select(&DeviceSpec::Cuda(None), &none)
        .unwrap_err()
        .contains("libcuda"));
    assert!(matches!(
        select(&DeviceSpec::Cpu, &two),
        Ok(Selection::Cpu { .. })
    ));
    // This machine: whatever it has, probing never panics and auto always decides.
    let here = gpu::probe();
    assert!(select(&auto, &here).is_ok());
}

/// A lost device leaves service: the batch it was running and every later request are scored
/// by the CPU engine, with nothing failed.
fn lost_device_moves_models_to_the_cpu(gpus: &Arc<Gpus>) {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(40);
    let m = Arc::new(model(ModelKind::WideDeep, dir.path()));
    gpus.load(&m).unwrap();
    let r = request(&o, 40, 2);
    let mut core = gpus.core();
    let mut want = BatchOutput::default();
    CpuEngine::new().score(&m, &[&r], &mut want);
    gpus.inject_fault(0, gpu::Fault::Lost);
    for round in 0..3 {
        let mut out = BatchOutput::default();
        core.score_blocking(&m, &[&r, &r], &mut out);
        for i in 0..2 {
            let (g, w) = (out.get(i).unwrap(), want.get(0).unwrap());
            for (a, b) in g.iter().zip(w) {
                assert!((a - b).abs() <= 1e-5, "round {round}: {a} vs {b}");
            }
        }
    }
    assert!(gpus.is_lost(0));
    assert_eq!(m.backend(), "cpu");
    assert_eq!(core.backend_for(&m), "cpu");
    assert!(
        m.placement_note().unwrap().contains("lost"),
        "{:?}",
        m.placement_note()
    );
    let fallbacks = gpus
        .metrics()
        .cpu_fallbacks
        .load(std::sync::atomic::Ordering::Relaxed);
    // The two requests of the lost batch; one, when the device worker took the first request
    // before the second was queued (a busy machine): the second then never reached the device.
    assert!(
        (1..=2).contains(&fallbacks),
        "{fallbacks} fallbacks for the requests of the lost batch"
    );
    // A version loaded later does not go to the lost device.
    let m2 = Arc::new(model(ModelKind::Deep, dir.path()));
    assert!(gpus.load(&m2).is_err());
    assert_eq!(m2.backend(), "cpu");
}

#[test]
fn emulated_lost_device_moves_models_to_the_cpu() {
    lost_device_moves_models_to_the_cpu(&Gpus::emulated(1, BatchSettings::default()));
}

#[test]
fn cuda_lost_device_moves_models_to_the_cpu() {
    let Some(gpus) = real_gpus() else { return };
    lost_device_moves_models_to_the_cpu(&gpus);
}

/// A version larger than a device's free memory is refused with a clear error and served by the
/// CPU engine; a version that fits goes on.
#[test]
fn a_model_too_large_for_the_device_runs_on_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let o = owned(30);
    let m = Arc::new(model(ModelKind::DeepFm, dir.path()));
    // Room for the work space and a few KiB: less than the model's weights.
    let gpus = Gpus::emulated_with_memory(1, BatchSettings::default(), Some((512 << 20) + 4096));
    let e = gpus.load(&m).unwrap_err();
    assert_eq!(e.kind, gpu::GpuErrorKind::OutOfMemory);
    assert!(
        e.message.contains("needs") && e.message.contains("free"),
        "{e}"
    );
    assert_eq!(m.backend(), "cpu");
    assert!(m.placement_note().unwrap().contains("MiB"));
    let r = request(&o, 30, 1);
    let mut core = gpus.core();
    let (mut got, mut want) = (BatchOutput::default(), BatchOutput::default());
    core.score_blocking(&m, &[&r], &mut got);
    CpuEngine::new().score(&m, &[&r], &mut want);
    assert_eq!(got.get(0).unwrap(), want.get(0).unwrap());
    assert_eq!(
        gpus.metrics()
            .batches
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // With enough memory the same model goes to the device.
    let roomy = Gpus::emulated_with_memory(1, BatchSettings::default(), Some(1 << 40));
    roomy.load(&m).unwrap();
    assert_eq!(m.backend(), "emulated:0");
}

#[test]
fn f16_tables_score_as_their_values_on_the_cpu_and_the_emulated_gpu() {
    stored_tables_score_as_their_values(rankd_formats::WeightType::F16);
}

#[test]
fn int8_tables_score_as_their_values_on_the_cpu_and_the_emulated_gpu() {
    stored_tables_score_as_their_values(rankd_formats::WeightType::I8);
}

/// The feed model with its tables stored as `weight_type`: the stored values are the f32 ones
/// rounded as documented, every CPU build scores as the f64 reference (which decodes them
/// itself), the scores differ from the f32 model's a little, and the emulated GPU agrees.
fn stored_tables_score_as_their_values(weight_type: rankd_formats::WeightType) {
    use rankd_formats::{synth::feed, WeightType};
    let dir = tempfile::tempdir().unwrap();
    let (p32, p16) = (dir.path().join("f32.rkm"), dir.path().join("typed.rkm"));
    feed::write_typed(&p32, 1, 17, WeightType::F32).unwrap();
    feed::write_typed(&p16, 1, 17, weight_type).unwrap();
    let (m32, m16) = (Model::open(&p32).unwrap(), Model::open(&p16).unwrap());
    assert_eq!(m16.file().header().version, 2);
    assert_eq!(m32.file().header().version, 1);
    let (a32, a16) = (
        &m32.file().spec().architecture,
        &m16.file().spec().architecture,
    );
    for (t32, t16) in a32.embeddings.iter().zip(&a16.embeddings) {
        assert_eq!(t16.weight_type, weight_type);
        let v32 = m32.file().weights(t32.weights);
        if weight_type == WeightType::F16 {
            // Every stored half is its f32 value rounded to nearest.
            let v16 = m16.file().weights_f16(t16.weights);
            assert!(v16.len() >= v32.len());
            for (x, h) in v32.iter().zip(v16) {
                assert_eq!(half::f16::from_f32(*x).to_bits(), *h);
            }
        } else {
            // Every stored byte times its row's scale is within half a step of the value.
            let (q, s) = (
                m16.file().weights_i8(t16.weights),
                m16.file().weights(t16.scales.unwrap()),
            );
            let dim = t16.dim as usize;
            for (i, x) in v32.iter().enumerate() {
                let scale = s[i / dim];
                assert!((f32::from(q[i]) * scale - x).abs() <= scale * 0.5 + 1e-7);
            }
        }
    }
    let v = feed::request(300, 5);
    let req = rankd_engine::request::DenseRequest::from(&v);
    // Every CPU build against the f64 reference (which decodes the halves itself).
    let want = rankd_engine::reference::score(&m16, &req).unwrap();
    for isa in rankd_engine::kernel::Isa::available() {
        for split in [Split::RequestLevel, Split::Off] {
            let mut out = BatchOutput::default();
            CpuEngine::with_split(split)
                .with_isa(isa)
                .score(&m16, &[&req], &mut out);
            for (a, b) in out.get(0).unwrap().iter().zip(&want) {
                assert!(
                    (f64::from(*a) - b).abs() < 1e-5,
                    "{isa:?} {split:?}: {a} vs {b}"
                );
            }
        }
    }
    // f16 scores differ from f32 ones a little, not nothing.
    let (mut o16, mut o32) = (BatchOutput::default(), BatchOutput::default());
    CpuEngine::new().score(&m16, &[&req], &mut o16);
    CpuEngine::new().score(&m32, &[&req], &mut o32);
    let diff = o16
        .get(0)
        .unwrap()
        .iter()
        .zip(o32.get(0).unwrap())
        .map(|(a, b)| (a - b).abs());
    let worst = diff.fold(0f32, f32::max);
    assert!(worst > 0.0 && worst < 2e-2, "{weight_type:?}: {worst}");
    // The emulated GPU holds the tables converted to f32: the same scores.
    let gpus = Gpus::emulated(1, BatchSettings::default());
    let m16 = Arc::new(m16);
    gpus.load(&m16).unwrap();
    same_as_cpu(&gpus, &m16, &[&req], 1e-5);
}
