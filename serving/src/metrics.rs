//! Process-wide metrics, rendered in the Prometheus text format by the admin endpoint.
//!
//! Counters by (model, version, outcome) are updated once per engine batch under one short lock;
//! latency and batch-size histograms are plain atomics.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Upper bounds of the latency buckets, in microseconds.
pub const LATENCY_BUCKETS_US: [u64; 16] = [
    50, 100, 200, 300, 500, 750, 1_000, 1_500, 2_000, 3_000, 5_000, 10_000, 20_000, 50_000,
    100_000, 1_000_000,
];

/// Upper bounds of the batch-size buckets, in items.
pub const BATCH_BUCKETS: [u64; 10] = [1, 8, 32, 64, 128, 256, 512, 1024, 2048, 8192];

/// A histogram with fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    /// A histogram with these upper bounds (and +Inf).
    pub fn new(bounds: &'static [u64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, v: u64) {
        let i = self.bounds.partition_point(|&b| b < v);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(v, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Renders it in the Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            acc += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {acc}");
        }
        acc += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {acc}");
        let _ = writeln!(out, "{name}_sum {}", self.sum.load(Ordering::Relaxed));
        let _ = writeln!(out, "{name}_count {}", self.count.load(Ordering::Relaxed));
    }
}

/// A label value escaped for the Prometheus text format: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> std::borrow::Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return v.into();
    }
    let mut out = String::with_capacity(v.len() + 8);
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.into()
}

/// A loaded model version, as the metrics show it.
#[derive(Debug, Clone)]
pub struct LoadedVersion<'a> {
    /// The model's name.
    pub model: &'a str,
    /// The version.
    pub version: u64,
    /// Bytes memory-mapped.
    pub mapped_bytes: u64,
    /// What scores it: `cpu` or `cuda:0,1`.
    pub backend: String,
}

/// Cumulative executions of one model version (Triton's statistics extension).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecutionStats {
    /// Requests scored.
    pub success: u64,
    /// Their engine time, nanoseconds (a batch's time counts once for each of its requests).
    pub success_ns: u64,
    /// Requests the engine failed.
    pub fail: u64,
    /// Their engine time, nanoseconds.
    pub fail_ns: u64,
    /// Items scored.
    pub items: u64,
    /// Engine calls (a batch of merged requests is one).
    pub executions: u64,
    /// When the last one ran, milliseconds since the Unix epoch.
    pub last_inference_ms: u64,
}

