//! Training speed on GPUs against the CPU trainer on every core of the same machine, in the same
//! run (a bench binary, not a test). The network: an embedding-heavy feed model, eight hashed
//! id slots of 100,000 rows embedded in 16 dimensions (the deep input, 128 wide), two of them
//! also wide, deep layers 128-256-128-1, batch 4,096, Adam for the dense layers and sparse
//! Adagrad for the rows, synchronous; random ids with a skew like a feed's.
//!
//! `cargo run --release -p rankd-benches --bin gpu_train_bench [-- SECONDS] [--emulated]`
//!
//! Rows: the CPU trainer with one worker thread per core; one GPU; every GPU (when there are
//! two or more: its rate per GPU and its scaling over one). Without a GPU the GPU rows say why;
//! `--emulated` adds one emulated device (the host executor: slow, it checks the bench's path).

use std::sync::atomic::AtomicUsize;
use std::time::Instant;

use rankd_feature_ops::{CompiledSpec, FeatureType, RawFeature, SlotSpec, Transform, Value};
use rankd_formats::config::{DeepConfig, EmbeddingConfig, ModelConfig, WideConfig};
use rankd_formats::synth::Rng;
use rankd_formats::Pooling;
use rankd_trainer::config::TrainSettings;
use rankd_trainer::data::Dataset;
use rankd_trainer::gpu::replica::Pushed;
use rankd_trainer::model::{CpuCompute, Grads, Layout, Optimizer, Params};

const SLOTS: usize = 8;
const BUCKETS: u32 = 100_000;
const BATCH: usize = 4096;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let secs: f64 = args.iter().find_map(|a| a.parse().ok()).unwrap_or(5.0);
    let emulated = args.iter().any(|a| a == "--emulated");
    let config = ModelConfig {
        features: (0..SLOTS)
            .map(|i| RawFeature {
                name: format!("f{i}"),
                ty: FeatureType::Int,
            })
            .collect(),
        slots: (0..SLOTS)
            .map(|i| SlotSpec {
                name: format!("s{i}"),
                transform: Transform::Hash {
                    input: format!("f{i}"),
                    buckets: BUCKETS,
                },
            })
            .collect(),
        embeddings: (0..SLOTS)
            .map(|i| EmbeddingConfig {
                slot: format!("s{i}"),
                dim: 16,
                pooling: Pooling::Sum,
                weight_type: Default::default(),
            })
            .collect(),
        wide: Some(WideConfig {
            slots: vec!["s0".into(), "s1".into()],
        }),
        deep: Some(DeepConfig {
            dense: vec![],
            layers: vec![256, 128, 1],
        }),
        ..ModelConfig::default()
    };
    let spec = CompiledSpec::compile(&config.feature_spec()).unwrap();
    let layout = Layout::new(&config, &spec).unwrap();
    let rows = 16 * BATCH;
    let mut rng = Rng::new(1);
    let mut data = Dataset {
        rows: Vec::new(),
        labels: Vec::with_capacity(rows),
        slots: rankd_feature_ops::SlotBatch::new(),
    };
    for _ in 0..rows {
        // A skew: small ids (popular items) far more often than large ones.
        let row: Vec<Value<'_>> = (0..SLOTS)
            .map(|_| {
                let r = rng.next_u64();
                Value::Int(((r % 1_000_003) * ((r >> 32) % 1_000) / 1_000) as i64)
            })
            .collect();
        spec.transform_row(&row, &mut data.slots).unwrap();
        data.labels
            .push(f32::from(u8::from(rng.next_u64().is_multiple_of(4))));
    }
    let order: Vec<usize> = (0..rows).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "network: {SLOTS} tables of {BUCKETS} x 16 (deep input {}), wide on 2 slots, layers {:?}, batch {BATCH}, {rows} random rows; {secs} s per row",
        layout.deep_in,
        layout.layers.iter().map(|l| l.1).collect::<Vec<_>>()
    );

    // The CPU trainer, one synchronous worker thread per core.
    let mut params = Params::init(&layout, 1, 0.25);
    let mut opt = Optimizer::new(&params, 1e-3, 0.05, 0.0);
    let mut workers: Vec<(CpuCompute, Grads)> = (0..cores)
        .map(|w| (CpuCompute::with_seed(w as u64), Grads::new(&layout)))
        .collect();
    let done = AtomicUsize::new(0);
    let cpu = rate(secs, || {
        rankd_trainer::parallel::sync_epoch(
            &layout,
            &mut params,
            &mut opt,
            &data,
            &order,
            BATCH,
            &mut workers,
            cores,
            &done,
        );
        rows
    });
    println!("cpu, {cores} worker threads: {cpu:.0} samples/s");

    host_side(&layout, &data, &order, secs);

    let mut devices: Vec<String> = Vec::new();
    match rankd_engine::gpu::probe() {
        Ok(found) if !found.is_empty() => {
            devices.push("cuda:0".into());
            if found.len() > 1 {
                let all: Vec<String> = found.iter().map(|d| d.ordinal.to_string()).collect();
                devices.push(format!("cuda:{}", all.join(",")));
            }
        }
        Ok(_) => println!("gpu: skipped: the CUDA driver sees no GPU"),
        Err(why) => println!("gpu: skipped: no GPU: {why}"),
    }
    if emulated {
        devices.push("emulated:1".into());
    }
    let mut one_gpu = None;
    for device in devices {
        let mut params = Params::init(&layout, 1, 0.25);
        let mut opt = Optimizer::new(&params, 1e-3, 0.05, 0.0);
        let mut s = TrainSettings::defaults();
        s.device = device.clone();
        let mut log = Vec::new();
        let mut gpus = match rankd_trainer::gpu::start(&s, &layout, &params, &mut opt, &mut log) {
            Ok(Some(g)) => g,
            Ok(None) => {
                println!(
                    "{device}: not started: {}",
                    String::from_utf8_lossy(&log).trim()
                );
                continue;
            }
            Err(e) => {
                println!("{device}: not started: {e}");
                continue;
            }
        };
        let n = gpus.names().len();
        let done = AtomicUsize::new(0);
        // Emulated: one short pass is enough to check the path.
        let (order, secs) = if device.starts_with("emulated") {
            (&order[..2 * BATCH], 0.0)
        } else {
            (&order[..], secs)
        };
        let r = rate(secs, || {
            gpus.epoch(&layout, &mut params, &mut opt, &data, order, BATCH, &done)
                .unwrap();
            order.len()
        });
        let names = gpus.names().join(", ");
        let vs = format!("{:.2}x the CPU", r / cpu);
        match (n, one_gpu) {
            (1, _) => {
                if device.starts_with("cuda") {
                    one_gpu = Some(r);
                }
                println!("{names}: {r:.0} samples/s ({vs})");
            }
            (_, Some(one)) => println!(
                "{names}: {r:.0} samples/s, {:.0} per GPU ({vs}; {:.2}x one GPU on {n} GPUs)",
                r / n as f64,
                r / one
            ),
            _ => println!("{names}: {r:.0} samples/s ({vs})"),
        }
    }
}

