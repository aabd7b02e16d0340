//! The daemon's configuration: one TOML file, with CLI flags for the common settings layered on
//! top (see `main.rs`). Loaded and checked in one place.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Which versions of a model are loaded.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum VersionPolicy {
    /// `"latest"` (with `latest = N`, default 1) or `"all"`.
    Named(String),
    /// An explicit list.
    List(Vec<u64>),
}

impl Default for VersionPolicy {
    fn default() -> Self {
        VersionPolicy::Named("latest".into())
    }
}

/// Per-model settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPolicy {
    /// Which versions to load.
    #[serde(default)]
    pub versions: VersionPolicy,
    /// N for `versions = "latest"`.
    #[serde(default)]
    pub latest: Option<usize>,
    /// Labels: name -> version, e.g. `stable = 7`.
    #[serde(default)]
    pub labels: BTreeMap<String, u64>,
    /// Traffic split between labels by weight, e.g. `stable = 95, canary = 5`.
    #[serde(default)]
    pub split: BTreeMap<String, u32>,
    /// Online updates: `kafka://host:port/topic`, the topic `rankd-train online` publishes this
    /// model's deltas to. Every replica reads it on its own and applies the deltas of the
    /// versions it serves.
    #[serde(default)]
    pub updates: Option<String>,
}

/// Batching of requests from concurrent connections on one core.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Batching {
    /// Most items merged into one engine call.
    pub max_batch_items: usize,
    /// Longest a request waits for others to join its batch, in microseconds. 0: merge only
    /// what is already queued (lowest latency at low load).
    pub max_wait_us: u64,
}

impl Default for Batching {
    fn default() -> Self {
        Batching {
            max_batch_items: 2048,
            max_wait_us: 0,
        }
    }
}

/// Where models run: `[engine]`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// `"auto"` (every visible GPU when the CUDA driver and cuBLAS load, else the CPU),
    /// `"cpu"`, `"cuda"` (every visible GPU, or fail to start) or `"cuda:0,1"`.
    pub device: String,
    /// Most items in one GPU batch (requests of all cores merged).
    pub gpu_max_batch_items: usize,
    /// Longest the first request of a GPU batch waits for others, in microseconds.
    pub gpu_max_wait_us: u64,
    /// Memory per model version, in MiB, that the CPU engine may spend on embedding tables
    /// folded into the first deep layer (smallest tables first; 0: none). See
    /// `rankd_engine::ModelOptions::fold_bytes`.
    pub fold_tables_mib: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            device: "auto".into(),
            gpu_max_batch_items: 65_536,
            gpu_max_wait_us: 200,
            fold_tables_mib: 64,
        }
    }
}

impl EngineConfig {
    /// The parsed device setting.
    pub fn device_spec(&self) -> Result<rankd_engine::gpu::DeviceSpec, String> {
        self.device
            .parse()
            .map_err(|e: String| format!("[engine] {e}"))
    }

    /// How model versions are prepared for the engines.
    pub fn model_options(&self) -> rankd_engine::ModelOptions {
        rankd_engine::ModelOptions {
            fold_bytes: usize::try_from(self.fold_tables_mib.saturating_mul(1 << 20))
                .unwrap_or(usize::MAX),
        }
    }

    /// The GPU batching settings.
    pub fn gpu_batching(&self) -> rankd_engine::gpu::BatchSettings {
        rankd_engine::gpu::BatchSettings {
            max_batch_items: self.gpu_max_batch_items.max(1),
            max_wait: std::time::Duration::from_micros(self.gpu_max_wait_us),
        }
    }
}

/// Protective limits.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest frame body accepted.
    pub max_frame_bytes: u32,
    /// Most items per request.
    pub max_items: usize,
    /// Most features (request-level plus item columns) per request.
    pub max_features: usize,
    /// Most open connections per core.
    pub max_connections: usize,
    /// Most requests in flight (read, not yet answered) per connection.
    pub max_pipelined: usize,
    /// Every frame must arrive whole (header and body) within this long of its first byte,
    /// however its bytes trickle in; otherwise the connection is closed.
    pub read_timeout_ms: u64,
    /// A connection with no request queued, no answer unsent and no frame begun is closed after
    /// this long without a byte from the client. 0: never.
    pub idle_timeout_ms: u64,
    /// Answers waiting to be sent must be taken by the client within this long (a write that
    /// makes no complete progress for this long); otherwise the connection is closed. 0: never.
    pub write_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 << 20,
            max_items: 10_000,
            max_features: 2_000,
            max_connections: 10_000,
            max_pipelined: 256,
            read_timeout_ms: 10_000,
            idle_timeout_ms: 300_000,
            write_timeout_ms: 30_000,
        }
    }
}

/// Models on HDFS (`models = "hdfs://..."`): polled, downloaded into a local cache, verified
/// while they stream in, then mapped from the cache.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HdfsConfig {
    /// Where downloaded versions live (`<cache_dir>/<name>/<version>/model.rkm`). Default: a
    /// directory per model root under the system's temporary directory.
    pub cache_dir: Option<PathBuf>,
    /// How often the model root is listed, in milliseconds.
    pub poll_interval_ms: u64,
    /// Deadline of each NameNode call and of each chunk of a download, in milliseconds.
    pub timeout_ms: u64,
    /// After failed polls the interval doubles up to this, in milliseconds.
    pub max_backoff_ms: u64,
    /// Hadoop client settings passed through (HA: `dfs.nameservices`, `dfs.ha.namenodes.NS`,
    /// `dfs.namenode.rpc-address.NS.NN`, ...), over those of `HADOOP_CONF_DIR`.
    pub config: BTreeMap<String, String>,
}

