//! rankd-load against an in-process rankd: every synthesized request is valid for the model, the
//! open loop reaches its rate, and `--json` ends with the summary object.

use std::process::Command;

use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_loadtest::synth::{default_user_level, Synth};
use rankd_loadtest::{run, Arrivals, RunOptions};
use rankd_serving::config::ServerConfig;
use rankd_serving::registry::Registry;
use rankd_serving::server::Server;

fn server(root: &std::path::Path) -> Server {
    let dir = root.join("m/3");
    std::fs::create_dir_all(&dir).unwrap();
    write_synthetic(
        &dir.join("model.rkm"),
        &SynthOptions {
            name: "m".into(),
            version: 3,
            kind: ModelKind::DeepFm,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 1,
        models: root.to_path_buf(),
        ..ServerConfig::default()
    };
    let (reg, problems) = Registry::load(&config, None, &mut Default::default(), None, None);
    assert!(problems.is_empty());
    Server::start(config, reg, None).unwrap()
}

#[test]
fn synthesized_requests_are_valid_and_the_rate_is_reached() {
    let root = tempfile::tempdir().unwrap();
    let s = server(root.path());
    let model = rankd_formats::ModelFile::open(root.path().join("m/3/model.rkm")).unwrap();
    let mut synth = Synth::new("m", &model.spec().features, &default_user_level, 7);
    let bodies: Vec<Vec<u8>> = (0..16)
        .map(|i| synth.request(10, i).encode().unwrap())
        .collect();
    for arrivals in [Arrivals::Constant, Arrivals::Poisson] {
        let report = run(
            &RunOptions {
                addr: s.addr,
                rate: 400.0,
                duration: 1.0,
                connections: 3,
                arrivals,
                progress: false,
                keep_samples: true,
            },
            &bodies,
        )
        .unwrap();
        assert_eq!(report.errors, 0, "{:?}", report.errors_by_code);
        assert_eq!(report.ok, report.sent);
        assert_eq!(report.sent, 400);
        // One sample per response, in order of intended send time, spread over the second.
        assert_eq!(report.samples.len(), 400);
        assert!(report
            .samples
            .windows(2)
            .all(|w| w[0].intended_unix_us <= w[1].intended_unix_us));
        let span = report.samples[399].intended_unix_us - report.samples[0].intended_unix_us;
        assert!((900_000..1_100_000).contains(&span), "span {span} us");
        assert!(report.samples.iter().all(|s| s.version == Some(3)));
        assert_eq!(report.versions.get(&3), Some(&400));
        assert!(report.achieved_rate > 250.0, "{}", report.achieved_rate);
        assert!(report.latency.value_at_quantile(0.5) > 0);
    }
    s.shutdown();
}

#[test]
fn the_binary_ends_with_a_json_summary() {
    let root = tempfile::tempdir().unwrap();
    let s = server(root.path());
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-load"))
        .args(["--addr", &s.addr.to_string(), "--model", "m"])
        .args([
            "--model-file",
            root.path().join("m/3/model.rkm").to_str().unwrap(),
        ])
        .args([
            "--rate",
            "200",
            "--duration",
            "1",
            "--items",
            "5",
            "--connections",
            "2",
            "--json",
            "--latency-log",
            root.path().join("lat.txt").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = std::fs::read_to_string(root.path().join("lat.txt")).unwrap();
    assert_eq!(log.lines().count(), 200);
    for line in log.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        assert_eq!(f.len(), 3, "{line}");
        assert!(
            f[0].parse::<u64>().unwrap() > 1_700_000_000_000_000,
            "{line}"
        );
        assert!(f[1].parse::<u64>().unwrap() > 0, "{line}");
        assert_eq!(f[2], "3", "{line}");
    }
    let stdout = String::from_utf8(out.stdout).unwrap();
    let last = stdout.lines().last().unwrap();
    let v: serde_json::Value = serde_json::from_str(last).unwrap();
    for key in [
        "ok", "errors", "rate", "p50_us", "p90_us", "p99_us", "p999_us", "max_us", "versions",
    ] {
        assert!(v.get(key).is_some(), "missing {key} in {last}");
    }
    assert_eq!(v["ok"], 200);
    assert_eq!(v["errors"], 0);
    assert_eq!(v["versions"]["3"], 200);

    // Unknown model: every request is an error, counted by code.
    let out = Command::new(env!("CARGO_BIN_EXE_rankd-load"))
        .args(["--addr", &s.addr.to_string(), "--model", "nope"])
        .args([
            "--model-file",
            root.path().join("m/3/model.rkm").to_str().unwrap(),
        ])
        .args([
            "--rate",
            "50",
            "--duration",
            "0.5",
            "--items",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!(v["ok"], 0);
    assert_eq!(v["errors_by_code"]["unknown_model"], 25);
    s.shutdown();
}

/// The KServe v2 mode: the same synthesized requests over gRPC and REST are all valid for the
/// model (every feature kind, lists with `.lengths` and missing values included), answered by
/// the right version, at the asked rate.
#[test]
fn kserve_mode_over_grpc_and_rest() {
    use rankd_loadtest::kserve::{self, Target};
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m/3");
    std::fs::create_dir_all(&dir).unwrap();
    write_synthetic(
        &dir.join("model.rkm"),
        &SynthOptions {
            name: "m".into(),
            version: 3,
            kind: ModelKind::DeepFm,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    let config = ServerConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        grpc: Some("127.0.0.1:0".parse().unwrap()),
        http: Some("127.0.0.1:0".parse().unwrap()),
        threads: 1,
        models: root.path().to_path_buf(),
        ..ServerConfig::default()
    };
    let (reg, problems) = Registry::load(&config, None, &mut Default::default(), None, None);
    assert!(problems.is_empty());
    let s = Server::start(config, reg, None).unwrap();
    let bound = rankd_serving::kserve::start(s.shared.clone()).unwrap();
    let model = rankd_formats::ModelFile::open(dir.join("model.rkm")).unwrap();
    let spec = &model.spec().features;
    let mut synth = Synth::new("m", spec, &default_user_level, 7);
    let reqs: Vec<_> = (0..16).map(|i| synth.request(10, i)).collect();
    for (addr, target) in [
        (
            bound.grpc.unwrap(),
            Target::Grpc(reqs.iter().map(|r| kserve::grpc_request(r, spec)).collect()),
        ),
        (
            bound.http.unwrap(),
            Target::Rest(
                kserve::rest_path(&reqs[0]),
                reqs.iter().map(|r| kserve::rest_body(r, spec)).collect(),
            ),
        ),
    ] {
        let report = kserve::run(
            &RunOptions {
                addr,
                rate: 200.0,
                duration: 1.0,
                connections: 2,
                arrivals: Arrivals::Constant,
                progress: false,
                keep_samples: false,
            },
            &target,
        )
        .unwrap();
        assert_eq!(report.errors, 0, "{:?}", report.errors_by_code);
        assert_eq!(report.ok, 200);
        assert_eq!(report.versions.get(&3), Some(&200));
        assert!(report.latency.value_at_quantile(0.5) > 0);
    }
    s.shutdown();
}
