//! The trainer's config: a model config (`rankd_formats::config::ModelConfig`, the same TOML
//! `rankd-tool import` reads) plus a `[train]` table.

use std::path::PathBuf;

use rankd_formats::config::ModelConfig;
use serde::Deserialize;

use crate::error::{Result, TrainError};

/// Training settings (`[train]`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSettings {
    /// Training data files (CSV with a header).
    pub train_files: Vec<PathBuf>,
    /// Validation data files: evaluated after every epoch; early stopping and the kept epoch
    /// are decided on them. `valid_files` in the config (`eval_files` is the older name of the
    /// same setting; giving both is an error).
    #[serde(default, alias = "valid_files")]
    pub eval_files: Vec<PathBuf>,
    /// Without validation files: hold out this fraction of the training rows for validation
    /// (chosen by a hash of the row number and the seed, so every process agrees).
    /// `valid_split` in the config (`eval_split` is the older name).
    #[serde(default, alias = "valid_split")]
    pub eval_split: Option<f64>,
    /// Test data files: evaluated once, with the weights that are written, for the reported
    /// metrics (`test_*` in the model file). Never used to choose an epoch.
    #[serde(default)]
    pub test_files: Vec<PathBuf>,
    /// What early stopping and the kept epoch go by: `auc` (higher is better) or `logloss`.
    #[serde(default)]
    pub early_stopping_metric: StopMetric,
    /// The label column (0/1).
    #[serde(default = "default_label")]
    pub label: String,
    /// A multi-task model's label columns, one per head in head order (from `[[heads]]`);
    /// empty for a single-task model, whose label is `label`.
    #[serde(skip)]
    pub heads: Vec<LabelColumn>,
    /// Field delimiter.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Values that mean "missing" besides the empty cell.
    #[serde(default = "default_missing")]
    pub missing: Vec<String>,
    /// Separator of list values inside a cell.
    #[serde(default = "default_list_separator")]
    pub list_separator: char,
    /// Passes over the training data.
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Examples per step.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    /// Adam learning rate of the dense layers.
    #[serde(default = "default_lr_dense")]
    pub lr_dense: f32,
    /// Adagrad learning rate of embeddings and wide weights.
    #[serde(default = "default_lr_sparse")]
    pub lr_sparse: f32,
    /// Linear learning-rate warm-up over this many steps (0: none).
    #[serde(default)]
    pub warmup_steps: u32,
    /// Multiply both learning rates by this every `lr_decay_steps` steps (1: no decay).
    #[serde(default = "no_decay")]
    pub lr_decay: f32,
    /// See `lr_decay`.
    #[serde(default = "decay_steps")]
    pub lr_decay_steps: u32,
    /// L2 penalty on the weights a step touches.
    #[serde(default)]
    pub l2: f32,
    /// Dropout on the hidden layers' outputs in training (0 = off; inverted, so the served
    /// model is unchanged).
    #[serde(default)]
    pub dropout: f32,
    /// Batch normalization of the hidden layers' pre-activations in training, folded into the
    /// layers' weights and biases when the model is written (no cost at serving).
    #[serde(default)]
    pub batch_norm: bool,
    /// Seed of the initialization and the shuffling.
    #[serde(default)]
    pub seed: u64,
    /// Stop after this many epochs without a better validation metric, and keep the best
    /// epoch's weights (0: never stop early; the last epoch's weights are kept).
    #[serde(default)]
    pub early_stopping: usize,
    /// Model name written into the file.
    #[serde(default = "default_name")]
    pub name: String,
    /// Model version written into the file.
    #[serde(default = "default_version")]
    pub version: u64,
    /// Output model file (overridden by `--output`).
    #[serde(default)]
    pub output: Option<PathBuf>,
    /// Data-parallel workers (threads); 1: a single worker.
    #[serde(default = "one_worker")]
    pub workers: usize,
    /// Where to train: `auto` (every visible GPU when CUDA loads and the model is one the GPU
    /// trainer computes, else the CPU, saying why), `cpu`, `cuda` (every GPU, or fail),
    /// `cuda:0,1` (those GPUs) or `emulated:N` (N emulated devices on the host, for tests).
    #[serde(default = "default_device")]
    pub device: String,
    /// `sync` (gradients of every worker combined per step; deterministic for a given seed and
    /// worker count) or `async` (each worker applies its own gradients as it goes).
    #[serde(default)]
    pub mode: Mode,
    /// Shards of the parameter server: dense tensors by name, embedding and wide rows by id
    /// range, each updated by its own thread.
    #[serde(default = "one_worker")]
    pub ps_shards: usize,
    /// Worker processes: rows of the bounded shuffle buffer each worker streams its share
    /// through (memory: about this many parsed rows). A share that fits is shuffled exactly as
    /// one process shuffles; a larger one is mixed within windows of this many rows.
    #[serde(default = "default_shuffle_buffer")]
    pub shuffle_buffer: usize,
    /// Worker processes: the chief fits the slots on a uniform sample of at most this many
    /// training rows (all of them when there are fewer).
    #[serde(default = "default_fit_sample")]
    pub fit_sample_rows: usize,
    /// Slots whose vocabulary or boundaries are computed from the training data.
    #[serde(default)]
    pub fit: Vec<crate::fit::FitRule>,
    /// Write a checkpoint every this many epochs (0: never).
    #[serde(default = "one_worker")]
    pub checkpoint_every: usize,
    /// Where checkpoints go (default: `<output>.ckpt`).
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    /// Hadoop client settings for `hdfs://` paths (HA nameservices and the like), over those of
    /// `HADOOP_CONF_DIR`.
    #[serde(default)]
    pub hdfs_config: std::collections::BTreeMap<String, String>,
    /// Deadline of each HDFS call and of each chunk read or written, in milliseconds.
    #[serde(default = "default_hdfs_timeout")]
    pub hdfs_timeout_ms: u64,
}

