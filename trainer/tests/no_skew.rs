//! The trained model, written to a file and scored by the serving engine, gives the trainer's
//! own eval predictions: no training/serving skew. On a slice of Adult (../shared/data).

use std::path::{Path, PathBuf};

use rankd_engine::cpu::CpuEngine;
use rankd_engine::request::DenseRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model};
use rankd_feature_ops::Value;
use rankd_trainer::TrainConfig;

/// The Adult data: `$RANKD_ADULT_DIR` (scripts/gpu-check.sh carries a copy to GPU machines),
/// else `../shared/data/adult` beside the repository.
fn adult() -> Option<PathBuf> {
    let p = std::env::var_os("RANKD_ADULT_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/adult"),
        PathBuf::from,
    );
    p.join("train.csv").exists().then_some(p)
}

/// Scores every eval row of `trained` with the serving engine from the model file at `path`, half
/// with the features at the request level and half on the item, and compares with the trainer.
fn assert_served_equal(path: &Path, trained: &rankd_trainer::Trained) {
    let model = Model::open(path).unwrap();
    // Every eval row as a request: half with the features at the request level, half on the
    // item, so both paths of the engine are compared.
    let mut engine = CpuEngine::new();
    let mut out = BatchOutput::default();
    let mut worst = 0f32;
    for (i, row) in trained.eval.rows.iter().enumerate() {
        let values: Vec<Value<'_>> = row.iter().map(|c| c.value()).collect();
        let req = if i % 2 == 0 {
            DenseRequest {
                user: values,
                items: vec![vec![]],
            }
        } else {
            DenseRequest {
                user: vec![],
                items: vec![values],
            }
        };
        out.clear();
        engine.score(&model, &[&req], &mut out);
        // Every head (one for a single-task model); the trainer's predictions hold them row
        // by row.
        let heads = trained.layout.heads();
        assert_eq!(model.num_heads(), heads);
        for h in 0..heads {
            let served = out.head(0, h).unwrap().unwrap()[0];
            worst = worst.max((served - trained.eval_predictions[i * heads + h]).abs());
        }
    }
    assert!(
        worst <= 1e-5,
        "served scores differ from the trainer's by up to {worst}"
    );
}

/// The first `n` lines (plus the header) of a CSV, written to `dir`.
fn head(src: &Path, n: usize, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let out: Vec<&str> = text.lines().take(n + 1).collect();
    let path = dir.join(name);
    std::fs::write(&path, out.join("\n")).unwrap();
    path
}

/// The Adult example config on the first `train_rows` / `eval_rows` rows of the official split,
/// copied into `dir`.
fn slice_config(data: &Path, dir: &Path, train_rows: usize, eval_rows: usize) -> TrainConfig {
    example_slice("train.toml", data, dir, train_rows, eval_rows)
}

/// [`slice_config`] of another Adult example config (its test files and held-out split off).
fn example_slice(
    name: &str,
    data: &Path,
    dir: &Path,
    train_rows: usize,
    eval_rows: usize,
) -> TrainConfig {
    let train = head(&data.join("train.csv"), train_rows, dir, "train.csv");
    let eval = head(&data.join("test.csv"), eval_rows, dir, "test.csv");
    let example = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/adult")
        .join(name);
    let text = std::fs::read_to_string(&example).unwrap();
    let mut config = TrainConfig::from_toml(&text, example.parent().unwrap()).unwrap();
    config.train.train_files = vec![train];
    config.train.eval_files = vec![eval];
    config.train.eval_split = None;
    config.train.test_files = vec![];
    config
}

#[test]
fn served_scores_equal_trainer_eval() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = slice_config(&data, dir.path(), 3000, 1000);
    config.train.epochs = 2;
    config.train.batch_size = 128;
    let mut log = Vec::new();
    let trained = rankd_trainer::train(&config, &mut log).unwrap();
    assert_eq!(trained.history.len(), 2);
    let auc = trained.history[1].auc;
    assert!(
        auc > 0.8,
        "a model trained on 3000 rows should rank well: auc {auc}"
    );
    let path = dir.path().join("adult.rkm");
    rankd_trainer::write(&config, &trained, &path).unwrap();

    let model = Model::open(&path).unwrap();
    let metrics = &model.file().spec().metadata.metrics;
    let stored = metrics.iter().find(|(k, _)| k == "eval_auc").unwrap().1;
    let recomputed =
        rankd_trainer::metrics::evaluate(&trained.eval_predictions, &trained.eval.labels).auc;
    assert_eq!(stored, recomputed);

    assert_served_equal(&path, &trained);
}

