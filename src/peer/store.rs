//! Peers, trust and invitations, kept in the node-local tables `peers` and `peer_invites`.

use std::fmt;

use anyhow::{bail, Result};
use fazt_proto::NodeId;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};

/// A peer's local name (`zyt`, `laptop`): what commands take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct PeerName(String);

impl PeerName {
    pub fn parse(input: &str) -> Result<PeerName> {
        let ok = !input.is_empty()
            && input.len() <= 63
            && input
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !input.starts_with('-');
        if !ok {
            bail!("invalid peer name {input:?}: use 1-63 lower-case letters, digits and '-', not starting with '-'");
        }
        Ok(PeerName(input.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PeerName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// HOST:PORT where a peer accepts connections.
pub fn check_addr(addr: &str) -> Result<()> {
    let Some((host, port)) = addr.rsplit_once(':') else {
        bail!("address {addr:?} must be HOST:PORT, e.g. zyt.example.com:4698");
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || host.contains('/') || host.contains(char::is_whitespace) {
        bail!("address {addr:?} has no valid host: use HOST:PORT");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bail!("address {addr:?} has no valid port (1-65535)"),
    }
}

#[derive(Debug, Clone)]
pub struct Peer {
    pub name: PeerName,
    pub node_id: NodeId,
    pub addr: Option<String>,
    pub added_at: i64,
    /// The running server has a live session with the peer.
    pub connected: bool,
    /// How many (one, once the dialers settle; see docs/sync-protocol.md).
    pub sessions: u32,
    pub last_seen: Option<i64>,
    pub lag: Option<i64>,
}

const COLUMNS: &str = "name, node_id, addr, added_at, connected, last_seen, lag";

/// A peers row as stored: name, node id, address, added, live sessions (the column
/// `connected`), last seen, lag.
type PeerRow = (
    String,
    String,
    Option<String>,
    i64,
    i64,
    Option<i64>,
    Option<i64>,
);

fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<PeerRow> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn to_peer(row: PeerRow) -> Result<Peer> {
    let (name, node_id, addr, added_at, sessions, last_seen, lag) = row;
    Ok(Peer {
        name: PeerName(name),
        node_id: node_id
            .parse()
            .map_err(|e| anyhow::anyhow!("the stored key of peer {node_id:?} is damaged: {e}"))?,
        addr,
        added_at,
        connected: sessions > 0,
        sessions: u32::try_from(sessions).unwrap_or(0),
        last_seen,
        lag,
    })
}

pub fn list(conn: &Connection) -> Result<Vec<Peer>> {
    let mut stmt = conn.prepare(&format!("SELECT {COLUMNS} FROM peers ORDER BY name"))?;
    let rows = stmt.query_map([], from_row)?;
    rows.map(|r| to_peer(r?)).collect()
}

pub fn by_name(conn: &Connection, name: &str) -> Result<Option<Peer>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM peers WHERE name = ?1"),
        [name],
        from_row,
    )
    .optional()?
    .map(to_peer)
    .transpose()
}

pub fn by_key(conn: &Connection, key: &NodeId) -> Result<Option<Peer>> {
    conn.query_row(
        &format!("SELECT {COLUMNS} FROM peers WHERE node_id = ?1"),
        [key.to_string()],
        from_row,
    )
    .optional()?
    .map(to_peer)
    .transpose()
}

/// Checks that `name` is a peer this node can dial (for commands that sync with it).
pub fn ready_to_dial(conn: &Connection, name: &str) -> Result<Peer> {
    let Some(peer) = by_name(conn, name)? else {
        bail!("no peer named {name}: see `fazt peer list`, or add one with `fazt peer join` or `fazt peer add`");
    };
    if peer.addr.is_none() {
        bail!(
            "{name} has no address to dial (it connects to this node): give it one with `fazt peer add {name} HOST:PORT --key {}`",
            peer.node_id
        );
    }
    Ok(peer)
}

/// Pins `key` under `name`. Refuses this node's own key, a name already in use for another
/// key, and a key already trusted under another name; re-adding the same pair updates the
/// address.
pub fn add(
    conn: &Connection,
    own: &NodeId,
    name: &PeerName,
    key: &NodeId,
    addr: Option<&str>,
) -> Result<()> {
    if key == own {
        bail!("{key} is this node's own id: give the id of the other node (`fazt peer id` there)");
    }
    if let Some(addr) = addr {
        check_addr(addr)?;
    }
    if let Some(existing) = by_name(conn, name.as_str())? {
        if existing.node_id != *key {
            bail!(
                "a peer named {name} already exists with node id {}: `fazt peer remove {name}` first, or choose another name",
                existing.node_id
            );
        }
    }
    if let Some(existing) = by_key(conn, key)? {
        if existing.name != *name {
            bail!(
                "node {key} is already trusted as {}: `fazt peer remove {}` first to rename it",
                existing.name,
                existing.name
            );
        }
    }
    conn.execute(
        "INSERT INTO peers (name, node_id, addr, added_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET addr = coalesce(excluded.addr, peers.addr)",
        params![
            name.as_str(),
            key.to_string(),
            addr,
            crate::clock::now_secs()
        ],
    )?;
    Ok(())
}

/// A name for a peer that joined: its own suggestion when free (or already its own), else
/// the suggestion with a number appended.
pub fn free_name(conn: &Connection, suggested: &str, key: &NodeId) -> Result<PeerName> {
    let base = PeerName::parse(suggested)
        .unwrap_or_else(|_| PeerName(format!("node-{}", &key.to_string()[..8])));
    for n in 1.. {
        let candidate = if n == 1 {
            base.0.clone()
        } else {
            format!("{}-{n}", base.0)
        };
        match by_name(conn, &candidate)? {
            None => return Ok(PeerName(candidate)),
            Some(p) if p.node_id == *key => return Ok(PeerName(candidate)),
            Some(_) => {}
        }
    }
    unreachable!("an unbounded search always finds a free name")
}

pub fn remove(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn.execute("DELETE FROM peers WHERE name = ?1", [name])? > 0)
}

/// What the running server last saw of a peer: how many sessions with it are live (kept in
/// the column `connected`, which reads as "connected" when not zero), and its lag.
pub fn record_state(
    conn: &Connection,
    key: &NodeId,
    sessions: usize,
    lag: Option<i64>,
) -> Result<()> {
    conn.execute(
        "UPDATE peers SET connected = ?2, last_seen = ?3, lag = coalesce(?4, lag) WHERE node_id = ?1",
        params![
            key.to_string(),
            i64::try_from(sessions).unwrap_or(i64::MAX),
            crate::clock::now_secs(),
            lag
        ],
    )?;
    Ok(())
}

/// Marks every peer disconnected (a server starting, or stopping).
pub fn reset_connections(conn: &Connection) -> Result<()> {
    conn.execute("UPDATE peers SET connected = 0 WHERE connected != 0", [])?;
    Ok(())
}

fn secret_hash(secret: &[u8; 32]) -> String {
    hex::encode(Sha256::digest(secret))
}

/// Records a one-time invitation valid for `ttl_secs`; returns its secret.
pub fn create_invite(conn: &Connection, ttl_secs: i64) -> Result<[u8; 32]> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret)
        .map_err(|e| anyhow::anyhow!("no randomness for an invitation: {e}"))?;
    let now = crate::clock::now_secs();
    conn.execute(
        "INSERT INTO peer_invites (secret_hash, created_at, expires_at) VALUES (?1, ?2, ?3)",
        params![secret_hash(&secret), now, now.saturating_add(ttl_secs)],
    )?;
    Ok(secret)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InviteError {
    #[error("this node never issued that ticket (it may be forged or meant for another node)")]
    Unknown,
    #[error("the ticket was already used: run `fazt peer invite` for a new one")]
    Used,
    #[error("the ticket expired: run `fazt peer invite` for a new one")]
    Expired,
}

/// Spends an invitation: succeeds once per ticket, before it expires.
pub fn redeem_invite(
    conn: &Connection,
    secret: &[u8; 32],
    used_by: &NodeId,
) -> Result<std::result::Result<(), InviteError>> {
    let hash = secret_hash(secret);
    let row: Option<(i64, Option<i64>)> = conn
        .query_row(
            "SELECT expires_at, used_at FROM peer_invites WHERE secret_hash = ?1",
            [&hash],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let now = crate::clock::now_secs();
    Ok(match row {
        None => Err(InviteError::Unknown),
        Some((_, Some(_))) => Err(InviteError::Used),
        Some((expires, None)) if expires <= now => Err(InviteError::Expired),
        Some(_) => {
            // The WHERE clause makes spending atomic even with two joins racing.
            let spent = conn.execute(
                "UPDATE peer_invites SET used_at = ?2, used_by = ?3 WHERE secret_hash = ?1 AND used_at IS NULL",
                params![hash, now, used_by.to_string()],
            )?;
            if spent == 1 {
                Ok(())
            } else {
                Err(InviteError::Used)
            }
        }
    })
}

/// Until when (Unix seconds, exclusive) some unused invitation is open; `None` when none is
/// open now. The peer service keeps this in memory and compares it with the clock at every
/// handshake, so an invitation stops admitting unknown keys the moment it expires.
pub fn invite_open_until(conn: &Connection) -> Result<Option<i64>> {
    Ok(conn.query_row(
        "SELECT max(expires_at) FROM peer_invites WHERE used_at IS NULL AND expires_at > ?1",
        [crate::clock::now_secs()],
        |r| r.get(0),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let mut c = Connection::open_in_memory().unwrap();
        crate::db::migrations::migrate(&mut c).unwrap();
        c
    }

    fn key(b: u8) -> NodeId {
        NodeId::from_bytes([b; 32])
    }

    #[test]
    fn an_invitation_works_once_and_not_after_it_expires() {
        let c = conn();
        let s = create_invite(&c, 3600).unwrap();
        assert!(invite_open_until(&c).unwrap().is_some());
        assert_eq!(redeem_invite(&c, &s, &key(1)).unwrap(), Ok(()));
        assert_eq!(
            redeem_invite(&c, &s, &key(2)).unwrap(),
            Err(InviteError::Used)
        );
        assert!(invite_open_until(&c).unwrap().is_none());
        assert_eq!(
            redeem_invite(&c, &[0; 32], &key(2)).unwrap(),
            Err(InviteError::Unknown)
        );
        let old = create_invite(&c, -1).unwrap();
        assert_eq!(
            redeem_invite(&c, &old, &key(2)).unwrap(),
            Err(InviteError::Expired)
        );
        assert!(invite_open_until(&c).unwrap().is_none());
    }

    #[test]
    fn names_and_keys_are_each_pinned_once() {
        let c = conn();
        let own = key(9);
        let zyt = PeerName::parse("zyt").unwrap();
        add(&c, &own, &zyt, &key(1), Some("zyt.example:4698")).unwrap();
        assert!(add(&c, &own, &zyt, &key(2), None)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        let other = PeerName::parse("other").unwrap();
        assert!(add(&c, &own, &other, &key(1), None)
            .unwrap_err()
            .to_string()
            .contains("already trusted as zyt"));
        assert!(add(&c, &own, &other, &own, None)
            .unwrap_err()
            .to_string()
            .contains("own id"));
        assert!(add(&c, &own, &other, &key(3), Some("nohost")).is_err());
        // Re-adding the same pair keeps the address unless a new one is given.
        add(&c, &own, &zyt, &key(1), None).unwrap();
        assert_eq!(
            by_name(&c, "zyt").unwrap().unwrap().addr.as_deref(),
            Some("zyt.example:4698")
        );
        assert!(by_key(&c, &key(1)).unwrap().is_some());
        assert!(by_key(&c, &key(3)).unwrap().is_none());
        assert_eq!(free_name(&c, "zyt", &key(4)).unwrap().as_str(), "zyt-2");
        assert_eq!(free_name(&c, "zyt", &key(1)).unwrap().as_str(), "zyt");
        assert_eq!(
            free_name(&c, "Bad Name", &key(4)).unwrap().as_str().len(),
            "node-".len() + 8
        );
        assert!(remove(&c, "zyt").unwrap());
        assert!(!remove(&c, "zyt").unwrap());
    }

    #[test]
    fn peer_names_follow_the_rules() {
        for bad in ["", "-x", "Zyt", "a b", &"x".repeat(64)] {
            assert!(PeerName::parse(bad).is_err(), "{bad:?}");
        }
        PeerName::parse("zyt-2").unwrap();
    }
}
