//! The device step against the CPU trainer: on the host executor everywhere, and on every GPU
//! where there are any (skipped with the reason elsewhere).

use super::device::{Device, HostDevice};
use super::prep::Share;
use super::replica::Replica;
use super::*;
use crate::model::tests::{setup_config, setup_mt};
use crate::model::{Compute, CpuCompute, Grads};
use rankd_feature_ops::SlotBatch;
use rankd_formats::config::ModelConfig;

/// The model kinds the device step computes: every part; no FM; no wide part; wide and FM
/// without deep layers; deep layers alone; DCN-v2 cross layers (full-rank stacked, low-rank
/// parallel); batch normalization; dropout; both.
fn kinds() -> Vec<(&'static str, Layout, Params, SlotBatch, Vec<f32>)> {
    type Edit = fn(&mut ModelConfig);
    let cross = |rank, parallel| {
        Some(rankd_formats::config::CrossConfig {
            layers: 2,
            rank,
            structure: if parallel {
                rankd_formats::CrossStructure::Parallel
            } else {
                rankd_formats::CrossStructure::Stacked
            },
        })
    };
    let edits: [(&str, Edit, _, bool, f32); 10] = [
        ("wide & deep & fm", |_| {}, None, false, 0.0),
        ("wide & deep", |c| c.fm = false, None, false, 0.0),
        ("deep & fm", |c| c.wide = None, None, false, 0.0),
        ("wide & fm", |c| c.deep = None, None, false, 0.0),
        (
            "deep",
            |c| {
                c.fm = false;
                c.wide = None;
            },
            None,
            false,
            0.0,
        ),
        (
            "cross, full rank, stacked",
            |_| {},
            cross(0, false),
            false,
            0.0,
        ),
        (
            "cross, rank 2, parallel",
            |_| {},
            cross(2, true),
            false,
            0.0,
        ),
        ("batch norm", |_| {}, None, true, 0.0),
        ("dropout", |_| {}, None, false, 0.3),
        (
            "batch norm, dropout, cross",
            |_| {},
            cross(2, false),
            true,
            0.2,
        ),
    ];
    let mut out: Vec<_> = edits
        .into_iter()
        .map(|(name, edit, cross, bn, dropout)| {
            let (l, p, s, y) = setup_config(cross, bn, dropout, edit);
            (name, l, p, s, y)
        })
        .collect();
    // Multi-task: a shared bottom with towers, and MMoE; one label missing (NaN).
    for (name, experts, tower) in [
        ("shared bottom, 3 heads", 1, &[3, 1][..]),
        ("MMoE, 3 experts, 3 heads", 3, &[1][..]),
    ] {
        let (l, p, s, mut y) = setup_mt(experts, tower);
        y[5] = f32::NAN;
        out.push((name, l, p, s, y));
    }
    out
}

/// Examples of a step: every row, some twice (repeated ids in the sparse gradients).
const ROWS: [usize; 7] = [0, 1, 2, 3, 1, 3, 3];

fn close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what}[{i}]: device {x} vs CPU {y}"
        );
    }
}

