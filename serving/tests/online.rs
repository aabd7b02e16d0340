//! Online learning end to end on loopback, with a real Kafka broker (`scripts/kafka.sh`), the
//! real `rankd` binary and the online trainer: the daemon's scores after the trainer publishes
//! equal the trainer's current model's, across the trainer's snapshots (new versions the daemon
//! loads while deltas on them already arrive); a daemon started afterwards catches up to the
//! same scores; a corrupt delta is refused and serving continues on the last good state, and the
//! version then waits for the next snapshot.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use rankd_feature_ops::Value;
use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_serving::client::{Connection, FeatureValue, ScoreRequest};
use rankd_serving::engine::cpu::CpuEngine;
use rankd_serving::engine::request::DenseRequest;
use rankd_serving::engine::{BatchOutput, InferenceBackend, Model};
use rankd_storage::kafka::{testing, KafkaUrl, Topic};

mod common;
use common::{get, metric, start_daemon};

const CITIES: [&str; 4] = ["Tokyo", "Paris", "Lagos", "Lima"];

/// A labeled sample in the JSON shape the online trainer reads.
fn sample(i: u64) -> Vec<u8> {
    let city = CITIES[(i % 4) as usize];
    let item = (i * 7919) % 500;
    let hour = i % 24;
    let label = u8::from((item % 5 < 2) ^ (city == "Tokyo" && hour > 12));
    format!(
        r#"{{"user_age": {}, "user_city": "{city}", "hour": {hour}, "item_id": {item}, "item_tags": ["news", "t{}"], "item_price": {}, "label": {label}}}"#,
        18 + i % 50,
        item % 9,
        (item % 40) as f64 * 0.5
    )
    .into_bytes()
}

