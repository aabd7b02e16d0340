//! `rankd-train`: trains and writes a model file, in one process or as a parameter server with
//! worker processes.
//!
//! - `rankd-train --config train.toml [--output model.rkm] [--resume]`: one process (worker
//!   threads per `[train].workers`).
//! - `rankd-train --config train.toml --processes K ...`: launches a server and K worker
//!   processes, and fails loudly if any of them dies.
//! - `rankd-train ps ...` / `rankd-train worker ...`: the two roles, started by the launcher or
//!   by hand.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
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
    /// Continue from the checkpoint ([train].checkpoint, default `<output>.ckpt`) if it exists.
    #[arg(long)]
    resume: bool,
    /// Run a parameter server and this many worker processes.
    #[arg(long)]
    processes: Option<usize>,
}

#[derive(Subcommand, Debug)]
enum Role {
    /// The parameter server: accepts the workers, runs the epochs, writes checkpoints and the
    /// model. Prints `ps listening on ADDR` first.
    Ps {
        #[arg(long)]
        config: PathBuf,
        /// Number of workers to wait for.
        #[arg(long)]
        workers: usize,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: std::net::SocketAddr,
        #[arg(long)]
        output: Option<PathBuf>,
        #[arg(long)]
        resume: bool,
    },
    /// A worker: computes the gradients of its shard of every step.
    Worker {
        #[arg(long)]
        config: PathBuf,
        /// The server's address.
        #[arg(long)]
        ps: std::net::SocketAddr,
        /// This worker's index, 0..K.
        #[arg(long)]
        index: usize,
    },
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

fn run(cli: Cli) -> Result<()> {
    match cli.role {
        Some(Role::Ps {
            config,
            workers,
            listen,
            output,
            resume,
        }) => {
            let c = load(&config)?;
            let output = output_of(&c, output)?;
            let listener = TcpListener::bind(listen).context("cannot listen")?;
            println!("ps listening on {}", listener.local_addr()?);
            use std::io::Write as _;
            std::io::stdout().flush()?;
            let auc = rankd_trainer::dist::run_ps(
                &c,
                &listener,
                workers,
                &output,
                &checkpoint_of(&c, &output),
                resume,
                &mut std::io::stderr(),
            )?;
            eprintln!(
                "rankd-train: wrote {}; validation auc {auc:.4} (kept epoch)",
                output.display()
            );
            Ok(())
        }
        Some(Role::Worker { config, ps, index }) => {
            let c = load(&config)?;
            rankd_trainer::dist::run_worker(&c, ps, index)?;
            Ok(())
        }
        None => {
            let path = cli.config.context("give --config")?;
            let config = load(&path)?;
            let output = output_of(&config, cli.output)?;
            if let Some(k) = cli.processes {
                let exe = std::env::current_exe()?;
                rankd_trainer::dist::launch(&exe, &path, k.max(1), &output, cli.resume)?;
                println!("wrote {}", output.display());
                return Ok(());
            }
            let ckpt = checkpoint_of(&config, &output);
            let trained = rankd_trainer::train_from(
                &config,
                Some((&ckpt, cli.resume)),
                &mut std::io::stderr(),
            )?;
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
            Ok(())
        }
    }
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