fn default_device() -> String {
    "auto".into()
}

fn default_shuffle_buffer() -> usize {
    100_000
}

fn default_fit_sample() -> usize {
    1_000_000
}

fn default_hdfs_timeout() -> u64 {
    30_000
}

impl TrainSettings {
    /// The HDFS client settings of `hdfs://` paths.
    pub fn hdfs(&self) -> rankd_storage::HdfsSettings {
        rankd_storage::HdfsSettings {
            timeout: std::time::Duration::from_millis(self.hdfs_timeout_ms),
            config: self.hdfs_config.clone(),
        }
    }
}

impl TrainSettings {
    /// The defaults of every setting, with no training files: the CSV reader's settings for
    /// scoring a file with a model.
    pub fn defaults() -> TrainSettings {
        toml::from_str("train_files = []").expect("every other setting has a default")
    }
}

/// The validation metric early stopping goes by.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopMetric {
    /// Area under the ROC curve: higher is better.
    #[default]
    Auc,
    /// Log loss: lower is better.
    Logloss,
}

impl StopMetric {
    /// The metric as a score where higher is better.
    pub fn score(self, m: &crate::metrics::EvalMetrics) -> f64 {
        match self {
            StopMetric::Auc => m.auc,
            StopMetric::Logloss => -m.logloss,
        }
    }

    /// The config name.
    pub fn as_str(self) -> &'static str {
        match self {
            StopMetric::Auc => "auc",
            StopMetric::Logloss => "logloss",
        }
    }
}

/// How workers combine their gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One combined update per step.
    #[default]
    Sync,
    /// Each worker updates the shared parameters on its own.
    Async,
}

fn no_decay() -> f32 {
    1.0
}
fn decay_steps() -> u32 {
    1000
}

fn one_worker() -> usize {
    1
}

/// Where a head's label comes from: a column holding 0 or 1, or with `threshold`, a numeric
/// column read as `value > threshold`.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelColumn {
    /// The column's name.
    pub column: String,
    /// See above.
    pub threshold: Option<f64>,
}

fn default_label() -> String {
    "label".into()
}
fn default_delimiter() -> char {
    ','
}
fn default_missing() -> Vec<String> {
    vec!["?".into(), "NA".into()]
}
fn default_list_separator() -> char {
    '|'
}
fn default_epochs() -> usize {
    5
}
fn default_batch() -> usize {
    256
}
fn default_lr_dense() -> f32 {
    1e-3
}
fn default_lr_sparse() -> f32 {
    0.05
}
fn default_name() -> String {
    "model".into()
}
fn default_version() -> u64 {
    1
}

/// The whole training config.
#[derive(Clone, Debug)]
pub struct TrainConfig {
    /// The model.
    pub model: ModelConfig,
    /// The training settings.
    pub train: TrainSettings,
}

/// Whether `name` matches `pattern` (`*`: any run of characters, `?`: any one character).
fn wildcard(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.first(), name.first()) {
        (None, None) => true,
        (Some(b'*'), _) => {
            wildcard(&pattern[1..], name) || (!name.is_empty() && wildcard(pattern, &name[1..]))
        }
        (Some(b'?'), Some(_)) => wildcard(&pattern[1..], &name[1..]),
        (Some(p), Some(n)) if p == n => wildcard(&pattern[1..], &name[1..]),
        _ => false,
    }
}

