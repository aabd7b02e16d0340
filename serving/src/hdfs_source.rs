//! The model root on HDFS (`models = "hdfs://..."`). HDFS offers neither memory maps nor change
//! events to hdfs-native, so the reload thread polls: [`HdfsSource::sync`] lists
//! `ROOT/<name>/<version>/`, downloads each version the model's policy wants into the local cache
//! (`[hdfs] cache_dir`, the same layout), checking the file on the bytes as they stream in
//! (everything the local open checks: a corrupt file never lands), and deletes cached versions
//! that left the policy. The registry then loads from the cache exactly as from a local root, so
//! warm-up, swap and drain are the local deploy's.
//!
//! A failed listing or download changes nothing in the cache: the daemon keeps serving what it
//! has, and the caller backs off. An empty root, or a model directory with no version that
//! serves, does not unload anything either (a restarted NameNode, a deploy in progress); a model
//! is unloaded when its directory is deleted. A cached version carries a `.source` file (length, modification
//! time and path on HDFS); a restart reuses every cached file whose source is unchanged.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rankd_formats::StreamCheck;
use rankd_storage::{Entry, Hdfs, HdfsPath, HdfsSettings, Location, StorageError};

use crate::config::ServerConfig;
use crate::registry::wanted_of;

/// What one poll did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Versions downloaded: (model, version, bytes, seconds).
    pub downloaded: Vec<(String, u64, u64, f64)>,
    /// Files refused (corrupt, truncated, not a model): (path, reason).
    pub rejected: Vec<(String, String)>,
    /// Cached versions removed: (model, version).
    pub removed: Vec<(String, u64)>,
    /// Models whose listing or download failed this time (their cache is kept): (model, error).
    pub failed: Vec<(String, String)>,
}

impl SyncReport {
    /// Whether the cache changed.
    pub fn changed(&self) -> bool {
        !self.downloaded.is_empty() || !self.removed.is_empty()
    }
}

/// The HDFS model root and its local cache.
#[derive(Debug)]
pub struct HdfsSource {
    hdfs: std::sync::Arc<Hdfs>,
    root: HdfsPath,
    cache: PathBuf,
    /// Files refused, by HDFS path, with the (length, mtime) they had: not downloaded again
    /// until they change.
    rejected: HashMap<String, (u64, u64)>,
}

fn is_hidden(name: &str) -> bool {
    name.starts_with('.') || name.starts_with('_')
}

impl HdfsSource {
    /// The source of `config`'s model root when it is on HDFS.
    pub fn new(config: &ServerConfig) -> Result<Option<HdfsSource>, StorageError> {
        let Ok(Location::Hdfs(root)) = config.model_source() else {
            return Ok(None);
        };
        let settings = HdfsSettings {
            timeout: Duration::from_millis(config.hdfs.timeout_ms),
            config: config.hdfs.config.clone(),
        };
        let hdfs = Hdfs::for_path(&root, &settings)?;
        let cache = config.model_root();
        std::fs::create_dir_all(&cache).map_err(|e| StorageError::Local {
            path: cache.display().to_string(),
            source: e,
        })?;
        Ok(Some(HdfsSource {
            hdfs,
            root,
            cache,
            rejected: HashMap::new(),
        }))
    }

    /// The local cache directory (the registry's root).
    pub fn cache(&self) -> &Path {
        &self.cache
    }

    /// One poll: list, download what the policies want, drop what they no longer want. On an
    /// error the cache is left as it was (downloads finished before it stay).
    pub fn sync(&mut self, config: &ServerConfig) -> Result<SyncReport, StorageError> {
        let mut report = SyncReport::default();
        let models: Vec<Entry> = self
            .hdfs
            .list(&self.root.path)?
            .into_iter()
            .filter(|e| e.is_dir && !is_hidden(&e.name))
            .collect();
        let mut keep: BTreeSet<(String, u64)> = BTreeSet::new();
        if models.is_empty() {
            // An empty root (a reformatted or freshly restarted NameNode, a root being rebuilt)
            // is no reason to stop serving: keep everything cached.
            return Ok(report);
        }
        for m in &models {
            // A failure inside one model (a missing block, a permission, a full disk) keeps that
            // model's cache as it is and leaves the other models alone.
            if let Err(e) = self.sync_model(config, m, &mut keep, &mut report) {
                report.failed.push((m.name.clone(), e.to_string()));
                for v in self.cached_versions(&m.name) {
                    keep.insert((m.name.clone(), v));
                }
            }
        }
        self.prune(&keep, &mut report);
        Ok(report)
    }