/// One step's loss and gradients on `dev` equal the CPU's within `tol`, for every model kind.
fn step_equals_cpu<D: Device>(mut open: impl FnMut() -> D, tol: f32) {
    for (name, l, p, s, y) in kinds() {
        let mut cpu = CpuCompute::with_seed(5);
        let mut g = Grads::new(&l);
        let loss = cpu.step(&l, &p, &s, &y, &ROWS, &mut g);
        let mut r = Replica::new(open(), &l, &p).unwrap();
        let mut share = Share::build(&l, &s, &y, &ROWS);
        share.pull(&l, &p);
        share.draw_masks(&l, &mut crate::model::dropout_state(5));
        r.step(&l, &share, p.wide_bias, 1.0).unwrap();
        let grads = r.dense_grads().unwrap();
        let pushed = r.push(&l, &share).unwrap();
        assert!(
            (pushed.loss - loss).abs() <= f64::from(tol) * loss.abs(),
            "{name}: loss {} vs {loss}",
            pushed.loss
        );
        let cpu_dense =
            g.w.iter()
                .chain(&g.b)
                .chain(&g.cross)
                .chain(&g.bn)
                .chain(&g.mt);
        assert_eq!(grads.len(), cpu_dense.clone().count(), "{name}");
        for (i, (a, b)) in grads.iter().zip(cpu_dense).enumerate() {
            close(&format!("{name}: dense tensor {i}"), a, b, tol);
        }
        let stats = r.bn_stats(&l).unwrap();
        for (i, st) in stats.iter().enumerate() {
            let cpu_stats = [g.bn_batch[2 * i].clone(), g.bn_batch[2 * i + 1].clone()].concat();
            close(
                &format!("{name}: batch statistics {i}"),
                st,
                &cpu_stats,
                tol,
            );
        }
        let tables = share.emb.iter().zip(&pushed.emb).zip(&g.emb);
        let wide = share.wide.iter().zip(&pushed.wide).zip(&g.wide);
        for (t, ((sh, values), sg)) in tables.chain(wide).enumerate() {
            let dim = sg.dim().max(1);
            let mut rows = sh.rows.clone();
            let mut cpu_rows = sg.rows.clone();
            rows.sort_unstable();
            cpu_rows.sort_unstable();
            assert_eq!(rows, cpu_rows, "{name}: table {t}: the rows touched");
            for (j, row) in sh.rows.iter().enumerate() {
                let at = sg.rows.iter().position(|r| r == row).unwrap();
                close(
                    &format!("{name}: table {t} row {row}"),
                    &values[j * dim..(j + 1) * dim],
                    &sg.values[at * dim..(at + 1) * dim],
                    tol,
                );
            }
        }
        if l.has_wide {
            close(
                &format!("{name}: wide bias"),
                &[pushed.wide_bias],
                &[g.wide_bias],
                tol,
            );
        }
        // The logits of a prediction are the CPU's (a batch-normalized network predicts on
        // the CPU only).
        if l.batch_norm {
            assert!(r.logits(&l, &share, p.wide_bias).is_err());
            continue;
        }
        let mut preds = Vec::new();
        cpu.predict(&l, &p, &s, &ROWS, &mut preds);
        let logits = r.logits(&l, &share, p.wide_bias).unwrap();
        let probs: Vec<f32> = logits.iter().map(|&z| rankd_engine::sigmoid(z)).collect();
        close(&format!("{name}: predictions"), &probs, &preds, tol);
    }
}

/// Three steps of a fleet of `k` devices equal three synchronous steps of `k` CPU workers
/// (`parallel::sync_epoch`: each worker's share, batch statistics and dropout masks as each
/// device's) within `tol` on every parameter.
fn steps_equal_cpu<D: Device>(open: impl Fn(usize) -> D, k: usize, tol: f32) {
    for (name, l, p, s, y) in kinds() {
        let opt = || Optimizer::new(&p, 0.01, 0.1, 1e-3).with_layout(&l);
        let mut cpu = (p.clone(), opt());
        let mut dev = (p.clone(), opt());
        let devices = (0..k).map(&open).collect();
        let mut fleet = Fleet::new(devices, &l, &dev.0, &mut dev.1, 5).unwrap();
        let mut workers: Vec<(CpuCompute, Grads)> = (0..k)
            .map(|w| (CpuCompute::with_seed(5 + w as u64), Grads::new(&l)))
            .collect();
        let data = crate::data::Dataset {
            rows: Vec::new(),
            labels: y.clone(),
            slots: s.clone(),
        };
        let done = std::sync::atomic::AtomicUsize::new(0);
        for _ in 0..3 {
            let cpu_loss = crate::parallel::sync_epoch(
                &l,
                &mut cpu.0,
                &mut cpu.1,
                &data,
                &ROWS,
                ROWS.len(),
                &mut workers,
                k,
                &done,
            );
            let mut shares: Vec<Share> = prep::split(&ROWS, k)
                .into_iter()
                .map(|part| Share::build(&l, &s, &y, part))
                .collect();
            let loss = fleet
                .step(&l, &mut dev.0, &mut dev.1, &mut shares, ROWS.len())
                .unwrap();
            assert!(
                (loss - cpu_loss).abs() <= 1e-4 * cpu_loss,
                "{name}: loss {loss} vs {cpu_loss}"
            );
        }
        fleet.store(&mut dev.0, &mut dev.1).unwrap();
        // Under batch normalization a hidden layer's bias has no gradient but rounding noise,
        // which Adam scales up to steps of the learning rate, and the running means follow
        // those biases: neither is compared (the biases' gradients are, near zero, and the
        // batch statistics are, by the single-step test).
        let noise: Vec<*const f32> = if l.batch_norm {
            let biases = dev.0.b[..l.hidden()].iter();
            let means = dev.0.bn_stats.iter().step_by(2);
            biases.chain(means).map(|b| b.as_ptr()).collect()
        } else {
            Vec::new()
        };
        let (a, b) = (&mut dev.0, &mut cpu.0);
        for (i, (x, y)) in a.tensors_mut().into_iter().zip(b.tensors_mut()).enumerate() {
            if noise.contains(&x.as_ptr()) {
                continue;
            }
            close(&format!("{name}: tensor {i} after three steps"), x, y, tol);
        }
        assert_eq!(dev.1.steps(), 3);
    }
}

