//! The Open Inference Protocol front ends on the real daemon: the Adult requests scored over
//! gRPC (raw and typed tensors), REST (JSON) and, where Triton's Python clients are installed
//! (`scripts/tritonclient-venv.sh`; always in CI), through `tritonclient` itself, each equal to the
//! binary RPC's scores; errors mapped to the protocol's status codes; labels and versions; a
//! hot reload under load on these endpoints with no failed request.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankd_serving::client::{Connection, FeatureValue, ScoreRequest};
use rankd_serving::kserve::pb;
use rankd_serving::kserve::pb::grpc_inference_service_client::GrpcInferenceServiceClient;
use serde_json::{json, Value};
use tonic::Code;

mod common;
use common::{http, start_daemon, Daemon};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

type Case = (
    serde_json::Map<String, Value>,
    Vec<serde_json::Map<String, Value>>,
);

/// The Adult requests: the two of `examples/adult/requests.jsonl`, then, where the Adult data is
/// beside the repository (`../shared/data/adult/test.csv`), `n` requests of 50 test rows each,
/// every third with `native-country` and `race` sent once per request.
fn adult_cases(n: usize) -> Vec<Case> {
    let text = std::fs::read_to_string(repo().join("examples/adult/requests.jsonl")).unwrap();
    let mut cases: Vec<Case> = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            let user = v["user"].as_object().cloned().unwrap_or_default();
            let items = v["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_object().unwrap().clone())
                .collect();
            (user, items)
        })
        .collect();
    let Ok(csv) = std::fs::read_to_string(repo().join("../shared/data/adult/test.csv")) else {
        eprintln!(
            "only the two example requests: ../shared/data/adult is not beside the repository"
        );
        return cases;
    };
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let rows: Vec<Vec<&str>> = lines.take(n * 50).map(|l| l.split(',').collect()).collect();
    for (k, chunk) in rows.chunks(50).enumerate() {
        let mut user = serde_json::Map::new();
        let items = chunk
            .iter()
            .map(|row| {
                let mut m = serde_json::Map::new();
                for (name, cell) in header.iter().zip(row) {
                    if *name == "label" {
                        continue;
                    }
                    let v = match cell.parse::<f64>() {
                        Ok(x) => json!(x),
                        Err(_) => json!(cell),
                    };
                    if k % 3 == 0 && (*name == "native-country" || *name == "race") {
                        user.insert(name.to_string(), v);
                    } else {
                        m.insert(name.to_string(), v);
                    }
                }
                m
            })
            .collect();
        cases.push((user, items));
    }
    cases
}

fn feature(v: &Value) -> FeatureValue {
    match v {
        Value::Number(n) => FeatureValue::F64(n.as_f64().unwrap()),
        Value::String(s) => FeatureValue::Str(s.clone()),
        other => panic!("unexpected value {other}"),
    }
}

/// The binary RPC request of `case` for `model`.
fn score_request(model: &str, case: &Case) -> ScoreRequest {
    ScoreRequest {
        model: model.into(),
        user: case
            .0
            .iter()
            .map(|(k, v)| (k.clone(), feature(v)))
            .collect(),
        items: case
            .1
            .iter()
            .map(|i| i.iter().map(|(k, v)| (k.clone(), feature(v))).collect())
            .collect(),
        ..ScoreRequest::default()
    }
}

fn binary_scores(c: &mut Connection, case: &Case) -> Vec<f32> {
    c.score(&score_request("adult", case)).unwrap().scores
}

/// `case` without `hours-per-week` (a label of the multi-task model, not one of its inputs).
fn without_hours(case: &Case) -> Case {
    let strip = |m: &serde_json::Map<String, Value>| {
        let mut m = m.clone();
        m.remove("hours-per-week");
        m
    };
    (strip(&case.0), case.1.iter().map(strip).collect())
}

