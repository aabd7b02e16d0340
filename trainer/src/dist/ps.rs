//! A parameter-server shard (`rankd-train ps`): holds the embedding and wide rows `r` with
//! `r % shards == shard` of every table, in a hash map per table (only rows a gradient touched;
//! an untouched row reads as its deterministic initial value), and the dense tensors whose index
//! `d % shards == shard` (see [`super::dense_tensors`]), with their optimizer state.
//!
//! Sync mode: every worker pushes once per round (an empty push when its share is used up); the
//! shard combines the round's pushes in worker order, weighted by their row counts, applies them
//! (Adagrad per touched row, Adam per dense tensor) and only then answers pulls of the next
//! round. Async mode: each push is applied as it arrives and pulls never wait.
//!
//! The shard exits by itself once every worker has said it is done, and fails (naming the worker)
//! when a worker's connection drops before that.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use rankd_feature_ops::CompiledSpec;
use rankd_formats::config::ModelConfig;

use super::wire::{self, Buf, Cursor};
use super::{dense_tensors, DenseKind, Rates};
use crate::error::{Result, TrainError};
use crate::model::{self, Layout, Optimizer, SparseGrad};

/// Hashes a row id: one multiplication (ids are already hashes or dense vocabulary indices).
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = u64::from(v).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type RowMap = HashMap<u32, u32, BuildHasherDefault<IdHasher>>;

/// The rows of one table this shard has updated.
#[derive(Debug)]
struct Table {
    dim: usize,
    /// The embedding table index (rows start at their random values), or `None` for a wide
    /// table (rows start at 0).
    emb: Option<usize>,
    map: RowMap,
    w: Vec<f32>,
    acc: Vec<f32>,
}

impl Table {
    /// The initial values of row `row` of a table whose embedding index is `emb` (see
    /// [`Table::emb`]): what the row reads as until a gradient touches it.
    fn initial(emb: Option<usize>, seed: u64, row: u32, out: &mut [f32]) {
        match emb {
            Some(t) => model::init_row(seed, t, u64::from(row), out),
            None => out.fill(0.0),
        }
    }
}

