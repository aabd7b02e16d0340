//! `rankd-tool score`: offline scoring of JSON-lines requests with the daemon's engine.

use std::io::{BufRead, Write};

use anyhow::Result;
use rankd_serving::engine::cpu::CpuEngine;
use rankd_serving::engine::json::JsonRequest;
use rankd_serving::engine::{BatchOutput, InferenceBackend, Model, Request};

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
    for (line, req) in pending.iter() {
        let result = match req {
            Err(e) => Err(e.clone()),
            Ok(_) => {
                let r = batch.get(next).map_err(|e| e.to_string());
                next += 1;
                r.map(<[f32]>::to_vec)
            }
        };
        match result {
            Ok(scores) => {
                summary.ok += 1;
                writeln!(out, "{}", serde_json::json!({ "scores": scores }))?;
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

/// Scores every line of `input`, writing one JSON line per request to `out` (`{"scores": [...]}`
/// or `{"error": "..."}`) and a message per bad line to `err`.
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
