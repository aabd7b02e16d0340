//! Vocabularies and bucket boundaries computed from the training data in a first pass, for the
//! slots listed in `[[train.fit]]`: a `pickcat` slot gets the values of its input seen at least
//! `min_count` times (most frequent first, at most `max_size`), a `piecewise` slot gets the
//! boundaries of `buckets` quantile buckets.

use std::collections::HashMap;

use rankd_feature_ops::{OwnedValue, Transform, Vocabulary};
use rankd_formats::config::ModelConfig;
use serde::Deserialize;

use crate::data::RawData;
use crate::error::{Result, TrainError};

/// One `[[train.fit]]` rule.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FitRule {
    /// The slot to fill.
    pub slot: String,
    /// `pickcat`: keep values seen at least this often.
    #[serde(default = "one")]
    pub min_count: usize,
    /// `pickcat`: keep at most this many values.
    #[serde(default)]
    pub max_size: Option<usize>,
    /// `piecewise`: the number of quantile buckets.
    #[serde(default = "ten")]
    pub buckets: usize,
}

fn one() -> usize {
    1
}
fn ten() -> usize {
    10
}

fn column(model: &ModelConfig, input: &str) -> Result<usize> {
    model
        .features
        .iter()
        .position(|f| f.name == input)
        .ok_or_else(|| TrainError::Config(format!("fit: no feature `{input}`")))
}

fn vocabulary(raw: &RawData, col: usize, rule: &FitRule) -> Vocabulary {
    let mut strs: HashMap<&str, usize> = HashMap::new();
    let mut ints: HashMap<i64, usize> = HashMap::new();
    for row in &raw.rows {
        match &row[col] {
            OwnedValue::Str(s) => *strs.entry(s).or_default() += 1,
            OwnedValue::StrList(l) => l.iter().for_each(|s| *strs.entry(s).or_default() += 1),
            OwnedValue::Int(v) => *ints.entry(*v).or_default() += 1,
            OwnedValue::IntList(l) => l.iter().for_each(|v| *ints.entry(*v).or_default() += 1),
            _ => {}
        }
    }
    let limit = rule.max_size.unwrap_or(usize::MAX);
    if strs.len() >= ints.len() {
        let mut v: Vec<(&str, usize)> = strs
            .into_iter()
            .filter(|(_, c)| *c >= rule.min_count)
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        Vocabulary::Str(
            v.into_iter()
                .take(limit)
                .map(|(s, _)| s.to_owned())
                .collect(),
        )
    } else {
        let mut v: Vec<(i64, usize)> = ints
            .into_iter()
            .filter(|(_, c)| *c >= rule.min_count)
            .collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Vocabulary::Int(v.into_iter().take(limit).map(|(x, _)| x).collect())
    }
}

fn quantiles(raw: &RawData, col: usize, buckets: usize) -> Vec<f64> {
    let mut xs: Vec<f64> = raw
        .rows
        .iter()
        .filter_map(|r| match &r[col] {
            OwnedValue::Float(v) if v.is_finite() => Some(*v),
            OwnedValue::Int(v) => Some(*v as f64),
            _ => None,
        })
        .collect();
    xs.sort_by(f64::total_cmp);
    let mut b: Vec<f64> = Vec::new();
    if !xs.is_empty() {
        for q in 1..buckets.max(1) {
            let x = xs[(q * xs.len() / buckets).min(xs.len() - 1)];
            if b.last().is_none_or(|&l| x > l) {
                b.push(x);
            }
        }
    }
    b
}

/// Fills the listed slots of `model` from `raw` (rows in `model.features` order).
pub fn fit(model: &mut ModelConfig, rules: &[FitRule], raw: &RawData) -> Result<()> {
    for rule in rules {
        let idx = model
            .slots
            .iter()
            .position(|s| s.name == rule.slot)
            .ok_or_else(|| TrainError::Config(format!("fit: no slot `{}`", rule.slot)))?;
        let transform = match &model.slots[idx].transform {
            Transform::Pickcat {
                input, oov_buckets, ..
            } => Transform::Pickcat {
                vocabulary: vocabulary(raw, column(model, input)?, rule),
                input: input.clone(),
                oov_buckets: *oov_buckets,
            },
            Transform::Piecewise { input, .. } => Transform::Piecewise {
                boundaries: quantiles(raw, column(model, input)?, rule.buckets),
                input: input.clone(),
            },
            other => {
                return Err(TrainError::Config(format!(
                    "fit: slot `{}` is {}; only pickcat and piecewise slots can be fitted",
                    rule.slot,
                    other.name()
                )))
            }
        };
        model.slots[idx].transform = transform;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankd_feature_ops::{FeatureType, RawFeature, SlotSpec};

    #[test]
    fn vocabularies_by_count_and_quantile_boundaries() {
        let mut model = ModelConfig {
            features: vec![
                RawFeature {
                    name: "c".into(),
                    ty: FeatureType::String,
                },
                RawFeature {
                    name: "x".into(),
                    ty: FeatureType::Float,
                },
            ],
            slots: vec![
                SlotSpec {
                    name: "c_id".into(),
                    transform: Transform::Pickcat {
                        input: "c".into(),
                        vocabulary: Vocabulary::Str(vec![]),
                        oov_buckets: 1,
                    },
                },
                SlotSpec {
                    name: "x_b".into(),
                    transform: Transform::Piecewise {
                        input: "x".into(),
                        boundaries: vec![],
                    },
                },
            ],
            ..ModelConfig::default()
        };
        let words = ["b", "a", "b", "c", "b", "a", "d"];
        let raw = RawData {
            rows: words
                .iter()
                .enumerate()
                .map(|(i, w)| vec![OwnedValue::Str((*w).into()), OwnedValue::Float(i as f64)])
                .collect(),
            labels: vec![0.0; words.len()],
        };
        let rules = [
            FitRule {
                slot: "c_id".into(),
                min_count: 2,
                max_size: None,
                buckets: 10,
            },
            FitRule {
                slot: "x_b".into(),
                min_count: 1,
                max_size: None,
                buckets: 2,
            },
        ];
        fit(&mut model, &rules, &raw).unwrap();
        assert!(matches!(&model.slots[0].transform,
            Transform::Pickcat { vocabulary: Vocabulary::Str(v), .. } if v == &["b", "a"]));
        assert!(matches!(&model.slots[1].transform,
            Transform::Piecewise { boundaries, .. } if boundaries == &[3.0]));
        let bad = [FitRule {
            slot: "nope".into(),
            min_count: 1,
            max_size: None,
            buckets: 2,
        }];
        assert!(fit(&mut model, &bad, &raw).is_err());
    }
}
