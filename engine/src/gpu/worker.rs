//! One thread per GPU. Cores send it jobs (transformed rows of one model and plan) through a
//! `crossbeam` channel; it merges queued jobs of the same model and plan into batches of up to
//! `max_batch_items` items, waiting at most `max_wait_us` for more, lays each batch out in a
//! free slot's staging buffer and launches it on that slot's stream. With two or more slots the
//! copies and kernels of consecutive batches overlap: while one slot computes, the next batch
//! is assembled and launched on another. Finished slots hand each job its scores.
//!
//! The thread is generic over the [`Executor`]: CUDA in production, the host executor in tests.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};
use futures_channel::oneshot;

use super::batch::{assemble, ArenaLayout, Op, Rows, Sizes};
use super::{GpuError, GpuErrorKind, Shared};
use crate::plan::Plan;
use crate::Model;

/// A device: uploads models, runs batches in slots.
pub(crate) trait Executor: Send + 'static {
    /// A model's weights on the device.
    type Resident: Send + 'static;

    /// Batches in flight at once (streams).
    fn slots(&self) -> usize;

    #[allow(clippy::too_many_arguments)]
    /// Starts `ops` on slot `slot` (free): upload `words`, run, download `sizes.rows` scores.
    fn launch(
        &mut self,
        slot: usize,
        resident: &Self::Resident,
        model: &Model,
        plan: &Arc<Plan>,
        words: &[u32],
        ops: &[Op],
        sizes: &Sizes,
    ) -> Result<(), GpuError>;

    /// Whether slot `slot`'s batch has finished.
    fn poll(&mut self, slot: usize) -> Result<bool, GpuError>;

    /// Waits for slot `slot`'s batch and returns its scores.
    fn finish(&mut self, slot: usize) -> Result<&[f32], GpuError>;

    /// Waits until nothing runs on the device (errors ignored): before weights are freed after
    /// a failure.
    fn quiesce(&mut self);

    /// Frees what the executor keeps for a model (plans) besides its resident weights.
    fn forget(&mut self, model_id: u64);

    /// Makes the next launch fail (tests).
    fn inject_fault(&mut self, fault: super::Fault);
}

/// A model handed to the worker with its device weights.
pub(crate) struct Adopt<R> {
    pub model_id: u64,
    pub alive: Weak<()>,
    pub layout: ArenaLayout,
    pub resident: R,
}

pub(crate) enum Cmd<R> {
    Job(Job),
    Adopt(Adopt<R>),
    Fault(super::Fault),
}

/// Rows of one core's requests for one model and plan.
pub(crate) struct Job {
    pub model: Arc<Model>,
    pub plan: Arc<Plan>,
    pub rows: Rows,
    pub queued: Instant,
    pub done: oneshot::Sender<Done>,
}

/// A job's answer: its rows back (for reuse, with the scores filled in) or why not.
pub(crate) struct Done {
    pub rows: Rows,
    pub result: Result<(), GpuError>,
}

/// Batching settings of a device worker.
#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    /// Most items per device batch (one job larger than this is run alone).
    pub max_batch_items: usize,
    /// Longest the first job of a batch waits for others.
    pub max_wait: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        BatchSettings {
            max_batch_items: 65_536,
            max_wait: Duration::from_micros(200),
        }
    }
}

struct Resident<R> {
    alive: Weak<()>,
    layout: ArenaLayout,
    weights: R,
}

struct Worker<E: Executor> {
    exec: E,
    index: usize,
    shared: Arc<Shared>,
    settings: BatchSettings,
    models: HashMap<u64, Resident<E::Resident>>,
    pending: VecDeque<Job>,
    /// Jobs in flight per slot, and launch order of the busy slots.
    busy: Vec<Vec<Job>>,
    order: VecDeque<usize>,
    lost: Option<String>,
    words: Vec<u32>,
    ops: Vec<Op>,
}

