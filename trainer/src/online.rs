//! `rankd-train online`: continuous training from a Kafka topic of labeled samples, publishing
//! parameter deltas to an updates topic that every daemon replica applies to the version it
//! serves, and writing a full new version (a snapshot) now and then. `docs/online.md` is the
//! reference.
//!
//! The trainer starts from a served model file (its base version): the model's own feature spec
//! and network, its parameters as stored, fresh optimizer state. Each step trains on the samples
//! that arrived (up to `batch_size`, after at most `max_batch_wait_ms`), with the same
//! [`CpuCompute`] and [`Optimizer`] as offline training. The rows a step touches are remembered;
//! every `publish_interval_ms` their current values (rounded as the table stores them), the
//! dense layers and the wide bias go out as one [`Delta`] with the base version and the next
//! sequence number. A held-back slice of the stream (by a hash of the offset) is never trained
//! on: each held-back sample is scored by the current parameters on arrival, and a rolling AUC
//! and log loss over the last `eval_window` of them are logged with every delta.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rankd_feature_ops::{CompiledSpec, OwnedValue, SlotBatch, Value};
use rankd_formats::config::{DeepConfig, EmbeddingConfig, ModelConfig, WideConfig};
use rankd_formats::delta::{self, Delta, LayerUpdate, RowUpdate, TableKind};
use rankd_formats::{Activation, Metadata, ModelFile, WeightType};
use rankd_storage::kafka::{KafkaUrl, Topic};
use serde::Deserialize;

use crate::config::TrainSettings;
use crate::error::{Result, TrainError};
use crate::metrics::evaluate;
use crate::model::{Compute, CpuCompute, Grads, Layout, Optimizer, Params};

/// `[online]` in the config.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnlineSettings {
    /// The topic of labeled samples, `kafka://host:port/topic`.
    pub samples: Option<String>,
    /// The topic deltas are published to.
    pub updates: Option<String>,
    /// The base model file (default: the newest version in `snapshot_dir`).
    pub base: Option<PathBuf>,
    /// The model's directory in the daemon's model root (`ROOT/NAME`): snapshots are written
    /// there as `VERSION/model.rkm`. No snapshots without it.
    pub snapshot_dir: Option<PathBuf>,
    /// How often a delta is published, in milliseconds.
    #[serde(default = "default_publish")]
    pub publish_interval_ms: u64,
    /// How often a full version is written, in seconds (0: never).
    #[serde(default)]
    pub snapshot_interval_s: u64,
    /// The longest a step waits for a full batch, in milliseconds.
    #[serde(default = "default_batch_wait")]
    pub max_batch_wait_ms: u64,
    /// Fraction of the stream held back for the rolling evaluation.
    #[serde(default = "default_holdout")]
    pub holdout: f64,
    /// Held-back samples the rolling metrics cover.
    #[serde(default = "default_window")]
    pub eval_window: usize,
    /// Column names of CSV samples, in order (JSON samples name their fields).
    #[serde(default)]
    pub columns: Vec<String>,
    /// Where to start reading samples: `earliest` (what the topic still holds) or `latest`.
    #[serde(default = "default_start")]
    pub start: String,
    /// Largest piece of a delta in one message, in bytes.
    #[serde(default = "default_part")]
    pub max_part_bytes: usize,
    /// Deadline of each Kafka call, in milliseconds.
    #[serde(default = "default_timeout")]
    pub kafka_timeout_ms: u64,
}

fn default_publish() -> u64 {
    10_000
}
fn default_batch_wait() -> u64 {
    100
}
fn default_holdout() -> f64 {
    0.05
}
fn default_window() -> usize {
    10_000
}
fn default_start() -> String {
    "earliest".into()
}
fn default_part() -> usize {
    256 << 10
}
fn default_timeout() -> u64 {
    10_000
}

/// The settings of an online run: `[train]` (batch size, learning rates, label column, CSV
/// dialect) and `[online]`. Model keys in the same file are ignored: the model is the base
/// file's.
#[derive(Clone, Debug)]
pub struct OnlineConfig {
    /// `[train]`.
    pub train: TrainSettings,
    /// `[online]`.
    pub online: OnlineSettings,
}

impl OnlineConfig {
    /// Parses the `[train]` and `[online]` tables of a config file.
    pub fn from_toml(text: &str) -> Result<OnlineConfig> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        #[derive(Deserialize)]
        struct Parts {
            train: TrainSettings,
            online: OnlineSettings,
        }
        let mut parts = toml::Table::new();
        for key in ["train", "online"] {
            let t = table
                .get(key)
                .ok_or_else(|| TrainError::Config(format!("the config has no [{key}] table")))?;
            parts.insert(key.into(), t.clone());
        }
        let Parts { train, online } = toml::Value::Table(parts)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(e.to_string()))?;
        if train.batch_size == 0 {
            return Err(TrainError::Config("batch_size must be at least 1".into()));
        }
        if train.batch_norm || train.dropout > 0.0 {
            return Err(TrainError::Config(
                "online training does not use batch_norm or dropout (the base model has any \
                 batch normalization folded in already)"
                    .into(),
            ));
        }
        if !(0.0..1.0).contains(&online.holdout) {
            return Err(TrainError::Config(format!(
                "[online] holdout {} must be in [0, 1)",
                online.holdout
            )));
        }
        if !matches!(online.start.as_str(), "earliest" | "latest") {
            return Err(TrainError::Config(format!(
                "[online] start `{}`: earliest or latest",
                online.start
            )));
        }
        if online.publish_interval_ms == 0 || online.max_part_bytes < 1024 {
            return Err(TrainError::Config(
                "[online] publish_interval_ms must be positive and max_part_bytes at least 1024"
                    .into(),
            ));
        }
        Ok(OnlineConfig { train, online })
    }
}

