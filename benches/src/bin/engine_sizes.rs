//! The CPU engine at every batch size and on every instruction set this CPU runs (issue #18):
//! the whole engine from raw features (split on and off) and the deep layers alone on a ready
//! input, feed model, one thread, items/s as the median of rounds (with the range).
//!
//! `cargo run --release -p rankd-benches --bin engine_sizes [-- ROUNDS SECONDS_PER_ROUND [--json]
//! [--isa avx2]]`: a Markdown table, or with `--json` one JSON object per cell.
//!
//! `engine_sizes --export DIR`: writes what the peers of `benches/engine_peers.py` need, as
//! `.npy` files: the feed model's tensors, and per request size the precomputed ids and dense
//! inputs of every item (what rankd computes from the raw features) with rankd's scores.
//!
//! `--cross LAYERS:RANK:STRUCTURE` (e.g. `3:0:parallel`, `3:64:stacked`): the feed model with
//! DCN-v2 cross layers (#21); the export then holds their tensors and `cross.json`.
//!
//! `--mmoe EXPERTS:HEADS:TOWER` (e.g. `1:3:64`, a shared bottom; `4:3:64`, MMoE): the feed model
//! as a multi-task model (#21): no wide part, `EXPERTS` bottoms of the feed model's hidden layers
//! (256, 128), `HEADS` heads with towers `[TOWER, 1]` (`[1]` for 0). Items/s count items, each
//! scored by every head.

use std::time::{Duration, Instant};

use rankd_benches::feed;
use rankd_engine::cpu::{CpuEngine, Split};
use rankd_engine::kernel::Isa;
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model, ModelOptions};
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

/// Writes `data` as a NumPy `.npy` file of `dtype` (`<f4` or `<i8`) and `shape`.
fn npy(path: &std::path::Path, dtype: &str, shape: &[usize], data: &[u8]) {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}");
    // Magic (6) + version (2) + length (2) + header, padded with spaces to 64 bytes, ending in \n.
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

