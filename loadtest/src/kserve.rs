//! The same open-loop load over the Open Inference Protocol (KServe v2): gRPC `ModelInfer` with
//! raw tensors, or REST `POST /v2/models/NAME/infer` with JSON tensors, so that rankd and any
//! other KServe v2 server (MLServer, KServe's model server, Triton) are measured by one tool and
//! one method. Requests are due at fixed intended times whatever the server does; latency counts
//! from the intended time (queueing in the client included, no coordinated omission).
//!
//! gRPC multiplexes every request over `connections` HTTP/2 channels. REST keeps `connections`
//! HTTP/1.1 keep-alive connections, each sending one request at a time (HTTP/1.1 has no usable
//! pipelining): requests due while all are busy wait in the client, and that wait counts.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use rankd_client::{FeatureValue, ScoreRequest};
use rankd_feature_ops::{FeatureSpec, FeatureType};
use rankd_serving::kserve::pb;
use rankd_serving::kserve::pb::grpc_inference_service_client::GrpcInferenceServiceClient;

use crate::{Report, RunOptions};

/// Protocol of a KServe run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// gRPC `ModelInfer` with `raw_input_contents`.
    Grpc,
    /// REST with JSON tensors.
    Rest,
}

/// Requests ready to send.
#[derive(Clone, Debug)]
pub enum Target {
    /// gRPC requests.
    Grpc(Vec<pb::ModelInferRequest>),
    /// REST: path and JSON bodies.
    Rest(String, Vec<Bytes>),
}

/// One input's values as the protocol carries them.
enum Col {
    F64(Vec<f64>),
    I64(Vec<i64>),
    Bytes(Vec<String>),
    IntList(Vec<Vec<i64>>),
    StrList(Vec<Vec<String>>),
}

/// A request's inputs: name, shape, datatype, values (request-level features as `[1]`, item
/// features as `[N]` with NaN / "" for missing, lists as `[N, k]` plus `NAME.lengths`).
fn columns(req: &ScoreRequest, spec: &FeatureSpec) -> Vec<(String, Vec<i64>, &'static str, Col)> {
    let ty = |name: &str| {
        spec.features
            .iter()
            .find(|f| f.name == name)
            .map_or(FeatureType::Float, |f| f.ty)
    };
    let mut out = Vec::new();
    let mut names: Vec<&str> = req
        .items
        .iter()
        .flat_map(|i| i.iter().map(|(n, _)| n.as_str()))
        .collect();
    names.sort_unstable();
    names.dedup();
    let rows: Vec<(String, Vec<Option<&FeatureValue>>)> = names
        .iter()
        .map(|&n| {
            let vals = req
                .items
                .iter()
                .map(|i| i.iter().find(|(k, _)| k == n).map(|(_, v)| v))
                .collect();
            (n.to_owned(), vals)
        })
        .chain(req.user.iter().map(|(n, v)| (n.clone(), vec![Some(v)])))
        .collect();
    for (name, vals) in rows {
        let n = vals.len() as i64;
        let t = ty(&name);
        let num = |v: &Option<&FeatureValue>| match v {
            Some(FeatureValue::F64(x)) => *x,
            Some(FeatureValue::I64(x)) => *x as f64,
            _ => f64::NAN,
        };
        let col = match t {
            FeatureType::Float => (vec![n], "FP64", Col::F64(vals.iter().map(num).collect())),
            FeatureType::Int if vals.iter().all(|v| matches!(v, Some(FeatureValue::I64(_)))) => (
                vec![n],
                "INT64",
                Col::I64(vals.iter().map(|v| num(v) as i64).collect()),
            ),
            FeatureType::Int => (vec![n], "FP64", Col::F64(vals.iter().map(num).collect())),
            FeatureType::String => (
                vec![n],
                "BYTES",
                Col::Bytes(
                    vals.iter()
                        .map(|v| match v {
                            Some(FeatureValue::Str(s)) => s.clone(),
                            _ => String::new(),
                        })
                        .collect(),
                ),
            ),
            FeatureType::IntList => {
                let lists: Vec<Vec<i64>> = vals
                    .iter()
                    .map(|v| match v {
                        Some(FeatureValue::I64List(l)) => l.clone(),
                        _ => Vec::new(),
                    })
                    .collect();
                let k = lists.iter().map(Vec::len).max().unwrap_or(0) as i64;
                (vec![n, k], "INT64", Col::IntList(lists))
            }
            FeatureType::StringList => {
                let lists: Vec<Vec<String>> = vals
                    .iter()
                    .map(|v| match v {
                        Some(FeatureValue::StrList(l)) => l.clone(),
                        _ => Vec::new(),
                    })
                    .collect();
                let k = lists.iter().map(Vec::len).max().unwrap_or(0) as i64;
                (vec![n, k], "BYTES", Col::StrList(lists))
            }
        };
        out.push((name, col.0, col.1, col.2));
    }
    out
}

