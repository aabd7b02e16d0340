//! Training data: CSV/TSV files with a header, parsed by the declared feature types and run
//! through the model's own feature spec once (the same `CompiledSpec` the daemon runs), so every
//! epoch reuses the slots.

use std::path::Path;

use rankd_feature_ops::{CompiledSpec, FeatureType, OwnedValue, SlotBatch, Value};

use rankd_formats::synth::Rng;

use crate::config::TrainSettings;
use crate::error::{Result, TrainError};

/// Examples after the feature transforms.
#[derive(Debug)]
pub struct Dataset {
    /// Raw cells per row, in model feature order (kept for checks against the engine).
    pub rows: Vec<Vec<OwnedValue>>,
    /// Labels (0 or 1): one per row, or for a multi-task model one per head, row by row (row
    /// `r`'s head `h` at `r * heads + h`).
    pub labels: Vec<f32>,
    /// The slots of every row.
    pub slots: SlotBatch,
}

pub(crate) fn parse_cell(
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
    /// Labels (0 or 1), laid out as [`Dataset::labels`].
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
    stream_share(files, features, s, share, &mut |row, labels| {
        out.rows.push(row);
        out.labels.extend_from_slice(labels);
        Ok(())
    })?;
    if out.rows.is_empty() {
        return Err(TrainError::Data(format!(
            "share {} of {}: no examples",
            share.index, share.count
        )));
    }
    Ok(out)
}

/// What [`stream_share`] and [`stream`] call with every row and its labels (one, or one per
/// head of a multi-task model).
pub type RowSink<'a> = dyn FnMut(Vec<OwnedValue>, &[f32]) -> Result<()> + 'a;

/// Streams the rows of `share` of `files` into `sink`, one at a time, in file order: memory
/// stays bounded by one read buffer whatever the size of the files. Returns the row count.
pub fn stream_share(
    files: &[impl AsRef<Path>],
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
    share: Share,
    sink: &mut RowSink<'_>,
) -> Result<usize> {
    let mut rows = 0;
    let count = share.count.max(1);
    for (j, file) in files.iter().enumerate() {
        let path = file.as_ref();
        let hdfs = s.hdfs();
        let err = |e: rankd_storage::StorageError| TrainError::Data(e.to_string());
        if is_compressed(path) || count == 1 {
            // A compressed file cannot be entered in the middle: it goes whole to one share.
            if is_compressed(path) && j % count != share.index {
                continue;
            }
            let source = rankd_storage::open_read(path, &hdfs).map_err(err)?;
            let mut source = decompressed(path, source)?;
            rows += stream_from(&mut source, path, features, s, Labels::Required, sink)?;
            continue;
        }
        let len = rankd_storage::file_len(path, &hdfs).map_err(err)?;
        let (start, end) = (
            len * share.index as u64 / count as u64,
            len * (share.index as u64 + 1) / count as u64,
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
        if skip_partial {
            // The byte before the range: a newline there means a line starts at `from`.
            let mut line = Vec::new();
            let n = std::io::BufRead::read_until(&mut reader, b'\n', &mut line)
                .map_err(|e| TrainError::Data(format!("{}: {e}", path.display())))?;
            pos += n as u64;
        }
        // Parsed by the one CSV reader, streamed: the header, then this share's lines only.
        let mut range = LineRange {
            header: std::io::Cursor::new(header),
            inner: reader,
            pos,
            end,
            line: Vec::new(),
            at: 0,
        };
        rows += stream_from(&mut range, path, features, s, Labels::Required, sink)?;
    }
    Ok(rows)
}

/// A header line followed by the lines of a byte range of a file (each line that starts before
/// `end`), as one stream.
struct LineRange<R> {
    header: std::io::Cursor<Vec<u8>>,
    inner: std::io::BufReader<R>,
    pos: u64,
    end: u64,
    line: Vec<u8>,
    at: usize,
}

impl<R: std::io::Read> std::io::Read for LineRange<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.header.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        if self.at == self.line.len() {
            if self.pos >= self.end {
                return Ok(0);
            }
            self.line.clear();
            self.at = 0;
            let n = std::io::BufRead::read_until(&mut self.inner, b'\n', &mut self.line)?;
            if n == 0 {
                self.pos = self.end;
                return Ok(0);
            }
            self.pos += n as u64;
            if !self.line.ends_with(b"\n") {
                self.line.push(b'\n');
            }
        }
        let n = buf.len().min(self.line.len() - self.at);
        buf[..n].copy_from_slice(&self.line[self.at..self.at + n]);
        self.at += n;
        Ok(n)
    }
}