/// Runs a device worker until every sender is gone and the last batch is answered.
pub(crate) fn run<E: Executor>(
    exec: E,
    index: usize,
    rx: Receiver<Cmd<E::Resident>>,
    shared: Arc<Shared>,
    settings: BatchSettings,
) {
    let slots = exec.slots().max(1);
    let mut w = Worker {
        exec,
        index,
        shared,
        settings,
        models: HashMap::new(),
        pending: VecDeque::new(),
        busy: (0..slots).map(|_| Vec::new()).collect(),
        order: VecDeque::new(),
        lost: None,
        words: Vec::new(),
        ops: Vec::new(),
    };
    let mut open = true;
    while open || !w.pending.is_empty() || !w.order.is_empty() {
        // Take what is queued; block only when there is nothing else to do.
        if open {
            let idle = w.pending.is_empty() && w.order.is_empty();
            let first = if idle {
                match rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(c) => Some(c),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => {
                        open = false;
                        None
                    }
                }
            } else {
                None
            };
            if let Some(c) = first {
                w.command(c);
            }
            loop {
                match rx.try_recv() {
                    Ok(c) => w.command(c),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
        }
        w.purge();
        w.complete_finished();
        if let Some(slot) = w.free_slot() {
            if !w.pending.is_empty() {
                // Wait for more jobs while the batch is small, the first job is young and
                // nothing else is running (a running batch is itself the wait).
                if open && w.order.is_empty() && w.queued_items() < w.settings.max_batch_items {
                    let waited = w.pending[0].queued.elapsed();
                    if let Some(left) = w.settings.max_wait.checked_sub(waited) {
                        match rx.recv_timeout(left) {
                            Ok(c) => {
                                w.command(c);
                                continue;
                            }
                            Err(RecvTimeoutError::Timeout) => {}
                            Err(RecvTimeoutError::Disconnected) => open = false,
                        }
                    }
                }
                w.launch(slot);
                continue;
            }
        }
        // Every slot busy, or nothing to launch: wait for the oldest batch.
        if let Some(&slot) = w.order.front() {
            if w.pending.is_empty() && open {
                // Nothing queued: look for new jobs briefly between polls.
                match rx.recv_timeout(Duration::from_micros(20)) {
                    Ok(c) => w.command(c),
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => open = false,
                }
                continue;
            }
            w.finish(slot);
        }
    }
}

impl<E: Executor> Worker<E> {
    fn command(&mut self, c: Cmd<E::Resident>) {
        match c {
            Cmd::Job(job) => {
                if let Some(why) = &self.lost {
                    let e = GpuError::new(GpuErrorKind::Lost, why.clone());
                    answer(job, Err(e));
                } else {
                    self.pending.push_back(job);
                }
            }
            Cmd::Adopt(a) => {
                self.models.insert(
                    a.model_id,
                    Resident {
                        alive: a.alive,
                        layout: a.layout,
                        weights: a.resident,
                    },
                );
            }
            Cmd::Fault(f) => self.exec.inject_fault(f),
        }
    }

    /// Frees the device copies of models whose last request is done.
    fn purge(&mut self) {
        let gone: Vec<u64> = self
            .models
            .iter()
            .filter(|(_, r)| r.alive.strong_count() == 0)
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.models.remove(&id);
            self.exec.forget(id);
            self.shared.metrics.unloads.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn free_slot(&self) -> Option<usize> {
        self.busy.iter().position(|jobs| jobs.is_empty())
    }

    fn queued_items(&self) -> usize {
        self.pending.iter().map(|j| j.rows.items()).sum()
    }

    /// Takes the first pending job and every pending job of the same model and plan, up to
    /// the item budget, and launches them on `slot`.
    fn launch(&mut self, slot: usize) {
        let first = self.pending.pop_front().expect("a job is pending");
        let mut jobs = vec![first];
        let mut items = jobs[0].rows.items();
        let mut i = 0;
        while i < self.pending.len() {
            let j = &self.pending[i];
            if Arc::ptr_eq(&j.model, &jobs[0].model)
                && Arc::ptr_eq(&j.plan, &jobs[0].plan)
                && items + j.rows.items() <= self.settings.max_batch_items
            {
                items += j.rows.items();
                jobs.push(self.pending.remove(i).expect("index is in range"));
            } else {
                i += 1;
            }
        }
        let id = jobs[0].model.id();
        let Some(resident) = self.models.get(&id) else {
            let e = GpuError::new(
                GpuErrorKind::NotResident,
                format!("model {id} is not on GPU {}", self.index),
            );
            for j in jobs {
                answer(j, Err(e.clone()));
            }
            return;
        };
        let parts: Vec<&Rows> = jobs.iter().map(|j| &j.rows).collect();
        let sizes = assemble(
            &jobs[0].model,
            &jobs[0].plan,
            &resident.layout,
            &parts,
            &mut self.words,
            &mut self.ops,
        );
        let plan = jobs[0].plan.clone();
        let m = &self.shared.metrics;
        m.batches.fetch_add(1, Ordering::Relaxed);
        m.items.fetch_add(items as u64, Ordering::Relaxed);
        m.jobs.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        match self.exec.launch(
            slot,
            &resident.weights,
            &jobs[0].model,
            &plan,
            &self.words,
            &self.ops,
            &sizes,
        ) {
            Ok(()) => {
                self.busy[slot] = jobs;
                self.order.push_back(slot);
            }
            Err(e) => self.failed(jobs, e),
        }
    }

    fn complete_finished(&mut self) {
        while let Some(&slot) = self.order.front() {
            match self.exec.poll(slot) {
                Ok(true) => self.finish(slot),
                Ok(false) => return,
                Err(e) => {
                    self.order.pop_front();
                    let jobs = std::mem::take(&mut self.busy[slot]);
                    self.failed(jobs, e);
                }
            }
        }
    }

    /// Waits for `slot` (the oldest busy one) and answers its jobs.
    fn finish(&mut self, slot: usize) {
        debug_assert_eq!(self.order.front(), Some(&slot));
        self.order.pop_front();
        let jobs = std::mem::take(&mut self.busy[slot]);
        match self.exec.finish(slot) {
            Ok(scores) => {
                // Head by head over the whole batch; each job takes its rows of every head,
                // head by head too.
                let heads = jobs.first().map_or(1, |j| j.model.num_heads());
                let total = scores.len() / heads;
                let mut at = 0;
                for mut j in jobs {
                    let n = j.rows.items();
                    j.rows.scores.clear();
                    for h in 0..heads {
                        let from = h * total + at;
                        j.rows.scores.extend_from_slice(&scores[from..from + n]);
                    }
                    at += n;
                    answer(j, Ok(()));
                }
            }
            Err(e) => self.failed(jobs, e),
        }
    }

    /// Fails `jobs` with `e`; a lost device also fails everything queued and takes the
    /// device out of service.
    fn failed(&mut self, jobs: Vec<Job>, e: GpuError) {
        self.shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
        eprintln!("rankd: GPU {}: {e}", self.index);
        let lost_now = e.kind == GpuErrorKind::Lost && self.lost.is_none();
        // The device leaves service before anyone hears of the failure: a core that falls back
        // for these jobs must not route its next request to this device.
        if lost_now {
            eprintln!(
                "rankd: GPU {} is lost; its models are served by the CPU engine from now on",
                self.index
            );
            self.lost = Some(e.message.clone());
            self.shared.mark_lost(self.index);
        }
        for j in jobs {
            answer(j, Err(e.clone()));
        }
        if lost_now {
            for j in self.pending.drain(..) {
                answer(j, Err(e.clone()));
            }
            while let Some(slot) = self.order.pop_front() {
                for j in std::mem::take(&mut self.busy[slot]) {
                    answer(j, Err(e.clone()));
                }
            }
            // Batches still running on other slots read these weights.
            self.exec.quiesce();
            self.models.clear();
        }
    }
}

fn answer(job: Job, result: Result<(), GpuError>) {
    // A core that gave up on the answer (its runtime stopping) drops the receiver: nothing to do.
    let _ = job.done.send(Done {
        rows: job.rows,
        result,
    });
}