#[test]
fn resume_from_a_checkpoint_equals_an_uninterrupted_run() {
    resume_equals_uninterrupted("cpu");
}

/// On emulated devices: the dense layers and their moments go back to the devices on resume.
#[test]
fn resume_on_devices_equals_an_uninterrupted_run() {
    resume_equals_uninterrupted("emulated:2");
}

fn resume_equals_uninterrupted(device: &str) {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = slice_config(&data, dir.path(), 1500, 500);
    config.train.device = device.into();
    config.train.batch_size = 128;
    config.train.checkpoint_every = 1;
    config.train.early_stopping = 0;
    config.train.epochs = 3;
    let mut log = Vec::new();
    let straight =
        rankd_trainer::train_from(&config, Some((&dir.path().join("a.ckpt"), false)), &mut log)
            .unwrap();

    // Stop after two epochs, then resume to three.
    let ckpt = dir.path().join("b.ckpt");
    config.train.epochs = 2;
    rankd_trainer::train_from(&config, Some((&ckpt, false)), &mut log).unwrap();
    assert!(ckpt.exists());
    config.train.epochs = 3;
    let resumed = rankd_trainer::train_from(&config, Some((&ckpt, true)), &mut log).unwrap();
    assert_eq!(
        resumed.history.len(),
        1,
        "only the third epoch runs after resuming"
    );
    assert_eq!(straight.eval_predictions, resumed.eval_predictions);

    // A checkpoint of another model config is refused with a message.
    std::fs::write(&ckpt, b"RKDCKPT1 and then garbage that is long enough").unwrap();
    let err = rankd_trainer::train_from(&config, Some((&ckpt, true)), &mut log).unwrap_err();
    assert!(err.to_string().contains("checkpoint"), "{err}");
}

#[test]
fn two_sync_workers_are_deterministic_and_learn_like_one() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = slice_config(&data, dir.path(), 3000, 1000);
    config.train.epochs = 2;
    config.train.batch_size = 128;
    config.train.early_stopping = 0;
    let mut log = Vec::new();
    let one = rankd_trainer::train(&config, &mut log).unwrap();
    config.train.workers = 2;
    let a = rankd_trainer::train(&config, &mut log).unwrap();
    let b = rankd_trainer::train(&config, &mut log).unwrap();
    assert_eq!(
        a.eval_predictions, b.eval_predictions,
        "sync mode is deterministic"
    );
    // The same gradients up to float summation order: the same model within a small tolerance.
    let worst = one
        .eval_predictions
        .iter()
        .zip(&a.eval_predictions)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.02, "two workers drifted from one by {worst}");
    config.train.mode = rankd_trainer::config::Mode::Async;
    let c = rankd_trainer::train(&config, &mut log).unwrap();
    let auc = c.history.last().unwrap().auc;
    assert!(auc > 0.8, "async training still learns: auc {auc}");
}

#[test]
fn every_model_kind_trains_and_serves_the_same() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let base = slice_config(&data, dir.path(), 2000, 500);
    for kind in [
        "wide",
        "deep",
        "deepfm",
        "dcn_stacked",
        "dcn_parallel_low_rank",
        "deep_batch_norm_dropout",
    ] {
        let mut config = base.clone();
        config.train.epochs = 1;
        config.train.batch_size = 64;
        config.train.warmup_steps = 10;
        config.train.lr_decay = 0.9;
        config.train.ps_shards = 3;
        match kind {
            "wide" => {
                config.model.deep = None;
                config.model.embeddings.clear();
            }
            "deep" => config.model.wide = None,
            "deepfm" => config.model.fm = true,
            "deep_batch_norm_dropout" => {
                // Folded into the written layers: the file is a plain deep model.
                config.model.wide = None;
                config.train.batch_norm = true;
                config.train.dropout = 0.2;
            }
            "dcn_stacked" => {
                config.model.cross = Some(rankd_formats::config::CrossConfig {
                    layers: 2,
                    rank: 0,
                    structure: rankd_formats::CrossStructure::Stacked,
                })
            }
            _ => {
                config.model.cross = Some(rankd_formats::config::CrossConfig {
                    layers: 3,
                    rank: 8,
                    structure: rankd_formats::CrossStructure::Parallel,
                })
            }
        }
        let mut log = Vec::new();
        let trained = rankd_trainer::train(&config, &mut log).unwrap();
        let auc = trained.history[0].auc;
        assert!(auc > 0.75, "{kind}: auc {auc}");
        let path = dir.path().join(format!("{kind}.rkm"));
        rankd_trainer::write(&config, &trained, &path).unwrap();
        let m = rankd_formats::ModelFile::open(&path).unwrap();
        assert_eq!(
            m.spec().architecture.kind(),
            match kind {
                "wide" | "deep" | "deepfm" => kind,
                "deep_batch_norm_dropout" => "deep",
                _ => "dcn_v2",
            }
        );
        assert_served_equal(&path, &trained);
    }
}