/// Request counts of one model by (version, outcome).
type Outcomes = BTreeMap<(u64, &'static str), u64>;

/// All metrics of the process.
#[derive(Debug)]
pub struct Metrics {
    /// By model name, then (version, outcome): looked up by `&str`, so counting allocates
    /// nothing once a model's entry exists.
    requests: Mutex<BTreeMap<String, Outcomes>>,
    executions: Mutex<BTreeMap<String, BTreeMap<u64, ExecutionStats>>>,
    /// Request latency from the full frame read to the response queued, microseconds.
    pub latency_us: Histogram,
    /// Items per engine call.
    pub batch_items: Histogram,
    /// Open connections.
    pub connections: AtomicI64,
    /// Connections closed for a framing error or a stalled frame.
    pub frame_errors: AtomicU64,
    /// Connections refused at `max_connections`.
    pub connections_refused: AtomicU64,
    /// Connections closed after `idle_timeout_ms` without traffic.
    pub idle_closed: AtomicU64,
    /// Connections closed because their client took no answer for `write_timeout_ms`.
    pub write_timeouts: AtomicU64,
    /// Model files rejected while loading.
    pub load_failures: AtomicU64,
    /// Registry snapshots published after the first.
    pub reloads: AtomicU64,
    /// Scans of the model root after startup (file events and the periodic rescan).
    pub scans: AtomicU64,
    /// Polls of an HDFS model root.
    pub hdfs_polls: AtomicU64,
    /// Polls of an HDFS model root that failed (listing or download).
    pub hdfs_poll_failures: AtomicU64,
    /// Whether the last poll of the HDFS model root succeeded (1) or not (0); -1 for a local root.
    pub hdfs_up: AtomicI64,
    /// Versions downloaded from HDFS into the cache.
    pub hdfs_downloads: AtomicU64,
    /// Bytes downloaded from HDFS.
    pub hdfs_download_bytes: AtomicU64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: Mutex::new(BTreeMap::new()),
            executions: Mutex::new(BTreeMap::new()),
            latency_us: Histogram::new(&LATENCY_BUCKETS_US),
            batch_items: Histogram::new(&BATCH_BUCKETS),
            connections: AtomicI64::new(0),
            frame_errors: AtomicU64::new(0),
            connections_refused: AtomicU64::new(0),
            idle_closed: AtomicU64::new(0),
            write_timeouts: AtomicU64::new(0),
            load_failures: AtomicU64::new(0),
            reloads: AtomicU64::new(0),
            scans: AtomicU64::new(0),
            hdfs_polls: AtomicU64::new(0),
            hdfs_poll_failures: AtomicU64::new(0),
            hdfs_up: AtomicI64::new(-1),
            hdfs_downloads: AtomicU64::new(0),
            hdfs_download_bytes: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// Adds `n` requests of `model`/`version` with `outcome` (`ok` or an error code's name).
    pub fn count(&self, model: &str, version: u64, outcome: &'static str, n: u64) {
        let mut m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        let per_model = match m.get_mut(model) {
            Some(p) => p,
            None => m.entry(model.to_owned()).or_default(),
        };
        *per_model.entry((version, outcome)).or_insert(0) += n;
    }

    /// Records one engine call of `model`/`version`: `ok` requests scored (`items` items),
    /// `failed` failed, in `elapsed`.
    pub fn record_execution(
        &self,
        model: &str,
        version: u64,
        ok: u64,
        failed: u64,
        items: u64,
        elapsed: std::time::Duration,
    ) {
        let ns = elapsed.as_nanos().min(u64::MAX as u128) as u64;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut m = self.executions.lock().unwrap_or_else(|e| e.into_inner());
        let per_model = match m.get_mut(model) {
            Some(p) => p,
            None => m.entry(model.to_owned()).or_default(),
        };
        let s = per_model.entry(version).or_default();
        s.success += ok;
        s.success_ns += ns * ok;
        s.fail += failed;
        s.fail_ns += ns * failed;
        s.items += items;
        s.executions += 1;
        s.last_inference_ms = now;
    }

    /// The executions recorded for `model`/`version`.
    pub fn execution_stats(&self, model: &str, version: u64) -> ExecutionStats {
        let m = self.executions.lock().unwrap_or_else(|e| e.into_inner());
        m.get(model)
            .and_then(|p| p.get(&version))
            .copied()
            .unwrap_or_default()
    }

    /// The Prometheus text exposition, with the loaded versions (the registry's `loaded()`;
    /// metrics sit below the registry and know nothing of it).
    ///
    /// `gpu`: the GPU backend's counters, when GPUs are in use.
    pub fn render(
        &self,
        loaded: &[LoadedVersion<'_>],
        gpu: Option<&rankd_engine::gpu::GpuMetrics>,
    ) -> String {
        let mut out = String::new();
        out.push_str("# HELP rankd_requests_total Score requests by model, version and outcome.\n# TYPE rankd_requests_total counter\n");
        {
            let m = self.requests.lock().unwrap_or_else(|e| e.into_inner());
            for (model, per) in m.iter() {
                let model = escape_label(model);
                for ((version, outcome), n) in per {
                    let _ = writeln!(
                        out,
                        "rankd_requests_total{{model=\"{model}\",version=\"{version}\",outcome=\"{outcome}\"}} {n}"
                    );
                }
            }
        }
        self.latency_us.render(
            &mut out,
            "rankd_request_latency_us",
            "Server-side latency of score requests in microseconds.",
        );
        self.batch_items
            .render(&mut out, "rankd_batch_items", "Items per engine call.");
        out.push_str(
            "# HELP rankd_model_loaded Loaded model versions.\n# TYPE rankd_model_loaded gauge\n",
        );
        // One group per metric family, as the exposition format requires.
        for l in loaded {
            let (name, v) = (escape_label(l.model), l.version);
            let _ = writeln!(
                out,
                "rankd_model_loaded{{model=\"{name}\",version=\"{v}\"}} 1"
            );
        }
        out.push_str("# HELP rankd_model_mapped_bytes Bytes memory-mapped per loaded model version.\n# TYPE rankd_model_mapped_bytes gauge\n");
        for l in loaded {
            let (name, v) = (escape_label(l.model), l.version);
            let _ = writeln!(
                out,
                "rankd_model_mapped_bytes{{model=\"{name}\",version=\"{v}\"}} {}",
                l.mapped_bytes
            );
        }
        out.push_str("# HELP rankd_model_backend The backend scoring each loaded version (cpu, or the GPUs holding it).\n# TYPE rankd_model_backend gauge\n");
        for l in loaded {
            let (name, v) = (escape_label(l.model), l.version);
            let _ = writeln!(
                out,
                "rankd_model_backend{{model=\"{name}\",version=\"{v}\",backend=\"{}\"}} 1",
                escape_label(&l.backend)
            );
        }
        if let Some(g) = gpu {
            for (name, help, v) in [
                (
                    "rankd_gpu_batches_total",
                    "GPU batches launched.",
                    &g.batches,
                ),
                ("rankd_gpu_items_total", "Items scored on GPUs.", &g.items),
                (
                    "rankd_gpu_jobs_total",
                    "Core jobs merged into GPU batches.",
                    &g.jobs,
                ),
                (
                    "rankd_gpu_errors_total",
                    "GPU batches failed by a CUDA error.",
                    &g.errors,
                ),
                (
                    "rankd_gpu_cpu_fallbacks_total",
                    "Requests scored on the CPU because their GPU was lost or refused the model.",
                    &g.cpu_fallbacks,
                ),
                (
                    "rankd_gpu_unloads_total",
                    "Model versions freed from GPU memory.",
                    &g.unloads,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}",
                    v.load(Ordering::Relaxed)
                );
            }
        }
        let _ = writeln!(
            out,
            "# TYPE rankd_connections gauge\nrankd_connections {}",
            self.connections.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE rankd_frame_errors_total counter\nrankd_frame_errors_total {}",
            self.frame_errors.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE rankd_connections_refused_total counter\nrankd_connections_refused_total {}",
            self.connections_refused.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE rankd_connections_idle_closed_total counter\nrankd_connections_idle_closed_total {}",
            self.idle_closed.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE rankd_connections_write_timeouts_total counter\nrankd_connections_write_timeouts_total {}",
            self.write_timeouts.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE rankd_model_load_failures_total counter\nrankd_model_load_failures_total {}",
            self.load_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE rankd_registry_reloads_total counter\nrankd_registry_reloads_total {}",
            self.reloads.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# TYPE rankd_model_root_scans_total counter\nrankd_model_root_scans_total {}",
            self.scans.load(Ordering::Relaxed)
        );
        let up = self.hdfs_up.load(Ordering::Relaxed);
        if up >= 0 {
            for (name, help, kind, v) in [
                (
                    "rankd_hdfs_up",
                    "Whether the last poll of the HDFS model root succeeded.",
                    "gauge",
                    up as u64,
                ),
                (
                    "rankd_hdfs_polls_total",
                    "Polls of the HDFS model root.",
                    "counter",
                    self.hdfs_polls.load(Ordering::Relaxed),
                ),
                (
                    "rankd_hdfs_poll_failures_total",
                    "Failed polls of the HDFS model root (serving went on with what was loaded).",
                    "counter",
                    self.hdfs_poll_failures.load(Ordering::Relaxed),
                ),
                (
                    "rankd_hdfs_downloads_total",
                    "Model versions downloaded from HDFS.",
                    "counter",
                    self.hdfs_downloads.load(Ordering::Relaxed),
                ),
                (
                    "rankd_hdfs_download_bytes_total",
                    "Bytes downloaded from HDFS.",
                    "counter",
                    self.hdfs_download_bytes.load(Ordering::Relaxed),
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}"
                );
            }
        }
        out
    }
}
