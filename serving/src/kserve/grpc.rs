//! `inference.GRPCInferenceService` (tonic): health, metadata, inference, and Triton's model
//! configuration and statistics extensions.

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use super::pb::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use super::pb::{self, infer_parameter::ParameterChoice};
use super::tensors::{self, decode_raw, element_count, Data, Failure, Tensor};
use super::{Call, Frontend, EXTENSIONS, SERVER_NAME};
use crate::protocol::ErrorCode;

/// The gRPC status for an error code.
pub fn status(f: Failure) -> Status {
    let (code, msg) = f;
    match code {
        ErrorCode::UnknownModel | ErrorCode::UnknownVersion => Status::not_found(msg),
        ErrorCode::MalformedRequest | ErrorCode::BadFeature => Status::invalid_argument(msg),
        ErrorCode::LimitExceeded => Status::resource_exhausted(msg),
        ErrorCode::DeadlineExceeded => Status::deadline_exceeded(msg),
        ErrorCode::UnsupportedMessage => Status::unimplemented(msg),
        ErrorCode::ShuttingDown => Status::unavailable(msg),
        ErrorCode::Internal => Status::internal(msg),
    }
}

struct Service(Arc<Frontend>);

/// Serves gRPC on `listener` until the daemon stops.
pub async fn serve(
    front: Arc<Frontend>,
    listener: tokio::net::TcpListener,
) -> Result<(), tonic::transport::Error> {
    let limit = front.shared.config.limits.max_frame_bytes as usize;
    let shared = front.shared.clone();
    let svc = GrpcInferenceServiceServer::new(Service(front))
        .max_decoding_message_size(limit)
        .max_encoding_message_size(usize::MAX);
    tonic::transport::Server::builder()
        .add_service(svc)
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            super::shutdown_signal(shared),
        )
        .await
}

fn param_str(p: &std::collections::HashMap<String, pb::InferParameter>, k: &str) -> Option<String> {
    match p.get(k)?.parameter_choice.as_ref()? {
        ParameterChoice::StringParam(s) => Some(s.clone()),
        ParameterChoice::Int64Param(i) => Some(i.to_string()),
        ParameterChoice::BoolParam(b) => Some(b.to_string()),
    }
}

fn param_u64(p: &std::collections::HashMap<String, pb::InferParameter>, k: &str) -> Option<u64> {
    match p.get(k)?.parameter_choice.as_ref()? {
        ParameterChoice::Int64Param(i) => u64::try_from(*i).ok(),
        ParameterChoice::StringParam(s) => s.parse().ok(),
        ParameterChoice::BoolParam(_) => None,
    }
}

/// Decodes a `ModelInferRequest` into a [`Call`].
pub fn decode(req: pb::ModelInferRequest) -> Result<Call, Failure> {
    let raw = !req.raw_input_contents.is_empty();
    if raw && req.raw_input_contents.len() != req.inputs.len() {
        return Err((
            ErrorCode::MalformedRequest,
            format!(
                "{} raw_input_contents for {} inputs",
                req.raw_input_contents.len(),
                req.inputs.len()
            ),
        ));
    }
    let mut raws = req.raw_input_contents.into_iter();
    let mut out = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        let count = element_count(&input.name, &input.shape)?;
        let data = if raw {
            if input.contents.is_some() {
                return Err((
                    ErrorCode::MalformedRequest,
                    format!(
                        "input `{}` has contents although raw_input_contents is used",
                        input.name
                    ),
                ));
            }
            let bytes = raws.next().expect("counts were checked");
            decode_raw(&input.name, &input.datatype, count, &bytes)?
        } else {
            let c = input.contents.unwrap_or_default();
            match input.datatype.as_str() {
                "FP64" => Data::F64(c.fp64_contents),
                "FP32" => Data::F64(c.fp32_contents.into_iter().map(f64::from).collect()),
                "INT64" => Data::I64(c.int64_contents),
                "INT32" => Data::I64(c.int_contents.into_iter().map(i64::from).collect()),
                "BYTES" => Data::Bytes(c.bytes_contents),
                other => {
                    return Err((
                        ErrorCode::BadFeature,
                        format!(
                            "input `{}`: datatype {other} is not accepted (FP64, FP32, INT64, INT32, BYTES)",
                            input.name
                        ),
                    ))
                }
            }
        };
        out.push(Tensor {
            name: input.name,
            datatype: input.datatype,
            shape: input.shape,
            data,
        });
    }
    let outputs = req.outputs.iter().map(|o| o.name.clone()).collect();
    Ok(Call {
        model: req.model_name,
        version: req.model_version,
        id: req.id,
        label: param_str(&req.parameters, "label").unwrap_or_default(),
        routing_key: param_str(&req.parameters, "routing_key").unwrap_or_default(),
        timeout_us: param_u64(&req.parameters, "timeout"),
        tensors: out,
        outputs,
    })
}

