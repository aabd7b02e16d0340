//! `rankd-train`: trains wide, deep, wide & deep and DeepFM models from CSV data with the very
//! feature spec and model math the daemon serves, and writes the model file `rankd` loads.
//!
//! Workers ([`model::CpuCompute`] behind the [`model::Compute`] trait) run as threads of one
//! process, synchronously or asynchronously ([`parallel`]), or as processes talking to a
//! parameter server over TCP ([`dist`]); on GPUs, one worker per GPU in one process or one GPU
//! per worker process ([`gpu`], `[train] device`).
// Unsafe only in `gpu::cuda` (kernel launches, cuBLAS, NCCL), which allows it.
#![deny(unsafe_code)]

pub mod checkpoint;
pub mod cluster;
pub mod config;
pub mod data;
pub mod dist;
mod error;
pub mod fit;
pub mod gpu;
pub mod metrics;
pub mod model;
pub mod online;
pub mod parallel;

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use rankd_feature_ops::CompiledSpec;
use rankd_formats::config::write_model;
use rankd_formats::synth::Rng;
use rankd_formats::Metadata;

pub use config::TrainConfig;
pub use error::{Result, TrainError};
use metrics::{evaluate_heads, EvalMetrics};
use model::{Compute, CpuCompute, Grads, Layout, Params};

/// What a training run produced.
#[derive(Debug)]
pub struct Trained {
    /// Final parameters.
    pub params: Params,
    /// The layout.
    pub layout: Layout,
    /// Validation metrics after each epoch.
    pub history: Vec<EvalMetrics>,
    /// The epoch whose weights were kept (0-based, counting the epochs of a resumed run): the
    /// best one by `early_stopping_metric` with early stopping on, else the last.
    pub kept_epoch: usize,
    /// Validation predictions of the kept weights, in row order.
    pub eval_predictions: Vec<f32>,
    /// The validation data.
    pub eval: data::Dataset,
    /// Metrics of the kept weights on `test_files`, when given (a multi-task model: its
    /// default head's).
    pub test: Option<EvalMetrics>,
    /// A multi-task model's test metrics, head by head (empty for a single-task model or
    /// without `test_files`).
    pub test_heads: Vec<EvalMetrics>,
    /// Training examples per second over the run.
    pub samples_per_second: f64,
    /// The model config with fitted vocabularies and boundaries: what the model file holds.
    pub model: rankd_formats::config::ModelConfig,
    /// Epochs run by the run this one resumed (0 without `--resume`).
    pub epochs_before: usize,
}

impl Trained {
    /// Epochs run, counting those of a run this one resumed.
    pub fn epochs_run(&self) -> usize {
        self.epochs_before + self.history.len()
    }

    /// Validation metrics of the kept weights (a multi-task model: its default head's).
    pub fn kept(&self) -> EvalMetrics {
        self.kept_heads()[0]
    }

    /// Validation metrics of the kept weights, head by head (one for a single-task model).
    pub fn kept_heads(&self) -> Vec<EvalMetrics> {
        evaluate_heads(
            &self.eval_predictions,
            &self.eval.labels,
            self.layout.heads(),
        )
    }
}

/// Trains per `config`; progress goes to `log`.
pub fn train(config: &TrainConfig, log: &mut dyn std::io::Write) -> Result<Trained> {
    train_from(config, None, log)
}

/// Like [`train`], writing a checkpoint every `checkpoint_every` epochs to `checkpoint`, and
/// first resuming from it when `resume` is true and it exists.
pub fn train_from(
    config: &TrainConfig,
    checkpoint: Option<(&Path, bool)>,
    log: &mut dyn std::io::Write,
) -> Result<Trained> {
    train_with(config, checkpoint, log)
}

