//! Hot reload on the real daemon: a version renamed into the root goes live, a corrupt one is
//! rejected without disturbing what is served, a removed one is unloaded, and the config's labels
//! follow edits of the config file.

use std::path::Path;
use std::time::{Duration, Instant};

use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_serving::client::{Connection, FeatureValue, ScoreRequest};

mod common;
use common::{start_daemon, Daemon};

fn start(root: &Path, config: &Path) -> Daemon {
    start_daemon(root, Some(config), &[])
}

/// Deploys like `rankd-tool deploy`: write into a hidden directory, then rename into place.
fn deploy(root: &Path, version: u64, corrupt: bool) {
    deploy_model(root, "feed", version, corrupt);
}

fn deploy_model(root: &Path, name: &str, version: u64, corrupt: bool) {
    let model_dir = root.join(name);
    std::fs::create_dir_all(&model_dir).unwrap();
    let tmp = model_dir.join(format!(".tmp-{version}"));
    std::fs::create_dir_all(&tmp).unwrap();
    let file = tmp.join("model.rkm");
    write_synthetic(
        &file,
        &SynthOptions {
            name: name.into(),
            version,
            kind: ModelKind::WideDeep,
            seed: version,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    if corrupt {
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    }
    std::fs::rename(&tmp, model_dir.join(version.to_string())).unwrap();
}

fn request() -> ScoreRequest {
    ScoreRequest {
        model: "feed".into(),
        user: vec![("user_age".into(), FeatureValue::F64(40.0))],
        items: vec![vec![("item_id".into(), FeatureValue::I64(3))]; 3],
        ..ScoreRequest::default()
    }
}

fn wait_for_version(c: &mut Connection, want: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let got = c.score(&request()).unwrap().version;
        if got == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "still on version {got}, waiting for {want}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn versions_come_and_go_without_a_failed_request() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join(".rankd.toml");
    // The periodic rescan is long: the file watcher alone must notice renames quickly.
    std::fs::write(
        &config,
        "rescan_interval_ms = 60000\n[model.feed]\nversions = \"latest\"\n",
    )
    .unwrap();
    deploy(root.path(), 1, false);
    let d = start(root.path(), &config);
    let mut c = Connection::connect(d.addr).unwrap();
    assert_eq!(c.score(&request()).unwrap().version, 1);

    // A client hammering the daemon during every change below must see no error.
    let addr = d.addr;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut c = Connection::connect(addr).unwrap();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                c.score(&request())
                    .expect("no request may fail during reloads");
                n += 1;
            }
            n
        })
    };

    deploy(root.path(), 2, false);
    let took = wait_for_version(&mut c, 2, Duration::from_secs(5));
    assert!(took < Duration::from_secs(2), "took {took:?}");

    // A corrupt version 3 is rejected; version 2 keeps serving.
    deploy(root.path(), 3, true);
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..10 {
        assert_eq!(c.score(&request()).unwrap().version, 2);
    }
    let m = common::get(d.admin, "/metrics");
    assert!(m.contains("rankd_model_load_failures_total 1"), "{m}");

    // Removing version 3 (the corrupt one) and 2 falls back to 1.
    std::fs::remove_dir_all(root.path().join("feed/3")).unwrap();
    std::fs::remove_dir_all(root.path().join("feed/2")).unwrap();
    wait_for_version(&mut c, 1, Duration::from_secs(5));

    // Config edits: keep every version, label version 4 as canary.
    deploy(root.path(), 4, false);
    wait_for_version(&mut c, 4, Duration::from_secs(5));
    std::fs::write(
        &config,
        "rescan_interval_ms = 60000\n[model.feed]\nversions = \"all\"\nlabels = { stable = 1, canary = 4 }\n",
    )
    .unwrap();
    let start = Instant::now();
    loop {
        let mut r = request();
        r.label = "stable".into();
        match c.score(&r) {
            Ok(res) if res.version == 1 => break,
            _ => {
                assert!(
                    start.elapsed() < Duration::from_secs(5),
                    "labels never applied"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let served = load.join().unwrap();
    assert!(served > 10, "the load thread scored only {served} requests");
}

/// A model directory that appears after startup gets its own watch: with the periodic rescan a
/// minute away, its first version and then a second one (renamed into that directory, where
/// only its own watch sees it) go live within seconds.
#[test]
fn a_new_model_directory_is_watched_too() {
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join(".rankd.toml");
    std::fs::write(&config, "rescan_interval_ms = 60000\n").unwrap();
    deploy(root.path(), 1, false);
    let d = start(root.path(), &config);
    let mut c = Connection::connect(d.addr).unwrap();
    let news = ScoreRequest {
        model: "news".into(),
        ..request()
    };
    // An idle daemon does not scan: its own reads of the root are not changes.
    let scans = || -> u64 {
        let m = common::get(d.admin, "/metrics");
        m.lines()
            .find_map(|l| l.strip_prefix("rankd_model_root_scans_total "))
            .expect("scan counter exported")
            .trim()
            .parse()
            .unwrap()
    };
    let before = scans();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(scans(), before, "the root was rescanned without a change");
    for version in [1, 2] {
        deploy_model(root.path(), "news", version, false);
        let start = Instant::now();
        loop {
            match c.score(&news) {
                Ok(r) if r.version == version => break,
                _ => {
                    assert!(
                        start.elapsed() < Duration::from_secs(5),
                        "news version {version} not served after {:?}",
                        start.elapsed()
                    );
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}
