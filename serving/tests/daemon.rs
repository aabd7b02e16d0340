//! The real `rankd` binary on ephemeral ports: scoring, pipelining, versions, labels and the
//! traffic split, the admin port, bad input of every kind, and graceful shutdown.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use rankd_feature_ops::Value;
use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_serving::client::{ClientError, Connection, FeatureValue, Pool, ScoreRequest};
use rankd_serving::engine::request::DenseRequest;
use rankd_serving::engine::{reference, Model};
use rankd_serving::protocol::{ErrorCode, MessageType};

mod common;
use common::{start_daemon, Daemon};

fn start(root: &Path, config: Option<&str>) -> Daemon {
    start_with(root, config, &[])
}

fn start_with(root: &Path, config: Option<&str>, extra: &[&str]) -> Daemon {
    let path = config.map(|text| {
        let path = root.join(".rankd.toml");
        std::fs::write(&path, text).unwrap();
        path
    });
    start_daemon(root, path.as_deref(), extra)
}

fn synth(root: &Path, name: &str, version: u64, seed: u64) {
    synth_kind(root, name, version, seed, ModelKind::DeepFm);
}

fn synth_kind(root: &Path, name: &str, version: u64, seed: u64, kind: ModelKind) {
    let dir = root.join(name).join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    write_synthetic(
        &dir.join("model.rkm"),
        &SynthOptions {
            name: name.into(),
            version,
            kind,
            seed,
            ..SynthOptions::default()
        },
    )
    .unwrap();
}

fn request(model: &str, items: usize) -> ScoreRequest {
    ScoreRequest {
        model: model.into(),
        routing_key: "user-1".into(),
        user: vec![
            ("user_age".into(), FeatureValue::F64(33.0)),
            ("user_city".into(), FeatureValue::Str("Tokyo".into())),
            ("hour".into(), FeatureValue::I64(21)),
        ],
        items: (0..items)
            .map(|i| {
                let mut f = vec![
                    ("item_id".into(), FeatureValue::I64(i as i64 * 31)),
                    (
                        "item_tags".into(),
                        FeatureValue::StrList(vec!["news".into(), format!("t{i}")]),
                    ),
                ];
                if i % 3 != 0 {
                    f.push(("item_price".into(), FeatureValue::F64(i as f64 * 0.5)));
                }
                f
            })
            .collect(),
        ..ScoreRequest::default()
    }
}

/// The same request as the engine's reference sees it (feature order of the synthetic spec).
fn reference_scores(path: &Path, items: usize) -> Vec<f64> {
    let model = Model::open(path).unwrap();
    let tags: Vec<Vec<String>> = (0..items)
        .map(|i| vec!["news".into(), format!("t{i}")])
        .collect();
    let req = DenseRequest {
        user: vec![
            Value::F64(33.0),
            Value::Str("Tokyo"),
            Value::Int(21),
            Value::Missing,
            Value::Missing,
            Value::Missing,
        ],
        items: (0..items)
            .map(|i| {
                vec![
                    Value::Missing,
                    Value::Missing,
                    Value::Missing,
                    Value::Int(i as i64 * 31),
                    Value::StrList(&tags[i]),
                    if i % 3 != 0 {
                        Value::F64(i as f64 * 0.5)
                    } else {
                        Value::Missing
                    },
                ]
            })
            .collect(),
    };
    reference::score(&model, &req).unwrap()
}