/// One input from JSON values of one feature (numbers as FP64 with NaN for missing, strings as
/// BYTES with "" for missing), raw little-endian bytes.
fn raw_input(
    name: &str,
    values: &[Option<&Value>],
) -> (pb::model_infer_request::InferInputTensor, Vec<u8>) {
    let strings = values.iter().flatten().any(|v| v.is_string());
    let mut raw = Vec::new();
    for v in values {
        if strings {
            let s = v.and_then(Value::as_str).unwrap_or("");
            raw.extend_from_slice(&(s.len() as u32).to_le_bytes());
            raw.extend_from_slice(s.as_bytes());
        } else {
            let x = v.and_then(Value::as_f64).unwrap_or(f64::NAN);
            raw.extend_from_slice(&x.to_le_bytes());
        }
    }
    (
        pb::model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: if strings { "BYTES" } else { "FP64" }.into(),
            shape: vec![values.len() as i64],
            ..Default::default()
        },
        raw,
    )
}

fn infer_request(case: &Case, model: &str) -> pb::ModelInferRequest {
    let mut names: Vec<&String> = case.1.iter().flat_map(|i| i.keys()).collect();
    names.sort();
    names.dedup();
    let mut req = pb::ModelInferRequest {
        model_name: model.into(),
        ..Default::default()
    };
    for n in names {
        let vals: Vec<Option<&Value>> = case.1.iter().map(|i| i.get(n)).collect();
        let (t, raw) = raw_input(n, &vals);
        req.inputs.push(t);
        req.raw_input_contents.push(raw);
    }
    for (n, v) in &case.0 {
        let (t, raw) = raw_input(n, &[Some(v)]);
        req.inputs.push(t);
        req.raw_input_contents.push(raw);
    }
    req
}

/// The same request with typed `contents` instead of raw bytes.
fn typed(mut req: pb::ModelInferRequest) -> pb::ModelInferRequest {
    for (t, raw) in req
        .inputs
        .iter_mut()
        .zip(std::mem::take(&mut req.raw_input_contents))
    {
        let mut c = pb::InferTensorContents::default();
        if t.datatype == "FP64" {
            c.fp64_contents = raw
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
        } else {
            let mut rest = &raw[..];
            while !rest.is_empty() {
                let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
                c.bytes_contents.push(rest[4..4 + n].to_vec());
                rest = &rest[4 + n..];
            }
        }
        t.contents = Some(c);
    }
    req
}

