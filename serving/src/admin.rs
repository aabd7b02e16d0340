//! The HTTP admin port: `/metrics` (Prometheus text), `/healthz`, `/readyz`, `/models` (JSON).
//!
//! hyper's HTTP/1.1 server on a one-thread tokio runtime of its own (the `rankd-admin` thread,
//! off the serving cores): connections are served concurrently, so a slow or idle client never
//! delays a health probe; request headers are bounded in size ([`MAX_HEADER_BYTES`], else 431)
//! and in time ([`HEADER_TIMEOUT`]); at most [`MAX_CONNECTIONS`] connections are open, each for
//! at most [`CONNECTION_LIFETIME`]; methods other than GET and HEAD get 405.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};

use crate::server::Shared;

/// Most bytes of a request's line and headers.
pub const MAX_HEADER_BYTES: usize = 16 << 10;
/// A request's line and headers must arrive within this long.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Most open admin connections; more are closed at once.
pub const MAX_CONNECTIONS: usize = 256;
/// A keep-alive connection is closed after this long, whatever it does.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// The `/models` document.
pub fn models_json(shared: &Shared) -> String {
    let reg = shared.registry();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let models: serde_json::Map<String, serde_json::Value> = reg
        .models
        .iter()
        .map(|(name, e)| {
            let updates = shared.updates.get(name);
            let versions: Vec<serde_json::Value> = e
                .versions
                .iter()
                .map(|(v, m)| {
                    serde_json::json!({
                        "version": v,
                        "state": "serving",
                        "kind": m.file().spec().architecture.kind(),
                        "heads": m.heads(),
                        "mapped_bytes": m.file().mapped_len(),
                        "folded_tables_bytes": m.folded_bytes(),
                        "backend": m.backend(),
                        "backend_note": m.placement_note(),
                        "path": m.file().path().display().to_string(),
                        "updates": updates.as_ref().map(|u| {
                            let s = m.update_stats();
                            let state = u.versions.get(v).cloned().unwrap_or_default();
                            serde_json::json!({
                                "state": if state.waiting.is_some() { "waiting_for_snapshot" } else { "applying" },
                                "reason": state.waiting,
                                "last_sequence": s.sequence,
                                "last_applied_unix_ms": state.applied_ms,
                                "newest_sample_unix_ms": s.newest_sample_ms,
                                "staleness_seconds": crate::updates::staleness_seconds(m, now_ms),
                                "overlay_rows": s.overlay_rows,
                                "overlay_bytes": s.overlay_bytes,
                            })
                        }),
                        "features": m.file().spec().features.features.iter().map(|f| {
                            serde_json::json!({
                                "name": f.name,
                                "type": f.ty.as_str(),
                                "kind": crate::server::wire_kind(f.ty).variant_name().unwrap_or("Missing"),
                            })
                        }).collect::<Vec<_>>(),
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
                    "updates": updates.as_ref().map(|u| serde_json::json!({
                        "topic": u.topic,
                        "connected": u.connected,
                        "last_error": u.last_error,
                        "next_offset": u.next_offset,
                        "applied": u.applied,
                        "refused": u.refused,
                    })),
                }),
            )
        })
        .collect();
    serde_json::json!({ "ready": reg.ready(), "models": models }).to_string()
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    r
}

/// Answers one request.
pub fn route(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let known = matches!(path, "/metrics" | "/healthz" | "/readyz" | "/models");
    if !known {
        return text(StatusCode::NOT_FOUND, "text/plain", "not found\n");
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET and HEAD\n",
        );
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            {
                let reg = shared.registry();
                let mut out = shared
                    .metrics
                    .render(&reg.loaded(), shared.gpus.as_deref().map(|g| g.metrics()));
                shared.updates.render(&reg, &mut out);
                out
            },
        ),
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n"),
        "/readyz" => {
            if shared.registry().ready()
                && !shared.shutdown.load(std::sync::atomic::Ordering::Relaxed)
            {
                text(StatusCode::OK, "text/plain", "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        _ => text(StatusCode::OK, "application/json", models_json(shared)),
    }
}

async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("rankd: admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let r = route(&shared, req.method(), req.uri().path());
                async move { Ok::<_, Infallible>(r) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
            drop(slot);
        });
    }
}

/// Serves the admin port on a background thread. Returns the bound address.
pub fn start(shared: Arc<Shared>) -> std::io::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(shared.config.admin)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()?;
    std::thread::Builder::new()
        .name("rankd-admin".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => serve(l, shared).await,
                    Err(e) => eprintln!("rankd: admin port: {e}"),
                }
            })
        })?;
    Ok(addr)
}
