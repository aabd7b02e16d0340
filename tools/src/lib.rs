//! The logic behind `rankd-tool`: each subcommand is a function here, `main.rs` only parses
//! arguments. Output goes to a `Write` so tests can read it.

pub mod deploy;
pub mod import;
pub mod score;

use std::fmt::Write as _;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use rankd_feature_ops::{SlotKind, Transform, Vocabulary};
use rankd_formats::{Integrity, ModelFile};
use serde::Serialize;

/// Formats milliseconds since the epoch as an RFC 3339 UTC time.
pub fn format_unix_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn list_preview<T: std::fmt::Display>(items: &[T], max: usize) -> String {
    let mut s = String::new();
    for (i, x) in items.iter().take(max).enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let _ = write!(s, "{x}");
    }
    if items.len() > max {
        let _ = write!(s, ", … ({} more)", items.len() - max);
    }
    s
}

/// One line describing a transform and all of its parameters.
pub fn describe_transform(t: &Transform) -> String {
    match t {
        Transform::Piecewise { input, boundaries } => format!(
            "piecewise({input}; boundaries [{}])",
            list_preview(boundaries, 12)
        ),
        Transform::Pickcat {
            input,
            vocabulary,
            oov_buckets,
        } => {
            let vocab = match vocabulary {
                Vocabulary::Int(v) => format!("{} ints [{}]", v.len(), list_preview(v, 8)),
                Vocabulary::Str(v) => {
                    let quoted: Vec<String> = v.iter().take(9).map(|s| format!("{s:?}")).collect();
                    let mut p = list_preview(&quoted, 8);
                    if v.len() > 9 {
                        p = format!(
                            "{}, … ({} more)",
                            list_preview(&quoted[..8], 8),
                            v.len() - 8
                        );
                    }
                    format!("{} strings [{p}]", v.len())
                }
            };
            format!("pickcat({input}; vocabulary {vocab}; oov_buckets {oov_buckets})")
        }
        Transform::Descartes { inputs } => format!("descartes({})", inputs.join(", ")),
        Transform::Hash { input, buckets } => format!("hash({input}; buckets {buckets})"),
        Transform::Prefix {
            input,
            length,
            buckets,
        } => format!("prefix({input}; length {length}, buckets {buckets})"),
        Transform::Combinehash { inputs, buckets } => {
            format!("combinehash({}; buckets {buckets})", inputs.join(", "))
        }
        Transform::Normalize {
            input,
            mean,
            std,
            clip,
            log1p,
        } => {
            let mut s = format!("normalize({input}; mean {mean}, std {std}");
            if let Some(c) = clip {
                let _ = write!(s, ", clip {c}");
            }
            if *log1p {
                s.push_str(", log1p");
            }
            s.push(')');
            s
        }
    }
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// `rankd-tool inspect`, human-readable.
pub fn inspect_text(model: &ModelFile) -> String {
    let spec = model.spec();
    let m = &spec.metadata;
    let h = model.header();
    let a = &spec.architecture;
    let mut s = String::new();
    let _ = writeln!(s, "model       {} version {}", m.name, m.version);
    let _ = writeln!(
        s,
        "file        {} ({}, format v{}, checksum {:#018x} {})",
        model.path().display(),
        human_bytes(h.file_len),
        h.version,
        h.body_checksum,
        match model.integrity() {
            Integrity::Verified => "verified",
            Integrity::Trusted => "not verified",
        }
    );
    let _ = writeln!(s, "created     {}", format_unix_ms(m.created_unix_ms));
    let _ = writeln!(s, "producer    {}", m.producer);
    let _ = writeln!(s, "kind        {}", a.kind());
    if !m.metrics.is_empty() {
        let _ = writeln!(s, "metrics");
        for (k, v) in &m.metrics {
            let _ = writeln!(s, "  {k:<24} {v}");
        }
    }
    if !m.properties.is_empty() {
        let _ = writeln!(s, "properties");
        for (k, v) in &m.properties {
            let _ = writeln!(s, "  {k:<24} {v}");
        }
    }
    let compiled = model.compiled();
    let _ = writeln!(
        s,
        "features    {} raw, hash seed {}",
        spec.features.features.len(),
        spec.features.hash_seed
    );
    for f in &spec.features.features {
        let _ = writeln!(s, "  {:<24} {}", f.name, f.ty);
    }
    let _ = writeln!(s, "slots       {}", spec.features.slots.len());
    for (slot, info) in spec.features.slots.iter().zip(compiled.slots()) {
        let out = match info.kind {
            SlotKind::Ids { num_ids } => format!("{num_ids} ids"),
            SlotKind::Dense => "dense".into(),
        };
        let _ = writeln!(
            s,
            "  {:<24} {:<10} {}",
            slot.name,
            out,
            describe_transform(&slot.transform)
        );
    }
    let _ = writeln!(s, "embeddings  {}", a.embeddings.len());
    for e in &a.embeddings {
        let _ = writeln!(
            s,
            "  {:<24} {} x {} {:?} {} ({})",
            e.slot,
            e.rows,
            e.dim,
            e.pooling,
            match e.weight_type {
                rankd_formats::WeightType::F32 => "f32",
                rankd_formats::WeightType::F16 => "f16",
                rankd_formats::WeightType::I8 => "int8",
            },
            human_bytes(e.weights.len * 4)
        );
    }
    match &a.wide {
        Some(w) => {
            let _ = writeln!(s, "wide        bias {}, {} slots", w.bias, w.slots.len());
            for ws in &w.slots {
                let _ = writeln!(s, "  {:<24} {} weights", ws.slot, ws.weights.len);
            }
        }
        None => {
            let _ = writeln!(s, "wide        none");
        }
    }
    let layer = |s: &mut String, what: String, l: &rankd_formats::DenseLayer| {
        let _ = writeln!(
            s,
            "  {what:<24} {} -> {} {:?}",
            l.in_dim, l.out_dim, l.activation
        );
    };
    if a.deep.is_empty() && a.multitask.is_none() {
        let _ = writeln!(s, "deep        none");
    } else {
        let _ = writeln!(
            s,
            "deep        input {} = {} embedding values + {} dense ({})",
            a.deep_input_dim(),
            a.deep_input_dim() - a.dense_inputs.len() as u64,
            a.dense_inputs.len(),
            a.dense_inputs.join(", ")
        );
        for (i, l) in a.deep.iter().enumerate() {
            layer(&mut s, format!("layer {i}"), l);
        }
    }
    if let Some(c) = &a.cross {
        let rank = match c.layers.first().map_or(0, |l| l.rank) {
            0 => "full rank".to_owned(),
            r => format!("rank {r}"),
        };
        let _ = writeln!(
            s,
            "cross       {} layers, {rank}, {:?}",
            c.layers.len(),
            c.structure
        );
    }
    if let Some(m) = &a.multitask {
        let _ = writeln!(
            s,
            "multitask   {} experts, {} heads (default `{}`)",
            m.experts.len(),
            m.heads.len(),
            m.heads[0].name
        );
        for (k, e) in m.experts.iter().enumerate() {
            for (i, l) in e.layers.iter().enumerate() {
                layer(&mut s, format!("expert {k} layer {i}"), l);
            }
        }
        for h in &m.heads {
            if let Some(g) = &h.gate {
                layer(&mut s, format!("{} gate", h.name), g);
            }
            for (i, l) in h.tower.iter().enumerate() {
                layer(&mut s, format!("{} tower {i}", h.name), l);
            }
        }
    }
    let _ = writeln!(s, "fm          {}", if a.fm { "yes" } else { "no" });
    s
}

#[derive(Serialize)]
struct SlotJson<'a> {
    name: &'a str,
    kind: &'static str,
    num_ids: Option<u32>,
    /// The transform as the text form writes it, e.g. `piecewise(age; boundaries [18, 25])`.
    transform: String,
}