/// The training data, the model config with fitted slots, and the network layout: what the
/// server and every worker compute identically from the same config and files.
pub fn prepare(config: &TrainConfig, log: &mut dyn std::io::Write) -> Result<Prepared> {
    let s = &config.train;
    let mut fitted = config.model.clone();
    let mut raw = data::read(&s.train_files, &fitted.features, s)?;
    // A held-out split, chosen by a hash of the row number and the seed.
    let mut held_out = None;
    if let (Some(frac), true) = (s.eval_split, s.eval_files.is_empty()) {
        let threshold = (frac * u64::MAX as f64) as u64;
        let mut train = data::RawData::default();
        let mut eval = data::RawData::default();
        let heads = s.heads.len().max(1);
        let rows = raw.rows.into_iter().zip(raw.labels.chunks_exact(heads));
        for (i, (row, labels)) in rows.enumerate() {
            let h = Rng::new(s.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)).next_u64();
            let part = if h < threshold { &mut eval } else { &mut train };
            part.rows.push(row);
            part.labels.extend_from_slice(labels);
        }
        if train.rows.is_empty() || eval.rows.is_empty() {
            return Err(TrainError::Config(
                "eval_split leaves no training or no eval rows".into(),
            ));
        }
        raw = train;
        held_out = Some(eval);
    }
    if !s.fit.is_empty() {
        fit::fit(&mut fitted, &s.fit, &raw)?;
        let _ = writeln!(
            log,
            "fitted {} slots from {} rows",
            s.fit.len(),
            raw.rows.len()
        );
    }
    let spec = CompiledSpec::compile(&fitted.feature_spec())?;
    let train = data::transform(raw, &spec)?;
    let mut layout = Layout::new(&fitted, &spec)?;
    layout.batch_norm = s.batch_norm;
    layout.dropout = s.dropout;
    Ok(Prepared {
        model: fitted,
        spec,
        train,
        layout,
        held_out,
    })
}

/// What [`prepare`] computes.
#[derive(Debug)]
pub struct Prepared {
    /// The model config with fitted slots.
    pub model: rankd_formats::config::ModelConfig,
    /// Its compiled feature spec.
    pub spec: CompiledSpec,
    /// The training examples.
    pub train: data::Dataset,
    /// The network layout.
    pub layout: Layout,
    /// Rows held out by `eval_split`, not yet transformed.
    pub held_out: Option<data::RawData>,
}

