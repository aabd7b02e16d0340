//! A device computing a worker process's steps: the worker process of a multi-process job
//! computes on one GPU (or an emulated device) while the parameter-server shards hold every
//! parameter and apply every update, dense ones included, exactly as for a CPU worker.

use super::device::{Device, DeviceError, HostDevice};
use super::prep::Share;
use super::replica::Replica;
use super::Choice;
use crate::config::TrainSettings;
use crate::error::{Result, TrainError};
use crate::model::{Compute, CpuCompute, Grads, Layout, Params};
use rankd_feature_ops::SlotBatch;

/// One device computing a worker's steps.
pub struct DeviceCompute<D: Device> {
    /// The device until the first step, whose parameters give the shapes.
    idle: Option<D>,
    replica: Option<Replica<D>>,
    /// The dropout masks' generator.
    rng: u64,
}

impl<D: Device> std::fmt::Debug for DeviceCompute<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceCompute").finish_non_exhaustive()
    }
}

impl<D: Device> DeviceCompute<D> {
    /// Steps on `dev`; dropout masks drawn as a CPU worker seeded with `seed` draws them.
    pub fn new(dev: D, seed: u64) -> Self {
        DeviceCompute {
            idle: Some(dev),
            replica: None,
            rng: crate::model::dropout_state(seed),
        }
    }

    /// The device's name.
    pub fn name(&self) -> String {
        match (&self.idle, &self.replica) {
            (Some(d), _) => d.name(),
            (None, Some(r)) => r.dev.name(),
            (None, None) => "a device".into(),
        }
    }

    /// One step's gradients into `g` (as `CpuCompute::step`); the summed loss.
    pub fn step(
        &mut self,
        l: &Layout,
        p: &Params,
        slots: &SlotBatch,
        labels: &[f32],
        rows: &[usize],
        g: &mut Grads,
    ) -> Result<f64, DeviceError> {
        if let Some(dev) = self.idle.take() {
            self.replica = Some(Replica::new(dev, l, p)?);
        }
        let r = self.replica.as_mut().expect("made above");
        r.load_weights(p)?;
        let mut share = Share::build(l, slots, labels, rows);
        share.pull(l, p);
        share.draw_masks(l, &mut self.rng);
        r.step(l, &share, p.wide_bias, 1.0)?;
        for (dst, src) in g.dense_mut().into_iter().zip(r.dense_grads()?) {
            *dst = src;
        }
        for (i, stats) in r.bn_stats(l)?.into_iter().enumerate() {
            let out = stats.len() / 2;
            g.bn_batch[2 * i] = stats[..out].to_vec();
            g.bn_batch[2 * i + 1] = stats[out..].to_vec();
        }
        let pushed = r.push(l, &share)?;
        let tables = g.emb.iter_mut().zip(&share.emb).zip(pushed.emb);
        let wide = g.wide.iter_mut().zip(&share.wide).zip(pushed.wide);
        for ((sg, t), values) in tables.chain(wide) {
            sg.set(t.rows.clone(), values).map_err(DeviceError)?;
        }
        g.wide_bias = pushed.wide_bias;
        Ok(pushed.loss)
    }
}

/// A worker process's compute: the CPU, or one device.
#[derive(Debug)]
pub enum WorkerCompute {
    /// The CPU.
    Cpu(Box<CpuCompute>),
    /// An emulated device.
    Emulated(Box<DeviceCompute<HostDevice>>),
    /// A GPU.
    Cuda(Box<DeviceCompute<super::cuda::CudaDevice>>),
}

impl WorkerCompute {
    /// Worker `index`'s compute, as `[train] device` asks (`auto`: its GPU when there are
    /// GPUs, worker `i` on the `i % count`-th; else the CPU), saying which in `log`.
    pub fn start(
        s: &TrainSettings,
        layout: &Layout,
        index: usize,
        log: &mut dyn std::io::Write,
    ) -> Result<WorkerCompute> {
        let seed = s.seed.wrapping_add(index as u64);
        let found = super::probe_for(s)?;
        let compute = match super::choose_for(s, layout, &found, true, true)? {
            Choice::Cpu(reason) => {
                let _ = writeln!(log, "worker {index}: training on the CPU: {reason}");
                return Ok(WorkerCompute::Cpu(Box::new(CpuCompute::with_seed(seed))));
            }
            Choice::Emulated(n) => {
                let dev = HostDevice::new(index % n.max(1));
                WorkerCompute::Emulated(Box::new(DeviceCompute::new(dev, seed)))
            }
            Choice::Cuda(list) => {
                let ordinal = list[index % list.len()];
                let dev = super::cuda::open(&[ordinal])
                    .map_err(|e| TrainError::Device(e.0))?
                    .remove(0);
                WorkerCompute::Cuda(Box::new(DeviceCompute::new(dev, seed)))
            }
        };
        let name = match &compute {
            WorkerCompute::Emulated(d) => d.name(),
            WorkerCompute::Cuda(d) => d.name(),
            WorkerCompute::Cpu(_) => unreachable!("returned above"),
        };
        let _ = writeln!(log, "worker {index}: training on {name}");
        Ok(compute)
    }

    /// One step's gradients into `grads`; the summed loss.
    pub fn step(
        &mut self,
        layout: &Layout,
        params: &Params,
        slots: &SlotBatch,
        labels: &[f32],
        rows: &[usize],
        grads: &mut Grads,
    ) -> Result<f64> {
        let r = match self {
            WorkerCompute::Cpu(c) => return Ok(c.step(layout, params, slots, labels, rows, grads)),
            WorkerCompute::Emulated(d) => d.step(layout, params, slots, labels, rows, grads),
            WorkerCompute::Cuda(d) => d.step(layout, params, slots, labels, rows, grads),
        };
        r.map_err(|e| TrainError::Device(e.0))
    }
}
