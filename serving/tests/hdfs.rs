//! The daemon serving a model root on a real HDFS (Hadoop's MiniDFSCluster, scripts/hdfs.sh):
//! versions deployed under load, a corrupt upload, the cache reused on restart, and the NameNode
//! stopped and killed while serving.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};
use rankd_serving::client::{Connection, FeatureValue, ScoreRequest};
use rankd_storage::testing::{cluster, private_cluster};
use rankd_storage::{Hdfs, HdfsPath, HdfsSettings, Location};

mod common;
use common::{metric, start_daemon, Daemon};

fn hdfs_path(url: &str) -> HdfsPath {
    match Location::parse(url).unwrap() {
        Location::Hdfs(h) => h,
        Location::Local(_) => panic!("not hdfs: {url}"),
    }
}

fn synth_file(dir: &Path, version: u64, seed: u64) -> std::path::PathBuf {
    let path = dir.join(format!("v{version}.rkm"));
    write_synthetic(
        &path,
        &SynthOptions {
            name: "feed".into(),
            version,
            kind: ModelKind::DeepFm,
            seed,
            ..SynthOptions::default()
        },
    )
    .unwrap();
    path
}

/// Puts a file at `ROOT/feed/<version>/model.rkm` the way a deploy does: a hidden directory,
/// then one rename.
fn put_version(hdfs: &Hdfs, root: &HdfsPath, version: u64, bytes: &[u8]) {
    let tmp = format!("{}/.up-{version}", root.path);
    hdfs.write_new(&mut &bytes[..], &format!("{tmp}/model.rkm"))
        .unwrap();
    hdfs.mkdirs(&format!("{}/feed", root.path)).unwrap();
    hdfs.rename(&tmp, &format!("{}/feed/{version}", root.path), false)
        .unwrap();
}