fn train_with(
    config: &TrainConfig,
    checkpoint: Option<(&Path, bool)>,
    log: &mut dyn std::io::Write,
) -> Result<Trained> {
    let s = &config.train;
    gpu::precheck(s)?;
    let Prepared {
        model: fitted,
        spec,
        train,
        layout,
        held_out,
    } = prepare(config, log)?;
    let eval = match held_out {
        Some(raw) => data::transform(raw, &spec)?,
        None if s.eval_files.is_empty() => data::load(&s.train_files, &spec, s)?,
        None => data::load(&s.eval_files, &spec, s)?,
    };
    let heads = layout.heads();
    // Each head's base rate over the rows that have its label.
    let rates: Vec<f32> = (0..heads)
        .map(|h| {
            let y: Vec<f32> = metrics::head_of(&train.labels, heads, h)
                .into_iter()
                .filter(|y| !y.is_nan())
                .collect();
            y.iter().sum::<f32>() / y.len().max(1) as f32
        })
        .collect();
    let mut params = Params::init(&layout, s.seed, rates[0]);
    model::set_base_rates(&layout, &mut params, &rates);
    let head_names: Vec<String> = layout.mt.as_ref().map_or(Vec::new(), |m| m.heads.clone());
    let mut opt = config.optimizer(&params).with_layout(&layout);
    let mut compute = CpuCompute::with_seed(s.seed);
    let mut grads = Grads::new(&layout);
    let mut workers_state: Vec<(CpuCompute, Grads)> = (0..s.workers.max(1))
        .map(|w| {
            (
                CpuCompute::with_seed(s.seed.wrapping_add(w as u64)),
                Grads::new(&layout),
            )
        })
        .collect();
    let mut order: Vec<usize> = (0..train.rows.len()).collect();
    let eval_rows: Vec<usize> = (0..eval.rows.len()).collect();
    let mut history = Vec::new();
    let metric = s.early_stopping_metric;
    let mut best = (f64::NEG_INFINITY, params.clone(), 0usize);
    let mut trained = 0usize;
    let mut busy = 0f64;
    let mut preds = Vec::new();
    let mut first_epoch = 0;
    if let Some((path, true)) = checkpoint {
        if let Some(pos) = checkpoint::load_at(path, &mut params, &mut opt, &s.hdfs())? {
            opt.sync_step();
            first_epoch = pos.epochs_done as usize;
            best = (pos.best_auc, params.clone(), pos.best_epoch as usize);
            let _ = writeln!(
                log,
                "resumed from {} after epoch {first_epoch}",
                path.display()
            );
        }
    }
    // GPUs (or emulated devices) when the config asks for them and the model is one they
    // train; the dense state goes to them after a resume has loaded it.
    let mut gpus = gpu::start(s, &layout, &params, &mut opt, log)?;
    for epoch in first_epoch..s.epochs {
        // Each epoch's order depends only on the seed and the epoch, so a resumed run shuffles
        // exactly as an uninterrupted one, and a worker process streaming the whole data set
        // through a large enough shuffle buffer (`data::Shuffle`) sees the same order.
        for (i, o) in order.iter_mut().enumerate() {
            *o = i;
        }
        data::shuffle(&mut order, &mut data::epoch_rng(s.seed, 0, epoch));
        let start = Instant::now();
        let done = AtomicUsize::new(0);
        let finished = AtomicBool::new(false);
        let total = order.len();
        let loss = std::thread::scope(|scope| -> Result<f64> {
            // A progress line on a terminal: percent of the epoch and samples per second.
            if std::io::stderr().is_terminal() {
                let (done, finished) = (&done, &finished);
                scope.spawn(move || {
                    while !finished.load(Ordering::Relaxed) {
                        std::thread::sleep(std::time::Duration::from_millis(200));
                        let n = done.load(Ordering::Relaxed);
                        eprint!(
                            "\repoch {}: {:>3}% {:>9.0} samples/s",
                            epoch + 1,
                            100 * n / total.max(1),
                            n as f64 / start.elapsed().as_secs_f64()
                        );
                    }
                    eprint!("\r{:60}\r", "");
                });
            }
            let loss = match (s.workers.max(1), s.mode) {
                _ if gpus.is_some() => {
                    let g = gpus.as_mut().expect("checked");
                    let loss = g.epoch(
                        &layout,
                        &mut params,
                        &mut opt,
                        &train,
                        &order,
                        s.batch_size,
                        &done,
                    );
                    // The dense layers come back for evaluation, checkpoints and the file.
                    let stored = g.store(&mut params, &mut opt);
                    finished.store(true, Ordering::Relaxed);
                    stored?;
                    return loss;
                }
                (1, _) => {
                    let mut loss = 0f64;
                    for batch in order.chunks(s.batch_size) {
                        loss += compute.step(
                            &layout,
                            &params,
                            &train.slots,
                            &train.labels,
                            batch,
                            &mut grads,
                        );
                        opt.apply(&mut params, &grads);
                        done.fetch_add(batch.len(), Ordering::Relaxed);
                    }
                    loss
                }
                (k, config::Mode::Sync) => parallel::sync_epoch(
                    &layout,
                    &mut params,
                    &mut opt,
                    &train,
                    &order,
                    s.batch_size,
                    &mut workers_state,
                    k,
                    &done,
                ),
                (k, config::Mode::Async) => parallel::async_epoch(
                    &layout,
                    &mut params,
                    &mut opt,
                    &train,
                    &order,
                    s.batch_size,
                    k,
                    &done,
                ),
            };
            finished.store(true, Ordering::Relaxed);
            Ok(loss)
        })?;
        let secs = start.elapsed().as_secs_f64();
        busy += secs;
        trained += order.len();
        preds.clear();
        for chunk in eval_rows.chunks(4096) {
            compute.predict(&layout, &params, &eval.slots, chunk, &mut preds);
        }
        let per_head = evaluate_heads(&preds, &eval.labels, heads);
        let m = per_head[0];
        let _ = writeln!(
            log,
            "epoch {}: train logloss {:.4}, {:.0} samples/s; eval auc {:.4} logloss {:.4} accuracy {:.4} calibration {:.3}",
            epoch + 1,
            loss / order.len() as f64,
            order.len() as f64 / secs,
            m.auc,
            m.logloss,
            m.accuracy,
            m.calibration
        );
        log_heads(log, "  eval", &head_names, &per_head);
        history.push(m);
        let score = stop_score(metric, &per_head, &layout);
        let stop = if score > best.0 {
            best = (score, params.clone(), epoch);
            false
        } else {
            s.early_stopping > 0 && epoch - best.2 >= s.early_stopping
        };
        if let Some((path, _)) = checkpoint {
            if s.checkpoint_every > 0 && (epoch + 1) % s.checkpoint_every == 0 {
                let pos = checkpoint::Position {
                    epochs_done: epoch as u64 + 1,
                    rng_state: 0,
                    best_auc: best.0,
                    best_epoch: best.2 as u64,
                };
                checkpoint::save_at(path, pos, &mut params, &mut opt, &s.hdfs())?;
            }
        }
        if stop {
            let _ = writeln!(
                log,
                "early stop: no better validation {} for {} epochs",
                metric.as_str(),
                s.early_stopping
            );
            break;
        }
    }
    let kept_epoch = if s.early_stopping > 0 {
        params = best.1;
        best.2
    } else {
        s.epochs.max(1) - 1
    };
    // Tables the file stores as f16 or int8: evaluated (and written) as stored.
    model::round_stored_tables(&fitted, &mut params);
    preds.clear();
    for chunk in eval_rows.chunks(4096) {
        compute.predict(&layout, &params, &eval.slots, chunk, &mut preds);
    }
    let kept_heads = evaluate_heads(&preds, &eval.labels, heads);
    let kept = kept_heads[0];
    let _ = writeln!(
        log,
        "kept epoch {}: validation auc {:.4} logloss {:.4} accuracy {:.4}",
        kept_epoch + 1,
        kept.auc,
        kept.logloss,
        kept.accuracy
    );
    log_heads(log, "  validation", &head_names, &kept_heads);
    let mut test_heads = Vec::new();
    let test = if s.test_files.is_empty() {
        None
    } else {
        let test = data::load(&s.test_files, &spec, s)?;
        let rows: Vec<usize> = (0..test.rows.len()).collect();
        let mut test_preds = Vec::with_capacity(rows.len() * heads);
        for chunk in rows.chunks(4096) {
            compute.predict(&layout, &params, &test.slots, chunk, &mut test_preds);
        }
        let per_head = evaluate_heads(&test_preds, &test.labels, heads);
        let m = per_head[0];
        let _ = writeln!(
            log,
            "test ({} rows): auc {:.4} logloss {:.4} accuracy {:.4} calibration {:.3}",
            rows.len(),
            m.auc,
            m.logloss,
            m.accuracy,
            m.calibration
        );
        log_heads(log, "  test", &head_names, &per_head);
        if layout.mt.is_some() {
            test_heads = per_head;
        }
        Some(m)
    };
    Ok(Trained {
        params,
        layout,
        history,
        kept_epoch,
        eval_predictions: preds,
        eval,
        test,
        test_heads,
        samples_per_second: trained as f64 / busy.max(1e-9),
        model: fitted,
        epochs_before: first_epoch,
    })
}

