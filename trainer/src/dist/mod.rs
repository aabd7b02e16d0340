//! Training across processes and machines: K parameter-server shards ([`ps`]) and W workers
//! ([`worker`]), described by a `TF_CONFIG` ([`crate::cluster`]), and a local launcher
//! ([`launch`]) that writes that description for the processes it starts.
//!
//! Placement: row `r` of every embedding and wide table lives on shard `r % K` (in a hash map:
//! only rows a gradient touched take memory); dense tensor `d` of [`dense_tensors`] on shard
//! `d % K`. Worker 0 is the chief: it fits the slots, initializes the shards, evaluates after
//! every epoch, decides early stopping, coordinates checkpoints and writes the model file,
//! streaming each table from the shards. Every worker streams its own share of the training
//! files ([`crate::data::Share`]) through a bounded shuffle buffer on a reader thread.
//!
//! Each step a worker pulls the rows its batch touches and the dense tensors from every shard in
//! parallel (requests to all shards first, then the answers), computes, and pushes each shard the
//! gradients of what it owns. The wire format is in [`wire`].

pub mod launch;
pub mod ps;
pub mod wire;
pub mod worker;

use std::io::{BufReader, BufWriter};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::config::TrainSettings;
use crate::error::{Result, TrainError};
use crate::model::{Layout, Optimizer, Params};
use wire::{Buf, Cursor};

pub use launch::launch;

/// A dense tensor of the network, in the order shards are dealt them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenseKind {
    /// The wide part's bias (Adagrad, as in one process).
    WideBias,
    /// Deep layer `i`'s weights (Adam with L2).
    Weight(usize),
    /// Deep layer `i`'s bias (Adam).
    Bias(usize),
    /// DCN-v2 cross tensor `i` ([`crate::model::CrossSpec::tensors`] order; Adam, with L2 on
    /// weights, not biases).
    Cross(usize, bool),
    /// Multi-task tensor `i` ([`crate::model::MtSpec::tensors`] order; Adam, with L2 on
    /// weights, not biases).
    Mt(usize, bool),
}

/// The dense tensors with their lengths: the wide bias (with a wide part), then each layer's
/// weights and bias, then the cross tensors, then the multi-task tensors. Tensor `d` lives on shard `d % K`.
pub fn dense_tensors(layout: &Layout) -> Vec<(DenseKind, usize)> {
    let mut v = Vec::new();
    if layout.has_wide {
        v.push((DenseKind::WideBias, 1));
    }
    for (i, &(inp, out)) in layout.layers.iter().enumerate() {
        v.push((DenseKind::Weight(i), inp * out));
        v.push((DenseKind::Bias(i), out));
    }
    if let Some(c) = &layout.cross {
        for (i, (_, shape, decay)) in c.tensors(layout.deep_in).into_iter().enumerate() {
            v.push((DenseKind::Cross(i, decay), shape.iter().product()));
        }
    }
    if let Some(m) = &layout.mt {
        for (i, (_, shape, decay)) in m.tensors(layout.deep_in).into_iter().enumerate() {
            v.push((DenseKind::Mt(i, decay), shape.iter().product()));
        }
    }
    v
}

/// The learning rates and schedule the chief sends every shard.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rates {
    lr_dense: f32,
    lr_sparse: f32,
    l2: f32,
    warmup_steps: u32,
    decay: f32,
    decay_steps: u32,
}

impl Rates {
    /// The rates of `[train]`.
    pub fn of(s: &TrainSettings) -> Rates {
        Rates {
            lr_dense: s.lr_dense,
            lr_sparse: s.lr_sparse,
            l2: s.l2,
            warmup_steps: s.warmup_steps,
            decay: s.lr_decay,
            decay_steps: s.lr_decay_steps,
        }
    }

    fn write(&self, b: &mut Buf) {
        b.f32s(&[self.lr_dense, self.lr_sparse, self.l2]);
        b.u32(self.warmup_steps);
        b.f32s(&[self.decay]);
        b.u32(self.decay_steps);
    }

    fn read(c: &mut Cursor<'_>) -> Result<Rates> {
        Ok(Rates {
            lr_dense: c.f32()?,
            lr_sparse: c.f32()?,
            l2: c.f32()?,
            warmup_steps: c.u32()?,
            decay: c.f32()?,
            decay_steps: c.u32()?,
        })
    }

    /// An optimizer holding no tensors, for its step constants ([`Optimizer::hyper`]).
    fn optimizer(&self) -> Optimizer {
        Optimizer::new(&Params::default(), self.lr_dense, self.lr_sparse, self.l2).with_schedule(
            self.warmup_steps,
            self.decay,
            self.decay_steps,
        )
    }
}

/// Checkpoint files of a multi-process job, on a local (shared) file system or HDFS: each
/// written whole under a temporary name and renamed into place.
pub(crate) mod store {
    use std::path::Path;

    use rankd_storage::{HdfsSettings, Location};

    use crate::error::{Result, TrainError};

    fn err(path: &Path, e: impl std::fmt::Display) -> TrainError {
        TrainError::Data(format!("checkpoint {}: {e}", path.display()))
    }

