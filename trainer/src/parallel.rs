//! Data parallelism inside one process: K worker threads, each with its own [`CpuCompute`], and
//! the calling thread as the parameter server that owns the parameters and the optimizer.
//!
//! - Sync: every step's batch is split into K contiguous shards; the workers compute their
//!   shards' gradients in parallel, the server combines them (weighted by shard size, in worker
//!   order) and applies one update. The result depends only on the seed and K.
//! - Async: the epoch's batches are dealt round-robin to the workers; each computes on the
//!   current parameters and applies its own update under the server's lock, without waiting for
//!   the others (Hogwild-style; not deterministic).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use crate::data::Dataset;
use crate::model::{Compute, CpuCompute, Grads, Layout, Optimizer, Params};

/// One synchronous epoch over `order`; returns the summed loss.
#[allow(clippy::too_many_arguments)]
pub fn sync_epoch(
    layout: &Layout,
    params: &mut Params,
    opt: &mut Optimizer,
    data: &Dataset,
    order: &[usize],
    batch_size: usize,
    workers: &mut [(CpuCompute, Grads)],
    k: usize,
    done: &AtomicUsize,
) -> f64 {
    let mut loss = 0f64;
    let k = k.min(workers.len()).max(1);
    for batch in order.chunks(batch_size) {
        let per = batch.len().div_ceil(k);
        let shards: Vec<&[usize]> = batch.chunks(per).collect();
        let p: &Params = params;
        let losses: Vec<f64> = std::thread::scope(|scope| {
            let mut handles = Vec::new();
            let (first, rest) = workers.split_at_mut(1);
            for ((compute, grads), shard) in rest.iter_mut().zip(&shards[1..]) {
                handles.push(scope.spawn(move || {
                    compute.step(layout, p, &data.slots, &data.labels, shard, grads)
                }));
            }
            let (c0, g0) = &mut first[0];
            let mut out = vec![c0.step(layout, p, &data.slots, &data.labels, shards[0], g0)];
            out.extend(
                handles
                    .into_iter()
                    .map(|h| h.join().expect("worker panicked")),
            );
            out
        });
        loss += losses.iter().sum::<f64>();
        // Each worker's gradient is its shard's mean: weight by shard size.
        let n = batch.len() as f32;
        let (first, rest) = workers.split_at_mut(1);
        let total = &mut first[0].1;
        total.scale(shards[0].len() as f32 / n);
        for ((_, g), shard) in rest.iter().zip(&shards[1..]) {
            total.merge(g, shard.len() as f32 / n);
        }
        opt.apply(params, total);
        done.fetch_add(batch.len(), Ordering::Relaxed);
    }
    loss
}

/// One asynchronous epoch over `order`; returns the summed loss.
#[allow(clippy::too_many_arguments)]
pub fn async_epoch(
    layout: &Layout,
    params: &mut Params,
    opt: &mut Optimizer,
    data: &Dataset,
    order: &[usize],
    batch_size: usize,
    k: usize,
    done: &AtomicUsize,
) -> f64 {
    // The server's state moves behind locks for the epoch and back after it.
    let shared = RwLock::new(std::mem::take(params));
    let optimizer = Mutex::new(std::mem::take(opt));
    let batches: Vec<&[usize]> = order.chunks(batch_size).collect();
    let loss: f64 = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..k.max(1))
            .map(|w| {
                let (shared, optimizer, batches) = (&shared, &optimizer, &batches);
                scope.spawn(move || {
                    let mut compute = CpuCompute::with_seed(w as u64);
                    let mut grads = Grads::new(layout);
                    let mut loss = 0f64;
                    for batch in batches.iter().skip(w).step_by(k.max(1)) {
                        {
                            let p = shared.read().unwrap_or_else(|e| e.into_inner());
                            loss += compute.step(
                                layout,
                                &p,
                                &data.slots,
                                &data.labels,
                                batch,
                                &mut grads,
                            );
                        }
                        let mut p = shared.write().unwrap_or_else(|e| e.into_inner());
                        optimizer
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .apply(&mut p, &grads);
                        done.fetch_add(batch.len(), Ordering::Relaxed);
                    }
                    loss
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .sum()
    });
    *params = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    *opt = optimizer.into_inner().unwrap_or_else(|e| e.into_inner());
    loss
}