/// The metadata of a model version.
pub fn metadata(model: &rankd_engine::Model, versions: &[u64]) -> pb::ModelMetadataResponse {
    pb::ModelMetadataResponse {
        name: model.name().to_owned(),
        versions: versions.iter().map(u64::to_string).collect(),
        platform: SERVER_NAME.into(),
        inputs: model
            .file()
            .spec()
            .features
            .features
            .iter()
            .map(|f| pb::model_metadata_response::TensorMetadata {
                name: f.name.clone(),
                datatype: tensors::datatype(f.ty).into(),
                // Items are the batch dimension, as in the model configuration: [N, 1] for a
                // scalar (plain [N] is accepted too), [N, k] for a list.
                shape: if tensors::is_list(f.ty) {
                    vec![-1, -1]
                } else {
                    vec![-1, 1]
                },
            })
            .collect(),
        outputs: super::output_names(model)
            .into_iter()
            .map(|name| pb::model_metadata_response::TensorMetadata {
                name,
                datatype: "FP32".into(),
                shape: vec![-1, 1],
            })
            .collect(),
    }
}

/// Triton's model configuration of a model version: the items are the batch dimension
/// (`max_batch_size` = the server's `max_items`), each scalar feature has dims `[1]` and each list
/// feature `[-1]`; no dynamic batching across requests on this front end.
pub fn config(model: &rankd_engine::Model, max_items: usize, gpus: bool) -> pb::ModelConfig {
    use pb::DataType;
    let dt = |ty| match tensors::datatype(ty) {
        "FP64" => DataType::TypeFp64,
        "INT64" => DataType::TypeInt64,
        _ => DataType::TypeString,
    };
    pb::ModelConfig {
        name: model.name().to_owned(),
        platform: SERVER_NAME.into(),
        backend: SERVER_NAME.into(),
        max_batch_size: i32::try_from(max_items).unwrap_or(i32::MAX),
        input: model
            .file()
            .spec()
            .features
            .features
            .iter()
            .map(|f| pb::ModelInput {
                name: f.name.clone(),
                data_type: dt(f.ty) as i32,
                dims: if tensors::is_list(f.ty) {
                    vec![-1]
                } else {
                    vec![1]
                },
                allow_ragged_batch: false,
                // Every feature may be left out (missing for every item).
                optional: true,
            })
            .collect(),
        output: super::output_names(model)
            .into_iter()
            .map(|name| pb::ModelOutput {
                name,
                data_type: DataType::TypeFp32 as i32,
                dims: vec![1],
            })
            .collect(),
        instance_group: vec![pb::ModelInstanceGroup {
            name: model.name().to_owned(),
            count: 1,
            gpus: Vec::new(),
            kind: if gpus {
                pb::model_instance_group::Kind::Gpu as i32
            } else {
                pb::model_instance_group::Kind::Cpu as i32
            },
        }],
        dynamic_batching: None,
    }
}

