//! Online learning, measured on the feed model with a real Kafka broker and the real `rankd`
//! and `rankd-load` release binaries (`cargo build --release` first):
//!
//! - `online_bench freshness RATE SECONDS [PUBLISH_MS]`: samples produced at RATE per second for
//!   SECONDS; the online trainer (in this process) trains on them and publishes a delta every
//!   PUBLISH_MS (default 1000); the daemon applies them. For every sample: the time from its
//!   arrival in the samples topic to the moment the daemon applied the first delta reflecting
//!   it (the daemon's `/models` reports each delta's newest sample and when it was applied).
//!   Prints p50, p99 and max.
//! - `online_bench cost ROWS_PER_SEC SECONDS RATE ROUNDS`: the daemon serves `rankd-load` at RATE
//!   requests/s of 200 items while a producer publishes deltas of ROWS_PER_SEC changed
//!   embedding and wide rows per second (one delta a second), alternating with rounds
//!   without updates; prints p50/p99 and achieved rate of each, medians over ROUNDS.
//! - `online_bench memory ROWS`: overlay bytes per changed row after applying ROWS changed
//!   rows to the feed model's tables, and the process's RSS growth.
//! - `online_bench refold ROUNDS`: how long applying a delta takes when it replaces the first
//!   layer (every folded table projected again) or changes 1,000 rows of each vocabulary table
//!   (those tables projected again), with the default fold budget and with none, medians.
//!
//! The broker is `RANKD_KAFKA_URL`'s, else one started by `scripts/kafka.sh`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankd_formats::delta::{self, Delta, RowUpdate, TableKind};
use rankd_formats::synth::{feed, Rng, Zipf};
use rankd_storage::kafka::{testing, Topic};

