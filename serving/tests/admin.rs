//! The admin port of the real `rankd` binary: concurrent connections, header limits, methods,
//! and Prometheus text that a real parser (the Python `prometheus_client`) reads back.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rankd_formats::synth::ModelKind;
use rankd_serving::client::{Connection, FeatureValue, ScoreRequest};

mod common;
use common::{start_daemon, synth_model};

const ODD_NAME: &str = "we\"ird\\name";

fn synth(root: &Path, name: &str) {
    synth_model(root, name, ModelKind::Wide);
}

/// One request on its own connection: (status, headers and body), or an error after `limit`.
fn request(addr: SocketAddr, raw: &[u8], limit: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(limit))?;
    s.write_all(raw)?;
    let mut text = Vec::new();
    s.read_to_end(&mut text)?;
    let text = String::from_utf8_lossy(&text).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((status, text))
}

fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let raw = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    request(addr, raw.as_bytes(), Duration::from_secs(5)).unwrap()
}

#[test]
fn slow_and_idle_clients_do_not_delay_probes() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed");
    let d = start_daemon(root.path(), None, &[]);
    // An idle connection and one that sends its headers a byte at a time.
    let _idle = TcpStream::connect(d.admin).unwrap();
    let admin = d.admin;
    let slow = std::thread::spawn(move || {
        let mut s = TcpStream::connect(admin).unwrap();
        for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\n" {
            if s.write_all(&[*b]).is_err() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..2 {
        let t = Instant::now();
        let (status, _) = get(d.admin, "/healthz");
        assert_eq!(status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    slow.join().unwrap();
}

#[test]
fn header_limits_and_methods() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed");
    let d = start_daemon(root.path(), None, &[]);
    // 1 MB of headers: refused with 431 (or the connection closed), never a hang.
    let mut raw = b"GET /healthz HTTP/1.1\r\nHost: x\r\n".to_vec();
    while raw.len() < 1 << 20 {
        raw.extend_from_slice(
            b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n",
        );
    }
    raw.extend_from_slice(b"\r\n");
    let t = Instant::now();
    match request(d.admin, &raw, Duration::from_secs(10)) {
        Ok((status, text)) => assert!(status == 431 || status == 0, "{status}: {text}"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    assert!(t.elapsed() < Duration::from_secs(8));
    // Headers that never finish: closed after the header timeout.
    let mut s = TcpStream::connect(d.admin).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // Wrong methods.
    for method in ["POST", "PUT", "DELETE"] {
        let raw =
            format!("{method} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        let (status, text) = request(d.admin, raw.as_bytes(), Duration::from_secs(5)).unwrap();
        assert_eq!(status, 405, "{method}: {text}");
        assert!(
            text.to_ascii_lowercase().contains("allow: get, head"),
            "{text}"
        );
    }
    let raw = "HEAD /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(
        request(d.admin, raw.as_bytes(), Duration::from_secs(5))
            .unwrap()
            .0,
        200
    );
    assert_eq!(get(d.admin, "/nope").0, 404);
    // Keep-alive: two requests on one connection.
    let mut s = TcpStream::connect(d.admin).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
}

/// Parses Prometheus text with the Python `prometheus_client` parser; `None` when that is not
/// installed outside CI.
fn parse_with_prometheus_client(text: &str) -> Option<serde_json::Value> {
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = []\n\
        for fam in text_string_to_metric_families(sys.stdin.read()):\n\
        \x20   for s in fam.samples:\n\
        \x20       out.append([s.name, s.labels, s.value])\n\
        print(json.dumps(out))\n";
    let probe = Command::new("python3")
        .args(["-c", "import prometheus_client"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("CI").is_err(),
            "CI must have python3 with prometheus_client (.ci/run installs it)"
        );
        println!("skipped: python3 with prometheus_client is not installed (pip install prometheus_client)");
        return None;
    }
    let mut child = Command::new("python3")
        .args(["-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "prometheus_client rejected the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(serde_json::from_slice(&out.stdout).unwrap())
}

#[test]
fn metrics_parse_with_a_real_prometheus_parser() {
    let root = tempfile::tempdir().unwrap();
    synth(root.path(), "feed");
    synth(root.path(), ODD_NAME);
    let d = start_daemon(root.path(), None, &[]);
    let mut c = Connection::connect(d.addr).unwrap();
    for model in ["feed", ODD_NAME] {
        let r = ScoreRequest {
            model: model.into(),
            items: vec![vec![("item_id".into(), FeatureValue::I64(3))]; 4],
            ..ScoreRequest::default()
        };
        assert_eq!(c.score(&r).unwrap().scores.len(), 4);
    }
    let (status, text) = get(d.admin, "/metrics");
    assert_eq!(status, 200);
    let body = text.split("\r\n\r\n").nth(1).unwrap();
    let Some(samples) = parse_with_prometheus_client(body) else {
        return;
    };
    let samples = samples.as_array().unwrap();
    let find = |name: &str, model: &str| {
        samples
            .iter()
            .find(|s| s[0] == name && s[1].get("model").and_then(|m| m.as_str()) == Some(model))
    };
    for model in ["feed", ODD_NAME] {
        let ok = find("rankd_requests_total", model)
            .unwrap_or_else(|| panic!("no requests of {model:?} in {samples:?}"));
        assert_eq!(ok[2], 1.0);
        assert!(find("rankd_model_loaded", model).is_some());
    }
    let count = samples
        .iter()
        .find(|s| s[0] == "rankd_request_latency_us_count")
        .unwrap();
    assert_eq!(count[2], 2.0);
}

/// The daemon config in deploy/kubernetes/rankd.yaml's ConfigMap parses, and says what the
/// Deployment's ports and probes assume.
#[test]
fn the_kubernetes_daemon_config_is_a_valid_config() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/rankd.yaml");
    let yaml = std::fs::read_to_string(path).unwrap();
    let mut lines = yaml.lines().skip_while(|l| l.trim() != "rankd.toml: |");
    lines.next().expect("the ConfigMap holds rankd.toml");
    let text: Vec<&str> = lines
        .take_while(|l| l.starts_with("    ") || l.trim().is_empty())
        .map(|l| l.get(4..).unwrap_or(""))
        .collect();
    let c = rankd_serving::config::ServerConfig::from_toml(&text.join("\n")).unwrap();
    assert_eq!(c.listen.port(), 7470);
    assert_eq!(c.admin.port(), 7471);
    assert_eq!(c.grpc.map(|a| a.port()), Some(8001));
    assert_eq!(c.http.map(|a| a.port()), Some(8000));
    assert_eq!(c.models, Path::new("/models"));
    assert!(yaml.contains("path: /readyz") && yaml.contains("path: /healthz"));
}
