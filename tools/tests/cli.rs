//! `rankd-tool` as a user runs it: the real binary on real files.

use std::path::{Path, PathBuf};
use std::process::Command;

fn tool(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-tool"))
        .args(args)
        .output()
        .expect("rankd-tool runs");
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn synth(dir: &Path, kind: &str) -> String {
    let path = dir.join(format!("{kind}.rkm")).display().to_string();
    let (ok, out, err) = tool(&[
        "synth",
        "-o",
        &path,
        "--kind",
        kind,
        "--name",
        "demo",
        "--version",
        "3",
    ]);
    assert!(ok, "{out}{err}");
    path
}

#[test]
fn inspect_prints_every_part() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "deepfm");
    let (ok, out, err) = tool(&["inspect", &path]);
    assert!(ok, "{err}");
    for needle in [
        "model       demo version 3",
        "verified",
        "kind        deepfm",
        "user_city                string",
        "piecewise(user_age; boundaries [18, 25, 35, 50, 65])",
        "combinehash(item_id; buckets 1000)",
        "descartes(age_bucket, city)",
        "normalize(item_price; mean 3, std 1.5, log1p)",
        "item                     1001 x 8 Sum f32",
        "layer 0                  50 -> 32 Relu",
        "fm          yes",
    ] {
        assert!(out.contains(needle), "missing `{needle}` in:\n{out}");
    }
}

#[test]
fn inspect_json_is_one_machine_readable_object() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "wide");
    let (ok, out, err) = tool(&["inspect", "--json", &path]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], "wide");
    assert_eq!(v["checksum_verified"], true);
    assert_eq!(v["spec"]["metadata"]["name"], "demo");
    assert_eq!(v["spec"]["metadata"]["version"], 3);
    assert_eq!(v["slots"][3]["num_ids"], 1001);
    assert_eq!(v["spec"]["features"]["slots"][0]["transform"], "piecewise");
    assert!(v["spec"]["architecture"]["deep"]
        .as_array()
        .unwrap()
        .is_empty());
}