#[derive(Serialize)]
struct EmbeddingJson<'a> {
    slot: &'a str,
    rows: u64,
    dim: u32,
    pooling: rankd_formats::Pooling,
    bytes: u64,
}

#[derive(Serialize)]
struct LayerJson {
    in_dim: u32,
    out_dim: u32,
    activation: rankd_formats::Activation,
}

/// Everything the text form shows, by name, plus the whole spec.
#[derive(Serialize)]
struct InspectJson<'a> {
    name: &'a str,
    version: u64,
    producer: &'a str,
    created: String,
    created_unix_ms: i64,
    path: String,
    file_len: u64,
    format_version: u32,
    body_checksum: String,
    checksum_verified: bool,
    kind: &'static str,
    /// Metric name to value (a non-finite value is `null`).
    metrics: serde_json::Map<String, serde_json::Value>,
    properties: std::collections::BTreeMap<&'a str, &'a str>,
    hash_seed: u64,
    features: &'a [rankd_feature_ops::RawFeature],
    slots: Vec<SlotJson<'a>>,
    embeddings: Vec<EmbeddingJson<'a>>,
    wide: Option<&'a rankd_formats::Wide>,
    deep_input_dim: u64,
    /// A multi-task model's heads, the default first (empty for a single-task model), and its
    /// experts (0 for a single-task model); the layers are in `spec.architecture.multitask`.
    heads: Vec<&'a str>,
    experts: usize,
    dense_inputs: &'a [String],
    deep: Vec<LayerJson>,
    fm: bool,
    spec: &'a rankd_formats::ModelSpec,
}

