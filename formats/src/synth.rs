//! Synthetic models with deterministic pseudo-random weights, for tests, benchmarks and the
//! bundled example before a trained one exists. Every model kind can be made, at any size.

use std::path::Path;

use rankd_feature_ops::{
    CompiledSpec, FeatureSpec, FeatureType, RawFeature, SlotSpec, Transform, Vocabulary,
};

use crate::error::Result;
use crate::spec::{
    Activation, Architecture, DenseLayer, EmbeddingTable, Metadata, ModelSpec, Pooling, WeightType,
    Wide, WideSlot,
};
use crate::writer::{ModelWriter, Written};

/// Which parts the model has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelKind {
    /// Logistic regression on the id slots.
    Wide,
    /// MLP over embeddings and dense values.
    Deep,
    /// Both.
    WideDeep,
    /// Wide, deep and the FM term.
    DeepFm,
}

/// How big the large table is and how its bytes are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BigTable {
    /// Random values in every row.
    Dense,
    /// Zeros written as a hole (sparse file) except the last row, which is random. Cheap to write
    /// even at many GiB.
    SparseExceptLastRow,
}

/// Options of [`write_synthetic`].
#[derive(Clone, Debug)]
pub struct SynthOptions {
    /// Model name.
    pub name: String,
    /// Version.
    pub version: u64,
    /// Kind.
    pub kind: ModelKind,
    /// Embedding dimension of every table.
    pub dim: u32,
    /// Hidden layer widths of the MLP (the final 1-wide layer is added).
    pub hidden: Vec<u32>,
    /// Buckets of the hashed `item_id` slot; its embedding table is the big one.
    pub item_buckets: u32,
    /// How the big table is written.
    pub big_table: BigTable,
    /// Seed of the weights.
    pub seed: u64,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            name: "synthetic".into(),
            version: 1,
            kind: ModelKind::WideDeep,
            dim: 8,
            hidden: vec![32, 16],
            item_buckets: 1000,
            big_table: BigTable::Dense,
            seed: 1,
        }
    }
}

/// xorshift64*: small, deterministic, good enough for weights.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator; any seed works.
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The generator's state, to resume it later with [`Rng::from_state`].
    pub fn state(&self) -> u64 {
        self.0
    }

    /// A generator continuing from `state`.
    pub fn from_state(state: u64) -> Self {
        // A running generator's state is never 0 (xorshift's only fixed point).
        Rng(if state == 0 { 1 } else { state })
    }

    /// Next raw value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[-scale, scale)`.
    pub fn uniform(&mut self, scale: f32) -> f32 {
        let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        (unit * 2.0 - 1.0) * scale
    }

    /// `n` values uniform in `[-scale, scale)`.
    pub fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(scale)).collect()
    }
}

/// The feature spec of synthetic models: a user (age, city, hour) and an item (id, tags, price).
pub fn synthetic_features(item_buckets: u32) -> FeatureSpec {
    let f = |name: &str, ty| RawFeature {
        name: name.into(),
        ty,
    };
    let s = |name: &str, transform| SlotSpec {
        name: name.into(),
        transform,
    };
    FeatureSpec {
        hash_seed: 0,
        features: vec![
            f("user_age", FeatureType::Float),
            f("user_city", FeatureType::String),
            f("hour", FeatureType::Int),
            f("item_id", FeatureType::Int),
            f("item_tags", FeatureType::StringList),
            f("item_price", FeatureType::Float),
        ],
        slots: vec![
            s(
                "age_bucket",
                Transform::Piecewise {
                    input: "user_age".into(),
                    boundaries: vec![18.0, 25.0, 35.0, 50.0, 65.0],
                },
            ),
            s(
                "city",
                Transform::Pickcat {
                    input: "user_city".into(),
                    vocabulary: Vocabulary::Str(
                        ["Beijing", "Paris", "Tokyo", "Lagos", "Lima", "Oslo"]
                            .map(String::from)
                            .to_vec(),
                    ),
                    oov_buckets: 4,
                },
            ),
            s(
                "hour",
                Transform::Pickcat {
                    input: "hour".into(),
                    vocabulary: Vocabulary::Int((0..24).collect()),
                    oov_buckets: 1,
                },
            ),
            s(
                "item",
                Transform::Combinehash {
                    inputs: vec!["item_id".into()],
                    buckets: item_buckets,
                },
            ),
            s(
                "tags",
                Transform::Pickcat {
                    input: "item_tags".into(),
                    vocabulary: Vocabulary::Str(
                        ["news", "sport", "music", "film", "food", "tech", "travel"]
                            .map(String::from)
                            .to_vec(),
                    ),
                    oov_buckets: 3,
                },
            ),
            s(
                "age_x_city",
                Transform::Descartes {
                    inputs: vec!["age_bucket".into(), "city".into()],
                },
            ),
            s(
                "age",
                Transform::Normalize {
                    input: "user_age".into(),
                    mean: 38.0,
                    std: 13.0,
                    clip: Some(5.0),
                    log1p: false,
                },
            ),
            s(
                "price",
                Transform::Normalize {
                    input: "item_price".into(),
                    mean: 3.0,
                    std: 1.5,
                    clip: None,
                    log1p: true,
                },
            ),
        ],
    }
}