#[test]
fn globs_and_a_held_out_split() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(data.join("train.csv")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    for (k, part) in lines[1..3001].chunks(1500).enumerate() {
        let mut body = vec![lines[0]];
        body.extend_from_slice(part);
        std::fs::write(dir.path().join(format!("part-{k}.csv")), body.join("\n")).unwrap();
    }
    std::fs::write(dir.path().join("notes.txt"), "not data").unwrap();
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/adult/train.toml");
    let mut text = std::fs::read_to_string(&example).unwrap();
    let i = text.find("\n[train]\n").unwrap() + 1;
    let fits = text[text.find("\n[[train.fit]]\n").unwrap() + 1..].to_owned();
    text.truncate(i);
    text.push_str("[train]\ntrain_files = [\"part-*.csv\"]\neval_split = 0.2\nepochs = 1\nbatch_size = 64\nseed = 5\n\n");
    text.push_str(&fits);
    let config = TrainConfig::from_toml(&text, dir.path()).unwrap();
    assert_eq!(
        config.train.train_files.len(),
        2,
        "{:?}",
        config.train.train_files
    );
    let mut log = Vec::new();
    let trained = rankd_trainer::train(&config, &mut log).unwrap();
    let held = trained.eval.labels.len();
    assert!((450..=750).contains(&held), "held out {held} of 3000 rows");
    assert!(trained.history[0].auc > 0.75, "{}", trained.history[0].auc);

    let bad = text.replace("part-*.csv", "nothing-*.csv");
    let err = TrainConfig::from_toml(&bad, dir.path()).unwrap_err();
    assert!(err.to_string().contains("matches no file"), "{err}");
}

/// Early stopping keeps the best epoch by the validation metric: the kept epoch, its printed and
/// stored metrics are that epoch's, not the last one's; test metrics come from a separate set and
/// the same weights.
#[test]
fn the_kept_epoch_and_its_metrics_are_reported() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = slice_config(&data, dir.path(), 2000, 800);
    config.train.test_files = vec![head_from(
        &data.join("test.csv"),
        800,
        800,
        dir.path(),
        "held.csv",
    )];
    // A learning rate high enough to overfit 2,000 rows: the best epoch comes before the last.
    config.train.epochs = 10;
    config.train.lr_dense = 0.02;
    config.train.lr_sparse = 0.5;
    config.train.early_stopping = 100;
    for metric in [
        rankd_trainer::config::StopMetric::Auc,
        rankd_trainer::config::StopMetric::Logloss,
    ] {
        config.train.early_stopping_metric = metric;
        let mut log = Vec::new();
        let trained = rankd_trainer::train(&config, &mut log).unwrap();
        let log = String::from_utf8(log).unwrap();
        let best = (0..trained.history.len())
            .max_by(|&a, &b| {
                metric
                    .score(&trained.history[a])
                    .total_cmp(&metric.score(&trained.history[b]))
            })
            .unwrap();
        assert_eq!(trained.kept_epoch, best, "{metric:?}\n{log}");
        assert!(
            best + 1 < trained.history.len(),
            "{metric:?}: the last epoch was the best; the test needs an earlier one\n{log}"
        );
        let kept = trained.kept();
        assert!((kept.auc - trained.history[best].auc).abs() < 1e-12);
        assert!((kept.logloss - trained.history[best].logloss).abs() < 1e-12);
        assert!(
            log.contains(&format!(
                "kept epoch {}: validation auc {:.4}",
                best + 1,
                kept.auc
            )),
            "{log}"
        );
        let test = trained.test.expect("test metrics");
        assert!(test.auc > 0.5 && test.auc != kept.auc);
        let path = dir.path().join("kept.rkm");
        rankd_trainer::write(&config, &trained, &path).unwrap();
        let file = rankd_formats::ModelFile::open(&path).unwrap();
        let stored: std::collections::HashMap<&str, f64> = file
            .spec()
            .metadata
            .metrics
            .iter()
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        assert_eq!(stored["kept_epoch"], (best + 1) as f64);
        assert_eq!(stored["epochs"], trained.history.len() as f64);
        assert_eq!(stored["eval_auc"], kept.auc);
        assert_eq!(stored["test_auc"], test.auc);
        assert_served_equal(&path, &trained);
    }
}