impl Default for HdfsConfig {
    fn default() -> Self {
        HdfsConfig {
            cache_dir: None,
            poll_interval_ms: 2_000,
            timeout_ms: 10_000,
            max_backoff_ms: 60_000,
            config: BTreeMap::new(),
        }
    }
}

/// The whole configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// RPC address.
    pub listen: SocketAddr,
    /// HTTP admin address (metrics, health).
    pub admin: SocketAddr,
    /// Open Inference Protocol (KServe v2) gRPC address; off when unset.
    pub grpc: Option<SocketAddr>,
    /// Open Inference Protocol (KServe v2) REST address; off when unset.
    pub http: Option<SocketAddr>,
    /// Worker threads of the KServe front ends; 0: as many as the binary RPC's cores.
    pub kserve_threads: usize,
    /// Worker threads (one runtime each); 0: one per available core.
    pub threads: usize,
    /// Pin worker `i` to core `i`.
    pub pin_cores: bool,
    /// The model root: `ROOT/<name>/<version>/<file>.rkm`, a local directory or an `hdfs://`
    /// URL.
    pub models: PathBuf,
    /// Models on HDFS.
    pub hdfs: HdfsConfig,
    /// Force monoio's epoll driver even where io_uring works.
    pub force_epoll: bool,
    /// Batching.
    pub batching: Batching,
    /// Where models run (CPU or GPUs).
    pub engine: EngineConfig,
    /// Limits.
    pub limits: Limits,
    /// Per-model policies by model name.
    pub model: BTreeMap<String, ModelPolicy>,
    /// Most time to finish in-flight requests after SIGTERM/SIGINT, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// Watch the model root (and the config file) for changes.
    pub watch: bool,
    /// Rescan the model root (and reread the config file) this often, in milliseconds, as a
    /// fallback to file-system events. 0: never.
    pub rescan_interval_ms: u64,
    /// While serving, verify a new version's checksum at most this fast (MiB/s, one thread),
    /// so that the pass over a large file does not hold the memory bandwidth the serving cores
    /// share for seconds. 0 (the default): as fast as one thread goes. Startup always verifies
    /// on every core.
    pub reload_verify_mib_per_sec: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:7470".parse().expect("valid address"),
            admin: "127.0.0.1:7471".parse().expect("valid address"),
            grpc: None,
            http: None,
            kserve_threads: 0,
            threads: 0,
            pin_cores: false,
            models: PathBuf::from("examples/models"),
            hdfs: HdfsConfig::default(),
            force_epoll: false,
            batching: Batching::default(),
            engine: EngineConfig::default(),
            limits: Limits::default(),
            model: BTreeMap::new(),
            shutdown_grace_ms: 10_000,
            watch: true,
            rescan_interval_ms: 2_000,
            reload_verify_mib_per_sec: 0,
        }
    }
}

impl ServerConfig {
    /// Parses and checks a config file's text.
    pub fn from_toml(text: &str) -> Result<ServerConfig, String> {
        let c: ServerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check()?;
        Ok(c)
    }

    /// Where the model root is: a local directory, or a directory on HDFS.
    pub fn model_source(&self) -> Result<rankd_storage::Location, String> {
        rankd_storage::Location::from_path(&self.models).map_err(|e| e.to_string())
    }

    /// The local directory the registry scans: the model root itself, or for HDFS the cache
    /// that mirrors it.
    pub fn model_root(&self) -> PathBuf {
        match self.model_source() {
            Ok(rankd_storage::Location::Hdfs(h)) => {
                self.hdfs.cache_dir.clone().unwrap_or_else(|| {
                    let tag: String = h
                        .url()
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    std::env::temp_dir().join("rankd-cache").join(tag)
                })
            }
            _ => self.models.clone(),
        }
    }

    /// Checks cross-field rules.
    pub fn check(&self) -> Result<(), String> {
        self.model_source()?;
        self.engine.device_spec()?;
        if self.hdfs.poll_interval_ms == 0 || self.hdfs.timeout_ms == 0 {
            return Err("[hdfs] poll_interval_ms and timeout_ms must be positive".into());
        }
        for (name, p) in &self.model {
            if let VersionPolicy::Named(n) = &p.versions {
                if n != "latest" && n != "all" {
                    return Err(format!(
                        "model `{name}`: versions must be \"latest\", \"all\" or a list, not {n:?}"
                    ));
                }
            }
            if let Some(u) = &p.updates {
                u.parse::<rankd_storage::kafka::KafkaUrl>()
                    .map_err(|e| format!("model `{name}`: updates: {e}"))?;
            }
            if p.latest == Some(0) {
                return Err(format!("model `{name}`: latest must be at least 1"));
            }
            for label in p.split.keys() {
                if !p.labels.contains_key(label) {
                    return Err(format!(
                        "model `{name}`: split names label `{label}`, which is not in labels"
                    ));
                }
            }
            if !p.split.is_empty() && p.split.values().all(|&w| w == 0) {
                return Err(format!("model `{name}`: split weights are all zero"));
            }
        }
        if self.limits.max_items == 0 || self.limits.max_frame_bytes < 64 {
            return Err("limits are too small to serve anything".into());
        }
        Ok(())
    }

    /// The number of worker threads to run.
    pub fn worker_threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}