/// Writes a synthetic model to `path`.
pub fn write_synthetic(path: &Path, opts: &SynthOptions) -> Result<Written> {
    let features = synthetic_features(opts.item_buckets);
    let compiled = CompiledSpec::compile(&features)?;
    let num_ids = |slot: &str| -> u64 {
        let i = compiled.slot_index(slot).expect("synthetic slot exists");
        u64::from(compiled.slots()[i].kind.num_ids().expect("id slot"))
    };
    let id_slots = ["age_bucket", "city", "hour", "item", "tags", "age_x_city"];
    let dense_slots = ["age", "price"];
    let mut rng = Rng::new(opts.seed);
    let mut w = ModelWriter::create(path)?;
    let with_deep = opts.kind != ModelKind::Wide;
    let with_wide = opts.kind != ModelKind::Deep;
    let fm = opts.kind == ModelKind::DeepFm;

    let mut embeddings = Vec::new();
    if with_deep {
        for slot in id_slots {
            let rows = num_ids(slot);
            let n = rows * u64::from(opts.dim);
            let weights = if slot == "item" && opts.big_table == BigTable::SparseExceptLastRow {
                let mut sink = w.blob()?;
                sink.skip_zeros(n - u64::from(opts.dim))?;
                sink.write(&rng.vec(opts.dim as usize, 0.1))?;
                sink.finish()
            } else {
                let mut sink = w.blob()?;
                let mut left = n;
                while left > 0 {
                    let take = left.min(1 << 20);
                    sink.write(&rng.vec(take as usize, 0.1))?;
                    left -= take;
                }
                sink.finish()
            };
            embeddings.push(EmbeddingTable {
                slot: slot.into(),
                rows,
                dim: opts.dim,
                pooling: if slot == "tags" {
                    Pooling::Mean
                } else {
                    Pooling::Sum
                },
                weights,
                weight_type: WeightType::F32,
                scales: None,
            });
        }
    }
    let wide = if with_wide {
        let mut slots = Vec::new();
        for slot in id_slots {
            let weights = w.write_blob(&rng.vec(num_ids(slot) as usize, 0.5))?;
            slots.push(WideSlot {
                slot: slot.into(),
                weights,
            });
        }
        Some(Wide { slots, bias: -0.3 })
    } else {
        None
    };
    let mut deep = Vec::new();
    if with_deep {
        let mut width =
            u32::try_from(embeddings.len()).unwrap_or(0) * opts.dim + dense_slots.len() as u32;
        let widths: Vec<u32> = opts.hidden.iter().copied().chain([1]).collect();
        for (i, &out) in widths.iter().enumerate() {
            let scale = (6.0 / (width + out) as f32).sqrt();
            let weight = w.write_blob(&rng.vec((width * out) as usize, scale))?;
            let bias = w.write_blob(&rng.vec(out as usize, 0.05))?;
            deep.push(DenseLayer {
                in_dim: width,
                out_dim: out,
                activation: if i + 1 == widths.len() {
                    Activation::None
                } else {
                    Activation::Relu
                },
                weight,
                bias,
            });
            width = out;
        }
    }
    let spec = ModelSpec {
        metadata: Metadata {
            name: opts.name.clone(),
            version: opts.version,
            created_unix_ms: 1_767_225_600_000,
            producer: format!("rankd-formats synth {}", env!("CARGO_PKG_VERSION")),
            metrics: vec![],
            properties: vec![
                ("synthetic".into(), "true".into()),
                ("seed".into(), opts.seed.to_string()),
            ],
        },
        features,
        architecture: Architecture {
            embeddings,
            dense_inputs: if with_deep {
                dense_slots.map(String::from).to_vec()
            } else {
                vec![]
            },
            wide,
            deep,
            fm,
            cross: None,
            multitask: None,
        },
    };
    w.finish(&spec)
}

/// Zipf-distributed ranks in `0..n` with exponent `s`, drawn by inverse CDF over a table: the
/// shape of real id traffic (a few hot items, a long tail).
#[derive(Debug, Clone)]
pub struct Zipf {
    cdf: Vec<f64>,
    state: u64,
}

impl Zipf {
    /// A generator over `n` ranks.
    pub fn new(n: usize, s: f64, seed: u64) -> Self {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        for c in &mut cdf {
            *c /= acc;
        }
        Zipf {
            cdf,
            state: seed | 1,
        }
    }