/// What early stopping compares: `metric` of the heads, averaged with their loss weights (the
/// one head's of a single-task model).
pub(crate) fn stop_score(
    metric: config::StopMetric,
    per_head: &[EvalMetrics],
    layout: &model::Layout,
) -> f64 {
    let weights: Vec<f64> = layout.mt.as_ref().map_or(vec![1.0], |m| {
        m.weights.iter().map(|&w| f64::from(w)).collect()
    });
    per_head
        .iter()
        .zip(&weights)
        .map(|(m, w)| w * metric.score(m))
        .sum::<f64>()
        / weights.iter().sum::<f64>().max(f64::MIN_POSITIVE)
}

/// One line per head of a multi-task model (nothing for a single-task one).
pub(crate) fn log_heads(
    log: &mut dyn std::io::Write,
    what: &str,
    names: &[String],
    m: &[EvalMetrics],
) {
    for (name, m) in names.iter().zip(m) {
        let _ = writeln!(
            log,
            "{what} head {name}: auc {:.4} logloss {:.4} accuracy {:.4} calibration {:.3}",
            m.auc, m.logloss, m.accuracy, m.calibration
        );
    }
}

/// A multi-task model's per-head metrics for the model file: `eval_auc.HEAD` and so on for every
/// head, and `test_*.HEAD` when there is a test set.
pub fn head_metrics(
    names: &[String],
    eval: &[EvalMetrics],
    test: &[EvalMetrics],
) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (set, per_head) in [("eval", eval), ("test", test)] {
        for (name, m) in names.iter().zip(per_head) {
            for (what, v) in [
                ("auc", m.auc),
                ("logloss", m.logloss),
                ("accuracy", m.accuracy),
                ("calibration", m.calibration),
            ] {
                out.push((format!("{set}_{what}.{name}"), v));
            }
        }
    }
    out
}

