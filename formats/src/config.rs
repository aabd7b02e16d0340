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
    Expert, Head, Metadata, ModelSpec, MultiTask, Pooling, WeightType, Wide, WideSlot,
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

/// One head of a multi-task model (`[[heads]]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadConfig {
    /// The head's name: its tensors' names and the name of its scores in responses.
    pub name: String,
    /// The trainer's label column (default: the head's name). The model file does not keep it.
    #[serde(default)]
    pub label: Option<String>,
    /// The trainer reads a numeric label column as `value > threshold` (without it the column
    /// holds 0 or 1).
    #[serde(default)]
    pub threshold: Option<f64>,
    /// The head's weight in the trainer's loss (default 1).
    #[serde(default = "one")]
    pub weight: f32,
}

fn one() -> f32 {
    1.0
}

/// How the heads of a multi-task model share the network (`[multitask]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MultiTaskConfig {
    /// 1 (default): a shared bottom, `[deep] layers` over the deep input, feeding every head.
    /// `K > 1`: MMoE, K experts of `[deep] layers` each and a softmax gate per head over them.
    #[serde(default = "one_u32")]
    pub experts: u32,
    /// Each head's tower over the bottom's (or the mixture's) output: widths ending with 1,
    /// e.g. `[32, 1]` (default `[1]`: a logistic output on the bottom).
    #[serde(default = "default_tower")]
    pub tower: Vec<u32>,
}

impl Default for MultiTaskConfig {
    fn default() -> Self {
        MultiTaskConfig {
            experts: 1,
            tower: default_tower(),
        }
    }
}

fn one_u32() -> u32 {
    1
}

