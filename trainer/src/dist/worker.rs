//! A worker process (`rankd-train` with a `TF_CONFIG` task of type `worker` or `chief`).
//!
//! Every worker streams its share of the training files on a reader thread (parse, bounded
//! shuffle, feature transforms, in batches of `batch_size / workers` rows), and per batch pulls
//! the rows it touches and the dense tensors, computes, and pushes the gradients. Worker 0, the
//! chief, also fits the slots, initializes the shards, evaluates after every epoch, decides early
//! stopping, writes checkpoints (every shard at the same step, then a manifest) and streams the
//! model file from the shards.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rankd_feature_ops::{CompiledSpec, OwnedValue, SlotBatch, Value};
use rankd_formats::config::{ModelConfig, Tensors};

use super::wire::{self, Buf, Cursor};
use super::{dense_tensors, store, DenseKind, Rates, Shards};
use crate::config::{Mode, TrainConfig};
use crate::data::{self, Share, Shuffle};
use crate::error::{Result, TrainError};
use crate::metrics::{evaluate_heads, EvalMetrics};
use crate::model::{Compute, CpuCompute, Grads, Layout, Params};

/// What a worker is told to do.
#[derive(Debug)]
pub struct Job<'a> {
    /// The config (model and `[train]`).
    pub config: &'a TrainConfig,
    /// The shards' addresses.
    pub ps: &'a [String],
    /// This worker's index (0: the chief).
    pub index: usize,
    /// How many workers.
    pub workers: usize,
    /// The model file (the chief writes it).
    pub output: &'a Path,
    /// The checkpoint directory.
    pub checkpoint: &'a Path,
    /// Continue from the last complete checkpoint.
    pub resume: bool,
    /// How long to keep trying to reach a shard.
    pub patience: Duration,
}

/// What the chief reports at the end.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Validation metrics of the kept weights.
    pub kept: EvalMetrics,
    /// The kept epoch (0-based).
    pub kept_epoch: usize,
    /// Epochs run, counting those before a resume.
    pub epochs: usize,
    /// Test metrics, with test files.
    pub test: Option<EvalMetrics>,
    /// Training samples per second (all workers) over the epochs this run trained.
    pub samples_per_second: f64,
    /// The chief's bytes sent to and received from the shards per training sample it computed.
    pub bytes_per_sample: f64,
}

/// The tables' slots and sizes, and buffers reused from batch to batch.
struct Plan {
    layout: Layout,
    /// The slot of each table (embedding tables, then wide tables).
    slot: Vec<usize>,
    /// Each table's dimension.
    dim: Vec<usize>,
    /// The dense tensors and their lengths.
    dense: Vec<(DenseKind, usize)>,
    /// Distinct slots of the tables.
    slots: Vec<usize>,
    shards: usize,
    /// How the model file stores each embedding table.
    stored: Vec<rankd_formats::WeightType>,
}

/// A batch whose ids were rewritten to local rows, with the global id of each local row.
struct Local {
    slots: SlotBatch,
    labels: Vec<f32>,
    /// Per distinct slot (in `Plan::slots` order): the global ids of local rows 0, 1, ...
    ids: Vec<Vec<u32>>,
}

impl Plan {
    fn new(layout: Layout, shards: usize, model: &ModelConfig) -> Plan {
        let slot: Vec<usize> = layout
            .emb
            .iter()
            .map(|e| e.slot)
            .chain(layout.wide.iter().map(|w| w.0))
            .collect();
        let dim = layout
            .emb
            .iter()
            .map(|e| e.dim)
            .chain(layout.wide.iter().map(|_| 1))
            .collect();
        let mut slots = slot.clone();
        slots.sort_unstable();
        slots.dedup();
        Plan {
            stored: model.embeddings.iter().map(|e| e.weight_type).collect(),
            dense: dense_tensors(&layout),
            layout,
            slot,
            dim,
            slots,
            shards,
        }
    }

    fn slot_pos(&self, table: usize) -> usize {
        self.slots
            .binary_search(&self.slot[table])
            .expect("every table's slot is listed")
    }

    /// Rewrites the ids of `slots` to local rows.
    fn localize(&self, mut slots: SlotBatch, labels: Vec<f32>) -> Local {
        let mut ids = Vec::with_capacity(self.slots.len());
        let mut index: HashMap<u32, u32> = HashMap::new();
        for &s in &self.slots {
            index.clear();
            let mut uniq = Vec::new();
            if slots.rows() > 0 {
                for id in slots.ids_mut(s) {
                    let local = *index.entry(*id).or_insert_with(|| {
                        uniq.push(*id);
                        (uniq.len() - 1) as u32
                    });
                    *id = local;
                }
            }
            ids.push(uniq);
        }
        Local { slots, labels, ids }
    }

