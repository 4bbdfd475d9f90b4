//! The node's ed25519 identity. The secret key stays in the node-local `node_identity`
//! table; the public key is the node id that peers pin.

use anyhow::{anyhow, Context, Result};
use ed25519_dalek::SigningKey;
use fazt_proto::NodeId;
use rusqlite::{Connection, OptionalExtension};

/// Creates the node's key pair if it has none; returns the node id.
pub fn ensure(conn: &Connection) -> Result<NodeId> {
    if let Some(key) = load(conn)? {
        return Ok(node_id(&key));
    }
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| anyhow!("no randomness for the node key: {e}"))?;
    let key = SigningKey::from_bytes(&secret);
    conn.execute(
        "INSERT INTO node_identity (id, secret_key, created_at) VALUES (1, ?1, ?2)",
        rusqlite::params![&secret[..], crate::clock::now_secs()],
    )
    .context("storing the node key")?;
    Ok(node_id(&key))
}

/// The node's key pair, if it has been created.
pub fn load(conn: &Connection) -> Result<Option<SigningKey>> {
    let secret: Option<Vec<u8>> = conn
        .query_row(
            "SELECT secret_key FROM node_identity WHERE id = 1",
            [],
            |row| row.get(0),
        )
        .optional()?;
    secret
        .map(|bytes| {
            let bytes: [u8; 32] = bytes
                .try_into()
                .map_err(|_| anyhow!("the node key in this database is damaged (not 32 bytes)"))?;
            Ok(SigningKey::from_bytes(&bytes))
        })
        .transpose()
}

pub fn node_id(key: &SigningKey) -> NodeId {
    NodeId::from_bytes(key.verifying_key().to_bytes())
}