/// The model config a model file was written from: its feature spec and network, as the trainer
/// describes them. Files whose network the trainer cannot describe (hidden layers without ReLU,
/// an output layer with one) are refused.
pub fn model_config_of(file: &ModelFile) -> Result<ModelConfig> {
    let spec = file.spec();
    let arch = &spec.architecture;
    if arch.cross.is_some() || arch.multitask.is_some() {
        return Err(TrainError::Config(format!(
            "{}: a {} model; online training and its deltas carry wide, deep and FM parameters \
             only (no cross layers, experts or heads yet)",
            file.path().display(),
            arch.kind()
        )));
    }
    let last = arch.deep.len().saturating_sub(1);
    for (i, l) in arch.deep.iter().enumerate() {
        let want = if i == last {
            Activation::None
        } else {
            Activation::Relu
        };
        if l.activation != want {
            return Err(TrainError::Config(format!(
                "{}: layer {i} has activation {:?}; the trainer's networks use ReLU on hidden \
                 layers and none on the output",
                file.path().display(),
                l.activation
            )));
        }
    }
    Ok(ModelConfig {
        hash_seed: spec.features.hash_seed,
        features: spec.features.features.clone(),
        slots: spec.features.slots.clone(),
        embeddings: arch
            .embeddings
            .iter()
            .map(|e| EmbeddingConfig {
                slot: e.slot.clone(),
                dim: e.dim,
                pooling: e.pooling,
                weight_type: e.weight_type,
            })
            .collect(),
        wide: arch.wide.as_ref().map(|w| WideConfig {
            slots: w.slots.iter().map(|s| s.slot.clone()).collect(),
        }),
        deep: (!arch.deep.is_empty()).then(|| DeepConfig {
            dense: arch.dense_inputs.clone(),
            layers: arch.deep.iter().map(|l| l.out_dim).collect(),
        }),
        fm: arch.fm,
        cross: None,
        heads: vec![],
        multitask: None,
    })
}

/// A model file's parameters as the trainer holds them (every table in f32, as served).
pub fn params_of(file: &ModelFile, layout: &Layout) -> Params {
    let arch = &file.spec().architecture;
    let emb = arch
        .embeddings
        .iter()
        .map(|e| {
            let n = (e.rows * u64::from(e.dim)) as usize;
            match e.weight_type {
                WeightType::F32 => file.weights(e.weights)[..n].to_vec(),
                WeightType::F16 => file.weights_f16(e.weights)[..n]
                    .iter()
                    .map(|&b| half::f16::from_bits(b).to_f32())
                    .collect(),
                WeightType::I8 => {
                    let scales = file.weights(e.scales.expect("validated: int8 has scales"));
                    file.weights_i8(e.weights)[..n]
                        .iter()
                        .enumerate()
                        .map(|(i, &q)| f32::from(q) * scales[i / e.dim as usize])
                        .collect()
                }
            }
        })
        .collect();
    let wide = arch.wide.as_ref();
    let params = Params {
        emb,
        wide: wide
            .map(|w| {
                w.slots
                    .iter()
                    .map(|s| file.weights(s.weights).to_vec())
                    .collect()
            })
            .unwrap_or_default(),
        wide_bias: wide.map_or(0.0, |w| w.bias),
        w: arch
            .deep
            .iter()
            .map(|l| file.weights(l.weight).to_vec())
            .collect(),
        b: arch
            .deep
            .iter()
            .map(|l| file.weights(l.bias).to_vec())
            .collect(),
        cross: Vec::new(),
        bn: Vec::new(),
        bn_stats: Vec::new(),
        mt: Vec::new(),
    };
    debug_assert_eq!(params.emb.len(), layout.emb.len());
    debug_assert_eq!(params.w.len(), layout.layers.len());
    params
}

/// Rows of one table changed since the last delta: a bit per row and the list of set bits.
#[derive(Debug, Default)]
struct Changed {
    bits: Vec<u64>,
    rows: Vec<u32>,
}

impl Changed {
    fn new(rows: usize) -> Changed {
        Changed {
            bits: vec![0; rows.div_ceil(64)],
            rows: Vec::new(),
        }
    }

    fn add(&mut self, row: u32) {
        let (w, b) = (row as usize / 64, row % 64);
        if self.bits[w] & (1 << b) == 0 {
            self.bits[w] |= 1 << b;
            self.rows.push(row);
        }
    }

    fn take(&mut self) -> Vec<u32> {
        for &r in &self.rows {
            self.bits[r as usize / 64] = 0;
        }
        let mut rows = std::mem::take(&mut self.rows);
        rows.sort_unstable();
        rows
    }
}

/// What an online run did, for tests and the exit line.
#[derive(Debug, Default, Clone)]
pub struct OnlineReport {
    /// Samples trained on.
    pub trained: u64,
    /// Samples held back and scored.
    pub held_out: u64,
    /// Messages that were not a valid sample (skipped, counted).
    pub bad_samples: u64,
    /// Deltas published.
    pub deltas: u64,
    /// Snapshots written (their versions).
    pub snapshots: Vec<u64>,
    /// The version deltas refer to at the end, and the last sequence number on it.
    pub base_version: u64,
    /// The last sequence number published on `base_version`.
    pub sequence: u64,
    /// The offset after the last sample read.
    pub next_offset: i64,
    /// Rolling AUC and log loss of the held-back samples at the end (NaN without any).
    pub holdout_auc: f64,
    /// See `holdout_auc`.
    pub holdout_logloss: f64,
}

/// When to stop besides a signal, and what to leave behind.
#[derive(Debug, Default, Clone)]
pub struct Limits {
    /// After this many samples read (trained and held back), publish and stop.
    pub max_samples: Option<u64>,
    /// At the end, write the current parameters here as a model file of the current base
    /// version: the file the base plus every published delta amounts to.
    pub export: Option<PathBuf>,
}

