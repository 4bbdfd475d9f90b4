//! Embedded, versioned schema migrations. The schema version is SQLite's `user_version`.

use anyhow::{bail, Context, Result};
use rusqlite::Connection;

/// Every migration, in order. A migration's number is its position (1-based).
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_init.sql"),
    include_str!("migrations/0002_peers.sql"),
    include_str!("migrations/0003_app_storage.sql"),
    include_str!("migrations/0004_kv_expiry.sql"),
    include_str!("migrations/0005_app_storage_limits.sql"),
    include_str!("migrations/0006_blob_gc.sql"),
];

/// Tables that replicate between peers. Everything else in the schema is node-local.
pub const REPLICATED_TABLES: &[&str] = &[
    "settings",
    "apps",
    "aliases",
    "versions",
    "version_files",
    "blobs",
    "app_kv",
    "app_docs",
    "app_doc_counters",
    "app_files",
    "app_env",
    "app_quotas",
];

/// Tables that describe this node only; they never replicate.
pub const NODE_LOCAL_TABLES: &[&str] = &[
    "node_config",
    "node_identity",
    "node_runtime",
    "peers",
    "peer_invites",
    "peer_content",
    "app_logs",
    "app_usage",
    "blob_unreferenced",
    "blob_rescue",
    "version_rescue",
    "version_files_rescue",
];

pub fn latest_version() -> u32 {
    MIGRATIONS.len() as u32
}

pub fn schema_version(conn: &Connection) -> Result<u32> {
    Ok(conn.query_row("PRAGMA user_version", [], |row| row.get(0))?)
}

/// Brings the schema up to date, each migration in its own transaction; says whether any
/// migration ran. Refuses a database written by a newer fazt rather than guessing.
pub fn migrate(conn: &mut Connection) -> Result<bool> {
    let current = schema_version(conn)?;
    if current > latest_version() {
        bail!(
            "this database has schema version {current}, newer than this fazt understands ({}): upgrade fazt",
            latest_version()
        );
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let number = index as u32 + 1;
        let tx = conn.transaction()?;
        tx.execute_batch(sql)
            .with_context(|| format!("applying migration {number}"))?;
        tx.pragma_update(None, "user_version", number)?;
        tx.commit()?;
    }
    Ok(current < latest_version())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_replicated_table_follows_the_replication_rules() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        for table in REPLICATED_TABLES {
            fazt_sync::check_replicable(&conn, table).unwrap_or_else(|e| panic!("{e}"));
        }
    }

    #[test]
    fn migrating_twice_changes_nothing() {
        let mut conn = Connection::open_in_memory().unwrap();
        migrate(&mut conn).unwrap();
        migrate(&mut conn).unwrap();
        assert_eq!(schema_version(&conn).unwrap(), latest_version());
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let mut conn = Connection::open_in_memory().unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        assert!(migrate(&mut conn)
            .unwrap_err()
            .to_string()
            .contains("newer"));
    }
}