fn server_error(r: Result<impl std::fmt::Debug, ClientError>) -> (ErrorCode, String) {
    match r {
        Err(ClientError::Server { code, message, .. }) => (code.unwrap(), message),
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
    (status, body)
}

#[test]
fn scores_match_the_reference_and_pipelining_works() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed", 1, 3);
    let d = start(root.path(), None);
    let mut c = Connection::connect(d.addr).unwrap();
    c.ping().unwrap();
    let r = c.score(&request("feed", 40)).unwrap();
    assert_eq!(r.model, "feed");
    assert_eq!(r.version, 1);
    let want = reference_scores(&root.path().join("feed/1/model.rkm"), 40);
    assert_eq!(r.scores.len(), 40);
    for (g, w) in r.scores.iter().zip(&want) {
        assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
    }

    // 64 requests of different sizes sent before reading anything.
    let mut ids = Vec::new();
    for i in 0..64 {
        let body = request("feed", 1 + i % 9).encode().unwrap();
        ids.push((c.send(MessageType::ScoreRequest, &body).unwrap(), 1 + i % 9));
    }
    let mut seen = std::collections::HashMap::new();
    for _ in 0..64 {
        let resp = c.recv().unwrap();
        let id = resp.request_id;
        seen.insert(id, resp.into_score().unwrap().scores.len());
    }
    for (id, n) in ids {
        assert_eq!(seen[&id], n, "request {id}");
    }

    // Concurrent connections from a pool.
    let pool = std::sync::Arc::new(Pool::new(d.addr, 8));
    let handles: Vec<_> = (0..8)
        .map(|t| {
            let pool = pool.clone();
            std::thread::spawn(move || {
                for i in 0..20 {
                    let r = pool.score(&request("feed", 1 + (t + i) % 5)).unwrap();
                    assert_eq!(r.scores.len(), 1 + (t + i) % 5);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn versions_labels_and_traffic_split() {
    let root = tempfile::tempdir().unwrap();
    for v in 1..=3 {
        synth(root.path(), "feed", v, v);
    }
    let config = r#"
        [model.feed]
        versions = "all"
        labels = { stable = 1, canary = 2 }
        split = { stable = 50, canary = 50 }
    "#;
    let d = start(root.path(), Some(config));
    let mut c = Connection::connect(d.addr).unwrap();
    let mut by_version = std::collections::BTreeMap::new();
    for u in 0..200 {
        let mut r = request("feed", 2);
        r.routing_key = format!("user-{u}");
        let first = c.score(&r).unwrap().version;
        // A user stays on one version.
        for _ in 0..3 {
            assert_eq!(c.score(&r).unwrap().version, first);
        }
        *by_version.entry(first).or_insert(0) += 1;
    }
    assert_eq!(by_version.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    assert!(by_version[&1] > 60 && by_version[&2] > 60, "{by_version:?}");

    let mut r = request("feed", 1);
    r.version = 3;
    assert_eq!(c.score(&r).unwrap().version, 3);
    r.version = 0;
    r.label = "canary".into();
    assert_eq!(c.score(&r).unwrap().version, 2);
    r.label = "nope".into();
    assert_eq!(server_error(c.score(&r)).0, ErrorCode::UnknownVersion);
    r.label.clear();
    r.version = 9;
    assert_eq!(server_error(c.score(&r)).0, ErrorCode::UnknownVersion);

    let status = c.status("").unwrap();
    assert_eq!(status.len(), 1);
    assert_eq!(
        status[0].1.iter().map(|v| v.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(status[0].2.contains(&("canary".into(), 2, 50)));

    let (code, body) = http_get(d.admin, "/models");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["models"]["feed"]["labels"]["stable"], 1);
    assert_eq!(v["ready"], true);
}

#[test]
fn bad_input_gets_errors_and_disturbs_nobody() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed", 1, 1);
    let config = r#"
        [limits]
        max_items = 50
        max_frame_bytes = 100000
        read_timeout_ms = 300
    "#;
    let d = start(root.path(), Some(config));
    // A healthy connection kept open through everything below.
    let mut healthy = Connection::connect(d.addr).unwrap();
    assert_eq!(healthy.score(&request("feed", 3)).unwrap().scores.len(), 3);

    let mut c = Connection::connect(d.addr).unwrap();
    assert_eq!(
        server_error(c.score(&request("nope", 1))).0,
        ErrorCode::UnknownModel
    );
    let (code, msg) = server_error(c.score(&request("feed", 51)));
    assert_eq!(code, ErrorCode::LimitExceeded);
    assert!(msg.contains("51 items"), "{msg}");
    let mut wrong = request("feed", 2);
    wrong.user[0].1 = FeatureValue::Str("old".into());
    let (code, msg) = server_error(c.score(&wrong));
    assert_eq!(code, ErrorCode::BadFeature);
    assert!(msg.contains("`user_age`"), "{msg}");
    let mut wrong_item = request("feed", 2);
    wrong_item.items[1][0].1 = FeatureValue::Str("x".into());
    wrong_item.items[0][0].1 = FeatureValue::Str("y".into());
    let (code, msg) = server_error(c.score(&wrong_item));
    assert_eq!(code, ErrorCode::BadFeature);
    assert!(msg.contains("`item_id`"), "{msg}");
    // A malformed FlatBuffer body.
    let id = c
        .send(MessageType::ScoreRequest, &[1, 2, 3, 4, 5, 6, 7, 8, 9])
        .unwrap();
    let r = c.recv_id(id).unwrap().into_score();
    assert_eq!(server_error(r).0, ErrorCode::MalformedRequest);
    // A response type sent as a request.
    let id = c.send(MessageType::Pong, &[]).unwrap();
    assert_eq!(
        server_error(c.recv_id(id).unwrap().into_score()).0,
        ErrorCode::UnsupportedMessage
    );
    // The same connection still scores.
    assert_eq!(c.score(&request("feed", 4)).unwrap().scores.len(), 4);

    // Framing errors close the connection.
    for bytes in [
        b"XX\x01\x01\0\0\0\0\x01\0\0\0\0\0\0\0\x04\0\0\0abcd".to_vec(),
        // A frame larger than max_frame_bytes.
        {
            let mut b = b"RK\x01\x01\0\0\0\0\x01\0\0\0\0\0\0\0".to_vec();
            b.extend_from_slice(&200_000u32.to_le_bytes());
            b
        },
    ] {
        let mut bad = Connection::connect(d.addr).unwrap();
        bad.send_raw(&bytes).unwrap();
        bad.set_timeout(Some(Duration::from_secs(5))).unwrap();
        assert!(bad.recv().is_err(), "the connection must be closed");
    }
    // Half a frame, then silence: closed after read_timeout_ms.
    let mut stall = TcpStream::connect(d.addr).unwrap();
    stall
        .write_all(b"RK\x01\x01\0\0\0\0\x01\0\0\0\0\0\0\0\x10\0\0\0abc")
        .unwrap();
    stall
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 8];
    let n = stall.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "a stalled connection is closed");

    // Nothing above disturbed the healthy connection or the daemon.
    assert_eq!(healthy.score(&request("feed", 5)).unwrap().scores.len(), 5);
    let (code, metrics) = http_get(d.admin, "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("rankd_requests_total{model=\"feed\",version=\"1\",outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("outcome=\"unknown_model\""), "{metrics}");
    assert!(metrics.contains("rankd_frame_errors_total 3"), "{metrics}");
    assert!(metrics.contains("rankd_model_mapped_bytes{model=\"feed\",version=\"1\"}"));
    assert!(metrics.contains("rankd_request_latency_us_count"));
    assert_eq!(http_get(d.admin, "/healthz").0, 200);
    assert_eq!(http_get(d.admin, "/readyz").0, 200);
    assert_eq!(http_get(d.admin, "/nope").0, 404);
}

#[test]
fn a_bad_model_file_is_skipped_and_readiness_follows_the_config() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "good", 1, 1);
    let bad = root.path().join("broken/1");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model.rkm"), b"RANKDMDL but not really").unwrap();
    let d = start(root.path(), Some("[model.broken]\n[model.good]\n"));
    let mut c = Connection::connect(d.addr).unwrap();
    assert_eq!(c.score(&request("good", 2)).unwrap().scores.len(), 2);
    assert_eq!(
        server_error(c.score(&request("broken", 1))).0,
        ErrorCode::UnknownModel
    );
    // A configured model has no servable version: not ready.
    assert_eq!(http_get(d.admin, "/readyz").0, 503);
    assert_eq!(http_get(d.admin, "/healthz").0, 200);
}

#[test]
fn sigterm_finishes_and_exits_zero() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed", 1, 1);
    let mut d = start(root.path(), None);
    let mut c = Connection::connect(d.addr).unwrap();
    let ids: Vec<u64> = (0..20)
        .map(|_| {
            c.send(
                MessageType::ScoreRequest,
                &request("feed", 30).encode().unwrap(),
            )
            .unwrap()
        })
        .collect();
    // SAFETY-free: kill(2) through the `kill` command.
    let status = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Everything sent before the signal is answered.
    for id in ids {
        let r = c.recv_id(id).unwrap();
        assert!(
            r.msg_type == MessageType::ScoreResponse as u8
                || r.msg_type == MessageType::Error as u8
        );
    }
    let code = d.child.wait().unwrap();
    assert!(code.success(), "{code:?}");
}

#[test]
fn the_epoll_driver_serves_the_same_scores() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed", 1, 3);
    let d = start_with(root.path(), None, &["--force-epoll"]);
    let mut c = Connection::connect(d.addr).unwrap();
    let r = c.score(&request("feed", 12)).unwrap();
    let want = reference_scores(&root.path().join("feed/1/model.rkm"), 12);
    for (g, w) in r.scores.iter().zip(&want) {
        assert!((f64::from(*g) - w).abs() < 1e-5, "{g} vs {w}");
    }
}

#[test]
fn connection_limit_and_deadlines() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed", 1, 1);
    // One worker, at most two connections on it.
    let d = start_with(
        root.path(),
        Some("threads = 1\n[limits]\nmax_connections = 2\n"),
        &["--threads", "1"],
    );
    let mut a = Connection::connect(d.addr).unwrap();
    let mut b = Connection::connect(d.addr).unwrap();
    a.ping().unwrap();
    b.ping().unwrap();
    let mut third = Connection::connect(d.addr).unwrap();
    third.set_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(
        third.ping().is_err(),
        "a connection over the limit is refused"
    );
    // The two admitted connections are unaffected; closing one admits a new one.
    a.ping().unwrap();
    drop(b);
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = Connection::connect(d.addr).unwrap();
    fourth.ping().unwrap();

    // A deadline of 1 microsecond cannot be met: the request is answered, not scored.
    let mut r = request("feed", 50);
    r.deadline_us = 1;
    assert_eq!(server_error(a.score(&r)).0, ErrorCode::DeadlineExceeded);
    r.deadline_us = 5_000_000;
    assert_eq!(a.score(&r).unwrap().scores.len(), 50);
}

