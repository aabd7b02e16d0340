//! Online updates: for each model with `updates = "kafka://host:port/topic"`, a thread reads the
//! topic's deltas (from the oldest the topic still holds, so a replica that starts late or
//! restarts catches up) and applies each one to the loaded version it names, publishing the
//! updated version with one pointer swap of the registry snapshot: a request sees the version
//! before or after a delta, never half of one.
//!
//! Each version's deltas must come in sequence (1, 2, ...). A delta that fails its checksum, does
//! not fit the model, or skips a sequence number is refused and counted, and its version then
//! waits for the next snapshot (a new version file) and says so in `/models` and the metrics.
//! Deltas for a version newer than any loaded are remembered by offset and replayed when its
//! file arrives; deltas for older versions are skipped. `docs/online.md` is the reference.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rankd_formats::delta::{Assembler, Delta, DeltaError, PartHeader};
use rankd_storage::kafka::{KafkaUrl, Topic};

use crate::engine::Model;
use crate::registry::Registry;
use crate::server::Shared;

/// The largest delta a replica assembles (bytes).
pub const MAX_DELTA_BYTES: u64 = 4 << 30;
/// Deadline of each Kafka call.
const KAFKA_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a fetch waits for new messages.
const FETCH_WAIT: Duration = Duration::from_millis(100);

/// Upper bounds of the freshness buckets, in milliseconds.
pub const FRESHNESS_BUCKETS_MS: [u64; 14] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 30_000, 60_000, 300_000,
];

/// What one version's updates look like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VersionUpdates {
    /// The last sequence number applied (0: none).
    pub sequence: u64,
    /// Why it waits for the next snapshot, when it does.
    pub waiting: Option<String>,
    /// When the last delta was applied (Unix ms; 0: none).
    pub applied_ms: u64,
}

/// What one model's update consumer is doing.
#[derive(Clone, Debug, Default)]
pub struct ModelUpdates {
    /// The topic.
    pub topic: String,
    /// The next offset it reads.
    pub next_offset: i64,
    /// Whether the last Kafka call succeeded.
    pub connected: bool,
    /// The last Kafka error.
    pub last_error: Option<String>,
    /// Deltas applied, all versions.
    pub applied: u64,
    /// Deltas refused, by reason.
    pub refused: BTreeMap<&'static str, u64>,
    /// Per loaded version.
    pub versions: BTreeMap<u64, VersionUpdates>,
}

/// Every model's update state, shared with the admin endpoint.
#[derive(Debug)]
pub struct Updates {
    models: Mutex<BTreeMap<String, ModelUpdates>>,
    /// Milliseconds from a sample's arrival in the samples topic to the moment a delta
    /// reflecting it was applied (the newest sample of each delta).
    freshness_ms: crate::metrics::Histogram,
}

impl Default for Updates {
    fn default() -> Self {
        Updates {
            models: Mutex::default(),
            freshness_ms: crate::metrics::Histogram::new(&FRESHNESS_BUCKETS_MS),
        }
    }
}

impl Updates {
    fn with<R>(&self, model: &str, f: impl FnOnce(&mut ModelUpdates) -> R) -> R {
        let mut m = self.models.lock().unwrap_or_else(|e| e.into_inner());
        f(m.entry(model.to_owned()).or_default())
    }

    /// A model's state, when it consumes updates.
    pub fn get(&self, model: &str) -> Option<ModelUpdates> {
        self.models
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .cloned()
    }