    fn unit(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 11) as f64 / (1u64 << 53) as f64
    }

    /// The next rank.
    pub fn next_rank(&mut self) -> usize {
        let u = self.unit();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }
}

pub mod feed {
    //! The synthetic "feed" benchmark model of the engine issue: 13 numeric and 26 categorical
    //! raw features (a third of them request-level), embeddings of dim 16 on the categorical
    //! slots, deep layers [256, 128, 1], a wide part on the categorical slots.

    use rankd_feature_ops::{FeatureType, RawFeature, SlotSpec, Transform, Value, Vocabulary};

    use super::Rng;
    use crate::config::{
        write_model, DeepConfig, EmbeddingConfig, ModelConfig, TensorMap, WideConfig,
    };
    use crate::{Metadata, Pooling, WeightType};

    /// Numeric features that are request-level.
    pub const USER_NUMERIC: usize = 4;
    /// Categorical features that are request-level.
    pub const USER_CATEGORICAL: usize = 9;
    /// Numeric features in all.
    pub const NUMERIC: usize = 13;
    /// Categorical features in all.
    pub const CATEGORICAL: usize = 26;
    /// Vocabulary size of the odd categorical features (strings); the even ones are hashed ids.
    pub const VOCAB: usize = 1000;
    /// Buckets of the hashed categorical features.
    pub const BUCKETS: u32 = 100_000;

    fn numeric_name(i: usize) -> String {
        if i < USER_NUMERIC {
            format!("u_num{i}")
        } else {
            format!("i_num{i}")
        }
    }

    fn cat_name(i: usize) -> String {
        if i < USER_CATEGORICAL {
            format!("u_cat{i}")
        } else {
            format!("i_cat{i}")
        }
    }

    fn is_vocab(i: usize) -> bool {
        i % 2 == 1
    }

    /// The model config.
    pub fn config() -> ModelConfig {
        config_with(WeightType::F32)
    }

    /// The feed model as a multi-task model: the same features and embeddings, no wide part,
    /// `experts` experts of `layers` (1: a shared bottom), and heads `click`, `like`, `share`...
    /// (the first `heads` of them) with towers `tower`.
    pub fn multitask_config(
        experts: u32,
        layers: &[u32],
        tower: &[u32],
        heads: usize,
    ) -> ModelConfig {
        const NAMES: [&str; 6] = ["click", "like", "share", "dwell", "follow", "hide"];
        let mut config = config();
        config.wide = None;
        if let Some(d) = config.deep.as_mut() {
            d.layers = layers.to_vec();
        }
        config.heads = NAMES[..heads]
            .iter()
            .map(|name| crate::config::HeadConfig {
                name: (*name).into(),
                label: None,
                threshold: None,
                weight: 1.0,
            })
            .collect();
        config.multitask = Some(crate::config::MultiTaskConfig {
            experts,
            tower: tower.to_vec(),
        });
        config
    }

    /// The model config with every embedding table stored as `weight_type`.
    pub fn config_with(weight_type: WeightType) -> ModelConfig {
        let mut features = Vec::new();
        let mut slots = Vec::new();
        for i in 0..NUMERIC {
            features.push(RawFeature {
                name: numeric_name(i),
                ty: FeatureType::Float,
            });
            slots.push(SlotSpec {
                name: format!("n{i}"),
                transform: Transform::Normalize {
                    input: numeric_name(i),
                    mean: 5.0,
                    std: 3.0,
                    clip: Some(5.0),
                    log1p: i % 3 == 0,
                },
            });
        }
        for i in 0..CATEGORICAL {
            let transform = if is_vocab(i) {
                features.push(RawFeature {
                    name: cat_name(i),
                    ty: FeatureType::String,
                });
                Transform::Pickcat {
                    input: cat_name(i),
                    vocabulary: Vocabulary::Str((0..VOCAB).map(|v| format!("c{i}_{v}")).collect()),
                    oov_buckets: 100,
                }
            } else {
                features.push(RawFeature {
                    name: cat_name(i),
                    ty: FeatureType::Int,
                });
                Transform::Combinehash {
                    inputs: vec![cat_name(i)],
                    buckets: BUCKETS,
                }
            };
            slots.push(SlotSpec {
                name: format!("c{i}"),
                transform,
            });
        }
        ModelConfig {
            hash_seed: 0,
            features,
            slots,
            embeddings: (0..CATEGORICAL)
                .map(|i| EmbeddingConfig {
                    slot: format!("c{i}"),
                    dim: 16,
                    pooling: Pooling::Sum,
                    weight_type,
                })
                .collect(),
            wide: Some(WideConfig {
                slots: (0..CATEGORICAL).map(|i| format!("c{i}")).collect(),
            }),
            deep: Some(DeepConfig {
                dense: (0..NUMERIC).map(|i| format!("n{i}")).collect(),
                layers: vec![256, 128, 1],
            }),
            fm: false,
            cross: None,
            heads: vec![],
            multitask: None,
        }
    }

