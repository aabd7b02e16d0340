//! `rankd-train`: trains and writes a model file, in one process or as a multi-process job of
//! parameter-server shards and workers.
//!
//! - `rankd-train --config train.toml [--output model.rkm] [--resume]`: one process (worker
//!   threads per `[train].workers`).
//! - With `TF_CONFIG` in the environment (as Kubeflow's training operator sets it in each pod of a
//!   TFJob) or `--cluster FILE`: the task of that description (`ps`, `worker` or `chief`).
//! - `rankd-train --config train.toml --processes W [--ps-shards K]`: starts K shards and W
//!   workers on this machine, each with its `TF_CONFIG`, and fails loudly if any of them dies.
//! - `rankd-train ps --shard i --shards K --listen ADDR` / `rankd-train worker --ps A,B --index i
//!   --workers W --config F`: the two roles started by hand.

use std::ffi::OsString;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use rankd_trainer::cluster::{Cluster, Role as Task};
use rankd_trainer::dist::worker::{self, Job};
use rankd_trainer::TrainConfig;

/// Train a ranking model and write the file rankd serves.
#[derive(Parser, Debug)]
#[command(name = "rankd-train", version)]
struct Cli {
    #[command(subcommand)]
    role: Option<Role>,
    /// Model config plus a [train] table.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Output model file (default: [train].output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Continue from the last checkpoint ([train].checkpoint, default `<output>.ckpt`) if there
    /// is one.
    #[arg(long)]
    resume: bool,
    /// Start this many worker processes and the parameter-server shards on this machine.
    #[arg(long)]
    processes: Option<usize>,
    /// Parameter-server shard processes started with --processes (default [train].ps_shards).
    #[arg(long)]
    ps_shards: Option<usize>,
    /// Where to train: auto, cpu, cuda, cuda:0,1 or emulated:N (default [train].device). A
    /// worker process of a job trains on one of them (worker i on the (i mod count)-th).
    #[arg(long, global = true)]
    device: Option<String>,
    /// The cluster description (TF_CONFIG JSON) in a file, instead of the TF_CONFIG variable.
    #[arg(long)]
    cluster: Option<PathBuf>,
    /// How long a worker keeps trying to reach the parameter servers, in seconds.
    #[arg(long, default_value_t = 300)]
    connect_timeout: u64,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// A parameter-server shard: holds rows `r % shards == shard` and its share of the dense
    /// tensors; exits when every worker is done. Prints `ps listening on ADDR` first.
    Ps {
        /// This shard, 0..shards.
        #[arg(long, default_value_t = 0)]
        shard: usize,
        /// How many shards.
        #[arg(long, default_value_t = 1)]
        shards: usize,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
    },
    /// A worker (0 is the chief, which writes the model).
    Worker {
        #[arg(long)]
        config: PathBuf,
        /// The shards' addresses, comma-separated, in shard order.
        #[arg(long, value_delimiter = ',')]
        ps: Vec<String>,
        /// This worker's index, 0..workers.
        #[arg(long)]
        index: usize,
        /// How many workers.
        #[arg(long)]
        workers: usize,
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long)]
        resume: bool,
    },
    /// Online learning: trains continuously on samples from a Kafka topic, starting from a
    /// served model, and publishes parameter deltas (and, every `snapshot_interval_s`, a new
    /// version). Settings in the config's [online] table; the flags override them.
    Online(OnlineArgs),
}

/// `rankd-train online`'s flags.
#[derive(clap::Args, Debug)]
struct OnlineArgs {
    /// A config with [train] and [online] tables.
    #[arg(long)]
    config: PathBuf,
    /// The base model file (default: [online].base, else the newest version in
    /// [online].snapshot_dir).
    #[arg(long)]
    base: Option<PathBuf>,
    /// The samples topic, kafka://host:port/topic.
    #[arg(long)]
    samples: Option<String>,
    /// The updates topic.
    #[arg(long)]
    updates: Option<String>,
    /// The model's directory in the daemon's model root, for snapshots.
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
    /// Publish a delta every this many milliseconds.
    #[arg(long)]
    publish_interval_ms: Option<u64>,
    /// Stop after reading this many samples (after a last delta).
    #[arg(long)]
    max_samples: Option<u64>,
    /// At the end, write the current parameters as a model file of the current base
    /// version (what the base plus the published deltas amount to).
    #[arg(long)]
    export: Option<PathBuf>,
}

