//! The GPU benchmark of issue #14 (a bench binary, not a test), all in one run so that ratios
//! compare like with like:
//!
//! 1. cuBLAS `sgemm` on 8192³ (the same-run FP32 limit) and the feed model's dense layers at
//!    4,096 and 65,536 rows, as a share of it.
//! 2. The whole engine, feed model, items/s: GPUs (every visible one, requests from one thread
//!    per core) against the CPU engine on every core, at 200, 4,096 and 65,536 items per request.
//! 3. The same at 4,096 items for the feed model with DCN-v2 cross layers (full rank, parallel;
//!    rank 64, stacked) and as a multi-task model (MMoE, 4 experts, 3 heads with [64, 1] towers).
//!
//! Without a GPU it says why and exits 0. `--write-feed DIR` writes the feed model as
//! `DIR/feed/1/model.rkm` (for the daemon part of `scripts/gpu-check.sh`).
//!
//! `cargo run --release -p rankd-benches --bin gpu_bench [-- SECONDS]`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankd_benches::feed;
use rankd_engine::cpu::CpuEngine;
use rankd_engine::gpu::{self, BatchSettings, Gpus};
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model};

fn owned_request(items: usize, seed: u64) -> feed::Values {
    feed::request(items, seed)
}

/// Items/s of `threads` threads each scoring `items`-item requests for `secs`.
fn items_per_sec(
    threads: usize,
    items: usize,
    secs: f64,
    score: impl Fn(usize) -> Box<dyn FnMut(&DenseRequest<'_>, &mut BatchOutput) + Send> + Sync,
) -> f64 {
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (done, stop, score) = (&done, &stop, &score);
            s.spawn(move || {
                let values = owned_request(items, 7 + t as u64);
                let req = DenseRequest::from(&values);
                let mut f = score(t);
                let mut out = BatchOutput::default();
                f(&req, &mut out); // warm-up (plans, uploads)
                while !stop.load(Ordering::Relaxed) {
                    out.clear();
                    f(&req, &mut out);
                    assert!(out.get(0).is_ok(), "scoring failed: {:?}", out.results[0]);
                    done.fetch_add(items as u64, Ordering::Relaxed);
                }
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs * 0.2));
        let (start, before) = (Instant::now(), done.load(Ordering::Relaxed));
        std::thread::sleep(Duration::from_secs_f64(secs));
        let n = done.load(Ordering::Relaxed) - before;
        let rate = n as f64 / start.elapsed().as_secs_f64();
        stop.store(true, Ordering::Relaxed);
        rate
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--write-feed") {
        let dir = std::path::Path::new(&args[i + 1]).join("feed/1");
        std::fs::create_dir_all(&dir).unwrap();
        feed::write(&dir.join("model.rkm")).unwrap();
        return;
    }
    let secs: f64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let devs = match gpu::probe() {
        Ok(d) => d,
        Err(why) => {
            println!("gpu_bench: skipped: no GPU here: {why}");
            return;
        }
    };
    for d in &devs {
        println!(
            "GPU {}: {} ({} GiB)",
            d.ordinal,
            d.name,
            d.total_bytes >> 30
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.rkm");
    feed::write(&path).unwrap();
    let model = Arc::new(Model::open(&path).unwrap());
    let layers = model.layer_dims();
    println!("feed model: layers {layers:?}");

    // 1. sgemm limit and the dense layers.
    let mut chains = vec![vec![(8192, 8192, 8192)]];
    for rows in [4096, 65_536] {
        chains.push(layers.iter().map(|&(i, o)| (o, rows, i)).collect());
    }
    let g = gpu::cuda::sgemm_gflops(devs[0].ordinal, &chains, 20).expect("sgemm runs");
    println!("cuBLAS sgemm 8192^3: {:.0} GFLOP/s (the limit)", g[0]);
    for (rows, rate) in [4096, 65_536].iter().zip(&g[1..]) {
        println!(
            "dense layers at {rows} rows: {rate:.0} GFLOP/s = {:.0}% of the limit",
            100.0 * rate / g[0]
        );
    }

    // 2. Whole engine.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ordinals: Vec<usize> = devs.iter().map(|d| d.ordinal).collect();
    let gpus = Gpus::start(&ordinals, BatchSettings::default()).expect("the GPUs start");
    gpus.load(&model).expect("the feed model fits");
    println!(
        "engine, feed model, {cores} cores, {} GPUs:",
        ordinals.len()
    );
    // Items/s of the GPUs and of the CPU engine on every core, scoring `model`.
    let both = |model: &Arc<Model>, items: usize| {
        let cpu = items_per_sec(cores, items, secs, |_| {
            let (m, mut e) = (model.clone(), CpuEngine::new());
            Box::new(move |r, out| e.score(&m, &[r], out))
        });
        let gpu = items_per_sec(cores, items, secs, |_| {
            let (m, mut core) = (model.clone(), gpus.core());
            Box::new(move |r, out| core.score_blocking(&m, &[r], out))
        });
        (gpu, cpu)
    };
    for items in [200, 4096, 65_536] {
        let (gpu, cpu) = both(&model, items);
        println!(
            "  {items:>6} items/request: GPU {:>12.0} items/s, CPU ({cores} cores) {:>12.0} items/s, GPU/CPU {:.2}x",
            gpu,
            cpu,
            gpu / cpu
        );
    }
    // 3. The new model kinds (#21).
    let kinds: [(&str, rankd_formats::config::ModelConfig); 3] = [
        ("DCN-v2 3 full-rank layers, parallel", {
            let mut c = feed::config();
            c.cross = Some(rankd_formats::config::CrossConfig {
                layers: 3,
                rank: 0,
                structure: rankd_formats::CrossStructure::Parallel,
            });
            c
        }),
        ("DCN-v2 3 rank-64 layers, stacked", {
            let mut c = feed::config();
            c.cross = Some(rankd_formats::config::CrossConfig {
                layers: 3,
                rank: 64,
                structure: rankd_formats::CrossStructure::Stacked,
            });
            c
        }),
        (
            "MMoE 4 experts x 3 heads",
            feed::multitask_config(4, &[256, 128], &[64, 1], 3),
        ),
    ];
    for (name, config) in kinds {
        let path = dir.path().join("kind.rkm");
        feed::write_config(&path, &config, 1, 17).unwrap();
        let model = Arc::new(Model::open(&path).unwrap());
        gpus.load(&model).expect("the model fits");
        let items = 4096;
        let (gpu, cpu) = both(&model, items);
        println!(
            "  {name}, {items} items/request: GPU {gpu:>12.0} items/s, CPU ({cores} cores) {cpu:>12.0} items/s, GPU/CPU {:.2}x",
            gpu / cpu
        );
    }
    let m = gpus.metrics();
    println!(
        "GPU batches {}, jobs {}, items {}, errors {}",
        m.batches.load(Ordering::Relaxed),
        m.jobs.load(Ordering::Relaxed),
        m.items.load(Ordering::Relaxed),
        m.errors.load(Ordering::Relaxed)
    );
}