/// A gRPC request with raw tensors.
pub fn grpc_request(req: &ScoreRequest, spec: &FeatureSpec) -> pb::ModelInferRequest {
    let mut r = pb::ModelInferRequest {
        model_name: req.model.clone(),
        model_version: if req.version == 0 {
            String::new()
        } else {
            req.version.to_string()
        },
        ..Default::default()
    };
    if !req.routing_key.is_empty() {
        r.parameters.insert(
            "routing_key".into(),
            pb::InferParameter {
                parameter_choice: Some(pb::infer_parameter::ParameterChoice::StringParam(
                    req.routing_key.clone(),
                )),
            },
        );
    }
    let bytes = |out: &mut Vec<u8>, s: &str| {
        out.extend_from_slice(&(s.len() as u32).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    };
    for (name, shape, datatype, col) in columns(req, spec) {
        let mut raw = Vec::new();
        let mut lengths = None;
        match &col {
            Col::F64(v) => v
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            Col::I64(v) => v
                .iter()
                .for_each(|x| raw.extend_from_slice(&x.to_le_bytes())),
            Col::Bytes(v) => v.iter().for_each(|s| bytes(&mut raw, s)),
            Col::IntList(l) => {
                let k = shape[1] as usize;
                for row in l {
                    for j in 0..k {
                        raw.extend_from_slice(&row.get(j).copied().unwrap_or(0).to_le_bytes());
                    }
                }
                lengths = Some(l.iter().map(|r| r.len() as i64).collect::<Vec<_>>());
            }
            Col::StrList(l) => {
                let k = shape[1] as usize;
                for row in l {
                    for j in 0..k {
                        bytes(&mut raw, row.get(j).map_or("", String::as_str));
                    }
                }
            }
        }
        r.inputs.push(pb::model_infer_request::InferInputTensor {
            name: name.clone(),
            datatype: datatype.into(),
            shape: shape.clone(),
            ..Default::default()
        });
        r.raw_input_contents.push(raw);
        if let Some(l) = lengths {
            r.inputs.push(pb::model_infer_request::InferInputTensor {
                name: format!("{name}.lengths"),
                datatype: "INT64".into(),
                shape: vec![shape[0]],
                ..Default::default()
            });
            r.raw_input_contents
                .push(l.iter().flat_map(|x| x.to_le_bytes()).collect());
        }
    }
    r
}

/// A REST body with JSON tensors (NaN as null).
pub fn rest_body(req: &ScoreRequest, spec: &FeatureSpec) -> Bytes {
    use serde_json::{json, Value};
    let num = |x: f64| if x.is_nan() { Value::Null } else { json!(x) };
    let mut inputs = Vec::new();
    for (name, shape, datatype, col) in columns(req, spec) {
        let (data, lengths) = match col {
            Col::F64(v) => (v.into_iter().map(num).collect::<Vec<_>>(), None),
            Col::I64(v) => (v.into_iter().map(|x| json!(x)).collect(), None),
            Col::Bytes(v) => (v.into_iter().map(Value::String).collect(), None),
            Col::IntList(l) => {
                let k = shape[1] as usize;
                let lens: Vec<i64> = l.iter().map(|r| r.len() as i64).collect();
                let d = l
                    .iter()
                    .flat_map(|r| (0..k).map(move |j| json!(r.get(j).copied().unwrap_or(0))))
                    .collect();
                (d, Some(lens))
            }
            Col::StrList(l) => {
                let k = shape[1] as usize;
                let d = l
                    .iter()
                    .flat_map(|r| (0..k).map(move |j| json!(r.get(j).map_or("", String::as_str))))
                    .collect();
                (d, None)
            }
        };
        if let Some(l) = lengths {
            inputs.push(
                json!({"name": format!("{name}.lengths"), "shape": [shape[0]],
                               "datatype": "INT64", "data": l}),
            );
        }
        inputs.push(json!({"name": name, "shape": shape, "datatype": datatype, "data": data}));
    }
    let mut body = json!({ "inputs": inputs });
    if !req.routing_key.is_empty() {
        body["parameters"] = json!({ "routing_key": req.routing_key });
    }
    Bytes::from(body.to_string())
}

/// The REST path of a request.
pub fn rest_path(req: &ScoreRequest) -> String {
    if req.version == 0 {
        format!("/v2/models/{}/infer", req.model)
    } else {
        format!("/v2/models/{}/versions/{}/infer", req.model, req.version)
    }
}

/// The run's counts and its latency histogram (successful answers), filled by the tasks.
#[derive(Default)]
struct Tally {
    counts: crate::Tally,
    latency: Option<Histogram<u64>>,
}

impl Tally {
    fn ok(&mut self, us: u64, version: u64) {
        let _ = self.latency.get_or_insert_with(crate::new_hist).record(us);
        self.counts.ok(version);
    }

    fn error(&mut self, code: String) {
        self.counts.error(code);
    }
}

/// Runs open-loop load against a KServe v2 endpoint at `opts.addr`.
pub fn run(opts: &RunOptions, target: &Target) -> std::io::Result<Report> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let total = (opts.rate * opts.duration).ceil().max(1.0) as usize;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let answered = Arc::new(AtomicU64::new(0));
    let base = Instant::now() + Duration::from_millis(20);
    let conns = opts.connections.max(1);
    let addr = opts.addr;

    // Senders: gRPC channels, or REST connection tasks fed by one queue.
    let grpc: Vec<GrpcInferenceServiceClient<tonic::transport::Channel>> = match target {
        Target::Grpc(_) => rt.block_on(async {
            let mut v = Vec::new();
            for _ in 0..conns {
                let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .map_err(std::io::Error::other)?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .map_err(std::io::Error::other)?;
                v.push(
                    GrpcInferenceServiceClient::new(ch)
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX),
                );
            }
            Ok::<_, std::io::Error>(v)
        })?,
        Target::Rest(..) => Vec::new(),
    };
    let (rest_tx, rest_rx) = tokio::sync::mpsc::unbounded_channel::<(Duration, Bytes)>();
    let rest_rx = Arc::new(tokio::sync::Mutex::new(rest_rx));
    if let Target::Rest(path, _) = target {
        for _ in 0..conns {
            let (rx, tally, answered, path) = (
                rest_rx.clone(),
                tally.clone(),
                answered.clone(),
                path.clone(),
            );
            rt.spawn(async move {
                let mut conn = None;
                loop {
                    let Some((due, body)) = rx.lock().await.recv().await else {
                        return;
                    };
                    if conn.is_none() {
                        conn = rest_connect(addr).await.ok();
                    }
                    let result = match conn.as_mut() {
                        Some(c) => rest_send(c, &path, body).await,
                        None => Err("connect".to_owned()),
                    };
                    let us = (base.elapsed().saturating_sub(due).as_micros() as u64).max(1);
                    answered.fetch_add(1, Ordering::Relaxed);
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match result {
                        Ok(v) => t.ok(us, v),
                        Err(code) => {
                            if code == "connect" || code == "io" {
                                conn = None;
                            }
                            t.error(code)
                        }
                    }
                }
            });
        }
    }

    let mut schedule = crate::Schedule::new(opts);
    let mut sent = 0u64;
    let mut last_report = 0u64;
    for k in 0..total {
        let due = schedule.wait_next(base);
        match target {
            Target::Grpc(reqs) => {
                let mut client = grpc[k % grpc.len()].clone();
                let req = reqs[k % reqs.len()].clone();
                let (tally, answered) = (tally.clone(), answered.clone());
                rt.spawn(async move {
                    let r = client.model_infer(req).await;
                    let us = (base.elapsed().saturating_sub(due).as_micros() as u64).max(1);
                    answered.fetch_add(1, Ordering::Relaxed);
                    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
                    match r {
                        Ok(resp) => {
                            let v = resp.get_ref().model_version.parse().unwrap_or(0);
                            t.ok(us, v)
                        }
                        Err(s) => t.error(format!("grpc_{:?}", s.code()).to_lowercase()),
                    }
                });
            }
            Target::Rest(_, bodies) => {
                let _ = rest_tx.send((due, bodies[k % bodies.len()].clone()));
            }
        }
        sent += 1;
        let secs = base.elapsed().as_secs();
        if opts.progress && secs > last_report {
            last_report = secs;
            let t = tally.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!("t={secs}s sent={sent} ok={}", t.counts.ok);
        }
    }
    drop(rest_tx);
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered.load(Ordering::Relaxed) < sent && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = base.elapsed().as_secs_f64();
    rt.shutdown_timeout(Duration::from_millis(100));
    let t = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    Ok(t.counts.into_report(
        t.latency.unwrap_or_else(crate::new_hist),
        sent,
        answered.load(Ordering::Relaxed),
        elapsed,
        Vec::new(),
    ))
}

type RestConn = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn rest_connect(addr: SocketAddr) -> Result<RestConn, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|_| "connect".to_owned())?;
    let _ = stream.set_nodelay(true);
    let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|_| "connect".to_owned())?;
    tokio::spawn(conn);
    Ok(send)
}

/// Sends one request; the answering version, or an error code (`http_STATUS`, `io`).
async fn rest_send(c: &mut RestConn, path: &str, body: Bytes) -> Result<u64, String> {
    let req = hyper::Request::post(path)
        .header("host", "rankd")
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|_| "request".to_owned())?;
    c.ready().await.map_err(|_| "io".to_owned())?;
    let resp = c.send_request(req).await.map_err(|_| "io".to_owned())?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|_| "io".to_owned())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("http_{}", status.as_u16()));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| "bad_json".to_owned())?;
    Ok(v["model_version"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0))
}
