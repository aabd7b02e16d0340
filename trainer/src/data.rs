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

/// One process's part of the training files: of every plain file, the `index`-th of `count`
/// equal byte ranges, split at line boundaries (a line belongs to the range its first byte is
/// in); compressed files (`.gz`, `.zst`) go whole, file `j` to share `j mod count`. Every row is
/// in exactly one share; no process reads another's share beyond the end of its last line, and
/// each reads its files' header lines. Byte ranges assume one row per line: a plain file with
/// line breaks inside quoted cells must be read whole (one process) or split into files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    /// This process's share, `0..count`.
    pub index: usize,
    /// How many shares.
    pub count: usize,
}

/// Like [`read`], reading only `share` of each file.
pub fn read_share(
    files: &[impl AsRef<Path>],
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
    share: Share,
) -> Result<RawData> {
    let mut out = RawData::default();
    for (j, file) in files.iter().enumerate() {
        let path = file.as_ref();
        let hdfs = s.hdfs();
        if is_compressed(path) {
            // A compressed file cannot be entered in the middle: it goes whole to one share.
            if j % share.count.max(1) == share.index {
                let source = rankd_storage::open_read(path, &hdfs)
                    .map_err(|e| TrainError::Data(e.to_string()))?;
                let mut source = decompressed(path, source)?;
                let part = read_from(&mut source, path, features, s, Labels::Required)?;
                out.rows.extend(part.rows);
                out.labels.extend(part.labels);
            }
            continue;
        }
        let err = |e: rankd_storage::StorageError| TrainError::Data(e.to_string());
        let len = rankd_storage::file_len(path, &hdfs).map_err(err)?;
        let count = share.count.max(1) as u64;
        let (start, end) = (
            len * share.index as u64 / count,
            len * (share.index as u64 + 1) / count,
        );
        // The header, from the start of the file.
        let mut head = std::io::BufReader::new(rankd_storage::open_read(path, &hdfs).map_err(err)?);
        // Bytes, not text: a range may start inside a multi-byte character (the CSV reader
        // checks the UTF-8 of whole cells).
        let mut header = Vec::new();
        std::io::BufRead::read_until(&mut head, b'\n', &mut header)
            .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
        let header_len = header.len() as u64;
        drop(head);
        // The range's lines: from the first line that starts inside it (a range that starts in
        // the middle of a line leaves that line to the range before) through the last one.
        let from = start.max(header_len);
        let (skip_partial, open_at) = if from > header_len {
            (true, from - 1)
        } else {
            (false, from)
        };
        let mut reader = std::io::BufReader::with_capacity(
            1 << 20,
            rankd_storage::open_read_at(path, open_at, &hdfs).map_err(err)?,
        );
        let mut pos = open_at;
        let mut line = Vec::new();
        if skip_partial {
            // The byte before the range: a newline there means a line starts at `from`.
            let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut line)
                .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
            pos += n as u64;
        }
        let mut body = header.clone();
        while pos < end {
            line.clear();
            let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut line)
                .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
            if n == 0 {
                break;
            }
            pos += n as u64;
            body.extend_from_slice(&line);
            if !line.ends_with(b"\n") {
                body.push(b'\n');
            }
        }
        // Parsed by the one CSV reader, from memory: this process's share only.
        let part = read_from(
            &mut std::io::Cursor::new(body),
            path,
            features,
            s,
            Labels::Required,
        )?;
        out.rows.extend(part.rows);
        out.labels.extend(part.labels);
    }
    if out.rows.is_empty() {
        return Err(TrainError::Data(format!(
            "share {} of {}: no examples",
            share.index, share.count
        )));
    }
    Ok(out)
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
        let mut source = decompressed(path, source)?;
        let part = read_from(&mut source, path, features, s, labels)?;
        out.rows.extend(part.rows);
        out.labels.extend(part.labels);
    }
    if out.rows.is_empty() {
        return Err(TrainError::Data("no examples".into()));
    }
    Ok(out)
}