    /// One model's part of [`Self::sync`]: adds the versions to keep.
    fn sync_model(
        &mut self,
        config: &ServerConfig,
        m: &Entry,
        keep: &mut BTreeSet<(String, u64)>,
        report: &mut SyncReport,
    ) -> Result<(), StorageError> {
        {
            let versions: Vec<(u64, Entry)> = self
                .hdfs
                .list(&m.path)?
                .into_iter()
                .filter(|e| e.is_dir && !is_hidden(&e.name))
                .filter_map(|e| Some((e.name.parse::<u64>().ok()?, e)))
                .collect();
            let policy = config.model.get(&m.name).cloned().unwrap_or_default();
            let mut all: Vec<u64> = versions.iter().map(|(v, _)| *v).collect();
            all.sort_unstable();
            let (candidates, limit) = wanted_of(&policy, all);
            let mut taken = 0;
            let labelled: Vec<u64> = policy.labels.values().copied().collect();
            for v in candidates.into_iter().chain(labelled) {
                let by_label = taken >= limit;
                if by_label && !policy.labels.values().any(|l| *l == v) {
                    continue;
                }
                if keep.contains(&(m.name.clone(), v)) {
                    continue;
                }
                let Some((_, dir)) = versions.iter().find(|(x, _)| *x == v) else {
                    continue;
                };
                if self.ensure(&m.name, v, dir, report)? {
                    keep.insert((m.name.clone(), v));
                    if !by_label {
                        taken += 1;
                    }
                }
            }
            if !keep.iter().any(|(n, _)| n == &m.name) {
                // The model's directory holds no version that serves (a deploy in progress, every
                // version refused): what is cached keeps serving. Deleting the model's
                // directory on HDFS is what unloads it.
                for v in self.cached_versions(&m.name) {
                    keep.insert((m.name.clone(), v));
                }
            }
        }
        Ok(())
    }