/// The state of an online run.
struct Online<'a> {
    cfg: &'a OnlineConfig,
    config: ModelConfig,
    spec: CompiledSpec,
    layout: Layout,
    params: Params,
    opt: Optimizer,
    compute: CpuCompute,
    grads: Grads,
    name: String,
    base_version: u64,
    sequence: u64,
    emb_changed: Vec<Changed>,
    wide_changed: Vec<Changed>,
    dense_changed: bool,
    newest_sample_ms: i64,
    updates: Topic,
    columns: Vec<usize>,
    label_col: Option<usize>,
    window: std::collections::VecDeque<(f32, f32)>,
    /// Produce requests not yet accepted by the broker, oldest first (deltas stay in order
    /// through a broker outage), and their bytes.
    outbox: std::collections::VecDeque<Vec<Vec<u8>>>,
    outbox_bytes: usize,
    /// Since when the broker has refused or not answered, for one log line per outage.
    outage: Option<Instant>,
    /// Queued deltas were dropped (a snapshot is due).
    dropped_deltas: bool,
    report: OnlineReport,
}

/// The most bytes of unsent deltas kept through a broker outage; past it they are dropped
/// (replicas then see a gap and wait for the next snapshot, which is written at once when there
/// is a `snapshot_dir`).
const MAX_OUTBOX_BYTES: usize = 1 << 30;

