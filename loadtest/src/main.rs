//! `rankd-load`: open-loop load for rankd. Parses flags, builds the request pool, runs, prints.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rankd_loadtest::kserve::{self, Target};
use rankd_loadtest::synth::{default_user_level, from_json, Synth};
use rankd_loadtest::{find_max_rate, run_load, Arrivals, Load, RunOptions};

/// Open-loop load generator for rankd: requests are sent at the target rate whatever the server
/// does, and latency is measured from each request's intended send time.
#[derive(Parser, Debug)]
#[command(name = "rankd-load", version)]
struct Cli {
    /// Server address (of the binary RPC, or of the KServe v2 endpoint with --protocol).
    #[arg(long, default_value = "127.0.0.1:7470")]
    addr: std::net::SocketAddr,
    /// rpc (rankd's binary RPC), grpc or rest (the Open Inference Protocol, KServe v2: rankd's
    /// --grpc / --http endpoints or any other KServe v2 server). grpc and rest need the feature
    /// types: give --model-file.
    #[arg(long, default_value = "rpc", value_parser = ["rpc", "grpc", "rest"])]
    protocol: String,
    /// Model name to request.
    #[arg(long)]
    model: String,
    /// Model file whose feature spec drives the synthesized requests (and typing of --requests).
    #[arg(long)]
    model_file: Option<PathBuf>,
    /// Replay requests from a JSON-lines file (the offline scorer's format) instead.
    #[arg(long)]
    requests: Option<PathBuf>,
    /// Target rate, requests per second (the start rate with --find-max-rate).
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds to run.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Items per synthesized request.
    #[arg(long, default_value_t = 200)]
    items: usize,
    /// Connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Poisson arrivals instead of evenly spaced ones.
    #[arg(long)]
    poisson: bool,
    /// Comma-separated features sent at the request level (default: names starting with
    /// `user` or `u_`).
    #[arg(long, value_delimiter = ',')]
    user_features: Option<Vec<String>>,
    /// Distinct requests to synthesize and cycle through.
    #[arg(long, default_value_t = 64)]
    pool: usize,
    /// Find the highest rate whose p99 stays under this many microseconds (no errors).
    #[arg(long)]
    find_max_rate: Option<u64>,
    /// Seconds per trial of --find-max-rate.
    #[arg(long, default_value_t = 3.0)]
    trial_duration: f64,
    /// End with one JSON object on the last line of standard output.
    #[arg(long)]
    json: bool,
    /// Write every response to this file, one line each in order of intended send time:
    /// `INTENDED_UNIX_US LATENCY_US VERSION` (`error` for a failed request).
    #[arg(long)]
    latency_log: Option<PathBuf>,
}

fn load(cli: &Cli) -> Result<Load> {
    let spec = match &cli.model_file {
        Some(p) => Some(
            rankd_formats::ModelFile::open(p)
                .with_context(|| format!("cannot open {}", p.display()))?
                .spec()
                .features
                .clone(),
        ),
        None => None,
    };
    let reqs = if let Some(path) = &cli.requests {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                from_json(&cli.model, l, spec.as_ref())
                    .map_err(|e| anyhow::anyhow!("line {}: {e}", i + 1))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        let Some(spec) = &spec else {
            bail!("give --model-file (to synthesize requests) or --requests (to replay them)");
        };
        let users = cli.user_features.clone();
        let user_level = move |n: &str| match &users {
            Some(list) => list.iter().any(|u| u == n),
            None => default_user_level(n),
        };
        let mut synth = Synth::new(&cli.model, spec, &user_level, 42);
        (0..cli.pool.max(1))
            .map(|i| synth.request(cli.items, i as u64))
            .collect()
    };
    if reqs.is_empty() {
        bail!("no requests");
    }
    if cli.protocol == "rpc" {
        return Ok(Load::Rpc(
            reqs.iter()
                .map(|r| r.encode().map_err(anyhow::Error::from))
                .collect::<Result<_>>()?,
        ));
    }
    let Some(spec) = &spec else {
        bail!(
            "--protocol {} needs --model-file (the feature types)",
            cli.protocol
        );
    };
    Ok(Load::Kserve(if cli.protocol == "grpc" {
        Target::Grpc(reqs.iter().map(|r| kserve::grpc_request(r, spec)).collect())
    } else {
        Target::Rest(
            kserve::rest_path(&reqs[0]),
            reqs.iter().map(|r| kserve::rest_body(r, spec)).collect(),
        )
    }))
}

fn main_inner(cli: Cli) -> Result<()> {
    let load = load(&cli)?;
    let opts = RunOptions {
        addr: cli.addr,
        rate: cli.rate,
        duration: cli.duration,
        connections: cli.connections,
        arrivals: if cli.poisson {
            Arrivals::Poisson
        } else {
            Arrivals::Constant
        },
        progress: true,
        keep_samples: cli.latency_log.is_some(),
    };
    if let Some(bound) = cli.find_max_rate {
        let (rate, report) = find_max_rate(&opts, &load, bound, cli.trial_duration)?;
        println!("max rate with p99 <= {bound} us: {rate:.0} requests/s");
        if let Some(r) = &report {
            println!("{}", r.text());
        }
        if cli.json {
            let mut j = report
                .map(|r| r.json())
                .unwrap_or_else(|| serde_json::json!({}));
            j["max_rate"] = serde_json::json!(rate);
            println!("{j}");
        }
        return Ok(());
    }
    let report = run_load(&opts, &load)?;
    if let Some(path) = &cli.latency_log {
        write_latency_log(path, &report.samples)
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    println!("{}", report.text());
    if cli.json {
        println!("{}", report.json());
    }
    Ok(())
}

fn write_latency_log(path: &std::path::Path, samples: &[rankd_loadtest::Sample]) -> Result<()> {
    use std::io::Write;
    let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
    for s in samples {
        match s.version {
            Some(v) => writeln!(w, "{} {} {v}", s.intended_unix_us, s.latency_us)?,
            None => writeln!(w, "{} {} error", s.intended_unix_us, s.latency_us)?,
        }
    }
    w.flush()?;
    Ok(())
}

fn main() -> ExitCode {
    match main_inner(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rankd-load: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
