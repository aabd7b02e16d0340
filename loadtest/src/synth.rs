//! Requests synthesized from a model's own feature spec: vocabulary values with Zipf popularity
//! (and a few out-of-vocabulary ones), numbers around the normalizer's mean or across the
//! bucket boundaries, Zipf-distributed ids, lists of a few elements.

use rankd_client::{FeatureValue, ScoreRequest};
use rankd_feature_ops::{FeatureSpec, FeatureType, Transform, Vocabulary};
use rankd_formats::synth::{Rng, Zipf};

/// How one raw feature's values are drawn.
#[derive(Debug, Clone)]
enum Gen {
    Vocab(Vec<String>),
    IntVocab(Vec<i64>),
    Normal { mean: f64, std: f64, log1p: bool },
    Range { lo: f64, hi: f64 },
    Ids,
}

/// A request synthesizer for one model.
#[derive(Debug)]
pub struct Synth {
    features: Vec<(String, FeatureType, Gen, bool)>,
    model: String,
    zipf: Zipf,
    ids: Zipf,
    rng: Rng,
}

/// Whether a feature is request-level by name: `user*` or `u_*`.
pub fn default_user_level(name: &str) -> bool {
    name.starts_with("user") || name.starts_with("u_")
}

impl Synth {
    /// Builds generators from `spec`. `user_level` says which features go at the request level.
    pub fn new(
        model: &str,
        spec: &FeatureSpec,
        user_level: &dyn Fn(&str) -> bool,
        seed: u64,
    ) -> Synth {
        let mut features = Vec::new();
        for f in &spec.features {
            let mut gen = match f.ty {
                FeatureType::Float => Gen::Range { lo: 0.0, hi: 100.0 },
                _ => Gen::Ids,
            };
            for s in &spec.slots {
                match &s.transform {
                    Transform::Pickcat {
                        input, vocabulary, ..
                    } if *input == f.name => {
                        gen = match vocabulary {
                            Vocabulary::Str(v) if !v.is_empty() => Gen::Vocab(v.clone()),
                            Vocabulary::Int(v) if !v.is_empty() => Gen::IntVocab(v.clone()),
                            _ => gen,
                        }
                    }
                    Transform::Normalize {
                        input,
                        mean,
                        std,
                        log1p,
                        ..
                    } if *input == f.name => {
                        gen = Gen::Normal {
                            mean: *mean,
                            std: *std,
                            log1p: *log1p,
                        }
                    }
                    Transform::Piecewise { input, boundaries } if *input == f.name => {
                        if let (Some(a), Some(b)) = (boundaries.first(), boundaries.last()) {
                            let pad = ((b - a) * 0.2).max(1.0);
                            gen = Gen::Range {
                                lo: a - pad,
                                hi: b + pad,
                            };
                        }
                    }
                    _ => {}
                }
            }
            features.push((f.name.clone(), f.ty, gen, user_level(&f.name)));
        }
        Synth {
            features,
            model: model.to_owned(),
            zipf: Zipf::new(2048, 1.1, seed),
            ids: Zipf::new(1 << 20, 1.05, seed + 1),
            rng: Rng::new(seed),
        }
    }

    fn scalar(&mut self, ty: FeatureType, gen: &Gen) -> FeatureValue {
        let r = self.zipf.next_rank();
        let pick_str = |v: &Vec<String>, r: usize| {
            // About 5% out of vocabulary.
            if r % 20 == 19 {
                format!("oov-{r}")
            } else {
                v[r % v.len()].clone()
            }
        };
        match (ty, gen) {
            (FeatureType::String | FeatureType::StringList, Gen::Vocab(v)) => {
                FeatureValue::Str(pick_str(v, r))
            }
            (FeatureType::String | FeatureType::StringList, _) => {
                FeatureValue::Str(format!("v{}", self.ids.next_rank()))
            }
            (FeatureType::Int | FeatureType::IntList, Gen::IntVocab(v)) => {
                FeatureValue::I64(v[r % v.len()])
            }
            (FeatureType::Int | FeatureType::IntList, _) => {
                FeatureValue::I64(self.ids.next_rank() as i64 * 7919)
            }
            (FeatureType::Float, Gen::Normal { mean, std, log1p }) => {
                let z = (0..4)
                    .map(|_| f64::from(self.rng.uniform(1.0)))
                    .sum::<f64>()
                    * 0.87;
                let x = mean + std * z;
                FeatureValue::F64(if *log1p { x.exp_m1().max(0.0) } else { x })
            }
            (FeatureType::Float, Gen::Range { lo, hi }) => {
                FeatureValue::F64(lo + (hi - lo) * (0.5 + f64::from(self.rng.uniform(0.5))))
            }
            (FeatureType::Float, _) => FeatureValue::F64(f64::from(self.rng.uniform(10.0))),
        }
    }

