//! The Open Inference Protocol (KServe v2) beside the binary RPC: gRPC ([`grpc`], tonic) and
//! REST/JSON ([`rest`], axum), each on its own address, off unless configured (`grpc`, `http`
//! in the config, `--grpc`, `--http`). Both reach the same registry snapshot, version policy,
//! labels, split, limits and engines as the binary RPC; [`tensors`] maps the protocol's tensors to
//! the model's raw features. `docs/kserve.md` is the contract.
//!
//! The front ends run on a tokio runtime of their own (`kserve_threads` workers): the binary
//! RPC's cores are never shared with them. Each worker scores on its own CPU engine, or on the
//! GPUs through a pooled core handle.

pub mod grpc;
pub mod rest;
pub mod tensors;

/// Code generated from `proto/inference.proto` (tonic + prost, compiled by protox in build.rs).
pub mod pb {
    #![allow(
        missing_docs,
        missing_debug_implementations,
        clippy::all,
        clippy::pedantic
    )]
    tonic::include_proto!("inference");
}

use std::cell::RefCell;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rankd_engine::cpu::CpuEngine;
use rankd_engine::gpu::GpuCore;
use rankd_engine::{BatchOutput, EngineError, InferenceBackend, Model};

use crate::protocol::ErrorCode;
use crate::server::Shared;
use tensors::{DecodeLimits, Failure, Tensor, TensorRequest};

/// Server name in the metadata.
pub const SERVER_NAME: &str = "rankd";

/// The protocol extensions rankd implements (ServerMetadata).
pub const EXTENSIONS: [&str; 4] = [
    "model_configuration",
    "statistics",
    "binary_tensor_data",
    "parameters",
];

/// One inference call, whichever front end decoded it.
#[derive(Debug, Default)]
pub struct Call {
    /// Model name.
    pub model: String,
    /// Version as given (empty: by label, split or the newest).
    pub version: String,
    /// The request id, echoed.
    pub id: String,
    /// `parameters.label`.
    pub label: String,
    /// `parameters.routing_key`: the key the traffic split hashes.
    pub routing_key: String,
    /// `parameters.timeout` in microseconds (Triton's request timeout).
    pub timeout_us: Option<u64>,
    /// Inputs.
    pub tensors: Vec<Tensor>,
    /// The outputs asked for by name, in order; empty: the default set (see [`output_names`]).
    pub outputs: Vec<String>,
}

/// A scored call.
#[derive(Debug)]
pub struct Answer {
    /// Model name.
    pub model: String,
    /// The version that scored it.
    pub version: u64,
    /// The request id.
    pub id: String,
    /// The output tensors, by name, one score per item each: `score`, and a multi-task model's
    /// other heads, or those the call asked for.
    pub outputs: Vec<(String, Vec<f32>)>,
    /// The shape of every output: `[N]`, or `[N, 1]` when the scalar inputs came as `[N, 1]`.
    pub shape: Vec<i64>,
}

/// The name of head `h`'s output: `score.HEAD` (`score` is the default head's too).
fn head_output(head: &str) -> String {
    format!("score.{head}")
}

/// The outputs a model has: `score` (a multi-task model's default head), then for a multi-task
/// model `score.HEAD` for every head.
pub fn output_names(model: &Model) -> Vec<String> {
    std::iter::once("score".to_owned())
        .chain(model.heads().into_iter().map(head_output))
        .collect()
}

