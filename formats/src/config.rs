//! The model config (TOML): raw features, transforms, embeddings, wide, deep and FM, shared by
//! `rankd-tool import` and `rankd-train`. It names the tensors a model needs; [`write_model`]
//! checks a set of tensors against it and writes the model file.
//!
//! ```toml
//! hash_seed = 0
//! [[feature]]
//! name = "age"
//! type = "float"
//! [[slot]]
//! name = "age_bucket"
//! transform = "piecewise"
//! input = "age"
//! boundaries = [25, 35, 50]
//! [[embedding]]
//! slot = "age_bucket"
//! dim = 8
//! [wide]
//! slots = ["age_bucket"]
//! [deep]
//! dense = []
//! layers = [64, 1]
//! ```

use rankd_feature_ops::{CompiledSpec, FeatureSpec, RawFeature, SlotSpec};
use serde::{Deserialize, Serialize};

use crate::error::{FormatError, Result};
use crate::spec::{
    Activation, Architecture, Cross, CrossLayer, CrossStructure, DenseLayer, EmbeddingTable,
    Metadata, ModelSpec, Pooling, WeightType, Wide, WideSlot,
};
use crate::writer::{BlobSink, ModelWriter, Written};

/// An embedding table in the config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingConfig {
    /// The id slot.
    pub slot: String,
    /// Dimension.
    pub dim: u32,
    /// Pooling over the slot's ids.
    #[serde(default)]
    pub pooling: Pooling,
    /// How the table is stored in the model file: `f32` (default), `f16` (half the memory;
    /// values rounded to the nearest f16 as the file is written) or `int8` (a quarter, plus a
    /// scale per row; see [`crate::quantize_row`]).
    #[serde(default)]
    pub weight_type: WeightType,
}

/// The wide part in the config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WideConfig {
    /// Id slots with one weight per id.
    pub slots: Vec<String>,
}

/// The deep part in the config.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeepConfig {
    /// Dense (`normalize`) slots appended to the pooled embeddings.
    #[serde(default)]
    pub dense: Vec<String>,
    /// Layer widths, ending with 1, e.g. `[256, 128, 1]`.
    pub layers: Vec<u32>,
}

/// DCN-v2 cross layers in the config (`[cross]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CrossConfig {
    /// How many cross layers.
    pub layers: u32,
    /// 0 (default): full-rank layers (`d * d` weights each); `r > 0`: `W = U Vᵀ` with `U`, `V`
    /// of `d * r` each.
    #[serde(default)]
    pub rank: u32,
    /// `stacked` (default: the deep layers take the cross network's output) or `parallel` (the
    /// deep layers take the deep input; the cross output is weighed into the logit).
    #[serde(default)]
    pub structure: crate::spec::CrossStructure,
}

/// A model config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Seed of the hash `H`.
    #[serde(default)]
    pub hash_seed: u64,
    /// Raw features.
    #[serde(default, rename = "feature")]
    pub features: Vec<RawFeature>,
    /// Slots.
    #[serde(default, rename = "slot")]
    pub slots: Vec<SlotSpec>,
    /// Embedding tables, in deep-input order.
    #[serde(default, rename = "embedding")]
    pub embeddings: Vec<EmbeddingConfig>,
    /// The wide part.
    #[serde(default)]
    pub wide: Option<WideConfig>,
    /// The deep part.
    #[serde(default)]
    pub deep: Option<DeepConfig>,
    /// The FM term over the pooled embeddings.
    #[serde(default)]
    pub fm: bool,
    /// DCN-v2 cross layers over the deep input (needs `[deep]`).
    #[serde(default)]
    pub cross: Option<CrossConfig>,
}

const KEYS: &[&str] = &[
    "hash_seed",
    "feature",
    "slot",
    "embedding",
    "wide",
    "deep",
    "fm",
    "cross",
];

/// A tensor's name and shape, as import expects them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    /// e.g. `deep.0.weight`.
    pub name: String,
    /// e.g. `[128, 429]`.
    pub shape: Vec<u64>,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// Where tensors come from when a model file is written from a config.
pub trait Tensors {
    /// Shape of tensor `name`, if present.
    fn shape(&self, name: &str) -> Option<Vec<u64>>;
    /// Every tensor name (to report the ones the config does not use).
    fn names(&self) -> Vec<String>;
    /// Streams the values of tensor `name` (row-major f32), in one or more chunks, to `f`.
    fn read(&self, name: &str, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()>;
}

impl ModelConfig {
    /// Parses a config. Top-level keys other than the config's own are an error unless listed
    /// in `extra` (the trainer adds its `[train]` table).
    pub fn from_toml(text: &str, extra: &[&str]) -> Result<ModelConfig> {
        let table: toml::Table =
            toml::from_str(text).map_err(|e| FormatError::Config(e.to_string()))?;
        if let Some(k) = table
            .keys()
            .find(|k| !KEYS.contains(&k.as_str()) && !extra.contains(&k.as_str()))
        {
            return Err(FormatError::Config(format!(
                "unknown top-level key `{k}` (expected one of: {})",
                KEYS.join(", ")
            )));
        }
        let mut table = table;
        table.retain(|k, _| KEYS.contains(&k));
        let config: ModelConfig = toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| FormatError::Config(e.to_string()))?;
        config.tensors()?;
        Ok(config)
    }

