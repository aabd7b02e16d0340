//! Training on GPUs: one replica of the dense layers per device, their gradients all-reduced
//! (NCCL on GPUs), Adam on every device; embedding and wide rows on the parameter server (here
//! the process's own parameters and sparse Adagrad, as on the CPU), each step pulling the rows
//! its batch touches and pushing their gradients. The hybrid parallelism of HugeCTR, Persia and
//! TorchRec.
//!
//! - [`device`]: what a device does ([`device::Device`]) and the host executor
//!   ([`device::HostDevice`]: the operations' contract, and the emulated devices of the tests).
//! - [`prep`]: a device's share of a step, built by an input thread per device ahead of the step.
//! - [`replica`]: a device's parameters, buffers and the step as device operations.
//! - `cuda`: the cudarc executor (our kernels through NVRTC, cuBLAS, NCCL).
//!
//! A synchronous step on K devices: the batch is cut into K contiguous shares as the CPU's
//! workers cut it; each device pulls its share's rows, runs forward and backward with its
//! share's gradient weighted by its part of the batch, the dense gradients are summed over the
//! devices, every device applies Adam with the same constants (so the replicas stay equal), and
//! the host applies the sparse gradients, summed device by device, with Adagrad. The result is
//! the CPU trainer's within float rounding.

pub mod compute;
pub mod device;
pub mod prep;
pub mod replica;

#[allow(unsafe_code)]
mod cuda;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

pub use rankd_engine::gpu::{DeviceSpec, Selection};

use crate::config::{Mode, TrainSettings};
use crate::data::Dataset;
use crate::error::{Result, TrainError};
use crate::model::{Hyper, Layout, Optimizer, Params, BN_MOMENTUM};
use device::{DResult, Device, DeviceError, HostDevice};
use prep::Share;
use replica::{Pushed, Replica};

pub use cuda::nccl_present;

/// The replicas of a run, one per device.
pub struct Fleet<D: Device> {
    replicas: Vec<Replica<D>>,
    /// Host threads for the pulls and the sparse updates.
    threads: usize,
    /// Per device, the state of its dropout masks' generator (device `d` draws as the CPU's
    /// worker `d` of a run with the same seed).
    rng: Vec<u64>,
}

impl<D: Device> Fleet<D> {
    /// Replicas of `params` and `opt`'s dense state on `devices`; dropout masks from `seed`.
    pub fn new(
        devices: Vec<D>,
        layout: &Layout,
        params: &Params,
        opt: &mut Optimizer,
        seed: u64,
    ) -> DResult<Self> {
        let mut replicas = Vec::new();
        for d in devices {
            replicas.push(Replica::new(d, layout, params)?);
        }
        let rng = (0..replicas.len())
            .map(|d| crate::model::dropout_state(seed.wrapping_add(d as u64)))
            .collect();
        let mut fleet = Fleet {
            replicas,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            rng,
        };
        fleet.load(params, opt)?;
        Ok(fleet)
    }