/// Reads one CSV stream (header line first) of `path`.
fn read_from(
    source: &mut dyn std::io::Read,
    path: &Path,
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
    labels: Labels,
) -> Result<RawData> {
    let mut out = RawData::default();
    let delimiter = u8::try_from(s.delimiter)
        .ok()
        .filter(u8::is_ascii)
        .ok_or_else(|| TrainError::Config(format!("delimiter {:?} is not ASCII", s.delimiter)))?;
    // RFC 4180 as the csv crate reads it: quoted cells may hold delimiters, quotes ("") and line
    // breaks; LF and CRLF both end a record.
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .has_headers(false)
        .flexible(true)
        .buffer_capacity(1 << 20)
        .from_reader(std::io::BufReader::with_capacity(1 << 20, source));
    let mut records = reader.records();
    let csv_err = |e: csv::Error| {
        let at = e
            .position()
            .map_or(String::new(), |p| format!(":{}", p.line()));
        TrainError::Data(format!("{}{at}: {e}", path.display()))
    };
    let header = records
        .next()
        .ok_or_else(|| TrainError::Data(format!("{}: empty file", path.display())))?
        .map_err(csv_err)?;
    let header: Vec<String> = header
        .iter()
        .enumerate()
        .map(|(i, h)| {
            // A UTF-8 byte order mark before the first column name is not part of it.
            let h = if i == 0 {
                h.trim_start_matches('\u{feff}')
            } else {
                h
            };
            h.trim().to_owned()
        })
        .collect();
    let col = |name: &str| header.iter().position(|h| h == name);
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
    for record in records {
        let record = record.map_err(csv_err)?;
        let line = record.position().map_or(0, |p| p.line());
        if record.len() == 1 && record[0].trim().is_empty() {
            continue;
        }
        let ctx = |msg: String| TrainError::Data(format!("{}:{line}: {msg}", path.display()));
        if record.len() != header.len() {
            return Err(ctx(format!(
                "{} columns, the header has {}",
                record.len(),
                header.len()
            )));
        }
        let at = |c: usize| record.get(c).unwrap_or("");
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
    Ok(out)
}

/// How a data file is compressed, by its name: `.gz` (gzip, several members allowed) or `.zst`
/// (zstd); anything else is plain text.
fn decompressed(
    path: &Path,
    source: Box<dyn std::io::Read + Send>,
) -> Result<Box<dyn std::io::Read + Send>> {
    let name = path.to_string_lossy();
    Ok(if name.ends_with(".gz") {
        Box::new(flate2::read::MultiGzDecoder::new(
            std::io::BufReader::with_capacity(1 << 20, source),
        ))
    } else if name.ends_with(".zst") {
        Box::new(
            zstd::stream::read::Decoder::new(source)
                .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?,
        )
    } else {
        source
    })
}

/// Whether a data file is compressed (then it cannot be split into byte ranges).
fn is_compressed(path: &Path) -> bool {
    let name = path.to_string_lossy();
    name.ends_with(".gz") || name.ends_with(".zst")
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

#[cfg(test)]
mod tests {
    use super::*;
    use rankd_feature_ops::{FeatureType, RawFeature};

    fn cells(raw: &RawData) -> Vec<String> {
        let mut v: Vec<String> = raw
            .rows
            .iter()
            .zip(&raw.labels)
            .map(|(r, l)| format!("{r:?} {l}"))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn shares_split_every_file_at_line_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        for (f, rows) in [(0usize, 997usize), (1, 3), (2, 1), (3, 250)] {
            let mut text = String::from("x,name,label\n");
            for i in 0..rows {
                // Lines of very different lengths, so that range ends fall anywhere in a line.
                // Multi-byte characters too: a range may start inside one.
                let name = "né".repeat((i * 7 + f) % 40);
                text.push_str(&format!("{}.5,{name},{}\n", i, i % 2));
            }
            let p = dir.path().join(format!("part-{f}.csv"));
            std::fs::write(&p, text).unwrap();
            files.push(p);
        }
        let features = features();
        let s = TrainSettings::defaults();
        let all = read(&files, &features, &s).unwrap();
        assert_eq!(all.rows.len(), 997 + 3 + 1 + 250);
        for count in 1..=5 {
            let mut union = RawData::default();
            for index in 0..count {
                let part = read_share(&files, &features, &s, Share { index, count }).unwrap();
                assert!(
                    count == 1 || part.rows.len() < all.rows.len(),
                    "share {index}/{count} read everything"
                );
                union.rows.extend(part.rows);
                union.labels.extend(part.labels);
            }
            assert_eq!(cells(&union), cells(&all), "{count} shares");
        }
    }

    fn features() -> Vec<RawFeature> {
        vec![
            RawFeature {
                name: "x".into(),
                ty: FeatureType::Float,
            },
            RawFeature {
                name: "name".into(),
                ty: FeatureType::String,
            },
        ]
    }

    fn strings(raw: &RawData) -> Vec<String> {
        raw.rows
            .iter()
            .map(|r| match &r[1] {
                OwnedValue::Str(s) => s.clone(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn quotes_crlf_and_a_byte_order_mark() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("q.csv");
        std::fs::write(
            &p,
            "\u{feff}x,name,label\r\n1.5,\"Smith, John\",1\r\n2,\"say \"\"hi\"\"\",0\r\n3,\"two\nlines\",1\r\n\r\n4,plain,0\r\n",
        )
        .unwrap();
        let raw = read(&[&p], &features(), &TrainSettings::defaults()).unwrap();
        assert_eq!(
            strings(&raw),
            ["Smith, John", "say \"hi\"", "two\nlines", "plain"]
        );
        assert_eq!(raw.labels, [1.0, 0.0, 1.0, 0.0]);
        assert!(matches!(raw.rows[0][0], OwnedValue::Float(x) if x == 1.5));
    }

    #[test]
    fn a_row_with_the_wrong_column_count_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.csv");
        std::fs::write(&p, "x,name,label\n1,a,0\n2,b,1\n3,c\n4,d,0\n").unwrap();
        let e = read(&[&p], &features(), &TrainSettings::defaults())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.csv:4"), "{e}");
        assert!(e.contains("2 columns, the header has 3"), "{e}");
        // Too many is as wrong as too few (an unquoted delimiter inside a cell).
        std::fs::write(&p, "x,name,label\n1,Smith, John,0\n").unwrap();
        let e = read(&[&p], &features(), &TrainSettings::defaults())
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.csv:2: 4 columns"), "{e}");
    }

    #[test]
    fn gzip_and_zstd_inputs_read_like_plain_ones() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::from("x,name,label\n");
        for i in 0..500 {
            text.push_str(&format!("{i}.25,\"n,{i}\",{}\n", i % 2));
        }
        let plain = dir.path().join("d.csv");
        std::fs::write(&plain, &text).unwrap();
        let gz = dir.path().join("d.csv.gz");
        let mut enc =
            flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), Default::default());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        let zst = dir.path().join("d.csv.zst");
        std::fs::write(&zst, zstd::encode_all(text.as_bytes(), 3).unwrap()).unwrap();
        let s = TrainSettings::defaults();
        let want = read(&[&plain], &features(), &s).unwrap();
        for f in [&gz, &zst] {
            let got = read(&[f], &features(), &s).unwrap();
            assert_eq!(strings(&got), strings(&want), "{}", f.display());
            assert_eq!(got.labels, want.labels);
        }
        // Shares: compressed files go whole, one per share in turn.
        let files = [&gz, &zst];
        let a = read_share(&files, &features(), &s, Share { index: 0, count: 2 }).unwrap();
        let b = read_share(&files, &features(), &s, Share { index: 1, count: 2 }).unwrap();
        assert_eq!(a.rows.len(), 500);
        assert_eq!(b.rows.len(), 500);
    }
}
