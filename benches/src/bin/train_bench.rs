//! Training speed of one worker (a bench binary, not a test): a deep model 128 -> 256 -> 128 -> 1
//! (128 dense inputs), batch 512, Adam, on random data; samples per second of forward, backward
//! and update. `benches/torch_train.py` measures PyTorch on the same network in the same run.
//!
//! `cargo run --release -p rankd-benches --bin train_bench [-- SECONDS]`

use std::time::Instant;

use rankd_feature_ops::{
    CompiledSpec, FeatureType, RawFeature, SlotBatch, SlotSpec, Transform, Value,
};
use rankd_formats::config::{DeepConfig, ModelConfig};
use rankd_formats::synth::Rng;
use rankd_trainer::model::{Compute, CpuCompute, Grads, Layout, Optimizer, Params};

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let inputs = 128;
    let config = ModelConfig {
        features: (0..inputs)
            .map(|i| RawFeature {
                name: format!("x{i}"),
                ty: FeatureType::Float,
            })
            .collect(),
        slots: (0..inputs)
            .map(|i| SlotSpec {
                name: format!("n{i}"),
                transform: Transform::Normalize {
                    input: format!("x{i}"),
                    mean: 0.0,
                    std: 1.0,
                    clip: None,
                    log1p: false,
                },
            })
            .collect(),
        deep: Some(DeepConfig {
            dense: (0..inputs).map(|i| format!("n{i}")).collect(),
            layers: vec![256, 128, 1],
        }),
        ..ModelConfig::default()
    };
    let spec = CompiledSpec::compile(&config.feature_spec()).unwrap();
    let layout = Layout::new(&config, &spec).unwrap();
    let rows = 16_384;
    let mut rng = Rng::new(1);
    let mut slots = SlotBatch::new();
    let mut labels = Vec::with_capacity(rows);
    for _ in 0..rows {
        let row: Vec<Value<'_>> = (0..inputs)
            .map(|_| Value::F64(f64::from(rng.uniform(2.0))))
            .collect();
        spec.transform_row(&row, &mut slots).unwrap();
        labels.push(if rng.next_u64().is_multiple_of(4) {
            1.0
        } else {
            0.0
        });
    }
    let mut params = Params::init(&layout, 1, 0.25);
    let mut opt = Optimizer::new(&params, 1e-3, 0.05, 0.0);
    let mut compute = CpuCompute::default();
    let mut grads = Grads::new(&layout);
    let order: Vec<usize> = (0..rows).collect();
    let batch = 512;
    // Warm-up.
    for b in order.chunks(batch).take(8) {
        compute.step(&layout, &params, &slots, &labels, b, &mut grads);
        opt.apply(&mut params, &grads);
    }
    let start = Instant::now();
    let mut samples = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        for b in order.chunks(batch) {
            compute.step(&layout, &params, &slots, &labels, b, &mut grads);
            opt.apply(&mut params, &grads);
            samples += b.len();
        }
    }
    let rate = samples as f64 / start.elapsed().as_secs_f64();
    println!("rankd_train_samples_per_s {rate:.0} (deep 128-256-128-1, batch 512, Adam, 1 worker)");

    // Two synchronous workers (threads) on the same batches.
    let data = rankd_trainer::data::Dataset {
        rows: Vec::new(),
        labels,
        slots,
    };
    let done = std::sync::atomic::AtomicUsize::new(0);
    let mut workers: Vec<(CpuCompute, Grads)> = (0..2)
        .map(|_| (CpuCompute::default(), Grads::new(&layout)))
        .collect();
    rankd_trainer::parallel::sync_epoch(
        &layout,
        &mut params,
        &mut opt,
        &data,
        &order[..4096],
        batch,
        &mut workers,
        2,
        &done,
    );
    let start = Instant::now();
    let mut samples2 = 0usize;
    while start.elapsed().as_secs_f64() < secs {
        rankd_trainer::parallel::sync_epoch(
            &layout,
            &mut params,
            &mut opt,
            &data,
            &order,
            batch,
            &mut workers,
            2,
            &done,
        );
        samples2 += order.len();
    }
    let rate2 = samples2 as f64 / start.elapsed().as_secs_f64();
    println!(
        "rankd_train_2_workers_samples_per_s {rate2:.0} speedup {:.2}x",
        rate2 / rate
    );
}
