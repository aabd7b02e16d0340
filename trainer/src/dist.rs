//! Training across processes: a parameter server (`rankd-train ps`), K workers
//! (`rankd-train worker`) over TCP, and a launcher (`rankd-train --processes K`) that starts
//! them and fails loudly when one dies.
//!
//! The server reads the training files to fit the slots (vocabularies, boundaries) and sends
//! the fitted model config to every worker; each worker then reads only its own share of the
//! training data (of every file, the `i`-th of `K` byte ranges, split at line boundaries: see
//! [`crate::data::Share`]) and reports how many rows it holds. The server's epoch order runs
//! over the concatenation of the shares (worker 0's rows, then worker 1's, ...), and each step
//! sends every worker the rows of that step that are its own. The server owns the epoch order,
//! the checkpoints and the authoritative parameters. Each step it sends worker i the rows of its shard together with the
//! combined gradients of the previous step; the worker applies those with its own copy of the
//! optimizer (the same deterministic update the server applies, so the replicas stay equal),
//! computes its shard's gradients and sends them back. The server combines the K gradients
//! (weighted by shard size, in worker order) and applies them. Synchronous and deterministic for
//! a given seed and K. In asynchronous mode (`mode = "async"`) the batches are dealt
//! round-robin; the server sends the current parameters with each one and applies each worker's
//! gradients as they come, without a barrier.
//!
//! Messages: a u32 length, a type byte, then the payload; integers little-endian.