#[test]
fn a_step_on_the_host_executor_equals_the_cpu_step() {
    step_equals_cpu(|| HostDevice::new(0), 1e-5);
}

#[test]
fn steps_on_one_and_on_three_emulated_devices_equal_the_cpu_steps() {
    steps_equal_cpu(HostDevice::new, 1, 1e-5);
    // Three shares of 3, 3 and 1 examples, summed by the all-reduce.
    steps_equal_cpu(HostDevice::new, 3, 1e-5);
}

/// The GPUs of this machine, or why there are none.
fn gpus() -> Option<Vec<usize>> {
    match rankd_engine::gpu::probe() {
        Ok(d) if !d.is_empty() => Some(d.iter().map(|d| d.ordinal).collect()),
        Ok(_) => {
            println!("skipped: the CUDA driver sees no GPU");
            None
        }
        Err(why) => {
            println!("skipped: no GPU: {why}");
            None
        }
    }
}

#[test]
fn a_step_on_a_gpu_equals_the_cpu_step() {
    let Some(list) = gpus() else { return };
    step_equals_cpu(|| cuda::open(&list[..1]).unwrap().remove(0), 1e-5);
    steps_equal_cpu(|i| cuda::open(&[list[i]]).unwrap().remove(0), 1, 1e-5);
}

#[test]
fn two_gpus_equal_one_with_the_whole_batch() {
    let Some(list) = gpus() else { return };
    if list.len() < 2 {
        println!("skipped: {} GPU, two are needed", list.len());
        return;
    }
    if !nccl_present() {
        println!("skipped: NCCL (libnccl.so) could not be loaded");
        return;
    }
    // Each model kind opens the pair afresh (its fleet owns them).
    let pair = std::cell::RefCell::new(Vec::new());
    steps_equal_cpu(
        |i| {
            let mut p = pair.borrow_mut();
            if i == 0 {
                *p = cuda::open(&list[..2]).unwrap();
            }
            p.remove(0)
        },
        2,
        1e-5,
    );
}

fn settings(device: &str) -> TrainSettings {
    let mut s = TrainSettings::defaults();
    s.device = device.into();
    s
}