    /// Writes the local file `local` to `path` (moved when `path` is local).
    pub fn put(local: &Path, path: &Path, hdfs: &HdfsSettings) -> Result<()> {
        if Location::is_hdfs(path) {
            rankd_storage::put_file(local, path, hdfs).map_err(|e| err(path, e))?;
            return Ok(());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(path, e))?;
        }
        std::fs::rename(local, path).map_err(|e| err(path, e))
    }

    /// Where to write the file bound for `path` before [`put`]: beside it for a local path (a
    /// rename, not a copy; its directory is created), else in `scratch`.
    pub fn staging(path: &Path, scratch: &tempfile::TempDir) -> Result<std::path::PathBuf> {
        match (Location::is_hdfs(path), path.parent()) {
            (false, Some(parent)) => {
                std::fs::create_dir_all(parent).map_err(|e| err(path, e))?;
                Ok(path.with_extension("tmp"))
            }
            _ => Ok(scratch.path().join("part")),
        }
    }

    /// Writes `bytes` to `path`.
    pub fn put_bytes(bytes: &[u8], path: &Path, hdfs: &HdfsSettings) -> Result<()> {
        use std::io::Write;
        let scratch = tempfile::tempdir().map_err(|e| err(path, e))?;
        let tmp = staging(path, &scratch)?;
        let mut f = std::fs::File::create(&tmp).map_err(|e| err(path, e))?;
        f.write_all(bytes).map_err(|e| err(path, e))?;
        f.sync_all().map_err(|e| err(path, e))?;
        put(&tmp, path, hdfs)
    }

    /// Reads `path` whole; `None` when it does not exist.
    pub fn get(path: &Path, hdfs: &HdfsSettings) -> Result<Option<Vec<u8>>> {
        if !rankd_storage::exists(path, hdfs).map_err(|e| err(path, e))? {
            return Ok(None);
        }
        let mut bytes = Vec::new();
        let mut r = rankd_storage::open_read(path, hdfs).map_err(|e| err(path, e))?;
        std::io::Read::read_to_end(&mut r, &mut bytes).map_err(|e| err(path, e))?;
        Ok(Some(bytes))
    }
}

/// A connection to one shard.
struct Link {
    addr: String,
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

/// A worker's connections to every shard, with the bytes sent and received.
pub struct Shards {
    links: Vec<Link>,
    body: Vec<u8>,
    /// Bytes written to the shards.
    pub sent: u64,
    /// Bytes read from the shards.
    pub received: u64,
}

impl std::fmt::Debug for Shards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shards")
            .field("shards", &self.links.len())
            .finish()
    }
}

impl Shards {
    /// Connects to every shard, retrying each for up to `patience` (pods of a job start in any
    /// order).
    pub fn connect(addrs: &[String], patience: Duration) -> Result<Shards> {
        let mut links = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let start = Instant::now();
            let s = loop {
                match TcpStream::connect(addr.as_str()) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() < patience => {
                        let _ = e;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => {
                        return Err(TrainError::Data(format!(
                            "cannot reach ps {i} at {addr} after {:?}: {e}",
                            patience
                        )))
                    }
                }
            };
            let io = |e: std::io::Error| TrainError::Data(format!("ps {i} at {addr}: {e}"));
            s.set_nodelay(true).map_err(io)?;
            links.push(Link {
                addr: addr.clone(),
                r: BufReader::with_capacity(1 << 16, s.try_clone().map_err(io)?),
                w: BufWriter::with_capacity(1 << 16, s),
            });
        }
        Ok(Shards {
            links,
            body: Vec::new(),
            sent: 0,
            received: 0,
        })
    }

    /// How many shards.
    pub fn len(&self) -> usize {
        self.links.len()
    }

    /// Whether there are none (never, for a connected job).
    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    fn gone(&self, i: usize, e: impl std::fmt::Display) -> TrainError {
        TrainError::Data(format!("ps {i} at {} is gone: {e}", self.links[i].addr))
    }

    /// Sends shard `i` a message.
    pub fn send(&mut self, i: usize, kind: u8, payload: &[u8]) -> Result<()> {
        self.sent += payload.len() as u64 + 5;
        let r = wire::send(&mut self.links[i].w, kind, payload);
        r.map_err(|e| self.gone(i, e))
    }

    /// Reads shard `i`'s answer, which must be of type `want`; a shard's error becomes ours.
    pub fn recv(&mut self, i: usize, want: u8) -> Result<&[u8]> {
        let kind = match wire::recv(&mut self.links[i].r, &mut self.body) {
            Ok(k) => k,
            Err(e) => return Err(self.gone(i, e)),
        };
        self.received += self.body.len() as u64 + 5;
        if kind == wire::ERR {
            return Err(TrainError::Data(
                String::from_utf8_lossy(&self.body).into_owned(),
            ));
        }
        if kind != want {
            return Err(TrainError::Data(format!(
                "ps {i} answered with message {kind}, expected {want}"
            )));
        }
        Ok(&self.body)
    }

    /// Sends every shard the same request and waits for all the answers of type `want`;
    /// returns shard 0's.
    pub fn all(&mut self, kind: u8, payload: &[u8], want: u8) -> Result<Vec<u8>> {
        for i in 0..self.len() {
            self.send(i, kind, payload)?;
        }
        let mut first = Vec::new();
        for i in 0..self.len() {
            let body = self.recv(i, want)?;
            if i == 0 {
                first = body.to_vec();
            }
        }
        Ok(first)
    }
}
