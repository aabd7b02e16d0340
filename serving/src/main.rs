//! `rankd`: the ranking model server. Parses flags and config, loads the models, starts the
//! cores and the admin port, and waits for SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;
use rankd_serving::config::ServerConfig;
use rankd_serving::registry::Registry;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use rankd_serving::server::{Server, Shared};

/// Serve ranking models over a low-latency binary RPC.
///
/// With no flags, serves the example model root of the repository (examples/models) on
/// 127.0.0.1:7470, with the admin port on 127.0.0.1:7471.
#[derive(Parser, Debug)]
#[command(name = "rankd", version)]
struct Cli {
    /// TOML config file (flags given here override it).
    #[arg(long, env = "RANKD_CONFIG")]
    config: Option<PathBuf>,
    /// Model root: ROOT/<model-name>/<version>/<file>.rkm, a directory or an hdfs:// URL.
    #[arg(long, env = "RANKD_MODELS")]
    models: Option<PathBuf>,
    /// RPC listen address (port 0 picks a free port).
    #[arg(long, env = "RANKD_LISTEN")]
    listen: Option<std::net::SocketAddr>,
    /// HTTP admin address: /metrics, /healthz, /readyz, /models.
    #[arg(long, env = "RANKD_ADMIN")]
    admin: Option<std::net::SocketAddr>,
    /// Worker threads, one runtime per core (default: every available core).
    #[arg(long, env = "RANKD_THREADS")]
    threads: Option<usize>,
    /// Pin worker i to CPU i.
    #[arg(long)]
    pin_cores: bool,
    /// Use the epoll driver even where io_uring works.
    #[arg(long)]
    force_epoll: bool,
    /// Open Inference Protocol (KServe v2) gRPC address (off unless given here or in the config).
    #[arg(long, env = "RANKD_GRPC")]
    grpc: Option<std::net::SocketAddr>,
    /// Open Inference Protocol (KServe v2) REST address (off unless given here or in the config).
    #[arg(long, env = "RANKD_HTTP")]
    http: Option<std::net::SocketAddr>,
    /// Where models run: auto (GPUs when CUDA and cuBLAS load, else the CPU), cpu, cuda or
    /// cuda:0,1.
    #[arg(long, env = "RANKD_DEVICE")]
    device: Option<String>,
}

fn config(cli: &Cli) -> Result<ServerConfig> {
    let mut c = match &cli.config {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read {}", p.display()))?;
            ServerConfig::from_toml(&text)
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("in {}", p.display()))?
        }
        None => ServerConfig::default(),
    };
    if let Some(m) = &cli.models {
        c.models = m.clone();
    }
    if let Some(a) = cli.listen {
        c.listen = a;
    }
    if let Some(a) = cli.admin {
        c.admin = a;
    }
    if let Some(t) = cli.threads {
        c.threads = t;
    }
    if cli.grpc.is_some() {
        c.grpc = cli.grpc;
    }
    if cli.http.is_some() {
        c.http = cli.http;
    }
    if let Some(d) = &cli.device {
        c.engine.device = d.clone();
    }
    c.pin_cores |= cli.pin_cores;
    c.force_epoll |= cli.force_epoll;
    c.check().map_err(anyhow::Error::msg)?;
    Ok(c)
}