#[test]
fn where_a_run_trains() {
    use rankd_engine::gpu::{DeviceInfo, Unavailable};
    let (plain, ..) = setup_config(None, false, 0.0, |_| {});
    let gpu = |n: usize| DeviceInfo {
        ordinal: n,
        name: "test GPU".into(),
        total_bytes: 1 << 30,
    };
    let two = Ok(vec![gpu(0), gpu(1)]);
    let none: std::result::Result<Vec<DeviceInfo>, _> = Err(Unavailable::NoDriver);
    let choose = |d: &str, l: &Layout, found, nccl| choose(&settings(d), l, found, nccl);
    // Auto: the GPUs when they are there, else the CPU with the reason.
    assert_eq!(
        choose("auto", &plain, &two, true).unwrap(),
        Choice::Cuda(vec![0, 1])
    );
    match choose("auto", &plain, &none, true).unwrap() {
        Choice::Cpu(why) => assert!(why.contains("no CUDA driver"), "{why}"),
        other => panic!("{other:?}"),
    }
    // Without NCCL, auto trains on one GPU; an explicit list of two is an error.
    assert_eq!(
        choose("auto", &plain, &two, false).unwrap(),
        Choice::Cuda(vec![0])
    );
    let e = choose("cuda:0,1", &plain, &two, false).unwrap_err();
    assert!(e.to_string().contains("NCCL"), "{e}");
    assert_eq!(
        choose("cuda:1", &plain, &two, false).unwrap(),
        Choice::Cuda(vec![1])
    );
    // An explicit cuda without CUDA fails, naming what is missing.
    let e = choose("cuda", &plain, &none, true).unwrap_err();
    assert!(e.to_string().contains("no CUDA driver"), "{e}");
    assert!(choose("gpu", &plain, &two, true).is_err());
    assert_eq!(
        choose("cpu", &plain, &two, true).unwrap(),
        Choice::Cpu("device = \"cpu\" is configured".into())
    );
    assert_eq!(
        choose("emulated:2", &plain, &none, true).unwrap(),
        Choice::Emulated(2)
    );
    // Multi-task models train on the devices.
    let (multitask, ..) = setup_mt(2, &[3, 1]);
    assert_eq!(
        choose("emulated:1", &multitask, &none, true).unwrap(),
        Choice::Emulated(1)
    );
    // Cross layers, batch normalization and dropout train on the devices.
    let (with_bn, ..) = setup_config(None, true, 0.1, |_| {});
    assert_eq!(
        choose("emulated:1", &with_bn, &none, true).unwrap(),
        Choice::Emulated(1)
    );
    // Settings that cannot work are refused before the data is read.
    assert!(precheck(&settings("gpu")).is_err());
    assert!(precheck(&settings("emulated:0")).is_err());
    assert!(precheck(&settings("cpu")).is_ok());
    assert!(precheck(&settings("emulated:2")).is_ok());
    assert!(precheck(&settings("auto")).is_ok());
    let mut s = settings("auto");
    s.mode = Mode::Async;
    match super::choose(&s, &plain, &two, true).unwrap() {
        Choice::Cpu(why) => assert!(why.contains("async"), "{why}"),
        other => panic!("{other:?}"),
    }
}

/// An epoch, whose next batch's rows are pulled while the devices compute (and pulled again
/// where the step updated them), equals the same batches stepped one by one, bit for bit.
#[test]
fn an_epoch_with_its_pulls_overlapped_equals_step_by_step() {
    epoch_equals_steps(|| vec![HostDevice::new(0), HostDevice::new(1)]);
}

#[test]
fn on_a_gpu_an_epoch_with_its_pulls_overlapped_equals_step_by_step() {
    let Some(list) = gpus() else { return };
    epoch_equals_steps(|| cuda::open(&list[..1]).unwrap());
}