/// Statistics of the loaded versions of `name` (every model when empty), optionally one version.
pub fn statistics(
    front: &Frontend,
    name: &str,
    version: &str,
) -> Result<pb::ModelStatisticsResponse, Failure> {
    let reg = front.shared.registry();
    if !name.is_empty() && !reg.models.contains_key(name) {
        return Err((ErrorCode::UnknownModel, format!("unknown model `{name}`")));
    }
    let want_version = super::parse_version(name, version)?;
    let mut model_stats = Vec::new();
    for (n, e) in &reg.models {
        if !name.is_empty() && n != name {
            continue;
        }
        for &v in e.versions.keys() {
            if want_version != 0 && v != want_version {
                continue;
            }
            let s = front.shared.metrics.execution_stats(n, v);
            let d = |count: u64, ns: u64| Some(pb::StatisticDuration { count, ns });
            model_stats.push(pb::ModelStatistics {
                name: n.clone(),
                version: v.to_string(),
                last_inference: s.last_inference_ms,
                inference_count: s.items,
                execution_count: s.executions,
                inference_stats: Some(pb::InferStatistics {
                    success: d(s.success, s.success_ns),
                    fail: d(s.fail, s.fail_ns),
                    queue: d(s.success, 0),
                    compute_input: d(s.success, 0),
                    compute_infer: d(s.success, s.success_ns),
                    compute_output: d(s.success, 0),
                }),
                batch_stats: Vec::new(),
            });
        }
    }
    if want_version != 0 && model_stats.is_empty() {
        return Err((
            ErrorCode::UnknownVersion,
            format!("model `{name}` has no version {want_version}"),
        ));
    }
    Ok(pb::ModelStatisticsResponse { model_stats })
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    async fn server_live(
        &self,
        _: Request<pb::ServerLiveRequest>,
    ) -> Result<Response<pb::ServerLiveResponse>, Status> {
        Ok(Response::new(pb::ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _: Request<pb::ServerReadyRequest>,
    ) -> Result<Response<pb::ServerReadyResponse>, Status> {
        let ready = self.0.shared.registry().ready()
            && !self
                .0
                .shared
                .shutdown
                .load(std::sync::atomic::Ordering::Relaxed);
        Ok(Response::new(pb::ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        r: Request<pb::ModelReadyRequest>,
    ) -> Result<Response<pb::ModelReadyResponse>, Status> {
        let r = r.into_inner();
        let ready = self.0.model(&r.name, &r.version).is_ok();
        Ok(Response::new(pb::ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _: Request<pb::ServerMetadataRequest>,
    ) -> Result<Response<pb::ServerMetadataResponse>, Status> {
        Ok(Response::new(pb::ServerMetadataResponse {
            name: SERVER_NAME.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: EXTENSIONS.iter().map(|s| s.to_string()).collect(),
        }))
    }

    async fn model_metadata(
        &self,
        r: Request<pb::ModelMetadataRequest>,
    ) -> Result<Response<pb::ModelMetadataResponse>, Status> {
        let r = r.into_inner();
        let (model, _, versions) = self.0.model(&r.name, &r.version).map_err(status)?;
        Ok(Response::new(metadata(&model, &versions)))
    }

    async fn model_infer(
        &self,
        r: Request<pb::ModelInferRequest>,
    ) -> Result<Response<pb::ModelInferResponse>, Status> {
        let received = Instant::now();
        let call = decode(r.into_inner()).map_err(|f| {
            self.0.shared.metrics.count("", 0, f.0.as_str(), 1);
            status(f)
        })?;
        let a = self.0.infer(call, received).map_err(status)?;
        let raw = a
            .outputs
            .iter()
            .map(|(_, v)| tensors::encode_fp32(v))
            .collect();
        Ok(Response::new(pb::ModelInferResponse {
            model_name: a.model,
            model_version: a.version.to_string(),
            id: a.id,
            parameters: Default::default(),
            outputs: a
                .outputs
                .into_iter()
                .map(|(name, _)| pb::model_infer_response::InferOutputTensor {
                    name,
                    datatype: "FP32".into(),
                    shape: a.shape.clone(),
                    parameters: Default::default(),
                    contents: None,
                })
                .collect(),
            raw_output_contents: raw,
        }))
    }

    async fn model_config(
        &self,
        r: Request<pb::ModelConfigRequest>,
    ) -> Result<Response<pb::ModelConfigResponse>, Status> {
        let r = r.into_inner();
        let (model, _, _) = self.0.model(&r.name, &r.version).map_err(status)?;
        let max = self.0.shared.config.limits.max_items;
        Ok(Response::new(pb::ModelConfigResponse {
            config: Some(config(&model, max, model.backend() != "cpu")),
        }))
    }

    async fn model_statistics(
        &self,
        r: Request<pb::ModelStatisticsRequest>,
    ) -> Result<Response<pb::ModelStatisticsResponse>, Status> {
        let r = r.into_inner();
        statistics(&self.0, &r.name, &r.version)
            .map(Response::new)
            .map_err(status)
    }
}
