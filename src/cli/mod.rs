//! The command line: argument definitions and dispatch.

mod alias;
mod app;
mod data;
pub(crate) mod output;
mod peer;
mod server;
mod sync;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fazt", version, about = "Sovereign compute in one binary: sites, apps and replicated storage", long_about = None)]
pub struct Cli {
    /// The node's database file [default: ~/.fazt/data.db]
    #[arg(long, global = true, env = "FAZT_DB", value_name = "PATH")]
    db: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run and configure this node
    #[command(subcommand)]
    Server(server::ServerCmd),
    /// Deploy and manage apps
    #[command(subcommand)]
    App(app::AppCmd),
    /// Point subdomains at apps
    #[command(subcommand)]
    Alias(alias::AliasCmd),
    /// Run SQL against the node's database (writes to replicated tables replicate)
    Sql {
        /// One or more statements, run in one transaction
        sql: String,
        /// Print the last statement's rows as a JSON array of objects
        #[arg(long)]
        json: bool,
    },
    /// Manage the node's database
    #[command(subcommand)]
    Db(data::DbCmd),
    /// Exchange changes as files, and see what this node holds
    #[command(subcommand)]
    Sync(sync::SyncCmd),
    /// Other nodes: trust, invitations, syncing
    #[command(subcommand)]
    Peer(peer::PeerCmd),
}

impl Cli {
    /// Whether this command runs the server (which must outlive clients that hang up).
    pub fn serves(&self) -> bool {
        matches!(
            self.command,
            Command::Server(server::ServerCmd::Start { .. })
        )
    }

    pub fn run(self) -> Result<()> {
        let db = match self.db {
            Some(path) => path,
            None => crate::db::default_path()?,
        };
        match self.command {
            Command::Server(cmd) => server::run(cmd, &db),
            Command::App(cmd) => app::run(cmd, &db),
            Command::Alias(cmd) => alias::run(cmd, &db),
            Command::Sql { sql, json } => data::sql(&db, &sql, json),
            Command::Db(cmd) => data::run(cmd, &db),
            Command::Sync(cmd) => sync::run(cmd, &db),
            Command::Peer(cmd) => peer::run(cmd, &db),
        }
    }
}

/// Opens the database for a command that writes, creating it when missing (and saying so).
fn open_for_write(db: &std::path::Path) -> Result<crate::db::Db> {
    let opened = crate::db::open_or_create(db)?;
    if opened.created {
        eprintln!("created database {}", db.display());
    }
    Ok(opened.db)
}
