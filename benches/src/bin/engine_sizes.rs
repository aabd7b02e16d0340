//! The CPU engine at every batch size and on every instruction set this CPU runs (issue #18):
//! the whole engine from raw features (split on and off) and the deep layers alone on a ready
//! input, feed model, one thread, items/s as the median of rounds (with the range).
//!
//! `cargo run --release -p rankd-benches --bin engine_sizes [-- ROUNDS SECONDS_PER_ROUND]`

use std::time::{Duration, Instant};

use rankd_benches::feed;
use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::kernel::Isa;
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model};
use rankd_feature_ops::Value;

fn rate(secs: f64, items: usize, mut f: impl FnMut()) -> f64 {
    f();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs_f64(secs) {
        f();
        n += 1;
    }
    n as f64 * items as f64 / start.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let secs: f64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(0.5);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.rkm");
    feed::write(&path).unwrap();
    let model = Model::open(&path).unwrap();
    println!(
        "feed model: deep input {}, {} deep MACs per item; CPU ISAs: {:?}",
        model.deep_input_dim(),
        model.deep_macs_per_item(),
        Isa::available()
    );
    println!("| isa | mode | 20 items | 200 items | 1,000 items | 10,000 items |");
    println!("| --- | --- | ---: | ---: | ---: | ---: |");
    let sizes = [20usize, 200, 1000, 10_000];
    let values: Vec<feed::Values> = sizes.iter().map(|&n| feed::request(n, n as u64)).collect();
    let requests: Vec<DenseRequest<'_>> = values
        .iter()
        .map(|v| DenseRequest {
            user: v.user.iter().map(feed::Cell::value).collect(),
            items: v
                .items
                .iter()
                .map(|i| i.iter().map(feed::Cell::value).collect::<Vec<Value<'_>>>())
                .collect(),
        })
        .collect();
    for isa in Isa::available() {
        for (mode, split) in [
            ("whole, split", Some(Split::RequestLevel)),
            ("whole, no split", Some(Split::Off)),
            ("deep layers only", None),
        ] {
            let mut cells = Vec::new();
            for (si, &n) in sizes.iter().enumerate() {
                let mut r = Vec::new();
                for _ in 0..rounds {
                    let x = match split {
                        Some(split) => {
                            let mut e = CpuEngine::with_split(split).with_isa(isa);
                            let mut out = BatchOutput::default();
                            rate(secs, n, || {
                                out.clear();
                                e.score(&model, &[&requests[si]], &mut out);
                            })
                        }
                        None => {
                            let mut e = CpuEngine::new().with_isa(isa);
                            let x: Vec<f32> = (0..n * model.deep_input_dim())
                                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                                .collect();
                            let mut logits = Vec::new();
                            rate(secs, n, || e.forward_dense(&model, &x, n, &mut logits))
                        }
                    };
                    r.push(x);
                }
                let (m, lo, hi) = median(r);
                cells.push(format!("{:.0}K ({:.0}-{:.0})", m / 1e3, lo / 1e3, hi / 1e3));
            }
            println!("| {isa:?} | {mode} | {} |", cells.join(" | "));
        }
    }
}