use std::io::{BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::error::{Result, TrainError};
use crate::model::{Compute, CpuCompute, Grads, Optimizer, Params, SparseGrad};
use crate::TrainConfig;

const HELLO: u8 = 1;
const INIT: u8 = 2;
const STEP: u8 = 3;
const GRADS: u8 = 4;
const STOP: u8 = 5;
const ASTEP: u8 = 6;
/// Server to worker: the worker count, then the fitted model config (JSON).
const CONFIG: u8 = 7;
/// Worker to server: how many training rows its share holds.
const ROWS: u8 = 8;

fn net(what: &str, e: std::io::Error) -> TrainError {
    TrainError::Data(format!("{what}: {e}"))
}

#[derive(Default)]
struct Buf(Vec<u8>);

impl Buf {
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn f32s(&mut self, v: &[f32]) {
        self.u64(v.len() as u64);
        for x in v {
            self.0.extend_from_slice(&x.to_le_bytes());
        }
    }
    fn sparse(&mut self, g: &SparseGrad) {
        self.u64(g.rows.len() as u64);
        for &r in &g.rows {
            self.u32(r);
        }
        self.f32s(&g.values);
    }
    fn grads(&mut self, g: &Grads) {
        g.emb.iter().for_each(|s| self.sparse(s));
        g.wide.iter().for_each(|s| self.sparse(s));
        self.f32s(&[g.wide_bias]);
        g.w.iter().chain(&g.b).for_each(|t| self.f32s(t));
    }
}

struct Cursor<'a>(&'a [u8]);

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.0.len() < n {
            return Err(TrainError::Data("truncated message".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn f64(&mut self) -> Result<f64> {
        Ok(f64::from_bits(self.u64()?))
    }
    fn f32s_into(&mut self, out: &mut [f32]) -> Result<()> {
        let n = self.u64()? as usize;
        if n != out.len() {
            return Err(TrainError::Data(format!(
                "tensor of {n} values where {} were expected",
                out.len()
            )));
        }
        let bytes = self.take(4 * n)?;
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
            *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        }
        Ok(())
    }
    fn f32s(&mut self) -> Result<Vec<f32>> {
        let n = self.u64()? as usize;
        let bytes = self.take(4 * n)?;
        Ok(bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }
    fn sparse(&mut self, g: &mut SparseGrad) -> Result<()> {
        let n = self.u64()? as usize;
        let mut rows = Vec::with_capacity(n);
        for _ in 0..n {
            rows.push(self.u32()?);
        }
        let values = self.f32s()?;
        g.set(rows, values)
            .map_err(|e| TrainError::Data(format!("bad sparse gradient: {e}")))
    }
    fn grads(&mut self, g: &mut Grads) -> Result<()> {
        for s in g.emb.iter_mut().chain(g.wide.iter_mut()) {
            self.sparse(s)?;
        }
        let mut bias = [0f32];
        self.f32s_into(&mut bias)?;
        g.wide_bias = bias[0];
        for t in g.w.iter_mut().chain(g.b.iter_mut()) {
            self.f32s_into(t)?;
        }
        Ok(())
    }
}

fn send(w: &mut impl Write, kind: u8, payload: &[u8]) -> std::io::Result<()> {
    w.write_all(&((payload.len() + 1) as u32).to_le_bytes())?;
    w.write_all(&[kind])?;
    w.write_all(payload)?;
    w.flush()
}

fn recv(r: &mut impl Read) -> std::io::Result<(u8, Vec<u8>)> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len == 0 || len > 1 << 31 {
        return Err(std::io::Error::other("bad message length"));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    let kind = body.remove(0);
    Ok((kind, body))
}

fn state_payload(params: &Params, opt: &Optimizer) -> Vec<u8> {
    let mut b = Buf::default();
    let (mut p, mut o) = (params.clone(), opt.clone());
    for t in p.tensors_mut().into_iter().chain(o.tensors_mut()) {
        b.f32s(t);
    }
    b.0
}

struct Link {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

/// The server's side of the workers.
pub struct Remote {
    links: Vec<Link>,
    /// Where each worker's rows start in the epoch order's numbering (prefix sums of the share
    /// sizes, one more entry than workers).
    offsets: Vec<usize>,
    pending: Option<Grads>,
    scratch: Vec<Grads>,
    synced: bool,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Remote")
            .field("workers", &self.links.len())
            .finish()
    }
}

impl Remote {
    /// Accepts `k` workers on `listener` (each says which index it is).
    pub fn accept(
        listener: &TcpListener,
        k: usize,
        layout: &crate::model::Layout,
    ) -> Result<Remote> {
        let mut links: Vec<Option<Link>> = (0..k).map(|_| None).collect();
        for _ in 0..k {
            let (s, _) = listener.accept().map_err(|e| net("accept", e))?;
            s.set_nodelay(true).map_err(|e| net("socket", e))?;
            let mut r = BufReader::new(s.try_clone().map_err(|e| net("socket", e))?);
            let (kind, body) = recv(&mut r).map_err(|e| net("hello", e))?;
            let i = (kind == HELLO && body.len() == 8)
                .then(|| u64::from_le_bytes(body[..8].try_into().expect("8 bytes")) as usize)
                .filter(|&i| i < k && links[i].is_none())
                .ok_or_else(|| TrainError::Data("a worker sent a bad hello".into()))?;
            links[i] = Some(Link {
                r,
                w: BufWriter::new(s),
            });
        }
        Ok(Remote {
            links: links
                .into_iter()
                .map(|l| l.expect("every index connected"))
                .collect(),
            offsets: Vec::new(),
            pending: None,
            scratch: (0..k).map(|_| Grads::new(layout)).collect(),
            synced: false,
        })
    }

    /// Sends every worker the fitted model config and collects the size of its share; the shares
    /// must add up to the `rows` the server read.
    pub fn distribute(
        &mut self,
        model: &rankd_formats::config::ModelConfig,
        rows: usize,
    ) -> Result<()> {
        let json = serde_json::to_vec(model)
            .map_err(|e| TrainError::Data(format!("model config: {e}")))?;
        let mut b = Buf::default();
        b.u64(self.links.len() as u64);
        b.0.extend_from_slice(&json);
        for (i, l) in self.links.iter_mut().enumerate() {
            send(&mut l.w, CONFIG, &b.0).map_err(|e| net(&format!("worker {i}"), e))?;
        }
        let mut offsets = vec![0usize];
        for (i, l) in self.links.iter_mut().enumerate() {
            let (kind, body) =
                recv(&mut l.r).map_err(|e| net(&format!("worker {i} is gone"), e))?;
            if kind != ROWS {
                return Err(TrainError::Data(format!("worker {i} sent message {kind}")));
            }
            let n = Cursor(&body).u64()? as usize;
            offsets.push(offsets[i] + n);
        }
        if offsets[self.links.len()] != rows {
            return Err(TrainError::Data(format!(
                "the workers' shares hold {} rows, the server read {rows}",
                offsets[self.links.len()]
            )));
        }
        self.offsets = offsets;
        Ok(())
    }

    /// The worker that holds row `g` of the epoch numbering, and the row's index in its share.
    fn owner(&self, g: usize) -> (usize, usize) {
        let w = self.offsets.partition_point(|&o| o <= g) - 1;
        (w, g - self.offsets[w])
    }

    /// Sends the full state once (at the start, or after resuming from a checkpoint).
    pub fn sync(&mut self, params: &Params, opt: &Optimizer) -> Result<()> {
        if self.synced {
            return Ok(());
        }
        let payload = state_payload(params, opt);
        for (i, l) in self.links.iter_mut().enumerate() {
            send(&mut l.w, INIT, &payload).map_err(|e| net(&format!("worker {i}"), e))?;
        }
        self.pending = None;
        self.synced = true;
        Ok(())
    }

    /// One synchronous step over `batch`; returns the summed loss.
    pub fn step(
        &mut self,
        params: &mut Params,
        opt: &mut Optimizer,
        batch: &[usize],
    ) -> Result<f64> {
        let k = self.links.len();
        // Each worker computes the rows of this step that are in its share.
        let mut shards: Vec<Vec<usize>> = vec![Vec::new(); k];
        for &g in batch {
            let (w, local) = self.owner(g);
            shards[w].push(local);
        }
        let mut prefix = Buf::default();
        match &self.pending {
            Some(g) => {
                prefix.0.push(1);
                prefix.grads(g);
            }
            None => prefix.0.push(0),
        }
        for (i, l) in self.links.iter_mut().enumerate() {
            let mut b = Buf(prefix.0.clone());
            let shard: &[usize] = &shards[i];
            b.u64(shard.len() as u64);
            for &r in shard {
                b.u32(r as u32);
            }
            send(&mut l.w, STEP, &b.0).map_err(|e| net(&format!("worker {i} is gone"), e))?;
        }
        let mut loss = 0f64;
        for (i, l) in self.links.iter_mut().enumerate() {
            let (kind, body) =
                recv(&mut l.r).map_err(|e| net(&format!("worker {i} is gone"), e))?;
            if kind != GRADS {
                return Err(TrainError::Data(format!("worker {i} sent message {kind}")));
            }
            let mut c = Cursor(&body);
            loss += c.f64()?;
            c.grads(&mut self.scratch[i])?;
        }
        let n = batch.len() as f32;
        let (first, rest) = self.scratch.split_at_mut(1);
        let total = &mut first[0];
        total.scale(shards[0].len() as f32 / n);
        for (g, shard) in rest.iter().zip(&shards[1..]) {
            total.merge(g, shard.len() as f32 / n);
        }
        opt.apply(params, total);
        self.pending = Some(total.clone());
        Ok(loss)
    }

    /// One asynchronous epoch: the batches are dealt round-robin to the workers; for each one
    /// the server sends the current parameters and the rows, and applies the returned gradients
    /// as soon as they arrive, without waiting for the other workers. Returns the summed loss.
    pub fn async_epoch(
        &mut self,
        params: &mut Params,
        opt: &mut Optimizer,
        order: &[usize],
        batch_size: usize,
        done: &std::sync::atomic::AtomicUsize,
    ) -> Result<f64> {
        use std::sync::{Mutex, RwLock};
        let k = self.links.len();
        // Each worker's batches: its own rows, in the epoch's order.
        let mut mine: Vec<Vec<usize>> = vec![Vec::new(); k];
        for &g in order {
            let (w, local) = self.owner(g);
            mine[w].push(local);
        }
        let per_worker: Vec<Vec<&[usize]>> = mine
            .iter()
            .map(|rows| rows.chunks(batch_size.max(1)).collect())
            .collect();
        let shared = RwLock::new(std::mem::take(params));
        let optimizer = Mutex::new(std::mem::take(opt));
        let results: Vec<Result<f64>> = std::thread::scope(|scope| {
            let handles: Vec<_> = self
                .links
                .iter_mut()
                .zip(self.scratch.iter_mut())
                .enumerate()
                .map(|(i, (link, grads))| {
                    let (shared, optimizer, batches) = (&shared, &optimizer, &per_worker[i]);
                    scope.spawn(move || -> Result<f64> {
                        let gone = |e| net(&format!("worker {i} is gone"), e);
                        let mut loss = 0f64;
                        for batch in batches.iter() {
                            let mut b = Buf::default();
                            {
                                let p = shared.read().unwrap_or_else(|e| e.into_inner());
                                let mut snapshot = p.clone();
                                for t in snapshot.tensors_mut() {
                                    b.f32s(t);
                                }
                            }
                            b.u64(batch.len() as u64);
                            for &r in batch.iter() {
                                b.u32(r as u32);
                            }
                            send(&mut link.w, ASTEP, &b.0).map_err(gone)?;
                            let (kind, body) = recv(&mut link.r).map_err(gone)?;
                            if kind != GRADS {
                                return Err(TrainError::Data(format!(
                                    "worker {i} sent message {kind}"
                                )));
                            }
                            let mut c = Cursor(&body);
                            loss += c.f64()?;
                            c.grads(grads)?;
                            let mut p = shared.write().unwrap_or_else(|e| e.into_inner());
                            optimizer
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .apply(&mut p, grads);
                            done.fetch_add(batch.len(), std::sync::atomic::Ordering::Relaxed);
                        }
                        Ok(loss)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("server thread panicked"))
                .collect()
        });
        *params = shared.into_inner().unwrap_or_else(|e| e.into_inner());
        *opt = optimizer.into_inner().unwrap_or_else(|e| e.into_inner());
        // Replicas of the sync protocol are stale now; a later sync step starts over.
        self.synced = false;
        self.pending = None;
        results.into_iter().sum()
    }

    /// Tells every worker to exit.
    pub fn stop(&mut self) {
        for l in &mut self.links {
            let _ = send(&mut l.w, STOP, &[]);
        }
    }
}

/// Runs the parameter server: accepts `workers` workers on `listener`, trains, writes the model.
pub fn run_ps(
    config: &TrainConfig,
    listener: &TcpListener,
    workers: usize,
    output: &std::path::Path,
    checkpoint: &std::path::Path,
    resume: bool,
    log: &mut dyn Write,
) -> Result<f64> {
    if config.train.eval_split.is_some() {
        return Err(TrainError::Config(
            "valid_split needs every row in one process; with worker processes give valid_files"
                .into(),
        ));
    }
    // The layout and the fitted config are needed before training starts; `prepare` is cheap
    // next to training.
    let prepared = crate::prepare(config, &mut std::io::sink())?;
    let mut remote = Remote::accept(listener, workers, &prepared.layout)?;
    remote.distribute(&prepared.model, prepared.train.labels.len())?;
    drop(prepared);
    let trained = crate::train_with(config, Some((checkpoint, resume)), Some(&mut remote), log)?;
    remote.stop();
    crate::write(config, &trained, output)?;
    Ok(trained.kept().auc)
}

/// Runs a worker until the server says stop.
pub fn run_worker(config: &TrainConfig, ps: SocketAddr, index: usize) -> Result<()> {
    let s = TcpStream::connect(ps).map_err(|e| net("connect to the server", e))?;
    s.set_nodelay(true).map_err(|e| net("socket", e))?;
    let mut r = BufReader::new(s.try_clone().map_err(|e| net("socket", e))?);
    let mut w = BufWriter::new(s);
    send(&mut w, HELLO, &(index as u64).to_le_bytes()).map_err(|e| net("hello", e))?;
    // The fitted config from the server, then this worker's share of the data, read alone.
    let (kind, body) = recv(&mut r).map_err(|e| net("the server is gone", e))?;
    if kind != CONFIG || body.len() < 8 {
        return Err(TrainError::Data(format!(
            "expected the config, got message {kind}"
        )));
    }
    let count = u64::from_le_bytes(body[..8].try_into().expect("8 bytes")) as usize;
    let fitted: rankd_formats::config::ModelConfig = serde_json::from_slice(&body[8..])
        .map_err(|e| TrainError::Data(format!("the server's model config: {e}")))?;
    let spec = rankd_feature_ops::CompiledSpec::compile(&fitted.feature_spec())?;
    let layout = crate::model::Layout::new(&fitted, &spec)?;
    let raw = crate::data::read_share(
        &config.train.train_files,
        &fitted.features,
        &config.train,
        crate::data::Share { index, count },
    )?;
    let data = crate::data::transform(raw, &spec)?;
    send(&mut w, ROWS, &(data.labels.len() as u64).to_le_bytes())
        .map_err(|e| net("the server is gone", e))?;
    let mut params = Params::default();
    let mut opt = Optimizer::default();
    let mut compute = CpuCompute::default();
    let mut grads = Grads::new(&layout);
    let mut pending = Grads::new(&layout);
    let mut rows = Vec::new();
    loop {
        let (kind, body) = recv(&mut r).map_err(|e| net("the server is gone", e))?;
        let mut c = Cursor(&body);
        match kind {
            INIT => {
                params = Params::init(&layout, 0, 0.5);
                opt = config.optimizer(&params);
                for t in params.tensors_mut().into_iter().chain(opt.tensors_mut()) {
                    c.f32s_into(t)?;
                }
                opt.sync_step();
            }
            STEP | ASTEP => {
                if kind == STEP {
                    // Sync: bring the replica up to date with the previous step's update.
                    if c.take(1)?[0] == 1 {
                        c.grads(&mut pending)?;
                        opt.apply(&mut params, &pending);
                    }
                } else {
                    // Async: the parameters come with the step.
                    if params.emb.is_empty() && params.w.is_empty() && params.wide.is_empty() {
                        params = Params::init(&layout, 0, 0.5);
                    }
                    for t in params.tensors_mut() {
                        c.f32s_into(t)?;
                    }
                }
                let n = c.u64()? as usize;
                rows.clear();
                for _ in 0..n {
                    let r = c.u32()? as usize;
                    if r >= data.labels.len() {
                        return Err(TrainError::Data(format!("row {r} is out of range")));
                    }
                    rows.push(r);
                }
                let loss = if rows.is_empty() {
                    0.0
                } else {
                    compute.step(
                        &layout,
                        &params,
                        &data.slots,
                        &data.labels,
                        &rows,
                        &mut grads,
                    )
                };
                let mut b = Buf::default();
                b.f64(loss);
                b.grads(&grads);
                send(&mut w, GRADS, &b.0).map_err(|e| net("the server is gone", e))?;
            }
            STOP => return Ok(()),
            other => return Err(TrainError::Data(format!("unexpected message {other}"))),
        }
    }
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// Starts a server and `k` workers as processes of `exe` and waits for them. Any process that
/// fails makes the launcher stop the others and return an error naming it.
pub fn launch(
    exe: &std::path::Path,
    config_path: &std::path::Path,
    k: usize,
    output: &std::path::Path,
    resume: bool,
) -> Result<()> {
    let mut ps_cmd = Command::new(exe);
    ps_cmd
        .args(["ps", "--config"])
        .arg(config_path)
        .args([
            "--workers",
            &k.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--output",
        ])
        .arg(output)
        .stdout(Stdio::piped());
    if resume {
        ps_cmd.arg("--resume");
    }
    let mut ps = ps_cmd.spawn().map_err(|e| net("start the server", e))?;
    // The server's first line of output is its address.
    let mut line = String::new();
    {
        let out = ps.stdout.as_mut().expect("piped");
        let mut byte = [0u8; 1];
        while out.read(&mut byte).map_err(|e| net("server output", e))? == 1 && byte[0] != b'\n' {
            line.push(byte[0] as char);
        }
    }
    let addr = line
        .trim()
        .strip_prefix("ps listening on ")
        .and_then(|a| a.parse::<SocketAddr>().ok())
        .ok_or_else(|| {
            let _ = ps.kill();
            TrainError::Data(format!("the server did not start (said {line:?})"))
        })?;
    let mut children: Vec<(String, Child)> = vec![("server".into(), ps)];
    for i in 0..k {
        let child = Command::new(exe)
            .args(["worker", "--config"])
            .arg(config_path)
            .args(["--ps", &addr.to_string(), "--index", &i.to_string()])
            .spawn()
            .map_err(|e| net("start a worker", e))?;
        eprintln!("rankd-train: started worker {i} (pid {})", child.id());
        children.push((format!("worker {i}"), child));
    }
    eprintln!("rankd-train: server pid {}", children[0].1.id());
    let mut done = vec![false; children.len()];
    loop {
        for (j, (name, child)) in children.iter_mut().enumerate() {
            if done[j] {
                continue;
            }
            if let Some(status) = child.try_wait().map_err(|e| net("wait", e))? {
                done[j] = true;
                if !status.success() {
                    let msg = format!("{name} failed ({}); stopping the others", describe(status));
                    for (_, c) in children.iter_mut() {
                        let _ = c.kill();
                        let _ = c.wait();
                    }
                    return Err(TrainError::Data(msg));
                }
            }
        }
        if done.iter().all(|&d| d) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
