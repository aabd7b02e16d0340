//! `rankd-load`: an open-loop load generator for rankd.
//!
//! Requests are sent at a target rate (constant or Poisson arrivals) over N connections with
//! pipelining, whether or not earlier answers came back; each latency is measured from the
//! request's *intended* send time into an HdrHistogram, so a stalled server cannot hide its
//! stall (no coordinated omission).

pub mod kserve;
pub mod synth;

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use rankd_client::protocol::{write_frame, MessageType};
use rankd_client::read_response;
use rankd_formats::synth::Rng;

/// Arrival process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arrivals {
    /// Evenly spaced.
    Constant,
    /// Exponential gaps.
    Poisson,
}

/// One run's settings.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Server address.
    pub addr: SocketAddr,
    /// Requests per second.
    pub rate: f64,
    /// Seconds.
    pub duration: f64,
    /// Connections.
    pub connections: usize,
    /// Arrival process.
    pub arrivals: Arrivals,
    /// Print a progress line per second to stderr.
    pub progress: bool,
    /// Keep every response's latency in [`Report::samples`] (for logs aligned with events).
    pub keep_samples: bool,
}

/// One answered (or failed) request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Intended send time, microseconds since the Unix epoch.
    pub intended_unix_us: u64,
    /// Latency from the intended send time, microseconds.
    pub latency_us: u64,
    /// The version that answered; `None` for an error.
    pub version: Option<u64>,
}

/// What a run measured.
#[derive(Debug)]
pub struct Report {
    /// Successful responses.
    pub ok: u64,
    /// Error responses, plus requests unanswered at the end.
    pub errors: u64,
    /// Errors by code name (`unanswered` for requests with no response in time).
    pub errors_by_code: BTreeMap<String, u64>,
    /// Responses by the version that served them.
    pub versions: BTreeMap<u64, u64>,
    /// First response of each version, milliseconds since the Unix epoch.
    pub first_seen_ms: BTreeMap<u64, u64>,
    /// Latency histogram in microseconds (successful responses).
    pub latency: Histogram<u64>,
    /// Responses per second over the run.
    pub achieved_rate: f64,
    /// Requests sent.
    pub sent: u64,
    /// Every response in order of intended send time, when [`RunOptions::keep_samples`].
    pub samples: Vec<Sample>,
}

