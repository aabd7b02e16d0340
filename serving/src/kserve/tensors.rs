//! Open Inference Protocol tensors as an engine [`Request`], and the model's inputs as the
//! protocol describes them. Shared by the gRPC and REST front ends; `docs/kserve.md` is the
//! contract.
//!
//! Each raw feature of the model is an input named after it:
//! - scalar features (`float`, `int`, `string`): shape `[N]` or `[N, 1]`, one value per item;
//! - list features (`int_list`, `string_list`): shape `[N, k]`, `k` values per item, with an
//!   optional companion input `NAME.lengths` (`INT32`/`INT64`, `[N]`) saying how many of the `k`
//!   each item uses (ragged lists); in string lists empty strings are skipped;
//! - a first dimension of 1 while the request has N > 1 items makes the input request-level:
//!   every item sees it unless it carries its own value (it cannot: one input per name);
//! - N is the first dimension shared by the item-level inputs (1 when every input has 1).
//!
//! Missing values: NaN in `FP32`/`FP64` inputs, the empty string in `BYTES` inputs; an input not
//! sent at all is missing for every item. Types: `float` takes `FP64`, `FP32`, `INT64`, `INT32`;
//! `int` takes `INT64`, `INT32`, and `FP64`/`FP32` holding integral values (NaN missing);
//! `string` and `string_list` take `BYTES` (UTF-8); `int_list` takes `INT64`, `INT32`.

use rankd_engine::{FeatureSet, Request};
use rankd_feature_ops::{CompiledSpec, FeatureType, Value};

use crate::protocol::ErrorCode;

/// The values of one input, decoded from any of the protocol's representations.
#[derive(Debug, Clone, PartialEq)]
pub enum Data {
    /// `FP32`/`FP64` (widened).
    F64(Vec<f64>),
    /// `INT32`/`INT64` (widened).
    I64(Vec<i64>),
    /// `BYTES`, each element one string.
    Bytes(Vec<Vec<u8>>),
}

impl Data {
    fn len(&self) -> usize {
        match self {
            Data::F64(v) => v.len(),
            Data::I64(v) => v.len(),
            Data::Bytes(v) => v.len(),
        }
    }
}

/// One decoded input tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Input name.
    pub name: String,
    /// Protocol datatype as sent (`FP64`, `BYTES`, ...).
    pub datatype: String,
    /// Shape as sent.
    pub shape: Vec<i64>,
    /// Values, row-major.
    pub data: Data,
}

/// A protocol error: the binary RPC's error code (mapped to gRPC status codes and HTTP statuses
/// by the front ends) and a message.
pub type Failure = (ErrorCode, String);

fn bad(msg: impl Into<String>) -> Failure {
    (ErrorCode::BadFeature, msg.into())
}

/// Decodes raw little-endian tensor bytes (`raw_input_contents`, the REST binary extension).
pub fn decode_raw(name: &str, datatype: &str, count: usize, raw: &[u8]) -> Result<Data, Failure> {
    let fixed = |width: usize| -> Result<(), Failure> {
        if raw.len() != count * width {
            return Err(bad(format!(
                "input `{name}`: {} bytes of {datatype} data for {count} elements (expected {})",
                raw.len(),
                count * width
            )));
        }
        Ok(())
    };
    Ok(match datatype {
        "FP64" => {
            fixed(8)?;
            Data::F64(
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            )
        }
        "FP32" => {
            fixed(4)?;
            Data::F64(
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64)
                    .collect(),
            )
        }
        "INT64" => {
            fixed(8)?;
            Data::I64(
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            )
        }
        "INT32" => {
            fixed(4)?;
            Data::I64(
                raw.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as i64)
                    .collect(),
            )
        }
        "BYTES" => {
            // Each element: a 4-byte little-endian length, then that many bytes.
            let mut out = Vec::with_capacity(count);
            let mut rest = raw;
            while !rest.is_empty() {
                if rest.len() < 4 {
                    return Err(bad(format!(
                        "input `{name}`: truncated BYTES element length"
                    )));
                }
                let n = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
                rest = &rest[4..];
                if rest.len() < n {
                    return Err(bad(format!(
                        "input `{name}`: BYTES element of {n} bytes with {} left",
                        rest.len()
                    )));
                }
                out.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            if out.len() != count {
                return Err(bad(format!(
                    "input `{name}`: {} BYTES elements for a shape of {count}",
                    out.len()
                )));
            }
            Data::Bytes(out)
        }
        other => {
            return Err(bad(format!(
                "input `{name}`: datatype {other} is not accepted (FP64, FP32, INT64, INT32, BYTES)"
            )))
        }
    })
}