    /// The Prometheus families of the update consumers.
    pub fn render(&self, registry: &Registry, out: &mut String) {
        let models = self.models.lock().unwrap_or_else(|e| e.into_inner());
        if models.is_empty() {
            return;
        }
        let now = unix_ms();
        let esc = crate::metrics::escape_label;
        out.push_str("# HELP rankd_updates_consumer_up Whether the last call to the model's updates topic succeeded.\n# TYPE rankd_updates_consumer_up gauge\n");
        for (name, m) in models.iter() {
            let _ = writeln!(
                out,
                "rankd_updates_consumer_up{{model=\"{}\"}} {}",
                esc(name),
                u8::from(m.connected)
            );
        }
        out.push_str("# HELP rankd_updates_applied_total Deltas applied.\n# TYPE rankd_updates_applied_total counter\n");
        for (name, m) in models.iter() {
            let _ = writeln!(
                out,
                "rankd_updates_applied_total{{model=\"{}\"}} {}",
                esc(name),
                m.applied
            );
        }
        out.push_str("# HELP rankd_updates_refused_total Deltas refused, by reason.\n# TYPE rankd_updates_refused_total counter\n");
        for (name, m) in models.iter() {
            for (reason, n) in &m.refused {
                let _ = writeln!(
                    out,
                    "rankd_updates_refused_total{{model=\"{}\",reason=\"{reason}\"}} {n}",
                    esc(name)
                );
            }
        }
        let mut families: [(&str, &str, String); 5] = [
            ("rankd_updates_last_sequence", "The last delta applied to the version (0: none).", String::new()),
            ("rankd_updates_staleness_seconds", "Seconds since the newest sample the version reflects arrived (since its file was written when no delta was applied).", String::new()),
            ("rankd_updates_waiting_for_snapshot", "1 when a delta of the version was refused and it waits for the next snapshot.", String::new()),
            ("rankd_updates_overlay_rows", "Rows changed by deltas that the version holds in overlays.", String::new()),
            ("rankd_updates_overlay_bytes", "Memory of the version's overlays and replaced layers.", String::new()),
        ];
        for (name, m) in models.iter() {
            let Some(entry) = registry.models.get(name) else {
                continue;
            };
            for (v, model) in &entry.versions {
                let stats = model.update_stats();
                let state = m.versions.get(v).cloned().unwrap_or_default();
                let labels = format!("model=\"{}\",version=\"{v}\"", esc(name));
                let values = [
                    stats.sequence as f64,
                    staleness_seconds(model, now),
                    f64::from(u8::from(state.waiting.is_some())),
                    stats.overlay_rows as f64,
                    stats.overlay_bytes as f64,
                ];
                for ((fam, _, body), value) in families.iter_mut().zip(values) {
                    let _ = writeln!(body, "{fam}{{{labels}}} {value}");
                }
            }
        }
        for (fam, help, body) in &families {
            let _ = writeln!(out, "# HELP {fam} {help}\n# TYPE {fam} gauge");
            out.push_str(body);
        }
        drop(models);
        self.freshness_ms.render(
            out,
            "rankd_updates_freshness_ms",
            "Milliseconds from a sample's arrival in the samples topic to the applied delta reflecting it.",
        );
    }
}

/// Seconds since the newest sample `model` reflects arrived: that of its last delta, or the
/// model file's modification time when none was applied.
pub fn staleness_seconds(model: &Model, now_ms: u64) -> f64 {
    let s = model.update_stats();
    let since = if s.newest_sample_ms > 0 {
        s.newest_sample_ms
    } else if s.created_ms > 0 {
        s.created_ms
    } else {
        std::fs::metadata(model.file().path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(now_ms, |d| d.as_millis() as u64)
    };
    now_ms.saturating_sub(since) as f64 / 1000.0
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The refusal reason of a delta error, for the metrics.
fn reason(e: &DeltaError) -> &'static str {
    match e {
        DeltaError::Checksum { .. } => "checksum",
        DeltaError::Malformed(_) => "malformed",
        DeltaError::Incomplete(_) => "incomplete",
        DeltaError::TooLarge { .. } => "too_large",
        DeltaError::Mismatch(_) => "mismatch",
    }
}

/// Starts one consumer thread per model with an `updates` topic. Threads stop at shutdown.
pub fn start(shared: Arc<Shared>) -> std::io::Result<()> {
    for (name, policy) in &shared.config.model {
        let Some(url) = &policy.updates else {
            continue;
        };
        let url: KafkaUrl = url.parse().map_err(|e: rankd_storage::StorageError| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string())
        })?;
        shared.updates.with(name, |m| m.topic = url.to_string());
        let (shared, name) = (shared.clone(), name.clone());
        std::thread::Builder::new()
            .name(format!("rankd-updates-{name}"))
            .spawn(move || {
                crate::reload::off_serving_cores(&shared.config);
                Consumer::new(shared, name, url).run();
            })?;
    }
    Ok(())
}

struct Consumer {
    shared: Arc<Shared>,
    name: String,
    url: KafkaUrl,
    topic: Option<Topic>,
    offset: i64,
    assembler: Assembler,
    /// Offset of the first part of the message being assembled.
    part_start: i64,
    /// First offset of the deltas of versions newer than any loaded, to replay when they load.
    pending: BTreeMap<u64, i64>,
    /// Replaced snapshots kept until no core holds them (dropping a model's overlays is work
    /// for this thread, not a core's).
    retired: Vec<Arc<Registry>>,
}