/// Streams every row of `files` (all of each file) into `sink`; returns the row count.
pub fn stream(
    files: &[impl AsRef<Path>],
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
    sink: &mut RowSink<'_>,
) -> Result<usize> {
    stream_share(files, features, s, Share { index: 0, count: 1 }, sink)
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
        stream_from(
            &mut source,
            path,
            features,
            s,
            labels,
            &mut |row, labels| {
                out.rows.push(row);
                out.labels.extend_from_slice(labels);
                Ok(())
            },
        )?;
    }
    if out.rows.is_empty() {
        return Err(TrainError::Data("no examples".into()));
    }
    Ok(out)
}

/// Streams one CSV stream (header line first) of `path` into `sink`; returns the row count.
fn stream_from(
    source: &mut dyn std::io::Read,
    path: &Path,
    features: &[rankd_feature_ops::RawFeature],
    s: &TrainSettings,
    labels: Labels,
    sink: &mut RowSink<'_>,
) -> Result<usize> {
    let mut n = 0;
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
    let single = [crate::config::LabelColumn {
        column: s.label.clone(),
        threshold: None,
    }];
    let wanted = if s.heads.is_empty() {
        &single[..]
    } else {
        &s.heads[..]
    };
    let mut label_cols = Vec::with_capacity(wanted.len());
    for w in wanted {
        label_cols.push(match (col(&w.column), labels) {
            (Some(c), _) => Some((c, w.threshold)),
            (None, Labels::Optional) => None,
            (None, Labels::Required) => {
                return Err(TrainError::Data(format!(
                    "{}: no label column `{}`",
                    path.display(),
                    w.column
                )))
            }
        });
    }
    let mut label = vec![0f32; label_cols.len()];
    // A multi-task head's label may be missing on a row (a dwell time only for clicks): the row
    // then teaches the other heads only.
    let multitask = !s.heads.is_empty();
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
        for (y, c) in label.iter_mut().zip(&label_cols) {
            *y = match c.map(|(c, t)| (at(c).trim(), t)) {
                None => f32::NAN,
                Some((v, _)) if multitask && (v.is_empty() || s.missing.iter().any(|m| m == v)) => {
                    f32::NAN
                }
                Some((v, Some(t))) => match v.parse::<f64>() {
                    Ok(x) if x.is_finite() => f32::from(u8::from(x > t)),
                    _ => return Err(ctx(format!("label {v:?} is not a number"))),
                },
                Some(("0" | "0.0", None)) => 0.0,
                Some(("1" | "1.0", None)) => 1.0,
                Some((other, None)) => return Err(ctx(format!("label {other:?} is not 0 or 1"))),
            };
        }
        let mut row = Vec::with_capacity(cols.len());
        for (f, &c) in features.iter().zip(&cols) {
            row.push(
                parse_cell(at(c), f.ty, s)
                    .map_err(|e| ctx(format!("feature `{}`: {e}", f.name)))?,
            );
        }
        sink(row, &label)?;
        n += 1;
    }
    Ok(n)
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

