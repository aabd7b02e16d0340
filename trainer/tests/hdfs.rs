//! Training from and to a real HDFS (scripts/hdfs.sh): data files put there by Hadoop's FsShell
//! and matched by a glob, the model and its checkpoint written there, `--resume` from it; the
//! result equals the same run on local files.

use std::path::{Path, PathBuf};
use std::process::Command;

use rankd_storage::testing::cluster;

fn adult() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/adult");
    p.join("train.csv").exists().then_some(p)
}

/// Lines `skip..skip + n` of a CSV after its header, with the header, into `dest`.
fn slice(src: &Path, skip: usize, n: usize, dest: &Path) {
    let text = std::fs::read_to_string(src).unwrap();
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    let body: Vec<&str> = lines.skip(skip).take(n).collect();
    std::fs::write(dest, format!("{header}\n{}\n", body.join("\n"))).unwrap();
}

fn config(dir: &Path, train: &str, valid: &str, epochs: usize) -> PathBuf {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/adult/train.toml");
    let text = std::fs::read_to_string(example).unwrap();
    let (model, _) = text.split_once("\n[train]").unwrap();
    let fits: String = text
        .split("\n[[train.fit]]")
        .skip(1)
        .map(|f| format!("[[train.fit]]{f}\n"))
        .collect();
    let path = dir.join(format!("train-{epochs}-{}.toml", train.len()));
    std::fs::write(
        &path,
        format!(
            "{model}\n[train]\ntrain_files = [{train:?}]\nvalid_files = [{valid:?}]\nepochs = {epochs}\n\
             batch_size = 64\nseed = 3\nname = \"adult\"\n\n{fits}"
        ),
    )
    .unwrap();
    path
}

fn train(config: &Path, output: &str, resume: bool) -> (bool, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_rankd-train"));
    cmd.args(["--config", config.to_str().unwrap(), "--output", output]);
    if resume {
        cmd.arg("--resume");
    }
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn metrics(path: &Path) -> Vec<(String, f64)> {
    rankd_formats::ModelFile::open(path)
        .unwrap()
        .spec()
        .metadata
        .metrics
        .clone()
}

#[test]
fn train_from_hdfs_to_hdfs_equals_local() {
    let Some(data) = adult() else {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let Some(c) = cluster() else { return };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (i, skip) in [0usize, 700, 1400].iter().enumerate() {
        slice(
            &data.join("train.csv"),
            *skip,
            700,
            &d.join(format!("part-{i}.csv")),
        );
    }
    slice(&data.join("test.csv"), 0, 500, &d.join("valid.csv"));
    // The same rows as one local file, for the local run.
    let mut all = std::fs::read_to_string(d.join("part-0.csv")).unwrap();
    for i in 1..3 {
        let t = std::fs::read_to_string(d.join(format!("part-{i}.csv"))).unwrap();
        all.push_str(t.split_once('\n').unwrap().1);
    }
    std::fs::write(d.join("local-parts").with_extension("csv"), &all).unwrap();

    let base = c.unique_dir("train");
    let (ok, _, err) = c.fs(&["-mkdir", "-p", &format!("{base}/data")]);
    assert!(ok, "{err}");
    for name in ["part-0.csv", "part-1.csv", "part-2.csv", "valid.csv"] {
        let (ok, _, err) = c.fs(&[
            "-put",
            d.join(name).to_str().unwrap(),
            &format!("{base}/data/{name}"),
        ]);
        assert!(ok, "{err}");
    }
    let remote_cfg = config(
        d,
        &format!("{base}/data/part-*.csv"),
        &format!("{base}/data/valid.csv"),
        2,
    );
    let output = format!("{base}/out/model.rkm");
    let (ok, log) = train(&remote_cfg, &output, false);
    assert!(ok, "{log}");
    // The model and its checkpoint are on HDFS; nothing half-written beside them.
    let (ok, listing, err) = c.fs(&["-ls", &format!("{base}/out")]);
    assert!(ok, "{err}");
    assert!(
        listing.contains("model.rkm") && listing.contains("model.rkm.ckpt"),
        "{listing}"
    );
    assert!(!listing.contains("uploading"), "{listing}");
    let fetched = d.join("fetched.rkm");
    let (ok, _, err) = c.fs(&["-get", &output, fetched.to_str().unwrap()]);
    assert!(ok, "{err}");

    let local_cfg = config(
        d,
        d.join("local-parts.csv").to_str().unwrap(),
        d.join("valid.csv").to_str().unwrap(),
        2,
    );
    let local_out = d.join("local.rkm");
    let (ok, log) = train(&local_cfg, local_out.to_str().unwrap(), false);
    assert!(ok, "{log}");
    assert_eq!(
        metrics(&fetched),
        metrics(&local_out),
        "HDFS and local runs differ"
    );

    // Resume from the HDFS checkpoint to a third epoch.
    let three = config(
        d,
        &format!("{base}/data/part-*.csv"),
        &format!("{base}/data/valid.csv"),
        3,
    );
    let (ok, log) = train(&three, &output, true);
    assert!(ok, "{log}");
    assert!(
        log.contains("resumed from") && log.contains("after epoch 2"),
        "{log}"
    );
    let again = d.join("again.rkm");
    let (ok, _, err) = c.fs(&["-get", &output, again.to_str().unwrap()]);
    assert!(ok, "{err}");
    let m: std::collections::HashMap<String, f64> = metrics(&again).into_iter().collect();
    assert_eq!(m["epochs"], 3.0);

    // A parameter server and two worker processes, each reading its own share from HDFS.
    let two = format!("{base}/out2/model.rkm");
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-train"))
        .args(["--config", remote_cfg.to_str().unwrap(), "--output", &two])
        .args(["--processes", "2"])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    let fetched2 = d.join("two.rkm");
    let (ok, _, err) = c.fs(&["-get", &two, fetched2.to_str().unwrap()]);
    assert!(ok, "{err}");
    let m2: std::collections::HashMap<String, f64> = metrics(&fetched2).into_iter().collect();
    let m1: std::collections::HashMap<String, f64> = metrics(&fetched).into_iter().collect();
    // The same rows in another order: the same model up to the order of the float sums.
    assert!(
        (m2["eval_auc"] - m1["eval_auc"]).abs() < 0.01,
        "{} vs {}",
        m2["eval_auc"],
        m1["eval_auc"]
    );
}