/// What an independent client needs and must not guess: the schema in the status response and
/// in `/models`, the exact bitmap length, reserved header bytes, clean error messages.
#[test]
fn schema_and_strict_framing() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed", 1, 1);
    let d = start(root.path(), None);
    let mut c = Connection::connect(d.addr).unwrap();
    let schema = c.schema("feed").unwrap();
    assert_eq!(schema.len(), 1);
    let (version, features) = &schema[0];
    assert_eq!(*version, 1);
    let want = [
        ("user_age", "float", 1u8),
        ("user_city", "string", 3),
        ("hour", "int", 2),
        ("item_id", "int", 2),
        ("item_tags", "string_list", 5),
        ("item_price", "float", 1),
    ];
    let got: Vec<(&str, &str, u8)> = features
        .iter()
        .map(|(n, t, k)| (n.as_str(), t.as_str(), *k))
        .collect();
    assert_eq!(got, want);
    let (code, body) = http_get(d.admin, "/models");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let f = &v["models"]["feed"]["versions"][0]["features"];
    assert_eq!(f[4]["name"], "item_tags");
    assert_eq!(f[4]["type"], "string_list");
    assert_eq!(f[4]["kind"], "StrList");
    // Unknown model: an empty status, not an error.
    assert!(c.schema("nope").unwrap().is_empty());
    // An empty status body asks for every model; a garbage one is MalformedRequest.
    let id = c.send(MessageType::StatusRequest, &[]).unwrap();
    assert_eq!(
        c.recv_id(id).unwrap().msg_type,
        MessageType::StatusResponse as u8
    );
    let id = c.send(MessageType::StatusRequest, &[9; 7]).unwrap();
    let (code, _) = server_error(c.recv_id(id).unwrap().into_score());
    assert_eq!(code, ErrorCode::MalformedRequest);

    // A missing bitmap longer than ceil(n / 8) bytes is refused, as is a shorter one.
    let mut r = request("feed", 3);
    r.items[1].retain(|(n, _)| n != "item_id");
    let body = r.encode().unwrap();
    let good = c.score(&r).unwrap();
    assert_eq!(good.scores.len(), 3);
    let mut fbb = flatbuffers::FlatBufferBuilder::new();
    let model = fbb.create_string("feed");
    let name = fbb.create_string("item_id");
    let ids = fbb.create_vector(&[1i64, 2, 3]);
    let missing = fbb.create_vector(&[0u8, 0]);
    let col = rankd_serving::gen::rankd::rpc::ItemColumn::create(
        &mut fbb,
        &rankd_serving::gen::rankd::rpc::ItemColumnArgs {
            name: Some(name),
            kind: rankd_serving::gen::rankd::rpc::Kind::I64,
            i64s: Some(ids),
            missing: Some(missing),
            ..Default::default()
        },
    );
    let cols = fbb.create_vector(&[col]);
    let req = rankd_serving::gen::rankd::rpc::ScoreRequest::create(
        &mut fbb,
        &rankd_serving::gen::rankd::rpc::ScoreRequestArgs {
            model: Some(model),
            num_items: 3,
            items: Some(cols),
            ..Default::default()
        },
    );
    fbb.finish(req, None);
    let id = c
        .send(MessageType::ScoreRequest, fbb.finished_data())
        .unwrap();
    let (code, msg) = server_error(c.recv_id(id).unwrap().into_score());
    assert_eq!(code, ErrorCode::BadFeature);
    assert!(msg.contains("exactly 1 expected"), "{msg}");

    // A MalformedRequest message ends without blank lines.
    let id = c.send(MessageType::ScoreRequest, &[7; 9]).unwrap();
    let (code, msg) = server_error(c.recv_id(id).unwrap().into_score());
    assert_eq!(code, ErrorCode::MalformedRequest);
    assert_eq!(msg, msg.trim_end(), "{msg:?}");
    // The connection stays open after error responses.
    assert_eq!(c.score(&r).unwrap().scores, good.scores);
    let _ = body;

    // Reserved header bytes other than zero: a framing error, the connection is closed.
    let mut bad = Connection::connect(d.addr).unwrap();
    bad.send_raw(b"RK\x01\x03\0\0\x01\0\x01\0\0\0\0\0\0\0\0\0\0\0")
        .unwrap();
    bad.set_timeout(Some(Duration::from_secs(5))).unwrap();
    assert!(bad.recv().is_err(), "the connection must be closed");
    c.ping().unwrap();
}