/// Runs online training until `stop` is set or `limits` are reached; progress goes to `log`.
pub fn run(
    cfg: &OnlineConfig,
    stop: &AtomicBool,
    limits: Limits,
    log: &mut dyn std::io::Write,
) -> Result<OnlineReport> {
    let o = &cfg.online;
    let url = |what: &str, v: &Option<String>| -> Result<KafkaUrl> {
        v.as_deref()
            .ok_or_else(|| TrainError::Config(format!("[online] {what} is not set")))?
            .parse()
            .map_err(|e: rankd_storage::StorageError| TrainError::Config(e.to_string()))
    };
    let samples_url = url("samples", &o.samples)?;
    let updates_url = url("updates", &o.updates)?;
    let base = match (&o.base, &o.snapshot_dir) {
        (Some(b), _) => b.clone(),
        (None, Some(dir)) => newest_version(dir, &cfg.train.hdfs())?.1,
        (None, None) => {
            return Err(TrainError::Config(
                "[online] needs base (a model file) or snapshot_dir holding versions".into(),
            ))
        }
    };
    // A base on HDFS is read from a local copy (the file is mapped), kept while it is open.
    let (local_base, _copy) = if rankd_storage::Location::is_hdfs(&base) {
        let dir = tempfile::tempdir().map_err(|e| TrainError::Data(e.to_string()))?;
        let p = dir.path().join("base.rkm");
        rankd_storage::get_file(&base, &p, &cfg.train.hdfs())
            .map_err(|e| TrainError::Data(e.to_string()))?;
        (p, Some(dir))
    } else {
        (base.clone(), None)
    };
    let file = ModelFile::open(&local_base).map_err(|e| TrainError::Data(e.to_string()))?;
    let config = model_config_of(&file)?;
    let spec = file.compiled().clone();
    let layout = Layout::new(&config, &spec)?;
    let params = params_of(&file, &layout);
    let s = &cfg.train;
    let opt = Optimizer::new(&params, s.lr_dense, s.lr_sparse, s.l2).with_schedule(
        s.warmup_steps,
        s.lr_decay,
        s.lr_decay_steps,
    );
    let timeout = Duration::from_millis(o.kafka_timeout_ms);
    let kafka = |e: rankd_storage::StorageError| TrainError::Data(e.to_string());
    let samples = Topic::connect(&samples_url, true, timeout).map_err(kafka)?;
    let updates = Topic::connect(&updates_url, true, timeout).map_err(kafka)?;
    let name = file.spec().metadata.name.clone();
    let base_version = file.spec().metadata.version;
    let _ = writeln!(
        log,
        "online: model `{name}` version {base_version} from {}; samples {samples_url}, deltas to {updates_url}",
        base.display()
    );
    let features = spec.features();
    let (columns, label_col) = if o.columns.is_empty() {
        (Vec::new(), None)
    } else {
        let col = |n: &str| o.columns.iter().position(|c| c == n);
        let mut cols = Vec::new();
        for f in features {
            cols.push(col(&f.name).ok_or_else(|| {
                TrainError::Config(format!("[online] columns has no `{}`", f.name))
            })?);
        }
        let label = col(&s.label).ok_or_else(|| {
            TrainError::Config(format!("[online] columns has no label `{}`", s.label))
        })?;
        (cols, Some(label))
    };
    let mut run = Online {
        cfg,
        emb_changed: layout.emb.iter().map(|e| Changed::new(e.rows)).collect(),
        wide_changed: layout.wide.iter().map(|w| Changed::new(w.2)).collect(),
        grads: Grads::new(&layout),
        config,
        spec,
        layout,
        params,
        opt,
        compute: CpuCompute::default(),
        name,
        base_version,
        sequence: 0,
        dense_changed: false,
        newest_sample_ms: 0,
        updates,
        columns,
        label_col,
        window: Default::default(),
        outbox: Default::default(),
        outbox_bytes: 0,
        outage: None,
        dropped_deltas: false,
        report: OnlineReport::default(),
    };
    drop(file);
    let (first, next) = samples.offsets().map_err(kafka)?;
    let mut offset = if o.start == "latest" { next } else { first };
    let wait = Duration::from_millis(o.max_batch_wait_ms);
    let publish_every = Duration::from_millis(o.publish_interval_ms);
    let mut next_publish = Instant::now() + publish_every;
    let mut next_snapshot = (o.snapshot_interval_s > 0)
        .then(|| Instant::now() + Duration::from_secs(o.snapshot_interval_s));
    let mut pending: Vec<(Vec<OwnedValue>, f32, i64)> = Vec::new();
    let mut held: Vec<(Vec<OwnedValue>, f32)> = Vec::new();
    let mut batch_started: Option<Instant> = None;
    let mut read = 0u64;
    let mut bad_logged = 0;
    loop {
        let done = stop.load(Ordering::Relaxed) || limits.max_samples.is_some_and(|m| read >= m);
        if !done {
            let left = limits.max_samples.map_or(u64::MAX, |m| m - read);
            // A broker outage does not end the run: training goes on with what was read,
            // deltas queue, and reading resumes when the broker answers again.
            let messages = match samples.fetch(offset, wait) {
                Ok((m, _)) => {
                    run.broker_back(log);
                    m
                }
                Err(e) => {
                    run.broker_down(&e.to_string(), log);
                    std::thread::sleep(wait.max(Duration::from_millis(200)));
                    Vec::new()
                }
            };
            for m in messages
                .into_iter()
                .take(left.min(usize::MAX as u64) as usize)
            {
                offset = m.offset + 1;
                read += 1;
                match run.parse(&m.value) {
                    Ok((row, label)) => {
                        if is_held_out(m.offset, o.holdout) {
                            held.push((row, label));
                        } else {
                            batch_started.get_or_insert_with(Instant::now);
                            pending.push((row, label, m.timestamp_ms));
                        }
                    }
                    Err(e) => {
                        run.report.bad_samples += 1;
                        if bad_logged < 10 {
                            bad_logged += 1;
                            let _ = writeln!(log, "online: offset {}: skipped: {e}", m.offset);
                        }
                    }
                }
            }
        }
        if !held.is_empty() {
            run.score_held_out(std::mem::take(&mut held));
        }
        // Train on full batches, and on what there is when the oldest sample waited long
        // enough (or the run ends).
        while pending.len() >= s.batch_size
            || (!pending.is_empty() && (done || batch_started.is_some_and(|t| t.elapsed() >= wait)))
        {
            let n = pending.len().min(s.batch_size);
            let batch: Vec<_> = pending.drain(..n).collect();
            run.step(batch, log);
            batch_started = (!pending.is_empty()).then(Instant::now);
        }
        if done || Instant::now() >= next_publish {
            run.publish(log)?;
            next_publish = Instant::now() + publish_every;
        } else if !run.outbox.is_empty() {
            run.flush(log);
        }
        let dropped = std::mem::take(&mut run.dropped_deltas);
        if let (Some(at), Some(dir)) = (next_snapshot, &o.snapshot_dir) {
            if dropped || Instant::now() >= at {
                run.snapshot(dir, log)?;
                next_snapshot = Some(Instant::now() + Duration::from_secs(o.snapshot_interval_s));
            }
        }
        if done {
            break;
        }
    }
    // What is still queued gets the Kafka deadline to go out.
    let until = Instant::now() + Duration::from_millis(o.kafka_timeout_ms);
    while !run.outbox.is_empty() && Instant::now() < until {
        run.flush(log);
        if !run.outbox.is_empty() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    if !run.outbox.is_empty() {
        return Err(TrainError::Data(format!(
            "{} produce requests of deltas could not be published to {updates_url}",
            run.outbox.len()
        )));
    }
    if let Some(path) = &limits.export {
        run.write_model(path, run.base_version)?;
    }
    run.report.next_offset = offset;
    run.report.base_version = run.base_version;
    run.report.sequence = run.sequence;
    let (auc, logloss) = run.rolling();
    run.report.holdout_auc = auc;
    run.report.holdout_logloss = logloss;
    Ok(run.report)
}

/// Whether the sample at `offset` is held back (a hash of the offset, so a restarted trainer
/// holds back the same samples).
fn is_held_out(offset: i64, fraction: f64) -> bool {
    let h = xxhash_rust::xxh3::xxh3_64(&offset.to_le_bytes());
    (h as f64) < fraction * u64::MAX as f64
}

/// The newest `VERSION/model.rkm` of a model directory (local or `hdfs://`).
pub fn newest_version(dir: &Path, hdfs: &rankd_storage::HdfsSettings) -> Result<(u64, PathBuf)> {
    let err = |e: String| TrainError::Data(format!("{}: {e}", dir.display()));
    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    match rankd_storage::Location::from_path(dir).map_err(|e| err(e.to_string()))? {
        rankd_storage::Location::Hdfs(h) => {
            let client = rankd_storage::Hdfs::for_path(&h, hdfs).map_err(|e| err(e.to_string()))?;
            for e in client.list(&h.path).map_err(|e| err(e.to_string()))? {
                let (Ok(v), true) = (e.name.parse::<u64>(), e.is_dir) else {
                    continue;
                };
                let file = h.join(&e.name).join("model.rkm");
                if client
                    .stat(&file.path)
                    .is_ok_and(|s| s.is_some_and(|s| !s.is_dir))
                {
                    found.push((v, PathBuf::from(file.url())));
                }
            }
        }
        rankd_storage::Location::Local(_) => {
            for e in std::fs::read_dir(dir).map_err(|e| err(e.to_string()))? {
                let e = e.map_err(|e| err(e.to_string()))?;
                let Ok(v) = e.file_name().to_string_lossy().parse::<u64>() else {
                    continue;
                };
                let file = e.path().join("model.rkm");
                if file.is_file() {
                    found.push((v, file));
                }
            }
        }
    }
    found
        .into_iter()
        .max_by_key(|(v, _)| *v)
        .ok_or_else(|| err("no VERSION/model.rkm to start from".into()))
}

impl Online<'_> {
    /// One sample: a JSON object (fields by name) or a CSV line (fields by `[online] columns`).
    fn parse(&self, value: &[u8]) -> std::result::Result<(Vec<OwnedValue>, f32), String> {
        let s = &self.cfg.train;
        let text = std::str::from_utf8(value).map_err(|_| "not UTF-8".to_string())?;
        let features = self.spec.features();
        let trimmed = text.trim();
        if trimmed.starts_with('{') {
            let obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_str(trimmed).map_err(|e| format!("JSON: {e}"))?;
            let cell = |v: Option<&serde_json::Value>| -> String {
                match v {
                    None | Some(serde_json::Value::Null) => String::new(),
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .map(|x| match x {
                            serde_json::Value::String(s) => s.clone(),
                            other => other.to_string(),
                        })
                        .collect::<Vec<_>>()
                        .join(&s.list_separator.to_string()),
                    Some(other) => other.to_string(),
                }
            };
            let label = parse_label(&cell(obj.get(&s.label)))?;
            let mut row = Vec::with_capacity(features.len());
            for f in features {
                row.push(
                    crate::data::parse_cell(&cell(obj.get(&f.name)), f.ty, s)
                        .map_err(|e| format!("feature `{}`: {e}", f.name))?,
                );
            }
            return Ok((row, label));
        }
        let Some(label_col) = self.label_col else {
            return Err("a CSV sample, but [online] columns is not set".into());
        };
        let mut reader = csv::ReaderBuilder::new()
            .delimiter(s.delimiter as u8)
            .has_headers(false)
            .flexible(true)
            .from_reader(text.as_bytes());
        let record = reader
            .records()
            .next()
            .ok_or("empty sample")?
            .map_err(|e| format!("CSV: {e}"))?;
        if record.len() != self.cfg.online.columns.len() {
            return Err(format!(
                "{} fields, [online] columns names {}",
                record.len(),
                self.cfg.online.columns.len()
            ));
        }
        let label = parse_label(record.get(label_col).unwrap_or(""))?;
        let mut row = Vec::with_capacity(features.len());
        for (f, &c) in features.iter().zip(&self.columns) {
            row.push(
                crate::data::parse_cell(record.get(c).unwrap_or(""), f.ty, s)
                    .map_err(|e| format!("feature `{}`: {e}", f.name))?,
            );
        }
        Ok((row, label))
    }

    /// Runs rows through the feature spec; rows it refuses are skipped and counted.
    fn slots(&mut self, rows: &[Vec<OwnedValue>]) -> (SlotBatch, Vec<usize>) {
        let mut slots = SlotBatch::new();
        let mut ok = Vec::with_capacity(rows.len());
        for (i, row) in rows.iter().enumerate() {
            let values: Vec<Value<'_>> = row.iter().map(OwnedValue::value).collect();
            if self.spec.transform_row(&values, &mut slots).is_ok() {
                ok.push(i);
            } else {
                self.report.bad_samples += 1;
            }
        }
        (slots, ok)
    }

    fn score_held_out(&mut self, held: Vec<(Vec<OwnedValue>, f32)>) {
        let (rows, labels): (Vec<_>, Vec<_>) = held.into_iter().unzip();
        let (slots, ok) = self.slots(&rows);
        let idx: Vec<usize> = (0..ok.len()).collect();
        let mut preds = Vec::new();
        self.compute
            .predict(&self.layout, &self.params, &slots, &idx, &mut preds);
        for (p, &i) in preds.into_iter().zip(&ok) {
            self.window.push_back((p, labels[i]));
            self.report.held_out += 1;
        }
        while self.window.len() > self.cfg.online.eval_window.max(1) {
            self.window.pop_front();
        }
    }

    fn rolling(&self) -> (f64, f64) {
        if self.window.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        let (p, l): (Vec<f32>, Vec<f32>) = self.window.iter().copied().unzip();
        let m = evaluate(&p, &l);
        (m.auc, m.logloss)
    }

    fn step(&mut self, batch: Vec<(Vec<OwnedValue>, f32, i64)>, _log: &mut dyn std::io::Write) {
        let mut rows = Vec::with_capacity(batch.len());
        let mut labels_all = Vec::with_capacity(batch.len());
        for (row, label, ts) in batch {
            self.newest_sample_ms = self.newest_sample_ms.max(ts);
            rows.push(row);
            labels_all.push(label);
        }
        let (slots, ok) = self.slots(&rows);
        if ok.is_empty() {
            return;
        }
        let labels: Vec<f32> = ok.iter().map(|&i| labels_all[i]).collect();
        let idx: Vec<usize> = (0..ok.len()).collect();
        self.compute.step(
            &self.layout,
            &self.params,
            &slots,
            &labels,
            &idx,
            &mut self.grads,
        );
        self.opt.apply(&mut self.params, &self.grads);
        for (c, g) in self.emb_changed.iter_mut().zip(&self.grads.emb) {
            g.rows.iter().for_each(|&r| c.add(r));
        }
        for (c, g) in self.wide_changed.iter_mut().zip(&self.grads.wide) {
            g.rows.iter().for_each(|&r| c.add(r));
        }
        self.dense_changed = true;
        self.report.trained += ok.len() as u64;
    }

    /// The delta of everything changed since the last one (rows rounded as their table stores
    /// them), or `None` when nothing changed.
    fn take_delta(&mut self) -> Option<Delta> {
        if !self.dense_changed {
            return None;
        }
        self.dense_changed = false;
        self.sequence += 1;
        let mut d = Delta {
            model: self.name.clone(),
            base_version: self.base_version,
            sequence: self.sequence,
            created_ms: unix_ms(),
            newest_sample_ms: self.newest_sample_ms.max(0) as u64,
            ..Delta::default()
        };
        for (i, (e, c)) in self
            .layout
            .emb
            .iter()
            .zip(&mut self.emb_changed)
            .enumerate()
        {
            let rows = c.take();
            if rows.is_empty() {
                continue;
            }
            let table = &self.params.emb[i];
            let wt = self.config.embeddings[i].weight_type;
            let mut values = Vec::with_capacity(rows.len() * e.dim);
            for &r in &rows {
                let at = r as usize * e.dim;
                let start = values.len();
                values.extend_from_slice(&table[at..at + e.dim]);
                crate::model::round_as_stored(wt, e.dim, &mut values[start..]);
            }
            d.tables.push(RowUpdate {
                kind: TableKind::Embedding,
                index: i as u32,
                dim: e.dim as u32,
                rows,
                values,
            });
        }
        for (i, c) in self.wide_changed.iter_mut().enumerate() {
            let rows = c.take();
            if rows.is_empty() {
                continue;
            }
            let values = rows
                .iter()
                .map(|&r| self.params.wide[i][r as usize])
                .collect();
            d.tables.push(RowUpdate {
                kind: TableKind::Wide,
                index: i as u32,
                dim: 1,
                rows,
                values,
            });
        }
        if self.layout.has_wide {
            d.wide_bias = Some(self.params.wide_bias);
        }
        for (i, &(inp, out)) in self.layout.layers.iter().enumerate() {
            d.layers.push(LayerUpdate {
                index: i as u32,
                out_dim: out as u32,
                in_dim: inp as u32,
                weight: self.params.w[i].clone(),
                bias: self.params.b[i].clone(),
            });
        }
        Some(d)
    }

    fn broker_down(&mut self, e: &str, log: &mut dyn std::io::Write) {
        if self.outage.is_none() {
            self.outage = Some(Instant::now());
            let _ = writeln!(
                log,
                "online: Kafka does not answer ({e}); training goes on, deltas are queued"
            );
        }
    }

    fn broker_back(&mut self, log: &mut dyn std::io::Write) {
        if let Some(t) = self.outage.take() {
            let _ = writeln!(
                log,
                "online: Kafka answers again after {:.1} s; {} queued produce requests to send",
                t.elapsed().as_secs_f64(),
                self.outbox.len()
            );
        }
    }

    /// Sends queued produce requests in order until one fails.
    fn flush(&mut self, log: &mut dyn std::io::Write) {
        while let Some(group) = self.outbox.front() {
            let bytes: usize = group.iter().map(Vec::len).sum();
            match self
                .updates
                .produce(Some(self.name.as_bytes()), group.clone())
            {
                Ok(_) => {
                    self.outbox.pop_front();
                    self.outbox_bytes -= bytes;
                    self.broker_back(log);
                }
                Err(e) => {
                    self.broker_down(&e.to_string(), log);
                    return;
                }
            }
        }
    }

    fn publish(&mut self, log: &mut dyn std::io::Write) -> Result<()> {
        let Some(d) = self.take_delta() else {
            return Ok(());
        };
        let encoded = d.encode();
        let parts = delta::split(
            &encoded,
            d.base_version,
            d.sequence,
            self.cfg.online.max_part_bytes,
        );
        let nparts = parts.len();
        // Produce requests of about a megabyte: under a broker's default message.max.bytes.
        let mut group: Vec<Vec<u8>> = Vec::new();
        let mut bytes = 0;
        for p in parts {
            if !group.is_empty() && bytes + p.len() > 900 << 10 {
                self.outbox.push_back(std::mem::take(&mut group));
                bytes = 0;
            }
            bytes += p.len();
            group.push(p);
        }
        if !group.is_empty() {
            self.outbox.push_back(group);
        }
        self.outbox_bytes += encoded.len() + nparts * delta::PART_HEADER_LEN;
        if self.outbox_bytes > MAX_OUTBOX_BYTES {
            let _ = writeln!(
                log,
                "online: {} bytes of deltas queued through the outage: dropped; replicas wait for the next snapshot{}",
                self.outbox_bytes,
                if self.cfg.online.snapshot_dir.is_some() {
                    ", written now"
                } else {
                    " (no snapshot_dir: none will come)"
                }
            );
            self.outbox.clear();
            self.outbox_bytes = 0;
            self.dropped_deltas = true;
        }
        self.flush(log);
        self.report.deltas += 1;
        let (auc, logloss) = self.rolling();
        let _ = writeln!(
            log,
            "online: delta {} on version {}: {} rows, {} layers, {} bytes in {nparts} parts; {} samples trained, {} held back (rolling auc {auc:.4} logloss {logloss:.4})",
            d.sequence,
            d.base_version,
            d.changed_rows(),
            d.layers.len(),
            encoded.len(),
            self.report.trained,
            self.report.held_out,
        );
        Ok(())
    }

    /// Writes the current parameters as a new version in `dir` and makes it the base of the
    /// deltas that follow (what changed before it is in the file).
    fn snapshot(&mut self, dir: &Path, log: &mut dyn std::io::Write) -> Result<()> {
        // Changes not yet published go into the file, not into a delta.
        let _ = self.take_delta();
        let hdfs = self.cfg.train.hdfs();
        let on_disk = newest_version(dir, &hdfs).map(|(v, _)| v).unwrap_or(0);
        let version = self.base_version.max(on_disk) + 1;
        let local = tempfile::tempdir().map_err(|e| TrainError::Data(e.to_string()))?;
        let file = local.path().join("model.rkm");
        self.write_model(&file, version)?;
        let dest = place_version(dir, version, &file, &hdfs)?;
        let _ = writeln!(
            log,
            "online: snapshot version {version} written to {dest} (deltas now refer to it)"
        );
        self.base_version = version;
        self.sequence = 0;
        self.report.snapshots.push(version);
        Ok(())
    }

    fn write_model(&self, path: &Path, version: u64) -> Result<()> {
        let meta = Metadata {
            name: self.name.clone(),
            version,
            producer: format!("rankd-train online {}", env!("CARGO_PKG_VERSION")),
            ..Metadata::default()
        };
        rankd_formats::config::write_model(
            &self.config,
            meta,
            &self.params.tensors(&self.layout),
            path,
        )
        .map_err(|e| TrainError::Data(e.to_string()))?;
        Ok(())
    }
}