impl Report {
    /// The summary as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let q = |p: f64| self.latency.value_at_quantile(p);
        serde_json::json!({
            "ok": self.ok,
            "errors": self.errors,
            "sent": self.sent,
            "rate": self.achieved_rate,
            "p50_us": q(0.5),
            "p90_us": q(0.9),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "max_us": self.latency.max(),
            "errors_by_code": self.errors_by_code,
            "versions": self.versions.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
            "first_seen_ms": self.first_seen_ms.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>(),
        })
    }

    /// The summary for people.
    pub fn text(&self) -> String {
        let q = |p: f64| self.latency.value_at_quantile(p);
        format!(
            "sent {} ok {} errors {} rate {:.1}/s\nlatency us: p50 {} p90 {} p99 {} p99.9 {} max {}\nerrors by code: {:?}\nversions: {:?}",
            self.sent,
            self.ok,
            self.errors,
            self.achieved_rate,
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            self.latency.max(),
            self.errors_by_code,
            self.versions
        )
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Outcomes counted while a run is in flight, shared by the RPC and the KServe runs.
#[derive(Default)]
struct Tally {
    ok: u64,
    errors: BTreeMap<String, u64>,
    versions: BTreeMap<u64, u64>,
    first_seen: BTreeMap<u64, u64>,
}

impl Tally {
    fn ok(&mut self, version: u64) {
        self.ok += 1;
        *self.versions.entry(version).or_insert(0) += 1;
        self.first_seen.entry(version).or_insert_with(now_ms);
    }

    fn error(&mut self, code: String) {
        *self.errors.entry(code).or_insert(0) += 1;
    }

    /// The run's report: requests sent but never answered count as `unanswered` errors.
    fn into_report(
        mut self,
        latency: Histogram<u64>,
        sent: u64,
        answered: u64,
        elapsed_secs: f64,
        samples: Vec<Sample>,
    ) -> Report {
        let unanswered = sent.saturating_sub(answered);
        if unanswered > 0 {
            self.errors.insert("unanswered".into(), unanswered);
        }
        Report {
            ok: self.ok,
            errors: self.errors.values().sum(),
            errors_by_code: self.errors,
            versions: self.versions,
            first_seen_ms: self.first_seen,
            latency,
            achieved_rate: self.ok as f64 / elapsed_secs.max(1e-9),
            sent,
            samples,
        }
    }
}

/// Intended send times of an open-loop run: evenly spaced or Poisson at `rate`.
struct Schedule {
    arrivals: Arrivals,
    rate: f64,
    rng: Rng,
    at: f64,
}

impl Schedule {
    fn new(opts: &RunOptions) -> Schedule {
        Schedule {
            arrivals: opts.arrivals,
            rate: opts.rate,
            rng: Rng::new(0x5eed),
            at: 0.0,
        }
    }

    /// Waits (sleeping, then spinning for the last ~150 µs) until the next request is due and
    /// returns when it was due, measured from `base`.
    fn wait_next(&mut self, base: Instant) -> Duration {
        let gap = match self.arrivals {
            Arrivals::Constant => 1.0 / self.rate,
            Arrivals::Poisson => {
                let u = (f64::from(self.rng.uniform(0.5)) + 0.5).clamp(1e-9, 1.0);
                -u.ln() / self.rate
            }
        };
        let due = Duration::from_secs_f64(self.at);
        self.at += gap;
        let now = base.elapsed();
        if due > now + Duration::from_micros(200) {
            std::thread::sleep(due - now - Duration::from_micros(150));
        }
        while base.elapsed() < due {
            std::hint::spin_loop();
        }
        due
    }
}

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Runs open-loop load with the given encoded request bodies (cycled).
pub fn run(opts: &RunOptions, bodies: &[Vec<u8>]) -> std::io::Result<Report> {
    assert!(!bodies.is_empty(), "no requests to send");
    let total = (opts.rate * opts.duration).ceil().max(1.0) as usize;
    let intended: Arc<Vec<AtomicU64>> = Arc::new((0..=total).map(|_| AtomicU64::new(0)).collect());
    let tally = Arc::new(Mutex::new(Tally::default()));
    let second = Arc::new(Mutex::new(new_hist()));
    let answered = Arc::new(AtomicU64::new(0));
    let base = Instant::now() + Duration::from_millis(20);
    let base_unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
        + 20_000;
    let keep = opts.keep_samples;
    let mut writers = Vec::new();
    let mut readers = Vec::new();
    for _ in 0..opts.connections.max(1) {
        let s = TcpStream::connect(opts.addr)?;
        s.set_nodelay(true)?;
        let mut r = s.try_clone()?;
        r.set_read_timeout(Some(Duration::from_secs(10)))?;
        writers.push(s);
        let (intended, tally, second, answered) = (
            intended.clone(),
            tally.clone(),
            second.clone(),
            answered.clone(),
        );
        readers.push(std::thread::spawn(move || {
            let mut hist = new_hist();
            let mut samples = Vec::new();
            while let Ok(resp) = read_response(&mut r) {
                let now = base.elapsed().as_nanos() as u64;
                let sent = intended
                    .get(resp.request_id as usize)
                    .map_or(now, |a| a.load(Ordering::Relaxed));
                let us = (now.saturating_sub(sent) / 1000).max(1);
                answered.fetch_add(1, Ordering::Relaxed);
                let result = resp.into_score();
                if keep {
                    samples.push(Sample {
                        intended_unix_us: base_unix_us + sent / 1000,
                        latency_us: us,
                        version: result.as_ref().ok().map(|r| r.version),
                    });
                }
                match result {
                    Ok(res) => {
                        let _ = hist.record(us);
                        let _ = second.lock().unwrap_or_else(|e| e.into_inner()).record(us);
                        tally
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .ok(res.version);
                    }
                    Err(e) => {
                        let code = match &e {
                            rankd_client::ClientError::Server { code: Some(c), .. } => {
                                c.as_str().to_owned()
                            }
                            rankd_client::ClientError::Server { raw_code, .. } => {
                                format!("code_{raw_code}")
                            }
                            _ => "protocol".to_owned(),
                        };
                        tally.lock().unwrap_or_else(|e| e.into_inner()).error(code);
                    }
                }
            }
            (hist, samples)
        }));
    }
    // The sender: one thread, intended times computed up front of each send.
    let progress = opts.progress;
    let mut schedule = Schedule::new(opts);
    let mut frame = Vec::with_capacity(bodies[0].len() + 32);
    let mut last_report = 0u64;
    let mut sent = 0u64;
    let ok_before = |t: &Mutex<Tally>| t.lock().unwrap_or_else(|e| e.into_inner()).ok;
    for k in 1..=total {
        let due = schedule.wait_next(base);
        intended[k].store(due.as_nanos() as u64, Ordering::Relaxed);
        frame.clear();
        write_frame(
            &mut frame,
            MessageType::ScoreRequest,
            k as u64,
            &bodies[k % bodies.len()],
        );
        let conn = k % writers.len();
        if writers[conn].write_all(&frame).is_err() {
            tally
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .error("send_failed".into());
        }
        sent += 1;
        let secs = base.elapsed().as_secs();
        if progress && secs > last_report {
            last_report = secs;
            let mut h = second.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "t={secs}s sent={sent} ok={} p50_us={} p99_us={} (last second)",
                ok_before(&tally),
                h.value_at_quantile(0.5),
                h.value_at_quantile(0.99)
            );
            h.reset();
        }
    }
    // Wait for the answers (at most 5 s past the end), then close.
    let deadline = Instant::now() + Duration::from_secs(5);
    while answered.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = base.elapsed().as_secs_f64();
    for w in &writers {
        let _ = w.shutdown(std::net::Shutdown::Both);
    }
    let mut latency = new_hist();
    let mut samples = Vec::new();
    for r in readers {
        if let Ok((h, s)) = r.join() {
            let _ = latency.add(&h);
            samples.extend(s);
        }
    }
    samples.sort_by_key(|s| s.intended_unix_us);
    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(t.into_report(
        latency,
        sent,
        answered.load(Ordering::Relaxed),
        elapsed,
        samples,
    ))
}