/// The generator of share `share`'s shuffle in epoch `epoch`: a function of the seed, the share
/// and the epoch only, so a resumed run and a restarted worker shuffle as an uninterrupted one.
pub fn epoch_rng(seed: u64, share: usize, epoch: usize) -> Rng {
    Rng::new(
        seed.wrapping_add(1)
            ^ (share as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
            ^ (epoch as u64).wrapping_mul(0xA076_1D64_78BD_642F),
    )
}

/// Fisher-Yates: the permutation the in-process trainer applies to its row order.
pub fn shuffle<T>(v: &mut [T], rng: &mut Rng) {
    for i in (1..v.len()).rev() {
        v.swap(i, (rng.next_u64() % (i as u64 + 1)) as usize);
    }
}

/// Shuffling within a bounded buffer, for streamed data. The first `capacity` rows fill the
/// buffer; from then on each new row takes the place of a uniformly chosen one, which is sent on;
/// at the end the rows left are shuffled ([`shuffle`]) and sent in that order. A share that fits
/// in the buffer is therefore permuted exactly as the in-process trainer permutes its rows;
/// a larger one is mixed within windows of about `capacity` rows (memory: `capacity` rows).
#[derive(Debug)]
pub struct Shuffle<T> {
    buf: Vec<T>,
    capacity: usize,
    rng: Rng,
}

impl<T> Shuffle<T> {
    /// A buffer of `capacity` rows (at least 1) drawing from `rng`.
    pub fn new(capacity: usize, rng: Rng) -> Self {
        Shuffle {
            buf: Vec::new(),
            capacity: capacity.max(1),
            rng,
        }
    }

    /// Takes `item`; returns the one that leaves the buffer, if any.
    pub fn push(&mut self, item: T) -> Option<T> {
        if self.buf.len() < self.capacity {
            self.buf.push(item);
            return None;
        }
        let j = (self.rng.next_u64() % self.capacity as u64) as usize;
        Some(std::mem::replace(&mut self.buf[j], item))
    }

    /// The rows left, shuffled.
    pub fn drain(&mut self) -> std::vec::Drain<'_, T> {
        shuffle(&mut self.buf, &mut self.rng);
        self.buf.drain(..)
    }
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
    fn a_large_enough_shuffle_buffer_permutes_as_one_process_does() {
        let rows: Vec<u32> = (0..1000).collect();
        let mut whole = rows.clone();
        shuffle(&mut whole, &mut epoch_rng(3, 0, 2));
        let mut buffer = Shuffle::new(1000, epoch_rng(3, 0, 2));
        let mut streamed: Vec<u32> = rows.iter().filter_map(|&r| buffer.push(r)).collect();
        streamed.extend(buffer.drain());
        assert_eq!(streamed, whole);
        assert_ne!(whole, rows, "shuffled");
        // A small buffer: every row exactly once, mixed.
        let mut small = Shuffle::new(64, epoch_rng(3, 0, 2));
        let mut out: Vec<u32> = rows.iter().filter_map(|&r| small.push(r)).collect();
        out.extend(small.drain());
        assert_ne!(out, rows);
        out.sort_unstable();
        assert_eq!(out, rows);
        // Each epoch and each share draws differently.
        let mut other = rows.clone();
        shuffle(&mut other, &mut epoch_rng(3, 1, 2));
        assert_ne!(other, whole);
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

    #[test]
    fn a_multitask_model_reads_a_label_per_head_row_by_row() {
        use crate::config::LabelColumn;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "x,name,label,hours\n1,a,1,45\n2,b,0,40\n3,c,1,12.5\n").unwrap();
        let mut s = TrainSettings::defaults();
        s.heads = vec![
            LabelColumn {
                column: "label".into(),
                threshold: None,
            },
            LabelColumn {
                column: "hours".into(),
                threshold: Some(40.0),
            },
        ];
        let raw = read(&[&p], &features(), &s).unwrap();
        assert_eq!(raw.labels, [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
        // A head's label may be missing on a row (empty, or a `missing` value): NaN, and the
        // row still teaches the other head.
        std::fs::write(&p, "x,name,label,hours\n1,a,,45\n2,b,0,?\n").unwrap();
        let raw = read(&[&p], &features(), &s).unwrap();
        assert!(raw.labels[0].is_nan() && raw.labels[3].is_nan());
        assert_eq!((raw.labels[1], raw.labels[2]), (1.0, 0.0));
        // A value that is no number under a threshold is refused, with its line.
        std::fs::write(&p, "x,name,label,hours\n1,a,1,45\n1,a,1,many\n").unwrap();
        let e = read(&[&p], &features(), &s).unwrap_err().to_string();
        assert!(
            e.contains(":3:") && e.contains("\"many\" is not a number"),
            "{e}"
        );
        // A head's missing column is named.
        s.heads[1].column = "dwell".into();
        let e = read(&[&p], &features(), &s).unwrap_err().to_string();
        assert!(e.contains("no label column `dwell`"), "{e}");
    }

    #[test]
    fn a_single_task_label_is_never_missing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, "x,name,label\n1,a,\n").unwrap();
        let e = read(&[&p], &features(), &TrainSettings::defaults())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not 0 or 1"), "{e}");
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