/// Puts the model file `local` into `dir` (local or `hdfs://`) as `VERSION/model.rkm`: into a
/// hidden directory first, which is then renamed, so that a daemon never sees a partial version.
/// Returns the version directory.
pub fn place_version(
    dir: &Path,
    version: u64,
    local: &Path,
    hdfs: &rankd_storage::HdfsSettings,
) -> Result<String> {
    let err = |e: String| TrainError::Data(format!("{}: {e}", dir.display()));
    let hidden = format!(".online-{version}.partial");
    match rankd_storage::Location::from_path(dir).map_err(|e| err(e.to_string()))? {
        rankd_storage::Location::Hdfs(h) => {
            let client = rankd_storage::Hdfs::for_path(&h, hdfs).map_err(|e| err(e.to_string()))?;
            let tmp = h.join(&hidden);
            let _ = client.delete(&tmp.path, true);
            client.mkdirs(&tmp.path).map_err(|e| err(e.to_string()))?;
            let mut f = std::fs::File::open(local).map_err(|e| err(e.to_string()))?;
            client
                .upload(&mut f, &tmp.join("model.rkm").path, true)
                .map_err(|e| err(e.to_string()))?;
            let dest = h.join(&version.to_string());
            client
                .rename(&tmp.path, &dest.path, false)
                .map_err(|e| err(e.to_string()))?;
            Ok(dest.url())
        }
        rankd_storage::Location::Local(_) => {
            let tmp = dir.join(&hidden);
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| err(e.to_string()))?;
            std::fs::copy(local, tmp.join("model.rkm")).map_err(|e| err(e.to_string()))?;
            let dest = dir.join(version.to_string());
            std::fs::rename(&tmp, &dest).map_err(|e| err(e.to_string()))?;
            Ok(dest.display().to_string())
        }
    }
}

