//! `rankd-tool import` and `rankd-tool score` against scores computed outside Rust by numpy
//! (`scripts/numpy_reference.py`), and their error paths.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;
type Mutation = Box<dyn Fn(&mut Tensors)>;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/numpy")
        .join(name)
}

fn tool(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-tool"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn import(weights: &Path, out: &Path) -> (bool, String, String) {
    import_with(&data("model.toml"), weights, out)
}

fn import_with(config: &Path, weights: &Path, out: &Path) -> (bool, String, String) {
    tool(&[
        "import",
        "--config",
        config.to_str().unwrap(),
        "--weights",
        weights.to_str().unwrap(),
        "--name",
        "np",
        "--version",
        "4",
        "-o",
        out.to_str().unwrap(),
    ])
}

#[test]
fn imported_model_scores_like_numpy() {
    imports_and_scores_like_numpy("", "deepfm");
}

#[test]
fn imported_dcn_model_scores_like_numpy() {
    imports_and_scores_like_numpy("dcn/", "dcn_v2");
}

#[test]
fn imported_multitask_model_scores_every_head_like_numpy() {
    imports_and_scores_like_numpy("mmoe/", "mmoe");
}

/// Imports the numpy case under `numpy/<case>` (its config and safetensors), checks its kind,
/// scores its requests and compares every score (every head's, for a multi-task case) with
/// numpy's within 1e-5.
fn imports_and_scores_like_numpy(case: &str, kind: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("np.rkm");
    let (ok, out, err) = import_with(
        &data(&format!("{case}model.toml")),
        &data(&format!("{case}weights.safetensors")),
        &model,
    );
    assert!(ok, "{out}{err}");
    let (ok, out, err) = tool(&["inspect", "--json", model.to_str().unwrap()]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["kind"], kind);
    assert_eq!(v["spec"]["metadata"]["version"], 4);

    let (ok, out, err) = tool(&[
        "score",
        model.to_str().unwrap(),
        "--requests",
        data(&format!("{case}requests.jsonl")).to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data(&format!("{case}expected.json"))).unwrap(),
    )
    .unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // (what the engine wrote, what numpy computed): the scores, then each head's.
    let mut pairs = vec![(
        lines
            .iter()
            .map(|l| l["scores"].clone())
            .collect::<Vec<_>>(),
        expected["scores"].as_array().unwrap().clone(),
    )];
    if let Some(heads) = expected.get("heads").and_then(|h| h.as_object()) {
        for (name, want) in heads {
            let got = lines.iter().map(|l| l["heads"][name].clone()).collect();
            pairs.push((got, want.as_array().unwrap().clone()));
        }
    }
    let mut compared = 0;
    for (got, expected) in pairs {
        assert_eq!(got.len(), expected.len());
        for (i, (got, want)) in got.iter().zip(&expected).enumerate() {
            let (got, want) = (got.as_array().unwrap(), want.as_array().unwrap());
            assert_eq!(got.len(), want.len(), "request {i}");
            for (g, w) in got.iter().zip(want) {
                let (g, w) = (g.as_f64().unwrap(), w.as_f64().unwrap());
                assert!(
                    (g - w).abs() <= 1e-5,
                    "{case} request {i}: rankd {g} vs numpy {w}"
                );
                compared += 1;
            }
        }
    }
    assert!(compared > 300, "only {compared} scores compared");
}