impl Consumer {
    fn new(shared: Arc<Shared>, name: String, url: KafkaUrl) -> Consumer {
        Consumer {
            shared,
            name,
            url,
            topic: None,
            offset: -1,
            assembler: Assembler::new(MAX_DELTA_BYTES),
            part_start: 0,
            pending: BTreeMap::new(),
            retired: Vec::new(),
        }
    }

    fn run(mut self) {
        let mut backoff = Duration::from_millis(200);
        while !self.shared.shutdown.load(Ordering::Relaxed) {
            self.retired.retain(|r| Arc::strong_count(r) > 1);
            match self.poll() {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    let msg = e.to_string();
                    let first = self.shared.updates.with(&self.name, |m| {
                        let first = m.connected || m.last_error.is_none();
                        m.connected = false;
                        m.last_error = Some(msg.clone());
                        first
                    });
                    if first {
                        eprintln!(
                            "rankd: model `{}`: updates topic {}: {msg}; retrying",
                            self.name, self.url
                        );
                    }
                    self.topic = None;
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn poll(&mut self) -> Result<(), rankd_storage::StorageError> {
        if self.topic.is_none() {
            let t = Topic::connect(&self.url, false, KAFKA_TIMEOUT)?;
            if self.offset < 0 {
                self.offset = t.offsets()?.0;
            }
            self.topic = Some(t);
        }
        self.track_versions();
        let topic = self.topic.as_ref().expect("connected above");
        let (messages, _) = match topic.fetch(self.offset, FETCH_WAIT) {
            Ok(m) => m,
            Err(e) if e.to_string().contains("OffsetOutOfRange") => {
                // Retention removed what this replica had not read yet: go on from the oldest
                // message still held. A version whose deltas were lost sees the gap in its
                // sequence and waits for the next snapshot.
                let first = topic.offsets()?.0;
                eprintln!(
                    "rankd: model `{}`: offset {} of {} is no longer held; reading on from {first}",
                    self.name, self.offset, self.url
                );
                self.offset = first;
                self.assembler = Assembler::new(MAX_DELTA_BYTES);
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let offset = self.offset;
        self.shared.updates.with(&self.name, |m| {
            m.connected = true;
            m.last_error = None;
            m.next_offset = offset;
        });
        for m in messages {
            self.offset = m.offset + 1;
            if PartHeader::parse(&m.value).is_ok_and(|(h, _)| h.part == 0) {
                self.part_start = m.offset;
            }
            for outcome in self.assembler.push(&m.value) {
                match outcome {
                    Ok((h, bytes)) => self.delta(h, &bytes),
                    Err(e) => self.refuse(None, &e),
                }
            }
        }
        self.shared
            .updates
            .with(&self.name, |m| m.next_offset = self.offset);
        Ok(())
    }

    /// Starts the state of versions that appeared, drops that of versions that went, and goes
    /// back in the topic for the deltas of a version that loaded after they were read.
    fn track_versions(&mut self) {
        let reg = self.shared.registry();
        let loaded: Vec<u64> = reg
            .models
            .get(&self.name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default();
        let mut rewind = None;
        self.shared.updates.with(&self.name, |m| {
            m.versions.retain(|v, _| loaded.contains(v));
            for v in &loaded {
                if !m.versions.contains_key(v) {
                    m.versions.insert(*v, VersionUpdates::default());
                    if let Some(&at) = self.pending.get(v) {
                        rewind = Some(rewind.map_or(at, |r: i64| r.min(at)));
                    }
                }
            }
        });
        let newest = loaded.iter().copied().max().unwrap_or(0);
        self.pending.retain(|&v, _| v > newest);
        if let Some(at) = rewind {
            if at < self.offset {
                self.offset = at;
                self.assembler = Assembler::new(MAX_DELTA_BYTES);
            }
        }
    }

    fn refuse(&self, version: Option<u64>, e: &DeltaError) {
        self.refuse_as(version, reason(e), e);
    }

    /// Counts a refusal as `why`; the version, when named, then waits for the next snapshot.
    fn refuse_as(&self, version: Option<u64>, why: &'static str, e: &DeltaError) {
        eprintln!(
            "rankd: model `{}`: refused a delta{}: {e}",
            self.name,
            version.map_or(String::new(), |v| format!(" for version {v}")),
        );
        self.shared.updates.with(&self.name, |m| {
            *m.refused.entry(why).or_default() += 1;
            if let Some(v) = version.and_then(|v| m.versions.get_mut(&v)) {
                if v.waiting.is_none() {
                    v.waiting = Some(format!("{why}: {e}"));
                }
            }
        });
        if let Some(v) = version {
            eprintln!(
                "rankd: model `{}` version {v}: waits for the next snapshot (deltas after a refused one would not match)",
                self.name
            );
        }
    }

    fn count(&self, why: &'static str) {
        self.shared
            .updates
            .with(&self.name, |m| *m.refused.entry(why).or_default() += 1);
    }

    fn delta(&mut self, h: PartHeader, bytes: &[u8]) {
        let reg = self.shared.registry();
        let loaded = reg.models.get(&self.name);
        let is_loaded = loaded.is_some_and(|e| e.versions.contains_key(&h.base_version));
        let newest = loaded
            .and_then(|e| e.versions.keys().next_back().copied())
            .unwrap_or(0);
        let oldest = loaded
            .and_then(|e| e.versions.keys().next().copied())
            .unwrap_or(0);
        if !is_loaded {
            if h.base_version > newest {
                // Its file may not have arrived yet: come back for it when it does.
                self.pending
                    .entry(h.base_version)
                    .or_insert(self.part_start);
            } else if h.base_version > oldest {
                // Between loaded versions: not one this replica will ever serve.
                self.count("unknown_base");
            }
            // Older than every loaded version: catch-up reads past it.
            return;
        }
        let version = h.base_version;
        let state = self
            .shared
            .updates
            .with(&self.name, |m| m.versions.get(&version).cloned())
            .unwrap_or_default();
        if state.waiting.is_some() {
            self.count("waiting_for_snapshot");
            return;
        }
        if h.sequence <= state.sequence {
            // Read again after a rewind: applied already.
            return;
        }
        let delta = match Delta::decode(bytes) {
            Ok(d) => d,
            Err(e) => return self.refuse(Some(version), &e),
        };
        if delta.base_version != h.base_version || delta.sequence != h.sequence {
            return self.refuse(
                Some(version),
                &DeltaError::Malformed(format!(
                    "parts say version {} delta {}, the delta says version {} delta {}",
                    h.base_version, h.sequence, delta.base_version, delta.sequence
                )),
            );
        }
        if delta.sequence != state.sequence + 1 {
            let e = DeltaError::Incomplete(format!(
                "delta {} after delta {}: deltas {}..{} are missing",
                delta.sequence,
                state.sequence,
                state.sequence + 1,
                delta.sequence - 1
            ));
            return self.refuse_as(Some(version), "sequence_gap", &e);
        }
        // Apply to whatever the registry holds for the version now; a rescan that swapped the
        // snapshot in between keeps the updated model (see `Registry::keep_updates`).
        loop {
            let reg = self.shared.registry();
            let Some(old) = reg
                .models
                .get(&self.name)
                .and_then(|e| e.versions.get(&version))
                .cloned()
            else {
                return;
            };
            let new = match old.apply(&delta) {
                Ok(m) => Arc::new(m),
                Err(e) => return self.refuse(Some(version), &e),
            };
            if self.swap(version, &old, new) {
                break;
            }
        }
        let now = unix_ms();
        if delta.newest_sample_ms > 0 {
            self.shared
                .updates
                .freshness_ms
                .observe(now.saturating_sub(delta.newest_sample_ms));
        }
        self.shared.updates.with(&self.name, |m| {
            m.applied += 1;
            if let Some(v) = m.versions.get_mut(&version) {
                v.sequence = delta.sequence;
                v.applied_ms = now;
            }
        });
    }

    /// Publishes `new` in place of `old` if the registry still serves `old`.
    fn swap(&mut self, version: u64, old: &Arc<Model>, new: Arc<Model>) -> bool {
        let mut guard = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let current = guard.clone();
        let live = current
            .models
            .get(&self.name)
            .and_then(|e| e.versions.get(&version));
        if !live.is_some_and(|m| Arc::ptr_eq(m, old)) {
            return false;
        }
        let mut next = (*current).clone();
        if let Some(e) = next.models.get_mut(&self.name) {
            e.versions.insert(version, new);
        }
        *guard = Arc::new(next);
        drop(guard);
        self.shared.generation.fetch_add(1, Ordering::SeqCst);
        self.retired.push(current);
        true
    }
}