fn bin(name: &str) -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../target/release")
        .join(name);
    assert!(
        here.exists(),
        "{} is missing: cargo build --release -p rankd-serving -p rankd-loadtest",
        here.display()
    );
    here
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Daemon {
    child: Child,
    addr: String,
    admin: String,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The release daemon over `root` with `[model.feed] updates = URL`, one serving core.
fn daemon(root: &Path, updates: &str) -> Daemon {
    daemon_with(root, updates, &[])
}

fn daemon_with(root: &Path, updates: &str, extra: &[&str]) -> Daemon {
    use std::io::BufRead;
    let config = root.join(".rankd.toml");
    std::fs::write(&config, format!("[model.feed]\nupdates = \"{updates}\"\n")).unwrap();
    let mut child = Command::new(bin("rankd"))
        .args([
            "--threads",
            "1",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args(extra)
        .arg("--models")
        .arg(root)
        .arg("--config")
        .arg(&config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rankd exited before serving");
        };
        if let Some(rest) = line.strip_prefix("rankd: serving on ") {
            let addr = rest.split_whitespace().next().unwrap().to_owned();
            let admin = line.rsplit("http://").next().unwrap().to_owned();
            std::thread::spawn(move || {
                for l in lines.map_while(Result::ok) {
                    if !l.contains("opened") {
                        eprintln!("  {l}");
                    }
                }
            });
            return Daemon { child, addr, admin };
        }
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
}

/// (last sequence, newest sample ms, applied ms) of version 1 of `feed`.
fn applied(admin: &str) -> Option<(u64, u64, u64)> {
    let v: serde_json::Value = serde_json::from_str(&http_get(admin, "/models")).ok()?;
    let u = &v["models"]["feed"]["versions"][0]["updates"];
    Some((
        u["last_sequence"].as_u64()?,
        u["newest_sample_unix_ms"].as_u64()?,
        u["last_applied_unix_ms"].as_u64()?,
    ))
}

fn feed_root() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let v = dir.path().join("feed/1");
    std::fs::create_dir_all(&v).unwrap();
    feed::write(&v.join("model.rkm")).unwrap();
    (dir, v.join("model.rkm"))
}

/// A labeled feed sample as JSON (Zipf-distributed categories, a label from a hidden rule).
fn sample(rng: &mut Rng, zipf: &mut Zipf) -> Vec<u8> {
    let mut fields = Vec::new();
    for i in 0..feed::NUMERIC {
        let name = if i < feed::USER_NUMERIC {
            format!("u_num{i}")
        } else {
            format!("i_num{i}")
        };
        fields.push(format!("\"{name}\": {:.3}", 5.0 + rng.uniform(5.0)));
    }
    let mut clicky = false;
    for i in 0..feed::CATEGORICAL {
        let name = if i < feed::USER_CATEGORICAL {
            format!("u_cat{i}")
        } else {
            format!("i_cat{i}")
        };
        let v = zipf.next_rank();
        // The hidden rule: one item category clicks far more often than the rest.
        if i == 10 {
            clicky = v.is_multiple_of(3);
        }
        if i % 2 == 1 {
            fields.push(format!("\"{name}\": \"c{i}_{}\"", v % feed::VOCAB));
        } else {
            fields.push(format!("\"{name}\": {v}"));
        }
    }
    let p = if clicky { 0.8 } else { 0.2 };
    let draw = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let label = u8::from(draw < p);
    format!("{{{}, \"label\": {label}}}", fields.join(", ")).into_bytes()
}

fn pct(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn freshness(rate: f64, secs: f64, publish_ms: u64) {
    let broker = testing::broker().expect("a Kafka broker");
    let (_dir, base) = feed_root();
    let samples_url = broker.url(&testing::Broker::unique_topic("bench-samples"));
    let updates_url = broker.url(&testing::Broker::unique_topic("bench-updates"));
    let d = daemon(
        base.parent().unwrap().parent().unwrap().parent().unwrap(),
        &updates_url,
    );
    let cfg = rankd_trainer::online::OnlineConfig::from_toml(&format!(
        "[train]\ntrain_files = []\nbatch_size = 256\nlr_dense = 0.001\nlr_sparse = 0.05\n\n[online]\nsamples = \"{samples_url}\"\nupdates = \"{updates_url}\"\nbase = \"{}\"\npublish_interval_ms = {publish_ms}\nmax_batch_wait_ms = 20\nholdout = 0.02\nstart = \"latest\"\n",
        base.display()
    ))
    .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let trainer = {
        let (cfg, stop) = (cfg.clone(), stop.clone());
        std::thread::spawn(move || {
            rankd_trainer::online::run(
                &cfg,
                &stop,
                rankd_trainer::online::Limits::default(),
                &mut std::io::sink(),
            )
            .unwrap()
        })
    };
    // Let the trainer open the topics (it starts at the latest offset).
    std::thread::sleep(Duration::from_secs(3));
    let topic =
        Topic::connect(&samples_url.parse().unwrap(), true, Duration::from_secs(20)).unwrap();
    let mut rng = Rng::new(7);
    let mut zipf = Zipf::new(100_000, 1.05, 3);
    let batch = (rate / 100.0).ceil() as usize; // every 10 ms
    let total = (rate * secs) as usize;
    let mut stamps: Vec<u64> = Vec::with_capacity(total);
    let mut observed: Vec<(u64, u64, u64)> = Vec::new();
    let start = Instant::now();
    let mut sent = 0;
    let poll = {
        let admin = d.admin.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        let h = std::thread::spawn(move || {
            let mut seen: Vec<(u64, u64, u64)> = Vec::new();
            while !s2.load(Ordering::Relaxed) {
                if let Some(a) = applied(&admin) {
                    if seen.last().is_none_or(|l| l.0 != a.0) && a.0 > 0 {
                        seen.push(a);
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            seen
        });
        (stop, h)
    };
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * rate) as usize).min(total);
        if due > sent {
            let n = (due - sent).min(batch * 4);
            let values: Vec<Vec<u8>> = (0..n).map(|_| sample(&mut rng, &mut zipf)).collect();
            let t = unix_ms();
            let offsets = topic.produce(None, values).unwrap();
            // The broker's timestamp is the produce call's create time (this host's clock).
            stamps.extend(std::iter::repeat_n(t, offsets.len()));
            sent += n;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Let the trainer take in what was sent; stopping it publishes a last delta, which the
    // daemon then applies.
    std::thread::sleep(Duration::from_millis(publish_ms.max(500)));
    stop.store(true, Ordering::Relaxed);
    let report = trainer.join().unwrap();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if applied(&d.admin).is_some_and(|a| a.0 >= report.sequence) {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(50));
    poll.0.store(true, Ordering::Relaxed);
    observed.extend(poll.1.join().unwrap());
    let mut fresh: Vec<u64> = Vec::with_capacity(stamps.len());
    let mut missing = 0;
    for &s in &stamps {
        match observed.iter().find(|o| o.1 >= s) {
            Some(o) => fresh.push(o.2.saturating_sub(s)),
            None => missing += 1,
        }
    }
    fresh.sort_unstable();
    println!(
        "freshness at {rate:.0} samples/s for {secs:.0} s, publish every {publish_ms} ms: {} samples, {} deltas applied, trained {} (rolling auc {:.4}); sample arrival -> applied delta: p50 {} ms, p99 {} ms, max {} ms; {missing} samples never reflected",
        stamps.len(),
        observed.len(),
        report.trained,
        report.holdout_auc,
        pct(&fresh, 0.5),
        pct(&fresh, 0.99),
        fresh.last().unwrap(),
    );
}

/// Publishes a delta of `rows` changed rows (Zipf ids over every table) every second until
/// `stop`, continuing the sequence from `seq`.
fn delta_producer(url: String, rows: usize, stop: Arc<AtomicBool>, mut seq: u64) -> u64 {
    let topic = Topic::connect(&url.parse().unwrap(), true, Duration::from_secs(20)).unwrap();
    let config = feed::config();
    let mut rng = Rng::new(11);
    let mut zipf = Zipf::new(feed::BUCKETS as usize, 1.05, 5);
    let tables = config.embeddings.len() * 2;
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        seq += 1;
        let mut d = Delta {
            model: "feed".into(),
            base_version: 1,
            sequence: seq,
            created_ms: unix_ms(),
            newest_sample_ms: unix_ms(),
            ..Delta::default()
        };
        for (i, e) in config.embeddings.iter().enumerate() {
            let limit = if i % 2 == 1 {
                feed::VOCAB + 100
            } else {
                feed::BUCKETS as usize
            };
            let mut ids: Vec<u32> = (0..rows / tables)
                .map(|_| (zipf.next_rank() % limit) as u32)
                .collect();
            ids.sort_unstable();
            ids.dedup();
            let wide_ids = ids.clone();
            d.tables.push(emb_rows(i, e.dim, ids, &mut rng));
            d.tables.push(RowUpdate {
                kind: TableKind::Wide,
                index: i as u32,
                dim: 1,
                values: rng.vec(wide_ids.len(), 0.05),
                rows: wide_ids,
            });
        }
        let bytes = d.encode();
        let parts = delta::split(&bytes, 1, seq, 256 << 10);
        for group in parts.chunks(3) {
            topic.produce(Some(b"feed"), group.to_vec()).unwrap();
        }
        if let Some(left) = Duration::from_secs(1).checked_sub(t.elapsed()) {
            std::thread::sleep(left);
        }
    }
    seq
}

fn load(d: &Daemon, model_file: &Path, rate: f64, secs: f64) -> serde_json::Value {
    let out = Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin("rankd-load"))
        .args([
            "--addr", &d.addr, "--model", "feed", "--items", "200", "--json",
        ])
        .arg("--model-file")
        .arg(model_file)
        .args(["--rate", &rate.to_string(), "--duration", &secs.to_string()])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().unwrap()).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn cost(rows: usize, secs: f64, rate: f64, rounds: usize) {
    let broker = testing::broker().expect("a Kafka broker");
    let (dir, base) = feed_root();
    let updates_url = broker.url(&testing::Broker::unique_topic("bench-cost"));
    // The daemon's one serving core pinned to CPU 0 (`--pin-cores`); its other threads (the
    // update consumer among them), this process (the delta producer), the load generator and
    // the broker (`RANKD_KAFKA_DIR/pid`, when given) on CPU 1.
    let me = std::process::id().to_string();
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "1", &me])
        .output();
    if let Ok(dir) = std::env::var("RANKD_KAFKA_DIR") {
        if let Ok(pid) = std::fs::read_to_string(Path::new(&dir).join("pid")) {
            let _ = Command::new("taskset")
                .args(["-a", "-p", "-c", "1", pid.trim()])
                .output();
        }
    }
    let d = daemon_with(dir.path(), &updates_url, &["--pin-cores"]);
    let mut seq = 0;
    let mut quiet = (Vec::new(), Vec::new(), Vec::new());
    let mut busy = (Vec::new(), Vec::new(), Vec::new());
    let _ = load(&d, &base, rate, 2.0); // warm-up
    for round in 0..rounds {
        let r = load(&d, &base, rate, secs);
        println!(
            "round {round} no updates: rate {:.0}/s p50 {} us p99 {} us",
            r["rate"], r["p50_us"], r["p99_us"]
        );
        quiet.0.push(r["rate"].as_f64().unwrap());
        quiet.1.push(r["p50_us"].as_f64().unwrap());
        quiet.2.push(r["p99_us"].as_f64().unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (url, stop) = (updates_url.clone(), stop.clone());
            std::thread::spawn(move || delta_producer(url, rows, stop, seq))
        };
        std::thread::sleep(Duration::from_millis(1500));
        let r = load(&d, &base, rate, secs);
        stop.store(true, Ordering::Relaxed);
        seq = producer.join().unwrap();
        let a = applied(&d.admin);
        println!(
            "round {round} {rows} rows/s: rate {:.0}/s p50 {} us p99 {} us (applied up to {:?} of {seq})",
            r["rate"], r["p50_us"], r["p99_us"], a.map(|a| a.0)
        );
        busy.0.push(r["rate"].as_f64().unwrap());
        busy.1.push(r["p50_us"].as_f64().unwrap());
        busy.2.push(r["p99_us"].as_f64().unwrap());
        std::thread::sleep(Duration::from_secs(2));
    }
    let models: serde_json::Value = serde_json::from_str(&http_get(&d.admin, "/models")).unwrap();
    let u = &models["models"]["feed"]["versions"][0]["updates"];
    println!(
        "medians of {rounds} rounds at {rate:.0} requests/s of 200 items: no updates: {:.0}/s p50 {:.0} us p99 {:.0} us; {rows} changed rows/s: {:.0}/s p50 {:.0} us p99 {:.0} us; overlay at the end: {} rows, {} bytes",
        median(quiet.0),
        median(quiet.1),
        median(quiet.2),
        median(busy.0),
        median(busy.1),
        median(busy.2),
        u["overlay_rows"],
        u["overlay_bytes"],
    );
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn memory(rows: usize) {
    let (_dir, base) = feed_root();
    let model = rankd_engine::Model::open(&base).unwrap();
    let config = feed::config();
    let mut rng = Rng::new(3);
    let mut d = Delta {
        model: "feed".into(),
        base_version: 1,
        sequence: 1,
        ..Delta::default()
    };
    // The 13 hashed tables (100,000 rows each) take the rows.
    let hashed = config.embeddings.len().div_ceil(2);
    let per = rows.div_ceil(hashed);
    for (i, e) in config.embeddings.iter().enumerate() {
        if i % 2 == 1 {
            continue;
        }
        let ids: Vec<u32> = (0..per.min(feed::BUCKETS as usize) as u32).collect();
        d.tables.push(emb_rows(i, e.dim, ids, &mut rng));
    }
    let changed = d.changed_rows();
    let before = rss_bytes();
    let t = Instant::now();
    let updated = model.apply(&d).unwrap();
    let took = t.elapsed();
    drop(d);
    let after = rss_bytes();
    let s = updated.update_stats();
    println!(
        "{changed} changed rows of 16 floats in overlays: {} bytes held ({:.1} bytes a row, {:.1} MB per million rows; the values alone are 64 bytes a row); RSS grew {:.1} MB; applying took {:.1} ms",
        s.overlay_bytes,
        s.overlay_bytes as f64 / changed as f64,
        s.overlay_bytes as f64 / changed as f64,
        after.saturating_sub(before) as f64 / 1e6,
        took.as_secs_f64() * 1e3
    );
}

/// Embedding table `i`'s rows `ids` (`dim` wide) set to random values.
fn emb_rows(i: usize, dim: u32, ids: Vec<u32>, rng: &mut Rng) -> RowUpdate {
    RowUpdate {
        kind: TableKind::Embedding,
        index: i as u32,
        dim,
        values: rng.vec(ids.len() * dim as usize, 0.05),
        rows: ids,
    }
}

fn refold(rounds: usize) {
    let (_dir, base) = feed_root();
    let open = |fold_bytes| {
        rankd_engine::Model::with_options(
            rankd_formats::ModelFile::open(&base).unwrap(),
            rankd_engine::ModelOptions { fold_bytes },
        )
    };
    let folded = open(rankd_engine::ModelOptions::default().fold_bytes);
    let plain = open(0);
    let config = feed::config();
    let mut rng = Rng::new(5);
    let delta = || Delta {
        model: "feed".into(),
        base_version: 1,
        sequence: 1,
        ..Delta::default()
    };
    let mut layer = delta();
    layer.layers.push(rankd_formats::delta::LayerUpdate {
        index: 0,
        out_dim: 256,
        in_dim: 429,
        weight: rng.vec(256 * 429, 0.05),
        bias: rng.vec(256, 0.05),
    });
    let mut rows = delta();
    for (i, e) in config
        .embeddings
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 2 == 1)
    {
        let ids: Vec<u32> = (0..1000).collect();
        rows.tables.push(emb_rows(i, e.dim, ids, &mut rng));
    }
    println!(
        "folded tables: {:.1} MiB",
        folded.folded_bytes() as f64 / f64::from(1 << 20)
    );
    for (what, d) in [("first layer", &layer), ("13,000 vocabulary rows", &rows)] {
        for (name, m) in [("folded", &folded), ("unfolded", &plain)] {
            let mut ms: Vec<f64> = (0..rounds.max(1))
                .map(|_| {
                    let t = Instant::now();
                    let updated = m.apply(d).unwrap();
                    let took = t.elapsed().as_secs_f64() * 1e3;
                    drop(updated);
                    took
                })
                .collect();
            ms.sort_by(f64::total_cmp);
            println!(
                "{what}, {name}: applying took {:.2} ms (median of {}; {:.2}-{:.2})",
                ms[ms.len() / 2],
                ms.len(),
                ms[0],
                ms[ms.len() - 1]
            );
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: f64| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    match args.get(1).map(String::as_str) {
        Some("freshness") => freshness(arg(2, 1000.0), arg(3, 20.0), arg(4, 1000.0) as u64),
        Some("cost") => cost(
            arg(2, 100_000.0) as usize,
            arg(3, 10.0),
            arg(4, 500.0),
            arg(5, 3.0) as usize,
        ),
        Some("memory") => memory(arg(2, 1_000_000.0) as usize),
        Some("refold") => refold(arg(2, 9.0) as usize),
        _ => eprintln!("usage: online_bench freshness RATE SECONDS [PUBLISH_MS] | cost ROWS_PER_SEC SECONDS RATE ROUNDS | memory ROWS | refold ROUNDS"),
    }
}
