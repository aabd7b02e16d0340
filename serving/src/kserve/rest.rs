//! The REST/JSON binding of the Open Inference Protocol (axum), with the binary tensor data
//! extension and Triton's configuration and statistics endpoints.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Map, Value};

use super::grpc;
use super::tensors::{decode_raw, element_count, Data, Failure, Tensor};
use super::{Call, Frontend, EXTENSIONS, SERVER_NAME};
use crate::protocol::ErrorCode;

/// The header giving the JSON part's length when binary tensor data follows it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";

type Front = State<Arc<Frontend>>;

/// Serves REST on `listener` until the daemon stops.
pub async fn serve(front: Arc<Frontend>, listener: tokio::net::TcpListener) -> std::io::Result<()> {
    let limit = front.shared.config.limits.max_frame_bytes as usize;
    let shared = front.shared.clone();
    let app = router(front).layer(DefaultBodyLimit::max(limit));
    axum::serve(listener, app)
        .with_graceful_shutdown(super::shutdown_signal(shared))
        .await
}

/// The routes.
pub fn router(front: Arc<Frontend>) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(version_metadata),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(version_ready),
        )
        .route("/v2/models/{name}/config", get(model_config))
        .route(
            "/v2/models/{name}/versions/{version}/config",
            get(version_config),
        )
        .route("/v2/models/{name}/stats", get(model_stats))
        .route(
            "/v2/models/{name}/versions/{version}/stats",
            get(version_stats),
        )
        .route("/v2/models/{name}/infer", post(model_infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(version_infer),
        )
        .with_state(front)
}

/// The HTTP status for an error code.
pub fn http_status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::UnknownModel | ErrorCode::UnknownVersion => StatusCode::NOT_FOUND,
        ErrorCode::MalformedRequest | ErrorCode::BadFeature => StatusCode::BAD_REQUEST,
        ErrorCode::LimitExceeded => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::UnsupportedMessage => StatusCode::NOT_IMPLEMENTED,
        ErrorCode::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn error(f: Failure) -> Response {
    (http_status(f.0), axum::Json(json!({ "error": f.1 }))).into_response()
}

