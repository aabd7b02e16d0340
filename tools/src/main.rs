//! `rankd-tool`: inspect, validate and synthesize rankd model files.

use std::path::PathBuf;

use std::process::ExitCode;

use anyhow::{Context, Result};
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
    /// The feed benchmark model (docs/benchmarks.md); `--dim` and `--item-buckets` are ignored.
    Feed,
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
    /// Build a model file from a model config (TOML) and PyTorch weights (safetensors).
    Import {
        /// Model config.
        #[arg(long)]
        config: PathBuf,
        /// Weights: embedding.<slot>, wide.<slot>, wide.bias, deep.<i>.weight, deep.<i>.bias.
        #[arg(long)]
        weights: PathBuf,
        /// Model name.
        #[arg(long)]
        name: String,
        /// Model version.
        #[arg(long)]
        version: u64,
        /// Output model file.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Score JSON-lines requests offline; one {"scores": [...]} line per request.
    Score {
        /// The model file.
        model: PathBuf,
        /// Requests, one JSON object per line: {"user": {...}, "items": [{...}, ...]}.
        #[arg(long, required_unless_present = "csv", conflicts_with = "csv")]
        requests: Option<PathBuf>,
        /// Instead of requests: a CSV file with a header row, read with the trainer's reader;
        /// writes `row,score,label` per row.
        #[arg(long)]
        csv: Option<PathBuf>,
        /// The CSV delimiter.
        #[arg(long, default_value = ",")]
        delimiter: char,
        /// The CSV label column, copied to the output when present.
        #[arg(long, default_value = "label")]
        label: String,
        /// Where to write the results (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Put a model file into a model root atomically (validate, copy to a hidden directory,
    /// sync, rename to ROOT/NAME/VERSION); a running rankd picks it up.
    Deploy {
        /// The model file.
        file: PathBuf,
        /// The model root.
        #[arg(long)]
        root: PathBuf,
        /// Model name (default: from the file's metadata).
        #[arg(long)]
        name: Option<String>,
        /// Version (default: from the file's metadata).
        #[arg(long)]
        version: Option<u64>,
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
    match cli.command {
        Command::Inspect { file, json } => {
            rankd_tools::inspect(&file, json, &mut std::io::stdout().lock())
        }
        Command::Validate { files } => rankd_tools::validate(&files, &mut std::io::stdout().lock()),
        Command::Import {
            config,
            weights,
            name,
            version,
            output,
        } => {
            let written = rankd_tools::import::import(&rankd_tools::import::ImportOptions {
                config: &config,
                weights: &weights,
                name,
                version,
                output: &output,
            })?;
            println!("wrote {} ({} bytes)", output.display(), written.file_len);
            Ok(())
        }
        Command::Score {
            model,
            requests,
            csv,
            delimiter,
            label,
            output,
        } => {
            let model = rankd_engine::Model::open(&model)
                .with_context(|| format!("cannot open {}", model.display()))?;
            if let Some(csv) = csv {
                let mut out: Box<dyn std::io::Write> = match &output {
                    Some(p) => Box::new(std::io::BufWriter::new(
                        std::fs::File::create(p)
                            .with_context(|| format!("cannot create {}", p.display()))?,
                    )),
                    None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
                };
                let opts = rankd_tools::score::CsvOptions { delimiter, label };
                let n = rankd_tools::score::score_csv(&model, &csv, &opts, &mut out)?;
                out.flush()?;
                eprintln!("scored {n} rows");
                return Ok(());
            }
            let requests = requests.context("give --requests or --csv")?;
            let input = std::fs::File::open(&requests)
                .with_context(|| format!("cannot open {}", requests.display()))?;
            let mut input = std::io::BufReader::new(input);
            let mut out: Box<dyn std::io::Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let summary = rankd_tools::score::score(
                &model,
                &mut input,
                &mut out,
                &mut std::io::stderr().lock(),
            )?;
            out.flush()?;
            if summary.failed > 0 {
                anyhow::bail!(
                    "{} of {} requests failed (see the error lines)",
                    summary.failed,
                    summary.ok + summary.failed
                );
            }
            Ok(())
        }
        Command::Deploy {
            file,
            root,
            name,
            version,
        } => {
            let d = rankd_tools::deploy::deploy(&file, &root, name.as_deref(), version)?;
            println!(
                "deployed {} renamed_at_ms={}",
                d.dir.display(),
                d.renamed_at_ms
            );
            Ok(())
        }
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
                Kind::Feed => {
                    rankd_formats::synth::feed::write_version(&output, version, seed)?;
                    println!("wrote {}", output.display());
                    return Ok(());
                }
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
