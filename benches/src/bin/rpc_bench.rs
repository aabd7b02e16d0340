//! Daemon benchmarks of the daemon issue (a bench binary, not a test): the server pinned to
//! CPU 0, the load on CPU 1, all in one run so the ratios compare like with like.
//!
//! 1. The engine alone on one core: 200-item feed requests, items/s.
//! 2. The daemon on one core, closed loop with pipelining: items/s, as a ratio of (1).
//! 3. Open-loop latency (p50/p99 from the intended send time) at 50% and 80% of (2).
//! 4. One-item requests on a tiny model: requests/s of the daemon as a ratio of a bare monoio
//!    echo server with the same framing.
//!
//! `cargo run --release -p rankd-benches --bin rpc_bench [-- SECONDS]`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rankd_benches::feed;
use rankd_engine::cpu::CpuEngine;
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model};
use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_serving::client::{FeatureValue, ScoreRequest};
use rankd_serving::config::ServerConfig;
use rankd_serving::protocol::{write_frame, FrameHeader, MessageType, HEADER_LEN};
use rankd_serving::registry::Registry;
use rankd_serving::server::Server;

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t with one bit set, read by sched_setaffinity.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn to_client(values: &feed::Values, names: &[String]) -> ScoreRequest {
    let conv = |c: &feed::Cell| match c {
        feed::Cell::Missing => None,
        feed::Cell::Num(v) => Some(FeatureValue::F64(*v)),
        feed::Cell::Int(v) => Some(FeatureValue::I64(*v)),
        feed::Cell::Str(s) => Some(FeatureValue::Str(s.clone())),
    };
    ScoreRequest {
        model: "feed".into(),
        routing_key: "u".into(),
        user: values
            .user
            .iter()
            .zip(names)
            .filter_map(|(c, n)| conv(c).map(|v| (n.clone(), v)))
            .collect(),
        items: values
            .items
            .iter()
            .map(|item| {
                item.iter()
                    .zip(names)
                    .filter_map(|(c, n)| conv(c).map(|v| (n.clone(), v)))
                    .collect()
            })
            .collect(),
        ..ScoreRequest::default()
    }
}

/// Reads one frame; returns its request id and type.
fn read_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<(u64, u8)> {
    let mut h = [0u8; HEADER_LEN];
    s.read_exact(&mut h)?;
    let header = FrameHeader::decode(&h, u32::MAX).map_err(std::io::Error::other)?;
    buf.resize(header.body_len as usize, 0);
    s.read_exact(buf)?;
    Ok((header.request_id, header.msg_type))
}

/// Closed loop: `window` requests in flight on each of `conns` connections for `secs`.
/// Returns completed requests per second.
fn closed_loop(addr: SocketAddr, body: &[u8], conns: usize, window: usize, secs: f64) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let body = Arc::new(body.to_vec());
    let threads: Vec<_> = (0..conns)
        .map(|_| {
            let (stop, done, body) = (stop.clone(), done.clone(), body.clone());
            std::thread::spawn(move || {
                pin(1);
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                let mut frame = Vec::new();
                let mut id = 0u64;
                for _ in 0..window {
                    id += 1;
                    frame.clear();
                    write_frame(&mut frame, MessageType::ScoreRequest, id, &body);
                    s.write_all(&frame).unwrap();
                }
                let mut buf = Vec::new();
                let mut inflight = window;
                while inflight > 0 {
                    let (_, t) = read_frame(&mut s, &mut buf).unwrap();
                    assert_ne!(t, MessageType::Error as u8, "the server answered an error");
                    done.fetch_add(1, Ordering::Relaxed);
                    inflight -= 1;
                    if !stop.load(Ordering::Relaxed) {
                        id += 1;
                        frame.clear();
                        write_frame(&mut frame, MessageType::ScoreRequest, id, &body);
                        s.write_all(&frame).unwrap();
                        inflight += 1;
                    }
                }
            })
        })
        .collect();
    // Warm up, then measure.
    std::thread::sleep(Duration::from_millis(300));
    let start_count = done.load(Ordering::Relaxed);
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let n = done.load(Ordering::Relaxed) - start_count;
    let elapsed = start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    n as f64 / elapsed
}

/// Open loop at `rate` requests/s on one connection for `secs`: latency from the intended send
/// time (no coordinated omission).
fn open_loop(addr: SocketAddr, body: &[u8], rate: f64, secs: f64) -> Histogram<u64> {
    let total = (rate * secs) as u64;
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let mut r = s.try_clone().unwrap();
    let intended: Arc<Vec<AtomicU64>> = Arc::new((0..=total).map(|_| AtomicU64::new(0)).collect());
    let base = Instant::now() + Duration::from_millis(50);
    let reader = {
        let intended = intended.clone();
        std::thread::spawn(move || {
            pin(1);
            let mut h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
            let mut buf = Vec::new();
            for _ in 0..total {
                let (id, t) = read_frame(&mut r, &mut buf).unwrap();
                assert_ne!(t, MessageType::Error as u8);
                let now = base.elapsed().as_nanos() as u64;
                let sent = intended[id as usize].load(Ordering::Relaxed);
                h.record(((now.saturating_sub(sent)) / 1000).max(1))
                    .unwrap();
            }
            h
        })
    };
    pin(1);
    let mut frame = Vec::new();
    for k in 1..=total {
        let at = Duration::from_secs_f64((k - 1) as f64 / rate);
        // Sleep most of the gap (the reader shares this CPU), spin the last stretch.
        let now = base.elapsed();
        if at > now + Duration::from_micros(150) {
            std::thread::sleep(at - now - Duration::from_micros(120));
        }
        while base.elapsed() < at {
            std::hint::spin_loop();
        }
        intended[k as usize].store(at.as_nanos() as u64, Ordering::Relaxed);
        frame.clear();
        write_frame(&mut frame, MessageType::ScoreRequest, k, body);
        s.write_all(&frame).unwrap();
    }
    reader.join().unwrap()
}