/// `rankd-tool inspect --json`: one JSON object carrying everything the text form shows.
pub fn inspect_json(model: &ModelFile) -> Result<String> {
    let spec = model.spec();
    let m = &spec.metadata;
    let a = &spec.architecture;
    let j = InspectJson {
        name: &m.name,
        version: m.version,
        producer: &m.producer,
        created: format_unix_ms(m.created_unix_ms),
        created_unix_ms: m.created_unix_ms,
        path: model.path().display().to_string(),
        file_len: model.header().file_len,
        format_version: model.header().version,
        body_checksum: format!("{:#018x}", model.header().body_checksum),
        checksum_verified: model.integrity() == Integrity::Verified,
        kind: a.kind(),
        metrics: m
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::json!(v)))
            .collect(),
        properties: m
            .properties
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect(),
        hash_seed: spec.features.hash_seed,
        features: &spec.features.features,
        slots: model
            .compiled()
            .slots()
            .iter()
            .zip(&spec.features.slots)
            .map(|(s, slot)| SlotJson {
                name: &s.name,
                kind: match s.kind {
                    SlotKind::Ids { .. } => "ids",
                    SlotKind::Dense => "dense",
                },
                num_ids: s.kind.num_ids(),
                transform: describe_transform(&slot.transform),
            })
            .collect(),
        embeddings: a
            .embeddings
            .iter()
            .map(|e| EmbeddingJson {
                slot: &e.slot,
                rows: e.rows,
                dim: e.dim,
                pooling: e.pooling,
                bytes: e.weights.len * 4,
            })
            .collect(),
        wide: a.wide.as_ref(),
        deep_input_dim: if a.deep.is_empty() && a.multitask.is_none() {
            0
        } else {
            a.deep_input_dim()
        },
        heads: a.multitask.as_ref().map_or(Vec::new(), |m| {
            m.heads.iter().map(|h| h.name.as_str()).collect()
        }),
        experts: a.multitask.as_ref().map_or(0, |m| m.experts.len()),
        dense_inputs: &a.dense_inputs,
        deep: a
            .deep
            .iter()
            .map(|l| LayerJson {
                in_dim: l.in_dim,
                out_dim: l.out_dim,
                activation: l.activation,
            })
            .collect(),
        fm: a.fm,
        spec,
    };
    Ok(serde_json::to_string_pretty(&j)?)
}

/// A model file to open: a local path as it is, or an `hdfs://` file downloaded into a
/// temporary directory, checked on the bytes as they arrive (held alive by the returned guard).
fn local_copy(path: &Path) -> Result<(std::path::PathBuf, Option<tempfile::TempDir>)> {
    match rankd_storage::Location::from_path(path)? {
        rankd_storage::Location::Local(p) => Ok((p, None)),
        rankd_storage::Location::Hdfs(h) => {
            let hdfs = rankd_storage::Hdfs::for_path(&h, &rankd_storage::HdfsSettings::default())?;
            let len = hdfs
                .stat(&h.path)?
                .with_context(|| format!("{} does not exist", h.url()))?
                .len;
            let dir = tempfile::tempdir()?;
            let local = dir.path().join("model.rkm");
            let mut check = rankd_formats::StreamCheck::new(len);
            hdfs.download(&h.path, &local, &mut |b| {
                check.update(b).map_err(|e| e.to_string())
            })?;
            Ok((local, Some(dir)))
        }
    }
}

/// `rankd-tool inspect FILE [--json]` (a local path or an `hdfs://` URL).
pub fn inspect(path: &Path, json: bool, out: &mut dyn Write) -> Result<()> {
    let (local, _guard) = local_copy(path)?;
    let model =
        ModelFile::open(&local).with_context(|| format!("cannot open {}", path.display()))?;
    let text = if json {
        format!("{}\n", inspect_json(&model)?)
    } else {
        inspect_text(&model)
    };
    // Name the file as the user did, not its temporary copy.
    let shown = path.display().to_string();
    let text = text.replace(&local.display().to_string(), &shown);
    write!(out, "{text}")?;
    Ok(())
}

/// `rankd-tool validate FILE...`: a line per file; an error if any is invalid.
pub fn validate(paths: &[std::path::PathBuf], out: &mut dyn Write) -> Result<()> {
    let mut bad = 0;
    for p in paths {
        let start = Instant::now();
        let opened = local_copy(p).and_then(|(local, guard)| {
            let m = ModelFile::open(&local)?;
            Ok((m, guard))
        });
        match opened.map(|(m, _guard)| m) {
            Ok(model) => {
                let spec = model.spec();
                writeln!(
                    out,
                    "ok      {}: {} v{} ({}, {}, checked in {:.1} ms)",
                    p.display(),
                    spec.metadata.name,
                    spec.metadata.version,
                    spec.architecture.kind(),
                    human_bytes(model.header().file_len),
                    start.elapsed().as_secs_f64() * 1e3
                )?;
            }
            Err(e) => {
                bad += 1;
                writeln!(out, "invalid {}: {e}", p.display())?;
            }
        }
    }
    if bad > 0 {
        anyhow::bail!("{bad} of {} model files are invalid", paths.len());
    }
    Ok(())
}
