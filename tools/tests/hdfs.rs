//! `rankd-tool` with `hdfs://` paths against a real HDFS (scripts/hdfs.sh): deploy, inspect,
//! validate; other schemes refused.

use std::path::Path;
use std::process::Command;

use rankd_storage::testing::cluster;

fn tool_in(dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-tool"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("rankd-tool runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn other_schemes_are_refused_and_nothing_local_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.rkm");
    let (ok, _, err) = tool_in(
        dir.path(),
        &["synth", "-o", model.to_str().unwrap(), "--kind", "wide"],
    );
    assert!(ok, "{err}");
    for root in ["s3://bucket/models", "file:///tmp/x", "hdfs:///models"] {
        let (ok, _, err) = tool_in(
            dir.path(),
            &["deploy", model.to_str().unwrap(), "--root", root],
        );
        assert!(!ok, "{root} accepted");
        assert!(
            err.contains("unsupported scheme") || err.contains("no NameNode"),
            "{root}: {err}"
        );
    }
    let entries: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(entries, ["m.rkm"], "a local directory was created");
}

#[test]
fn deploy_inspect_and_validate_on_hdfs() {
    let Some(c) = cluster() else { return };
    let root = c.unique_dir("tool-models");
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m.rkm");
    let (ok, _, err) = tool_in(
        dir.path(),
        &[
            "synth",
            "-o",
            model.to_str().unwrap(),
            "--kind",
            "deepfm",
            "--name",
            "feed",
            "--version",
            "4",
        ],
    );
    assert!(ok, "{err}");
    let m = model.to_str().unwrap();
    let (ok, out, err) = tool_in(dir.path(), &["deploy", m, "--root", &root]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("{root}/feed/4")), "{out}");
    // Versions are immutable.
    let (ok, _, err) = tool_in(dir.path(), &["deploy", m, "--root", &root]);
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");
    // A corrupt file is refused and leaves nothing behind (no version, no hidden directory).
    let mut bytes = std::fs::read(&model).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let bad = dir.path().join("bad.rkm");
    std::fs::write(&bad, &bytes).unwrap();
    let (ok, _, err) = tool_in(
        dir.path(),
        &[
            "deploy",
            bad.to_str().unwrap(),
            "--root",
            &root,
            "--version",
            "5",
        ],
    );
    assert!(!ok, "a corrupt file was deployed");
    assert!(err.contains("checksum"), "{err}");
    let (ok, listing, err) = c.fs(&["-ls", "-R", &root]);
    assert!(ok, "{err}");
    assert!(!listing.contains("/5"), "{listing}");
    assert!(!listing.contains(".deploy"), "{listing}");
    // Inspect and validate read it back from HDFS, checked.
    let url = format!("{root}/feed/4/model.rkm");
    let (ok, out, err) = tool_in(dir.path(), &["inspect", &url]);
    assert!(ok, "{err}");
    assert!(out.contains("model       feed version 4"), "{out}");
    assert!(out.contains(&url), "{out}");
    let (ok, out, err) = tool_in(dir.path(), &["validate", &url]);
    assert!(ok, "{err}");
    assert!(out.starts_with("ok "), "{out}");
    // A corrupt file put there by Hadoop's own client is reported invalid.
    let (ok, _, err) = c.fs(&["-put", bad.to_str().unwrap(), &format!("{root}/bad.rkm")]);
    assert!(ok, "{err}");
    let (ok, out, _) = tool_in(dir.path(), &["validate", &format!("{root}/bad.rkm")]);
    assert!(!ok);
    assert!(out.starts_with("invalid "), "{out}");
}