    /// The devices' names.
    pub fn names(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.dev.name()).collect()
    }

    /// Puts the host's dense tensors and moments on every device (after a resume).
    pub fn load(&mut self, params: &Params, opt: &mut Optimizer) -> DResult {
        for r in &mut self.replicas {
            r.load(params, opt)?;
        }
        Ok(())
    }

    /// Brings the dense tensors and moments back to the host (they are equal on every device).
    pub fn store(&mut self, params: &mut Params, opt: &mut Optimizer) -> DResult {
        self.replicas[0].store(params, opt)
    }

    /// One synchronous step over `shares` (one per device, unpulled), `total` examples in all;
    /// returns the summed loss.
    pub fn step(
        &mut self,
        layout: &Layout,
        params: &mut Params,
        opt: &mut Optimizer,
        shares: &mut [Share],
        total: usize,
    ) -> DResult<f64> {
        prep::pull(shares, layout, params, self.threads);
        let h = self.launch(layout, params, opt, shares, total)?;
        Ok(self.finish(layout, params, opt, &h, shares)?.0)
    }

    /// Starts a step over pulled shares: dropout masks, forward and backward on every device,
    /// the dense all-reduce and Adam (queued on GPUs: the host is free until
    /// [`Fleet::finish`]). Returns the step's constants.
    fn launch(
        &mut self,
        layout: &Layout,
        params: &Params,
        opt: &mut Optimizer,
        shares: &mut [Share],
        total: usize,
    ) -> DResult<Hyper> {
        for (s, state) in shares.iter_mut().zip(&mut self.rng) {
            s.draw_masks(layout, state);
        }
        for (r, s) in self.replicas.iter_mut().zip(shares.iter()) {
            let weight = s.n as f32 / total.max(1) as f32;
            r.step(layout, s, params.wide_bias, weight)?;
        }
        if self.replicas.len() > 1 {
            let mut group: Vec<_> = self
                .replicas
                .iter_mut()
                .map(|r| r.grads_mut(layout))
                .collect();
            D::all_reduce(&mut group)?;
        }
        let h = opt.begin_step();
        for r in &mut self.replicas {
            r.adam(&h)?;
        }
        Ok(h)
    }

    /// Waits for the step [`Fleet::launch`] started over `shares`, applies its sparse update
    /// and the running statistics; returns the loss and, per table, the rows it updated.
    fn finish(
        &mut self,
        layout: &Layout,
        params: &mut Params,
        opt: &mut Optimizer,
        h: &Hyper,
        shares: &[Share],
    ) -> DResult<(f64, Vec<Vec<u32>>)> {
        let mut pushed = Vec::with_capacity(shares.len());
        for (r, s) in self.replicas.iter_mut().zip(shares.iter()) {
            pushed.push(r.push(layout, s)?);
        }
        // Batch normalization's running statistics follow the batch's (the shares' weighted).
        if layout.batch_norm {
            let stats = self.replicas[0].bn_stats(layout)?;
            for (i, batch) in stats.iter().enumerate() {
                let out = batch.len() / 2;
                for (j, part) in [&batch[..out], &batch[out..]].into_iter().enumerate() {
                    let running = &mut params.bn_stats[2 * i + j];
                    for (s, b) in running.iter_mut().zip(part) {
                        *s = BN_MOMENTUM * *s + (1.0 - BN_MOMENTUM) * b;
                    }
                }
            }
        }
        let loss = pushed.iter().map(|p| p.loss).sum();
        let touched = apply_pushed(layout, params, opt, h, shares, &pushed, self.threads);
        Ok((loss, touched))
    }

    /// One synchronous epoch over `order` in batches of `batch_size`; returns the summed loss.
    /// An input thread per device builds its shares ahead of the step.
    #[allow(clippy::too_many_arguments)]
    pub fn epoch(
        &mut self,
        layout: &Layout,
        params: &mut Params,
        opt: &mut Optimizer,
        data: &Dataset,
        order: &[usize],
        batch_size: usize,
        done: &AtomicUsize,
    ) -> DResult<f64> {
        let k = self.replicas.len();
        let batches: Vec<&[usize]> = order.chunks(batch_size.max(1)).collect();
        std::thread::scope(|scope| {
            let mut inputs = Vec::new();
            for d in 0..k {
                let (tx, rx) = std::sync::mpsc::sync_channel::<Share>(2);
                let batches = &batches;
                scope.spawn(move || {
                    for b in batches {
                        let part = prep::split(b, k)[d];
                        let share = Share::build(layout, &data.slots, &data.labels, part);
                        if tx.send(share).is_err() {
                            return;
                        }
                    }
                });
                inputs.push(rx);
            }
            let recv = || -> DResult<Vec<Share>> {
                let mut shares = Vec::with_capacity(k);
                for rx in &inputs {
                    let s = rx.recv();
                    shares.push(s.map_err(|_| DeviceError("an input thread stopped".into()))?);
                }
                Ok(shares)
            };
            // The next batch's rows are pulled while the devices compute this one; those this
            // step updates are pulled again after its update, so every step reads exactly the
            // rows a step-by-step run reads.
            let mut loss = 0f64;
            let mut next = None;
            if !batches.is_empty() {
                let mut first = recv()?;
                prep::pull(&mut first, layout, params, self.threads);
                next = Some(first);
            }
            for (i, b) in batches.iter().enumerate() {
                let Some(mut shares) = next.take() else { break };
                let h = self.launch(layout, params, opt, &mut shares, b.len())?;
                if i + 1 < batches.len() {
                    let mut ahead = recv()?;
                    prep::pull(&mut ahead, layout, params, self.threads);
                    next = Some(ahead);
                }
                let (l, touched) = self.finish(layout, params, opt, &h, &shares)?;
                loss += l;
                if let Some(ahead) = next.as_mut() {
                    prep::refresh(ahead, layout, params, &touched);
                }
                done.fetch_add(b.len(), Ordering::Relaxed);
            }
            Ok(loss)
        })
    }
}

impl<D: Device> std::fmt::Debug for Fleet<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("devices", &self.names())
            .finish_non_exhaustive()
    }
}

