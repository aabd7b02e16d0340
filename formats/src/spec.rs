//! The owned description of a model: metadata, feature spec and architecture with references to
//! the weight blobs. The writer takes one; the reader decodes one from the file's FlatBuffer and
//! keeps it beside the memory map. It is small: weights stay in the map, only referenced here.

use rankd_feature_ops::FeatureSpec;
use serde::{Deserialize, Serialize};

/// A run of 4-byte little-endian words in the file: f32 values, or pairs of f16 values (an
/// [`WeightType::F16`] embedding table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRef {
    /// Byte offset from the start of the file; a multiple of 64.
    pub offset: u64,
    /// Number of 4-byte words.
    pub len: u64,
}

/// How an embedding table's values are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightType {
    /// 32-bit IEEE 754 floats.
    #[default]
    F32,
    /// 16-bit IEEE 754 floats (binary16), two per word: half the memory and memory traffic of
    /// the gathers. A file with an F16 table has format version 2.
    F16,
    /// Signed bytes with one f32 scale per row (`value = q * scale`, symmetric: `scale` is the
    /// row's largest magnitude / 127), four per word: a quarter of the memory. Format version 2.
    #[serde(rename = "int8")]
    I8,
}

impl WeightType {
    /// Words (4 bytes) a table of `values` values takes.
    pub fn words(self, values: u64) -> u64 {
        match self {
            WeightType::F32 => values,
            WeightType::F16 => values.div_ceil(2),
            WeightType::I8 => values.div_ceil(4),
        }
    }
}

impl BlobRef {
    /// Byte length.
    pub fn byte_len(&self) -> Option<u64> {
        self.len.checked_mul(4)
    }
}

/// Who made the model, when, and how good it was.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// Model name (the directory name under the model root).
    pub name: String,
    /// Version (the version directory name).
    pub version: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_unix_ms: i64,
    /// The program that wrote the file, e.g. `rankd-train 0.1.0`.
    pub producer: String,
    /// Training and evaluation metrics, e.g. `eval_auc`.
    pub metrics: Vec<(String, f64)>,
    /// Free-form key/values.
    pub properties: Vec<(String, String)>,
}

/// How the ids of a multi-valued slot are pooled into one embedding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// Sum of the rows.
    #[default]
    Sum,
    /// Mean of the rows.
    Mean,
}

/// Activation after a dense layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// max(0, x).
    Relu,
}

/// An embedding table for one id slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingTable {
    /// The id slot that indexes it.
    pub slot: String,
    /// Rows: the slot's `num_ids`.
    pub rows: u64,
    /// Embedding dimension.
    pub dim: u32,
    /// Pooling over the slot's ids.
    pub pooling: Pooling,
    /// `rows * dim` values of `weight_type`, row-major.
    pub weights: BlobRef,
    /// How the values are stored.
    #[serde(default)]
    pub weight_type: WeightType,
    /// [`WeightType::I8`] only: one f32 scale per row.
    #[serde(default)]
    pub scales: Option<BlobRef>,
}

/// The weights of one wide slot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WideSlot {
    /// The id slot.
    pub slot: String,
    /// One f32 per id.
    pub weights: BlobRef,
}

/// The wide (linear) part.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Wide {
    /// The slots with weights.
    pub slots: Vec<WideSlot>,
    /// The bias.
    pub bias: f32,
}

/// One dense layer, `y = act(W x + b)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DenseLayer {
    /// Input width.
    pub in_dim: u32,
    /// Output width.
    pub out_dim: u32,
    /// Activation.
    pub activation: Activation,
    /// `out_dim * in_dim` f32, row-major `[out][in]` (PyTorch `nn.Linear` layout).
    pub weight: BlobRef,
    /// `out_dim` f32.
    pub bias: BlobRef,
}

/// How DCN-v2 cross layers join the deep tower.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CrossStructure {
    /// The deep layers take the last cross layer's output.
    #[default]
    Stacked,
    /// The deep layers take the deep input; the last cross layer's output is weighed into the
    /// logit by [`Cross::output`].
    Parallel,
}

/// One DCN-v2 cross layer: `x_{l+1} = x0 ⊙ (W x_l + b) + x_l` over the deep input `x0`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CrossLayer {
    /// The deep input's width `d`.
    pub dim: u32,
    /// 0: full-rank `W` in [`Self::weight`]; `r > 0`: `W = U Vᵀ` with `U`, `V` in [`Self::u`] and
    /// [`Self::v`].
    pub rank: u32,
    /// Full-rank: `d * d` f32, `[out][in]`.
    pub weight: Option<BlobRef>,
    /// Low-rank: `d * r` f32, `[d][r]`.
    pub u: Option<BlobRef>,
    /// Low-rank: `d * r` f32, `[d][r]`.
    pub v: Option<BlobRef>,
    /// `d` f32.
    pub bias: BlobRef,
}

/// The cross network (DCN-v2, Wang et al. 2021).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Cross {
    /// The layers, first to last.
    pub layers: Vec<CrossLayer>,
    /// How they join the deep tower.
    pub structure: CrossStructure,
    /// [`CrossStructure::Parallel`]: `d` f32 weighing the last layer's output into the logit.
    pub output: Option<BlobRef>,
}

