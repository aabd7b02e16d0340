//! The Rust client's side of the client benchmark (`clients/java/bench.sh`): WINDOW requests in
//! flight over CONNECTIONS pipelined tokio connections for SECONDS, the same Adult requests of 40
//! rows as the Java side; prints `rust requests_per_s R p50_us A p99_us B`.
//!
//! `client_bench ADDR SECONDS WINDOW CONNECTIONS`

use std::sync::Arc;
use std::time::{Duration, Instant};

use rankd_client::{AsyncConnection, FeatureValue, ScoreRequest};

fn adult_requests(count: usize, rows: usize) -> Vec<ScoreRequest> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/data/adult/test.csv"
    );
    let text = std::fs::read_to_string(path).expect("../shared/data/adult/test.csv");
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows_all: Vec<Vec<&str>> = lines
        .take(count * rows)
        .map(|l| l.split(',').collect())
        .collect();
    rows_all
        .chunks(rows)
        .map(|chunk| ScoreRequest {
            model: "adult".into(),
            items: chunk
                .iter()
                .map(|row| {
                    header
                        .iter()
                        .zip(row)
                        .filter(|(h, _)| **h != "label")
                        .map(|(h, c)| {
                            let v = match c.parse::<f64>() {
                                Ok(x) => FeatureValue::F64(x),
                                Err(_) => FeatureValue::Str((*c).to_owned()),
                            };
                            ((*h).to_owned(), v)
                        })
                        .collect()
                })
                .collect(),
            ..ScoreRequest::default()
        })
        .collect()
}

async fn run(
    conns: &[Arc<AsyncConnection>],
    reqs: &Arc<Vec<ScoreRequest>>,
    window: usize,
    secs: f64,
) -> Vec<u64> {
    let sem = Arc::new(tokio::sync::Semaphore::new(window));
    let lat = Arc::new(std::sync::Mutex::new(Vec::new()));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut k = 0usize;
    while Instant::now() < end {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (c, reqs, lat) = (conns[k % conns.len()].clone(), reqs.clone(), lat.clone());
        let i = k % reqs.len();
        k += 1;
        tokio::spawn(async move {
            let t0 = Instant::now();
            c.score(&reqs[i]).await.expect("no error");
            lat.lock().unwrap().push(t0.elapsed().as_nanos() as u64);
            drop(permit);
        });
    }
    let _ = sem.acquire_many(window as u32).await.unwrap();
    let v = std::mem::take(&mut *lat.lock().unwrap());
    v
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let addr = args[1].parse().unwrap();
    let secs: f64 = args[2].parse().unwrap();
    let window: usize = args[3].parse().unwrap();
    let nconn: usize = args[4].parse().unwrap();
    let reqs = Arc::new(adult_requests(20, 40));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..nconn {
            conns.push(Arc::new(AsyncConnection::connect(addr).await.unwrap()));
        }
        run(&conns, &reqs, window, 1.0).await;
        let mut lat = run(&conns, &reqs, window, secs).await;
        lat.sort_unstable();
        println!(
            "rust requests_per_s {:.0} p50_us {} p99_us {}",
            lat.len() as f64 / secs,
            lat[lat.len() / 2] / 1000,
            lat[lat.len() * 99 / 100] / 1000
        );
    });
}
