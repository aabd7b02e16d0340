//! Starting the real `rankd` binary for integration tests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
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

/// A minimal HTTP/1.1 request; returns status and body.
#[allow(dead_code)]
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    try_http(addr, method, path, body).unwrap()
}

/// [`http`], with a connection or read failure as an error (for polling a daemon that may be
/// going away).
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let head_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..head_end]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = out[head_end + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut plain = Vec::new();
        let mut rest = &body[..];
        loop {
            let line_end = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let n =
                usize::from_str_radix(std::str::from_utf8(&rest[..line_end]).unwrap().trim(), 16)
                    .unwrap();
            if n == 0 {
                break;
            }
            plain.extend_from_slice(&rest[line_end + 2..line_end + 2 + n]);
            rest = &rest[line_end + 2 + n + 2..];
        }
        body = plain;
    }
    Ok((status, body))
}

/// The body of `GET path` on `addr`.
#[allow(dead_code)]
pub fn get(addr: SocketAddr, path: &str) -> String {
    let (status, body) = http(addr, "GET", path, b"");
    assert_eq!(status, 200, "GET {path}");
    String::from_utf8(body).unwrap()
}

/// One sample of the daemon's `/metrics` (the line `NAME VALUE`, NAME with its labels).
#[allow(dead_code)]
pub fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = try_http(admin, "GET", "/metrics", b"").ok()?;
    String::from_utf8(body)
        .ok()?
        .lines()
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
