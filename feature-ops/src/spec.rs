//! The feature spec as written in configs and stored in model files.
//!
//! [`FeatureSpec`] is plain data (serde: TOML configs, JSON in `rankd-tool inspect`). It becomes
//! executable only through [`crate::CompiledSpec::compile`], which checks every rule the docs
//! state and builds the lookup tables.

use serde::{Deserialize, Serialize};

use crate::value::FeatureType;

/// Raw features plus the transforms that turn them into slots.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Seed of the hash `H` used by `pickcat` (out-of-vocabulary buckets) and `combinehash`.
    #[serde(default)]
    pub hash_seed: u64,
    /// The raw features a request may carry, with their declared types.
    #[serde(default)]
    pub features: Vec<RawFeature>,
    /// The slots, in order. A `descartes` slot may only name slots defined before it.
    #[serde(default)]
    pub slots: Vec<SlotSpec>,
}

/// One raw feature: its name and declared type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeature {
    /// Name as it appears in requests and data files.
    pub name: String,
    /// Declared type; a value of another type is an error naming the feature.
    #[serde(rename = "type")]
    pub ty: FeatureType,
}

/// One slot: a name and the transform that fills it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SlotSpec {
    /// Name used by the model architecture (embedding tables, wide part, dense inputs).
    pub name: String,
    /// How the slot is computed.
    #[serde(flatten)]
    pub transform: Transform,
}

/// A transform and all of its parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "transform", rename_all = "snake_case", deny_unknown_fields)]
pub enum Transform {
    /// Bucketize a number: id = number of boundaries `<= x`; missing/NaN gives `k + 1`.
    Piecewise {
        /// Raw numeric feature.
        input: String,
        /// Strictly increasing, finite boundaries.
        boundaries: Vec<f64>,
    },
    /// Vocabulary lookup with hashed out-of-vocabulary buckets.
    Pickcat {
        /// Raw integer or string feature (single or list).
        input: String,
        /// The vocabulary, in id order.
        vocabulary: Vocabulary,
        /// Number of out-of-vocabulary buckets, at least 1.
        oov_buckets: u32,
    },
    /// Exact cross of earlier slots (mixed-radix index, no hashing).
    Descartes {
        /// Names of earlier id slots.
        inputs: Vec<String>,
    },
    /// Hash of raw values, `H(v1, v2, ...) mod buckets`; any input missing gives `buckets`.
    Combinehash {
        /// Raw integer or string features (single or list).
        inputs: Vec<String>,
        /// Number of buckets, at least 1.
        buckets: u32,
    },
    /// One id per value, `H(v) mod buckets` (missing or an empty list: `buckets`): the hashing
    /// recipe for high-cardinality ids; the same ids as `pickcat` with an empty vocabulary.
    Hash {
        /// Raw integer or string feature (single or list).
        input: String,
        /// Number of buckets, at least 1.
        buckets: u32,
    },
    /// One id per string value, `H(its first `length` characters) mod buckets` (the whole
    /// string when shorter; missing or an empty list: `buckets`), e.g. the area of a zip code.
    Prefix {
        /// Raw string feature (single or list).
        input: String,
        /// Characters (Unicode scalar values) kept, at least 1.
        length: u32,
        /// Number of buckets, at least 1.
        buckets: u32,
    },
    /// Dense output `(x - mean) / std`, optionally after `log1p` and clipped to `[-clip, clip]`.
    Normalize {
        /// Raw numeric feature.
        input: String,
        /// Subtracted first.
        #[serde(default)]
        mean: f64,
        /// Divided by; finite and non-zero.
        #[serde(default = "one")]
        std: f64,
        /// Symmetric clip applied last, when set; finite and positive.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        clip: Option<f64>,
        /// Apply `ln(1 + x)` before normalizing.
        #[serde(default)]
        log1p: bool,
    },
}

fn one() -> f64 {
    1.0
}

impl Transform {
    /// The transform's name as written in configs.
    pub fn name(&self) -> &'static str {
        match self {
            Transform::Piecewise { .. } => "piecewise",
            Transform::Pickcat { .. } => "pickcat",
            Transform::Descartes { .. } => "descartes",
            Transform::Combinehash { .. } => "combinehash",
            Transform::Normalize { .. } => "normalize",
            Transform::Hash { .. } => "hash",
            Transform::Prefix { .. } => "prefix",
        }
    }
}

/// A `pickcat` vocabulary: integers or strings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Vocabulary {
    /// Integer values; id = position.
    Int(Vec<i64>),
    /// String values; id = position.
    Str(Vec<String>),
}

impl Vocabulary {
    /// Number of entries.
    pub fn len(&self) -> usize {
        match self {
            Vocabulary::Int(v) => v.len(),
            Vocabulary::Str(v) => v.len(),
        }
    }

    /// True when the vocabulary has no entries (every value is out of vocabulary).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