/// The outputs a call gets: those it asked for, each `score` or `score.HEAD`, or without a list,
/// `score` and every head after the default one. Each as `(name, head index)`.
fn resolve_outputs(model: &Model, asked: &[String]) -> Result<Vec<(String, usize)>, Failure> {
    let heads = model.heads();
    if asked.is_empty() {
        return Ok(std::iter::once(("score".to_owned(), 0))
            .chain(
                heads
                    .iter()
                    .enumerate()
                    .skip(1)
                    .map(|(h, n)| (head_output(n), h)),
            )
            .collect());
    }
    asked
        .iter()
        .map(|name| {
            let h = if name == "score" {
                Some(0)
            } else {
                name.strip_prefix("score.")
                    .and_then(|n| heads.iter().position(|h| *h == n))
            };
            h.map(|h| (name.clone(), h)).ok_or_else(|| {
                (
                    ErrorCode::BadFeature,
                    format!(
                        "unknown output `{name}`; the model's outputs are {}",
                        output_names(model).join(", ")
                    ),
                )
            })
        })
        .collect()
}

thread_local! {
    static CPU: RefCell<CpuEngine> = RefCell::new(CpuEngine::new());
}

/// What the front ends share: the daemon's state and the engines.
#[derive(Debug)]
pub struct Frontend {
    /// The daemon's state.
    pub shared: Arc<Shared>,
    gpu_cores: Mutex<Vec<GpuCore>>,
}

impl Frontend {
    /// A front end over the daemon's state.
    pub fn new(shared: Arc<Shared>) -> Frontend {
        Frontend {
            shared,
            gpu_cores: Mutex::new(Vec::new()),
        }
    }

    fn limits(&self) -> DecodeLimits {
        let l = &self.shared.config.limits;
        DecodeLimits {
            max_items: l.max_items,
            max_features: l.max_features,
        }
    }

    /// Scores `call`, counting it in the metrics and statistics like a binary RPC request.
    pub fn infer(&self, call: Call, received: Instant) -> Result<Answer, Failure> {
        let model_name = call.model.clone();
        let result = self.infer_inner(call, received);
        let m = &self.shared.metrics;
        match &result {
            Ok(a) => {
                m.count(&a.model, a.version, "ok", 1);
                m.latency_us
                    .observe(received.elapsed().as_micros().min(u64::MAX as u128) as u64);
            }
            Err((code, _)) => m.count(&model_name, 0, code.as_str(), 1),
        }
        result
    }

    fn infer_inner(&self, call: Call, received: Instant) -> Result<Answer, Failure> {
        if self.shared.shutdown.load(Ordering::Relaxed) {
            return Err((
                ErrorCode::ShuttingDown,
                "the server is shutting down".into(),
            ));
        }
        let version = parse_version(&call.model, &call.version)?;
        let registry = self.shared.registry();
        let selected = registry.select(
            &call.model,
            version,
            &call.label,
            call.routing_key.as_bytes(),
        )?;
        let outputs = resolve_outputs(&selected.model, &call.outputs)?;
        let req = TensorRequest::new(selected.model.features(), call.tensors, self.limits())?;
        if let Some(t) = call.timeout_us {
            if received.elapsed() > Duration::from_micros(t) {
                return Err((
                    ErrorCode::DeadlineExceeded,
                    "the deadline passed before the request was scored".into(),
                ));
            }
        }
        let start = Instant::now();
        let out = self.score(&selected.model, &req);
        let items = rankd_engine::Request::num_items(&req) as u64;
        let elapsed = start.elapsed();
        let name = selected.model.name().to_owned();
        match out.get(0) {
            Ok(scores) => {
                self.shared
                    .metrics
                    .record_execution(&name, selected.version, 1, 0, items, elapsed);
                let n = scores.len() as i64;
                let outputs = outputs
                    .into_iter()
                    .map(|(name, h)| {
                        let values = match out.head(0, h) {
                            Some(Ok(v)) => v.to_vec(),
                            _ => Vec::new(),
                        };
                        (name, values)
                    })
                    .collect();
                Ok(Answer {
                    model: name,
                    version: selected.version,
                    id: call.id,
                    outputs,
                    shape: if req.column_shaped {
                        vec![n, 1]
                    } else {
                        vec![n]
                    },
                })
            }
            Err(e) => {
                self.shared
                    .metrics
                    .record_execution(&name, selected.version, 0, 1, 0, elapsed);
                let code = match e {
                    EngineError::Device(_) => ErrorCode::Internal,
                    _ => ErrorCode::BadFeature,
                };
                Err((code, e.to_string()))
            }
        }
    }