/// Writes a safetensors file by hand (header length, JSON header, data).
fn write_safetensors(path: &Path, tensors: &Tensors) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (shape, values)) in tensors {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut file = (h.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(&h);
    file.extend_from_slice(&data);
    std::fs::write(path, file).unwrap();
}

/// The numpy case's tensors, read back from its safetensors file.
fn numpy_tensors() -> Tensors {
    let bytes = std::fs::read(data("weights.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let body = &bytes[8 + n..];
    let mut out = BTreeMap::new();
    for (name, t) in header.as_object().unwrap() {
        if name == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let off: Vec<usize> = t["data_offsets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let values = body[off[0]..off[1]]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        out.insert(name.clone(), (shape, values));
    }
    out
}

#[test]
fn import_names_the_tensor_that_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let good = numpy_tensors();
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "tensor `deep.1.bias` is missing; expected shape [8]",
            Box::new(|t| {
                t.remove("deep.1.bias");
            }),
        ),
        (
            "tensor `deep.9.weight` is not used by the config",
            Box::new(|t| {
                t.insert("deep.9.weight".into(), (vec![1], vec![0.0]));
            }),
        ),
        (
            "tensor `embedding.city` has shape [10, 3]; expected [10, 4]",
            Box::new(|t| {
                t.insert("embedding.city".into(), (vec![10, 3], vec![0.0; 30]));
            }),
        ),
        (
            "tensor `deep.0.weight` has shape [38, 16]; expected [16, 38]",
            Box::new(|t| {
                let (_, v) = t["deep.0.weight"].clone();
                t.insert("deep.0.weight".into(), (vec![38, 16], v));
            }),
        ),
    ];
    for (needle, mutate) in cases {
        let mut t = good.clone();
        mutate(&mut t);
        let weights = dir.path().join("w.safetensors");
        write_safetensors(&weights, &t);
        let out = dir.path().join("m.rkm");
        let (ok, stdout, err) = import(&weights, &out);
        assert!(!ok, "{stdout}");
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
        // The message names the weights file it is about.
        assert!(err.contains("w.safetensors against"), "{err}");
        assert!(!out.exists());
    }
    // The unchanged tensors import fine (the harness itself is sound).
    let weights = dir.path().join("w.safetensors");
    write_safetensors(&weights, &good);
    let (ok, _, err) = import(&weights, &dir.path().join("m.rkm"));
    assert!(ok, "{err}");
}

#[test]
fn score_reports_bad_lines_and_scores_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("np.rkm");
    assert!(import(&data("weights.safetensors"), &model).0);
    let lines = [
        r#"{"user": {"user_age": 30, "user_city": "Paris"}, "items": [{"item_id": 5, "item_cat": "news"}]}"#,
        r#"{"user": {"user_age": "thirty"}, "items": [{"item_id": 5}]}"#,
        r#"{"user": {}, "items": [{"item_id": 5}, {"item_id": 6, "item_tags": [1, 2]}]}"#,
        r#"not json"#,
        r#"{"user": {"unknown_feature": true}, "items": [{"item_id": 7, "item_tags": []}, {}]}"#,
        r#"{"user": {}, "items": [{"item_tags": ["a", 1]}]}"#,
    ];
    let requests = dir.path().join("r.jsonl");
    std::fs::write(&requests, lines.join("\n")).unwrap();
    let (ok, out, err) = tool(&[
        "score",
        model.to_str().unwrap(),
        "--requests",
        requests.to_str().unwrap(),
    ]);
    assert!(!ok);
    let outs: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(outs.len(), 6);
    assert_eq!(outs[0]["scores"].as_array().unwrap().len(), 1);
    assert!(outs[1]["error"].as_str().unwrap().contains(
        "line 2: request features: feature `user_age` is declared float but the value is string"
    ));
    assert!(outs[2]["error"].as_str().unwrap().contains(
        "line 3: item 1: feature `item_tags` is declared string_list but the value is int_list"
    ));
    assert!(outs[3]["error"]
        .as_str()
        .unwrap()
        .contains("line 4: invalid JSON"));
    assert_eq!(outs[4]["scores"].as_array().unwrap().len(), 2);
    assert!(outs[5]["error"].as_str().unwrap().contains(
        "line 6: item 0: feature `item_tags`: a list must hold only integers or only strings"
    ));
    assert!(err.contains("4 of 6 requests failed"), "{err}");
}