/// The host's half of a step's sparse update (the parameter server's): every device's pushed
/// rows of every table merged in device order, Adagrad on them with the step's constants `h`
/// (tables spread over `threads` threads), and the wide bias. Returns the rows updated, per
/// table (embedding tables, then wide slots), ascending.
pub fn apply_pushed(
    layout: &Layout,
    params: &mut Params,
    opt: &mut Optimizer,
    h: &Hyper,
    shares: &[Share],
    pushed: &[Pushed],
    threads: usize,
) -> Vec<Vec<u32>> {
    let bias_grad: f32 = pushed.iter().map(|p| p.wide_bias).sum();
    // Per table (embedding tables, then wide slots): its rows and their gradients, summed
    // over the devices in device order; the tables merged in parallel.
    let dims: Vec<usize> = layout
        .emb
        .iter()
        .map(|e| e.dim)
        .chain(layout.wide.iter().map(|_| 1))
        .collect();
    let mut merged: Vec<(Vec<u32>, Vec<f32>, usize)> =
        dims.iter().map(|&d| (Vec::new(), Vec::new(), d)).collect();
    let work: Vec<_> = merged.iter_mut().enumerate().collect();
    prep::par_each(work, threads, |(t, out)| {
        let runs: Vec<(&[u32], &[f32])> = shares
            .iter()
            .zip(pushed)
            .map(|(s, p)| {
                let (share, values) = match t.checked_sub(s.emb.len()) {
                    None => (&s.emb[t], &p.emb[t]),
                    Some(j) => (&s.wide[j], &p.wide[j]),
                };
                (share.rows.as_slice(), values.as_slice())
            })
            .collect();
        let (rows, values) = prep::merge(&runs, out.2);
        (out.0, out.1) = (rows, values);
    });
    // The sparse update: each table cut into row ranges (its rows ascending, so each range's
    // weights are a slice of their own), the ranges spread over the cores.
    let (acc_emb, acc_wide, acc_bias) = opt.sparse_state_mut();
    let tables = params
        .emb
        .iter_mut()
        .zip(acc_emb.iter_mut())
        .chain(params.wide.iter_mut().zip(acc_wide.iter_mut()));
    let total: usize = merged.iter().map(|m| m.0.len()).sum();
    let per = total.div_ceil(threads.max(1)).max(1024);
    let mut work = Vec::new();
    for ((w, acc), (rows, values, dim)) in tables.zip(&merged) {
        work.extend(prep::row_ranges(w, acc, rows, values, *dim, per));
    }
    prep::par_each(work, threads, |(w, acc, first, rows, values, dim)| {
        crate::model::adagrad_rows(h, w, acc, dim, rows, first, values);
    });
    crate::model::adagrad_bias(h, &mut params.wide_bias, acc_bias, bias_grad);
    merged.into_iter().map(|(rows, _, _)| rows).collect()
}

/// The devices a run trains on.
#[derive(Debug)]
pub enum Gpus {
    /// Emulated devices (the host executor).
    Emulated(Fleet<HostDevice>),
    /// GPUs.
    Cuda(Fleet<cuda::CudaDevice>),
}

impl Gpus {
    /// See [`Fleet::names`].
    pub fn names(&self) -> Vec<String> {
        match self {
            Gpus::Emulated(f) => f.names(),
            Gpus::Cuda(f) => f.names(),
        }
    }

    /// See [`Fleet::epoch`].
    #[allow(clippy::too_many_arguments)]
    pub fn epoch(
        &mut self,
        layout: &Layout,
        params: &mut Params,
        opt: &mut Optimizer,
        data: &Dataset,
        order: &[usize],
        batch_size: usize,
        done: &AtomicUsize,
    ) -> Result<f64> {
        match self {
            Gpus::Emulated(f) => f.epoch(layout, params, opt, data, order, batch_size, done),
            Gpus::Cuda(f) => f.epoch(layout, params, opt, data, order, batch_size, done),
        }
        .map_err(device_error)
    }

    /// See [`Fleet::store`].
    pub fn store(&mut self, params: &mut Params, opt: &mut Optimizer) -> Result<()> {
        match self {
            Gpus::Emulated(f) => f.store(params, opt),
            Gpus::Cuda(f) => f.store(params, opt),
        }
        .map_err(device_error)
    }
}

fn device_error(e: DeviceError) -> TrainError {
    TrainError::Device(e.0)
}

/// Where a run trains, decided at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// The CPU trainer, and why.
    Cpu(String),
    /// These GPUs.
    Cuda(Vec<usize>),
    /// This many emulated devices.
    Emulated(usize),
}

/// Decides where `layout` trains from the configured device (`[train] device`, `--device`),
/// what [`rankd_engine::gpu::probe`] found and whether NCCL loads. `auto` falls back to the CPU
/// with a reason; an explicit `cuda` or `emulated:N` that cannot be honoured is an error.
pub fn choose(s: &TrainSettings, layout: &Layout, found: &Found, nccl: bool) -> Result<Choice> {
    choose_for(s, layout, found, nccl, false)
}