fn scores_of(r: &pb::ModelInferResponse) -> Vec<f32> {
    assert_eq!(r.outputs.len(), 1);
    assert_eq!(r.outputs[0].name, "score");
    assert_eq!(r.outputs[0].datatype, "FP32");
    r.raw_output_contents[0]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn rest_json(case: &Case) -> Value {
    let mut names: Vec<&String> = case.1.iter().flat_map(|i| i.keys()).collect();
    names.sort();
    names.dedup();
    let mut inputs = Vec::new();
    for n in names {
        let vals: Vec<Value> = case
            .1
            .iter()
            .map(|i| i.get(n).cloned().unwrap_or(Value::Null))
            .collect();
        let strings = vals.iter().any(Value::is_string);
        inputs.push(json!({
            "name": n, "shape": [vals.len()],
            "datatype": if strings { "BYTES" } else { "FP64" }, "data": vals,
        }));
    }
    for (n, v) in &case.0 {
        inputs.push(json!({
            "name": n, "shape": [1],
            "datatype": if v.is_string() { "BYTES" } else { "FP64" }, "data": [v],
        }));
    }
    json!({ "id": "r1", "inputs": inputs })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn start_adult(extra: &[&str]) -> Daemon {
    let mut flags = vec!["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"];
    flags.extend_from_slice(extra);
    start_daemon(&repo().join("examples/models"), None, &flags)
}

#[test]
fn kserve_scores_equal_the_binary_rpc() {
    let d = start_adult(&[]);
    let (grpc, http_addr) = (d.grpc.unwrap(), d.http.unwrap());
    let cases = adult_cases(20);
    let mut c = Connection::connect(d.addr).unwrap();
    let want: Vec<Vec<f32>> = cases.iter().map(|k| binary_scores(&mut c, k)).collect();
    assert!(want
        .iter()
        .flatten()
        .any(|&s| (s - want[0][0]).abs() > 1e-3));

    let rt = runtime();
    rt.block_on(async {
        let mut g = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        for (case, w) in cases.iter().zip(&want) {
            let raw = g
                .model_infer(infer_request(case, "adult"))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(raw.model_name, "adult");
            assert_eq!(raw.model_version, "1");
            assert_eq!(&scores_of(&raw), w);
            let t = g
                .model_infer(typed(infer_request(case, "adult")))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(&scores_of(&t), w);
        }
        let meta = g
            .model_metadata(pb::ModelMetadataRequest {
                name: "adult".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(meta.versions, vec!["1"]);
        assert!(meta
            .inputs
            .iter()
            .any(|t| t.name == "age" && t.datatype == "FP64" && t.shape == vec![-1, 1]));
        assert!(meta
            .inputs
            .iter()
            .any(|t| t.name == "workclass" && t.datatype == "BYTES"));
        let server = g
            .server_metadata(pb::ServerMetadataRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(server.extensions.contains(&"statistics".to_string()));
        let config = g
            .model_config(pb::ModelConfigRequest {
                name: "adult".into(),
                version: "1".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .config
            .unwrap();
        assert_eq!(config.max_batch_size, 10_000);
        assert_eq!(config.input.len(), meta.inputs.len());
        let stats = g
            .model_statistics(pb::ModelStatisticsRequest {
                name: "adult".into(),
                version: String::new(),
            })
            .await
            .unwrap()
            .into_inner();
        let s = &stats.model_stats[0];
        // The binary RPC's requests and twice as many over gRPC.
        let n = cases.len() as u64;
        assert_eq!(
            s.inference_stats
                .as_ref()
                .unwrap()
                .success
                .as_ref()
                .unwrap()
                .count,
            3 * n
        );
        let items: usize = cases.iter().map(|c| c.1.len()).sum();
        assert_eq!(s.inference_count, 3 * items as u64);
        assert!(
            g.server_ready(pb::ServerReadyRequest {})
                .await
                .unwrap()
                .into_inner()
                .ready
        );
        assert!(
            !g.model_ready(pb::ModelReadyRequest {
                name: "adult".into(),
                version: "9".into()
            })
            .await
            .unwrap()
            .into_inner()
            .ready
        );
    });

    for (case, w) in cases.iter().zip(&want) {
        let (status, body) = http(
            http_addr,
            "POST",
            "/v2/models/adult/infer",
            rest_json(case).to_string().as_bytes(),
        );
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "r1");
        let got: Vec<f32> = v["outputs"][0]["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(&got, w);
    }
    let (status, _) = http(http_addr, "GET", "/v2/health/ready", b"");
    assert_eq!(status, 200);

    // Triton's own Python clients.
    let python = std::env::var("RANKD_TRITON_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/oip-venv/bin/python"));
    let usable = std::process::Command::new(&python)
        .args(["-c", "import tritonclient.grpc, tritonclient.http, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !usable {
        let why = format!(
            "no Python with tritonclient at {} (run scripts/tritonclient-venv.sh)",
            python.display()
        );
        assert!(
            std::env::var_os("CI").is_none(),
            "in CI the tritonclient check must run: {why}"
        );
        eprintln!("skipped the tritonclient check: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cases_path = dir.path().join("cases.json");
    // With each case, the bundled multi-task model's heads over the binary RPC (for the same
    // request without hours-per-week, a label of that model).
    let doc: Vec<Value> = cases
        .iter()
        .zip(&want)
        .map(|(case, w)| {
            let req = score_request("adult-multitask", &without_hours(case));
            let heads: serde_json::Map<String, Value> = c
                .score(&req)
                .unwrap()
                .heads
                .into_iter()
                .map(|(n, v)| (n, json!(v)))
                .collect();
            json!({"user": case.0, "items": case.1, "scores": w, "heads": heads})
        })
        .collect();
    std::fs::write(&cases_path, serde_json::to_vec(&doc).unwrap()).unwrap();
    let out = std::process::Command::new(&python)
        .arg(repo().join("serving/tests/kserve_tritonclient.py"))
        .args([
            grpc.to_string(),
            http_addr.to_string(),
            cases_path.display().to_string(),
        ])
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "tritonclient check failed:\n{log}");
    eprintln!("{log}");
}

#[test]
fn kserve_errors_map_to_status_codes() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rankd.toml");
    std::fs::write(&config, "[limits]\nmax_items = 5\n").unwrap();
    let d = {
        let flags = [
            "--grpc",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
            "--config",
            config.to_str().unwrap(),
        ];
        start_daemon(&repo().join("examples/models"), None, &flags)
    };
    let (grpc, http_addr) = (d.grpc.unwrap(), d.http.unwrap());
    let small = adult_cases(0).remove(0);
    assert_eq!(small.1.len(), 3);
    // Six items: over the limit of five.
    let case = (small.0.clone(), [small.1.clone(), small.1.clone()].concat());
    let rt = runtime();
    rt.block_on(async {
        let mut g = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let code = |r: Result<tonic::Response<pb::ModelInferResponse>, tonic::Status>| {
            let s = r.unwrap_err();
            (s.code(), s.message().to_string())
        };
        let (c, m) = code(g.model_infer(infer_request(&small, "nope")).await);
        assert_eq!(c, Code::NotFound, "{m}");
        assert!(m.contains("unknown model `nope`"), "{m}");
        let mut r = infer_request(&small, "adult");
        r.model_version = "7".into();
        assert_eq!(code(g.model_infer(r).await).0, Code::NotFound);
        let mut r = infer_request(&small, "adult");
        r.parameters.insert(
            "label".into(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                    "canary".into(),
                )),
            },
        );
        let (c, m) = code(g.model_infer(r).await);
        assert_eq!(c, Code::NotFound, "{m}");
        assert!(m.contains("label `canary`"), "{m}");
        let mut r = infer_request(&small, "adult");
        r.inputs[0].name = "height".into();
        let (c, m) = code(g.model_infer(r).await);
        assert_eq!(c, Code::InvalidArgument);
        assert!(
            m.contains("unknown input `height`") && m.contains("age"),
            "{m}"
        );
        let mut r = infer_request(&small, "adult");
        r.inputs[0].datatype = "FP16".into();
        assert_eq!(code(g.model_infer(r).await).0, Code::InvalidArgument);
        let mut r = infer_request(&small, "adult");
        r.raw_input_contents[0].pop();
        let (c, m) = code(g.model_infer(r).await);
        assert_eq!(c, Code::InvalidArgument, "{m}");
        // A string for a numeric feature.
        let mut r = infer_request(&small, "adult");
        let age = r.inputs.iter().position(|t| t.name == "age").unwrap();
        let (t, raw) = raw_input(
            "age",
            &[Some(&json!("old")), Some(&json!("x")), Some(&json!("y"))],
        );
        r.inputs[age] = t;
        r.raw_input_contents[age] = raw;
        let (c, m) = code(g.model_infer(r).await);
        assert_eq!(c, Code::InvalidArgument);
        assert!(m.contains("BYTES") && m.contains("float"), "{m}");
        let (c, m) = code(g.model_infer(infer_request(&case, "adult")).await);
        assert_eq!(c, Code::ResourceExhausted, "{m}");
        assert!(m.contains("limit is 5"), "{m}");
        // The server goes on.
        assert!(g.model_infer(infer_request(&small, "adult")).await.is_ok());
    });
    let (s, body) = http(
        http_addr,
        "POST",
        "/v2/models/nope/infer",
        rest_json(&small).to_string().as_bytes(),
    );
    assert_eq!(s, 404);
    assert!(String::from_utf8_lossy(&body).contains("\"error\""));
    let (s, _) = http(
        http_addr,
        "POST",
        "/v2/models/adult/infer",
        rest_json(&case).to_string().as_bytes(),
    );
    assert_eq!(s, 413);
    let (s, _) = http(http_addr, "POST", "/v2/models/adult/infer", b"{not json");
    assert_eq!(s, 400);
    let (s, _) = http(
        http_addr,
        "POST",
        "/v2/models/adult/versions/x/infer",
        rest_json(&small).to_string().as_bytes(),
    );
    assert_eq!(s, 404);
    let (s, _) = http(http_addr, "GET", "/v2/models/adult/versions/3/ready", b"");
    assert_eq!(s, 400);
}

fn deploy(root: &Path, version: u64) {
    use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
    let dir = root.join("feed");
    let tmp = dir.join(format!(".tmp-{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    write_synthetic(
        &tmp.join("model.rkm"),
        &SynthOptions {
            name: "feed".into(),
            version,
            kind: ModelKind::WideDeep,
            seed: version,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    std::fs::rename(&tmp, dir.join(version.to_string())).unwrap();
}

fn feed_request(n: usize) -> pb::ModelInferRequest {
    let mut r = pb::ModelInferRequest {
        model_name: "feed".into(),
        ..Default::default()
    };
    let ids: Vec<u8> = (0..n as i64).flat_map(|i| (i * 7).to_le_bytes()).collect();
    r.inputs.push(pb::model_infer_request::InferInputTensor {
        name: "item_id".into(),
        datatype: "INT64".into(),
        shape: vec![n as i64],
        ..Default::default()
    });
    r.raw_input_contents.push(ids);
    r.inputs.push(pb::model_infer_request::InferInputTensor {
        name: "user_age".into(),
        datatype: "FP64".into(),
        shape: vec![1],
        ..Default::default()
    });
    r.raw_input_contents.push(33.0f64.to_le_bytes().to_vec());
    r
}

#[test]
fn kserve_reload_under_load_fails_nothing() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join(".rankd.toml");
    std::fs::write(&config, "rescan_interval_ms = 60000\n").unwrap();
    deploy(root.path(), 1);
    let d = start_daemon(
        root.path(),
        Some(&config),
        &["--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0"],
    );
    let (grpc, http_addr) = (d.grpc.unwrap(), d.http.unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let grpc_load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                let mut g = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
                    .await
                    .unwrap();
                let mut versions = std::collections::BTreeSet::new();
                while !stop.load(Ordering::Relaxed) {
                    let r = g
                        .model_infer(feed_request(40))
                        .await
                        .expect("no gRPC request may fail during a reload");
                    assert_eq!(scores_of(r.get_ref()).len(), 40);
                    versions.insert(r.into_inner().model_version);
                }
                versions
            })
        })
    };
    let rest_load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let body = json!({"inputs": [{"name": "item_id", "shape": [3], "datatype": "INT64", "data": [1, 2, 3]}]}).to_string();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let (s, b) = http(http_addr, "POST", "/v2/models/feed/infer", body.as_bytes());
                assert_eq!(
                    s,
                    200,
                    "no REST request may fail during a reload: {}",
                    String::from_utf8_lossy(&b)
                );
                n += 1;
            }
            n
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    deploy(root.path(), 2);
    let start = Instant::now();
    let rt = runtime();
    rt.block_on(async {
        let mut g = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        while g
            .model_infer(feed_request(2))
            .await
            .unwrap()
            .into_inner()
            .model_version
            != "2"
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "version 2 never served"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // An explicit version.
        let mut r = feed_request(2);
        r.model_version = "2".into();
        assert_eq!(
            g.model_infer(r).await.unwrap().into_inner().model_version,
            "2"
        );
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let versions = grpc_load.join().unwrap();
    assert!(
        versions.contains("1") && versions.contains("2"),
        "{versions:?}"
    );
    assert!(rest_load.join().unwrap() > 0);
}

/// The values of a gRPC output tensor.
fn output_values(r: &pb::ModelInferResponse, i: usize) -> Vec<f32> {
    r.raw_output_contents[i]
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The bundled multi-task Adult model (`examples/adult/multitask.toml`: `income` and
/// `long_hours`) through the real daemon: every head over the binary RPC (the default head's
/// scores are `scores`), KServe REST and gRPC (`score`, `score.HEAD`, outputs chosen by name,
/// unknown ones refused), metadata listing the outputs; and where the Adult data is beside the
/// repository, each head's AUC on the whole official test set, computed from the daemon's
/// scores, equals the test AUC the trainer wrote into the model.
#[test]
fn multitask_heads_through_every_protocol() {
    let d = start_adult(&[]);
    let (grpc, http_addr) = (d.grpc.unwrap(), d.http.unwrap());
    let model = "adult-multitask";
    let heads = ["income", "long_hours"];
    // The example requests without hours-per-week (a label of this model, not an input).
    let cases: Vec<Case> = adult_cases(0).iter().map(without_hours).collect();
    let mut c = Connection::connect(d.addr).unwrap();
    let request = |case: &Case| score_request(model, case);
    let answers: Vec<_> = cases
        .iter()
        .map(|k| c.score(&request(k)).unwrap())
        .collect();
    for (a, case) in answers.iter().zip(&cases) {
        let names: Vec<&str> = a.heads.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, heads);
        assert_eq!(a.head("income"), Some(&a.scores[..]));
        assert_eq!(a.head("long_hours").unwrap().len(), case.1.len());
        assert_ne!(a.head("long_hours"), a.head("income"));
    }
    // The status lists the heads.
    assert_eq!(
        c.heads(model).unwrap(),
        [(1, vec!["income".to_owned(), "long_hours".to_owned()])]
    );
    assert_eq!(c.heads("adult").unwrap(), [(1, Vec::<String>::new())]);
    // The single-task model's responses carry no heads.
    assert!(c
        .score(&ScoreRequest {
            model: "adult".into(),
            ..request(&cases[0])
        })
        .unwrap()
        .heads
        .is_empty());

    // REST: by default `score` and the heads after the default one; or the outputs asked for.
    let case = &cases[0];
    let want = &answers[0];
    let path = format!("/v2/models/{model}/infer");
    let (status, body) = http(
        http_addr,
        "POST",
        &path,
        rest_json(case).to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let v: Value = serde_json::from_slice(&body).unwrap();
    let outputs = v["outputs"].as_array().unwrap();
    let names: Vec<&str> = outputs
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["score", "score.long_hours"]);
    let floats = |o: &Value| -> Vec<f32> {
        o["data"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect()
    };
    assert_eq!(floats(&outputs[0]), want.scores);
    assert_eq!(floats(&outputs[1]), want.head("long_hours").unwrap());
    let mut asked = rest_json(case);
    asked["outputs"] = json!([{"name": "score.long_hours"}, {"name": "score.income"}]);
    let (status, body) = http(http_addr, "POST", &path, asked.to_string().as_bytes());
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    let outputs = v["outputs"].as_array().unwrap();
    let names: Vec<&str> = outputs
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["score.long_hours", "score.income"]);
    assert_eq!(floats(&outputs[1]), want.scores);
    // Binary outputs: each output's bytes after the JSON header, in the order of `outputs`.
    let mut binary = rest_json(case);
    binary["parameters"] = json!({"binary_data_output": true});
    let (status, body) = http(http_addr, "POST", &path, binary.to_string().as_bytes());
    assert_eq!(status, 200);
    let mut stream = serde_json::Deserializer::from_slice(&body).into_iter::<Value>();
    let header = stream.next().unwrap().unwrap();
    let mut rest = &body[stream.byte_offset()..];
    let outputs = header["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    for (o, want) in outputs
        .iter()
        .zip([&want.scores[..], want.head("long_hours").unwrap()])
    {
        let n = o["parameters"]["binary_data_size"].as_u64().unwrap() as usize;
        assert_eq!(n, 4 * want.len());
        let got: Vec<f32> = rest[..n]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert_eq!(got, want, "{}", o["name"]);
        rest = &rest[n..];
    }
    assert!(rest.is_empty());
    asked["outputs"] = json!([{"name": "score.dwell"}]);
    let (status, body) = http(http_addr, "POST", &path, asked.to_string().as_bytes());
    let text = String::from_utf8_lossy(&body);
    assert_eq!(status, 400, "{text}");
    assert!(
        text.contains("score.dwell") && text.contains("score.income, score.long_hours"),
        "{text}"
    );
    let (_, body) = http(http_addr, "GET", &format!("/v2/models/{model}"), b"");
    let meta: Value = serde_json::from_slice(&body).unwrap();
    let names: Vec<&str> = meta["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["score", "score.income", "score.long_hours"]);
    let (_, body) = http(d.admin, "GET", "/models", b"");
    let status: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        status
            .to_string()
            .contains(r#""heads":["income","long_hours"]"#),
        "{status}"
    );

    // gRPC: one output asked for by name.
    runtime().block_on(async {
        let mut g = GrpcInferenceServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let mut req = infer_request(case, model);
        req.outputs
            .push(pb::model_infer_request::InferRequestedOutputTensor {
                name: "score.long_hours".into(),
                ..Default::default()
            });
        let r = g.model_infer(req).await.unwrap().into_inner();
        assert_eq!(r.outputs.len(), 1);
        assert_eq!(r.outputs[0].name, "score.long_hours");
        assert_eq!(output_values(&r, 0), want.head("long_hours").unwrap());
        let all = g
            .model_infer(infer_request(case, model))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.outputs.len(), 2);
        assert_eq!(output_values(&all, 0), want.scores);
    });

    // Each head's AUC on the official test set, from the daemon's scores.
    let Ok(csv) = std::fs::read_to_string(repo().join("../shared/data/adult/test.csv")) else {
        println!("per-head AUC skipped: ../shared/data/adult is not beside the repository");
        return;
    };
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    let col = |n: &str| header.iter().position(|h| *h == n).unwrap();
    let (label, hours) = (col("label"), col("hours-per-week"));
    let rows: Vec<Vec<&str>> = lines
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.split(',').collect())
        .collect();
    let mut scores = [Vec::new(), Vec::new()];
    let mut labels = [Vec::new(), Vec::new()];
    for chunk in rows.chunks(200) {
        let items: Vec<Vec<(String, FeatureValue)>> = chunk
            .iter()
            .map(|row| {
                // `?` is a missing value, as the trainer reads it.
                header
                    .iter()
                    .zip(row)
                    .filter(|(n, c)| **n != "label" && **n != "hours-per-week" && c.trim() != "?")
                    .map(|(n, cell)| {
                        let v = match cell.parse::<f64>() {
                            Ok(x) => FeatureValue::F64(x),
                            Err(_) => FeatureValue::Str(cell.to_string()),
                        };
                        (n.to_string(), v)
                    })
                    .collect()
            })
            .collect();
        let a = c
            .score(&ScoreRequest {
                model: model.into(),
                items,
                ..ScoreRequest::default()
            })
            .unwrap();
        for (h, name) in heads.iter().enumerate() {
            scores[h].extend_from_slice(a.head(name).unwrap());
        }
        for row in chunk {
            labels[0].push(row[label].trim().parse::<f32>().unwrap());
            let x: f64 = row[hours].trim().parse().unwrap();
            labels[1].push(f32::from(u8::from(x > 40.0)));
        }
    }
    let file =
        rankd_formats::ModelFile::open(repo().join("examples/models/adult-multitask/1/model.rkm"))
            .unwrap();
    let metrics = &file.spec().metadata.metrics;
    for (h, name) in heads.iter().enumerate() {
        let served = rankd_trainer::metrics::evaluate(&scores[h], &labels[h]).auc;
        let key = format!("test_auc.{name}");
        let trained = metrics.iter().find(|(k, _)| *k == key).unwrap().1;
        println!("head {name}: AUC served {served:.6}, trained {trained:.6}");
        assert!(
            (served - trained).abs() < 1e-5,
            "head {name}: served AUC {served} vs the trainer's {trained}"
        );
    }
}
