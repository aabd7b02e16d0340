//! The model registry: which model versions are loaded, their labels and traffic split, and
//! how a request's version selector picks one.
//!
//! A registry is an immutable snapshot; each core holds its own `Arc` to the current one (the
//! models inside are shared read-only: their weights are one memory map). A new snapshot is
//! built off the request path and handed to the cores as a message.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::config::{ModelPolicy, ServerConfig, VersionPolicy};
use crate::engine::Model;
use crate::protocol::ErrorCode;

/// One model with its loaded versions.
#[derive(Clone, Debug, Default)]
pub struct ModelEntry {
    /// Loaded versions.
    pub versions: BTreeMap<u64, Arc<Model>>,
    /// Labels that point at loaded versions.
    pub labels: BTreeMap<String, u64>,
    /// Label weights of the traffic split (labels that point at loaded versions).
    pub split: Vec<(String, u32)>,
}

impl ModelEntry {
    /// The version served when the request names neither a version nor a label, for
    /// `routing_key`.
    pub fn route(&self, routing_key: &[u8]) -> Option<u64> {
        let total: u64 = self.split.iter().map(|(_, w)| u64::from(*w)).sum();
        if total > 0 {
            let mut point = xxhash_rust::xxh3::xxh3_64(routing_key) % total;
            for (label, w) in &self.split {
                if point < u64::from(*w) {
                    return self.labels.get(label).copied();
                }
                point -= u64::from(*w);
            }
        }
        self.versions.keys().next_back().copied()
    }
}

/// A snapshot of everything being served.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    /// Models by name.
    pub models: BTreeMap<String, ModelEntry>,
    /// Models the config names (for readiness).
    pub configured: Vec<String>,
}

/// A problem found while loading, reported and skipped.
#[derive(Debug, Clone)]
pub struct LoadProblem {
    /// The path.
    pub path: PathBuf,
    /// What is wrong.
    pub message: String,
}

/// Model files that failed to load, by path, with the length and modification time they had:
/// an unchanged file is not reopened (and not reported again) on the next scan.
pub type RejectCache = std::collections::HashMap<PathBuf, (u64, Option<std::time::SystemTime>)>;

fn file_stamp(path: &Path) -> (u64, Option<std::time::SystemTime>) {
    std::fs::metadata(path).map_or((0, None), |m| (m.len(), m.modified().ok()))
}

/// Opens a model and scores one empty item with it, then replays `recent` (request bodies
/// this model name served lately, see [`WarmupSamples`]), so that its tables, plans and the
/// rows and vocabulary entries the first requests touch are in memory and in the shared caches
/// before it serves. Bodies that do not fit the new version are skipped.
///
/// `verify` says how the checksum is verified (threads, pace), `options` how the model is
/// prepared (`[engine]`). Returns the model and how many of `recent` were replayed.
pub fn open_and_warm(
    path: &Path,
    verify: rankd_formats::Verify,
    options: rankd_engine::ModelOptions,
    recent: &[Vec<u8>],
) -> Result<(Model, usize), rankd_formats::FormatError> {
    use crate::engine::{cpu::CpuEngine, request::DenseRequest, BatchOutput, InferenceBackend};
    let model = Model::with_options(
        rankd_formats::ModelFile::open_verified(path, verify)?,
        options,
    );
    let req = DenseRequest {
        user: Vec::new(),
        items: vec![Vec::new()],
    };
    let mut engine = CpuEngine::new();
    let mut out = BatchOutput::default();
    engine.score(&model, &[&req], &mut out);
    let mut replayed = 0;
    for body in recent {
        let Ok(req) = flatbuffers::root_with_opts::<crate::gen::rankd::rpc::ScoreRequest<'_>>(
            &crate::fbrequest::verifier_options(),
            body,
        ) else {
            continue;
        };
        if let Ok(view) = crate::fbrequest::FbRequest::new(model.features(), req) {
            out.clear();
            engine.score(&model, &[&view], &mut out);
            replayed += 1;
        }
    }
    Ok((model, replayed))
}

