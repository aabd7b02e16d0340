//! Shared inputs of the criterion benchmarks under `benches/benches/`.
//!
//! Run them with `cargo bench -p rankd-benches`; CI only compiles them.
#![forbid(unsafe_code)]

/// Zipf-distributed ranks in `0..n` with exponent `s`, drawn by inverse CDF over a table: the
/// shape of real id traffic (a few hot items, a long tail).
#[derive(Debug)]
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
    use rankd_formats::config::{
        write_model, DeepConfig, EmbeddingConfig, ModelConfig, TensorMap, WideConfig,
    };
    use rankd_formats::synth::Rng;
    use rankd_formats::{Metadata, Pooling};

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
        }
    }

    /// Writes the feed model with random weights.
    pub fn write(path: &std::path::Path) -> rankd_formats::Result<()> {
        let config = config();
        let mut rng = Rng::new(17);
        let mut tensors = TensorMap::new();
        for t in config.tensors()? {
            let n = t.numel() as usize;
            let scale = if t.name.starts_with("deep.") && t.name.ends_with("weight") {
                (2.0 / t.shape[1] as f32).sqrt()
            } else {
                0.05
            };
            tensors.insert(t.name, (t.shape, rng.vec(n, scale)));
        }
        let metadata = Metadata {
            name: "feed".into(),
            version: 1,
            producer: "rankd-benches".into(),
            ..Metadata::default()
        };
        write_model(&config, metadata, &tensors, path)?;
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
        let mut zipf = crate::Zipf::new(VOCAB + 50, 1.1, seed);
        let mut ids = crate::Zipf::new(1 << 20, 1.05, seed + 1);
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
