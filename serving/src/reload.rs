//! Hot reload: a background thread watches the model root (notify) and rescans it periodically
//! as a fallback, rereads the config file when it changes, builds a new registry snapshot off
//! the request path (new versions are opened, fully verified and warmed there), and publishes it.
//! Cores pick the new snapshot up before their next request; requests already queued keep the
//! version they started with, which is unmapped when the last of them is answered.
//!
//! A directory renamed into the tree produces one event for the directory and none for its
//! contents, so any event triggers a full rescan of the root rather than a reaction to the
//! event's path.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use notify::{RecursiveMode, Watcher};

use crate::config::ServerConfig;
use crate::registry::{Registry, RejectCache};
use crate::server::Shared;

fn config_stamp(path: &Option<PathBuf>) -> Option<SystemTime> {
    path.as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
}

/// Reloads the model policies of `current` from `path`; everything else needs a restart.
fn reread_config(current: &mut ServerConfig, path: &PathBuf) {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("rankd: config reload: cannot read {}: {e}", path.display());
            return;
        }
    };
    match ServerConfig::from_toml(&text) {
        Ok(new) => {
            if new.model != current.model {
                eprintln!("rankd: config reload: model policies changed");
            }
            current.model = new.model;
        }
        Err(e) => eprintln!(
            "rankd: config reload: {} is invalid, keeping the previous policies: {e}",
            path.display()
        ),
    }
}

/// Snapshots replaced by newer ones, kept here until nothing else holds their models, so that
/// unmapping a model (a page-table teardown of its whole file) happens on the reload thread and
/// never on a core serving requests.
#[derive(Debug, Default)]
pub struct Retired(Vec<Arc<Registry>>);

impl Retired {
    /// Drops the snapshots no core holds any more and whose models are either gone from every
    /// request or still part of `current`.
    pub fn reap(&mut self, current: &Registry) {
        self.0.retain(|r| {
            if Arc::strong_count(r) > 1 {
                return true;
            }
            r.models.iter().any(|(name, e)| {
                e.versions.iter().any(|(v, m)| {
                    let live = current
                        .models
                        .get(name)
                        .and_then(|c| c.versions.get(v))
                        .is_some_and(|cm| Arc::ptr_eq(cm, m));
                    !live && Arc::strong_count(m) > 1
                })
            })
        });
    }

    /// Whether anything waits to be dropped.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One scan: build a snapshot from the current one and publish it if anything changed. Returns
/// whether it published, and the files it refused.
pub fn rescan(
    shared: &Shared,
    config: &ServerConfig,
    rejected: &mut RejectCache,
    retired: &mut Retired,
) -> (bool, Vec<crate::registry::LoadProblem>) {
    shared.metrics.scans.fetch_add(1, Ordering::Relaxed);
    let current = shared.registry();
    let (next, problems) = Registry::load(
        config,
        Some(&current),
        rejected,
        Some(&shared.samples),
        shared.gpus.as_ref(),
    );
    for p in &problems {
        eprintln!("rankd: rejected {}: {}", p.path.display(), p.message);
    }
    shared
        .metrics
        .load_failures
        .fetch_add(problems.len() as u64, Ordering::Relaxed);
    if next.same_as(&current) {
        return (false, problems);
    }
    for (name, e) in &next.models {
        let versions: Vec<String> = e.versions.keys().map(u64::to_string).collect();
        eprintln!(
            "rankd: model `{name}`: now serving versions [{}]",
            versions.join(", ")
        );
    }
    for name in current
        .models
        .keys()
        .filter(|n| !next.models.contains_key(*n))
    {
        eprintln!("rankd: model `{name}`: unloaded");
    }
    let mut guard = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
    let mut next = next;
    // Online updates applied while this scan ran are kept.
    next.keep_updates(&current, &guard);
    let previous = std::mem::replace(&mut *guard, Arc::new(next));
    drop(guard);
    retired.0.push(previous);
    shared.generation.fetch_add(1, Ordering::SeqCst);
    shared.metrics.reloads.fetch_add(1, Ordering::Relaxed);
    (true, problems)
}

/// Keeps the calling thread (and the threads it starts later) off the serving cores when they are
/// pinned.
pub fn off_serving_cores(config: &ServerConfig) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = config.worker_threads();
    if config.pin_cores && workers < cpus {
        crate::server::set_affinity(workers..cpus);
    }
}

/// Puts reload work (checksums, warm-up) below the serving cores' priority.
fn idle_priority() {
    // SAFETY: plain syscalls on the calling thread with valid arguments; failures are ignored
    // (the reload then merely competes with the cores).
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        // SCHED_IDLE: run only when nothing else wants the CPU; fall back to a high nice value.
        let param = libc::sched_param { sched_priority: 0 };
        if libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) != 0 {
            libc::setpriority(libc::PRIO_PROCESS, tid, 19);
        }
    }
}