    /// Sends every shard the pull of `local`'s rows (and the dense tensors).
    fn send_pull(&self, shards: &mut Shards, round: u64, local: &Local, dense: bool) -> Result<()> {
        let k = self.shards;
        let mut msgs: Vec<Buf> = (0..k).map(|_| Buf::default()).collect();
        for m in &mut msgs {
            m.u64(round);
            m.u8(u8::from(dense));
        }
        let mut part = vec![Vec::new(); k];
        for t in 0..self.slot.len() {
            part.iter_mut().for_each(Vec::clear);
            for &id in &local.ids[self.slot_pos(t)] {
                part[id as usize % k].push(id);
            }
            for (m, p) in msgs.iter_mut().zip(&part) {
                m.u32s(p);
            }
        }
        for (i, m) in msgs.iter().enumerate() {
            shards.send(i, wire::PULL, &m.0)?;
        }
        Ok(())
    }

    /// Reads the shards' answers to [`Self::send_pull`] into `params`, sized for `local`.
    /// Returns whether every worker's share was used up in the round before.
    fn recv_pull(
        &self,
        shards: &mut Shards,
        local: &Local,
        dense: bool,
        params: &mut Params,
    ) -> Result<bool> {
        let l = &self.layout;
        let k = self.shards;
        let n_emb = l.emb.len();
        params.emb.resize(n_emb, Vec::new());
        params.wide.resize(l.wide.len(), Vec::new());
        for t in 0..self.slot.len() {
            let rows = local.ids[self.slot_pos(t)].len() * self.dim[t];
            let v = if t < n_emb {
                &mut params.emb[t]
            } else {
                &mut params.wide[t - n_emb]
            };
            v.clear();
            v.resize(rows, 0.0);
        }
        if dense {
            params.w = l.layers.iter().map(|&(i, o)| vec![0.0; i * o]).collect();
            params.b = l.layers.iter().map(|&(_, o)| vec![0.0; o]).collect();
            params.cross = l.cross.map_or(Vec::new(), |c| {
                c.tensors(l.deep_in)
                    .iter()
                    .map(|(_, s, _)| vec![0.0; s.iter().product()])
                    .collect()
            });
            params.mt = l.mt.as_ref().map_or(Vec::new(), |m| {
                m.tensors(l.deep_in)
                    .iter()
                    .map(|(_, s, _)| vec![0.0; s.iter().product()])
                    .collect()
            });
        }
        let mut all_exhausted = false;
        for i in 0..k {
            let body = shards.recv(i, wire::ROWS)?;
            let mut c = Cursor(body);
            let flag = c.u8()? == 1;
            if i == 0 {
                all_exhausted = flag;
            }
            for t in 0..self.slot.len() {
                let dim = self.dim[t];
                let v = if t < n_emb {
                    &mut params.emb[t]
                } else {
                    &mut params.wide[t - n_emb]
                };
                for (j, &id) in local.ids[self.slot_pos(t)].iter().enumerate() {
                    if id as usize % k == i {
                        c.f32s_into(&mut v[j * dim..(j + 1) * dim])?;
                    }
                }
            }
            if dense {
                for (d, (kind, _)) in self.dense.iter().enumerate() {
                    if d % k != i {
                        continue;
                    }
                    match *kind {
                        DenseKind::WideBias => {
                            c.f32s_into(std::slice::from_mut(&mut params.wide_bias))?
                        }
                        DenseKind::Weight(j) => c.f32s_into(&mut params.w[j])?,
                        DenseKind::Bias(j) => c.f32s_into(&mut params.b[j])?,
                        DenseKind::Cross(j, _) => c.f32s_into(&mut params.cross[j])?,
                        DenseKind::Mt(j, _) => c.f32s_into(&mut params.mt[j])?,
                    }
                }
            }
            if !c.0.is_empty() {
                return Err(TrainError::Data(format!(
                    "ps {i}: a longer answer than asked"
                )));
            }
        }
        Ok(all_exhausted)
    }

