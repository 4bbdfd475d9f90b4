//! `fazt server ...`

use std::path::Path;

use anyhow::{bail, Result};
use clap::Subcommand;
use serde::Serialize;

use super::output;
use crate::config::{self, Domain, NodeConfig, Overrides, Setting};

#[derive(Subcommand)]
pub enum ServerCmd {
    /// Serve this node's sites (creates the database on first run)
    Start {
        /// HTTP port for this run only (0 picks a free one)
        #[arg(long)]
        port: Option<u16>,
        /// Domain for this run only
        #[arg(long)]
        domain: Option<String>,
        /// UDP port for peer connections (QUIC) for this run only; default: the HTTP port's
        /// number (0 picks a free one)
        #[arg(long)]
        sync_port: Option<u16>,
    },
    /// Create a new database; refuses to overwrite an existing one
    Init {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Store configuration in the database
    SetConfig {
        #[arg(long)]
        domain: Option<String>,
        #[arg(long)]
        port: Option<u16>,
        /// UDP port for peer connections (QUIC)
        #[arg(long)]
        sync_port: Option<u16>,
        /// Largest file a deploy accepts, e.g. 10M (applies to every peer)
        #[arg(long, value_name = "SIZE")]
        max_file_size: Option<String>,
    },
    /// Show the configuration in effect and where each value comes from
    Status {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: ServerCmd, db: &Path) -> Result<()> {
    match cmd {
        ServerCmd::Start {
            port,
            domain,
            sync_port,
        } => {
            let overrides = Overrides {
                port,
                domain: domain.as_deref().map(Domain::parse).transpose()?,
                sync_port,
            };
            let database = super::open_for_write(db)?;
            let config = NodeConfig::load(database.conn(), &overrides)?;
            crate::server::run(crate::db::Database::with_writer(db, database)?, config)
        }
        ServerCmd::Init { domain, port } => {
            let domain = domain.as_deref().map(Domain::parse).transpose()?;
            check_port(port)?;
            let database = crate::db::create(db)?;
            let conn = database.conn();
            if let Some(d) = &domain {
                config::set_local(conn, "domain", d.as_str())?;
            }
            if let Some(p) = port {
                config::set_local(conn, "port", &p.to_string())?;
            }
            let node = crate::identity::ensure(conn)?;
            println!("created database {}", db.display());
            println!("node id {node}");
            Ok(())
        }
        ServerCmd::SetConfig {
            domain,
            port,
            sync_port,
            max_file_size,
        } => {
            if domain.is_none() && port.is_none() && sync_port.is_none() && max_file_size.is_none()
            {
                bail!("nothing to set: pass --domain, --port, --sync-port or --max-file-size");
            }
            let domain = domain.as_deref().map(Domain::parse).transpose()?;
            check_port(port)?;
            check_port(sync_port)?;
            let max = max_file_size
                .as_deref()
                .map(config::parse_size)
                .transpose()?;
            let mut database = super::open_for_write(db)?;
            if let Some(d) = &domain {
                config::set_local(database.conn(), "domain", d.as_str())?;
                println!("domain = {d}");
            }
            if let Some(p) = port {
                config::set_local(database.conn(), "port", &p.to_string())?;
                println!("port = {p}");
            }
            if let Some(p) = sync_port {
                config::set_local(database.conn(), "sync_port", &p.to_string())?;
                println!("sync port = {p}");
            }
            if let Some(m) = max {
                config::set_max_file_bytes(&mut database, m)?;
                println!("max file size = {m} bytes");
            }
            if (domain.is_some() || port.is_some() || sync_port.is_some())
                && crate::server::running(database.conn())?.is_some()
            {
                eprintln!("the running server keeps its current domain and port until it restarts");
            }
            Ok(())
        }
        ServerCmd::Status { json } => status(db, json),
    }
}

fn check_port(port: Option<u16>) -> Result<()> {
    if port == Some(0) {
        bail!("port 0 cannot be stored: choose a port from 1 to 65535 (`server start --port 0` picks a free one for one run)");
    }
    Ok(())
}

#[derive(Serialize)]
struct Status {
    database: String,
    node_id: String,
    schema_version: u32,
    domain: Setting<Domain>,
    port: Setting<u16>,
    sync_port: Setting<u16>,
    max_file_bytes: Setting<u64>,
    apps: i64,
    running: Option<Running>,
}

#[derive(Serialize)]
struct Running {
    pid: u32,
    port: u16,
    sync_port: u16,
    domain: String,
}

fn status(db: &Path, json: bool) -> Result<()> {
    let database = crate::db::open_existing(db)?;
    let conn = database.conn();
    let config = NodeConfig::load(conn, &Overrides::default())?;
    let node_id = crate::identity::ensure(conn)?;
    let status = Status {
        database: db.display().to_string(),
        node_id: node_id.to_string(),
        schema_version: conn.query_row("PRAGMA user_version", [], |r| r.get(0))?,
        domain: config.domain,
        port: config.port,
        sync_port: config.sync_port,
        max_file_bytes: config::max_file_bytes(conn)?,
        apps: conn.query_row("SELECT count(*) FROM apps", [], |r| r.get(0))?,
        running: crate::server::running(conn)?.map(|r| Running {
            pid: r.pid,
            port: r.port,
            sync_port: r.sync_port,
            domain: r.domain,
        }),
    };
    if json {
        return output::json(&status);
    }
    println!("database   {}", status.database);
    println!("node id    {}", status.node_id);
    println!(
        "domain     {} ({})",
        status.domain.value, status.domain.source
    );
    println!("port       {} ({})", status.port.value, status.port.source);
    println!(
        "sync port  {} ({})",
        status.sync_port.value, status.sync_port.source
    );
    println!(
        "max file   {} ({})",
        output::size(status.max_file_bytes.value),
        status.max_file_bytes.source
    );
    println!("apps       {}", status.apps);
    match &status.running {
        Some(r) => println!(
            "server     running, pid {} on port {} (sync {}) for {}",
            r.pid, r.port, r.sync_port, r.domain
        ),
        None => println!("server     not running"),
    }
    Ok(())
}
