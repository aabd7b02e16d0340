//! The daemon's GPU path: requests from the cores go to the device workers and back, versions
//! are uploaded at load and freed after their last request, reloads lose nothing. Runs on
//! emulated devices everywhere (the device operations on the host) and on the real GPUs where
//! the CUDA driver finds some; skipped with the reason printed where it finds none.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_serving::client::{Connection, FeatureValue, ScoreRequest};

mod common;
use common::{metric, start_daemon};

fn deploy(root: &Path, version: u64) {
    let dir = root.join("feed");
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join(format!(".tmp-{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    write_synthetic(
        &tmp.join("model.rkm"),
        &SynthOptions {
            name: "feed".into(),
            version,
            kind: ModelKind::DeepFm,
            seed: version,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    std::fs::rename(&tmp, dir.join(version.to_string())).unwrap();
}

fn request(items: usize, variant: i64) -> ScoreRequest {
    let tags = ["news", "sport", "film", "never-seen"];
    ScoreRequest {
        model: "feed".into(),
        user: vec![
            ("user_age".into(), FeatureValue::F64(20.0 + variant as f64)),
            ("user_city".into(), FeatureValue::Str("Paris".into())),
        ],
        items: (0..items)
            .map(|i| {
                let mut f = vec![("item_id".into(), FeatureValue::I64(i as i64 * 31 + variant))];
                if i % 3 != 0 {
                    let t: Vec<String> = (0..i % 4)
                        .map(|j| tags[(i + j) % tags.len()].to_string())
                        .collect();
                    f.push(("item_tags".into(), FeatureValue::StrList(t)));
                }
                if i % 5 != 4 {
                    f.push(("item_price".into(), FeatureValue::F64(i as f64 * 0.5)));
                }
                f
            })
            .collect(),
        ..ScoreRequest::default()
    }
}

/// The device flags to test: emulated always, the real GPUs where there are some.
fn devices() -> Vec<(&'static str, &'static str)> {
    let mut d = vec![("emulated:1", "emulated:0")];
    match rankd_engine::gpu::probe() {
        Ok(_) => d.push(("cuda:0", "cuda:0")),
        Err(why) => eprintln!("real GPU runs skipped: no GPU here: {why}"),
    }
    d
}

#[test]
fn gpu_daemon_scores_like_the_cpu_daemon() {
    let root = tempfile::tempdir().unwrap();
    deploy(root.path(), 1);
    let cpu = start_daemon(root.path(), None, &["--device", "cpu"]);
    let mut c = Connection::connect(cpu.addr).unwrap();
    let reqs: Vec<ScoreRequest> = [1, 7, 200, 1000]
        .iter()
        .enumerate()
        .map(|(v, &n)| request(n, v as i64))
        .collect();
    let want: Vec<Vec<f32>> = reqs.iter().map(|r| c.score(r).unwrap().scores).collect();
    assert_eq!(
        metric(
            cpu.admin,
            "rankd_model_backend{model=\"feed\",version=\"1\",backend=\"cpu\"}"
        ),
        Some(1.0)
    );
    for (flag, backend) in devices() {
        let gpu = start_daemon(root.path(), None, &["--device", flag]);
        let mut g = Connection::connect(gpu.addr).unwrap();
        for (r, w) in reqs.iter().zip(&want) {
            let got = g.score(r).unwrap().scores;
            assert_eq!(got.len(), w.len());
            for (i, (a, b)) in got.iter().zip(w).enumerate() {
                assert!((a - b).abs() <= 1e-4, "{flag} item {i}: {a} vs cpu {b}");
            }
        }
        let doc = common::get(gpu.admin, "/models");
        assert!(doc.contains(&format!("\"backend\":\"{backend}\"")), "{doc}");
        let label =
            format!("rankd_model_backend{{model=\"feed\",version=\"1\",backend=\"{backend}\"}}");
        assert_eq!(metric(gpu.admin, &label), Some(1.0));
        let batches = metric(gpu.admin, "rankd_gpu_batches_total").unwrap();
        assert!(
            batches >= reqs.len() as f64,
            "{flag}: {batches} GPU batches"
        );
        assert_eq!(metric(gpu.admin, "rankd_gpu_errors_total"), Some(0.0));
    }
}

#[test]
fn reload_on_gpus_fails_no_request_and_frees_the_old_version() {
    for (flag, _) in devices() {
        let root = tempfile::tempdir().unwrap();
        let config = root.path().join(".rankd.toml");
        std::fs::write(&config, "rescan_interval_ms = 60000\n").unwrap();
        deploy(root.path(), 1);
        let d = start_daemon(root.path(), Some(&config), &["--device", flag]);
        let stop = Arc::new(AtomicBool::new(false));
        let load: Vec<_> = (0..3)
            .map(|t| {
                let (stop, addr) = (stop.clone(), d.addr);
                std::thread::spawn(move || {
                    let mut c = Connection::connect(addr).unwrap();
                    let mut versions = std::collections::BTreeSet::new();
                    while !stop.load(Ordering::Relaxed) {
                        let r = c
                            .score(&request(50, t))
                            .expect("no request may fail during a reload");
                        assert_eq!(r.scores.len(), 50);
                        versions.insert(r.version);
                    }
                    versions
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        deploy(root.path(), 2);
        let start = Instant::now();
        let mut c = Connection::connect(d.addr).unwrap();
        while c.score(&request(3, 0)).unwrap().version != 2 {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{flag}: version 2 never served"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        stop.store(true, Ordering::Relaxed);
        let mut seen = std::collections::BTreeSet::new();
        for t in load {
            seen.extend(t.join().unwrap());
        }
        assert!(
            seen.contains(&2),
            "{flag}: the load never saw version 2: {seen:?}"
        );
        // Version 1 leaves the device once its last request is done.
        let start = Instant::now();
        while metric(d.admin, "rankd_gpu_unloads_total") != Some(1.0) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{flag}: version 1 was never freed: rankd_gpu_unloads_total {:?}",
                metric(d.admin, "rankd_gpu_unloads_total")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(metric(d.admin, "rankd_gpu_errors_total"), Some(0.0));
    }
}