    /// Writes the feed model with random weights.
    pub fn write(path: &std::path::Path) -> crate::Result<()> {
        write_version(path, 1, 17)
    }

    /// Writes the feed model as `version`, with weights drawn from `seed`.
    pub fn write_version(path: &std::path::Path, version: u64, seed: u64) -> crate::Result<()> {
        write_typed(path, version, seed, WeightType::F32)
    }

    /// Like [`write_version`], with every embedding table stored as `weight_type` (the same
    /// draws: an f16 file holds the f32 file's tables rounded to f16).
    pub fn write_typed(
        path: &std::path::Path,
        version: u64,
        seed: u64,
        weight_type: WeightType,
    ) -> crate::Result<()> {
        write_config(path, &config_with(weight_type), version, seed)
    }

    /// Weights for `config` (the feed config or a variant of it: cross layers, other types),
    /// drawn from `seed` in the config's tensor order: dense layers' weights (deep, experts,
    /// gates, towers) uniform in `±sqrt(2 / inputs)`, everything else in `±0.05`.
    pub fn tensors(config: &ModelConfig, seed: u64) -> crate::Result<TensorMap> {
        let mut rng = Rng::new(seed);
        let mut tensors = TensorMap::new();
        for t in config.tensors()? {
            let n = t.numel() as usize;
            let dense = ["deep.", "expert.", "gate.", "tower."]
                .iter()
                .any(|p| t.name.starts_with(p));
            let scale = if dense && t.name.ends_with("weight") {
                (2.0 / t.shape[1] as f32).sqrt()
            } else {
                0.05
            };
            tensors.insert(t.name, (t.shape, rng.vec(n, scale)));
        }
        Ok(tensors)
    }

    /// Writes a model named `feed` of `config` as `version`, with [`tensors`] drawn from
    /// `seed`.
    pub fn write_config(
        path: &std::path::Path,
        config: &ModelConfig,
        version: u64,
        seed: u64,
    ) -> crate::Result<()> {
        let metadata = Metadata {
            name: "feed".into(),
            version,
            producer: format!("rankd-formats synth feed {}", env!("CARGO_PKG_VERSION")),
            ..Metadata::default()
        };
        write_model(config, metadata, &tensors(config, seed)?, path)?;
        Ok(())
    }

    /// Raw values of one synthetic request, in model feature order (numeric, then categorical).
    #[derive(Debug)]
    pub struct Values {
        /// Request-level values.
        pub user: Vec<Cell>,
        /// Item values.
        pub items: Vec<Vec<Cell>>,
    }

    /// One owned raw value.
    #[derive(Debug, Clone)]
    pub enum Cell {
        /// Absent.
        Missing,
        /// A number.
        Num(f64),
        /// An integer id.
        Int(i64),
        /// A string.
        Str(String),
    }

    impl Cell {
        /// The borrowed value.
        pub fn value(&self) -> Value<'_> {
            match self {
                Cell::Missing => Value::Missing,
                Cell::Num(v) => Value::F64(*v),
                Cell::Int(v) => Value::Int(*v),
                Cell::Str(s) => Value::Str(s),
            }
        }
    }

    /// A request of `items` items with Zipf-distributed ids and vocabulary values.
    pub fn request(items: usize, seed: u64) -> Values {
        let mut zipf = super::Zipf::new(VOCAB + 50, 1.1, seed);
        let mut ids = super::Zipf::new(1 << 20, 1.05, seed + 1);
        let mut rng = Rng::new(seed);
        let n = NUMERIC + CATEGORICAL;
        let mut cell = |f: usize| -> Cell {
            if f < NUMERIC {
                Cell::Num(5.0 + f64::from(rng.uniform(4.0)))
            } else {
                let i = f - NUMERIC;
                if is_vocab(i) {
                    Cell::Str(format!("c{i}_{}", zipf.next_rank()))
                } else {
                    Cell::Int(ids.next_rank() as i64 * 2_654_435_761)
                }
            }
        };
        let user_level =
            |f: usize| f < USER_NUMERIC || (NUMERIC..NUMERIC + USER_CATEGORICAL).contains(&f);
        let user = (0..n)
            .map(|f| {
                if user_level(f) {
                    cell(f)
                } else {
                    Cell::Missing
                }
            })
            .collect();
        let items = (0..items)
            .map(|_| {
                (0..n)
                    .map(|f| {
                        if user_level(f) {
                            Cell::Missing
                        } else {
                            cell(f)
                        }
                    })
                    .collect()
            })
            .collect();
        Values { user, items }
    }
}
