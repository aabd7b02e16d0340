//! `rankd-tool score`: offline scoring of JSON-lines requests with the daemon's engine.

use std::io::{BufRead, Write};

use anyhow::Result;
use rankd_engine::cpu::CpuEngine;
use rankd_engine::json::JsonRequest;
use rankd_engine::{BatchOutput, InferenceBackend, Model, Request};

/// Requests scored per engine call.
const BATCH: usize = 64;

/// Summary of a scoring run.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScoreSummary {
    /// Lines scored.
    pub ok: usize,
    /// Lines that failed (each got an `{"error": ...}` line).
    pub failed: usize,
}

fn flush(
    model: &Model,
    engine: &mut dyn InferenceBackend,
    pending: &mut Vec<(usize, Result<JsonRequest, String>)>,
    out: &mut dyn Write,
    err: &mut dyn Write,
    summary: &mut ScoreSummary,
) -> Result<()> {
    let parsed: Vec<&dyn Request> = pending
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().map(|r| r as &dyn Request))
        .collect();
    let mut batch = BatchOutput::default();
    engine.score(model, &parsed, &mut batch);
    let mut next = 0;
    let heads = model.heads();
    for (line, req) in pending.iter() {
        let result = match req {
            Err(e) => Err(e.clone()),
            Ok(_) => {
                let r = batch
                    .get(next)
                    .map_err(|e| e.to_string())
                    .map(|s| (s, next));
                next += 1;
                r
            }
        };
        match result {
            Ok((scores, i)) => {
                summary.ok += 1;
                let mut line = serde_json::json!({ "scores": scores });
                if !heads.is_empty() {
                    // A multi-task model: every head by name (the default's are `scores`).
                    let by_name: serde_json::Map<String, serde_json::Value> = heads
                        .iter()
                        .enumerate()
                        .map(|(h, name)| {
                            let v = match batch.head(i, h) {
                                Some(Ok(v)) => v,
                                _ => &[],
                            };
                            ((*name).to_owned(), serde_json::json!(v))
                        })
                        .collect();
                    line["heads"] = serde_json::Value::Object(by_name);
                }
                writeln!(out, "{line}")?;
            }
            Err(e) => {
                summary.failed += 1;
                let msg = format!("line {line}: {e}");
                writeln!(err, "error: {msg}")?;
                writeln!(out, "{}", serde_json::json!({ "error": msg }))?;
            }
        }
    }
    pending.clear();
    Ok(())
}

/// Scores every line of `input`, writing one JSON line per request to `out` (`{"scores": [...]}`,
/// with `"heads": {"NAME": [...], ...}` for a multi-task model, or `{"error": "..."}`) and a
/// message per bad line to `err`.
pub fn score(
    model: &Model,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<ScoreSummary> {
    let mut engine = CpuEngine::new();
    let mut summary = ScoreSummary::default();
    let mut pending = Vec::with_capacity(BATCH);
    for (i, line) in input.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        pending.push((i + 1, JsonRequest::parse(model.features(), &line)));
        if pending.len() == BATCH {
            flush(model, &mut engine, &mut pending, out, err, &mut summary)?;
        }
    }
    flush(model, &mut engine, &mut pending, out, err, &mut summary)?;
    Ok(summary)
}

/// Options of `rankd-tool score --csv`.
#[derive(Debug, Clone)]
pub struct CsvOptions {
    /// Field delimiter.
    pub delimiter: char,
    /// The label column, copied to the output when the file has it.
    pub label: String,
}

/// `rankd-tool score MODEL --csv FILE`: rows read with the trainer's CSV reader (the same
/// parsing of cells, missing values and lists as training), one score per row from the serving
/// engine. Writes `row,score,label` (label empty when the file has none), and for a multi-task
/// model a column `score.HEAD` per head after those.
pub fn score_csv(
    model: &Model,
    file: &std::path::Path,
    opts: &CsvOptions,
    out: &mut dyn Write,
) -> Result<usize> {
    let mut settings = rankd_trainer::config::TrainSettings::defaults();
    settings.delimiter = opts.delimiter;
    settings.label = opts.label.clone();
    let features = &model.file().spec().features.features;
    let raw = rankd_trainer::data::read_for_scoring(&[file], features, &settings)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut engine = CpuEngine::new();
    let mut batch = BatchOutput::default();
    let heads = model.heads();
    write!(out, "row,score,label")?;
    for h in &heads {
        write!(out, ",score.{h}")?;
    }
    writeln!(out)?;
    let mut row = 0usize;
    for chunk in raw.rows.chunks(256).zip(raw.labels.chunks(256)) {
        let (rows, labels) = chunk;
        let items: Vec<Vec<rankd_feature_ops::Value<'_>>> = rows
            .iter()
            .map(|r| r.iter().map(rankd_feature_ops::OwnedValue::value).collect())
            .collect();
        let req = rankd_engine::request::DenseRequest {
            user: Vec::new(),
            items,
        };
        batch.clear();
        engine.score(model, &[&req as &dyn Request], &mut batch);
        let scores = batch
            .get(0)
            .map_err(|e| anyhow::anyhow!("rows {}..{}: {e}", row + 1, row + rows.len()))?;
        let per_head: Vec<&[f32]> = (0..heads.len())
            .map(|h| match batch.head(0, h) {
                Some(Ok(v)) => v,
                _ => &[],
            })
            .collect();
        for (i, (s, l)) in scores.iter().zip(labels).enumerate() {
            row += 1;
            let label = if l.is_nan() {
                String::new()
            } else {
                l.to_string()
            };
            write!(out, "{row},{s},{label}")?;
            for v in &per_head {
                write!(out, ",{}", v[i])?;
            }
            writeln!(out)?;
        }
    }
    Ok(row)
}