/// Resolves paths against `base` and expands globs in their file names (sorted). `hdfs://`
/// paths are expanded on HDFS (its glob syntax: `*`, `?`, `[...]`, `{a,b}`).
fn expand(
    paths: &[PathBuf],
    base: &std::path::Path,
    hdfs: &rankd_storage::HdfsSettings,
) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        match rankd_storage::Location::from_path(p)
            .map_err(|e| TrainError::Config(e.to_string()))?
        {
            rankd_storage::Location::Hdfs(h) => {
                if h.path.contains(['*', '?', '[', '{']) {
                    let urls = rankd_storage::glob_urls(&h, hdfs)
                        .map_err(|e| TrainError::Config(e.to_string()))?;
                    out.extend(urls.into_iter().map(PathBuf::from));
                } else {
                    out.push(p.clone());
                }
                continue;
            }
            rankd_storage::Location::Local(_) => {}
        }
        let p = if p.is_relative() {
            base.join(p)
        } else {
            p.clone()
        };
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains(['*', '?']) {
            out.push(p);
            continue;
        }
        let dir = p.parent().unwrap_or(std::path::Path::new("."));
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| TrainError::Config(format!("{}: {e}", dir.display())))?
            .flatten()
            .filter(|e| wildcard(name.as_bytes(), e.file_name().to_string_lossy().as_bytes()))
            .map(|e| e.path())
            .collect();
        if found.is_empty() {
            return Err(TrainError::Config(format!(
                "{} matches no file",
                p.display()
            )));
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

#[derive(Deserialize)]
struct TrainOnly {
    train: TrainSettings,
}

impl TrainConfig {
    /// The optimizer these settings describe.
    pub fn optimizer(&self, params: &crate::model::Params) -> crate::model::Optimizer {
        let s = &self.train;
        crate::model::Optimizer::new(params, s.lr_dense, s.lr_sparse, s.l2)
            .with_schedule(s.warmup_steps, s.lr_decay, s.lr_decay_steps)
            .with_shards(s.ps_shards)
    }

    /// Parses a config; relative data paths are taken from `base` (the config's directory).
    pub fn from_toml(text: &str, base: &std::path::Path) -> Result<TrainConfig> {
        let model = ModelConfig::from_toml(text, &["train"])?;
        let table: toml::Table =
            toml::from_str(text).map_err(|e| TrainError::Config(e.to_string()))?;
        let mut only = toml::Table::new();
        if let Some(t) = table.get("train") {
            only.insert("train".into(), t.clone());
        } else {
            return Err(TrainError::Config("the config has no [train] table".into()));
        }
        if let Some(toml::Value::Table(t)) = table.get("train") {
            for (new, old) in [("valid_files", "eval_files"), ("valid_split", "eval_split")] {
                if t.contains_key(new) && t.contains_key(old) {
                    return Err(TrainError::Config(format!(
                        "[train] gives both {new} and {old}, two names of one setting; keep {new}"
                    )));
                }
            }
        }
        let TrainOnly { mut train } = toml::Value::Table(only)
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Config(e.to_string()))?;
        let hdfs = train.hdfs();
        train.train_files = expand(&train.train_files, base, &hdfs)?;
        train.eval_files = expand(&train.eval_files, base, &hdfs)?;
        train.test_files = expand(&train.test_files, base, &hdfs)?;
        for p in train.output.iter().chain(&train.checkpoint) {
            rankd_storage::Location::from_path(p).map_err(|e| TrainError::Config(e.to_string()))?;
        }
        if let Some(f) = train.eval_split {
            if !(f > 0.0 && f < 1.0) {
                return Err(TrainError::Config(format!(
                    "valid_split {f} must be between 0 and 1"
                )));
            }
            if !train.eval_files.is_empty() {
                return Err(TrainError::Config(
                    "give valid_files or valid_split, not both".into(),
                ));
            }
        }
        train.heads = model
            .heads
            .iter()
            .map(|h| LabelColumn {
                column: h.label.clone().unwrap_or_else(|| h.name.clone()),
                threshold: h.threshold,
            })
            .collect();
        if !train.heads.is_empty() && (train.batch_norm || train.dropout > 0.0) {
            return Err(TrainError::Config(
                "batch_norm and dropout apply to a single-task deep tower; a model with \
                 [[heads]] trains without them"
                    .into(),
            ));
        }
        if !(0.0..0.95).contains(&train.dropout) {
            return Err(TrainError::Config(format!(
                "dropout {} must be in [0, 0.95)",
                train.dropout
            )));
        }
        if train.batch_size == 0 || train.epochs == 0 {
            return Err(TrainError::Config(
                "batch_size and epochs must be at least 1".into(),
            ));
        }
        Ok(TrainConfig { model, train })
    }
}

#[cfg(test)]
mod tests {
    use super::wildcard;

    #[test]
    fn wildcards() {
        assert!(wildcard(b"part-*.csv", b"part-00001.csv"));
        assert!(wildcard(b"*", b""));
        assert!(wildcard(b"a?c", b"abc"));
        assert!(!wildcard(b"a?c", b"ac"));
        assert!(!wildcard(b"*.csv", b"data.tsv"));
        assert!(wildcard(b"*a*b*", b"xxaxxbxx"));
    }
}
