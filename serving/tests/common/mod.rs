//! Starting the real `rankd` binary for integration tests.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// A running daemon, killed on drop.
pub struct Daemon {
    pub child: Child,
    pub addr: SocketAddr,
    #[allow(dead_code)]
    pub admin: SocketAddr,
    /// KServe v2 gRPC and REST addresses, when `--grpc` / `--http` were given.
    #[allow(dead_code)]
    pub grpc: Option<SocketAddr>,
    #[allow(dead_code)]
    pub http: Option<SocketAddr>,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `rankd` on ephemeral ports over `root`, with an optional config file and extra flags
/// (two worker threads unless `extra` sets `--threads`), and waits until it serves.
pub fn start_daemon(root: &Path, config: Option<&Path>, extra: &[&str]) -> Daemon {
    // RANKD_BIN runs the tests against another build (e.g. an older one, to see a test fail).
    let bin = std::env::var_os("RANKD_BIN").unwrap_or(env!("CARGO_BIN_EXE_rankd").into());
    let mut cmd = Command::new(bin);
    cmd.args(extra);
    if !extra.contains(&"--threads") {
        cmd.args(["--threads", "2"]);
    }
    if let Some(path) = config {
        cmd.args(["--config", path.to_str().unwrap()]);
    }
    if !extra.contains(&"--listen") {
        cmd.args(["--listen", "127.0.0.1:0"]);
    }
    cmd.args(["--models", root.to_str().unwrap()])
        .args(["--admin", "127.0.0.1:0"])
        .stderr(Stdio::piped())
        .stdout(Stdio::null());
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let (mut grpc, mut http) = (None, None);
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("rankd exited before serving:\n{log}");
        };
        log.push_str(&line);
        log.push('\n');
        if let Some(a) = line.strip_prefix("rankd: KServe v2 gRPC on ") {
            grpc = a.trim().parse().ok();
        }
        if let Some(a) = line.strip_prefix("rankd: KServe v2 REST on http://") {
            http = a.trim().parse().ok();
        }
        if let Some(rest) = line.strip_prefix("rankd: serving on ") {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            let admin = line.rsplit("http://").next().unwrap().parse().unwrap();
            // Keep draining stderr so the daemon never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return Daemon {
                child,
                addr,
                admin,
                grpc,
                http,
            };
        }
    }
}

/// One sample of the daemon's `/metrics` (the line `NAME VALUE`, NAME with its labels).
#[allow(dead_code)]
pub fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).ok()?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// A synthetic model of `kind` at `ROOT/<name>/1/model.rkm`.
#[allow(dead_code)]
pub fn synth_model(root: &Path, name: &str, kind: rankd_formats::synth::ModelKind) {
    let dir = root.join(name).join("1");
    std::fs::create_dir_all(&dir).unwrap();
    rankd_formats::synth::write_synthetic(
        &dir.join("model.rkm"),
        &rankd_formats::synth::SynthOptions {
            name: name.into(),
            version: 1,
            kind,
            seed: 1,
            ..rankd_formats::synth::SynthOptions::default()
        },
    )
    .unwrap();
}
