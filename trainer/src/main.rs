//! `rankd-train --config train.toml [--output model.rkm]`: trains and writes a model file.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Parser;

/// Train a ranking model and write the file rankd serves.
#[derive(Parser, Debug)]
#[command(name = "rankd-train", version)]
struct Cli {
    /// Model config plus a [train] table.
    #[arg(long)]
    config: PathBuf,
    /// Output model file (default: [train].output).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Continue from the checkpoint ([train].checkpoint, default `<output>.ckpt`) if it exists.
    #[arg(long)]
    resume: bool,
}

fn run(cli: Cli) -> Result<()> {
    let text = std::fs::read_to_string(&cli.config)
        .with_context(|| format!("cannot read {}", cli.config.display()))?;
    let base = cli.config.parent().unwrap_or(std::path::Path::new("."));
    let config = rankd_trainer::TrainConfig::from_toml(&text, base)
        .with_context(|| format!("in {}", cli.config.display()))?;
    let output = cli
        .output
        .or_else(|| config.train.output.clone())
        .context("give --output or [train].output")?;
    let ckpt = config.train.checkpoint.clone().unwrap_or_else(|| {
        let mut p = output.clone().into_os_string();
        p.push(".ckpt");
        PathBuf::from(p)
    });
    let trained =
        rankd_trainer::train_from(&config, Some((&ckpt, cli.resume)), &mut std::io::stderr())?;
    let written = rankd_trainer::write(&config, &trained, &output)?;
    let last = trained.history.last().copied();
    println!(
        "wrote {} ({} bytes); eval auc {:.4}; {:.0} samples/s",
        output.display(),
        written.file_len,
        last.map_or(f64::NAN, |m| m.auc),
        trained.samples_per_second
    );
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