/// A bare monoio server with rankd's framing: answers every frame with a fixed body.
fn echo_server(reply_len: usize) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        pin(0);
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
            let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            tx.send(l.local_addr().unwrap()).unwrap();
            loop {
                let (mut c, _) = l.accept().await.unwrap();
                let _ = c.set_nodelay(true);
                monoio::spawn(async move {
                    let reply_body = vec![7u8; reply_len];
                    let mut inbuf = Vec::new();
                    let mut chunk = Vec::with_capacity(64 << 10);
                    loop {
                        chunk.clear();
                        let (res, c2) = c.read(chunk).await;
                        chunk = c2;
                        let Ok(n) = res else { return };
                        if n == 0 {
                            return;
                        }
                        inbuf.extend_from_slice(&chunk[..n]);
                        let mut out = Vec::new();
                        let mut start = 0;
                        while inbuf.len() - start >= HEADER_LEN {
                            let hb: &[u8; HEADER_LEN] =
                                inbuf[start..start + HEADER_LEN].try_into().unwrap();
                            let h = FrameHeader::decode(hb, u32::MAX).unwrap();
                            let total = HEADER_LEN + h.body_len as usize;
                            if inbuf.len() - start < total {
                                break;
                            }
                            write_frame(
                                &mut out,
                                MessageType::ScoreResponse,
                                h.request_id,
                                &reply_body,
                            );
                            start += total;
                        }
                        inbuf.drain(..start);
                        if !out.is_empty() {
                            let (res, _) = c.write_all(out).await;
                            if res.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
    });
    rx.recv().unwrap()
}

fn start_daemon(root: &std::path::Path) -> Server {
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 1,
        pin_cores: true,
        models: root.to_path_buf(),
        ..ServerConfig::default()
    };
    let (registry, problems) = Registry::load(&config, None, &mut Default::default(), None, None);
    assert!(problems.is_empty(), "{problems:?}");
    Server::start(config, registry, None).unwrap()
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5.0);
    let dir = tempfile::tempdir().unwrap();
    let feed_dir = dir.path().join("feed/1");
    std::fs::create_dir_all(&feed_dir).unwrap();
    feed::write(&feed_dir.join("model.rkm")).unwrap();
    let tiny_dir = dir.path().join("tiny/1");
    std::fs::create_dir_all(&tiny_dir).unwrap();
    write_synthetic(
        &tiny_dir.join("model.rkm"),
        &SynthOptions {
            name: "tiny".into(),
            kind: ModelKind::Wide,
            ..SynthOptions::default()
        },
    )
    .unwrap();

    let names: Vec<String> = feed::config()
        .features
        .iter()
        .map(|f| f.name.clone())
        .collect();
    let values = feed::request(200, 7);

    // 1. The engine alone, pinned to CPU 0.
    let engine_items = std::thread::spawn({
        let path = feed_dir.join("model.rkm");
        move || {
            pin(0);
            let model = Model::open(&path).unwrap();
            let values = feed::request(200, 7);
            let req = DenseRequest::from(&values);
            let mut engine = CpuEngine::new();
            let mut out = BatchOutput::default();
            for _ in 0..200 {
                out.clear();
                engine.score(&model, &[&req], &mut out);
            }
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed().as_secs_f64() < secs {
                out.clear();
                engine.score(&model, &[&req], &mut out);
                n += 200;
            }
            n as f64 / start.elapsed().as_secs_f64()
        }
    })
    .join()
    .unwrap();
    println!("engine_only_items_per_s {engine_items:.0}");

    // 2. The daemon, closed loop.
    let server = start_daemon(dir.path());
    let addr = server.addr;
    let body = to_client(&values, &names).encode().unwrap();
    let rps = closed_loop(addr, &body, 1, 4, secs);
    let daemon_items = rps * 200.0;
    println!(
        "daemon_items_per_s {daemon_items:.0} ratio_to_engine {:.3}",
        daemon_items / engine_items
    );

    // 3. Open-loop latency at 50% and 80% of the maximum rate.
    for frac in [0.5, 0.8] {
        let rate = rps * frac;
        let h = open_loop(addr, &body, rate, secs);
        println!(
            "open_loop_{:.0}pct rate {rate:.0} req/s p50_us {} p90_us {} p99_us {} p999_us {} max_us {}",
            frac * 100.0,
            h.value_at_quantile(0.5),
            h.value_at_quantile(0.9),
            h.value_at_quantile(0.99),
            h.value_at_quantile(0.999),
            h.max()
        );
    }

    // 4. One-item requests on a tiny model vs a bare echo server with the same framing.
    let tiny = ScoreRequest {
        model: "tiny".into(),
        user: vec![("user_age".into(), FeatureValue::F64(30.0))],
        items: vec![vec![("item_id".into(), FeatureValue::I64(5))]],
        ..ScoreRequest::default()
    };
    let tiny_body = tiny.encode().unwrap();
    let tiny_rps = closed_loop(addr, &tiny_body, 1, 16, secs);
    server.shutdown();
    // The reply of the echo server is as long as rankd's one-score response.
    let echo = echo_server(56);
    let echo_rps = closed_loop(echo, &tiny_body, 1, 16, secs);
    println!(
        "one_item_rps {tiny_rps:.0} echo_rps {echo_rps:.0} ratio_to_echo {:.3}",
        tiny_rps / echo_rps
    );
}