    /// The feature spec part.
    pub fn feature_spec(&self) -> FeatureSpec {
        FeatureSpec {
            hash_seed: self.hash_seed,
            features: self.features.clone(),
            slots: self.slots.clone(),
        }
    }

    /// The tensors a model of this config needs, in file order, after checking the config.
    pub fn tensors(&self) -> Result<Vec<TensorSpec>> {
        let compiled = CompiledSpec::compile(&self.feature_spec())?;
        let num_ids = |slot: &str, what: &str| -> Result<u64> {
            let i = compiled.slot_index(slot).ok_or_else(|| {
                FormatError::Config(format!("{what} names slot `{slot}`, which is not defined"))
            })?;
            compiled.slots()[i]
                .kind
                .num_ids()
                .map(u64::from)
                .ok_or_else(|| {
                    FormatError::Config(format!("{what} names dense slot `{slot}`; it needs ids"))
                })
        };
        let mut out = Vec::new();
        for e in &self.embeddings {
            if e.dim == 0 {
                return Err(FormatError::Config(format!(
                    "embedding `{}` has dim 0",
                    e.slot
                )));
            }
            out.push(TensorSpec {
                name: format!("embedding.{}", e.slot),
                shape: vec![num_ids(&e.slot, "an embedding")?, u64::from(e.dim)],
            });
        }
        if let Some(w) = &self.wide {
            for s in &w.slots {
                out.push(TensorSpec {
                    name: format!("wide.{s}"),
                    shape: vec![num_ids(s, "the wide part")?],
                });
            }
            out.push(TensorSpec {
                name: "wide.bias".into(),
                shape: vec![1],
            });
        }
        if let Some(d) = &self.deep {
            if d.layers.last() != Some(&1) {
                return Err(FormatError::Config(
                    "deep.layers must end with 1 (the logit)".into(),
                ));
            }
            let mut width: u64 = self
                .embeddings
                .iter()
                .map(|e| u64::from(e.dim))
                .sum::<u64>()
                + d.dense.len() as u64;
            for (i, &out_dim) in d.layers.iter().enumerate() {
                if out_dim == 0 {
                    return Err(FormatError::Config(format!("deep layer {i} has width 0")));
                }
                out.push(TensorSpec {
                    name: format!("deep.{i}.weight"),
                    shape: vec![u64::from(out_dim), width],
                });
                out.push(TensorSpec {
                    name: format!("deep.{i}.bias"),
                    shape: vec![u64::from(out_dim)],
                });
                width = u64::from(out_dim);
            }
        }
        if let Some(c) = &self.cross {
            let Some(d) = &self.deep else {
                return Err(FormatError::Config(
                    "[cross] needs [deep]: the cross layers work on the deep input".into(),
                ));
            };
            let width: u64 = self
                .embeddings
                .iter()
                .map(|e| u64::from(e.dim))
                .sum::<u64>()
                + d.dense.len() as u64;
            if c.layers == 0 {
                return Err(FormatError::Config(
                    "[cross] layers must be at least 1".into(),
                ));
            }
            if u64::from(c.rank) >= width {
                return Err(FormatError::Config(format!(
                    "[cross] rank {} must be below the deep input's width {width} (0: full rank)",
                    c.rank
                )));
            }
            for i in 0..c.layers {
                if c.rank == 0 {
                    out.push(TensorSpec {
                        name: format!("cross.{i}.weight"),
                        shape: vec![width, width],
                    });
                } else {
                    for part in ["u", "v"] {
                        out.push(TensorSpec {
                            name: format!("cross.{i}.{part}"),
                            shape: vec![width, u64::from(c.rank)],
                        });
                    }
                }
                out.push(TensorSpec {
                    name: format!("cross.{i}.bias"),
                    shape: vec![width],
                });
            }
            if c.structure == crate::spec::CrossStructure::Parallel {
                out.push(TensorSpec {
                    name: "cross.output".into(),
                    shape: vec![width],
                });
            }
        }
        if self.wide.is_none() && self.deep.is_none() && !self.fm {
            return Err(FormatError::Config(
                "the config has neither [wide], [deep] nor fm = true".into(),
            ));
        }
        Ok(out)
    }
}