/// `n` lines after the first `skip` data lines of a CSV (plus the header), written to `dir`.
fn head_from(src: &Path, skip: usize, n: usize, dir: &Path, name: &str) -> PathBuf {
    let text = std::fs::read_to_string(src).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let out: Vec<&str> = std::iter::once(header)
        .chain(lines.skip(skip).take(n))
        .collect();
    let path = dir.join(name);
    std::fs::write(&path, out.join("\n")).unwrap();
    path
}

#[test]
fn f16_tables_serve_what_the_trainer_evaluated() {
    stored_tables_serve_what_the_trainer_evaluated(rankd_formats::WeightType::F16);
}

#[test]
fn int8_tables_serve_what_the_trainer_evaluated() {
    stored_tables_serve_what_the_trainer_evaluated(rankd_formats::WeightType::I8);
}

fn stored_tables_serve_what_the_trainer_evaluated(weight_type: rankd_formats::WeightType) {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = slice_config(&data, dir.path(), 3000, 1000);
    config.train.epochs = 1;
    let f32_path = dir.path().join("f32.rkm");
    let trained = rankd_trainer::train(&config, &mut Vec::new()).unwrap();
    rankd_trainer::write(&config, &trained, &f32_path).unwrap();
    for e in &mut config.model.embeddings {
        e.weight_type = weight_type;
    }
    let f16_path = dir.path().join("f16.rkm");
    let trained16 = rankd_trainer::train(&config, &mut Vec::new()).unwrap();
    rankd_trainer::write(&config, &trained16, &f16_path).unwrap();
    // Served = evaluated, with the tables as the file stores them.
    assert_served_equal(&f16_path, &trained16);
    let m = Model::open(&f16_path).unwrap();
    assert_eq!(m.file().header().version, 2);
    assert_eq!(Model::open(&f32_path).unwrap().file().header().version, 1);
    // The same training; only the stored precision differs, and a little.
    let worst = trained
        .eval_predictions
        .iter()
        .zip(&trained16.eval_predictions)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(
        worst > 0.0 && worst < 2e-2,
        "{weight_type:?} vs f32 predictions differ by {worst}"
    );
    let (a, b) = (trained.kept().auc, trained16.kept().auc);
    assert!((a - b).abs() < 2e-3, "auc f32 {a} vs f16 {b}");
    let (l32, l16) = (
        std::fs::metadata(&f32_path).unwrap().len(),
        std::fs::metadata(&f16_path).unwrap().len(),
    );
    assert!(l16 < l32, "{l16} vs {l32}");
}

