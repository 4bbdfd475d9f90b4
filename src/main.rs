//! fazt: one binary and one SQLite file that host sites and apps, on every peer.

mod cli;
mod clock;
mod config;
mod content_type;
mod db;
mod hosting;
mod identity;
mod peer;
mod runtime;
mod server;
mod storage;
mod units;

use clap::Parser;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FAZT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    if !cli.serves() {
        // A command piped into `head` should end quietly when the pipe closes, as other
        // command-line tools do, instead of panicking on the failed write. The server keeps
        // Rust's default (SIGPIPE ignored): a client hanging up must not stop it.
        #[cfg(unix)]
        // SAFETY: restoring the default disposition of a signal before any thread exists.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = cli.run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