fn f32s(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The feed model with DCN-v2 cross layers over its deep input (drawn as `feed::tensors` draws
/// them).
fn write_cross(path: &std::path::Path, layers: u32, rank: u32, structure: &str) {
    let mut config = feed::config();
    config.cross = Some(rankd_formats::config::CrossConfig {
        layers,
        rank,
        structure: if structure == "parallel" {
            rankd_formats::CrossStructure::Parallel
        } else {
            rankd_formats::CrossStructure::Stacked
        },
    });
    feed::write_config(path, &config, 1, 17).unwrap();
}

/// `--export DIR`: the feed model's tensors, and per size the items' ids, dense inputs and
/// rankd's scores.
fn export(dir: &std::path::Path, path: &std::path::Path, model: &Model, sizes: &[usize]) {
    std::fs::create_dir_all(dir).unwrap();
    let file = rankd_formats::ModelFile::open(path).unwrap();
    let a = &file.spec().architecture;
    for (i, e) in a.embeddings.iter().enumerate() {
        let w = file.weights(e.weights);
        npy(
            &dir.join(format!("emb_{i}.npy")),
            "<f4",
            &[e.rows as usize, e.dim as usize],
            &f32s(w),
        );
    }
    let wide = a.wide.as_ref().expect("the feed model has a wide part");
    for (i, s) in wide.slots.iter().enumerate() {
        let w = file.weights(s.weights);
        npy(
            &dir.join(format!("wide_{i}.npy")),
            "<f4",
            &[w.len()],
            &f32s(w),
        );
    }
    npy(&dir.join("wide_bias.npy"), "<f4", &[1], &f32s(&[wide.bias]));
    if let Some(c) = &a.cross {
        let d = a.deep_input_dim() as usize;
        for (l, x) in c.layers.iter().enumerate() {
            let r = x.rank as usize;
            let put = |name: String, shape: &[usize], b: rankd_formats::BlobRef| {
                npy(&dir.join(name), "<f4", shape, &f32s(file.weights(b)));
            };
            if let Some(w) = x.weight {
                put(format!("cross_{l}_w.npy"), &[d, d], w);
            }
            if let (Some(u), Some(v)) = (x.u, x.v) {
                put(format!("cross_{l}_u.npy"), &[d, r], u);
                put(format!("cross_{l}_v.npy"), &[d, r], v);
            }
            put(format!("cross_{l}_b.npy"), &[d], x.bias);
        }
        if let Some(o) = c.output {
            npy(
                &dir.join("cross_out.npy"),
                "<f4",
                &[d, 1],
                &f32s(file.weights(o)),
            );
        }
        std::fs::write(
            dir.join("cross.json"),
            format!(
                "{{\"layers\": {}, \"rank\": {}, \"parallel\": {}}}",
                c.layers.len(),
                c.layers[0].rank,
                c.output.is_some()
            ),
        )
        .unwrap();
    }
    for (l, d) in a.deep.iter().enumerate() {
        let (o, i) = (d.out_dim as usize, d.in_dim as usize);
        npy(
            &dir.join(format!("w{l}.npy")),
            "<f4",
            &[o, i],
            &f32s(file.weights(d.weight)),
        );
        npy(
            &dir.join(format!("b{l}.npy")),
            "<f4",
            &[o],
            &f32s(file.weights(d.bias)),
        );
    }
    let spec = file.compiled();
    for &n in sizes {
        let v = feed::request(n, n as u64);
        let mut slots = rankd_feature_ops::SlotBatch::new();
        for item in &v.items {
            let row: Vec<Value<'_>> = item
                .iter()
                .zip(&v.user)
                .map(|(i, u)| match i {
                    feed::Cell::Missing => u.value(),
                    c => c.value(),
                })
                .collect();
            spec.transform_row(&row, &mut slots).unwrap();
        }
        let mut ids = Vec::with_capacity(n * feed::CATEGORICAL * 8);
        let mut dense = Vec::with_capacity(n * feed::NUMERIC);
        for r in 0..n {
            for c in 0..feed::CATEGORICAL {
                ids.extend_from_slice(&i64::from(slots.ids(feed::NUMERIC + c, r)[0]).to_le_bytes());
            }
            for d in 0..feed::NUMERIC {
                dense.push(slots.dense(d, r));
            }
        }
        npy(
            &dir.join(format!("ids_{n}.npy")),
            "<i8",
            &[n, feed::CATEGORICAL],
            &ids,
        );
        npy(
            &dir.join(format!("dense_{n}.npy")),
            "<f4",
            &[n, feed::NUMERIC],
            &f32s(&dense),
        );
        let request = DenseRequest::from(&v);
        let mut out = BatchOutput::default();
        CpuEngine::new().score(model, &[&request], &mut out);
        npy(
            &dir.join(format!("scores_{n}.npy")),
            "<f4",
            &[n],
            &f32s(&out.scores),
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("feed.rkm");
    // `--f16` / `--int8`: the tables stored so (the same draws rounded); the scores' largest
    // difference from the f32 model is printed.
    let weight_type = if args.iter().any(|a| a == "--f16") {
        rankd_formats::WeightType::F16
    } else if args.iter().any(|a| a == "--int8") {
        rankd_formats::WeightType::I8
    } else {
        rankd_formats::WeightType::F32
    };

    let cross = args
        .iter()
        .position(|a| a == "--cross")
        .and_then(|i| args.get(i + 1))
        .map(|c| {
            let parts: Vec<&str> = c.split(':').collect();
            (
                parts[0]
                    .parse::<u32>()
                    .expect("--cross LAYERS:RANK:STRUCTURE"),
                parts[1]
                    .parse::<u32>()
                    .expect("--cross LAYERS:RANK:STRUCTURE"),
                parts.get(2).copied().unwrap_or("stacked").to_owned(),
            )
        });
    let mmoe = args
        .iter()
        .position(|a| a == "--mmoe")
        .and_then(|i| args.get(i + 1))
        .map(|c| {
            let p: Vec<u32> = c
                .split(':')
                .map(|x| x.parse().expect("--mmoe EXPERTS:HEADS:TOWER"))
                .collect();
            (p[0], p[1] as usize, p[2])
        });
    match (&cross, mmoe) {
        (Some((layers, rank, structure)), _) => write_cross(&path, *layers, *rank, structure),
        (None, Some((experts, heads, tower))) => {
            let tower = if tower == 0 { vec![1] } else { vec![tower, 1] };
            let config = feed::multitask_config(experts, &[256, 128], &tower, heads);
            feed::write_config(&path, &config, 1, 17).unwrap();
        }
        (None, None) => feed::write_typed(&path, 1, 17, weight_type).unwrap(),
    }
    let model = Model::open(&path).unwrap();
    // The same model with no table folded into the first layer (the engine before folding).
    let unfolded = Model::with_options(
        rankd_formats::ModelFile::open(&path).unwrap(),
        ModelOptions { fold_bytes: 0 },
    );
    let sizes = [20usize, 200, 1000, 10_000];
    if weight_type != rankd_formats::WeightType::F32 {
        let p32 = dir.path().join("feed32.rkm");
        feed::write(&p32).unwrap();
        let m32 = Model::open(&p32).unwrap();
        let mut worst = 0f32;
        for &n in &sizes {
            let v = feed::request(n, n as u64);
            let req = DenseRequest::from(&v);
            let (mut a, mut b) = (BatchOutput::default(), BatchOutput::default());
            CpuEngine::new().score(&model, &[&req], &mut a);
            CpuEngine::new().score(&m32, &[&req], &mut b);
            for (x, y) in a.scores.iter().zip(&b.scores) {
                worst = worst.max((x - y).abs());
            }
        }
        println!(
            "{weight_type:?} tables: {} bytes vs {} bytes for f32; scores differ from the f32 model's by at most {worst:.2e}",
            std::fs::metadata(&path).unwrap().len(),
            std::fs::metadata(&p32).unwrap().len()
        );
    }
    if let Some(i) = args.iter().position(|a| a == "--export") {
        let out = std::path::PathBuf::from(args.get(i + 1).expect("--export DIR"));
        export(&out, &path, &model, &sizes);
        return;
    }
    let json = args.iter().any(|a| a == "--json");
    let only_isa = args
        .iter()
        .position(|a| a == "--isa")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.to_ascii_lowercase());
    let only_items: Option<usize> = args
        .iter()
        .position(|a| a == "--items")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--items N"));
    let numbers: Vec<&String> = args[1..]
        .iter()
        .take_while(|a| !a.starts_with("--"))
        .collect();
    let json = json || args.iter().any(|a| a == "--json");
    let rounds: usize = numbers.first().and_then(|s| s.parse().ok()).unwrap_or(5);
    let secs: f64 = numbers.get(1).and_then(|s| s.parse().ok()).unwrap_or(0.5);
    if !json {
        println!(
            "feed model: deep input {}, {} deep MACs per item, {:.1} MiB of folded tables; CPU ISAs: {:?}",
            model.deep_input_dim(),
            model.deep_macs_per_item(),
            model.folded_bytes() as f64 / f64::from(1 << 20),
            Isa::available()
        );
        println!("| isa | mode | 20 items | 200 items | 1,000 items | 10,000 items |");
        println!("| --- | --- | ---: | ---: | ---: | ---: |");
    }
    let values: Vec<feed::Values> = sizes.iter().map(|&n| feed::request(n, n as u64)).collect();
    let requests: Vec<DenseRequest<'_>> = values.iter().map(DenseRequest::from).collect();
    for isa in Isa::available() {
        if only_isa
            .as_ref()
            .is_some_and(|o| *o != format!("{isa:?}").to_ascii_lowercase())
        {
            continue;
        }
        for (mode, split) in [
            ("whole, split", Some(Split::RequestLevel)),
            ("whole, split, unfolded", Some(Split::RequestLevel)),
            ("whole, no split", Some(Split::Off)),
            ("deep layers only", None),
        ] {
            let model = if mode.ends_with("unfolded") {
                &unfolded
            } else {
                &model
            };
            // A cross model has no split (nor folded tables), and its deep layers alone are not
            // the model (nor a multi-task model's).
            if (cross.is_some() && mode != "whole, split")
                || (mmoe.is_some() && mode == "deep layers only")
            {
                continue;
            }
            // `--mode split|no-split|deep`: one mode only (for profiling).
            if let Some(only) = args
                .iter()
                .position(|a| a == "--mode")
                .and_then(|i| args.get(i + 1))
            {
                let want = match only.as_str() {
                    "split" => "whole, split",
                    "unfolded" => "whole, split, unfolded",
                    "no-split" => "whole, no split",
                    _ => "deep layers only",
                };
                if mode != want {
                    continue;
                }
            }
            let mut cells = Vec::new();
            for (si, &n) in sizes.iter().enumerate() {
                // `--items N`: that request size only (for profiling).
                if only_items.is_some_and(|m| m != n) {
                    continue;
                }
                let mut r = Vec::new();
                for _ in 0..rounds {
                    let x = match split {
                        Some(split) => {
                            let mut e = CpuEngine::with_split(split).with_isa(isa);
                            let mut out = BatchOutput::default();
                            rate(secs, n, || {
                                out.clear();
                                e.score(model, &[&requests[si]], &mut out);
                            })
                        }
                        None => {
                            let mut e = CpuEngine::new().with_isa(isa);
                            let x: Vec<f32> = (0..n * model.deep_input_dim())
                                .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
                                .collect();
                            let mut logits = Vec::new();
                            rate(secs, n, || e.forward_dense(model, &x, n, &mut logits))
                        }
                    };
                    r.push(x);
                }
                let (m, lo, hi) = median(r);
                if json {
                    println!(
                        "{{\"isa\": \"{isa:?}\", \"mode\": \"{mode}\", \"items\": {n}, \"items_per_s\": {m:.1}, \"min\": {lo:.1}, \"max\": {hi:.1}}}"
                    );
                }
                cells.push(format!("{:.0}K ({:.0}-{:.0})", m / 1e3, lo / 1e3, hi / 1e3));
            }
            if !json {
                println!("| {isa:?} | {mode} | {} |", cells.join(" | "));
            }
        }
    }
}