/// A model root at `url` holding version 1 of `feed`, with a local directory for the test.
fn root_with_v1(url: &str) -> (String, HdfsPath, Arc<Hdfs>, tempfile::TempDir) {
    let root = hdfs_path(url);
    let hdfs = Hdfs::for_path(&root, &HdfsSettings::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let v1 = std::fs::read(synth_file(dir.path(), 1, 1)).unwrap();
    put_version(&hdfs, &root, 1, &v1);
    (url.to_owned(), root, hdfs, dir)
}

fn start(models: &str, cache: &Path, extra: &str) -> Daemon {
    let dir = cache.parent().unwrap();
    let config = dir.join(format!(
        "rankd-{}.toml",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::write(
        &config,
        format!(
            "[hdfs]\ncache_dir = {:?}\npoll_interval_ms = 200\n{extra}",
            cache.display().to_string()
        ),
    )
    .unwrap();
    start_daemon(Path::new(models), Some(&config), &[])
}

fn request() -> ScoreRequest {
    ScoreRequest {
        model: "feed".into(),
        user: vec![("user_age".into(), FeatureValue::F64(30.0))],
        items: (0..20)
            .map(|i| vec![("item_id".into(), FeatureValue::I64(i))])
            .collect(),
        ..ScoreRequest::default()
    }
}

/// Requests in a loop on one connection until stopped: (ok, failed, last version seen).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    version: Arc<AtomicU64>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let version = Arc::new(AtomicU64::new(0));
        let (s, o, f, v) = (stop.clone(), ok.clone(), failed.clone(), version.clone());
        let handle = std::thread::spawn(move || {
            let mut c = Connection::connect(addr).unwrap();
            c.set_timeout(Some(Duration::from_secs(5))).unwrap();
            let req = request();
            while !s.load(Ordering::Relaxed) {
                match c.score(&req) {
                    Ok(r) => {
                        o.fetch_add(1, Ordering::Relaxed);
                        v.store(r.version, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("request failed: {e}");
                        f.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Load {
            stop,
            ok,
            failed,
            version,
            handle: Some(handle),
        }
    }

    fn finish(mut self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    start.elapsed()
}

fn http_status(admin: SocketAddr, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn serving_from_hdfs_deploys_under_load_and_a_corrupt_upload() {
    let Some(c) = cluster() else { return };
    let (url, root, hdfs, dir) = root_with_v1(&c.unique_dir("models"));
    let cache = dir.path().join("cache");
    let d = start(&url, &cache, "");
    let mut conn = Connection::connect(d.addr).unwrap();
    assert_eq!(conn.score(&request()).unwrap().version, 1);
    assert!(cache.join("feed/1/model.rkm").is_file());

    // A new version under load: picked up by polling, not one request fails.
    let load = Load::start(d.addr);
    std::thread::sleep(Duration::from_millis(300));
    let v2 = std::fs::read(synth_file(dir.path(), 2, 2)).unwrap();
    put_version(&hdfs, &root, 2, &v2);
    let took = wait_for("version 2", Duration::from_secs(30), || {
        load.version.load(Ordering::Relaxed) == 2
    });
    eprintln!("deploy to first response of v2: {} ms", took.as_millis());
    // A corrupt v3 (one flipped byte in the body): refused, never served, counted.
    let mut v3 = std::fs::read(synth_file(dir.path(), 3, 3)).unwrap();
    let mid = v3.len() / 2;
    v3[mid] ^= 0x40;
    put_version(&hdfs, &root, 3, &v3);
    wait_for(
        "the corrupt version's rejection",
        Duration::from_secs(30),
        || metric(d.admin, "rankd_model_load_failures_total").unwrap_or(0.0) >= 1.0,
    );
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = load.finish();
    assert_eq!(failed, 0, "{failed} requests failed of {}", ok + failed);
    assert!(ok > 50, "only {ok} requests");
    assert_eq!(conn.score(&request()).unwrap().version, 2);
    assert!(
        !cache.join("feed/3").exists(),
        "a corrupt file landed in the cache"
    );
    // "latest 1": version 1 left the policy and the cache.
    wait_for("v1 leaving the cache", Duration::from_secs(10), || {
        !cache.join("feed/1").exists()
    });
    assert!(metric(d.admin, "rankd_hdfs_downloads_total").unwrap() >= 2.0);
    assert_eq!(metric(d.admin, "rankd_hdfs_up"), Some(1.0));
    drop(conn);
    drop(d);

    // A restart reuses the cached file: nothing is downloaded again.
    let d = start(&url, &cache, "");
    let mut conn = Connection::connect(d.addr).unwrap();
    assert_eq!(conn.score(&request()).unwrap().version, 2);
    assert_eq!(metric(d.admin, "rankd_hdfs_downloads_total"), Some(0.0));
    hdfs.delete(&root.path, true).unwrap();
}

#[test]
fn the_namenode_stopped_and_killed_while_serving() {
    let Some(mut c) = private_cluster(0) else {
        return;
    };
    let (url, root, _, dir) = root_with_v1(&format!("{}/models", c.url));
    let cache = dir.path().join("cache");
    let d = start(&url, &cache, "timeout_ms = 500\nmax_backoff_ms = 2000\n");
    let t0 = Instant::now();
    let at = || t0.elapsed().as_millis();
    let load = Load::start(d.addr);
    std::thread::sleep(Duration::from_millis(500));
    let pid = c.pid().expect("the cluster's pid");

    // SIGSTOP: the NameNode accepts nothing and answers nothing.
    // SAFETY: a signal to the cluster's JVM, a process this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    eprintln!("{:>6} ms: NameNode stopped (SIGSTOP)", at());
    let down = wait_for("a failed poll", Duration::from_secs(10), || {
        metric(d.admin, "rankd_hdfs_up") == Some(0.0)
    });
    eprintln!(
        "{:>6} ms: first failed poll seen ({} ms after the stop)",
        at(),
        down.as_millis()
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(http_status(d.admin, "/readyz"), 200);
    let failed_polls = metric(d.admin, "rankd_hdfs_poll_failures_total").unwrap();
    eprintln!("{:>6} ms: {failed_polls} failed polls, still ready", at());
    // Backoff: about 200, 400, 800, 1600, 2000 ms apart; far fewer polls than every 200 ms.
    assert!(
        (2.0..=12.0).contains(&failed_polls),
        "{failed_polls} failed polls"
    );

    // SIGKILL: the NameNode is gone; connections are refused.
    // SAFETY: as above.
    unsafe {
        libc::kill(pid, libc::SIGCONT);
        libc::kill(pid, libc::SIGKILL);
    }
    eprintln!("{:>6} ms: NameNode killed (SIGKILL)", at());
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(http_status(d.admin, "/readyz"), 200);
    assert_eq!(load.version.load(Ordering::Relaxed), 1);

    // A new cluster on the same address, with a new version: polling recovers by itself.
    assert!(c.restart(), "the cluster did not restart");
    eprintln!("{:>6} ms: NameNode restarted (empty)", at());
    let hdfs = Hdfs::for_path(&root, &HdfsSettings::default()).unwrap();
    let v2 = std::fs::read(synth_file(dir.path(), 2, 2)).unwrap();
    put_version(&hdfs, &root, 2, &v2);
    let back = wait_for(
        "version 2 after the restart",
        Duration::from_secs(30),
        || load.version.load(Ordering::Relaxed) == 2,
    );
    eprintln!(
        "{:>6} ms: version 2 served ({} ms after its upload)",
        at(),
        back.as_millis()
    );
    assert_eq!(metric(d.admin, "rankd_hdfs_up"), Some(1.0));
    let (ok, failed) = load.finish();
    eprintln!("{:>6} ms: {ok} requests, {failed} failed", at());
    assert_eq!(failed, 0);
}

/// An HA nameservice URL (`hdfs://rankdns/...`) with the usual settings passed through from the
/// config: the first NameNode of the nameservice is dead, the client fails over to the second.
#[test]
fn an_ha_nameservice_from_the_config() {
    let Some(c) = cluster() else { return };
    let (_, root, hdfs, dir) = root_with_v1(&c.unique_dir("ha-models"));
    // A port with nothing listening: the dead NameNode.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    drop(dead);
    let ha = format!(
        "[hdfs.config]\n\"dfs.nameservices\" = \"rankdns\"\n\
         \"dfs.ha.namenodes.rankdns\" = \"nn1,nn2\"\n\
         \"dfs.namenode.rpc-address.rankdns.nn1\" = \"127.0.0.1:{dead_port}\"\n\
         \"dfs.namenode.rpc-address.rankdns.nn2\" = \"127.0.0.1:{}\"\n",
        c.port()
    );
    let logical = format!("hdfs://rankdns{}", root.path);
    let cache = dir.path().join("cache");
    let d = start(&logical, &cache, &ha);
    let mut conn = Connection::connect(d.addr).unwrap();
    assert_eq!(conn.score(&request()).unwrap().version, 1);
    assert_eq!(metric(d.admin, "rankd_hdfs_up"), Some(1.0));
    hdfs.delete(&root.path, true).unwrap();
}