/// Every fact the text form prints is in the JSON form too, under a top-level key.
#[test]
fn inspect_json_carries_everything_the_text_shows() {
    let dir = tempfile::tempdir().unwrap();
    let path = synth(dir.path(), "deepfm");
    let (ok, text, err) = tool(&["inspect", &path]);
    assert!(ok, "{err}");
    let (ok, out, err) = tool(&["inspect", "--json", &path]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["name"], "demo");
    assert_eq!(v["version"], 3);
    let producer = v["producer"].as_str().unwrap();
    assert!(text.contains(&format!("producer    {producer}")), "{text}");
    assert!(text.contains(&format!("created     {}", v["created"].as_str().unwrap())));
    let props = v["properties"].as_object().unwrap();
    assert!(!props.is_empty(), "{out}");
    for (k, val) in props {
        assert!(
            text.lines()
                .any(|l| l.trim_start().starts_with(k.as_str())
                    && l.ends_with(val.as_str().unwrap())),
            "property {k} not in the text form:\n{text}"
        );
    }
    assert!(v["metrics"].is_object());
    assert_eq!(v["hash_seed"], 0);
    assert_eq!(v["features"][1]["name"], "user_city");
    assert_eq!(v["features"][1]["type"], "string");
    let slots = v["slots"].as_array().unwrap();
    for s in slots {
        let t = s["transform"].as_str().unwrap();
        assert!(text.contains(t), "`{t}` not in the text form");
    }
    assert!(slots
        .iter()
        .any(|s| s["transform"] == "descartes(age_bucket, city)"));
    assert_eq!(v["embeddings"][0]["dim"], 8);
    assert!(v["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["slot"] == "item" && e["rows"] == 1001 && e["pooling"] == "sum"));
    assert_eq!(v["deep"][0]["in_dim"], 50);
    assert_eq!(v["deep"][0]["out_dim"], 32);
    assert_eq!(v["deep"][0]["activation"], "relu");
    assert_eq!(v["deep_input_dim"], 50);
    assert_eq!(v["fm"], true);
    assert!(v["wide"]["slots"].is_array());
}

#[test]
fn validate_exits_non_zero_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let good = synth(dir.path(), "deep");
    let (ok, out, _) = tool(&["validate", &good]);
    assert!(ok, "{out}");
    assert!(out.starts_with("ok "), "{out}");

    let mut bytes = std::fs::read(&good).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    let bad = dir.path().join("flipped.rkm");
    std::fs::write(&bad, &bytes).unwrap();
    let truncated = dir.path().join("truncated.rkm");
    std::fs::write(&truncated, &bytes[..n - 10]).unwrap();
    let (ok, out, err) = tool(&[
        "validate",
        &good,
        bad.to_str().unwrap(),
        truncated.to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(out.contains("checksum mismatch in the body"), "{out}");
    assert!(out.contains("truncated model file"), "{out}");
    assert!(err.contains("2 of 3 model files are invalid"), "{err}");

    let (ok, _, err) = tool(&["validate", "/nonexistent/model.rkm"]);
    assert!(!ok);
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn deploy_renames_a_validated_copy_into_place() {
    let dir = tempfile::tempdir().unwrap();
    let file = synth(dir.path(), "wide");
    let root = dir.path().join("root");
    let (ok, out, err) = tool(&["deploy", &file, "--root", root.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("renamed_at_ms="), "{out}");
    // Name and version come from the metadata (synth used demo / 3).
    let placed = root.join("demo/3/model.rkm");
    assert_eq!(
        std::fs::read(&placed).unwrap(),
        std::fs::read(&file).unwrap()
    );
    // No hidden leftovers, in the root or the model's directory.
    let leftovers = || -> Vec<_> {
        [root.clone(), root.join("demo")]
            .iter()
            .flat_map(|d| std::fs::read_dir(d).unwrap().flatten())
            .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| e.path())
            .collect()
    };
    assert_eq!(leftovers(), Vec::<PathBuf>::new());
    // Deploying the same version again is refused.
    let (ok, _, err) = tool(&["deploy", &file, "--root", root.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");
    // Corrupt files (truncated; one flipped bit in the body) are refused, and nothing is left.
    let good = std::fs::read(&file).unwrap();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x08;
    for (bytes, why) in [
        (good[..good.len() - 5].to_vec(), "truncated"),
        (flipped, "checksum mismatch"),
    ] {
        let bad = dir.path().join("bad.rkm");
        std::fs::write(&bad, &bytes).unwrap();
        let (ok, _, err) = tool(&[
            "deploy",
            bad.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
            "--version",
            "4",
        ]);
        assert!(!ok);
        assert!(err.contains("not a valid model"), "{err}");
        assert!(err.contains(why), "{err}");
        assert!(!root.join("demo/4").exists());
        assert_eq!(leftovers(), Vec::<PathBuf>::new());
    }
    assert!(!root.join("demo/4").exists());
}

/// `score --csv` (the trainer's CSV reader) gives the same scores (within 1e-6) as the same rows
/// written as JSON requests, on the bundled Adult model; labels are copied through.
#[test]
fn score_csv_equals_the_json_path() {
    let data =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/data/adult/test.csv");
    if !data.exists() {
        println!("skipped: ../shared/data/adult is not beside the repository");
        return;
    }
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models/adult/1/model.rkm");
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(&data).unwrap();
    let lines: Vec<&str> = text.lines().take(301).collect();
    let csv = dir.path().join("rows.csv");
    std::fs::write(&csv, lines.join("\n")).unwrap();
    // The same rows as JSON requests of one item each: numbers for the numeric columns, strings
    // for the others, null for "?".
    let header: Vec<&str> = lines[0].split(',').collect();
    let mut json = String::new();
    for line in &lines[1..] {
        let mut item = serde_json::Map::new();
        for (name, cell) in header.iter().zip(line.split(',')) {
            let v = match cell.parse::<f64>() {
                _ if cell == "?" => serde_json::Value::Null,
                Ok(x) => serde_json::json!(x),
                Err(_) => serde_json::json!(cell),
            };
            item.insert((*name).to_owned(), v);
        }
        json.push_str(&serde_json::json!({ "items": [item] }).to_string());
        json.push('\n');
    }
    let requests = dir.path().join("rows.jsonl");
    std::fs::write(&requests, json).unwrap();
    let model = model.to_str().unwrap();
    let (ok, out, err) = tool(&["score", model, "--csv", csv.to_str().unwrap()]);
    assert!(ok, "{err}");
    let (ok, json_out, err) = tool(&["score", model, "--requests", requests.to_str().unwrap()]);
    assert!(ok, "{err}");
    let csv_rows: Vec<&str> = out.lines().collect();
    assert_eq!(csv_rows[0], "row,score,label");
    assert_eq!(csv_rows.len(), 301);
    for (i, (row, j)) in csv_rows[1..].iter().zip(json_out.lines()).enumerate() {
        let cells: Vec<&str> = row.split(',').collect();
        assert_eq!(cells[0], (i + 1).to_string());
        let score: f32 = cells[1].parse().unwrap();
        let v: serde_json::Value = serde_json::from_str(j).unwrap();
        let want = v["scores"][0].as_f64().unwrap() as f32;
        // One batch of 256 rows against one-item requests: the same math, summed in another
        // order by the batched kernel.
        assert!(
            (score - want).abs() <= 1e-6,
            "row {}: {score} vs {want}",
            i + 1
        );
        let label = lines[i + 1].rsplit(',').next().unwrap();
        assert_eq!(cells[2], label);
    }
}

/// A multi-task model: the text form shows the experts, gates and towers; the JSON form its heads
/// (default first), experts and deep input at the top level.
#[test]
fn inspect_shows_a_multitask_model() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/models/adult-multitask/1/model.rkm")
        .display()
        .to_string();
    let (ok, text, err) = tool(&["inspect", &path]);
    assert!(ok, "{err}");
    for want in [
        "kind        mmoe",
        "multitask   4 experts, 2 heads (default `income`)",
        "expert 3 layer 1",
        "long_hours gate",
        "income tower 1           32 -> 1 None",
    ] {
        assert!(text.contains(want), "`{want}` in:\n{text}");
    }
    let (ok, out, err) = tool(&["inspect", "--json", &path]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["heads"], serde_json::json!(["income", "long_hours"]));
    assert_eq!(v["experts"], 4);
    assert_eq!(v["deep_input_dim"], 133);
}