#[test]
fn multitask_heads_serve_what_the_trainer_evaluated() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let train = head(&data.join("train.csv"), 3000, dir.path(), "train.csv");
    let eval = head(&data.join("test.csv"), 600, dir.path(), "test.csv");
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/adult/multitask.toml");
    let text = std::fs::read_to_string(&example).unwrap();
    let mut config = TrainConfig::from_toml(&text, example.parent().unwrap()).unwrap();
    config.train.train_files = vec![train];
    config.train.eval_files = vec![eval];
    config.train.eval_split = None;
    config.train.test_files = vec![];
    config.train.epochs = 2;
    config.train.early_stopping = 0;
    let trained = rankd_trainer::train(&config, &mut Vec::new()).unwrap();
    let heads = trained.kept_heads();
    assert_eq!(heads.len(), 2);
    assert!(heads[0].auc > 0.7, "income: {:?}", heads[0]);
    assert!(heads[1].auc > 0.55, "long_hours: {:?}", heads[1]);
    let path = dir.path().join("mt.rkm");
    rankd_trainer::write(&config, &trained, &path).unwrap();
    let model = Model::open(&path).unwrap();
    assert_eq!(model.heads(), ["income", "long_hours"]);
    let metrics = &model.file().spec().metadata.metrics;
    let stored = |k: &str| metrics.iter().find(|(n, _)| n == k).map(|m| m.1);
    assert_eq!(stored("eval_auc.long_hours"), Some(heads[1].auc));
    assert_eq!(stored("eval_auc"), Some(heads[0].auc));
    assert_served_equal(&path, &trained);
}

/// Trains the Adult slice on the CPU and on `device`; the device run learns the same model
/// (test AUC within 0.002, predictions close) and its written file serves exactly what it
/// evaluated.
fn device_trains_like_the_cpu(device: &str, names: &str) {
    example_on_device_like_the_cpu("train.toml", 3000, device, names);
}

/// [`device_trains_like_the_cpu`] for the example config `example` on `rows` training rows.
fn example_on_device_like_the_cpu(example: &str, rows: usize, device: &str, names: &str) {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = example_slice(example, &data, dir.path(), rows, 1000);
    config.train.epochs = 2;
    config.train.batch_size = 128;
    config.train.early_stopping = 0;
    config.train.device = "cpu".into();
    let mut log = Vec::new();
    let cpu = rankd_trainer::train(&config, &mut log).unwrap();
    config.train.device = device.into();
    let mut log = Vec::new();
    let dev = rankd_trainer::train(&config, &mut log).unwrap();
    let log = String::from_utf8(log).unwrap();
    assert!(log.contains(names), "{log}");
    let (a, b) = (cpu.history[1].auc, dev.history[1].auc);
    assert!((a - b).abs() < 0.002, "auc: CPU {a}, {device} {b}");
    let worst = cpu
        .eval_predictions
        .iter()
        .zip(&dev.eval_predictions)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < 0.02, "{device} drifted from the CPU by {worst}");
    let path = dir.path().join("adult.rkm");
    rankd_trainer::write(&config, &dev, &path).unwrap();
    assert_served_equal(&path, &dev);
}

#[test]
fn emulated_devices_train_like_the_cpu_and_serve_what_they_evaluated() {
    device_trains_like_the_cpu(
        "emulated:2",
        "training on 2 devices: emulated:0, emulated:1",
    );
}

#[test]
fn cross_and_multitask_models_train_on_emulated_devices_like_the_cpu() {
    let names = "training on 2 devices: emulated:0, emulated:1";
    example_on_device_like_the_cpu("dcn.toml", 1500, "emulated:2", names);
    example_on_device_like_the_cpu("multitask.toml", 1500, "emulated:2", names);
}

#[test]
fn a_gpu_trains_like_the_cpu_and_serves_what_it_evaluated() {
    match rankd_engine::gpu::probe() {
        Ok(d) if !d.is_empty() => {
            let names = "training on 1 device: cuda:0";
            device_trains_like_the_cpu("cuda:0", names);
            example_on_device_like_the_cpu("dcn.toml", 3000, "cuda:0", names);
            example_on_device_like_the_cpu("multitask.toml", 3000, "cuda:0", names);
        }
        Ok(_) => println!("skipped: the CUDA driver sees no GPU"),
        Err(why) => println!("skipped: no GPU: {why}"),
    }
}

#[test]
fn two_gpus_train_like_the_cpu() {
    match rankd_engine::gpu::probe() {
        Ok(d) if d.len() >= 2 && rankd_trainer::gpu::nccl_present() => {
            device_trains_like_the_cpu("cuda:0,1", "training on 2 devices: cuda:0")
        }
        Ok(d) if d.len() >= 2 => println!("skipped: NCCL (libnccl.so) could not be loaded"),
        Ok(d) => println!("skipped: {} GPU, two are needed", d.len()),
        Err(why) => println!("skipped: no GPU: {why}"),
    }
}