/// Recent request bodies per model name, sampled by the cores (one in
/// [`WarmupSamples::EVERY`] answered requests, the last [`WarmupSamples::KEEP`] kept) and
/// replayed on each new version before it serves: otherwise the first requests on a new version
/// fetch every embedding row and vocabulary entry from memory while the old version's were hot in
/// the caches.
#[derive(Debug, Default)]
pub struct WarmupSamples {
    by_model:
        std::sync::Mutex<std::collections::HashMap<String, std::collections::VecDeque<Vec<u8>>>>,
}

impl WarmupSamples {
    /// Bodies kept per model.
    pub const KEEP: usize = 8;
    /// A core offers one in this many answered requests.
    pub const EVERY: u32 = 64;

    /// Keeps a copy of `body` for `model`. Never waits: if the lock is busy the sample is
    /// dropped.
    pub fn offer(&self, model: &str, body: &[u8]) {
        let Ok(mut map) = self.by_model.try_lock() else {
            return;
        };
        let queue = match map.get_mut(model) {
            Some(q) => q,
            None => map.entry(model.to_owned()).or_default(),
        };
        if queue.len() == Self::KEEP {
            queue.pop_front();
        }
        queue.push_back(body.to_vec());
    }

    /// The kept bodies of `model`, oldest first.
    pub fn recent(&self, model: &str) -> Vec<Vec<u8>> {
        self.by_model
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(model)
            .map(|q| q.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// What a request's selector resolved to.
#[derive(Debug, Clone)]
pub struct Selected {
    /// The model.
    pub model: Arc<Model>,
    /// Its version.
    pub version: u64,
}

fn versions_on_disk(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(v) = name.to_str().and_then(|s| s.parse::<u64>().ok()) else {
            continue;
        };
        if e.path().is_dir() {
            out.push((v, e.path()));
        }
    }
    out.sort();
    out
}

/// The model file of a version directory: `model.rkm`, else the only `*.rkm` file.
pub fn model_file(version_dir: &Path) -> Result<PathBuf, String> {
    let preferred = version_dir.join("model.rkm");
    if preferred.is_file() {
        return Ok(preferred);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(version_dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rkm") && p.is_file())
        .collect();
    found.sort();
    match found.len() {
        0 => Err("no .rkm model file".into()),
        1 => Ok(found.remove(0)),
        _ => Err(format!(
            "{} .rkm files; expected one (or model.rkm)",
            found.len()
        )),
    }
}

/// The model directories under the root, by name: directories whose names are UTF-8 and do not
/// start with `.` (deploys copy into hidden ones).
pub(crate) fn model_dirs(root: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut names: Vec<(String, PathBuf)> = std::fs::read_dir(root)?
        .flatten()
        .filter(|e| e.path().is_dir())
        .filter_map(|e| Some((e.file_name().to_str()?.to_owned(), e.path())))
        .filter(|(n, _)| !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}

/// The versions to try, in order, and how many of them to load.
fn wanted(policy: &ModelPolicy, on_disk: &[(u64, PathBuf)]) -> (Vec<u64>, usize) {
    let all: Vec<u64> = on_disk.iter().map(|(v, _)| *v).collect();
    wanted_of(policy, all)
}

/// [`wanted`] over plain version numbers (sorted ascending): the candidates in the order to try
/// them, and how many of them to take. Label targets come on top.
pub fn wanted_of(policy: &ModelPolicy, all: Vec<u64>) -> (Vec<u64>, usize) {
    match &policy.versions {
        VersionPolicy::List(list) => (
            all.iter().copied().filter(|v| list.contains(v)).collect(),
            usize::MAX,
        ),
        VersionPolicy::Named(n) if n == "all" => (all, usize::MAX),
        VersionPolicy::Named(_) => (all.into_iter().rev().collect(), policy.latest.unwrap_or(1)),
    }
}

impl Registry {
    /// Scans the model root and loads (opens and fully verifies) every version the policies
    /// want. Versions already open in `previous` are reused, not reopened. Problems are
    /// returned beside the registry; they never stop the other models.
    pub fn load(
        config: &ServerConfig,
        previous: Option<&Registry>,
        rejected: &mut RejectCache,
        samples: Option<&WarmupSamples>,
        gpus: Option<&Arc<rankd_engine::gpu::Gpus>>,
    ) -> (Registry, Vec<LoadProblem>) {
        let mut problems = Vec::new();
        let mut reg = Registry {
            configured: config.model.keys().cloned().collect(),
            ..Registry::default()
        };
        let root = config.model_root();
        let Ok(names) = model_dirs(&root) else {
            problems.push(LoadProblem {
                path: root,
                message: "cannot read the model root".into(),
            });
            return (reg, problems);
        };
        for (name, dir) in names {
            let policy = config.model.get(&name).cloned().unwrap_or_default();
            let on_disk = versions_on_disk(&dir);
            let mut entry = ModelEntry::default();
            let mut try_load = |v: u64, entry: &mut ModelEntry| -> bool {
                let Some((_, vdir)) = on_disk.iter().find(|(x, _)| *x == v) else {
                    return false;
                };
                if let Some(m) = previous
                    .and_then(|p| p.models.get(&name))
                    .and_then(|e| e.versions.get(&v))
                {
                    entry.versions.insert(v, m.clone());
                    return true;
                }
                let file = match model_file(vdir) {
                    Ok(f) => f,
                    Err(message) => {
                        problems.push(LoadProblem {
                            path: vdir.clone(),
                            message,
                        });
                        return false;
                    }
                };
                let stamp = file_stamp(&file);
                if rejected.get(&file) == Some(&stamp) {
                    return false;
                }
                // At startup use every core; a background reload uses one thread, paced.
                let verify = if previous.is_some() {
                    rankd_formats::Verify {
                        threads: 1,
                        max_bytes_per_sec: match config.reload_verify_mib_per_sec {
                            0 => None,
                            mib => Some(mib.saturating_mul(1 << 20)),
                        },
                    }
                } else {
                    rankd_formats::Verify::threads(
                        std::thread::available_parallelism().map_or(1, |n| n.get()),
                    )
                };
                let recent = samples.map(|s| s.recent(&name)).unwrap_or_default();
                match open_and_warm(&file, verify, config.engine.model_options(), &recent) {
                    Ok((m, replayed)) => {
                        if previous.is_some() {
                            eprintln!(
                                "rankd: opened {} (verified, warmed with {replayed} recent requests)",
                                file.display()
                            );
                        }
                        rejected.remove(&file);
                        let m = Arc::new(m);
                        // Weights go to every GPU now, before the version serves; a version
                        // a GPU refuses (too large) is served by the CPU engine.
                        if let Some(g) = gpus {
                            if let Err(e) = g.load(&m) {
                                eprintln!(
                                    "rankd: {} is served by the CPU engine: {e}",
                                    file.display()
                                );
                            }
                        }
                        entry.versions.insert(v, m);
                        true
                    }
                    Err(e) => {
                        rejected.insert(file.clone(), stamp);
                        problems.push(LoadProblem {
                            path: file,
                            message: e.to_string(),
                        });
                        false
                    }
                }
            };
            // "latest N" means the N newest versions that load: a rejected newest version
            // leaves the previous one serving.
            let (candidates, limit) = wanted(&policy, &on_disk);
            let mut loaded = 0;
            for v in candidates {
                if loaded >= limit {
                    break;
                }
                if try_load(v, &mut entry) {
                    loaded += 1;
                }
            }
            for &v in policy.labels.values() {
                if !entry.versions.contains_key(&v) {
                    try_load(v, &mut entry);
                }
            }
            for (label, v) in &policy.labels {
                if entry.versions.contains_key(v) {
                    entry.labels.insert(label.clone(), *v);
                } else if previous.is_none() {
                    problems.push(LoadProblem {
                        path: dir.clone(),
                        message: format!(
                            "label `{label}` points at version {v}, which is not loaded"
                        ),
                    });
                }
            }
            entry.split = policy
                .split
                .iter()
                .filter(|(l, _)| entry.labels.contains_key(*l))
                .map(|(l, w)| (l.clone(), *w))
                .collect();
            if !entry.versions.is_empty() {
                reg.models.insert(name, entry);
            }
        }
        (reg, problems)
    }

    /// Keeps online updates published while this snapshot was being built from `start`: a
    /// version this snapshot took over from `start` unchanged, which `live` (the snapshot
    /// published now) serves as an updated model on the same file, is taken from `live`.
    pub fn keep_updates(&mut self, start: &Registry, live: &Registry) {
        for (name, entry) in &mut self.models {
            for (v, m) in &mut entry.versions {
                let from_start = start
                    .models
                    .get(name)
                    .and_then(|e| e.versions.get(v))
                    .is_some_and(|s| Arc::ptr_eq(s, m));
                let Some(l) = live.models.get(name).and_then(|e| e.versions.get(v)) else {
                    continue;
                };
                if from_start && !Arc::ptr_eq(l, m) && std::ptr::eq(l.file(), m.file()) {
                    *m = l.clone();
                }
            }
        }
    }

    /// Every loaded version, for the metrics.
    pub fn loaded(&self) -> Vec<crate::metrics::LoadedVersion<'_>> {
        self.models
            .iter()
            .flat_map(|(name, e)| {
                e.versions
                    .iter()
                    .map(move |(v, m)| crate::metrics::LoadedVersion {
                        model: name,
                        version: *v,
                        mapped_bytes: m.file().mapped_len(),
                        backend: m.backend(),
                    })
            })
            .collect()
    }

    /// Whether two snapshots serve the same things (same model objects, labels and split).
    pub fn same_as(&self, other: &Registry) -> bool {
        self.models.len() == other.models.len()
            && self
                .models
                .iter()
                .zip(&other.models)
                .all(|((na, a), (nb, b))| {
                    na == nb
                        && a.labels == b.labels
                        && a.split == b.split
                        && a.versions.len() == b.versions.len()
                        && a.versions
                            .iter()
                            .zip(&b.versions)
                            .all(|((va, ma), (vb, mb))| va == vb && Arc::ptr_eq(ma, mb))
                })
    }

    /// Ready when every configured model (or, with none configured, at least one model) has a
    /// servable version.
    pub fn ready(&self) -> bool {
        if self.configured.is_empty() {
            !self.models.is_empty()
        } else {
            self.configured.iter().all(|m| self.models.contains_key(m))
        }
    }

    /// Resolves a request's selector.
    pub fn select(
        &self,
        model: &str,
        version: u64,
        label: &str,
        routing_key: &[u8],
    ) -> Result<Selected, (ErrorCode, String)> {
        let entry = self
            .models
            .get(model)
            .ok_or_else(|| (ErrorCode::UnknownModel, format!("unknown model `{model}`")))?;
        let v = if version != 0 {
            version
        } else if !label.is_empty() {
            *entry.labels.get(label).ok_or_else(|| {
                (
                    ErrorCode::UnknownVersion,
                    format!("model `{model}` has no label `{label}`"),
                )
            })?
        } else {
            entry.route(routing_key).ok_or_else(|| {
                (
                    ErrorCode::UnknownVersion,
                    format!("model `{model}` has no servable version"),
                )
            })?
        };
        let m = entry.versions.get(&v).ok_or_else(|| {
            (
                ErrorCode::UnknownVersion,
                format!("model `{model}` has no loaded version {v}"),
            )
        })?;
        Ok(Selected {
            model: m.clone(),
            version: v,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rankd_formats::synth::{write_synthetic, SynthOptions};

    #[test]
    fn warmup_samples_keep_the_newest_and_replay_skips_what_does_not_fit() {
        let samples = WarmupSamples::default();
        for i in 0..WarmupSamples::KEEP + 3 {
            samples.offer("m", &[i as u8]);
        }
        let kept = samples.recent("m");
        assert_eq!(kept.len(), WarmupSamples::KEEP);
        assert_eq!(kept[0], vec![3u8]);
        assert_eq!(
            kept[WarmupSamples::KEEP - 1],
            vec![WarmupSamples::KEEP as u8 + 2]
        );
        assert!(samples.recent("other").is_empty());

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.rkm");
        write_synthetic(&path, &SynthOptions::default()).unwrap();
        let valid = crate::client::ScoreRequest {
            model: "m".into(),
            items: vec![vec![], vec![]],
            ..Default::default()
        }
        .encode()
        .unwrap();
        let bodies = vec![
            b"not a flatbuffer".to_vec(),
            valid.clone(),
            Vec::new(),
            valid,
        ];
        let (model, replayed) = open_and_warm(
            &path,
            rankd_formats::Verify::threads(1),
            rankd_engine::ModelOptions::default(),
            &bodies,
        )
        .unwrap();
        assert_eq!(replayed, 2);
        assert!(model.deep_input_dim() > 0);
        // The replay built the plan the cores will need for that shape of request.
        assert!(model.shared_plans() > 0);
    }
}