/// Starts the watcher thread.
pub fn start(
    shared: Arc<Shared>,
    config_path: Option<PathBuf>,
    mut rejected: RejectCache,
    mut hdfs: Option<crate::hdfs_source::HdfsSource>,
) -> std::io::Result<()> {
    let (tx, rx) = channel::<()>();
    let mut config = shared.config.clone();
    std::thread::Builder::new()
        .name("rankd-reload".into())
        .spawn(move || {
            // notify's thread inherits this thread's CPUs: created here, it stays off the
            // serving cores too. It keeps the normal priority (its work is a few system calls
            // per event, and events must not wait for an idle CPU).
            off_serving_cores(&config);
            // An HDFS root is polled, not watched: its cache is this thread's own.
            let mut watch = if config.watch && hdfs.is_none() {
                ModelWatch::new(&config.models, config_path.as_deref(), tx)
            } else {
                None
            };
            idle_priority();
            let interval = match config.rescan_interval_ms {
                0 => Duration::from_secs(3600 * 24 * 365),
                ms => Duration::from_millis(ms),
            };
            let mut stamp = config_stamp(&config_path);
            let mut retired = Retired::default();
            let mut last_scan = std::time::Instant::now();
            let mut hdfs_failures = 0u32;
            let mut next_poll =
                std::time::Instant::now() + crate::hdfs_source::poll_delay(&config, 0);
            loop {
                // While old snapshots wait to be dropped, wake up often to reap them.
                let wait = if !retired.is_empty() {
                    Duration::from_millis(50)
                } else if hdfs.is_some() {
                    next_poll.saturating_duration_since(std::time::Instant::now())
                } else {
                    interval
                };
                match rx.recv_timeout(wait) {
                    Ok(()) => {
                        // Let a burst of events (a copy, a rename) settle, then scan once.
                        std::thread::sleep(Duration::from_millis(10));
                        while rx.try_recv().is_ok() {}
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        retired.reap(&shared.registry());
                        let due = match hdfs {
                            Some(_) => std::time::Instant::now() >= next_poll,
                            None => last_scan.elapsed() >= interval,
                        };
                        if !due {
                            continue;
                        }
                    }
                    Err(RecvTimeoutError::Disconnected) => return,
                }
                last_scan = std::time::Instant::now();
                if shared.shutdown.load(Ordering::Relaxed) {
                    return;
                }
                let now = config_stamp(&config_path);
                if now != stamp {
                    stamp = now;
                    if let Some(p) = &config_path {
                        reread_config(&mut config, p);
                    }
                }
                if let Some(w) = &mut watch {
                    // Before the scan: a version renamed into a new model directory in between
                    // is then either seen by this scan or reported by the new watch.
                    w.sync(&config.models);
                }
                if let Some(source) = &mut hdfs {
                    let ok = crate::hdfs_source::poll(
                        source,
                        &config,
                        &shared.metrics,
                        &mut hdfs_failures,
                    );
                    next_poll = std::time::Instant::now()
                        + crate::hdfs_source::poll_delay(&config, hdfs_failures);
                    if !ok {
                        // Nothing changed in the cache: keep serving what is loaded.
                        retired.reap(&shared.registry());
                        continue;
                    }
                }
                let (_, problems) = rescan(&shared, &config, &mut rejected, &mut retired);
                if let Some(source) = &mut hdfs {
                    // A cached copy the registry refused (damaged on local disk) is dropped,
                    // and its HDFS file not downloaded again until it changes.
                    source.refused(problems.iter().map(|p| p.path.as_path()));
                }
                retired.reap(&shared.registry());
            }
        })?;
    Ok(())
}

/// The file watcher: the model root and each model directory in it, each non-recursively, plus
/// the config file's directory. Versions appear by renames into a model directory and models by
/// new directories in the root, so that is all there is to see; nothing inside a version or a
/// hidden directory is watched. (A recursive watch also watched every deploy's temporary
/// directory, took a write event per block of the copy, and had to move its watch when the
/// directory was renamed into place.)
struct ModelWatch {
    watcher: notify::RecommendedWatcher,
    dirs: HashSet<PathBuf>,
}

impl ModelWatch {
    /// Every event pings `tx`. `None` (logged) when the platform gives no watcher: the periodic
    /// rescan then does all the work.
    fn new(models: &Path, config_path: Option<&Path>, tx: Sender<()>) -> Option<ModelWatch> {
        let w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            // Opening and reading are not changes, and the scan itself opens every directory
            // it reads: reacting to those rescanned the root in a loop, every 10 ms.
            if ev.is_ok_and(|ev| !matches!(ev.kind, notify::EventKind::Access(_))) {
                let _ = tx.send(());
            }
        });
        let mut watcher = match w {
            Ok(w) => w,
            Err(e) => {
                eprintln!("rankd: no file watcher ({e}); relying on the periodic rescan");
                return None;
            }
        };
        if let Err(e) = watcher.watch(models, RecursiveMode::NonRecursive) {
            eprintln!(
                "rankd: cannot watch {} ({e}); relying on the periodic rescan",
                models.display()
            );
            return None;
        }
        // The config file may live elsewhere: watch its directory too.
        if let Some(dir) = config_path.and_then(|p| p.parent()) {
            let dir = if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            };
            let _ = watcher.watch(dir, RecursiveMode::NonRecursive);
        }
        let mut w = ModelWatch {
            watcher,
            dirs: HashSet::new(),
        };
        w.sync(models);
        Some(w)
    }

    /// Watches the model directories that appeared since the last call and forgets the ones
    /// that are gone.
    fn sync(&mut self, models: &Path) {
        let now: HashSet<PathBuf> = crate::registry::model_dirs(models)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, dir)| dir)
            .collect();
        for gone in self.dirs.difference(&now).cloned().collect::<Vec<_>>() {
            let _ = self.watcher.unwatch(&gone);
            self.dirs.remove(&gone);
        }
        for dir in now {
            if !self.dirs.contains(&dir) {
                if let Err(e) = self.watcher.watch(&dir, RecursiveMode::NonRecursive) {
                    // Logged once: the directory counts as handled, the rescan covers it.
                    eprintln!(
                        "rankd: cannot watch {} ({e}); the periodic rescan covers it",
                        dir.display()
                    );
                }
                self.dirs.insert(dir);
            }
        }
    }
}
