//! `dynakv`: fetch assets, generate text, evaluate and benchmark caches.

// Input never panics the library or the CLI (docs/architecture.md, "Where
// input is validated"): outside tests these are errors, not warnings.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable
    )
)]

mod cmd;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "dynakv",
    version,
    about = "Token-wise KV-cache compression for LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Download the default model and corpus into $DYNAKV_HOME (~/.cache/dynakv).
    Fetch(cmd::fetch::FetchArgs),
    /// Calibrate DynaKV bases on Brown `calib` text and write an artifact.
    Calibrate(cmd::calibrate::CalibrateArgs),
    /// Train DynaKV's router (and bases) on Brown `calib`, model frozen.
    Train(cmd::train::TrainArgs),
    /// Generate text from a prompt.
    Generate(cmd::generate::GenerateArgs),
    /// Evaluate a cache configuration.
    Eval {
        #[command(subcommand)]
        what: cmd::eval::EvalCommand,
    },
    /// Measure prefill and decode throughput.
    Bench(cmd::bench::BenchArgs),
}

/// Errors end the process with one line on stderr (`error: ` and the chain
/// of causes joined by `: `) and exit code 1; `RUST_BACKTRACE=1` adds the
/// backtrace below it.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            if std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0") {
                eprintln!("{}", e.backtrace());
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line (control characters escaped, so a
/// damaged file's bytes cannot break the line or the terminal).
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}")
        .chars()
        .flat_map(|c| match c {
            '\n' | '\r' | '\t' => vec![' '],
            c if c.is_control() => c.escape_default().collect(),
            c => vec![c],
        })
        .collect()
}

fn run() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Fetch(a) => cmd::fetch::run(a),
        Command::Calibrate(a) => cmd::calibrate::run(a),
        Command::Train(a) => cmd::train::run(a),
        Command::Generate(a) => cmd::generate::run(a),
        Command::Eval { what } => cmd::eval::run(what),
        Command::Bench(a) => cmd::bench::run(a),
    }
}