/// A dense tensor this shard owns, with its Adam moments (for the wide bias, `m[0]` is the
/// Adagrad accumulator).
#[derive(Debug)]
struct Dense {
    kind: DenseKind,
    w: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

/// One worker's push of a round.
#[derive(Debug)]
struct Push {
    n: u32,
    exhausted: bool,
    sparse: Vec<SparseGrad>,
    dense: Vec<Vec<f32>>,
}

#[derive(Debug, Default)]
struct Barrier {
    tag: u64,
    arrived: Vec<bool>,
    loss: f64,
    rows: u64,
    payload: Vec<u8>,
    generation: u64,
    /// The last barrier passed: (tag, loss, rows, payload).
    passed: Option<(u64, f64, u64, Vec<u8>)>,
}

/// The job, once the chief has sent it.
#[derive(Debug)]
struct Job {
    workers: usize,
    sync: bool,
    seed: u64,
    start_epoch: u64,
    model_json: Vec<u8>,
    rates: Optimizer,
    /// Settings of `hdfs://` checkpoint paths.
    hdfs: rankd_storage::HdfsSettings,
    tables: Vec<Table>,
    dense: Vec<Dense>,
    t: i32,
    round_done: u64,
    all_exhausted: bool,
    pending: Vec<Option<Push>>,
    barrier: Barrier,
    done: Vec<bool>,
    /// Workers that said hello (the chief: INIT).
    joined: Vec<bool>,
    /// Async: workers whose connection dropped, since when.
    absent: Vec<Option<std::time::Instant>>,
}

#[derive(Debug, Default)]
struct State {
    job: Option<Job>,
    failed: Option<String>,
    finished: bool,
}

struct Shared {
    shard: usize,
    shards: usize,
    state: Mutex<State>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `ready` holds or the shard failed (then the failure).
    fn wait<'a>(
        &self,
        mut g: MutexGuard<'a, State>,
        ready: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        loop {
            if let Some(f) = &g.failed {
                return Err(TrainError::Data(f.clone()));
            }
            if ready(&g) {
                return Ok(g);
            }
            g = self.changed.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn fail(&self, why: String) {
        let mut g = self.lock();
        if g.failed.is_none() && !g.finished {
            g.failed = Some(why);
        }
        drop(g);
        self.stop.store(true, Ordering::Relaxed);
        self.changed.notify_all();
    }
}

/// Runs shard `shard` of `shards` on `listener` until every worker is done (Ok) or the job
/// failed (the error names the cause).
pub fn serve(listener: &TcpListener, shard: usize, shards: usize) -> Result<()> {
    let shared = Arc::new(Shared {
        shard,
        shards,
        state: Mutex::new(State::default()),
        changed: Condvar::new(),
        stop: AtomicBool::new(false),
    });
    listener
        .set_nonblocking(true)
        .map_err(|e| TrainError::Data(format!("listen: {e}")))?;
    while !shared.stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                let shared = Arc::clone(&shared);
                std::thread::spawn(move || {
                    if let Err(e) = connection(&shared, s) {
                        shared.fail(format!("ps {}: connection from {peer}: {e}", shared.shard));
                    }
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                let g = shared.lock();
                let late = g.job.as_ref().and_then(|j| {
                    j.absent
                        .iter()
                        .position(|a| a.is_some_and(|t| t.elapsed() > REJOIN_WAIT))
                });
                drop(g);
                if let Some(i) = late {
                    shared.fail(format!(
                        "worker {i} did not rejoin within {}s",
                        REJOIN_WAIT.as_secs()
                    ));
                }
            }
            Err(e) => return Err(TrainError::Data(format!("accept: {e}"))),
        }
    }
    let g = shared.lock();
    match &g.failed {
        Some(f) => Err(TrainError::Data(f.clone())),
        None => Ok(()),
    }
}

/// Serves one worker's connection.
fn connection(shared: &Shared, stream: TcpStream) -> Result<()> {
    let io = |e: std::io::Error| TrainError::Data(e.to_string());
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let mut r = BufReader::with_capacity(1 << 16, stream.try_clone().map_err(io)?);
    let mut w = BufWriter::with_capacity(1 << 16, stream);
    let mut body = Vec::new();
    let mut out = Buf::default();
    // Which worker this connection is, once it said so.
    let mut worker: Option<usize> = None;
    loop {
        let kind = match wire::recv(&mut r, &mut body) {
            Ok(k) => k,
            Err(e) => {
                let mut g = shared.lock();
                let (Some(job), Some(i)) = (g.job.as_mut(), worker) else {
                    // A connection that never joined (a probe, a prefetch link) may go.
                    return Ok(());
                };
                if job.done[i] {
                    return Ok(());
                }
                if !job.sync && i != 0 {
                    // Async: the others go on; the scheduler restarts the worker and it rejoins.
                    job.absent[i] = Some(std::time::Instant::now());
                    eprintln!(
                        "rankd-train: ps {}: worker {i} disconnected ({e}); waiting up to {}s for it to rejoin",
                        shared.shard,
                        REJOIN_WAIT.as_secs()
                    );
                    return Ok(());
                }
                return Err(TrainError::Data(format!(
                    "worker {i} disconnected before it finished ({e})"
                )));
            }
        };
        out.0.clear();
        let mut c = Cursor(&body);
        let reply = match kind {
            wire::INIT => init(shared, &mut c, &mut out).map(|i| {
                worker = Some(i);
                wire::READY
            }),
            wire::HELLO => hello(shared, &mut c, &mut out).map(|i| {
                worker = Some(i);
                wire::READY
            }),
            wire::PULL => pull(shared, &mut c, &mut out).map(|()| wire::ROWS),
            wire::PUSH => push(shared, &mut c).map(|()| 0),
            wire::BARRIER => barrier(shared, &mut c, &mut out).map(|()| wire::PASSED),
            wire::SAVE => {
                let path = c.str()?.to_owned();
                save(shared, Path::new(&path)).map(|()| wire::OK)
            }
            wire::LOAD => {
                let path = c.str()?.to_owned();
                load(shared, Path::new(&path)).map(|()| wire::OK)
            }
            wire::DONE => {
                let i = c.u32()? as usize;
                let mut g = shared.lock();
                if let Some(job) = g.job.as_mut() {
                    if i < job.done.len() {
                        job.done[i] = true;
                    }
                    if job.done.iter().all(|&d| d) {
                        g.finished = true;
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                }
                drop(g);
                shared.changed.notify_all();
                Ok(0)
            }
            other => Err(TrainError::Data(format!("unknown message type {other}"))),
        };
        match reply {
            Ok(0) => {}
            Ok(kind) => wire::send(&mut w, kind, &out.0).map_err(io)?,
            Err(e) => {
                let msg = format!("ps {}: {e}", shared.shard);
                let _ = wire::send(&mut w, wire::ERR, msg.as_bytes());
                // A failed push or a bad message leaves the round undecidable: the job fails.
                if kind == wire::PUSH || kind == wire::INIT {
                    return Err(TrainError::Data(e.to_string()));
                }
            }
        }
    }
}

/// READY: the epoch to start at, whether that epoch's training is already over (a worker
/// rejoining between the epoch's two barriers goes straight to the second), the model config.
fn ready_payload(job: &Job, out: &mut Buf) {
    let (epoch, over) = match job.barrier.passed.as_ref().map(|p| p.0) {
        None => (job.start_epoch, false),
        Some(tag) if tag % 2 == 1 => (tag / 2 + 1, false),
        Some(tag) => (tag / 2, true),
    };
    out.u64(epoch);
    out.u8(u8::from(over));
    out.bytes(&job.model_json);
}

/// How long an asynchronous job waits for a disconnected worker to rejoin.
pub const REJOIN_WAIT: Duration = Duration::from_secs(600);

/// The chief's INIT: worker count, mode, seed, base rate, rates, start epoch, the shard state to
/// restore (a path, or empty), the fitted model config.
fn init(shared: &Shared, c: &mut Cursor<'_>, out: &mut Buf) -> Result<usize> {
    let workers = c.u32()? as usize;
    let sync = c.u8()? == 1;
    let seed = c.u64()?;
    let n_rates = c.u32()? as usize;
    if n_rates == 0 || n_rates > 64 {
        return Err(TrainError::Data(format!(
            "{n_rates} base rates in the job's start"
        )));
    }
    let mut base_rates = Vec::with_capacity(n_rates);
    c.f32s_push(n_rates, &mut base_rates)?;
    let base_rate = base_rates[0];
    let rates = Rates::read(c)?;
    let start_epoch = c.u64()?;
    let restore = c.str()?.to_owned();
    let model_json = c.bytes()?.to_vec();
    let hdfs = rankd_storage::HdfsSettings {
        timeout: Duration::from_millis(c.u64()?),
        config: serde_json::from_slice(c.bytes()?)
            .map_err(|e| TrainError::Data(format!("the chief's hdfs settings: {e}")))?,
    };
    if workers == 0 {
        return Err(TrainError::Data("a job with no workers".into()));
    }
    let model: ModelConfig = serde_json::from_slice(&model_json)
        .map_err(|e| TrainError::Data(format!("the chief's model config: {e}")))?;
    let spec = CompiledSpec::compile(&model.feature_spec())?;
    let layout = Layout::new(&model, &spec)?;
    let cross = model::init_cross(&layout, seed);
    // The multi-task tensors as one process starts them: each head's output bias at the logit of
    // its base rate.
    let mut mt = model::Params {
        mt: model::init_mt(&layout, seed),
        ..model::Params::default()
    };
    model::set_base_rates(&layout, &mut mt, &base_rates);
    let tables: Vec<Table> = layout
        .emb
        .iter()
        .enumerate()
        .map(|(t, e)| (e.dim, Some(t)))
        .chain(layout.wide.iter().map(|_| (1, None)))
        .map(|(dim, emb)| Table {
            dim,
            emb,
            map: RowMap::default(),
            w: Vec::new(),
            acc: Vec::new(),
        })
        .collect();
    let dense: Vec<Dense> = dense_tensors(&layout)
        .into_iter()
        .enumerate()
        .filter(|(d, _)| d % shared.shards == shared.shard)
        .map(|(_, (kind, len))| {
            let w = match kind {
                DenseKind::WideBias => vec![model::initial_wide_bias(&layout, base_rate)],
                DenseKind::Weight(i) => model::init_layer(&layout, seed, i),
                DenseKind::Bias(_) => vec![0.0; len],
                DenseKind::Cross(i, _) => cross[i].clone(),
                DenseKind::Mt(i, _) => mt.mt[i].clone(),
            };
            let m = match kind {
                DenseKind::WideBias => vec![model::ADAGRAD_INIT],
                _ => vec![0.0; len],
            };
            Dense {
                kind,
                w,
                m,
                v: vec![0.0; len],
            }
        })
        .collect();
    let mut job = Job {
        workers,
        sync,
        seed,
        start_epoch,
        model_json,
        rates: rates.optimizer(),
        hdfs,
        tables,
        dense,
        t: 0,
        round_done: 0,
        all_exhausted: false,
        pending: (0..workers).map(|_| None).collect(),
        barrier: Barrier {
            arrived: vec![false; workers],
            ..Barrier::default()
        },
        done: vec![false; workers],
        joined: vec![false; workers],
        absent: vec![None; workers],
    };
    if !restore.is_empty() {
        read_state(&mut job, shared, Path::new(&restore))?;
    }
    ready_payload(&job, out);
    let mut g = shared.lock();
    if g.job.is_some() {
        return Err(TrainError::Data(
            "the job was initialized already (a second chief, or a restarted one)".into(),
        ));
    }
    g.job = Some(job);
    drop(g);
    shared.changed.notify_all();
    Ok(0)
}

fn hello(shared: &Shared, c: &mut Cursor<'_>, out: &mut Buf) -> Result<usize> {
    let i = c.u32()? as usize;
    let mut g = shared.wait(shared.lock(), |s| s.job.is_some())?;
    let job = g.job.as_mut().expect("waited for it");
    if i == 0 || i >= job.workers {
        return Err(TrainError::Data(format!(
            "worker {i} joined a job of {} workers (0 is the chief)",
            job.workers
        )));
    }
    if job.absent[i].take().is_some() {
        // A restarted worker: it redoes the epoch its predecessor was in.
        job.barrier.arrived[i] = false;
        eprintln!("rankd-train: ps {}: worker {i} rejoined", shared.shard);
    } else if job.joined[i] {
        return Err(TrainError::Data(format!("worker {i} joined twice")));
    }
    job.joined[i] = true;
    ready_payload(job, out);
    Ok(i)
}

/// PULL: the round it belongs to (sync: wait until the round before it is applied; 0: no
/// wait), whether the dense tensors are wanted, then per table the ids. Reply: the round
/// before's "every worker's share was used up" flag, the rows' values, the dense tensors.
fn pull(shared: &Shared, c: &mut Cursor<'_>, out: &mut Buf) -> Result<()> {
    let round = c.u64()?;
    let want_dense = c.u8()? == 1;
    let g = shared.wait(shared.lock(), |s| {
        s.job
            .as_ref()
            .is_some_and(|j| !j.sync || round == 0 || j.round_done + 1 >= round)
    })?;
    let job = g.job.as_ref().expect("waited for it");
    out.u8(u8::from(job.all_exhausted));
    let mut ids = Vec::new();
    let mut row = Vec::new();
    for table in &job.tables {
        c.u32s(&mut ids)?;
        row.resize(table.dim, 0.0);
        for &id in &ids {
            if id as usize % shared.shards != shared.shard {
                return Err(TrainError::Data(format!(
                    "row {id} was asked of shard {} of {}",
                    shared.shard, shared.shards
                )));
            }
            match table.map.get(&id) {
                Some(&at) => {
                    let at = at as usize * table.dim;
                    out.f32s(&table.w[at..at + table.dim]);
                }
                None => {
                    Table::initial(table.emb, job.seed, id, &mut row);
                    out.f32s(&row);
                }
            }
        }
    }
    if want_dense {
        for d in &job.dense {
            out.f32s(&d.w);
        }
    }
    Ok(())
}

/// PUSH: round, worker, rows in the batch, whether the worker's share is used up, then per table
/// the touched rows this shard owns with their gradients, then the gradients of the dense
/// tensors it owns.
fn push(shared: &Shared, c: &mut Cursor<'_>) -> Result<()> {
    let round = c.u64()?;
    let worker = c.u32()? as usize;
    let n = c.u32()?;
    let exhausted = c.u8()? == 1;
    let mut g = shared.lock();
    let job = g
        .job
        .as_mut()
        .ok_or_else(|| TrainError::Data("a push before the job started".into()))?;
    if worker >= job.workers {
        return Err(TrainError::Data(format!("a push from worker {worker}")));
    }
    let mut p = Push {
        n,
        exhausted,
        sparse: job.tables.iter().map(|t| SparseGrad::new(t.dim)).collect(),
        dense: Vec::with_capacity(job.dense.len()),
    };
    let mut ids = Vec::new();
    for (sg, t) in p.sparse.iter_mut().zip(&job.tables) {
        c.u32s(&mut ids)?;
        if let Some(bad) = ids
            .iter()
            .find(|&&id| id as usize % shared.shards != shared.shard)
        {
            return Err(TrainError::Data(format!(
                "row {bad} was pushed to shard {} of {}",
                shared.shard, shared.shards
            )));
        }
        let mut values = Vec::new();
        c.f32s_push(ids.len() * t.dim, &mut values)?;
        sg.set(std::mem::take(&mut ids), values)
            .map_err(|e| TrainError::Data(format!("bad sparse gradient: {e}")))?;
    }
    for d in &job.dense {
        let mut v = Vec::new();
        c.f32s_push(d.w.len(), &mut v)?;
        p.dense.push(v);
    }
    if !c.0.is_empty() {
        return Err(TrainError::Data("trailing bytes after a push".into()));
    }
    if !job.sync {
        if n > 0 {
            apply(job, &p.sparse, &p.dense);
        }
        return Ok(());
    }
    if round != job.round_done + 1 {
        return Err(TrainError::Data(format!(
            "worker {worker} pushed round {round}; the shard is at round {}",
            job.round_done + 1
        )));
    }
    if job.pending[worker].is_some() {
        return Err(TrainError::Data(format!(
            "worker {worker} pushed round {round} twice"
        )));
    }
    job.pending[worker] = Some(p);
    if job.pending.iter().all(Option::is_some) {
        let pushes: Vec<Push> = job
            .pending
            .iter_mut()
            .map(|p| p.take().expect("all"))
            .collect();
        let total: u32 = pushes.iter().map(|p| p.n).sum();
        job.all_exhausted = pushes.iter().all(|p| p.exhausted);
        if total > 0 {
            // Combined in worker order, weighted by rows: the same sums as one process.
            let mut sparse: Vec<SparseGrad> =
                job.tables.iter().map(|t| SparseGrad::new(t.dim)).collect();
            let mut dense: Vec<Vec<f32>> = job.dense.iter().map(|d| vec![0.0; d.w.len()]).collect();
            for p in &pushes {
                let scale = p.n as f32 / total as f32;
                for (a, b) in sparse.iter_mut().zip(&p.sparse) {
                    a.merge(b, scale);
                }
                for (a, b) in dense.iter_mut().zip(&p.dense) {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += scale * y);
                }
            }
            apply(job, &sparse, &dense);
        }
        job.round_done += 1;
        drop(g);
        shared.changed.notify_all();
    }
    Ok(())
}

/// One optimizer step on this shard's rows and tensors.
fn apply(job: &mut Job, sparse: &[SparseGrad], dense: &[Vec<f32>]) {
    job.t += 1;
    let h = job.rates.hyper(job.t);
    let seed = job.seed;
    for (table, sg) in job.tables.iter_mut().zip(sparse) {
        let dim = table.dim;
        for (j, &row) in sg.rows.iter().enumerate() {
            let at = match table.map.get(&row) {
                Some(&at) => at as usize,
                None => {
                    let at = table.map.len();
                    table.map.insert(row, at as u32);
                    table.w.resize((at + 1) * dim, 0.0);
                    table.acc.resize((at + 1) * dim, model::ADAGRAD_INIT);
                    Table::initial(table.emb, seed, row, &mut table.w[at * dim..]);
                    at
                }
            };
            model::adagrad_row(
                &h,
                &mut table.w[at * dim..(at + 1) * dim],
                &mut table.acc[at * dim..(at + 1) * dim],
                &sg.values[j * dim..(j + 1) * dim],
            );
        }
    }
    for (d, g) in job.dense.iter_mut().zip(dense) {
        match d.kind {
            DenseKind::WideBias => model::adagrad_bias(&h, &mut d.w[0], &mut d.m[0], g[0]),
            DenseKind::Weight(_) => model::adam(&h, &mut d.w, g, &mut d.m, &mut d.v, true),
            DenseKind::Bias(_) => model::adam(&h, &mut d.w, g, &mut d.m, &mut d.v, false),
            DenseKind::Cross(_, decay) | DenseKind::Mt(_, decay) => {
                model::adam(&h, &mut d.w, g, &mut d.m, &mut d.v, decay)
            }
        }
    }
}

/// BARRIER (shard 0 only): tag, worker, its loss and rows, a payload (the chief's is passed on).
/// Reply when every worker arrived: summed loss and rows, the chief's payload.
fn barrier(shared: &Shared, c: &mut Cursor<'_>, out: &mut Buf) -> Result<()> {
    let tag = c.u64()?;
    let worker = c.u32()? as usize;
    let loss = c.f64()?;
    let rows = c.u64()?;
    let payload = c.bytes()?.to_vec();
    let mut g = shared.lock();
    let job = g
        .job
        .as_mut()
        .ok_or_else(|| TrainError::Data("a barrier before the job started".into()))?;
    if worker >= job.workers {
        return Err(TrainError::Data(format!("a barrier from worker {worker}")));
    }
    let b = &mut job.barrier;
    if !b.arrived.iter().any(|&a| a) {
        b.tag = tag;
        b.loss = 0.0;
        b.rows = 0;
        b.payload.clear();
    }
    if b.tag != tag || b.arrived[worker] {
        return Err(TrainError::Data(format!(
            "worker {worker} reached barrier {tag} while the others are at {}",
            b.tag
        )));
    }
    b.arrived[worker] = true;
    b.loss += loss;
    b.rows += rows;
    if worker == 0 {
        b.payload = payload;
    }
    let generation = b.generation;
    if b.arrived.iter().all(|&a| a) {
        b.passed = Some((tag, b.loss, b.rows, std::mem::take(&mut b.payload)));
        b.arrived.iter_mut().for_each(|a| *a = false);
        b.generation += 1;
        shared.changed.notify_all();
    }
    let g = shared.wait(g, |s| {
        s.job
            .as_ref()
            .is_some_and(|j| j.barrier.generation != generation)
    })?;
    let (_, loss, rows, payload) = g
        .job
        .as_ref()
        .and_then(|j| j.barrier.passed.as_ref())
        .expect("passed");
    out.f64(*loss);
    out.u64(*rows);
    out.bytes(payload);
    Ok(())
}

const MAGIC: &[u8; 8] = b"RKDPSSH1";

/// The file of this shard's state in a checkpoint directory.
pub fn shard_file(dir: &Path, shard: usize, shards: usize) -> std::path::PathBuf {
    dir.join(format!("shard-{shard}-of-{shards}"))
}

/// Writes this shard's state under `dir` (a local or `hdfs://` directory): to a temporary file,
/// synced, then moved or uploaded into place.
fn save(shared: &Shared, dir: &Path) -> Result<()> {
    let g = shared.lock();
    let job = g
        .job
        .as_ref()
        .ok_or_else(|| TrainError::Data("save before the job started".into()))?;
    let path = shard_file(dir, shared.shard, shared.shards);
    let io = |e: std::io::Error| TrainError::Data(format!("checkpoint {}: {e}", path.display()));
    let scratch = tempfile::tempdir().map_err(io)?;
    let tmp = super::store::staging(&path, &scratch)?;
    let mut out = BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp).map_err(io)?);
    let mut b = Buf::default();
    b.0.extend_from_slice(MAGIC);
    b.u32(shared.shard as u32);
    b.u32(shared.shards as u32);
    b.u64(job.t as u64);
    b.u32(job.tables.len() as u32);
    out.write_all(&b.0).map_err(io)?;
    for t in &job.tables {
        let mut ids = vec![0u32; t.map.len()];
        for (&id, &at) in &t.map {
            ids[at as usize] = id;
        }
        let mut b = Buf::default();
        b.u32(t.dim as u32);
        b.u32s(&ids);
        b.f32s(&t.w);
        b.f32s(&t.acc);
        out.write_all(&b.0).map_err(io)?;
    }
    let mut b = Buf::default();
    b.u32(job.dense.len() as u32);
    for d in &job.dense {
        b.u64(d.w.len() as u64);
        b.f32s(&d.w);
        b.f32s(&d.m);
        b.f32s(&d.v);
    }
    out.write_all(&b.0).map_err(io)?;
    let file = out.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    drop(file);
    super::store::put(&tmp, &path, &job.hdfs)
}