/// Writes a model file of `config` with weights from `tensors`, after checking that every
/// tensor the config needs is present with the right shape and that no other tensor is.
pub fn write_model(
    config: &ModelConfig,
    metadata: Metadata,
    tensors: &dyn Tensors,
    path: &std::path::Path,
) -> Result<Written> {
    let expected = config.tensors()?;
    for t in &expected {
        match tensors.shape(&t.name) {
            None => {
                return Err(FormatError::Config(format!(
                    "tensor `{}` is missing; expected shape {:?}",
                    t.name, t.shape
                )))
            }
            Some(s) if s != t.shape => {
                return Err(FormatError::Config(format!(
                    "tensor `{}` has shape {s:?}; expected {:?}",
                    t.name, t.shape
                )))
            }
            Some(_) => {}
        }
    }
    let mut names = tensors.names();
    names.sort();
    if let Some(extra) = names
        .iter()
        .find(|n| !expected.iter().any(|t| &t.name == *n))
    {
        return Err(FormatError::Config(format!(
            "tensor `{extra}` is not used by the config"
        )));
    }

    let mut w = ModelWriter::create(path)?;
    let blob = |w: &mut ModelWriter, name: &str| -> Result<crate::spec::BlobRef> {
        let mut sink: BlobSink<'_> = w.blob()?;
        tensors.read(name, &mut |chunk| sink.write(chunk))?;
        Ok(sink.finish())
    };
    let mut embeddings = Vec::new();
    for (e, t) in config.embeddings.iter().zip(&expected) {
        let (weights, scales) = match e.weight_type {
            WeightType::F32 => (blob(&mut w, &t.name)?, None),
            WeightType::F16 => {
                let mut sink = w.blob()?.f16();
                tensors.read(&t.name, &mut |chunk| sink.write(chunk))?;
                (sink.finish()?, None)
            }
            WeightType::I8 => {
                let mut sink = w.blob()?.int8(e.dim as usize);
                tensors.read(&t.name, &mut |chunk| sink.write(chunk))?;
                let (weights, scales) = sink.finish()?;
                (weights, Some(w.write_blob(&scales)?))
            }
        };
        embeddings.push(EmbeddingTable {
            slot: e.slot.clone(),
            rows: t.shape[0],
            dim: e.dim,
            pooling: e.pooling,
            weights,
            weight_type: e.weight_type,
            scales,
        });
    }
    let wide = match &config.wide {
        Some(wc) => {
            let mut slots = Vec::new();
            for s in &wc.slots {
                slots.push(WideSlot {
                    slot: s.clone(),
                    weights: blob(&mut w, &format!("wide.{s}"))?,
                });
            }
            Some(slots)
        }
        None => None,
    };
    let mut deep = Vec::new();
    if let Some(d) = &config.deep {
        for (i, &out_dim) in d.layers.iter().enumerate() {
            let shape = tensors
                .shape(&format!("deep.{i}.weight"))
                .expect("checked above");
            deep.push(DenseLayer {
                in_dim: shape[1] as u32,
                out_dim,
                activation: if i + 1 == d.layers.len() {
                    Activation::None
                } else {
                    Activation::Relu
                },
                weight: blob(&mut w, &format!("deep.{i}.weight"))?,
                bias: blob(&mut w, &format!("deep.{i}.bias"))?,
            });
        }
    }
    let cross = match &config.cross {
        Some(c) => {
            let mut layers = Vec::new();
            for i in 0..c.layers {
                let bias_name = format!("cross.{i}.bias");
                let dim = tensors.shape(&bias_name).expect("checked above")[0] as u32;
                let (weight, u, v) = if c.rank == 0 {
                    (
                        Some(blob(&mut w, &format!("cross.{i}.weight"))?),
                        None,
                        None,
                    )
                } else {
                    (
                        None,
                        Some(blob(&mut w, &format!("cross.{i}.u"))?),
                        Some(blob(&mut w, &format!("cross.{i}.v"))?),
                    )
                };
                layers.push(CrossLayer {
                    dim,
                    rank: c.rank,
                    weight,
                    u,
                    v,
                    bias: blob(&mut w, &bias_name)?,
                });
            }
            let output = match c.structure {
                CrossStructure::Parallel => Some(blob(&mut w, "cross.output")?),
                CrossStructure::Stacked => None,
            };
            Some(Cross {
                layers,
                structure: c.structure,
                output,
            })
        }
        None => None,
    };
    // The wide bias is a scalar in the metadata, not a blob.
    let wide = match wide {
        Some(slots) => {
            let mut bias = 0.0;
            tensors.read("wide.bias", &mut |chunk| {
                if let Some(&b) = chunk.first() {
                    bias = b;
                }
                Ok(())
            })?;
            Some(Wide { slots, bias })
        }
        None => None,
    };
    let spec = ModelSpec {
        metadata,
        features: config.feature_spec(),
        architecture: Architecture {
            embeddings,
            dense_inputs: config
                .deep
                .as_ref()
                .map(|d| d.dense.clone())
                .unwrap_or_default(),
            wide,
            deep,
            fm: config.fm,
            cross,
        },
    };
    w.finish(&spec)
}

/// In-memory tensors by name: `(shape, values)`. What the trainer and benchmarks hand to
/// [`write_model`].
pub type TensorMap = std::collections::BTreeMap<String, (Vec<u64>, Vec<f32>)>;

impl Tensors for TensorMap {
    fn shape(&self, name: &str) -> Option<Vec<u64>> {
        self.get(name).map(|(s, _)| s.clone())
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }

    fn read(&self, name: &str, f: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        let (_, values) = self
            .get(name)
            .ok_or_else(|| FormatError::Config(format!("tensor `{name}` is missing")))?;
        f(values)
    }
}