    /// Pushes every shard its part of `grads` (local rows of `local`).
    #[allow(clippy::too_many_arguments)]
    fn push(
        &self,
        shards: &mut Shards,
        round: u64,
        worker: usize,
        n: usize,
        exhausted: bool,
        local: &Local,
        grads: &Grads,
    ) -> Result<()> {
        let k = self.shards;
        let mut msgs: Vec<Buf> = (0..k).map(|_| Buf::default()).collect();
        for m in &mut msgs {
            m.u64(round);
            m.u32(worker as u32);
            m.u32(n as u32);
            m.u8(u8::from(exhausted));
        }
        let n_emb = self.layout.emb.len();
        let mut ids = vec![Vec::new(); k];
        let mut vals = vec![Vec::new(); k];
        for t in 0..self.slot.len() {
            let sg = if t < n_emb {
                &grads.emb[t]
            } else {
                &grads.wide[t - n_emb]
            };
            let dim = self.dim[t];
            let global = &local.ids[self.slot_pos(t)];
            ids.iter_mut().for_each(Vec::clear);
            vals.iter_mut().for_each(Vec::clear);
            for (j, &row) in sg.rows.iter().enumerate() {
                let id = global[row as usize];
                let s = id as usize % k;
                ids[s].push(id);
                vals[s].extend_from_slice(&sg.values[j * dim..(j + 1) * dim]);
            }
            for ((m, i), v) in msgs.iter_mut().zip(&ids).zip(&vals) {
                m.u32s(i);
                m.f32s(v);
            }
        }
        for (d, (kind, _)) in self.dense.iter().enumerate() {
            let m = &mut msgs[d % k];
            match *kind {
                DenseKind::WideBias => m.f32s(&[grads.wide_bias]),
                DenseKind::Weight(j) => m.f32s(&grads.w[j]),
                DenseKind::Bias(j) => m.f32s(&grads.b[j]),
                DenseKind::Cross(j, _) => m.f32s(&grads.cross[j]),
                DenseKind::Mt(j, _) => m.f32s(&grads.mt[j]),
            }
        }
        for (i, m) in msgs.iter().enumerate() {
            shards.send(i, wire::PUSH, &m.0)?;
        }
        Ok(())
    }

    /// Predictions of the current parameters on `files`, streamed in batches; with the labels.
    /// `as_stored`: with the f16 tables rounded as the model file stores them.
    fn predict_files(
        &self,
        shards: &mut Shards,
        config: &TrainConfig,
        spec: &CompiledSpec,
        files: &[PathBuf],
        as_stored: bool,
    ) -> Result<(Vec<f32>, Vec<f32>)> {
        let mut preds = Vec::new();
        let mut labels = Vec::new();
        let mut compute = CpuCompute::default();
        let mut params = Params::default();
        let mut batch: Vec<Row> = Vec::new();
        let mut run = |batch: &mut Vec<Row>, shards: &mut Shards| {
            let (slots, ls) = transform(spec, batch)?;
            batch.clear();
            let local = self.localize(slots, ls);
            self.send_pull(shards, 0, &local, true)?;
            self.recv_pull(shards, &local, true, &mut params)?;
            if as_stored {
                for ((t, w), e) in params
                    .emb
                    .iter_mut()
                    .zip(&self.stored)
                    .zip(&self.layout.emb)
                {
                    crate::model::round_as_stored(*w, e.dim, t);
                }
            }
            let rows: Vec<usize> = (0..local.slots.rows()).collect();
            compute.predict(&self.layout, &params, &local.slots, &rows, &mut preds);
            labels.extend_from_slice(&local.labels);
            Ok::<(), TrainError>(())
        };
        data::stream(files, spec.features(), &config.train, &mut |row, labels| {
            batch.push((row, labels.to_vec()));
            if batch.len() == 4096 {
                run(&mut batch, shards)?;
            }
            Ok(())
        })?;
        if !batch.is_empty() {
            run(&mut batch, shards)?;
        }
        Ok((preds, labels))
    }
}

/// A row's cells and its labels (one, or one per head of a multi-task model).
type Row = (Vec<OwnedValue>, Vec<f32>);

/// Runs rows through the feature spec: the slots and the labels, row by row.
fn transform(spec: &CompiledSpec, rows: &[Row]) -> Result<(SlotBatch, Vec<f32>)> {
    let mut slots = SlotBatch::new();
    let mut labels = Vec::with_capacity(rows.len());
    for (row, label) in rows {
        let values: Vec<Value<'_>> = row.iter().map(OwnedValue::value).collect();
        spec.transform_row(&values, &mut slots)
            .map_err(|e| TrainError::Data(e.to_string()))?;
        labels.extend_from_slice(label);
    }
    Ok((slots, labels))
}

/// A batch from the reader thread, or its error.
type Batch = Result<(SlotBatch, Vec<f32>)>;

/// Streams `share` of the training files through the shuffle buffer and the feature spec, in
/// batches of `batch` rows, into `tx` (bounded: the reader runs at most two batches ahead).
fn read_epoch(
    config: &TrainConfig,
    spec: &CompiledSpec,
    share: Share,
    epoch: usize,
    batch: usize,
    tx: &mpsc::SyncSender<Batch>,
) {
    let s = &config.train;
    let mut shuffle = Shuffle::new(
        s.shuffle_buffer,
        data::epoch_rng(s.seed, share.index, epoch),
    );
    let mut rows: Vec<Row> = Vec::with_capacity(batch);
    // The consumer hung up: stop reading (not an error of ours).
    let hung_up = || TrainError::Data("stopped".into());
    let emit = |rows: &mut Vec<Row>| -> Result<()> {
        let b = transform(spec, rows);
        rows.clear();
        tx.send(b).map_err(|_| hung_up())
    };
    let r = data::stream_share(
        &s.train_files,
        spec.features(),
        s,
        share,
        &mut |row, label| {
            if let Some(out) = shuffle.push((row, label.to_vec())) {
                rows.push(out);
                if rows.len() == batch {
                    emit(&mut rows)?;
                }
            }
            Ok(())
        },
    )
    .and_then(|_| {
        for out in shuffle.drain() {
            rows.push(out);
            if rows.len() == batch {
                emit(&mut rows)?;
            }
        }
        if !rows.is_empty() {
            emit(&mut rows)?;
        }
        Ok(())
    });
    if let Err(e) = r {
        let _ = tx.send(Err(e));
    }
}