fn ok_json(v: Value) -> Response {
    axum::Json(v).into_response()
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(f): Front) -> StatusCode {
    if f.shared.registry().ready() && !f.shared.shutdown.load(std::sync::atomic::Ordering::Relaxed)
    {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

async fn server_metadata() -> Response {
    ok_json(json!({
        "name": SERVER_NAME,
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": EXTENSIONS,
    }))
}

fn metadata(f: &Frontend, name: &str, version: &str) -> Response {
    match f.model(name, version) {
        Ok((model, _, versions)) => {
            let m = grpc::metadata(&model, &versions);
            let t = |t: &super::pb::model_metadata_response::TensorMetadata| json!({"name": t.name, "datatype": t.datatype, "shape": t.shape});
            ok_json(json!({
                "name": m.name,
                "versions": m.versions,
                "platform": m.platform,
                "inputs": m.inputs.iter().map(t).collect::<Vec<_>>(),
                "outputs": m.outputs.iter().map(t).collect::<Vec<_>>(),
            }))
        }
        Err(e) => error(e),
    }
}

async fn model_metadata(State(f): Front, Path(name): Path<String>) -> Response {
    metadata(&f, &name, "")
}

async fn version_metadata(State(f): Front, Path((name, v)): Path<(String, String)>) -> Response {
    metadata(&f, &name, &v)
}

fn is_ready(f: &Frontend, name: &str, version: &str) -> StatusCode {
    if f.model(name, version).is_ok() {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

async fn model_ready(State(f): Front, Path(name): Path<String>) -> StatusCode {
    is_ready(&f, &name, "")
}

async fn version_ready(State(f): Front, Path((name, v)): Path<(String, String)>) -> StatusCode {
    is_ready(&f, &name, &v)
}

fn config(f: &Frontend, name: &str, version: &str) -> Response {
    match f.model(name, version) {
        Ok((model, _, _)) => {
            let c = grpc::config(
                &model,
                f.shared.config.limits.max_items,
                model.backend() != "cpu",
            );
            let dt = |d: i32| {
                super::pb::DataType::try_from(d)
                    .map(|d| d.as_str_name())
                    .unwrap_or("TYPE_INVALID")
            };
            ok_json(json!({
                "name": c.name,
                "platform": c.platform,
                "backend": c.backend,
                "max_batch_size": c.max_batch_size,
                "input": c.input.iter().map(|i| json!({
                    "name": i.name, "data_type": dt(i.data_type), "dims": i.dims,
                    "optional": i.optional,
                })).collect::<Vec<_>>(),
                "output": c.output.iter().map(|o| json!({
                    "name": o.name, "data_type": dt(o.data_type), "dims": o.dims,
                })).collect::<Vec<_>>(),
                "instance_group": c.instance_group.iter().map(|g| json!({
                    "name": g.name, "count": g.count,
                    "kind": super::pb::model_instance_group::Kind::try_from(g.kind)
                        .map(|k| k.as_str_name()).unwrap_or("KIND_AUTO"),
                })).collect::<Vec<_>>(),
            }))
        }
        Err(e) => error(e),
    }
}

async fn model_config(State(f): Front, Path(name): Path<String>) -> Response {
    config(&f, &name, "")
}

async fn version_config(State(f): Front, Path((name, v)): Path<(String, String)>) -> Response {
    config(&f, &name, &v)
}

fn stats(f: &Frontend, name: &str, version: &str) -> Response {
    match grpc::statistics(f, name, version) {
        Ok(s) => {
            let d = |d: &Option<super::pb::StatisticDuration>| {
                let d = d.unwrap_or_default();
                json!({"count": d.count, "ns": d.ns})
            };
            ok_json(json!({
                "model_stats": s.model_stats.iter().map(|m| {
                    let i = m.inference_stats.unwrap_or_default();
                    json!({
                        "name": m.name,
                        "version": m.version,
                        "last_inference": m.last_inference,
                        "inference_count": m.inference_count,
                        "execution_count": m.execution_count,
                        "inference_stats": {
                            "success": d(&i.success), "fail": d(&i.fail), "queue": d(&i.queue),
                            "compute_input": d(&i.compute_input),
                            "compute_infer": d(&i.compute_infer),
                            "compute_output": d(&i.compute_output),
                        },
                        "batch_stats": [],
                    })
                }).collect::<Vec<_>>()
            }))
        }
        Err(e) => error(e),
    }
}

async fn all_stats(State(f): Front) -> Response {
    stats(&f, "", "")
}

async fn model_stats(State(f): Front, Path(name): Path<String>) -> Response {
    stats(&f, &name, "")
}

async fn version_stats(State(f): Front, Path((name, v)): Path<(String, String)>) -> Response {
    stats(&f, &name, &v)
}

async fn model_infer(
    State(f): Front,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer(&f, name, String::new(), &headers, &body)
}

async fn version_infer(
    State(f): Front,
    Path((name, v)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    infer(&f, name, v, &headers, &body)
}

fn malformed(msg: impl Into<String>) -> Failure {
    (ErrorCode::MalformedRequest, msg.into())
}

fn param<'a>(params: Option<&'a Value>, key: &str) -> Option<&'a Value> {
    params?.as_object()?.get(key)
}

fn param_string(params: Option<&Value>, key: &str) -> Option<String> {
    match param(params, key)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Flattens nested JSON arrays (row-major), as the protocol allows for `data`.
fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flatten(x, out)),
        other => out.push(other),
    }
}

/// Python's `json` (and so tritonclient) writes the bare tokens `NaN`, `Infinity` and
/// `-Infinity`, which JSON does not have: outside strings, `NaN` becomes `null` (missing) and the
/// infinities strings that the FP inputs read back as infinities.
fn relax_json(body: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let has = |t: &[u8]| body.windows(t.len()).any(|w| w == t);
    if !has(b"NaN") && !has(b"Infinity") {
        return std::borrow::Cow::Borrowed(body);
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    let (mut i, mut in_string) = (0, false);
    while i < body.len() {
        let c = body[i];
        if in_string {
            out.push(c);
            if c == b'\\' && i + 1 < body.len() {
                out.push(body[i + 1]);
                i += 2;
                continue;
            }
            in_string = c != b'"';
            i += 1;
            continue;
        }
        let rest = &body[i..];
        if c == b'"' {
            in_string = true;
            out.push(c);
            i += 1;
        } else if rest.starts_with(b"NaN") {
            out.extend_from_slice(b"null");
            i += 3;
        } else if rest.starts_with(b"-Infinity") {
            out.extend_from_slice(b"\"-Infinity\"");
            i += 9;
        } else if rest.starts_with(b"Infinity") {
            out.extend_from_slice(b"\"Infinity\"");
            i += 8;
        } else {
            out.push(c);
            i += 1;
        }
    }
    std::borrow::Cow::Owned(out)
}

fn json_data(name: &str, datatype: &str, count: usize, data: &Value) -> Result<Data, Failure> {
    let mut flat = Vec::with_capacity(count);
    flatten(data, &mut flat);
    if flat.len() != count {
        return Err((
            ErrorCode::BadFeature,
            format!(
                "input `{name}`: {} values for {count} elements of its shape",
                flat.len()
            ),
        ));
    }
    let wrong = |v: &Value| {
        (
            ErrorCode::BadFeature,
            format!("input `{name}`: {v} is not a {datatype} value"),
        )
    };
    Ok(match datatype {
        "FP64" | "FP32" => Data::F64(
            flat.iter()
                .map(|v| match v {
                    Value::Number(n) => n.as_f64().ok_or_else(|| wrong(v)),
                    // JSON has no NaN: null (or "NaN") marks a missing value.
                    Value::Null => Ok(f64::NAN),
                    Value::String(s) if s == "NaN" || s == "nan" => Ok(f64::NAN),
                    Value::String(s) if s == "Infinity" || s == "inf" => Ok(f64::INFINITY),
                    Value::String(s) if s == "-Infinity" || s == "-inf" => Ok(f64::NEG_INFINITY),
                    _ => Err(wrong(v)),
                })
                .collect::<Result<_, _>>()?,
        ),
        "INT64" | "INT32" => Data::I64(
            flat.iter()
                .map(|v| v.as_i64().ok_or_else(|| wrong(v)))
                .collect::<Result<_, _>>()?,
        ),
        "BYTES" => Data::Bytes(
            flat.iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s.as_bytes().to_vec()),
                    Value::Null => Ok(Vec::new()),
                    _ => Err(wrong(v)),
                })
                .collect::<Result<_, _>>()?,
        ),
        other => {
            return Err((
                ErrorCode::BadFeature,
                format!(
                    "input `{name}`: datatype {other} is not accepted (FP64, FP32, INT64, INT32, BYTES)"
                ),
            ))
        }
    })
}

