//! Golden frames shared by every client's tests (`clients/testdata/golden/`): request frames as
//! this (the reference) client encodes them for the cases of `cases.json`, and response frames
//! every client must decode to the values given there. A protocol change breaks all the clients'
//! tests together. `RANKD_REGEN_GOLDEN=1 cargo test -p rankd-client --test golden` rewrites the
//! files; otherwise they must equal what this client produces, byte for byte.

use std::path::PathBuf;

use flatbuffers::FlatBufferBuilder;
use rankd_client::gen::rankd::rpc as fb;
use rankd_client::protocol::{write_frame, ErrorCode, MessageType};
use rankd_client::{ClientError, FeatureValue, Response, ScoreRequest};
use serde_json::{json, Value};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../clients/testdata/golden")
}

fn value_json(v: &FeatureValue) -> Value {
    match v {
        FeatureValue::F64(x) => json!({"kind": "F64", "value": x}),
        FeatureValue::I64(x) => json!({"kind": "I64", "value": x}),
        FeatureValue::Str(s) => json!({"kind": "Str", "value": s}),
        FeatureValue::I64List(l) => json!({"kind": "I64List", "value": l}),
        FeatureValue::StrList(l) => json!({"kind": "StrList", "value": l}),
    }
}

fn cases() -> Vec<(&'static str, u64, ScoreRequest)> {
    use FeatureValue::*;
    let s = |x: &str| Str(x.into());
    vec![
        (
            "simple",
            7,
            ScoreRequest {
                model: "adult".into(),
                user: vec![("native-country".into(), s("United-States"))],
                items: vec![
                    vec![
                        ("age".into(), F64(39.0)),
                        ("workclass".into(), s("State-gov")),
                    ],
                    vec![("age".into(), F64(50.0))],
                ],
                ..ScoreRequest::default()
            },
        ),
        (
            "every_kind",
            1 << 40,
            ScoreRequest {
                model: "feed".into(),
                version: 3,
                routing_key: "user-17".into(),
                deadline_us: 20_000,
                user: vec![
                    ("u_age".into(), F64(31.5)),
                    ("u_id".into(), I64(-42)),
                    ("u_hist".into(), I64List(vec![1, 2, 3])),
                    ("u_tags".into(), StrList(vec!["a".into(), "bé".into()])),
                ],
                items: vec![
                    vec![
                        ("item_id".into(), I64(10)),
                        ("cat".into(), s("news")),
                        ("tags".into(), StrList(vec!["x".into()])),
                        ("hist".into(), I64List(vec![7, 8])),
                        ("price".into(), F64(2.5)),
                    ],
                    vec![
                        ("item_id".into(), I64(11)),
                        ("tags".into(), StrList(vec![])),
                        ("price".into(), F64(-1.0)),
                    ],
                    vec![
                        ("item_id".into(), I64(i64::MAX)),
                        ("cat".into(), s("")),
                        ("tags".into(), StrList(vec!["y".into(), "z".into()])),
                        ("hist".into(), I64List(vec![])),
                    ],
                ],
                ..ScoreRequest::default()
            },
        ),
        (
            "label_no_items",
            9,
            ScoreRequest {
                model: "m".into(),
                label: "canary".into(),
                ..ScoreRequest::default()
            },
        ),
    ]
}

fn score_response(model: &str, version: u64, scores: &[f32]) -> Vec<u8> {
    heads_response(model, version, scores, &[])
}

/// A multi-task model's response: `heads[0]` names the default head (whose scores are
/// `scores`), the others follow with theirs.
fn heads_response(model: &str, version: u64, scores: &[f32], heads: &[(&str, &[f32])]) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let m = fbb.create_string(model);
    let s = fbb.create_vector(scores);
    let (head, list) = match heads.split_first() {
        None => (None, None),
        Some(((first, _), rest)) => {
            let list: Vec<_> = rest
                .iter()
                .map(|(n, v)| {
                    let name = fbb.create_string(n);
                    let scores = fbb.create_vector(v);
                    fb::HeadScores::create(
                        &mut fbb,
                        &fb::HeadScoresArgs {
                            name: Some(name),
                            scores: Some(scores),
                        },
                    )
                })
                .collect();
            (
                Some(fbb.create_string(first)),
                Some(fbb.create_vector(&list)),
            )
        }
    };
    let r = fb::ScoreResponse::create(
        &mut fbb,
        &fb::ScoreResponseArgs {
            model: Some(m),
            version,
            scores: Some(s),
            head,
            heads: list,
        },
    );
    fbb.finish(r, None);
    fbb.finished_data().to_vec()
}

fn error_response(code: u16, message: &str) -> Vec<u8> {
    let mut fbb = FlatBufferBuilder::new();
    let m = fbb.create_string(message);
    let r = fb::ErrorResponse::create(
        &mut fbb,
        &fb::ErrorResponseArgs {
            code,
            message: Some(m),
        },
    );
    fbb.finish(r, None);
    fbb.finished_data().to_vec()
}

fn frame(msg: MessageType, id: u64, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    write_frame(&mut out, msg, id, body);
    out
}