/// One expert of a multi-task model: hidden layers over the deep input, each with ReLU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Expert {
    /// The layers, first to last.
    pub layers: Vec<DenseLayer>,
}

/// One head of a multi-task model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Head {
    /// Its name (the name of its scores in responses).
    pub name: String,
    /// With more than one expert: one output per expert over the deep input, no activation;
    /// the head takes the experts' outputs weighed by their softmax.
    pub gate: Option<DenseLayer>,
    /// Hidden layers with ReLU over the head's input, then one output without activation.
    pub tower: Vec<DenseLayer>,
}

/// Multi-task heads: a shared bottom (one expert) or a multi-gate mixture of experts (MMoE,
/// Ma et al. 2018), and a tower per head.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MultiTask {
    /// The experts (one: a shared bottom).
    pub experts: Vec<Expert>,
    /// The heads; the first is the default.
    pub heads: Vec<Head>,
}

/// The network.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Architecture {
    /// Embedding tables; their pooled outputs start the deep input, in this order.
    pub embeddings: Vec<EmbeddingTable>,
    /// Dense slots appended to the deep input, in this order.
    pub dense_inputs: Vec<String>,
    /// The wide part, if any.
    pub wide: Option<Wide>,
    /// The deep MLP; empty for a wide-only model.
    pub deep: Vec<DenseLayer>,
    /// Whether the FM term is added.
    pub fm: bool,
    /// DCN-v2 cross layers over the deep input, if any.
    #[serde(default)]
    pub cross: Option<Cross>,
    /// Multi-task heads, if any (then `deep` is empty).
    #[serde(default)]
    pub multitask: Option<MultiTask>,
}

impl Architecture {
    /// The kind of model, for display.
    pub fn kind(&self) -> &'static str {
        if let Some(m) = &self.multitask {
            return if m.experts.len() > 1 {
                "mmoe"
            } else {
                "shared_bottom"
            };
        }
        if self.cross.is_some() {
            return "dcn_v2";
        }
        match (self.wide.is_some(), !self.deep.is_empty(), self.fm) {
            (true, true, true) | (false, true, true) => "deepfm",
            (true, true, false) => "wide_and_deep",
            (false, true, false) => "deep",
            (true, false, false) => "wide",
            (true, false, true) => "wide_fm",
            (false, false, true) => "fm",
            (false, false, false) => "empty",
        }
    }

    /// Width of the deep input: embedding dims plus dense slots.
    pub fn deep_input_dim(&self) -> u64 {
        self.embeddings
            .iter()
            .map(|e| u64::from(e.dim))
            .sum::<u64>()
            + self.dense_inputs.len() as u64
    }

    /// Every blob the architecture references, with a name for messages.
    pub fn blobs(&self) -> Vec<(String, BlobRef)> {
        let mut out = Vec::new();
        for e in &self.embeddings {
            out.push((format!("embedding `{}`", e.slot), e.weights));
            if let Some(s) = e.scales {
                out.push((format!("embedding scales `{}`", e.slot), s));
            }
        }
        if let Some(w) = &self.wide {
            for s in &w.slots {
                out.push((format!("wide weights `{}`", s.slot), s.weights));
            }
        }
        for (i, l) in self.deep.iter().enumerate() {
            out.push((format!("deep layer {i} weight"), l.weight));
            out.push((format!("deep layer {i} bias"), l.bias));
        }
        if let Some(c) = &self.cross {
            for (i, l) in c.layers.iter().enumerate() {
                for (what, b) in [("weight", l.weight), ("u", l.u), ("v", l.v)] {
                    if let Some(b) = b {
                        out.push((format!("cross layer {i} {what}"), b));
                    }
                }
                out.push((format!("cross layer {i} bias"), l.bias));
            }
            if let Some(b) = c.output {
                out.push(("cross output".into(), b));
            }
        }
        if let Some(m) = &self.multitask {
            let mut layer = |what: String, l: &DenseLayer| {
                out.push((format!("{what} weight"), l.weight));
                out.push((format!("{what} bias"), l.bias));
            };
            for (k, e) in m.experts.iter().enumerate() {
                for (i, l) in e.layers.iter().enumerate() {
                    layer(format!("expert {k} layer {i}"), l);
                }
            }
            for h in &m.heads {
                if let Some(g) = &h.gate {
                    layer(format!("head `{}` gate", h.name), g);
                }
                for (i, l) in h.tower.iter().enumerate() {
                    layer(format!("head `{}` tower layer {i}", h.name), l);
                }
            }
        }
        out
    }
}

impl ModelSpec {
    /// The format version a file of this spec needs: 4 with multi-task heads, 3 with cross
    /// layers, 2 with an f16 or int8 embedding table, else 1 (so that a reader that would ignore
    /// a part of the model refuses the file instead).
    pub fn format_version(&self) -> u32 {
        if self.architecture.multitask.is_some() {
            4
        } else if self.architecture.cross.is_some() {
            3
        } else if self
            .architecture
            .embeddings
            .iter()
            .any(|e| e.weight_type != WeightType::F32)
        {
            2
        } else {
            1
        }
    }
}

/// Everything a model file says besides the weights themselves.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Metadata.
    pub metadata: Metadata,
    /// The feature spec (raw features and transforms).
    pub features: FeatureSpec,
    /// The network and its blob references.
    pub architecture: Architecture,
}