/// The metrics written into a model file: `eval_*` on the validation set, `test_*` on the test
/// set when there is one (a multi-task model's default head; [`head_metrics`] adds every
/// head's), `epochs` (how many ran, counting a resumed run's) and `kept_epoch` (1-based).
pub fn metrics_of(
    eval: &EvalMetrics,
    test: Option<&EvalMetrics>,
    epochs: usize,
    kept_epoch: usize,
) -> Vec<(String, f64)> {
    let mut metrics = vec![
        ("eval_auc".into(), eval.auc),
        ("eval_logloss".into(), eval.logloss),
        ("eval_accuracy".into(), eval.accuracy),
        ("eval_calibration".into(), eval.calibration),
        ("epochs".into(), epochs as f64),
        ("kept_epoch".into(), (kept_epoch + 1) as f64),
    ];
    if let Some(test) = test {
        metrics.extend([
            ("test_auc".into(), test.auc),
            ("test_logloss".into(), test.logloss),
            ("test_accuracy".into(), test.accuracy),
            ("test_calibration".into(), test.calibration),
        ]);
    }
    metrics
}

/// Writes the trained model with the metrics of the weights it holds in the metadata (see
/// [`metrics_of`]).
pub fn write(config: &TrainConfig, t: &Trained, path: &Path) -> Result<rankd_formats::Written> {
    let kept = t.kept_heads();
    let mut metrics = metrics_of(&kept[0], t.test.as_ref(), t.epochs_run(), t.kept_epoch);
    if let Some(m) = &t.layout.mt {
        metrics.extend(head_metrics(&m.heads, &kept, &t.test_heads));
    }
    write_tensors(
        config,
        &t.model,
        metrics,
        &t.params.tensors(&t.layout),
        path,
    )
}

/// Writes a model file of `model` with weights streamed from `tensors`, `metrics` and the
/// config's name, version and seed in the metadata. On HDFS the file is written and checked
/// locally, then uploaded under a hidden name and renamed into place, so that a reader (a daemon
/// polling the model root) never sees a partial file.
pub fn write_tensors(
    config: &TrainConfig,
    model: &rankd_formats::config::ModelConfig,
    metrics: Vec<(String, f64)>,
    tensors: &dyn rankd_formats::config::Tensors,
    path: &Path,
) -> Result<rankd_formats::Written> {
    let metadata = Metadata {
        name: config.train.name.clone(),
        version: config.train.version,
        created_unix_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64),
        producer: format!("rankd-train {}", env!("CARGO_PKG_VERSION")),
        metrics,
        properties: vec![
            ("seed".into(), config.train.seed.to_string()),
            (
                "early_stopping_metric".into(),
                config.train.early_stopping_metric.as_str().into(),
            ),
        ],
    };
    if !rankd_storage::Location::is_hdfs(path) {
        return Ok(write_model(model, metadata, tensors, path)?);
    }
    let dir = tempfile::tempdir().map_err(|e| TrainError::Data(e.to_string()))?;
    let local = dir.path().join("model.rkm");
    let written = write_model(model, metadata, tensors, &local)?;
    rankd_storage::put_file(&local, path, &config.train.hdfs())
        .map_err(|e| TrainError::Data(e.to_string()))?;
    Ok(written)
}

/// CPU seconds this process has used, user and system, all threads (`/proc/self/stat`, in
/// USER_HZ = 100 ticks per second, Linux's fixed user-space ABI).
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// This process's peak resident memory (`VmHWM` of `/proc/self/status`), where Linux reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