/// What to send: binary RPC frames' bodies, or KServe v2 requests.
#[derive(Clone, Debug)]
pub enum Load {
    /// Encoded `ScoreRequest` bodies for the binary RPC.
    Rpc(Vec<Vec<u8>>),
    /// KServe v2 requests (gRPC or REST).
    Kserve(kserve::Target),
}

/// Runs open-loop load of either kind.
pub fn run_load(opts: &RunOptions, load: &Load) -> std::io::Result<Report> {
    match load {
        Load::Rpc(bodies) => run(opts, bodies),
        Load::Kserve(t) => kserve::run(opts, t),
    }
}

/// Finds the highest rate whose p99 stays under `p99_us` with no errors: doubles from `start`
/// until a trial fails, then bisects. Returns `(rate, report of that rate)`.
pub fn find_max_rate(
    opts: &RunOptions,
    load: &Load,
    p99_us: u64,
    trial_secs: f64,
) -> std::io::Result<(f64, Option<Report>)> {
    let trial = |rate: f64| -> std::io::Result<Report> {
        let o = RunOptions {
            rate,
            duration: trial_secs,
            progress: false,
            keep_samples: false,
            ..opts.clone()
        };
        run_load(&o, load)
    };
    let passes = |r: &Report| r.errors == 0 && r.latency.value_at_quantile(0.99) <= p99_us;
    let mut lo = 0.0;
    let mut best = None;
    let mut hi = opts.rate.max(1.0);
    loop {
        let r = trial(hi)?;
        eprintln!(
            "trial {hi:.0}/s: p99 {} us, errors {}",
            r.latency.value_at_quantile(0.99),
            r.errors
        );
        if !passes(&r) {
            break;
        }
        lo = hi;
        best = Some(r);
        hi *= 2.0;
        if hi > 1e7 {
            break;
        }
    }
    for _ in 0..5 {
        let mid = (lo + hi) / 2.0;
        let r = trial(mid)?;
        eprintln!(
            "trial {mid:.0}/s: p99 {} us, errors {}",
            r.latency.value_at_quantile(0.99),
            r.errors
        );
        if passes(&r) {
            lo = mid;
            best = Some(r);
        } else {
            hi = mid;
        }
    }
    Ok((lo, best))
}