/// The chief's pass over the training data before training: the slots fitted on (a bounded
/// sample of) the rows, and the base rate over all of them (per head of a multi-task model).
fn fit(config: &TrainConfig, log: &mut dyn Write) -> Result<(ModelConfig, Vec<f32>)> {
    let s = &config.train;
    let mut fitted = config.model.clone();
    let mut raw = data::RawData::default();
    let mut seen = 0u64;
    // Per head: positives and rows with its label.
    let mut positives = vec![0f32; s.heads.len().max(1)];
    let mut labeled = vec![0u64; positives.len()];
    let mut rng = rankd_formats::synth::Rng::new(s.seed ^ 0x0066_6974);
    let keep = if s.fit.is_empty() {
        0
    } else {
        s.fit_sample_rows
    };
    data::stream(&s.train_files, &fitted.features, s, &mut |row, labels| {
        let label = labels[0];
        seen += 1;
        for ((p, n), y) in positives.iter_mut().zip(&mut labeled).zip(labels) {
            if !y.is_nan() {
                *p += y;
                *n += 1;
            }
        }
        if raw.rows.len() < keep {
            raw.rows.push(row);
            raw.labels.push(label);
        } else if keep > 0 {
            // Reservoir sampling: every row is kept with the same probability.
            let j = (rng.next_u64() % seen) as usize;
            if j < keep {
                raw.rows[j] = row;
                raw.labels[j] = label;
            }
        }
        Ok(())
    })?;
    if seen == 0 {
        return Err(TrainError::Data(
            "the training files hold no examples".into(),
        ));
    }
    if !s.fit.is_empty() {
        crate::fit::fit(&mut fitted, &s.fit, &raw)?;
        let _ = writeln!(
            log,
            "fitted {} slots from {} of {seen} rows",
            s.fit.len(),
            raw.rows.len()
        );
    }
    Ok((
        fitted,
        positives
            .iter()
            .zip(&labeled)
            .map(|(p, &n)| p / n.max(1) as f32)
            .collect(),
    ))
}

/// A complete checkpoint: where the job stood.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Position {
    epochs_done: usize,
    best_score: f64,
    best_epoch: usize,
    shards: usize,
}

impl Position {
    fn write(&self, dir: &Path, hdfs: &rankd_storage::HdfsSettings) -> Result<()> {
        let text = format!(
            "{{\"epochs_done\":{},\"best_score\":{},\"best_epoch\":{},\"shards\":{}}}\n",
            self.epochs_done,
            if self.best_score.is_finite() {
                self.best_score.to_string()
            } else {
                "null".into()
            },
            self.best_epoch,
            self.shards
        );
        store::put_bytes(text.as_bytes(), &dir.join("COMPLETE"), hdfs)
    }

    fn read(dir: &Path, hdfs: &rankd_storage::HdfsSettings) -> Result<Position> {
        let path = dir.join("COMPLETE");
        let text = store::get(&path, hdfs)?.ok_or_else(|| {
            TrainError::Data(format!("{}: the checkpoint is incomplete", path.display()))
        })?;
        let text = String::from_utf8_lossy(&text);
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        let n = |k: &str| v[k].as_u64().map(|x| x as usize);
        let bad = || TrainError::Data(format!("{}: not a checkpoint manifest", path.display()));
        Ok(Position {
            epochs_done: n("epochs_done").ok_or_else(bad)?,
            best_score: v["best_score"].as_f64().unwrap_or(f64::NEG_INFINITY),
            best_epoch: n("best_epoch").ok_or_else(bad)?,
            shards: n("shards").ok_or_else(bad)?,
        })
    }
}

fn path_arg(p: &Path) -> Buf {
    let mut b = Buf::default();
    b.bytes(p.to_string_lossy().as_bytes());
    b
}