/// Replaces this shard's state with the one saved under `dir`.
fn load(shared: &Shared, dir: &Path) -> Result<()> {
    let mut g = shared.lock();
    let job = g
        .job
        .as_mut()
        .ok_or_else(|| TrainError::Data("load before the job started".into()))?;
    read_state(job, shared, dir)
}

fn read_state(job: &mut Job, shared: &Shared, dir: &Path) -> Result<()> {
    let path = shard_file(dir, shared.shard, shared.shards);
    let bytes = super::store::get(&path, &job.hdfs)?
        .ok_or_else(|| TrainError::Data(format!("checkpoint {}: missing", path.display())))?;
    let bad = |m: &str| TrainError::Data(format!("checkpoint {}: {m}", path.display()));
    let mut c = Cursor(&bytes);
    if c.take(8)? != MAGIC {
        return Err(bad("not a parameter-server shard checkpoint"));
    }
    let (shard, shards) = (c.u32()? as usize, c.u32()? as usize);
    if (shard, shards) != (shared.shard, shared.shards) {
        return Err(bad(&format!(
            "written by shard {shard} of {shards}, read by shard {} of {}",
            shared.shard, shared.shards
        )));
    }
    let t = c.u64()? as i32;
    if c.u32()? as usize != job.tables.len() {
        return Err(bad("a different model (table count)"));
    }
    let mut ids = Vec::new();
    for table in job.tables.iter_mut() {
        if c.u32()? as usize != table.dim {
            return Err(bad("a different model (table dimension)"));
        }
        c.u32s(&mut ids)?;
        table.map = ids
            .iter()
            .enumerate()
            .map(|(i, &id)| (id, i as u32))
            .collect();
        table.w.clear();
        c.f32s_push(ids.len() * table.dim, &mut table.w)?;
        table.acc.clear();
        c.f32s_push(ids.len() * table.dim, &mut table.acc)?;
    }
    if c.u32()? as usize != job.dense.len() {
        return Err(bad("a different model (dense tensors)"));
    }
    for d in &mut job.dense {
        if c.u64()? as usize != d.w.len() {
            return Err(bad("a different model (dense tensor size)"));
        }
        c.f32s_into(&mut d.w)?;
        c.f32s_into(&mut d.m)?;
        c.f32s_into(&mut d.v)?;
    }
    job.t = t;
    Ok(())
}
