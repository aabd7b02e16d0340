//! Training with a parameter server and worker processes: the launcher trains like one process,
//! fails loudly when a worker is killed, and `--resume` then finishes with the same AUC.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn adult() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/adult");
    p.join("train.csv").exists().then_some(p)
}

fn head(src: &Path, n: usize, dst: &Path) {
    let text = std::fs::read_to_string(src).unwrap();
    std::fs::write(dst, text.lines().take(n + 1).collect::<Vec<_>>().join("\n")).unwrap();
}

/// The Adult example config on slices of the data, with checkpoints every epoch.
fn config(dir: &Path, data: &Path) -> PathBuf {
    head(&data.join("train.csv"), 4000, &dir.join("train.csv"));
    head(&data.join("test.csv"), 1500, &dir.join("test.csv"));
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/adult/train.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let i = text.find("\n[train]\n").unwrap() + 1;
    let fits = &text[text.find("\n[[train.fit]]\n").unwrap() + 1..];
    let body = format!(
        "{}[train]\ntrain_files = [\"train.csv\"]\neval_files = [\"test.csv\"]\nepochs = 4\nbatch_size = 32\nseed = 11\ncheckpoint_every = 1\nname = \"adult\"\n\n{}",
        &text[..i],
        fits
    );
    let path = dir.join("train.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn eval_auc(model: &Path) -> f64 {
    let m = rankd_formats::ModelFile::open(model).unwrap();
    m.spec()
        .metadata
        .metrics
        .iter()
        .find(|(k, _)| k == "eval_auc")
        .unwrap()
        .1
}

fn train(cfg: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_rankd-train"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--processes",
            "2",
        ])
        .args(extra)
        .output()
        .unwrap()
}

#[test]
fn killed_worker_fails_the_run_and_resume_finishes_it() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &data);

    // Uninterrupted, with processes.
    let straight = dir.path().join("straight.rkm");
    let out = train(&cfg, &straight, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let auc_straight = eval_auc(&straight);
    assert!(auc_straight > 0.85, "{auc_straight}");

    // Kill worker 1 once the first checkpoint exists.
    let model = dir.path().join("killed.rkm");
    let ckpt = dir.path().join("killed.rkm.ckpt");
    let mut launcher = Command::new(env!("CARGO_BIN_EXE_rankd-train"))
        .args([
            "--config",
            cfg.to_str().unwrap(),
            "--output",
            model.to_str().unwrap(),
            "--processes",
            "2",
        ])
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(launcher.stderr.take().unwrap()).lines();
    let mut worker1 = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("rankd-train: started worker 1 (pid ") {
            worker1 = Some(rest.trim_end_matches(')').to_owned());
            break;
        }
    }
    let worker1 = worker1.expect("the launcher names its workers");
    let start = Instant::now();
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(Command::new("kill")
        .args(["-9", &worker1])
        .status()
        .unwrap()
        .success());
    let log: Vec<String> = lines.map_while(|l| l.ok()).collect();
    let status = launcher.wait().unwrap();
    assert!(
        !status.success(),
        "the launcher must fail when a worker dies"
    );
    let log = log.join("\n");
    assert!(log.contains("failed"), "{log}");
    assert!(!model.exists(), "no model is written by a failed run");

    // Resume from the checkpoint and finish.
    let out = train(&cfg, &model, &["--resume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed from"), "{err}");
    let auc_resumed = eval_auc(&model);
    assert!(
        (auc_resumed - auc_straight).abs() <= 0.002,
        "resumed {auc_resumed} vs uninterrupted {auc_straight}"
    );
}

#[test]
fn asynchronous_worker_processes_learn() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &data);
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("[train]\n", "[train]\nmode = \"async\"\n"),
    )
    .unwrap();
    let model = dir.path().join("async.rkm");
    let out = train(&cfg, &model, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let auc = eval_auc(&model);
    assert!(auc > 0.85, "async training with two processes: auc {auc}");
}