/// Runs worker `job.index`; the chief returns its summary.
pub fn run(job: &Job<'_>, log: &mut dyn Write) -> Result<Option<Summary>> {
    let config = job.config;
    let s = &config.train;
    if s.eval_split.is_some() {
        return Err(TrainError::Config(
            "valid_split needs every row in one process; with worker processes give valid_files"
                .into(),
        ));
    }
    let chief = job.index == 0;
    let mut shards = Shards::connect(job.ps, job.patience)?;
    // Async: a second connection to every shard for the prefetching pulls.
    let mut prefetch = match s.mode {
        Mode::Async => Some(Shards::connect(job.ps, job.patience)?),
        Mode::Sync => None,
    };
    let k = shards.len();
    // The job: the chief fits and initializes the shards; the others wait for it.
    let mut resumed: Option<Position> = None;
    let ready = if chief {
        let (fitted, base_rates) = fit(config, log)?;
        let latest = job.checkpoint.join("LATEST");
        let hdfs = s.hdfs();
        let mut restore = String::new();
        let mut start = 0u64;
        if job.resume
            && !rankd_storage::Location::is_hdfs(job.checkpoint)
            && job.checkpoint.is_file()
        {
            return Err(TrainError::Config(format!(
                "{} is a single-process checkpoint; a multi-process job keeps a directory",
                job.checkpoint.display()
            )));
        }
        let last = if job.resume {
            store::get(&latest, &hdfs)?
        } else {
            None
        };
        if let Some(text) = last {
            let n: usize = String::from_utf8_lossy(&text)
                .trim()
                .parse()
                .map_err(|_| TrainError::Data(format!("{}: unreadable", latest.display())))?;
            let dir = job.checkpoint.join(format!("epoch-{n}"));
            let pos = Position::read(&dir, &hdfs)?;
            if pos.shards != k {
                return Err(TrainError::Config(format!(
                    "the checkpoint in {} was written by {} parameter-server shards; this job has {k}",
                    dir.display(),
                    pos.shards
                )));
            }
            restore = dir.to_string_lossy().into_owned();
            start = pos.epochs_done as u64;
            resumed = Some(pos);
            let _ = writeln!(log, "resumed from {} after epoch {n}", dir.display());
        }
        let json = serde_json::to_vec(&fitted)
            .map_err(|e| TrainError::Data(format!("model config: {e}")))?;
        let mut b = Buf::default();
        b.u32(job.workers as u32);
        b.u8(u8::from(s.mode == Mode::Sync));
        b.u64(s.seed);
        b.u32(base_rates.len() as u32);
        b.f32s(&base_rates);
        Rates::of(s).write(&mut b);
        b.u64(start);
        b.bytes(restore.as_bytes());
        b.bytes(&json);
        b.u64(s.hdfs_timeout_ms);
        b.bytes(&serde_json::to_vec(&s.hdfs_config).expect("a string map"));
        shards.all(wire::INIT, &b.0, wire::READY)?;
        (start, false, fitted)
    } else {
        let mut b = Buf::default();
        b.u32(job.index as u32);
        let body = shards.all(wire::HELLO, &b.0, wire::READY)?;
        let mut c = Cursor(&body);
        let start = c.u64()?;
        let over = c.u8()? == 1;
        if start > 0 {
            let _ = writeln!(log, "worker {}: joined at epoch {}", job.index, start + 1);
        }
        let fitted: ModelConfig = serde_json::from_slice(c.bytes()?)
            .map_err(|e| TrainError::Data(format!("the chief's model config: {e}")))?;
        (start, over, fitted)
    };
    let (start_epoch, mut epoch_over, fitted) = ready;
    let spec = CompiledSpec::compile(&fitted.feature_spec())?;
    let layout = Layout::new(&fitted, &spec)?;
    if s.batch_norm || s.dropout > 0.0 {
        return Err(TrainError::Config(
            "batch_norm and dropout train in one process (rankd-train --config); the \
             parameter-server job does not carry them yet"
                .into(),
        ));
    }
    let plan = Plan::new(layout, k, &fitted);
    let local_batch = (s.batch_size / job.workers).max(1);
    let share = Share {
        index: job.index,
        count: job.workers,
    };
    let metric = s.early_stopping_metric;
    let heads = plan.layout.heads();
    let head_names: Vec<String> = plan
        .layout
        .mt
        .as_ref()
        .map_or(Vec::new(), |m| m.heads.clone());
    let mut best = resumed.map_or((f64::NEG_INFINITY, 0usize), |p| {
        (p.best_score, p.best_epoch)
    });
    // This worker's steps: on its GPU (or emulated device) when `[train] device` says so, else
    // the CPU; the shards apply every update either way. Dropout masks are drawn as the
    // in-process trainer's worker of the same index draws them.
    let mut compute = crate::gpu::compute::WorkerCompute::start(s, &plan.layout, job.index, log)?;
    let mut grads = Grads::new(&plan.layout);
    let mut params = Params::default();
    let mut round = 0u64;
    let mut trained_rows = 0u64;
    let mut busy = 0f64;
    let mut my_rows = 0u64;
    let mut last_epoch = start_epoch as usize;
    for epoch in start_epoch as usize..s.epochs {
        let start = Instant::now();
        // A worker that rejoined after its epoch's training ended goes to the second barrier.
        let skip = std::mem::take(&mut epoch_over);
        let (loss, rows) = if skip {
            (0.0, 0)
        } else {
            std::thread::scope(|scope| -> Result<(f64, u64)> {
                let (tx, rx) = mpsc::sync_channel::<Batch>(2);
                let spec = &spec;
                scope.spawn(move || read_epoch(config, spec, share, epoch, local_batch, &tx));
                let mut loss = 0f64;
                let mut rows = 0u64;
                if s.mode == Mode::Async {
                    // A prefetch thread pulls the next batch's rows on its own connections while this
                    // one computes (one step stale, as asynchronous training is anyway).
                    let pulls = prefetch.as_mut().expect("async jobs open them");
                    let (ready_tx, ready_rx) = mpsc::sync_channel::<Result<(Local, Params)>>(1);
                    let plan = &plan;
                    scope.spawn(move || {
                        for batch in rx {
                            let pulled = batch.and_then(|(slots, labels)| {
                                let local = plan.localize(slots, labels);
                                let mut params = Params::default();
                                plan.send_pull(pulls, 0, &local, true)?;
                                plan.recv_pull(pulls, &local, true, &mut params)?;
                                Ok((local, params))
                            });
                            let failed = pulled.is_err();
                            if ready_tx.send(pulled).is_err() || failed {
                                return;
                            }
                        }
                    });
                    for pulled in ready_rx {
                        let (local, params) = pulled?;
                        let n = local.slots.rows();
                        let r: Vec<usize> = (0..n).collect();
                        loss += compute.step(
                            &plan.layout,
                            &params,
                            &local.slots,
                            &local.labels,
                            &r,
                            &mut grads,
                        )?;
                        rows += n as u64;
                        plan.push(&mut shards, 0, job.index, n, false, &local, &grads)?;
                    }
                    return Ok((loss, rows));
                }
                // Sync: one round per batch; a worker whose share is used up pushes empty rounds
                // until every worker's is (the shards then flag the epoch's end).
                let mut exhausted = false;
                let mut sent_exhausted = false;
                loop {
                    let batch = if exhausted {
                        None
                    } else {
                        match rx.recv() {
                            Ok(b) => Some(b?),
                            Err(_) => None,
                        }
                    };
                    exhausted = batch.is_none();
                    let (slots, labels) = batch.unwrap_or_default();
                    let local = plan.localize(slots, labels);
                    let n = local.slots.rows();
                    let next = round + 1;
                    plan.send_pull(&mut shards, next, &local, n > 0)?;
                    let all_done = plan.recv_pull(&mut shards, &local, n > 0, &mut params)?;
                    if all_done && sent_exhausted {
                        break;
                    }
                    if n > 0 {
                        let r: Vec<usize> = (0..n).collect();
                        loss += compute.step(
                            &plan.layout,
                            &params,
                            &local.slots,
                            &local.labels,
                            &r,
                            &mut grads,
                        )?;
                        rows += n as u64;
                    } else {
                        grads = Grads::new(&plan.layout);
                    }
                    plan.push(&mut shards, next, job.index, n, exhausted, &local, &grads)?;
                    round += 1;
                    sent_exhausted |= exhausted;
                }
                drop(rx);
                Ok((loss, rows))
            })?
        };
        my_rows += rows;
        // Every worker done with the epoch: the chief evaluates and checkpoints.
        let (total_loss, total_rows) = if skip {
            (0.0, 0)
        } else {
            let (l, r, _) = barrier(&mut shards, 2 * epoch as u64, job.index, loss, rows, &[])?;
            (l, r)
        };
        let secs = start.elapsed().as_secs_f64();
        busy += secs;
        trained_rows += total_rows;
        let mut stop = false;
        if chief {
            let (preds, labels) =
                plan.predict_files(&mut shards, config, &spec, eval_files(config), false)?;
            let per_head = evaluate_heads(&preds, &labels, heads);
            let m = per_head[0];
            let _ = writeln!(
                log,
                "epoch {}: train logloss {:.4}, {:.0} samples/s; eval auc {:.4} logloss {:.4} accuracy {:.4} calibration {:.3}",
                epoch + 1,
                total_loss / total_rows.max(1) as f64,
                total_rows as f64 / secs,
                m.auc,
                m.logloss,
                m.accuracy,
                m.calibration
            );
            crate::log_heads(log, "  eval", &head_names, &per_head);
            let score = crate::stop_score(metric, &per_head, &plan.layout);
            if score > best.0 {
                best = (score, epoch);
                if s.early_stopping > 0 {
                    save(
                        &mut shards,
                        &job.checkpoint.join("best"),
                        &s.hdfs(),
                        &Position {
                            epochs_done: epoch + 1,
                            best_score: best.0,
                            best_epoch: best.1,
                            shards: k,
                        },
                    )?;
                }
            } else {
                stop = s.early_stopping > 0 && epoch - best.1 >= s.early_stopping;
            }
            if s.checkpoint_every > 0 && (epoch + 1) % s.checkpoint_every == 0 {
                let dir = job.checkpoint.join(format!("epoch-{}", epoch + 1));
                save(
                    &mut shards,
                    &dir,
                    &s.hdfs(),
                    &Position {
                        epochs_done: epoch + 1,
                        best_score: best.0,
                        best_epoch: best.1,
                        shards: k,
                    },
                )?;
                store::put_bytes(
                    format!("{}\n", epoch + 1).as_bytes(),
                    &job.checkpoint.join("LATEST"),
                    &s.hdfs(),
                )?;
                // Older epochs are superseded by this complete one (on HDFS they are kept).
                if let Ok(entries) = std::fs::read_dir(job.checkpoint) {
                    for e in entries.flatten() {
                        let name = e.file_name().to_string_lossy().into_owned();
                        if name.starts_with("epoch-") && name != format!("epoch-{}", epoch + 1) {
                            let _ = std::fs::remove_dir_all(e.path());
                        }
                    }
                }
            }
            if stop {
                let _ = writeln!(
                    log,
                    "early stop: no better validation {} for {} epochs",
                    metric.as_str(),
                    s.early_stopping
                );
            }
        }
        last_epoch = epoch;
        let (_, _, payload) = barrier(
            &mut shards,
            2 * epoch as u64 + 1,
            job.index,
            0.0,
            0,
            &[u8::from(stop)],
        )?;
        if payload.first() == Some(&1) {
            break;
        }
    }
    let wire_bytes =
        shards.sent + shards.received + prefetch.as_ref().map_or(0, |p| p.sent + p.received);
    let bytes_per_sample = wire_bytes as f64 / my_rows.max(1) as f64;
    if !chief {
        done(&mut shards, job.index)?;
        return Ok(None);
    }
    // The kept weights: the best epoch's with early stopping, else the last.
    let kept_epoch = if s.early_stopping > 0 {
        if best.1 != last_epoch {
            let mut b = path_arg(&job.checkpoint.join("best"));
            shards.all(wire::LOAD, &std::mem::take(&mut b.0), wire::OK)?;
        }
        best.1
    } else {
        s.epochs.max(1) - 1
    };
    let (preds, labels) =
        plan.predict_files(&mut shards, config, &spec, eval_files(config), true)?;
    let kept_heads = evaluate_heads(&preds, &labels, heads);
    let kept = kept_heads[0];
    let _ = writeln!(
        log,
        "kept epoch {}: validation auc {:.4} logloss {:.4} accuracy {:.4}",
        kept_epoch + 1,
        kept.auc,
        kept.logloss,
        kept.accuracy
    );
    crate::log_heads(log, "  validation", &head_names, &kept_heads);
    let mut test_heads = Vec::new();
    let test = if s.test_files.is_empty() {
        None
    } else {
        let (p, l) = plan.predict_files(&mut shards, config, &spec, &s.test_files, true)?;
        let per_head = evaluate_heads(&p, &l, heads);
        let m = per_head[0];
        let _ = writeln!(
            log,
            "test ({} rows): auc {:.4} logloss {:.4} accuracy {:.4} calibration {:.3}",
            l.len() / heads,
            m.auc,
            m.logloss,
            m.accuracy,
            m.calibration
        );
        crate::log_heads(log, "  test", &head_names, &per_head);
        test_heads = per_head;
        Some(m)
    };
    let epochs = last_epoch + 1;
    let mut metrics = crate::metrics_of(&kept, test.as_ref(), epochs, kept_epoch);
    if !head_names.is_empty() {
        metrics.extend(crate::head_metrics(&head_names, &kept_heads, &test_heads));
    }
    {
        let export = Export {
            plan: &plan,
            tensors: fitted.tensors()?,
            shards: RefCell::new(&mut shards),
        };
        crate::write_tensors(config, &fitted, metrics, &export, job.output)?;
    }
    done(&mut shards, 0)?;
    Ok(Some(Summary {
        kept,
        kept_epoch,
        epochs,
        test,
        samples_per_second: trained_rows as f64 / busy.max(1e-9),
        bytes_per_sample,
    }))
}