/// A user's age, city and hour.
type User = (f64, &'static str, i64);

/// The fixed requests both sides score: the daemon's request, the items' tags and the user.
fn requests() -> Vec<(ScoreRequest, Vec<String>, User)> {
    (0..4)
        .map(|u| {
            let user = (20.0 + u as f64 * 9.0, CITIES[u % 4], (u * 7 % 24) as i64);
            let tags: Vec<String> = (0..30).map(|i| format!("t{}", i % 9)).collect();
            let req = ScoreRequest {
                model: "m".into(),
                routing_key: format!("user-{u}"),
                user: vec![
                    ("user_age".into(), FeatureValue::F64(user.0)),
                    ("user_city".into(), FeatureValue::Str(user.1.into())),
                    ("hour".into(), FeatureValue::I64(user.2)),
                ],
                items: (0..30)
                    .map(|i| {
                        vec![
                            ("item_id".into(), FeatureValue::I64(i as i64 * 13 % 500)),
                            (
                                "item_tags".into(),
                                FeatureValue::StrList(vec!["news".into(), tags[i].clone()]),
                            ),
                            ("item_price".into(), FeatureValue::F64(i as f64 * 0.5)),
                        ]
                    })
                    .collect(),
                ..ScoreRequest::default()
            };
            (req, tags, user)
        })
        .collect()
}

fn engine_scores(model: &Model) -> Vec<f32> {
    let mut out = Vec::new();
    for (_, tags, (age, city, hour)) in requests() {
        let pairs: Vec<Vec<String>> = tags
            .iter()
            .map(|t| vec!["news".into(), t.clone()])
            .collect();
        let req = DenseRequest {
            user: vec![
                Value::F64(age),
                Value::Str(city),
                Value::Int(hour),
                Value::Missing,
                Value::Missing,
                Value::Missing,
            ],
            items: (0..30)
                .map(|i| {
                    vec![
                        Value::Missing,
                        Value::Missing,
                        Value::Missing,
                        Value::Int(i as i64 * 13 % 500),
                        Value::StrList(&pairs[i]),
                        Value::F64(i as f64 * 0.5),
                    ]
                })
                .collect(),
        };
        let mut b = BatchOutput::default();
        CpuEngine::new().score(model, &[&req], &mut b);
        out.extend_from_slice(b.get(0).unwrap());
    }
    out
}

fn daemon_scores(addr: std::net::SocketAddr) -> Vec<f32> {
    let mut c = Connection::connect(addr).unwrap();
    requests()
        .iter()
        .flat_map(|(r, _, _)| c.score(r).unwrap().scores)
        .collect()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn model_dir(root: &Path, version: u64, seed: u64) {
    let dir = root.join("m").join(version.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    write_synthetic(
        &dir.join("model.rkm"),
        &SynthOptions {
            name: "m".into(),
            version,
            kind: ModelKind::DeepFm,
            seed,
            ..SynthOptions::default()
        },
    )
    .unwrap();
}

#[test]
fn served_scores_follow_the_online_trainer_and_bad_deltas_are_refused() {
    let Some(broker) = testing::broker() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    model_dir(&root, 1, 5);
    let samples_url = broker.url(&testing::Broker::unique_topic("samples"));
    let updates_url = broker.url(&testing::Broker::unique_topic("updates"));
    let timeout = Duration::from_secs(20);
    let samples = Topic::connect(&samples_url.parse().unwrap(), true, timeout).unwrap();
    let n = 3000u64;
    // Samples arrive over about three seconds while the trainer runs: several deltas, and
    // snapshots (one a second) that the daemon loads while deltas on them are already coming.
    let producer = std::thread::spawn(move || {
        for chunk in (0..n).collect::<Vec<_>>().chunks(100) {
            samples
                .produce(None, chunk.iter().map(|&i| sample(i)).collect())
                .unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let config = dir.path().join("rankd.toml");
    std::fs::write(&config, format!("[model.m]\nupdates = \"{updates_url}\"\n")).unwrap();
    let d1 = start_daemon(&root, Some(&config), &[]);
    let base_scores = daemon_scores(d1.addr);

    let train = dir.path().join("online.toml");
    std::fs::write(
        &train,
        format!(
            r#"
[train]
train_files = []
batch_size = 64
lr_dense = 0.003
lr_sparse = 0.05

[online]
samples = "{samples_url}"
updates = "{updates_url}"
snapshot_dir = "{}"
snapshot_interval_s = 1
publish_interval_ms = 150
max_batch_wait_ms = 20
holdout = 0.1
"#,
            root.join("m").display()
        ),
    )
    .unwrap();
    let cfg =
        rankd_trainer::online::OnlineConfig::from_toml(&std::fs::read_to_string(&train).unwrap())
            .unwrap();
    let export = dir.path().join("trained.rkm");
    let mut log = Vec::new();
    let report = rankd_trainer::online::run(
        &cfg,
        &AtomicBool::new(false),
        rankd_trainer::online::Limits {
            max_samples: Some(n),
            export: Some(export.clone()),
        },
        &mut log,
    )
    .unwrap();
    producer.join().unwrap();
    let log = String::from_utf8(log).unwrap();
    assert_eq!(report.trained + report.held_out, n, "{report:?}\n{log}");
    assert!(report.held_out > n / 20, "{report:?}");
    assert!(report.holdout_auc.is_finite(), "{report:?}");
    assert!(report.deltas >= 3, "{report:?}");
    assert_eq!(report.bad_samples, 0, "{log}");
    assert!(!report.snapshots.is_empty(), "{report:?}\n{log}");
    let last = report.base_version;
    assert_eq!(last, *report.snapshots.last().unwrap());
    assert!(root.join(format!("m/{last}/model.rkm")).is_file());
    assert!(
        report.sequence >= 1,
        "no delta after the last snapshot: {log}"
    );

    let applied = |admin| {
        metric(
            admin,
            &format!("rankd_updates_last_sequence{{model=\"m\",version=\"{last}\"}}"),
        )
    };
    wait_for(
        "the daemon to apply every delta",
        Duration::from_secs(60),
        || applied(d1.admin) == Some(report.sequence as f64),
    );
    let trained = Model::open(&export).unwrap();
    let want = engine_scores(&trained);
    let got = daemon_scores(d1.addr);
    let diff = max_diff(&got, &want);
    assert!(diff <= 1e-6, "served vs trained: max difference {diff}");
    assert!(
        max_diff(&got, &base_scores) > 1e-4,
        "training changed nothing the requests see"
    );
    let models = get(d1.admin, "/models");
    assert!(models.contains("\"state\":\"applying\""), "{models}");

    // A replica started now catches up from the topic to the same scores.
    let d2 = start_daemon(&root, Some(&config), &[]);
    wait_for(
        "the new replica to catch up",
        Duration::from_secs(60),
        || applied(d2.admin) == Some(report.sequence as f64),
    );
    assert_eq!(daemon_scores(d2.addr), got);

    // A corrupt delta (the next sequence number, one byte flipped): refused, counted, serving
    // continues on the last good state, the version waits for a snapshot.
    let updates_topic =
        Topic::connect(&updates_url.parse::<KafkaUrl>().unwrap(), false, timeout).unwrap();
    let next = rankd_formats::delta::Delta {
        model: "m".into(),
        base_version: last,
        sequence: report.sequence + 1,
        wide_bias: None,
        ..Default::default()
    };
    let mut bytes = next.encode();
    bytes[20] ^= 1;
    let parts = rankd_formats::delta::split(&bytes, last, report.sequence + 1, 1 << 20);
    updates_topic.produce(Some(b"m"), parts).unwrap();
    let refused = "rankd_updates_refused_total{model=\"m\",reason=\"checksum\"}";
    // At least once: a consumer that rewinds (a version arriving) reads it again and refuses it
    // again, which is right too.
    wait_for(
        "the corrupt delta to be refused",
        Duration::from_secs(30),
        || metric(d1.admin, refused).is_some_and(|n| n >= 1.0),
    );
    assert_eq!(daemon_scores(d1.addr), got);
    let models = get(d1.admin, "/models");
    assert!(models.contains("waiting_for_snapshot"), "{models}");
    assert_eq!(
        metric(
            d1.admin,
            &format!("rankd_updates_waiting_for_snapshot{{model=\"m\",version=\"{last}\"}}")
        ),
        Some(1.0)
    );
    // A good delta after it is not applied either: the one before it is missing.
    let good = rankd_formats::delta::Delta {
        sequence: report.sequence + 2,
        ..next
    };
    let parts = rankd_formats::delta::split(&good.encode(), last, report.sequence + 2, 1 << 20);
    updates_topic.produce(Some(b"m"), parts).unwrap();
    let waiting = "rankd_updates_refused_total{model=\"m\",reason=\"waiting_for_snapshot\"}";
    wait_for(
        "the next delta to be held back",
        Duration::from_secs(30),
        || metric(d1.admin, waiting).is_some_and(|n| n >= 1.0),
    );
    assert_eq!(daemon_scores(d1.addr), got);
    // The next snapshot serves, and its version starts with a clean state.
    let next_version = last + 1;
    model_dir(&root, next_version, 6);
    wait_for("the next version", Duration::from_secs(30), || {
        metric(
            d1.admin,
            &format!(
                "rankd_updates_waiting_for_snapshot{{model=\"m\",version=\"{next_version}\"}}"
            ),
        ) == Some(0.0)
    });
    let fresh = Model::open(root.join(format!("m/{next_version}/model.rkm"))).unwrap();
    let diff = max_diff(&daemon_scores(d1.addr), &engine_scores(&fresh));
    assert!(diff <= 1e-6, "{diff}");
}

/// A delta on `model` changing the first rows of every embedding and wide table and scaling the
/// first deep layer.
fn crafted_delta(model: &Model, sequence: u64, seed: u64) -> rankd_formats::delta::Delta {
    use rankd_formats::delta::{Delta, LayerUpdate, RowUpdate, TableKind};
    let arch = &model.file().spec().architecture;
    let mut rng = rankd_formats::synth::Rng::new(seed);
    let mut d = Delta {
        model: model.name().into(),
        base_version: model.version(),
        sequence,
        ..Delta::default()
    };
    for (i, e) in arch.embeddings.iter().enumerate() {
        let rows: Vec<u32> = (0..e.rows.min(64) as u32).collect();
        d.tables.push(RowUpdate {
            kind: TableKind::Embedding,
            index: i as u32,
            dim: e.dim,
            values: rng.vec(rows.len() * e.dim as usize, 0.3),
            rows,
        });
    }
    if let Some(w) = &arch.wide {
        for (i, s) in w.slots.iter().enumerate() {
            let rows: Vec<u32> = (0..s.weights.len.min(64) as u32).collect();
            d.tables.push(RowUpdate {
                kind: TableKind::Wide,
                index: i as u32,
                dim: 1,
                values: rng.vec(rows.len(), 0.3),
                rows,
            });
        }
    }
    let l = &arch.deep[0];
    d.layers.push(LayerUpdate {
        index: 0,
        out_dim: l.out_dim,
        in_dim: l.in_dim,
        weight: model
            .file()
            .weights(l.weight)
            .iter()
            .map(|w| w * (0.5 + seed as f32 * 0.1))
            .collect(),
        bias: model.file().weights(l.bias).to_vec(),
    });
    d
}

fn publish(topic: &Topic, d: &rankd_formats::delta::Delta) {
    let bytes = d.encode();
    // Small parts: every delta travels in several messages.
    let parts = rankd_formats::delta::split(&bytes, d.base_version, d.sequence, 4096);
    topic.produce(Some(b"m"), parts).unwrap();
}

#[test]
fn deltas_for_a_version_not_loaded_yet_are_applied_when_it_arrives_and_copies_are_skipped() {
    let Some(broker) = testing::broker() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("models");
    model_dir(&root, 1, 5);
    let updates_url = broker.url(&testing::Broker::unique_topic("pending"));
    let topic =
        Topic::connect(&updates_url.parse().unwrap(), true, Duration::from_secs(20)).unwrap();
    // Version 2 exists only outside the model root for now.
    let staged = dir.path().join("staged");
    model_dir(&staged, 2, 6);
    let v2 = Model::open(staged.join("m/2/model.rkm")).unwrap();
    let v1 = Model::open(root.join("m/1/model.rkm")).unwrap();
    let (a, b) = (crafted_delta(&v2, 1, 1), crafted_delta(&v2, 2, 2));
    let c = crafted_delta(&v1, 1, 3);
    // Deltas on version 2 (not loaded), a copy of the first (at least once), one on version 1.
    for d in [&a, &b, &a, &c] {
        publish(&topic, d);
    }
    let config = dir.path().join("rankd.toml");
    std::fs::write(&config, format!("[model.m]\nupdates = \"{updates_url}\"\n")).unwrap();
    let d = start_daemon(&root, Some(&config), &[]);
    let seq = |v: u64| {
        metric(
            d.admin,
            &format!("rankd_updates_last_sequence{{model=\"m\",version=\"{v}\"}}"),
        )
    };
    wait_for("version 1's delta", Duration::from_secs(30), || {
        seq(1) == Some(1.0)
    });
    let want = engine_scores(&v1.apply(&c).unwrap());
    assert!(max_diff(&daemon_scores(d.addr), &want) <= 1e-6);
    // Version 2 arrives: the consumer goes back for its deltas.
    std::fs::rename(staged.join("m/2"), root.join("m/2")).unwrap();
    wait_for("version 2's deltas", Duration::from_secs(30), || {
        seq(2) == Some(2.0)
    });
    let want = engine_scores(&v2.apply(&a).unwrap().apply(&b).unwrap());
    let diff = max_diff(&daemon_scores(d.addr), &want);
    assert!(diff <= 1e-6, "{diff}");
    // Nothing was refused: the copy was skipped, the early deltas waited.
    let models = get(d.admin, "/models");
    assert!(models.contains("\"refused\":{}"), "{models}");
    assert!(models.contains("\"applied\":3"), "{models}");
}
