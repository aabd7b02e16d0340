//! Multi-process training throughput (a bench binary, not a test): one synthetic, embedding-heavy
//! feed data set trained by `rankd-train --processes W --ps-shards K` for K = 1, 2 and 4 at a
//! fixed W, several rounds each, in one run. Prints samples per second (median and range), bytes
//! between the chief and the shards per sample, and the shards' share of the job's CPU time,
//! next to the in-process trainer on the same data (one worker thread).
//!
//! `cargo build --release -p rankd-trainer && cargo run --release -p rankd-benches --bin ps_bench
//! [-- ROUNDS [ROWS [WORKERS]]]`

use std::io::Write;
use std::path::Path;
use std::process::Command;

use rankd_formats::synth::Rng;

const CONFIG: &str = r#"hash_seed = 0
[[feature]]
name = "user"
type = "string"
[[feature]]
name = "item"
type = "string"
[[feature]]
name = "category"
type = "string"
[[feature]]
name = "tags"
type = "string_list"
[[feature]]
name = "price"
type = "float"
[[slot]]
name = "user"
transform = "hash"
input = "user"
buckets = 1048576
[[slot]]
name = "item"
transform = "hash"
input = "item"
buckets = 1048576
[[slot]]
name = "category"
transform = "hash"
input = "category"
buckets = 4096
[[slot]]
name = "tags"
transform = "hash"
input = "tags"
buckets = 65536
[[slot]]
name = "price_n"
transform = "normalize"
input = "price"
mean = 0.0
std = 1.0
[[embedding]]
slot = "user"
dim = 16
[[embedding]]
slot = "item"
dim = 16
[[embedding]]
slot = "category"
dim = 8
[[embedding]]
slot = "tags"
dim = 8
pooling = "mean"
[wide]
slots = ["item", "category"]
[deep]
dense = ["price_n"]
layers = [128, 64, 1]
[train]
train_files = ["train.csv"]
valid_files = ["valid.csv"]
epochs = 1
batch_size = 1024
shuffle_buffer = 50000
checkpoint_every = 0
"#;

fn write_data(path: &Path, rows: usize, seed: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    writeln!(f, "user,item,category,tags,price,label").unwrap();
    let mut rng = Rng::new(seed);
    for _ in 0..rows {
        // Skewed ids: a few popular users and items, a long tail.
        let u = rng.next_u64() % (1 + rng.next_u64() % 200_000);
        let i = rng.next_u64() % (1 + rng.next_u64() % 100_000);
        let c = i % 300;
        let t: Vec<String> = (0..1 + rng.next_u64() % 4)
            .map(|_| format!("t{}", rng.next_u64() % 2000))
            .collect();
        let price = rng.uniform(2.0);
        let label = u8::from((u + i).is_multiple_of(5) || (c.is_multiple_of(7) && price > 0.0));
        writeln!(f, "u{u},i{i},c{c},{},{price:.3},{label}", t.join("|")).unwrap();
    }
}

/// The number after `key` in the last line holding it.
fn after(log: &str, key: &str, before: bool) -> Option<f64> {
    let line = log.lines().rev().find(|l| l.contains(key))?;
    if before {
        // "... 12345 samples/s": the word before the key.
        let at = line.find(key)?;
        line[..at].split_whitespace().last()?.parse().ok()
    } else {
        let at = line.find(key)? + key.len();
        line[at..]
            .split(|c: char| c.is_whitespace() || c == ';')
            .find(|w| !w.is_empty())?
            .parse()
            .ok()
    }
}

/// The summed `cpu X s` of the lines of `log` that `pick` selects.
fn cpu(log: &str, pick: impl Fn(&str) -> bool) -> f64 {
    log.lines()
        .filter(|l| pick(l))
        .filter_map(|l| {
            let at = l.find("; cpu ")? + 6;
            l[at..].split_whitespace().next()?.parse::<f64>().ok()
        })
        .sum()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let rounds: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(3);
    let rows: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let workers: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(2);
    let exe = std::env::current_exe()
        .unwrap()
        .with_file_name("rankd-train");
    assert!(
        exe.exists(),
        "build rankd-train first: cargo build --release -p rankd-trainer"
    );
    let dir = tempfile::tempdir().unwrap();
    write_data(&dir.path().join("train.csv"), rows, 1);
    write_data(&dir.path().join("valid.csv"), rows / 20, 2);
    let cfg = dir.path().join("train.toml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let run = |extra: &[&str]| -> String {
        let out = Command::new(&exe)
            .args(["--config", cfg.to_str().unwrap()])
            .args(["--output", dir.path().join("m.rkm").to_str().unwrap()])
            .args(extra)
            .output()
            .unwrap();
        let log = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{log}");
        log
    };
    println!(
        "ps_bench: {rows} rows, {workers} workers, batch 1024, embeddings 16/16/8/8 over 2^20/2^20/4096/65536 buckets, MLP 128-64-1; {} cores; {rounds} rounds",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let mut base: Vec<f64> = (0..rounds)
        .map(|_| after(&run(&[]), "samples/s", true).unwrap())
        .collect();
    let base = median(&mut base);
    println!("| setup | samples/s (median, range) | vs one process | bytes/sample (chief) | shards' CPU share | peak RSS per shard |");
    println!("|---|---|---|---|---|---|");
    println!("| one process, one worker thread | {base:.0} | 1.00x | - | - | - |");
    let w = workers.to_string();
    for k in [1usize, 2, 4] {
        let ks = k.to_string();
        let mut rates = Vec::new();
        let mut bytes = 0.0;
        let mut share = Vec::new();
        let mut rss = String::new();
        for _ in 0..rounds {
            let log = run(&["--processes", &w, "--ps-shards", &ks]);
            rates.push(after(&log, "samples/s", true).unwrap());
            bytes = after(&log, "bytes/sample", true).unwrap();
            let ps = cpu(&log, |l| l.contains(": ps "));
            let all = cpu(&log, |_| true);
            share.push(ps / all.max(1e-9));
            rss = log
                .lines()
                .filter(|l| l.contains(": ps "))
                .filter_map(|l| l.split("peak rss ").nth(1))
                .collect::<Vec<_>>()
                .join(", ");
        }
        let (lo, hi) = (
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
        );
        let m = median(&mut rates);
        println!(
            "| {workers} workers x {k} shard{} | {m:.0} ({lo:.0}-{hi:.0}) | {:.2}x | {bytes:.0} | {:.0}% | {rss} |",
            if k > 1 { "s" } else { "" },
            m / base,
            100.0 * median(&mut share)
        );
    }
}
