//! Peers: trust, the QUIC transport, and replication sessions.
//!
//! - [`store`]: the node-local tables of peers and invitations.
//! - [`tls`]: the QUIC endpoint and mutual ed25519 authentication.
//! - [`session`]: one replication session over one stream (docs/sync-protocol.md).
//! - [`service`]: what `fazt server start` runs: the listener, a dialer per peer, live
//!   replication with backoff.
//! - [`client`]: what the CLI runs: `peer join`, `peer sync`.

pub mod client;
pub mod service;
pub mod session;
pub mod store;
pub mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use fazt_proto::NodeId;
use tokio::sync::watch;

/// How often the database is checked for commits by other connections and processes: every
/// 5 ms while commits keep coming, slowing to every 25 ms when idle (an idle node then costs
/// 40 cheap reads a second, and a first commit after a quiet spell waits at most 25 ms).
const WATCH_BUSY: Duration = Duration::from_millis(5);
const WATCH_IDLE: Duration = Duration::from_millis(25);

/// Ticks whenever anyone commits to the database (this process or another, such as a CLI
/// deploy). Polls SQLite's `data_version`, which changes on every commit by another
/// connection; the thread ends when every receiver is gone.
pub fn watch_db(path: &Path) -> Result<watch::Receiver<u64>> {
    let conn = crate::db::open_reader(path)?;
    let (tx, rx) = watch::channel(0u64);
    std::thread::Builder::new()
        .name("fazt-db-watch".into())
        .spawn(move || {
            let mut last: i64 = -1;
            let mut interval = WATCH_BUSY;
            while !tx.is_closed() {
                if let Ok(v) = conn.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0)) {
                    if v != last {
                        last = v;
                        tx.send_modify(|n| *n += 1);
                        interval = WATCH_BUSY;
                    } else {
                        interval = (interval + Duration::from_millis(1)).min(WATCH_IDLE);
                    }
                }
                std::thread::sleep(interval);
            }
        })
        .context("starting the database watcher")?;
    Ok(rx)
}

/// Resolves HOST:PORT, preferring what the local stack can reach.
pub async fn resolve(addr: &str) -> Result<SocketAddr> {
    let mut found = tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("cannot resolve {addr}"))?
        .collect::<Vec<_>>();
    // IPv4 first: a host name usually has it, and it works on IPv6-less hosts too.
    found.sort_by_key(|a| !a.is_ipv4());
    found
        .into_iter()
        .next()
        .ok_or_else(|| anyhow!("{addr} resolves to no address"))
}

/// How long a connection attempt may take before the peer counts as unreachable.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to a peer that must present `key`, with errors that say what to do.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    own: &ed25519_dalek::SigningKey,
    name: &str,
    addr: &str,
    key: &NodeId,
) -> Result<quinn::Connection> {
    let target = resolve(addr).await?;
    let config = tls::client_config(own, *key.as_bytes(), tls::ALPN)?;
    let connecting = endpoint
        .connect_with(config, target, tls::SERVER_NAME)
        .with_context(|| format!("cannot connect to {name} at {addr}"))?;
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(anyhow!(
            "could not reach {name} at {addr} within {}s: is `fazt server start` running there, and is UDP port {} open?",
            CONNECT_TIMEOUT.as_secs(),
            target.port()
        )),
        Ok(Err(e)) => Err(explain(name, addr, &e)),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// A connection failure in words that say what to do.
pub fn explain(name: &str, addr: &str, err: &quinn::ConnectionError) -> anyhow::Error {
    match tls::classify(err) {
        tls::Refusal::NotTrusted => anyhow!(
            "{name} does not trust this node: run `fazt peer join` with a new ticket from `fazt peer invite` on {name}"
        ),
        tls::Refusal::WrongKey { got } => anyhow!(
            "the node at {addr} is not {name}: it presented {}, not the pinned key; check the address, or re-pin with `fazt peer remove {name}` and a new ticket",
            got.map(|k| NodeId::from_bytes(k).to_string()).unwrap_or_else(|| "another key".into())
        ),
        tls::Refusal::ProtocolMismatch => anyhow!(
            "{name} speaks another fazt protocol version than this node ({}): upgrade the older of the two",
            String::from_utf8_lossy(tls::ALPN)
        ),
        tls::Refusal::Other(text) => anyhow!("connection to {name} at {addr} failed: {text}"),
    }
}

/// If the connection was closed by a refusal, that refusal explained; else `err` as it is.
pub fn refine(
    conn: &quinn::Connection,
    name: &str,
    addr: &str,
    err: anyhow::Error,
) -> anyhow::Error {
    match conn.close_reason() {
        Some(reason @ quinn::ConnectionError::ConnectionClosed(_))
        | Some(reason @ quinn::ConnectionError::TransportError(_)) => explain(name, addr, &reason),
        Some(quinn::ConnectionError::ApplicationClosed(close)) if !close.reason.is_empty() => {
            anyhow!(
                "{name} closed the connection: {}",
                String::from_utf8_lossy(&close.reason)
            )
        }
        _ => err,
    }
}

/// The name this node suggests for itself when joining: `node_config.name`, else the host name.
pub fn own_name(conn: &rusqlite::Connection) -> Result<String> {
    if let Some(name) = crate::config::get_local(conn, "name")? {
        return Ok(name);
    }
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "node".into());
    let cleaned: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let cleaned = cleaned.trim_matches('-').to_string();
    Ok(if cleaned.is_empty() {
        "node".into()
    } else {
        cleaned
    })
}