fn load(path: &Path) -> Result<TrainConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    TrainConfig::from_toml(&text, base).with_context(|| format!("in {}", path.display()))
}

fn output_of(config: &TrainConfig, output: Option<PathBuf>) -> Result<PathBuf> {
    output
        .or_else(|| config.train.output.clone())
        .context("give --output or [train].output")
}

fn checkpoint_of(config: &TrainConfig, output: &Path) -> PathBuf {
    config.train.checkpoint.clone().unwrap_or_else(|| {
        let mut p = output.to_path_buf().into_os_string();
        p.push(".ckpt");
        PathBuf::from(p)
    })
}

/// What a multi-process task reports as it exits: its CPU time and peak memory.
fn exit_stats() -> String {
    let cpu = rankd_trainer::cpu_seconds().map_or(String::new(), |s| format!("; cpu {s:.2} s"));
    rankd_trainer::peak_rss_bytes().map_or(cpu.clone(), |b| {
        format!("{cpu}; peak rss {:.1} MiB", b as f64 / (1 << 20) as f64)
    })
}

fn serve_ps(listener: &TcpListener, shard: usize, shards: usize) -> Result<()> {
    println!("ps listening on {}", listener.local_addr()?);
    use std::io::Write as _;
    std::io::stdout().flush()?;
    rankd_trainer::dist::ps::serve(listener, shard, shards)
        .with_context(|| format!("ps {shard}"))?;
    eprintln!(
        "rankd-train: ps {shard} of {shards}: every worker finished{}",
        exit_stats()
    );
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_worker(
    config_path: &Path,
    ps: &[String],
    index: usize,
    workers: usize,
    output: Option<PathBuf>,
    resume: bool,
    patience: Duration,
    device: Option<String>,
) -> Result<()> {
    let mut config = load(config_path)?;
    if let Some(d) = device {
        config.train.device = d;
    }
    let output = output_of(&config, output)?;
    let checkpoint = checkpoint_of(&config, &output);
    let job = Job {
        config: &config,
        ps,
        index,
        workers,
        output: &output,
        checkpoint: &checkpoint,
        resume,
        patience,
    };
    // One write per line: the launcher's workers share its stderr, and a line written in pieces
    // would interleave with another worker's.
    let mut log = std::io::LineWriter::new(std::io::stderr());
    let summary = worker::run(&job, &mut log).with_context(|| format!("worker {index}"))?;
    match summary {
        Some(s) => {
            let test = s.test.map_or(String::new(), |t| {
                format!("; test auc {:.4} logloss {:.4}", t.auc, t.logloss)
            });
            println!(
                "wrote {}; kept epoch {} of {}: validation auc {:.4} logloss {:.4}{test}; {:.0} samples/s; {:.0} bytes/sample to and from the shards{}",
                output.display(),
                s.kept_epoch + 1,
                s.epochs,
                s.kept.auc,
                s.kept.logloss,
                s.samples_per_second,
                s.bytes_per_sample,
                exit_stats()
            );
        }
        None => eprintln!("rankd-train: worker {index} finished{}", exit_stats()),
    }
    Ok(())
}

fn run_online(args: OnlineArgs) -> Result<()> {
    use rankd_trainer::online;
    let OnlineArgs {
        config,
        base,
        samples,
        updates,
        snapshot_dir,
        publish_interval_ms,
        max_samples,
        export,
    } = args;
    let config = config.as_path();
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let mut cfg = online::OnlineConfig::from_toml(&text)
        .with_context(|| format!("in {}", config.display()))?;
    let dir = config.parent().unwrap_or(Path::new("."));
    let o = &mut cfg.online;
    o.base = base.or(o.base.take()).map(|p| dir.join(p));
    o.snapshot_dir = snapshot_dir.or(o.snapshot_dir.take()).map(|p| dir.join(p));
    o.samples = samples.or(o.samples.take());
    o.updates = updates.or(o.updates.take());
    if let Some(ms) = publish_interval_ms {
        o.publish_interval_ms = ms.max(1);
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, std::sync::atomic::Ordering::Relaxed))
        .context("cannot install the signal handler")?;
    let limits = online::Limits {
        max_samples,
        export,
    };
    let r = online::run(&cfg, &stop, limits, &mut std::io::stderr())?;
    println!(
        "online: {} samples trained, {} held back (rolling auc {:.4} logloss {:.4}), {} skipped; {} deltas, snapshots {:?}; last: version {} delta {}; next offset {}{}",
        r.trained,
        r.held_out,
        r.holdout_auc,
        r.holdout_logloss,
        r.bad_samples,
        r.deltas,
        r.snapshots,
        r.base_version,
        r.sequence,
        r.next_offset,
        exit_stats()
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    let patience = Duration::from_secs(cli.connect_timeout);
    match cli.role {
        Some(Role::Online(args)) => return run_online(args),
        Some(Role::Ps {
            shard,
            shards,
            listen,
        }) => {
            if shard >= shards {
                bail!("--shard {shard} of --shards {shards}");
            }
            let listener = TcpListener::bind(listen).context("cannot listen")?;
            return serve_ps(&listener, shard, shards);
        }
        Some(Role::Worker {
            config,
            ps,
            index,
            workers,
            output,
            resume,
        }) => {
            if index >= workers || ps.is_empty() {
                bail!("give --ps ADDR[,ADDR...] and --index below --workers");
            }
            let device = cli.device.clone();
            return run_worker(
                &config, &ps, index, workers, output, resume, patience, device,
            );
        }
        None => {}
    }
    // A cluster description: from --cluster, else TF_CONFIG.
    let described = match &cli.cluster {
        Some(p) => Some(
            std::fs::read_to_string(p).with_context(|| format!("cannot read {}", p.display()))?,
        ),
        None => std::env::var("TF_CONFIG")
            .ok()
            .filter(|t| !t.trim().is_empty()),
    };
    if let Some(text) = described {
        let cluster = Cluster::parse(&text)?;
        return match cluster.role {
            Task::Ps(i) => {
                let port = cluster
                    .own_port()
                    .context("the task's address has no port")?;
                let listener = TcpListener::bind(("0.0.0.0", port))
                    .with_context(|| format!("ps {i}: cannot listen on port {port}"))?;
                serve_ps(&listener, i, cluster.ps.len())
            }
            Task::Worker(i) => {
                let path = cli.config.context("give --config")?;
                run_worker(
                    &path,
                    &cluster.ps,
                    i,
                    cluster.workers.len(),
                    cli.output,
                    cli.resume,
                    patience,
                    cli.device,
                )
            }
            Task::Idle => {
                eprintln!("rankd-train: this task type has nothing to do in a rankd job");
                Ok(())
            }
        };
    }
    let path = cli.config.context("give --config")?;
    let mut config = load(&path)?;
    if let Some(d) = cli.device {
        config.train.device = d;
    }
    let output = output_of(&config, cli.output)?;
    if let Some(w) = cli.processes {
        let exe = std::env::current_exe()?;
        let mut args: Vec<OsString> = vec!["--config".into(), path.into(), "--output".into()];
        args.push(output.clone().into());
        if cli.resume {
            args.push("--resume".into());
        }
        args.push("--device".into());
        args.push(config.train.device.clone().into());
        args.push("--connect-timeout".into());
        args.push(cli.connect_timeout.to_string().into());
        let shards = cli.ps_shards.unwrap_or(config.train.ps_shards).max(1);
        rankd_trainer::dist::launch(&exe, &args, w.max(1), shards)?;
        return Ok(());
    }
    let ckpt = checkpoint_of(&config, &output);
    let trained =
        rankd_trainer::train_from(&config, Some((&ckpt, cli.resume)), &mut std::io::stderr())?;
    let written = rankd_trainer::write(&config, &trained, &output)?;
    let kept = trained.kept();
    let test = trained.test.map_or(String::new(), |t| {
        format!("; test auc {:.4} logloss {:.4}", t.auc, t.logloss)
    });
    println!(
        "wrote {} ({} bytes); kept epoch {} of {}: validation auc {:.4} logloss {:.4}{test}; {:.0} samples/s",
        output.display(),
        written.file_len,
        trained.kept_epoch + 1,
        trained.epochs_run(),
        kept.auc,
        kept.logloss,
        trained.samples_per_second
    );
    if let Some(m) = &trained.layout.mt {
        for (h, (name, kept)) in m.heads.iter().zip(trained.kept_heads()).enumerate() {
            let test = trained.test_heads.get(h).map_or(String::new(), |t| {
                format!("; test auc {:.4} logloss {:.4}", t.auc, t.logloss)
            });
            println!(
                "head {name}: validation auc {:.4} logloss {:.4}{test}",
                kept.auc, kept.logloss
            );
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rankd-train: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
