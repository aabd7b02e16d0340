//! Training data: CSV/TSV files with a header, parsed by the declared feature types and run
//! through the model's own feature spec once (the same `CompiledSpec` the daemon runs), so every
//! epoch reuses the slots.

use std::path::Path;

use rankd_feature_ops::{CompiledSpec, FeatureType, OwnedValue, SlotBatch, Value};

use crate::config::TrainSettings;
use crate::error::{Result, TrainError};

/// Examples after the feature transforms.
#[derive(Debug)]
pub struct Dataset {
    /// Raw cells per row, in model feature order (kept for checks against the engine).
    pub rows: Vec<Vec<OwnedValue>>,
    /// Labels (0 or 1).
    pub labels: Vec<f32>,
    /// The slots of every row.
    pub slots: SlotBatch,
}

fn parse_cell(
    text: &str,
    ty: FeatureType,
    s: &TrainSettings,
) -> std::result::Result<OwnedValue, String> {
    let t = text.trim();
    if t.is_empty() || s.missing.iter().any(|m| m == t) {
        return Ok(OwnedValue::Missing);
    }
    Ok(match ty {
        FeatureType::Float => {
            OwnedValue::Float(t.parse().map_err(|_| format!("{t:?} is not a number"))?)
        }
        FeatureType::Int => {
            OwnedValue::Int(t.parse().map_err(|_| format!("{t:?} is not an integer"))?)
        }
        FeatureType::String => OwnedValue::Str(t.to_owned()),
        FeatureType::IntList => OwnedValue::IntList(
            t.split(s.list_separator)
                .map(|x| {
                    x.trim()
                        .parse()
                        .map_err(|_| format!("{x:?} is not an integer"))
                })
                .collect::<std::result::Result<_, _>>()?,
        ),
        FeatureType::StringList => OwnedValue::StrList(
            t.split(s.list_separator)
                .map(|x| x.trim().to_owned())
                .collect(),
        ),
    })
}

/// Raw rows (cells in the order of `features`) and their labels.
#[derive(Debug, Default)]
pub struct RawData {
    /// Cells per row.
    pub rows: Vec<Vec<OwnedValue>>,
    /// Labels (0 or 1).
    pub labels: Vec<f32>,
}

/// Reads `files`: every feature of `features` must be a column; other columns are ignored; the
/// label must be 0 or 1.
pub fn read(
    files: &[impl AsRef<Path>],
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
) -> Result<RawData> {
    read_with(files, features, s, Labels::Required)
}

/// Whether the label column must be there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    /// Training and evaluation: every row has a 0/1 label.
    Required,
    /// Scoring: a file without the label column gives NaN labels.
    Optional,
}

/// Like [`read`], for scoring: the label column may be absent (labels are then NaN).
pub fn read_for_scoring(
    files: &[impl AsRef<Path>],
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
) -> Result<RawData> {
    read_with(files, features, s, Labels::Optional)
}

fn read_with(
    files: &[impl AsRef<Path>],
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
    labels: Labels,
) -> Result<RawData> {
    let mut out = RawData::default();
    for file in files {
        let path = file.as_ref();
        // Local files and hdfs:// files alike are streamed line by line.
        let source = rankd_storage::open_read(path, &s.hdfs())
            .map_err(|e| TrainError::Data(e.to_string()))?;
        let mut lines = std::io::BufRead::lines(std::io::BufReader::with_capacity(1 << 20, source));
        let first = lines
            .next()
            .ok_or_else(|| TrainError::Data(format!("{}: empty file", path.display())))?
            .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        let header: Vec<&str> = first.split(s.delimiter).map(str::trim).collect();
        let col = |name: &str| header.iter().position(|h| *h == name);
        let label_col = match (col(&s.label), labels) {
            (Some(c), _) => Some(c),
            (None, Labels::Optional) => None,
            (None, Labels::Required) => {
                return Err(TrainError::Data(format!(
                    "{}: no label column `{}`",
                    path.display(),
                    s.label
                )))
            }
        };
        let mut cols = Vec::with_capacity(features.len());
        for f in features {
            cols.push(col(&f.name).ok_or_else(|| {
                TrainError::Data(format!(
                    "{}: no column for feature `{}`",
                    path.display(),
                    f.name
                ))
            })?);
        }
        for (i, line) in lines.enumerate() {
            let line =
                line.map_err(|e| TrainError::Data(format!("{}:{}: {e}", path.display(), i + 2)))?;
            let line = line.as_str();
            if line.trim().is_empty() {
                continue;
            }
            let fields: Vec<&str> = line.split(s.delimiter).collect();
            let at = |c: usize| fields.get(c).copied().unwrap_or("");
            let ctx =
                |msg: String| TrainError::Data(format!("{}:{}: {msg}", path.display(), i + 2));
            let label = match label_col.map(|c| at(c).trim()) {
                None => f32::NAN,
                Some("0" | "0.0") => 0.0,
                Some("1" | "1.0") => 1.0,
                Some(other) => return Err(ctx(format!("label {other:?} is not 0 or 1"))),
            };
            let mut row = Vec::with_capacity(cols.len());
            for (f, &c) in features.iter().zip(&cols) {
                row.push(
                    parse_cell(at(c), f.ty, s)
                        .map_err(|e| ctx(format!("feature `{}`: {e}", f.name)))?,
                );
            }
            out.rows.push(row);
            out.labels.push(label);
        }
    }
    if out.rows.is_empty() {
        return Err(TrainError::Data("no examples".into()));
    }
    Ok(out)
}

/// Runs raw rows through the feature spec.
pub fn transform(raw: RawData, spec: &CompiledSpec) -> Result<Dataset> {
    let mut slots = SlotBatch::new();
    for (i, row) in raw.rows.iter().enumerate() {
        let values: Vec<Value<'_>> = row.iter().map(OwnedValue::value).collect();
        spec.transform_row(&values, &mut slots)
            .map_err(|e| TrainError::Data(format!("row {}: {e}", i + 1)))?;
    }
    Ok(Dataset {
        rows: raw.rows,
        labels: raw.labels,
        slots,
    })
}

/// Reads `files` and runs them through `spec`.
pub fn load(files: &[impl AsRef<Path>], spec: &CompiledSpec, s: &TrainSettings) -> Result<Dataset> {
    transform(read(files, spec.features(), s)?, spec)
}