/// [`choose`] for one process of a run (`worker`: a worker process of a multi-process job,
/// which computes on one device in either mode and leaves the updates to the shards).
pub fn choose_for(
    s: &TrainSettings,
    layout: &Layout,
    found: &Found,
    nccl: bool,
    worker: bool,
) -> Result<Choice> {
    let spec: DeviceSpec = s.device.parse().map_err(TrainError::Config)?;
    let auto = spec == DeviceSpec::Auto;
    let picked = rankd_engine::gpu::select(&spec, found).map_err(TrainError::Config)?;
    let devices = match picked {
        Selection::Cpu { reason } => return Ok(Choice::Cpu(reason)),
        Selection::Cuda(list) => Choice::Cuda(list),
        Selection::Emulated(n) => Choice::Emulated(n),
    };
    let why_not = unsupported(s, layout, worker);
    match (why_not, auto) {
        (Some(why), true) => {
            return Ok(Choice::Cpu(format!(
                "device = \"auto\" and the GPU trainer does not train {why} yet"
            )))
        }
        (Some(why), false) => {
            return Err(TrainError::Config(format!(
                "device = \"{spec}\": the GPU trainer does not train {why} yet (use device = \"cpu\" or \"auto\")"
            )))
        }
        (None, _) => {}
    }
    match devices {
        Choice::Cuda(list) if list.len() > 1 && !nccl => {
            if auto {
                Ok(Choice::Cuda(vec![list[0]]))
            } else {
                Err(TrainError::Config(format!(
                    "device = \"{spec}\": training on {} GPUs needs NCCL (libnccl.so could not be loaded)",
                    list.len()
                )))
            }
        }
        other => Ok(other),
    }
}

/// Why the GPU trainer cannot take this run, if it cannot.
fn unsupported(s: &TrainSettings, layout: &Layout, worker: bool) -> Option<String> {
    if let Some(what) = replica::unsupported(layout) {
        return Some(what.into());
    }
    if s.mode == Mode::Async && !worker {
        return Some("mode = \"async\"".into());
    }
    None
}

/// Refuses, before any data is read, a device setting that cannot work whatever the model: one
/// that does not parse, or an explicit `cuda` where CUDA or the listed GPUs are missing.
pub fn precheck(s: &TrainSettings) -> Result<()> {
    let spec: DeviceSpec = s.device.parse().map_err(TrainError::Config)?;
    if let DeviceSpec::Cuda(_) = spec {
        rankd_engine::gpu::select(&spec, &rankd_engine::gpu::probe())
            .map_err(TrainError::Config)?;
    }
    Ok(())
}

/// What [`rankd_engine::gpu::probe`] finds, when `s`'s device may be a GPU (`auto`, `cuda`);
/// nothing is probed for `cpu` or emulated devices.
pub(crate) fn probe_for(s: &TrainSettings) -> Result<Found> {
    let spec: DeviceSpec = s.device.parse().map_err(TrainError::Config)?;
    Ok(match spec {
        DeviceSpec::Auto | DeviceSpec::Cuda(_) => rankd_engine::gpu::probe(),
        _ => Ok(Vec::new()),
    })
}

/// What the probe found: the GPUs, or why there are none.
pub type Found =
    std::result::Result<Vec<rankd_engine::gpu::DeviceInfo>, rankd_engine::gpu::Unavailable>;

/// Starts the devices `s` asks for, or `None` for the CPU trainer; says which in `log`.
pub fn start(
    s: &TrainSettings,
    layout: &Layout,
    params: &Params,
    opt: &mut Optimizer,
    log: &mut dyn Write,
) -> Result<Option<Gpus>> {
    let choice = choose(s, layout, &probe_for(s)?, nccl_present())?;
    let gpus = match choice {
        Choice::Cpu(reason) => {
            let _ = writeln!(log, "training on the CPU: {reason}");
            return Ok(None);
        }
        Choice::Emulated(n) => {
            let devices = (0..n).map(HostDevice::new).collect();
            let fleet = Fleet::new(devices, layout, params, opt, s.seed);
            Gpus::Emulated(fleet.map_err(device_error)?)
        }
        Choice::Cuda(list) => {
            let devices = cuda::open(&list).map_err(device_error)?;
            let fleet = Fleet::new(devices, layout, params, opt, s.seed);
            Gpus::Cuda(fleet.map_err(device_error)?)
        }
    };
    let names = gpus.names();
    let _ = writeln!(
        log,
        "training on {} device{}: {}{}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        names.join(", "),
        if s.workers > 1 {
            format!(
                " (one worker per device; workers = {} is for the CPU)",
                s.workers
            )
        } else {
            String::new()
        }
    );
    Ok(Some(gpus))
}

#[cfg(test)]
mod tests;