/// The host's part of a GPU step, without a device: an input thread preparing shares, and the
/// step thread's pull of the touched rows and sparse update (Adagrad) of as many rows. A GPU run
/// cannot go faster than the slower of the two (per input thread, for the shares).
fn host_side(layout: &Layout, data: &Dataset, order: &[usize], secs: f64) {
    use rankd_trainer::gpu::prep::Share;
    let build = |b: &[usize]| Share::build(layout, &data.slots, &data.labels, b);
    let prep = rate(secs, || {
        for b in order.chunks(BATCH) {
            std::hint::black_box(build(b));
        }
        order.len()
    });
    let mut shares: Vec<Share> = order.chunks(BATCH).map(build).collect();
    let mut params = Params::init(layout, 1, 0.25);
    let mut opt = Optimizer::new(&params, 1e-3, 0.05, 0.0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    // What a device pushes: a gradient per touched row.
    let pushed: Vec<Pushed> = shares
        .iter()
        .map(|s| Pushed {
            emb: s
                .emb
                .iter()
                .zip(&layout.emb)
                .map(|(t, e)| vec![1e-3; t.rows.len() * e.dim])
                .collect(),
            wide: s.wide.iter().map(|t| vec![1e-3; t.rows.len()]).collect(),
            ..Pushed::default()
        })
        .collect();
    let step = rate(secs, || {
        for (s, p) in shares.iter_mut().zip(&pushed) {
            rankd_trainer::gpu::prep::pull(std::slice::from_mut(s), layout, &params, threads);
            let h = opt.begin_step();
            let (s, p) = (std::slice::from_ref(&*s), std::slice::from_ref(p));
            rankd_trainer::gpu::apply_pushed(layout, &mut params, &mut opt, &h, s, p, threads);
        }
        order.len()
    });
    let touched: usize = shares
        .iter()
        .map(|s| s.emb.iter().map(|t| t.rows.len()).sum::<usize>())
        .sum::<usize>()
        / shares.len();
    println!(
        "host side of a GPU step, no device: shares {prep:.0} samples/s per input thread; pull and sparse update ({threads} threads) {step:.0} samples/s ({touched} embedding rows touched per batch)"
    );
}

/// Samples per second of `pass` (which returns the samples it trained) over at least `secs`
/// seconds after one warm-up pass (and at least one timed pass).
fn rate(secs: f64, mut pass: impl FnMut() -> usize) -> f64 {
    pass();
    let start = Instant::now();
    let mut n = 0;
    loop {
        n += pass();
        if start.elapsed().as_secs_f64() >= secs {
            break;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}