    fn score(&self, model: &Arc<Model>, req: &TensorRequest) -> BatchOutput {
        let mut out = BatchOutput::default();
        match &self.shared.gpus {
            Some(gpus) => {
                let mut core = self
                    .gpu_cores
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pop()
                    .unwrap_or_else(|| gpus.core());
                // The GPU answers in microseconds to a millisecond: the worker thread waits,
                // and tokio moves its other tasks to the other workers meanwhile.
                tokio::task::block_in_place(|| core.score_blocking(model, &[req], &mut out));
                self.gpu_cores
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(core);
            }
            None => CPU.with(|e| e.borrow_mut().score(model, &[req], &mut out)),
        }
        out
    }

    /// The loaded model `name` at `version` ("" for the version the policy picks).
    pub fn model(&self, name: &str, version: &str) -> Result<(Arc<Model>, u64, Vec<u64>), Failure> {
        let v = parse_version(name, version)?;
        let reg = self.shared.registry();
        let sel = reg.select(name, v, "", b"")?;
        let versions = reg
            .models
            .get(name)
            .map(|e| e.versions.keys().copied().collect())
            .unwrap_or_default();
        Ok((sel.model, sel.version, versions))
    }
}

fn parse_version(model: &str, version: &str) -> Result<u64, Failure> {
    if version.is_empty() {
        return Ok(0);
    }
    match version.parse::<u64>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err((
            ErrorCode::UnknownVersion,
            format!("model `{model}` has no version `{version}` (versions are positive integers)"),
        )),
    }
}

/// Where the front ends listen, once bound.
#[derive(Debug, Clone, Copy, Default)]
pub struct Bound {
    /// gRPC address.
    pub grpc: Option<SocketAddr>,
    /// REST address.
    pub http: Option<SocketAddr>,
}

/// Binds the configured front ends and serves them on a runtime of their own until shutdown.
/// Returns the bound addresses (with the real ports when 0 was asked).
pub fn start(shared: Arc<Shared>) -> std::io::Result<Bound> {
    let c = &shared.config;
    if c.grpc.is_none() && c.http.is_none() {
        return Ok(Bound::default());
    }
    let bind = |a: Option<SocketAddr>| -> std::io::Result<Option<std::net::TcpListener>> {
        a.map(|a| {
            let l = std::net::TcpListener::bind(a)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .transpose()
    };
    let grpc = bind(c.grpc)?;
    let http = bind(c.http)?;
    let bound = Bound {
        grpc: grpc.as_ref().map(|l| l.local_addr()).transpose()?,
        http: http.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let threads = match c.kserve_threads {
        0 => c.worker_threads(),
        n => n,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("rankd-kserve")
        .enable_all()
        .build()?;
    let front = Arc::new(Frontend::new(shared.clone()));
    std::thread::Builder::new()
        .name("rankd-kserve".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                if let Some(l) = grpc {
                    let l = tokio::net::TcpListener::from_std(l).expect("inside the runtime");
                    let f = front.clone();
                    tasks.push(tokio::spawn(async move {
                        grpc::serve(f, l).await.map_err(|e| e.to_string())
                    }));
                }
                if let Some(l) = http {
                    let l = tokio::net::TcpListener::from_std(l).expect("inside the runtime");
                    let f = front.clone();
                    tasks.push(tokio::spawn(async move {
                        rest::serve(f, l).await.map_err(|e| e.to_string())
                    }));
                }
                for t in tasks {
                    if let Ok(Err(e)) = t.await {
                        eprintln!("rankd: KServe front end stopped: {e}");
                    }
                }
            });
        })?;
    Ok(bound)
}

/// Resolves once the daemon is asked to stop.
pub(crate) async fn shutdown_signal(shared: Arc<Shared>) {
    while !shared.shutdown.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