    fn value(&mut self, ty: FeatureType, gen: &Gen) -> FeatureValue {
        match ty {
            FeatureType::IntList => {
                let n = (self.rng.next_u64() % 5) as usize;
                FeatureValue::I64List(
                    (0..n)
                        .map(|_| match self.scalar(ty, gen) {
                            FeatureValue::I64(v) => v,
                            _ => 0,
                        })
                        .collect(),
                )
            }
            FeatureType::StringList => {
                let n = (self.rng.next_u64() % 5) as usize;
                FeatureValue::StrList(
                    (0..n)
                        .map(|_| match self.scalar(ty, gen) {
                            FeatureValue::Str(s) => s,
                            _ => String::new(),
                        })
                        .collect(),
                )
            }
            _ => self.scalar(ty, gen),
        }
    }

    /// One request with `items` items; `key` becomes its routing key.
    pub fn request(&mut self, items: usize, key: u64) -> ScoreRequest {
        let features = self.features.clone();
        let mut req = ScoreRequest {
            model: self.model.clone(),
            routing_key: format!("user-{key}"),
            ..ScoreRequest::default()
        };
        for (name, ty, gen, user) in &features {
            if *user {
                let v = self.value(*ty, gen);
                req.user.push((name.clone(), v));
            }
        }
        for _ in 0..items {
            let mut item = Vec::new();
            for (name, ty, gen, user) in &features {
                if !*user {
                    let v = self.value(*ty, gen);
                    item.push((name.clone(), v));
                }
            }
            req.items.push(item);
        }
        req
    }
}

/// Converts one JSON-lines request (the offline scorer's format) for `model`. With a feature
/// spec, JSON numbers follow the declared type; without one, integers stay integers.
pub fn from_json(
    model: &str,
    line: &str,
    spec: Option<&FeatureSpec>,
) -> Result<ScoreRequest, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let declared = |name: &str| {
        spec.and_then(|s| s.features.iter().find(|f| f.name == name))
            .map(|f| f.ty)
    };
    let conv = |name: &str, v: &serde_json::Value| -> Result<Option<FeatureValue>, String> {
        use serde_json::Value as J;
        Ok(match v {
            J::Null => None,
            J::Number(n) => match (declared(name), n.as_i64()) {
                (Some(FeatureType::Float), _) | (_, None) => {
                    Some(FeatureValue::F64(n.as_f64().unwrap_or(0.0)))
                }
                (_, Some(i)) => Some(FeatureValue::I64(i)),
            },
            J::String(s) => Some(FeatureValue::Str(s.clone())),
            J::Array(a)
                if a.iter().all(|x| x.is_i64())
                    && !(a.is_empty() && declared(name) == Some(FeatureType::StringList)) =>
            {
                Some(FeatureValue::I64List(
                    a.iter().filter_map(|x| x.as_i64()).collect(),
                ))
            }
            J::Array(a) if a.iter().all(|x| x.is_string()) => Some(FeatureValue::StrList(
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect(),
            )),
            _ => return Err(format!("feature `{name}`: unsupported JSON value")),
        })
    };
    let obj = |v: Option<&serde_json::Value>| -> Result<Vec<(String, FeatureValue)>, String> {
        let mut out = Vec::new();
        if let Some(serde_json::Value::Object(m)) = v {
            for (k, x) in m {
                if let Some(fv) = conv(k, x)? {
                    out.push((k.clone(), fv));
                }
            }
        }
        Ok(out)
    };
    let items = v
        .get("items")
        .and_then(|i| i.as_array())
        .ok_or("the request has no `items` array")?;
    Ok(ScoreRequest {
        model: model.to_owned(),
        user: obj(v.get("user"))?,
        items: items
            .iter()
            .map(|i| obj(Some(i)))
            .collect::<Result<_, _>>()?,
        ..ScoreRequest::default()
    })
}