/// Encodes FP32 values as raw little-endian bytes.
pub fn encode_fp32(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() * 4);
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// The number of elements of `shape`, or why it is not a valid shape.
pub fn element_count(name: &str, shape: &[i64]) -> Result<usize, Failure> {
    let mut n: usize = 1;
    for &d in shape {
        if d < 0 {
            return Err(bad(format!(
                "input `{name}`: negative dimension in shape {shape:?}"
            )));
        }
        n = n
            .checked_mul(d as usize)
            .ok_or_else(|| bad(format!("input `{name}`: shape {shape:?} is too large")))?;
    }
    Ok(n)
}

#[derive(Debug)]
enum Col {
    F64(Vec<f64>),
    /// An `int` feature sent as floats (NaN missing).
    IntF64(Vec<f64>),
    I64(Vec<i64>),
    Str(Vec<String>),
    IntList(Vec<Vec<i64>>),
    StrList(Vec<Vec<String>>),
}

#[derive(Debug)]
struct Input {
    feature: usize,
    request_level: bool,
    col: Col,
}

/// A decoded request: one column per input, per item or request-level.
#[derive(Debug)]
pub struct TensorRequest {
    items: usize,
    /// A scalar input came as `[N, 1]` (Triton's batch style): the scores go back as `[N, 1]`.
    pub column_shaped: bool,
    /// By model feature index: position in `inputs`.
    by_feature: Vec<Option<usize>>,
    inputs: Vec<Input>,
}

/// Limits applied while decoding.
#[derive(Debug, Clone, Copy)]
pub struct DecodeLimits {
    /// Most items.
    pub max_items: usize,
    /// Most inputs.
    pub max_features: usize,
}