    /// Makes `<cache>/<name>/<v>/model.rkm` a verified copy of the version's file; false when
    /// the file is refused.
    fn ensure(
        &mut self,
        name: &str,
        v: u64,
        dir: &Entry,
        report: &mut SyncReport,
    ) -> Result<bool, StorageError> {
        let files: Vec<Entry> = self
            .hdfs
            .list(&dir.path)?
            .into_iter()
            .filter(|e| !e.is_dir && !is_hidden(&e.name))
            .collect();
        let rkm: Vec<&Entry> = files.iter().filter(|e| e.name.ends_with(".rkm")).collect();
        let file = match (files.iter().find(|e| e.name == "model.rkm"), rkm.as_slice()) {
            (Some(f), _) => f,
            (None, [one]) => *one,
            (None, _) => {
                let why = format!("{} .rkm files; expected one (or model.rkm)", rkm.len());
                if self.rejected.insert(dir.path.clone(), (0, 0)).is_none() {
                    report.rejected.push((dir.path.clone(), why));
                }
                return Ok(false);
            }
        };
        let stamp = format!("{} {} {}", file.len, file.mtime_ms, file.path);
        let vdir = self.cache.join(name).join(v.to_string());
        let cached = vdir.join("model.rkm");
        if std::fs::read_to_string(vdir.join(".source")).is_ok_and(|s| s == stamp)
            && std::fs::metadata(&cached).is_ok_and(|m| m.len() == file.len)
        {
            return Ok(true);
        }
        if self.rejected.get(&file.path) == Some(&(file.len, file.mtime_ms)) {
            return Ok(false);
        }
        let model_dir = self.cache.join(name);
        let local = |e: std::io::Error| StorageError::Local {
            path: model_dir.display().to_string(),
            source: e,
        };
        std::fs::create_dir_all(&model_dir).map_err(local)?;
        // Hidden until complete: the registry skips dot-names.
        let tmp = model_dir.join(format!(".{v}.download"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(local)?;
        let start = Instant::now();
        let mut check = StreamCheck::new(file.len);
        let got = self
            .hdfs
            .download(&file.path, &tmp.join("model.rkm"), &mut |b| {
                check.update(b).map_err(|e| e.to_string())
            });
        let outcome = got.and_then(|n| {
            if n != file.len {
                return Err(StorageError::Rejected {
                    path: file.path.clone(),
                    message: format!("{n} bytes arrived of {}", file.len),
                });
            }
            check.finish().map_err(|e| StorageError::Rejected {
                path: file.path.clone(),
                message: e.to_string(),
            })?;
            Ok(n)
        });
        match outcome {
            Ok(n) => {
                std::fs::write(tmp.join(".source"), &stamp).map_err(local)?;
                let _ = std::fs::remove_dir_all(&vdir);
                std::fs::rename(&tmp, &vdir).map_err(local)?;
                self.rejected.remove(&file.path);
                report
                    .downloaded
                    .push((name.to_owned(), v, n, start.elapsed().as_secs_f64()));
                Ok(true)
            }
            Err(StorageError::Rejected { path, message }) => {
                let _ = std::fs::remove_dir_all(&tmp);
                self.rejected
                    .insert(file.path.clone(), (file.len, file.mtime_ms));
                report.rejected.push((path, message));
                Ok(false)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                Err(e)
            }
        }
    }

    /// Files under the cache that the registry refused: each one's version directory is
    /// removed, and its HDFS file is not downloaded again until it changes (length or
    /// modification time). Other paths are ignored.
    pub fn refused<'a>(&mut self, paths: impl IntoIterator<Item = &'a Path>) {
        for p in paths {
            let Ok(rel) = p.strip_prefix(&self.cache) else {
                continue;
            };
            let mut parts = rel.components();
            let (Some(name), Some(version)) = (parts.next(), parts.next()) else {
                continue;
            };
            let vdir = self.cache.join(name).join(version);
            if let Ok(stamp) = std::fs::read_to_string(vdir.join(".source")) {
                let mut it = stamp.splitn(3, ' ');
                if let (Some(len), Some(mtime), Some(path)) = (it.next(), it.next(), it.next()) {
                    if let (Ok(len), Ok(mtime)) = (len.parse(), mtime.parse()) {
                        self.rejected.insert(path.to_owned(), (len, mtime));
                    }
                }
            }
            let _ = std::fs::remove_dir_all(&vdir);
        }
    }

    fn cached_versions(&self, name: &str) -> Vec<u64> {
        std::fs::read_dir(self.cache.join(name))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u64>().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes cached versions (and models) not in `keep`. A mapped file stays readable until
    /// its last request is done: the registry unmaps it, the kernel frees it.
    fn prune(&self, keep: &BTreeSet<(String, u64)>, report: &mut SyncReport) {
        let Ok(models) = std::fs::read_dir(&self.cache) else {
            return;
        };
        for m in models.flatten() {
            let Some(name) = m.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if is_hidden(&name) || !m.path().is_dir() {
                continue;
            }
            let Ok(versions) = std::fs::read_dir(m.path()) else {
                continue;
            };
            for e in versions.flatten() {
                let name_of = e.file_name();
                let file_name = name_of.to_str().unwrap_or("");
                if file_name.starts_with('.') && file_name.ends_with(".download") {
                    // Left by a download that a crash interrupted (downloads only run inside
                    // a sync, so none is in progress now).
                    let _ = std::fs::remove_dir_all(e.path());
                    continue;
                }
                let Ok(v) = file_name.parse::<u64>() else {
                    continue;
                };
                if !keep.contains(&(name.clone(), v)) && std::fs::remove_dir_all(e.path()).is_ok() {
                    report.removed.push((name.clone(), v));
                }
            }
            // An empty model directory goes too.
            let _ = std::fs::remove_dir(m.path());
        }
    }
}

/// How long to wait before the next poll after `failures` failed polls in a row: the interval,
/// doubled per failure, at most `max_backoff_ms`.
pub fn poll_delay(config: &ServerConfig, failures: u32) -> Duration {
    let base = config.hdfs.poll_interval_ms;
    let ms = base
        .saturating_mul(1u64 << failures.min(16))
        .min(config.hdfs.max_backoff_ms.max(base));
    Duration::from_millis(ms)
}

/// One poll with its log lines and metrics. Returns whether it succeeded.
pub fn poll(
    source: &mut HdfsSource,
    config: &ServerConfig,
    metrics: &crate::metrics::Metrics,
    failures: &mut u32,
) -> bool {
    use std::sync::atomic::Ordering;
    metrics.hdfs_polls.fetch_add(1, Ordering::Relaxed);
    match source.sync(config) {
        Ok(report) => {
            if *failures > 0 {
                eprintln!(
                    "rankd: hdfs {} reachable again after {} failed polls",
                    source.root.url(),
                    failures
                );
            }
            *failures = 0;
            metrics.hdfs_up.store(1, Ordering::Relaxed);
            for (name, v, bytes, secs) in &report.downloaded {
                metrics.hdfs_downloads.fetch_add(1, Ordering::Relaxed);
                metrics
                    .hdfs_download_bytes
                    .fetch_add(*bytes, Ordering::Relaxed);
                eprintln!(
                    "rankd: downloaded {name}/{v} from hdfs ({bytes} bytes in {:.0} ms, {:.0} MiB/s, verified)",
                    secs * 1e3,
                    *bytes as f64 / (1 << 20) as f64 / secs.max(1e-9)
                );
            }
            for (path, why) in &report.rejected {
                metrics.load_failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("rankd: rejected {path} on hdfs: {why}");
            }
            for (name, v) in &report.removed {
                eprintln!("rankd: dropped {name}/{v} from the hdfs cache");
            }
            for (name, why) in &report.failed {
                metrics.hdfs_poll_failures.fetch_add(1, Ordering::Relaxed);
                eprintln!("rankd: hdfs poll of model `{name}` failed: {why}; its cached versions keep serving");
            }
            true
        }
        Err(e) => {
            *failures += 1;
            metrics.hdfs_up.store(0, Ordering::Relaxed);
            metrics.hdfs_poll_failures.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "rankd: hdfs poll failed ({} in a row): {e}; serving what is loaded; next poll in {} ms",
                failures,
                poll_delay(config, *failures).as_millis()
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_limit() {
        let mut c = ServerConfig::default();
        c.hdfs.poll_interval_ms = 500;
        c.hdfs.max_backoff_ms = 3_000;
        let d: Vec<u64> = (0..6)
            .map(|f| poll_delay(&c, f).as_millis() as u64)
            .collect();
        assert_eq!(d, [500, 1000, 2000, 3000, 3000, 3000]);
        assert_eq!(poll_delay(&c, 1000).as_millis(), 3000);
    }

    #[test]
    fn a_cached_copy_the_registry_refused_is_dropped_and_not_fetched_again() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = ServerConfig {
            models: "hdfs://127.0.0.1:1/models".into(),
            ..ServerConfig::default()
        };
        c.hdfs.cache_dir = Some(dir.path().to_path_buf());
        // Connecting is lazy: no NameNode is needed to build the source.
        let mut src = HdfsSource::new(&c).unwrap().unwrap();
        let vdir = dir.path().join("feed").join("7");
        std::fs::create_dir_all(&vdir).unwrap();
        std::fs::write(vdir.join("model.rkm"), b"damaged").unwrap();
        std::fs::write(vdir.join(".source"), "7 1234 /models/feed/7/model.rkm").unwrap();
        let other = std::path::PathBuf::from("/elsewhere/feed/1/model.rkm");
        src.refused([vdir.join("model.rkm").as_path(), other.as_path()]);
        assert!(!vdir.exists());
        assert_eq!(
            src.rejected.get("/models/feed/7/model.rkm"),
            Some(&(7, 1234))
        );
        assert_eq!(src.rejected.len(), 1);
    }

    #[test]
    fn a_local_root_has_no_hdfs_source() {
        let c = ServerConfig::default();
        assert!(HdfsSource::new(&c).unwrap().is_none());
        let bad = ServerConfig {
            models: "s3://bucket/models".into(),
            ..ServerConfig::default()
        };
        assert!(bad.check().unwrap_err().contains("unsupported scheme"));
    }
}
