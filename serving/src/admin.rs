//! The HTTP admin port: `/metrics` (Prometheus text), `/healthz`, `/readyz`, `/models` (JSON).
//! A small blocking HTTP/1.1 server on its own thread, off the cores' request path.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::server::Shared;

fn respond(stream: &mut TcpStream, status: &str, content_type: &str, body: &str) {
    let _ = write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

/// The `/models` document.
pub fn models_json(shared: &Shared) -> String {
    let reg = shared.registry();
    let models: serde_json::Map<String, serde_json::Value> = reg
        .models
        .iter()
        .map(|(name, e)| {
            let versions: Vec<serde_json::Value> = e
                .versions
                .iter()
                .map(|(v, m)| {
                    serde_json::json!({
                        "version": v,
                        "state": "serving",
                        "kind": m.file().spec().architecture.kind(),
                        "mapped_bytes": m.file().mapped_len(),
                        "path": m.file().path().display().to_string(),
                    })
                })
                .collect();
            (
                name.clone(),
                serde_json::json!({
                    "versions": versions,
                    "labels": e.labels,
                    "split": e.split.iter().map(|(l, w)| (l.clone(), *w)).collect::<std::collections::BTreeMap<_, _>>(),
                    "default_version": e.route(b""),
                }),
            )
        })
        .collect();
    serde_json::json!({ "ready": reg.ready(), "models": models }).to_string()
}

fn handle(mut stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    {
        let mut reader = BufReader::new(&mut stream);
        if reader.read_line(&mut line).is_err() {
            return;
        }
        // Drain the headers.
        let mut h = String::new();
        while reader.read_line(&mut h).is_ok_and(|n| n > 2) {
            h.clear();
        }
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/");
    match path {
        "/metrics" => {
            let body = shared.metrics.render(&shared.registry());
            respond(&mut stream, "200 OK", "text/plain; version=0.0.4", &body);
        }
        "/healthz" => respond(&mut stream, "200 OK", "text/plain", "ok\n"),
        "/readyz" => {
            if shared.registry().ready()
                && !shared.shutdown.load(std::sync::atomic::Ordering::Relaxed)
            {
                respond(&mut stream, "200 OK", "text/plain", "ready\n");
            } else {
                respond(
                    &mut stream,
                    "503 Service Unavailable",
                    "text/plain",
                    "not ready\n",
                );
            }
        }
        "/models" => respond(
            &mut stream,
            "200 OK",
            "application/json",
            &models_json(shared),
        ),
        _ => respond(&mut stream, "404 Not Found", "text/plain", "not found\n"),
    }
}

/// Serves the admin port on a background thread. Returns the bound address.
pub fn start(shared: Arc<Shared>) -> std::io::Result<std::net::SocketAddr> {
    let listener = TcpListener::bind(shared.config.admin)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("rankd-admin".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                handle(stream, &shared);
            }
        })?;
    Ok(addr)
}