/// SIGTERM stops the daemon even while new connections arrive faster than the accept loop's
/// shutdown check interval (the check runs on every accept, not only when accepting pauses).
#[test]
fn sigterm_with_a_stream_of_new_connections() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed", 1, 1);
    let mut d = start_with(
        root.path(),
        Some("shutdown_grace_ms = 1000\n"),
        &["--threads", "1"],
    );
    let addr = d.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = stop.clone();
    let flood = std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = TcpStream::connect(addr);
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    let status = Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = std::time::Instant::now();
    let exited = loop {
        if let Some(code) = d.child.try_wait().unwrap() {
            break Some(code);
        }
        if start.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    flood.join().unwrap();
    let code = exited.expect("the daemon did not stop within 10 s under a stream of connections");
    assert!(code.success(), "{code:?}");
}

#[test]
fn folded_tables_follow_the_engine_config() {
    let root = tempfile::tempdir().unwrap();
    synth_kind(root.path(), "wd", 1, 1, ModelKind::WideDeep);
    let dir = root.path().join("wd").join("1");
    let folded_bytes = |d: &Daemon| {
        let (code, body) = http_get(d.admin, "/models");
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["models"]["wd"]["versions"][0]["folded_tables_bytes"]
            .as_u64()
            .unwrap()
    };
    let scores = |d: &Daemon| {
        let mut c = Connection::connect(d.addr).unwrap();
        c.score(&request("wd", 40)).unwrap().scores
    };
    let d = start(root.path(), None);
    let (bytes, folded) = (folded_bytes(&d), scores(&d));
    drop(d);
    let d = start(root.path(), Some("[engine]\nfold_tables_mib = 0\n"));
    assert_eq!(folded_bytes(&d), 0);
    // Every table of the synthetic model folds by default: each row's 32 first-layer values.
    let m = Model::open(dir.join("model.rkm")).unwrap();
    assert_eq!(bytes as usize, m.folded_bytes());
    assert!(bytes > 0);
    for (a, b) in folded.iter().zip(&scores(&d)) {
        assert!((a - b).abs() <= 1e-6, "{a} vs {b}");
    }
}