fn default_tower() -> Vec<u32> {
    vec![1]
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
    /// Multi-task heads; with them `[deep] layers` are the bottom's (or each expert's) hidden
    /// layers.
    #[serde(default)]
    pub heads: Vec<HeadConfig>,
    /// How the heads share the network (default: a shared bottom, `[1]` towers).
    #[serde(default)]
    pub multitask: Option<MultiTaskConfig>,
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
    "heads",
    "multitask",
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
        if !self.heads.is_empty() || self.multitask.is_some() {
            out.extend(self.multitask_tensors()?);
        } else if let Some(d) = &self.deep {
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

    /// The multi-task settings, if the config has heads.
    pub fn multitask(&self) -> Option<MultiTaskConfig> {
        if self.heads.is_empty() {
            return None;
        }
        Some(self.multitask.clone().unwrap_or_default())
    }

    /// The tensors of the experts, gates and towers, after checking the multi-task settings.
    fn multitask_tensors(&self) -> Result<Vec<TensorSpec>> {
        let bad = |m: String| Err(FormatError::Config(m));
        let Some(m) = self.multitask() else {
            return bad("[multitask] needs [[heads]]".into());
        };
        let Some(d) = &self.deep else {
            return bad(
                "[[heads]] needs [deep]: its layers are the shared bottom (or each \
                        expert)"
                    .into(),
            );
        };
        if self.wide.is_some() || self.fm || self.cross.is_some() {
            return bad(
                "[[heads]] take a deep network: a multi-task model has no [wide], fm \
                        or [cross]"
                    .into(),
            );
        }
        if d.layers.is_empty() || d.layers.contains(&0) {
            return bad(
                "[deep] layers of a multi-task model are the bottom's hidden layers: \
                        at least one, none of width 0"
                    .into(),
            );
        }
        if m.experts == 0 || m.experts as usize > crate::validate::MAX_EXPERTS {
            return bad(format!(
                "[multitask] experts = {} (1 to {})",
                m.experts,
                crate::validate::MAX_EXPERTS
            ));
        }
        if m.tower.last() != Some(&1) || m.tower.contains(&0) {
            return bad(
                "[multitask] tower must end with 1 (the head's logit), e.g. [32, 1]".into(),
            );
        }
        if self.heads.len() > crate::validate::MAX_HEADS {
            return bad(format!(
                "{} heads (at most {})",
                self.heads.len(),
                crate::validate::MAX_HEADS
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for h in &self.heads {
            if !crate::validate::valid_head_name(&h.name) {
                return bad(format!(
                    "head name {:?} is not 1 to 64 ASCII letters, digits, `_` or `-`",
                    h.name
                ));
            }
            if !seen.insert(h.name.as_str()) {
                return bad(format!("head `{}` is defined twice", h.name));
            }
            if !(h.weight.is_finite() && h.weight >= 0.0) {
                return bad(format!("head `{}` has weight {}", h.name, h.weight));
            }
        }
        let d_in: u64 = self
            .embeddings
            .iter()
            .map(|e| u64::from(e.dim))
            .sum::<u64>()
            + d.dense.len() as u64;
        let mut out = Vec::new();
        let mut layer = |name: String, inp: u64, o: u32| {
            out.push(TensorSpec {
                name: format!("{name}.weight"),
                shape: vec![u64::from(o), inp],
            });
            out.push(TensorSpec {
                name: format!("{name}.bias"),
                shape: vec![u64::from(o)],
            });
        };
        for k in 0..m.experts {
            let mut width = d_in;
            for (i, &o) in d.layers.iter().enumerate() {
                layer(format!("expert.{k}.{i}"), width, o);
                width = u64::from(o);
            }
        }
        let bottom = u64::from(*d.layers.last().expect("checked non-empty"));
        for h in &self.heads {
            if m.experts > 1 {
                layer(format!("gate.{}", h.name), d_in, m.experts);
            }
            let mut width = bottom;
            for (i, &o) in m.tower.iter().enumerate() {
                layer(format!("tower.{}.{i}", h.name), width, o);
                width = u64::from(o);
            }
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
    let multitask = match config.multitask() {
        Some(m) => Some(write_multitask(config, &m, &mut w, tensors)?),
        None => None,
    };
    if let (Some(d), None) = (&config.deep, &multitask) {
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
            multitask,
        },
    };
    w.finish(&spec)
}

/// Writes the experts, gates and towers of `config` (checked by [`ModelConfig::tensors`]).
fn write_multitask(
    config: &ModelConfig,
    m: &MultiTaskConfig,
    w: &mut ModelWriter,
    tensors: &dyn Tensors,
) -> Result<MultiTask> {
    let mut layer = |name: String, activation: Activation| -> Result<DenseLayer> {
        let shape = tensors
            .shape(&format!("{name}.weight"))
            .expect("checked by write_model");
        let mut blob = |part: &str| -> Result<crate::spec::BlobRef> {
            let mut sink: BlobSink<'_> = w.blob()?;
            tensors.read(&format!("{name}.{part}"), &mut |chunk| sink.write(chunk))?;
            Ok(sink.finish())
        };
        Ok(DenseLayer {
            in_dim: shape[1] as u32,
            out_dim: shape[0] as u32,
            activation,
            weight: blob("weight")?,
            bias: blob("bias")?,
        })
    };
    let layers = config.deep.as_ref().map_or(0, |d| d.layers.len());
    let mut experts = Vec::new();
    for k in 0..m.experts {
        let mut expert = Vec::new();
        for i in 0..layers {
            expert.push(layer(format!("expert.{k}.{i}"), Activation::Relu)?);
        }
        experts.push(Expert { layers: expert });
    }
    let mut heads = Vec::new();
    for h in &config.heads {
        let gate = if m.experts > 1 {
            Some(layer(format!("gate.{}", h.name), Activation::None)?)
        } else {
            None
        };
        let mut tower = Vec::new();
        for i in 0..m.tower.len() {
            let act = if i + 1 == m.tower.len() {
                Activation::None
            } else {
                Activation::Relu
            };
            tower.push(layer(format!("tower.{}.{i}", h.name), act)?);
        }
        heads.push(Head {
            name: h.name.clone(),
            gate,
            tower,
        });
    }
    Ok(MultiTask { experts, heads })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::feed;

    fn error(edit: impl FnOnce(&mut ModelConfig)) -> String {
        let mut c = feed::multitask_config(3, &[32, 16], &[8, 1], 2);
        edit(&mut c);
        c.tensors().unwrap_err().to_string()
    }

    #[test]
    fn multitask_tensors_are_named_per_expert_gate_and_tower() {
        let c = feed::multitask_config(3, &[32, 16], &[8, 1], 2);
        let names: Vec<String> = c.tensors().unwrap().into_iter().map(|t| t.name).collect();
        for want in [
            "expert.0.0.weight",
            "expert.2.1.bias",
            "gate.click.weight",
            "gate.like.bias",
            "tower.click.0.weight",
            "tower.like.1.bias",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
        }
        assert!(!names
            .iter()
            .any(|n| n.starts_with("deep.") || n.starts_with("wide.")));
        // One expert: a shared bottom without gates.
        let c = feed::multitask_config(1, &[32], &[1], 2);
        let names: Vec<String> = c.tensors().unwrap().into_iter().map(|t| t.name).collect();
        assert!(!names.iter().any(|n| n.starts_with("gate.")), "{names:?}");
    }

    #[test]
    fn bad_multitask_settings_are_refused_saying_why() {
        assert!(error(|c| c.fm = true).contains("no [wide], fm"));
        assert!(error(|c| c.multitask.as_mut().unwrap().tower = vec![8]).contains("end with 1"));
        assert!(error(|c| c.multitask.as_mut().unwrap().experts = 0).contains("experts = 0"));
        assert!(error(|c| c.heads[1].name = "click".into()).contains("defined twice"));
        assert!(error(|c| c.heads[1].name = "a b".into()).contains("is not 1 to 64"));
        assert!(error(|c| c.heads[0].weight = f32::NAN).contains("weight"));
        assert!(error(|c| c.heads.clear()).contains("[multitask] needs [[heads]]"));
        assert!(error(|c| c.deep.as_mut().unwrap().layers.clear()).contains("at least one"));
    }
}
