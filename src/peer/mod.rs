//! Peers: trust, the QUIC transport, and replication sessions.
//!
//! - [`store`]: the node-local tables of peers and invitations.
//! - [`limits`]: the tunables: batch sizes, memory budgets, windows, timeouts.
//! - [`tls`]: the QUIC endpoint and mutual ed25519 authentication.
//! - [`router`]: the protocols a node serves, one handler per ALPN token, and who may use which.
//! - [`frame`]: reading and writing the frames of a peer stream.
//! - [`session`]: one replication session over one stream (docs/sync-protocol.md).
//! - [`service`]: what `fazt server start` runs: the listener, a dialer per peer, live
//!   replication with backoff.
//! - [`client`]: what the CLI runs: `peer join`, `peer sync`.
//! - [`error`]: why talking to a peer failed, and those causes in words for the user.

pub mod client;
pub mod error;
pub mod frame;
mod limits;
pub mod router;
pub mod service;
pub mod session;
pub mod store;
pub mod tls;

use std::net::SocketAddr;

use anyhow::Result;
use fazt_proto::NodeId;

pub use error::Error;
use error::Unreachable;
pub use limits::Limits;

/// How sessions on this node open their connections: engine connections from the handle,
/// with the node's checks and without re-running migrations. One per node: its sessions
/// share the applying connection through it.
pub fn session_connect(db: &crate::db::Database) -> session::Connect {
    let db = db.clone();
    session::Connect::new(move || db.engine())
}

/// This node as a replication session sees it: its schema, its clock, its peers table (a
/// removed peer is refused at once), hosting's rescue of blobs a merge deleted that this
/// node still references (see hosting::gc), and the commit watcher told of each applied
/// group.
pub fn session_node() -> session::Node {
    session::Node {
        schema: crate::db::migrations::latest_version(),
        now: crate::db::now_secs,
        trusts: |db, peer| Ok(store::by_key(db.conn(), peer)?.is_some()),
        after_apply: |db| {
            let rescued = crate::hosting::gc::rescue(db).map(|_| ());
            // The group is committed: exporters and the route cache learn it now, not at the
            // watcher's next poll.
            crate::db::poke_watchers(db.conn());
            rescued
        },
    }
}

/// Resolves HOST:PORT (the address of `peer`), preferring what the local stack can reach.
async fn resolve(peer: &str, addr: &str) -> Result<SocketAddr, Error> {
    let unreachable = |cause| Error::Unreachable {
        peer: peer.to_string(),
        addr: addr.to_string(),
        cause,
    };
    let mut found = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| unreachable(Unreachable::Resolve(e)))?
        .collect::<Vec<_>>();
    // IPv4 first: a host name usually has it, and it works on IPv6-less hosts too.
    found.sort_by_key(|a| !a.is_ipv4());
    found
        .into_iter()
        .next()
        .ok_or_else(|| unreachable(Unreachable::NoAddress))
}

/// Connects to a peer that must present `key`, asking for `protocol` (a token of
/// `fazt_proto::alpn`), with errors that say what to do.
pub async fn connect(
    endpoint: &quinn::Endpoint,
    own: &ed25519_dalek::SigningKey,
    name: &str,
    addr: &str,
    key: &NodeId,
    protocol: &[u8],
) -> Result<quinn::Connection, Error> {
    let target = resolve(name, addr).await?;
    let config = tls::client_config(
        own,
        *key.as_bytes(),
        &[protocol, fazt_proto::alpn::NEGOTIATE],
    )?;
    let unreachable = |cause| Error::Unreachable {
        peer: name.to_string(),
        addr: addr.to_string(),
        cause,
    };
    let connecting = endpoint
        .connect_with(config, target, tls::SERVER_NAME)
        .map_err(|e| unreachable(Unreachable::Connect(e)))?;
    let within = Limits::default().connect_timeout;
    match tokio::time::timeout(within, connecting).await {
        Err(_) => Err(unreachable(Unreachable::Silent {
            within,
            port: Some(target.port()),
        })),
        Ok(Err(e)) => Err(Error::from_connection(name, addr, &e)),
        Ok(Ok(conn)) => Ok(conn),
    }
}

/// Why the other side closed `conn`, if it closed it with a refusal or a reason to give.
pub fn closed_by(conn: &quinn::Connection, name: &str, addr: &str) -> Option<Error> {
    match conn.close_reason()? {
        reason @ (quinn::ConnectionError::ConnectionClosed(_)
        | quinn::ConnectionError::TransportError(_)) => {
            Some(Error::from_connection(name, addr, &reason))
        }
        quinn::ConnectionError::ApplicationClosed(close) => Error::from_close(name, &close)
            .or_else(|| {
                (!close.reason.is_empty()).then(|| Error::Closed {
                    peer: name.to_string(),
                    when: error::Closed::Because(
                        String::from_utf8_lossy(&close.reason).into_owned(),
                    ),
                })
            }),
        _ => None,
    }
}

/// If the connection was closed by a refusal, that refusal; else `err` as it is.
pub fn refine(conn: &quinn::Connection, name: &str, addr: &str, err: Error) -> Error {
    closed_by(conn, name, addr).unwrap_or(err)
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