impl TensorRequest {
    /// Checks `tensors` against the model's features and builds the request.
    pub fn new(
        spec: &CompiledSpec,
        tensors: Vec<Tensor>,
        limits: DecodeLimits,
    ) -> Result<TensorRequest, Failure> {
        let features = spec.features();
        if tensors.len() > limits.max_features {
            return Err((
                ErrorCode::LimitExceeded,
                format!(
                    "{} inputs; the limit is {}",
                    tensors.len(),
                    limits.max_features
                ),
            ));
        }
        // Split off the `.lengths` companions first.
        let mut lengths: Vec<(String, Vec<i64>)> = Vec::new();
        let mut main = Vec::with_capacity(tensors.len());
        for t in tensors {
            if let Some(base) = t.name.strip_suffix(".lengths") {
                let Data::I64(v) = t.data else {
                    return Err(bad(format!("input `{}` must be INT32 or INT64", t.name)));
                };
                if lengths.iter().any(|(n, _)| n == base) {
                    return Err(bad(format!("input `{}` is given twice", t.name)));
                }
                lengths.push((base.to_owned(), v));
            } else {
                main.push(t);
            }
        }
        // Rows of each input and N.
        let mut items = 1usize;
        for t in &main {
            let rows = t.shape.first().copied().unwrap_or(1).max(0) as usize;
            if rows != 1 {
                if items != 1 && items != rows {
                    return Err(bad(format!(
                        "input `{}` has {rows} rows, another input {items}: item inputs must agree",
                        t.name
                    )));
                }
                items = rows;
            }
        }
        if main.is_empty() {
            if let Some((_, v)) = lengths.first() {
                items = v.len();
            }
        }
        if items > limits.max_items {
            return Err((
                ErrorCode::LimitExceeded,
                format!("{items} items; the limit is {}", limits.max_items),
            ));
        }
        let mut column_shaped = false;
        let mut by_feature = vec![None; features.len()];
        let mut inputs = Vec::with_capacity(main.len());
        for t in main {
            let Some(f) = features.iter().position(|x| x.name == t.name) else {
                let names: Vec<&str> = features.iter().map(|x| x.name.as_str()).collect();
                return Err(bad(format!(
                    "unknown input `{}`; the model's inputs are: {}",
                    t.name,
                    names.join(", ")
                )));
            };
            if by_feature[f].is_some() {
                return Err(bad(format!("input `{}` is given twice", t.name)));
            }
            let ty = features[f].ty;
            let count = element_count(&t.name, &t.shape)?;
            if count != t.data.len() {
                return Err(bad(format!(
                    "input `{}`: {} values for shape {:?}",
                    t.name,
                    t.data.len(),
                    t.shape
                )));
            }
            let rows = t.shape.first().copied().unwrap_or(1).max(0) as usize;
            let request_level = rows == 1 && items != 1;
            let list = matches!(ty, FeatureType::IntList | FeatureType::StringList);
            let width = match (list, t.shape.len()) {
                (false, 0 | 1) => 1,
                (false, 2) if t.shape[1] == 1 => {
                    column_shaped = true;
                    1
                }
                (false, _) => {
                    return Err(bad(format!(
                        "input `{}` ({}): shape {:?}; a scalar feature takes [N] or [N, 1]",
                        t.name,
                        ty.as_str(),
                        t.shape
                    )))
                }
                (true, 1) => 1,
                (true, 2) => t.shape[1] as usize,
                (true, _) => {
                    return Err(bad(format!(
                        "input `{}` ({}): shape {:?}; a list feature takes [N, k]",
                        t.name,
                        ty.as_str(),
                        t.shape
                    )))
                }
            };
            let lens = lengths
                .iter()
                .position(|(n, _)| n == &t.name)
                .map(|i| lengths.swap_remove(i).1);
            if let Some(l) = &lens {
                if !list {
                    return Err(bad(format!(
                        "input `{}.lengths`: `{}` is not a list feature",
                        t.name, t.name
                    )));
                }
                if l.len() != rows {
                    return Err(bad(format!(
                        "input `{}.lengths` has {} values for {rows} rows",
                        t.name,
                        l.len()
                    )));
                }
                if let Some(&bad_len) = l.iter().find(|&&x| x < 0 || x as usize > width) {
                    return Err(bad(format!(
                        "input `{}.lengths`: {bad_len} is outside 0..={width}",
                        t.name
                    )));
                }
            }
            let take = |r: usize| lens.as_ref().map_or(width, |l| l[r] as usize);
            let name = &t.name;
            let utf8 = |b: Vec<u8>| {
                String::from_utf8(b)
                    .map_err(|_| bad(format!("input `{name}`: a value is not UTF-8")))
            };
            let col = match (ty, t.data) {
                (FeatureType::Float, Data::F64(v)) => Col::F64(v),
                (FeatureType::Float, Data::I64(v)) => {
                    Col::F64(v.into_iter().map(|x| x as f64).collect())
                }
                (FeatureType::Int, Data::I64(v)) => Col::I64(v),
                (FeatureType::Int, Data::F64(v)) => {
                    // Integral values, NaN for missing: kept as floats, converted on read.
                    if let Some(x) = v.iter().find(|x| {
                        !x.is_nan() && (x.fract() != 0.0 || x.abs() > 9.007_199_254_740_992e15)
                    }) {
                        return Err(bad(format!("input `{name}` (int): {x} is not an integer")));
                    }
                    Col::IntF64(v)
                }
                (FeatureType::String, Data::Bytes(v)) => {
                    Col::Str(v.into_iter().map(utf8).collect::<Result<_, _>>()?)
                }
                (FeatureType::IntList, Data::I64(v)) => Col::IntList(
                    (0..rows)
                        .map(|r| v[r * width..r * width + take(r)].to_vec())
                        .collect(),
                ),
                (FeatureType::StringList, Data::Bytes(v)) => {
                    let mut out = Vec::with_capacity(rows);
                    let mut it = v.into_iter();
                    for r in 0..rows {
                        let mut row = Vec::new();
                        for (j, b) in it.by_ref().take(width).enumerate() {
                            if j < take(r) && !b.is_empty() {
                                row.push(utf8(b)?);
                            }
                        }
                        out.push(row);
                    }
                    Col::StrList(out)
                }
                (ty, _) => {
                    return Err(bad(format!(
                        "input `{name}`: datatype {} for a {} feature (expected {})",
                        t.datatype,
                        ty.as_str(),
                        accepted(ty)
                    )))
                }
            };
            by_feature[f] = Some(inputs.len());
            inputs.push(Input {
                feature: f,
                request_level,
                col,
            });
        }
        if let Some((n, _)) = lengths.first() {
            return Err(bad(format!("input `{n}.lengths` without an input `{n}`")));
        }
        Ok(TensorRequest {
            items,
            column_shaped,
            by_feature,
            inputs,
        })
    }