fn run(cli: Cli) -> Result<()> {
    let config = config(&cli)?;
    // With pinned cores, this thread and everything it starts (the HDFS client's runtime, the
    // admin port) stay off the serving cores; each core pins itself.
    rankd_serving::reload::off_serving_cores(&config);
    // A model root on HDFS is mirrored into a local cache first; when HDFS is unreachable the
    // daemon starts from what the cache holds and the reload thread keeps polling.
    let mut hdfs = rankd_serving::hdfs_source::HdfsSource::new(&config)
        .context("cannot set up the HDFS model root")?;
    let mut hdfs_failures = 0;
    let startup_metrics = rankd_serving::metrics::Metrics::default();
    if let Some(source) = &mut hdfs {
        eprintln!(
            "rankd: model root {} (cached in {})",
            config.models.display(),
            source.cache().display()
        );
        rankd_serving::hdfs_source::poll(source, &config, &startup_metrics, &mut hdfs_failures);
    }
    let gpus = start_gpus(&config)?;
    let mut rejected = rankd_serving::registry::RejectCache::new();
    let (registry, problems) = Registry::load(&config, None, &mut rejected, None, gpus.as_ref());
    for p in &problems {
        eprintln!("rankd: skipped {}: {}", p.path.display(), p.message);
    }
    for (name, e) in &registry.models {
        let versions: Vec<String> = e.versions.keys().map(u64::to_string).collect();
        eprintln!("rankd: model `{name}`: versions [{}]", versions.join(", "));
    }
    if registry.models.is_empty() {
        eprintln!(
            "rankd: warning: no servable model under {}; /readyz stays 503",
            config.models.display()
        );
    }
    let driver = if config.force_epoll || !rankd_serving::server::io_uring_available() {
        "epoll"
    } else {
        "io_uring"
    };
    let threads = config.worker_threads();
    // The signal handler goes in before anything is announced: a SIGTERM that arrives while the
    // server starts must still mean "finish and exit 0", not the default kill.
    let target: Arc<OnceLock<Arc<Shared>>> = Arc::new(OnceLock::new());
    let early = Arc::new(AtomicBool::new(false));
    {
        let (target, early) = (target.clone(), early.clone());
        ctrlc::set_handler(move || {
            eprintln!("rankd: shutting down: finishing in-flight requests");
            early.store(true, Ordering::SeqCst);
            if let Some(shared) = target.get() {
                shared.shutdown.store(true, Ordering::SeqCst);
            }
        })
        .context("cannot install the signal handler")?;
    }
    let server = Server::start(config, registry, gpus).context("cannot start the server")?;
    let _ = target.set(server.shared.clone());
    if early.load(Ordering::SeqCst) {
        server.shared.shutdown.store(true, Ordering::SeqCst);
    }
    server
        .shared
        .metrics
        .load_failures
        .fetch_add(problems.len() as u64, Ordering::Relaxed);
    let admin =
        rankd_serving::admin::start(server.shared.clone()).context("cannot bind the admin port")?;
    let kserve = rankd_serving::kserve::start(server.shared.clone())
        .context("cannot bind the KServe v2 addresses")?;
    if let Some(a) = kserve.grpc {
        eprintln!("rankd: KServe v2 gRPC on {a}");
    }
    if let Some(a) = kserve.http {
        eprintln!("rankd: KServe v2 REST on http://{a}");
    }
    // The watcher runs before the announcement, so nothing deployed after it is missed.
    if hdfs.is_some() {
        let m = &server.shared.metrics;
        for (to, from) in [
            (&m.hdfs_polls, &startup_metrics.hdfs_polls),
            (&m.hdfs_poll_failures, &startup_metrics.hdfs_poll_failures),
            (&m.hdfs_downloads, &startup_metrics.hdfs_downloads),
            (&m.hdfs_download_bytes, &startup_metrics.hdfs_download_bytes),
            (&m.load_failures, &startup_metrics.load_failures),
        ] {
            to.fetch_add(from.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        m.hdfs_up.store(
            startup_metrics.hdfs_up.load(Ordering::Relaxed),
            Ordering::Relaxed,
        );
    }
    rankd_serving::reload::start(server.shared.clone(), cli.config.clone(), rejected, hdfs)
        .context("cannot start the model watcher")?;
    rankd_serving::updates::start(server.shared.clone())
        .context("cannot start the online-update consumers")?;
    eprintln!(
        "rankd: serving on {} ({threads} cores, {driver}); admin on http://{admin}",
        server.addr
    );
    server.join();
    eprintln!("rankd: stopped");
    Ok(())
}

/// Decides where models run and starts the GPUs if any: one log line either way. `auto` falls
/// back to the CPU (saying why) when the GPUs are missing or fail to start; an explicit `cuda`
/// that cannot be honoured stops the daemon.
fn start_gpus(config: &ServerConfig) -> Result<Option<Arc<rankd_engine::gpu::Gpus>>> {
    use rankd_engine::gpu::{self, DeviceSpec, Gpus, Selection};
    let spec = config.engine.device_spec().map_err(anyhow::Error::msg)?;
    let found = match spec {
        DeviceSpec::Cpu => Err(gpu::Unavailable::NoDevice),
        _ => gpu::probe(),
    };
    match gpu::select(&spec, &found).map_err(anyhow::Error::msg)? {
        Selection::Cpu { reason } => {
            eprintln!("rankd: engine: CPU ({reason})");
            Ok(None)
        }
        Selection::Emulated(n) => {
            eprintln!("rankd: engine: {n} emulated GPUs (device operations run on the host)");
            Ok(Some(Gpus::emulated(n, config.engine.gpu_batching())))
        }
        Selection::Cuda(ordinals) => match Gpus::start(&ordinals, config.engine.gpu_batching()) {
            Ok(g) => {
                eprintln!("rankd: engine: {}", g.names().join(", "));
                Ok(Some(g))
            }
            Err(e) if spec == DeviceSpec::Auto => {
                eprintln!(
                    "rankd: engine: CPU (device = \"auto\" and the GPUs failed to start: {e})"
                );
                Ok(None)
            }
            Err(e) => Err(anyhow::anyhow!("device = \"{spec}\": {e}")),
        },
    }
}

/// Keeps glibc's allocator from changing the address space in steady state: every `mmap`,
/// `munmap`, `brk` or arena `mprotect` takes the process's memory-map lock for writing, and a
/// serving thread that needs that lock while the reload thread populates a new model's mapping
/// (or unmaps an old one) stalls for milliseconds. Allocations up to 256 MiB come from the
/// arenas, arenas grow 64 MiB at a time, and freed memory is kept rather than returned.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; it is called before any other thread
    // exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rankd: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