fn eval_files(config: &TrainConfig) -> &[PathBuf] {
    let s = &config.train;
    if s.eval_files.is_empty() {
        &s.train_files
    } else {
        &s.eval_files
    }
}

/// Every shard saves its state under `dir`; then the manifest marks it complete.
fn save(
    shards: &mut Shards,
    dir: &Path,
    hdfs: &rankd_storage::HdfsSettings,
    pos: &Position,
) -> Result<()> {
    if !rankd_storage::Location::is_hdfs(dir) {
        let _ = std::fs::remove_file(dir.join("COMPLETE"));
    }
    shards.all(wire::SAVE, &path_arg(dir).0, wire::OK)?;
    pos.write(dir, hdfs)
}

/// Waits at barrier `tag` with every worker; returns the summed loss and rows and the chief's
/// payload.
fn barrier(
    shards: &mut Shards,
    tag: u64,
    worker: usize,
    loss: f64,
    rows: u64,
    payload: &[u8],
) -> Result<(f64, u64, Vec<u8>)> {
    let mut b = Buf::default();
    b.u64(tag);
    b.u32(worker as u32);
    b.f64(loss);
    b.u64(rows);
    b.bytes(payload);
    shards.send(0, wire::BARRIER, &b.0)?;
    let body = shards.recv(0, wire::PASSED)?;
    let mut c = Cursor(body);
    Ok((c.f64()?, c.u64()?, c.bytes()?.to_vec()))
}