fn parse_label(text: &str) -> std::result::Result<f32, String> {
    match text.trim() {
        "0" | "0.0" | "false" => Ok(0.0),
        "1" | "1.0" | "true" => Ok(1.0),
        other => Err(format!("label {other:?} is not 0 or 1")),
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_file_reads_back_as_the_config_and_parameters_that_write_it_again() {
        use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
        let dir = tempfile::tempdir().unwrap();
        for kind in [ModelKind::Wide, ModelKind::WideDeep, ModelKind::DeepFm] {
            let a = dir.path().join(format!("{kind:?}-a.rkm"));
            write_synthetic(
                &a,
                &SynthOptions {
                    kind,
                    ..SynthOptions::default()
                },
            )
            .unwrap();
            let file = ModelFile::open(&a).unwrap();
            let config = model_config_of(&file).unwrap();
            let layout = Layout::new(&config, file.compiled()).unwrap();
            let params = params_of(&file, &layout);
            let b = dir.path().join(format!("{kind:?}-b.rkm"));
            rankd_formats::config::write_model(
                &config,
                file.spec().metadata.clone(),
                &params.tensors(&layout),
                &b,
            )
            .unwrap();
            let again = ModelFile::open(&b).unwrap();
            // The same spec and every blob equal: the file the trainer would write is the one
            // it started from.
            assert_eq!(again.spec().features, file.spec().features, "{kind:?}");
            let blobs = |f: &ModelFile| -> Vec<Vec<f32>> {
                let arch = &f.spec().architecture;
                let mut v: Vec<Vec<f32>> = arch
                    .embeddings
                    .iter()
                    .map(|e| f.weights(e.weights).to_vec())
                    .collect();
                v.extend(
                    arch.deep
                        .iter()
                        .flat_map(|l| [f.weights(l.weight).to_vec(), f.weights(l.bias).to_vec()]),
                );
                if let Some(w) = &arch.wide {
                    v.extend(w.slots.iter().map(|s| f.weights(s.weights).to_vec()));
                    v.push(vec![w.bias]);
                }
                v
            };
            assert_eq!(blobs(&again), blobs(&file), "{kind:?}");
        }
    }

    #[test]
    fn config_errors_say_what_is_wrong() {
        let ok = "[train]\ntrain_files = []\n[online]\nsamples = \"kafka://a:1/s\"\n";
        assert!(OnlineConfig::from_toml(ok).is_ok());
        for (text, want) in [
            ("[train]\ntrain_files = []\n", "no [online]"),
            (&format!("{ok}holdout = 1.5\n"), "holdout"),
            (&format!("{ok}start = \"middle\"\n"), "earliest or latest"),
            (
                &format!("{ok}publish_interval_ms = 0\n"),
                "publish_interval_ms",
            ),
            (&format!("{ok}colums = []\n"), "unknown field"),
        ] {
            let e = OnlineConfig::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn models_online_training_cannot_carry_are_refused_saying_why() {
        // The bundled multi-task Adult model: its experts and heads are not in deltas yet.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/models/adult-multitask/1/model.rkm");
        let file = ModelFile::open(&path).unwrap();
        let e = model_config_of(&file).unwrap_err().to_string();
        assert!(
            e.contains("a mmoe model") && e.contains("no cross layers, experts or heads"),
            "{e}"
        );
    }

    #[test]
    fn versions_are_placed_whole_locally_and_on_a_real_hdfs() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.rkm");
        rankd_formats::synth::write_synthetic(&file, &Default::default()).unwrap();
        let hdfs = rankd_storage::HdfsSettings::default();
        let local_root = dir.path().join("m");
        std::fs::create_dir_all(&local_root).unwrap();
        assert!(newest_version(&local_root, &hdfs).is_err());
        place_version(&local_root, 3, &file, &hdfs).unwrap();
        place_version(&local_root, 12, &file, &hdfs).unwrap();
        let (v, p) = newest_version(&local_root, &hdfs).unwrap();
        assert_eq!((v, p), (12, local_root.join("12/model.rkm")));
        // Nothing hidden is left behind.
        let names: Vec<_> = std::fs::read_dir(&local_root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");

        let Some(cluster) = rankd_storage::testing::cluster() else {
            return;
        };
        let root = PathBuf::from(cluster.unique_dir("online-versions"));
        place_version(&root, 4, &file, &hdfs).unwrap();
        place_version(&root, 9, &file, &hdfs).unwrap();
        let (v, p) = newest_version(&root, &hdfs).unwrap();
        assert_eq!(v, 9);
        let back = dir.path().join("back.rkm");
        rankd_storage::get_file(&p, &back, &hdfs).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&file).unwrap());
    }

    #[test]
    fn deltas_stay_in_sequence_through_a_broker_outage() {
        use rankd_storage::kafka::testing;
        let Some(broker) = testing::private_broker() else {
            return;
        };
        let Some(pid) = broker.pid() else {
            panic!("a private broker has a pid");
        };
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.rkm");
        rankd_formats::synth::write_synthetic(
            &base,
            &rankd_formats::synth::SynthOptions {
                kind: rankd_formats::synth::ModelKind::WideDeep,
                ..Default::default()
            },
        )
        .unwrap();
        let samples_url = broker.url("samples");
        let updates_url = broker.url("updates");
        let timeout = Duration::from_secs(20);
        let samples = Topic::connect(&samples_url.parse().unwrap(), true, timeout).unwrap();
        let n = 1500u64;
        let sample = |i: u64| {
            format!(
                r#"{{"user_age": {}, "user_city": "c{}", "hour": {}, "item_id": {}, "item_tags": ["t{}"], "item_price": 1.5, "label": {}}}"#,
                20 + i % 40,
                i % 5,
                i % 24,
                i % 300,
                i % 7,
                i.is_multiple_of(3)
            )
            .into_bytes()
        };
        let producer = std::thread::spawn(move || {
            for chunk in (0..n).collect::<Vec<_>>().chunks(50) {
                samples
                    .produce(None, chunk.iter().map(|&i| sample(i)).collect())
                    .unwrap();
                std::thread::sleep(Duration::from_millis(40));
            }
        });
        let cfg = OnlineConfig::from_toml(&format!(
            "[train]\ntrain_files = []\nbatch_size = 32\n[online]\nsamples = \"{samples_url}\"\nupdates = \"{updates_url}\"\nbase = \"{}\"\npublish_interval_ms = 100\nmax_batch_wait_ms = 20\nkafka_timeout_ms = 1000\n",
            base.display()
        ))
        .unwrap();
        // The broker pauses for three seconds in the middle of the run.
        let pauser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            let signal = |s: &str| {
                std::process::Command::new("kill")
                    .args([s, &pid.to_string()])
                    .status()
                    .unwrap()
            };
            assert!(signal("-STOP").success());
            std::thread::sleep(Duration::from_secs(3));
            assert!(signal("-CONT").success());
        });
        let mut log = Vec::new();
        let report = run(
            &cfg,
            &AtomicBool::new(false),
            Limits {
                max_samples: Some(n),
                export: None,
            },
            &mut log,
        )
        .unwrap();
        pauser.join().unwrap();
        producer.join().unwrap();
        let log = String::from_utf8(log).unwrap();
        assert!(log.contains("Kafka does not answer"), "{log}");
        assert!(log.contains("Kafka answers again"), "{log}");
        assert_eq!(report.trained + report.held_out, n, "{report:?}");
        // Every delta is in the topic, whole and in sequence.
        let updates = Topic::connect(&updates_url.parse().unwrap(), false, timeout).unwrap();
        let mut assembler = delta::Assembler::new(1 << 30);
        let mut sequences = Vec::new();
        let mut offset = 0;
        loop {
            let (messages, high) = updates.fetch(offset, Duration::from_millis(100)).unwrap();
            for m in &messages {
                offset = m.offset + 1;
                for outcome in assembler.push(&m.value) {
                    let (_, bytes) = outcome.unwrap();
                    sequences.push(Delta::decode(&bytes).unwrap().sequence);
                }
            }
            if offset >= high {
                break;
            }
        }
        // At least once: a produce request the client gave up on may have reached the broker
        // before it was sent again; a replica skips the copy (its sequence number is applied).
        let mut unique = sequences.clone();
        unique.dedup();
        let want: Vec<u64> = (1..=report.sequence).collect();
        assert_eq!(unique, want, "{sequences:?}\n{log}");
        assert!(report.deltas >= 5, "{report:?}");
    }

    #[test]
    fn changed_rows_come_out_once_and_sorted() {
        let mut c = Changed::new(200);
        for r in [150, 3, 150, 64, 3, 199] {
            c.add(r);
        }
        assert_eq!(c.take(), [3, 64, 150, 199]);
        assert!(c.take().is_empty());
        c.add(3);
        assert_eq!(c.take(), [3]);
    }

    #[test]
    fn the_held_back_fraction_is_close_to_the_setting() {
        let n = 100_000;
        let held = (0..n).filter(|&o| is_held_out(o, 0.05)).count();
        assert!((4_500..5_500).contains(&held), "{held}");
        assert_eq!((0..n).filter(|&o| is_held_out(o, 0.0)).count(), 0);
    }
}
