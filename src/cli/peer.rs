//! `fazt peer ...`: identity, trust, and syncing with other nodes.

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Subcommand;
use fazt_proto::ticket::Ticket;
use fazt_proto::NodeId;
use serde::Serialize;

use super::output;
use crate::config::{NodeConfig, Overrides};
use crate::peer::store::PeerName;
use crate::peer::{client, store};

#[derive(Subcommand)]
pub enum PeerCmd {
    /// Print this node's id (its public key), which other nodes pin
    Id,
    /// Print a one-time ticket another node can join with (the last line of output)
    Invite {
        /// How long the ticket stays valid
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Where the other node reaches this one [default: the domain and sync port]
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
    },
    /// Join the node that printed TICKET: both nodes then trust each other
    Join {
        ticket: String,
        /// The name this node will use for the inviting node [default: the name it suggests]
        #[arg(long)]
        name: Option<String>,
        /// The name to suggest for this node [default: `name` in node config, else the host name]
        #[arg(long = "as", value_name = "NAME")]
        as_name: Option<String>,
        /// Where the inviting node can reach this one [default: none, this node dials]
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<String>,
    },
    /// Pin a peer's key by hand and dial it at HOST:PORT
    Add {
        name: String,
        addr: String,
        /// The peer's node id (`fazt peer id` there)
        #[arg(long)]
        key: String,
    },
    /// Accept connections from a node by its id (it dials this one)
    Trust {
        node_id: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// List peers
    List {
        #[arg(long)]
        json: bool,
    },
    /// Connection state and lag per peer, as the running server sees them
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting a peer
    Remove { name: String },
    /// Sync both ways with a peer once; exits 0 when both hold the same versions
    Sync {
        name: String,
        /// Give up after this many seconds
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
}

pub fn run(cmd: PeerCmd, db: &Path) -> Result<()> {
    match cmd {
        PeerCmd::Id => {
            let database = super::open_for_write(db)?;
            println!("{}", crate::identity::ensure(database.conn())?);
            Ok(())
        }
        PeerCmd::Invite { ttl, addr } => invite(db, &ttl, addr),
        PeerCmd::Join {
            ticket,
            name,
            as_name,
            addr,
        } => {
            let ticket: Ticket = ticket.parse()?;
            let name = name.as_deref().map(PeerName::parse).transpose()?;
            if let Some(a) = &addr {
                store::check_addr(a)?;
            }
            let mut database = super::open_for_write(db)?;
            let me = match as_name {
                Some(n) => PeerName::parse(&n)?.to_string(),
                None => crate::peer::own_name(database.conn())?,
            };
            let joined = client::join(
                &mut database,
                &ticket,
                name,
                &me,
                addr.as_deref().unwrap_or(""),
            )?;
            println!(
                "joined {} at {} (node {})",
                joined.name, joined.addr, joined.node
            );
            println!("both nodes now trust each other: `fazt peer sync {}` syncs now, a running server keeps them in sync", joined.name);
            Ok(())
        }
        PeerCmd::Add { name, addr, key } => {
            let name = PeerName::parse(&name)?;
            let key = parse_node_id(&key)?;
            store::check_addr(&addr)?;
            let database = super::open_for_write(db)?;
            let own = crate::identity::ensure(database.conn())?;
            store::add(database.conn(), &own, &name, &key, Some(&addr))?;
            println!("added {name} at {addr} (node {key})");
            println!("{name} must trust this node too: on {name} run `fazt peer trust {own}`");
            Ok(())
        }
        PeerCmd::Trust { node_id, name } => {
            let key = parse_node_id(&node_id)?;
            let database = super::open_for_write(db)?;
            let own = crate::identity::ensure(database.conn())?;
            let name = match name {
                Some(n) => PeerName::parse(&n)?,
                None => match store::by_key(database.conn(), &key)? {
                    Some(p) => p.name,
                    None => store::free_name(
                        database.conn(),
                        &format!("node-{}", &key.to_string()[..8]),
                        &key,
                    )?,
                },
            };
            store::add(database.conn(), &own, &name, &key, None)?;
            println!("trusting {key} as {name}");
            Ok(())
        }
        PeerCmd::List { json } => list(db, json, false),
        PeerCmd::Status { json } => list(db, json, true),
        PeerCmd::Remove { name } => {
            let database = crate::db::open_existing(db)?;
            if !store::remove(database.conn(), &name)? {
                bail!("no peer named {name}: see `fazt peer list`");
            }
            println!("removed {name}: its connections are refused from now on");
            Ok(())
        }
        PeerCmd::Sync { name, timeout } => {
            if timeout == 0 {
                bail!("--timeout must be at least 1 second");
            }
            store::ready_to_dial(crate::db::open_existing(db)?.conn(), &name)?;
            eprintln!("syncing with {name}...");
            let synced = client::sync_once(db, &name, Duration::from_secs(timeout), true)?;
            let s = &synced.stats;
            println!(
                "synced with {name} in {:.2}s: sent {} changes and {} of content ({} in all), received {} changes and {} of content ({} in all); both hold the same versions",
                synced.elapsed.as_secs_f64(),
                s.sent_changes,
                output::size(s.sent_content),
                output::size(s.sent_bytes),
                s.received_changes,
                output::size(s.received_content),
                output::size(s.received_bytes),
            );
            Ok(())
        }
    }
}

fn parse_node_id(text: &str) -> Result<NodeId> {
    text.parse().map_err(|e| {
        anyhow!("invalid node id {text:?}: {e} (copy it from `fazt peer id` on that node)")
    })
}

fn invite(db: &Path, ttl: &str, addr: Option<String>) -> Result<()> {
    let ttl = humantime::parse_duration(ttl)
        .map_err(|e| anyhow!("invalid --ttl {ttl:?}: {e} (examples: 10m, 1h, 2d)"))?;
    if ttl.is_zero() || ttl > Duration::from_secs(30 * 24 * 3600) {
        bail!("--ttl must be between 1 second and 30 days");
    }
    let database = super::open_for_write(db)?;
    let conn = database.conn();
    let node = crate::identity::ensure(conn)?;
    let running = crate::server::running(conn)?;
    let addr = match addr {
        Some(a) => {
            store::check_addr(&a)?;
            a
        }
        None => {
            let config = NodeConfig::load(conn, &Overrides::default())?;
            let port = running
                .as_ref()
                .map(|r| r.sync_port)
                .filter(|p| *p != 0)
                .unwrap_or(config.sync_port.value);
            let domain = running
                .as_ref()
                .map(|r| r.domain.clone())
                .unwrap_or_else(|| config.domain.value.to_string());
            format!("{domain}:{port}")
        }
    };
    if running.is_none() {
        eprintln!("no server is running on this database: start one (`fazt server start`) so the other node can join");
    }
    let secret = store::create_invite(conn, ttl.as_secs() as i64)?;
    let ticket = Ticket {
        node,
        secret,
        addr: addr.clone(),
    };
    println!(
        "invitation for {addr}, valid for {}, usable once; on the other node run:",
        humantime::format_duration(ttl)
    );
    println!("  fazt peer join <ticket> --name NAME");
    println!("{ticket}");
    Ok(())
}

#[derive(Serialize)]
struct PeerView {
    name: String,
    node_id: String,
    address: Option<String>,
    added_at: i64,
    connected: bool,
    /// Live sessions with the peer: 1 once the dialers settle.
    sessions: u32,
    last_seen: Option<i64>,
    lag: Option<i64>,
}

fn list(db: &Path, json: bool, status: bool) -> Result<()> {
    let database = crate::db::open_existing(db)?;
    let conn = database.conn();
    let server = crate::server::running(conn)?;
    let peers = store::list(conn)?;
    let views: Vec<PeerView> = peers
        .iter()
        .map(|p| PeerView {
            name: p.name.to_string(),
            node_id: p.node_id.to_string(),
            address: p.addr.clone(),
            added_at: p.added_at,
            // The flag is only as fresh as the server that wrote it.
            connected: p.connected && server.is_some(),
            sessions: if server.is_some() { p.sessions } else { 0 },
            last_seen: p.last_seen,
            lag: p.lag,
        })
        .collect();
    if json {
        return output::json(&views);
    }
    if status {
        match &server {
            Some(r) => println!(
                "server running (pid {}), replicating on UDP port {}",
                r.pid, r.sync_port
            ),
            None => println!("no server running: live replication is off (`fazt server start`)"),
        }
    }
    if views.is_empty() {
        println!("no peers yet: `fazt peer invite` here, then `fazt peer join TICKET --name NAME` on the other node");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = views
        .iter()
        .map(|v| {
            vec![
                v.name.clone(),
                v.address.clone().unwrap_or_else(|| "-".into()),
                v.node_id.clone(),
                if v.connected {
                    "yes".into()
                } else {
                    "no".into()
                },
                v.sessions.to_string(),
                v.last_seen
                    .map(output::time)
                    .unwrap_or_else(|| "never".into()),
                v.lag
                    .map(|l| format!("{l} versions"))
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    output::table(
        &[
            "NAME",
            "ADDRESS",
            "NODE ID",
            "CONNECTED",
            "SESSIONS",
            "LAST SEEN",
            "LAG",
        ],
        &rows,
    );
    Ok(())
}