    fn value<'a>(&self, input: &'a Input, row: usize) -> Value<'a> {
        match &input.col {
            Col::F64(v) => match v[row] {
                x if x.is_nan() => Value::Missing,
                x => Value::F64(x),
            },
            Col::IntF64(v) => match v[row] {
                x if x.is_nan() => Value::Missing,
                x => Value::Int(x as i64),
            },
            Col::I64(v) => Value::Int(v[row]),
            Col::Str(v) => {
                if v[row].is_empty() {
                    Value::Missing
                } else {
                    Value::Str(&v[row])
                }
            }
            Col::IntList(v) => Value::IntList(&v[row]),
            Col::StrList(v) => Value::StrList(&v[row]),
        }
    }
}

/// The datatypes a feature type accepts, for messages.
pub fn accepted(ty: FeatureType) -> &'static str {
    match ty {
        FeatureType::Float => "FP64, FP32, INT64 or INT32",
        FeatureType::Int => "INT64, INT32, or FP64/FP32 with integral values",
        FeatureType::String | FeatureType::StringList => "BYTES",
        FeatureType::IntList => "INT64 or INT32",
    }
}

/// The datatype a feature type is described with in metadata.
pub fn datatype(ty: FeatureType) -> &'static str {
    match ty {
        FeatureType::Float => "FP64",
        FeatureType::Int | FeatureType::IntList => "INT64",
        FeatureType::String | FeatureType::StringList => "BYTES",
    }
}

/// Whether the feature type is a list (shape `[N, k]`).
pub fn is_list(ty: FeatureType) -> bool {
    matches!(ty, FeatureType::IntList | FeatureType::StringList)
}

impl Request for TensorRequest {
    fn user_value(&self, feature: usize) -> Value<'_> {
        match self.by_feature[feature] {
            Some(i) if self.inputs[i].request_level => self.value(&self.inputs[i], 0),
            _ => Value::Missing,
        }
    }

    fn num_items(&self) -> usize {
        self.items
    }

    fn item_value(&self, item: usize, feature: usize) -> Value<'_> {
        match self.by_feature[feature] {
            Some(i) if !self.inputs[i].request_level => self.value(&self.inputs[i], item),
            _ => Value::Missing,
        }
    }

    fn item_features(&self, set: &mut FeatureSet) {
        for input in &self.inputs {
            if !input.request_level {
                set.insert(input.feature);
            }
        }
    }
}