/// Decodes a REST inference body (JSON, or JSON followed by binary tensor data).
pub fn decode(
    name: String,
    version: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Call, bool), Failure> {
    let json_len = match headers.get(HEADER_LENGTH) {
        Some(h) => {
            let n: usize = h
                .to_str()
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .ok_or_else(|| malformed(format!("{HEADER_LENGTH} is not a number")))?;
            if n > body.len() {
                return Err(malformed(format!(
                    "{HEADER_LENGTH} is {n} but the body has {} bytes",
                    body.len()
                )));
            }
            n
        }
        None => body.len(),
    };
    let (head, mut binary) = body.split_at(json_len);
    let head = relax_json(head);
    let req: Value = serde_json::from_slice(&head)
        .map_err(|e| malformed(format!("the request is not JSON: {e}")))?;
    let params = req.get("parameters");
    let inputs = req
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| malformed("the request has no `inputs` array"))?;
    let mut tensors = Vec::with_capacity(inputs.len());
    for input in inputs {
        let name = input
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed("an input has no `name`"))?
            .to_owned();
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| malformed(format!("input `{name}` has no `datatype`")))?
            .to_owned();
        let shape: Vec<i64> = input
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed(format!("input `{name}` has no `shape`")))?
            .iter()
            .map(|d| {
                d.as_i64().ok_or_else(|| {
                    malformed(format!("input `{name}`: a dimension is not an integer"))
                })
            })
            .collect::<Result<_, _>>()?;
        let count = element_count(&name, &shape)?;
        let data = match param(input.get("parameters"), "binary_data_size").and_then(Value::as_u64)
        {
            Some(n) => {
                let n = n as usize;
                if n > binary.len() {
                    return Err(malformed(format!(
                        "input `{name}`: binary_data_size {n} but {} bytes of binary data are left",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(n);
                binary = rest;
                decode_raw(&name, &datatype, count, mine)?
            }
            None => {
                let data = input.get("data").ok_or_else(|| {
                    malformed(format!("input `{name}` has neither `data` nor binary data"))
                })?;
                json_data(&name, &datatype, count, data)?
            }
        };
        tensors.push(Tensor {
            name,
            datatype,
            shape,
            data,
        });
    }
    if !binary.is_empty() {
        return Err(malformed(format!(
            "{} bytes of binary data no input claims",
            binary.len()
        )));
    }
    let mut binary_out = param(params, "binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let mut asked = Vec::new();
    if let Some(outputs) = req.get("outputs").and_then(Value::as_array) {
        for o in outputs {
            let n = o.get("name").and_then(Value::as_str).unwrap_or_default();
            asked.push(n.to_owned());
            if let Some(b) = param(o.get("parameters"), "binary_data").and_then(Value::as_bool) {
                binary_out = b;
            }
        }
    }
    let call = Call {
        model: name,
        version,
        id: req
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        label: param_string(params, "label").unwrap_or_default(),
        routing_key: param_string(params, "routing_key").unwrap_or_default(),
        timeout_us: param(params, "timeout").and_then(Value::as_u64),
        tensors,
        outputs: asked,
    };
    Ok((call, binary_out))
}

fn infer(
    f: &Frontend,
    name: String,
    version: String,
    headers: &HeaderMap,
    body: &[u8],
) -> Response {
    let received = Instant::now();
    let (call, binary) = match decode(name.clone(), version, headers, body) {
        Ok(c) => c,
        Err(e) => {
            f.shared.metrics.count(&name, 0, e.0.as_str(), 1);
            return error(e);
        }
    };
    let a = match f.infer(call, received) {
        Ok(a) => a,
        Err(e) => return error(e),
    };
    let mut out = Map::new();
    out.insert("model_name".into(), json!(a.model));
    out.insert("model_version".into(), json!(a.version.to_string()));
    if !a.id.is_empty() {
        out.insert("id".into(), json!(a.id));
    }
    let shape = a.shape.clone();
    if binary {
        // Each output's bytes after the JSON, in the order of `outputs`.
        let raw: Vec<Vec<u8>> = a
            .outputs
            .iter()
            .map(|(_, v)| super::tensors::encode_fp32(v))
            .collect();
        let outputs: Vec<Value> = a
            .outputs
            .iter()
            .zip(&raw)
            .map(|((name, _), raw)| {
                json!({ "name": name, "datatype": "FP32", "shape": shape,
                        "parameters": { "binary_data_size": raw.len() } })
            })
            .collect();
        out.insert("outputs".into(), Value::Array(outputs));
        let mut bytes = serde_json::to_vec(&Value::Object(out)).expect("JSON encodes");
        let head = bytes.len();
        for r in &raw {
            bytes.extend_from_slice(r);
        }
        let mut r = (StatusCode::OK, bytes).into_response();
        let h = r.headers_mut();
        h.insert(
            axum::http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        h.insert(HEADER_LENGTH, HeaderValue::from(head));
        r
    } else {
        let outputs: Vec<Value> = a
            .outputs
            .iter()
            .map(|(name, v)| json!({ "name": name, "datatype": "FP32", "shape": shape, "data": v }))
            .collect();
        out.insert("outputs".into(), Value::Array(outputs));
        ok_json(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::relax_json;

    #[test]
    fn python_json_tokens_are_read() {
        let body = br#"{"a": [NaN, 1.5, Infinity, -Infinity], "s": "NaN \" Infinity"}"#;
        let v: serde_json::Value = serde_json::from_slice(&relax_json(body)).unwrap();
        assert_eq!(
            v["a"],
            serde_json::json!([null, 1.5, "Infinity", "-Infinity"])
        );
        assert_eq!(v["s"], "NaN \" Infinity");
        let plain = br#"{"a": [1]}"#;
        assert!(matches!(relax_json(plain), std::borrow::Cow::Borrowed(_)));
    }
}
