//! `rankd-tool`: inspect, validate and synthesize rankd model files.

use std::path::PathBuf;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use rankd_formats::synth::{write_synthetic, ModelKind, SynthOptions};

#[derive(Parser)]
#[command(
    name = "rankd-tool",
    version,
    about = "Inspect, validate and make rankd model files"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Wide,
    Deep,
    WideDeep,
    Deepfm,
}

#[derive(Subcommand)]
enum Command {
    /// Print a model's metadata, features, transforms, tables and layers.
    Inspect {
        /// The model file (.rkm).
        file: PathBuf,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Fully check model files (checksum, structure, shapes); exit 1 if any is invalid.
    Validate {
        /// Model files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Write a model with synthetic weights (for tests, benchmarks and demos).
    Synth {
        /// Output file.
        #[arg(short, long)]
        output: PathBuf,
        /// Model name.
        #[arg(long, default_value = "synthetic")]
        name: String,
        /// Model version.
        #[arg(long, default_value_t = 1)]
        version: u64,
        /// Model kind.
        #[arg(long, value_enum, default_value = "wide-deep")]
        kind: Kind,
        /// Embedding dimension.
        #[arg(long, default_value_t = 8)]
        dim: u32,
        /// Buckets of the hashed item slot (its table is the big one).
        #[arg(long, default_value_t = 1000)]
        item_buckets: u32,
        /// Seed of the weights.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    match cli.command {
        Command::Inspect { file, json } => rankd_tools::inspect(&file, json, &mut stdout),
        Command::Validate { files } => rankd_tools::validate(&files, &mut stdout),
        Command::Synth {
            output,
            name,
            version,
            kind,
            dim,
            item_buckets,
            seed,
        } => {
            let kind = match kind {
                Kind::Wide => ModelKind::Wide,
                Kind::Deep => ModelKind::Deep,
                Kind::WideDeep => ModelKind::WideDeep,
                Kind::Deepfm => ModelKind::DeepFm,
            };
            let written = write_synthetic(
                &output,
                &SynthOptions {
                    name,
                    version,
                    kind,
                    dim,
                    item_buckets,
                    seed,
                    ..SynthOptions::default()
                },
            )?;
            println!("wrote {} ({} bytes)", output.display(), written.file_len);
            Ok(())
        }
    }
}
