//! fazt: one binary and one SQLite file that host sites and apps, on every peer.

mod cli;
mod config;
mod db;
mod hosting;
mod identity;
mod peer;
mod server;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAZT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = cli::Cli::parse().run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