#[test]
fn golden_frames() {
    let regen = std::env::var_os("RANKD_REGEN_GOLDEN").is_some();
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut requests = Vec::new();
    for (name, id, req) in cases() {
        files.push((
            format!("{name}.request.bin"),
            frame(MessageType::ScoreRequest, id, &req.encode().unwrap()),
        ));
        requests.push(json!({
            "name": name,
            "file": format!("{name}.request.bin"),
            "id": id,
            "model": req.model,
            "version": req.version,
            "label": req.label,
            "routing_key": req.routing_key,
            "deadline_us": req.deadline_us,
            "user": req.user.iter().map(|(n, v)| json!({"name": n, "value": value_json(v)})).collect::<Vec<_>>(),
            "items": req.items.iter().map(|row| {
                row.iter().map(|(n, v)| json!({"name": n, "value": value_json(v)})).collect::<Vec<_>>()
            }).collect::<Vec<_>>(),
        }));
    }
    let scores = [0.25f32, 0.75, 1.0e-7, 0.999_999];
    let responses = vec![
        (
            "score",
            frame(
                MessageType::ScoreResponse,
                7,
                &score_response("adult", 1, &scores),
            ),
            json!({"type": 2, "id": 7, "model": "adult", "version": 1, "scores": scores}),
        ),
        (
            "score_empty",
            frame(MessageType::ScoreResponse, 9, &score_response("m", 12, &[])),
            json!({"type": 2, "id": 9, "model": "m", "version": 12, "scores": []}),
        ),
        (
            "score_heads",
            frame(
                MessageType::ScoreResponse,
                11,
                &heads_response(
                    "feed",
                    3,
                    &[0.5, 0.125],
                    &[
                        ("click", &[0.5, 0.125]),
                        ("like", &[0.25, 0.0625]),
                        ("share", &[0.75, 1.0]),
                    ],
                ),
            ),
            json!({"type": 2, "id": 11, "model": "feed", "version": 3, "scores": [0.5, 0.125],
                   "heads": [["click", [0.5, 0.125]], ["like", [0.25, 0.0625]],
                             ["share", [0.75, 1.0]]]}),
        ),
        (
            "error_unknown_model",
            frame(
                MessageType::Error,
                1 << 40,
                &error_response(2, "unknown model `feed`"),
            ),
            json!({"type": 7, "id": 1u64 << 40, "code": 2, "code_name": "UnknownModel",
                   "message": "unknown model `feed`"}),
        ),
        (
            "error_unknown_code",
            frame(
                MessageType::Error,
                3,
                &error_response(77, "a code from a newer server"),
            ),
            json!({"type": 7, "id": 3, "code": 77, "message": "a code from a newer server"}),
        ),
        (
            "pong",
            frame(MessageType::Pong, 5, &[]),
            json!({"type": 4, "id": 5}),
        ),
    ];
    let mut response_docs = Vec::new();
    for (name, bytes, mut doc) in responses {
        // This client decodes them as documented.
        let mut r = &bytes[..];
        let resp: Response = rankd_client::read_response(&mut r).unwrap();
        assert_eq!(resp.request_id, doc["id"].as_u64().unwrap());
        match resp.msg_type {
            2 => {
                let s = resp.into_score().unwrap();
                assert_eq!(s.version, doc["version"].as_u64().unwrap());
                let want: Vec<f32> = doc["scores"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                assert_eq!(s.scores, want);
                let heads: Vec<(String, Vec<f32>)> = doc
                    .get("heads")
                    .and_then(Value::as_array)
                    .map(|hs| {
                        hs.iter()
                            .map(|h| {
                                let v = h[1].as_array().unwrap();
                                let v = v.iter().map(|x| x.as_f64().unwrap() as f32).collect();
                                (h[0].as_str().unwrap().to_owned(), v)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                assert_eq!(s.heads, heads);
            }
            7 => match resp.into_score() {
                Err(ClientError::Server {
                    raw_code,
                    code,
                    message,
                }) => {
                    assert_eq!(raw_code, doc["code"].as_u64().unwrap() as u16);
                    assert_eq!(code.is_some(), doc.get("code_name").is_some());
                    if let Some(c) = code {
                        assert_eq!(c, ErrorCode::from_u16(2).unwrap());
                    }
                    assert_eq!(message, doc["message"].as_str().unwrap());
                }
                other => panic!("{name}: {other:?}"),
            },
            _ => assert_eq!(resp.msg_type, MessageType::Pong as u8),
        }
        doc["name"] = json!(name);
        doc["file"] = json!(format!("{name}.response.bin"));
        files.push((format!("{name}.response.bin"), bytes));
        response_docs.push(doc);
    }
    let cases_json = serde_json::to_vec_pretty(&json!({
        "requests": requests,
        "responses": response_docs,
    }))
    .unwrap();
    files.push(("cases.json".into(), cases_json));

    let dir = dir();
    if regen {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &files {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
        return;
    }
    for (name, bytes) in &files {
        let committed = std::fs::read(dir.join(name)).unwrap_or_else(|e| {
            panic!("{name}: {e}; run RANKD_REGEN_GOLDEN=1 cargo test -p rankd-client --test golden")
        });
        assert!(
            &committed == bytes,
            "{name} differs from what the Rust client produces: the protocol changed; rerun with \
             RANKD_REGEN_GOLDEN=1 and update every client"
        );
    }
}