/// Tells every shard this worker is finished.
fn done(shards: &mut Shards, worker: usize) -> Result<()> {
    let mut b = Buf::default();
    b.u32(worker as u32);
    for i in 0..shards.len() {
        shards.send(i, wire::DONE, &b.0)?;
    }
    Ok(())
}

/// The model's tensors, read from the shards in chunks as the file is written (no full copy of
/// a table in memory).
struct Export<'a> {
    plan: &'a Plan,
    /// The tensors the model config needs: their names and shapes.
    tensors: Vec<rankd_formats::config::TensorSpec>,
    shards: RefCell<&'a mut Shards>,
}

/// Rows read from the shards per request when writing the model file.
const EXPORT_ROWS: usize = 1 << 16;

impl Tensors for Export<'_> {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.shape.clone())
    }

    fn names(&self) -> Vec<String> {
        self.tensors.iter().map(|t| t.name.clone()).collect()
    }

    fn read(
        &self,
        name: &str,
        f: &mut dyn FnMut(&[f32]) -> rankd_formats::Result<()>,
    ) -> rankd_formats::Result<()> {
        let plan = self.plan;
        let l = &plan.layout;
        let fail = |e: TrainError| rankd_formats::FormatError::Config(e.to_string());
        let mut shards = self.shards.borrow_mut();
        let table = l
            .emb
            .iter()
            .position(|e| format!("embedding.{}", e.name) == name)
            .or_else(|| {
                l.wide
                    .iter()
                    .position(|w| format!("wide.{}", w.1) == name)
                    .map(|j| l.emb.len() + j)
            });
        let mut params = Params::default();
        if let Some(t) = table {
            let rows = if t < l.emb.len() {
                l.emb[t].rows
            } else {
                l.wide[t - l.emb.len()].2
            };
            let pos = plan.slot_pos(t);
            let mut start = 0;
            while start < rows {
                let end = (start + EXPORT_ROWS).min(rows);
                // A pull of rows start..end of this table's slot (the other tables of the pull
                // ask for nothing).
                let mut ids = vec![Vec::new(); plan.slots.len()];
                ids[pos] = (start as u32..end as u32).collect();
                let local = Local {
                    slots: SlotBatch::new(),
                    labels: Vec::new(),
                    ids,
                };
                plan.send_pull(&mut shards, 0, &local, false)
                    .map_err(fail)?;
                plan.recv_pull(&mut shards, &local, false, &mut params)
                    .map_err(fail)?;
                let v = if t < l.emb.len() {
                    &params.emb[t]
                } else {
                    &params.wide[t - l.emb.len()]
                };
                f(v)?;
                start = end;
            }
            return Ok(());
        }
        // A dense tensor: pulled with no rows.
        let local = Local {
            slots: SlotBatch::new(),
            labels: Vec::new(),
            ids: vec![Vec::new(); plan.slots.len()],
        };
        plan.send_pull(&mut shards, 0, &local, true).map_err(fail)?;
        plan.recv_pull(&mut shards, &local, true, &mut params)
            .map_err(fail)?;
        if name == "wide.bias" {
            return f(&[params.wide_bias]);
        }
        for i in 0..l.layers.len() {
            if name == format!("deep.{i}.weight") {
                return f(&params.w[i]);
            }
            if name == format!("deep.{i}.bias") {
                return f(&params.b[i]);
            }
        }
        if let Some(c) = &l.cross {
            let names = c.tensors(l.deep_in);
            if let Some(i) = names.iter().position(|(n, _, _)| n == name) {
                return f(&params.cross[i]);
            }
        }
        if let Some(m) = &l.mt {
            let names = m.tensors(l.deep_in);
            if let Some(i) = names.iter().position(|(n, _, _)| n == name) {
                return f(&params.mt[i]);
            }
        }
        Err(rankd_formats::FormatError::Config(format!(
            "no tensor `{name}`"
        )))
    }
}