fn epoch_equals_steps<D: Device>(devices: impl Fn() -> Vec<D>) {
    // Few distinct examples: consecutive batches share most of their rows.
    let order = [0, 1, 2, 3, 3, 2, 1, 0, 2, 2, 1, 3, 0];
    for (name, l, p, s, y) in kinds() {
        let data = crate::data::Dataset {
            rows: Vec::new(),
            labels: y.clone(),
            slots: s.clone(),
        };
        let opt = || Optimizer::new(&p, 0.01, 0.1, 1e-3).with_layout(&l);
        let (mut pa, mut oa) = (p.clone(), opt());
        let mut fa = Fleet::new(devices(), &l, &pa, &mut oa, 5).unwrap();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let la = fa
            .epoch(&l, &mut pa, &mut oa, &data, &order, 3, &done)
            .unwrap();
        fa.store(&mut pa, &mut oa).unwrap();
        let (mut pb, mut ob) = (p.clone(), opt());
        let mut fb = Fleet::new(devices(), &l, &pb, &mut ob, 5).unwrap();
        let mut lb = 0.0;
        for b in order.chunks(3) {
            let mut shares: Vec<Share> = prep::split(b, fb.names().len())
                .into_iter()
                .map(|part| Share::build(&l, &s, &y, part))
                .collect();
            lb += fb.step(&l, &mut pb, &mut ob, &mut shares, b.len()).unwrap();
        }
        fb.store(&mut pb, &mut ob).unwrap();
        assert_eq!(la, lb, "{name}: loss");
        assert_eq!(done.into_inner(), order.len());
        for (i, (a, b)) in pa
            .tensors_mut()
            .into_iter()
            .zip(pb.tensors_mut())
            .enumerate()
        {
            assert_eq!(a, b, "{name}: tensor {i}");
        }
    }
}

/// A worker process's step on a device (the shards hold the parameters and apply the updates)
/// gives the CPU worker's loss and gradients, dense, sparse and batch statistics, for every
/// model kind, step after step (the second on changed weights, which the device reloads).
#[test]
fn a_worker_step_on_a_device_equals_the_cpu_workers() {
    worker_step_equals_cpu(|| HostDevice::new(0));
}

#[test]
fn a_worker_step_on_a_gpu_equals_the_cpu_workers() {
    let Some(list) = gpus() else { return };
    worker_step_equals_cpu(|| cuda::open(&list[..1]).unwrap().remove(0));
}

fn worker_step_equals_cpu<D: Device>(open: impl Fn() -> D) {
    for (name, l, mut p, s, y) in kinds() {
        let mut cpu = CpuCompute::with_seed(9);
        let mut dev = super::compute::DeviceCompute::new(open(), 9);
        for round in 0..2 {
            let (mut g, mut gd) = (Grads::new(&l), Grads::new(&l));
            let loss = cpu.step(&l, &p, &s, &y, &ROWS, &mut g);
            let loss_d = dev.step(&l, &p, &s, &y, &ROWS, &mut gd).unwrap();
            let name = format!("{name}, step {round}");
            assert!((loss - loss_d).abs() <= 1e-5 * loss, "{name}: loss");
            let (a, b) = (&mut gd, &mut g);
            for (i, (x, y)) in a.dense_mut().into_iter().zip(b.dense_mut()).enumerate() {
                close(&format!("{name}: dense gradient {i}"), x, y, 1e-5);
            }
            for (x, y) in a.bn_batch.iter().zip(&b.bn_batch) {
                close(&format!("{name}: batch statistics"), x, y, 1e-5);
            }
            let tables = a.emb.iter().chain(&a.wide).zip(b.emb.iter().chain(&b.wide));
            for (t, (x, y)) in tables.enumerate() {
                let dim = x.dim().max(1);
                let mut rows = x.rows.clone();
                let mut cpu_rows = y.rows.clone();
                rows.sort_unstable();
                cpu_rows.sort_unstable();
                assert_eq!(rows, cpu_rows, "{name}: table {t}");
                for (j, row) in x.rows.iter().enumerate() {
                    let at = y.rows.iter().position(|r| r == row).unwrap();
                    close(
                        &format!("{name}: table {t} row {row}"),
                        &x.values[j * dim..(j + 1) * dim],
                        &y.values[at * dim..(at + 1) * dim],
                        1e-5,
                    );
                }
            }
            close(
                &format!("{name}: wide bias"),
                &[a.wide_bias],
                &[b.wide_bias],
                1e-5,
            );
            for t in p.dense_mut() {
                t.iter_mut().for_each(|v| *v *= 0.5);
            }
        }
    }
}
