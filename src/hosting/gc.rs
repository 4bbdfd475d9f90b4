//! The blob collector: deletes content (`blobs`) that nothing references any more, in a way
//! that is safe with replication (docs/architecture.md, "Collecting blobs").
//!
//! - Collect: a blob that no `version_files` row and no s3 object (`app_files`) references,
//!   and that stayed so for the grace period (node-local `blob_unreferenced` records when it
//!   was first seen unreferenced), is deleted with a normal replicated delete.
//! - Rescue: a merge that deletes blobs first copies their bytes to the node-local
//!   `blob_rescue`, inside the merge's transaction ([`RescueHook`]); whatever of them this
//!   node still references after the merge stays there, and [`rescue`] re-inserts it with a
//!   local write. A re-insert raises the row's causal length to 3, which beats the delete
//!   (2) on every node it reaches.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Result;
use fazt_sync::{Change, MergeHook, Value, ROW_CID};
use rusqlite::{params, Connection};
use serde::Serialize;

use crate::db::Db;

/// How long a blob must stay unreferenced before the server's collector deletes it.
pub const DEFAULT_GRACE_SECS: u32 = 24 * 3600;

/// Every hash something on this node references. Any `version_files` row counts, even one
/// whose version row is missing (it may be on its way), so the set errs on keeping; so do
/// the files of versions waiting to be re-inserted.
const REFERENCED: &str = "SELECT hash FROM version_files
     UNION SELECT hash FROM version_files_rescue
     UNION SELECT json_extract(meta, '$.hash') FROM app_files
       WHERE json_valid(meta) AND json_extract(meta, '$.hash') IS NOT NULL";

/// What a collection did.
#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct Collected {
    /// Blobs deleted.
    pub deleted: u64,
    /// Bytes they held (content and compressed variants).
    pub freed_bytes: u64,
    /// Unreferenced blobs still inside their grace period.
    pub waiting: u64,
    /// Blobs a peer deleted that this node references, re-inserted.
    pub rescued: u64,
    /// Versions a peer deleted that an app here serves, re-inserted.
    pub rescued_versions: u64,
}

/// Deletes blobs unreferenced for at least `grace_secs` (as of `now`), after re-inserting any
/// blob a merge deleted that this node still references.
pub fn collect(db: &mut Db, grace_secs: i64, now: i64) -> Result<Collected> {
    let rescued = rescue(db)?;
    let cutoff = now.saturating_sub(grace_secs.max(0));
    let mut done = db.write(|tx| -> Result<Collected> {
        tx.execute(
            &format!(
                "DELETE FROM blob_unreferenced
                 WHERE hash NOT IN (SELECT hash FROM blobs) OR hash IN ({REFERENCED})"
            ),
            [],
        )?;
        tx.execute(
            &format!(
                "INSERT OR IGNORE INTO blob_unreferenced (hash, since)
                 SELECT hash, ?1 FROM blobs WHERE hash NOT IN ({REFERENCED})"
            ),
            [now],
        )?;
        let (deleted, freed_bytes): (i64, i64) = tx.query_row(
            "SELECT count(*), coalesce(sum(length(data) + coalesce(length(gzip), 0) + coalesce(length(br), 0)), 0)
             FROM blobs WHERE hash IN (SELECT hash FROM blob_unreferenced WHERE since <= ?1)",
            [cutoff],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        tx.execute(
            "DELETE FROM blobs WHERE hash IN (SELECT hash FROM blob_unreferenced WHERE since <= ?1)",
            [cutoff],
        )?;
        tx.execute("DELETE FROM blob_unreferenced WHERE since <= ?1", [cutoff])?;
        let waiting: i64 =
            tx.query_row("SELECT count(*) FROM blob_unreferenced", [], |r| r.get(0))?;
        Ok(Collected {
            deleted: deleted.max(0) as u64,
            freed_bytes: freed_bytes.max(0) as u64,
            waiting: waiting.max(0) as u64,
            ..Collected::default()
        })
    })?;
    done.rescued = rescued.blobs;
    done.rescued_versions = rescued.versions;
    if done.deleted > 0 || done.rescued > 0 {
        tracing::info!(
            deleted = done.deleted,
            freed_bytes = done.freed_bytes,
            "collected unreferenced blobs"
        );
    }
    Ok(done)
}

/// What [`rescue`] re-inserted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rescued {
    pub blobs: u64,
    pub versions: u64,
}

/// Re-inserts, with a local write that replicates, every blob a merge deleted while this node
/// still references it, and every version a merge deleted while an app here serves it (with
/// its file list). Cheap when there is nothing to do (one read).
pub fn rescue(db: &mut Db) -> Result<Rescued> {
    let any: bool = db.conn().query_row(
        "SELECT EXISTS (SELECT 1 FROM blob_rescue) OR EXISTS (SELECT 1 FROM version_rescue)",
        [],
        |r| r.get(0),
    )?;
    if !any {
        return Ok(Rescued::default());
    }
    let done = db.write(|tx| -> Result<Rescued> {
        let versions = tx.execute(
            "INSERT INTO versions (id, app_id, number, spa, file_count, total_bytes, created_at)
             SELECT id, app_id, number, spa, file_count, total_bytes, created_at FROM version_rescue
             WHERE id NOT IN (SELECT id FROM versions)",
            [],
        )?;
        tx.execute(
            "INSERT INTO version_files (version_id, path, hash, size, mime)
             SELECT version_id, path, hash, size, mime FROM version_files_rescue
             WHERE (version_id, path) NOT IN (SELECT version_id, path FROM version_files)",
            [],
        )?;
        let blobs = tx.execute(
            &format!(
                "INSERT INTO blobs (hash, size, data, gzip, br)
                 SELECT hash, size, data, gzip, br FROM blob_rescue
                 WHERE hash NOT IN (SELECT hash FROM blobs) AND hash IN ({REFERENCED})"
            ),
            [],
        )?;
        tx.execute_batch(
            "DELETE FROM blob_rescue; DELETE FROM version_rescue; DELETE FROM version_files_rescue;",
        )?;
        Ok(Rescued {
            blobs: blobs as u64,
            versions: versions as u64,
        })
    })?;
    if done != Rescued::default() {
        tracing::info!(
            blobs = done.blobs,
            versions = done.versions,
            "re-inserted what a peer deleted that this node still uses"
        );
    }
    Ok(done)
}

/// Keeps, inside the merge's transaction, the bytes of blobs and the versions the merge
/// deletes, and drops the copies of those that survived or that nothing here uses.
#[derive(Default)]
pub struct RescueHook {
    /// Whether the current merge deletes blobs or versions.
    deleting: AtomicBool,
}

/// The text primary key of a row delete of `table` in a change, if it is one.
fn deleted_key(c: &fazt_sync::Change, table: &str) -> Option<String> {
    if c.table != table || c.cid != ROW_CID || c.cl.is_live() {
        return None;
    }
    // A pk that does not unpack to one text is not a row of ours: the merge decides what
    // to do with it.
    match fazt_sync::pack::unpack(&c.pk).ok()?.as_slice() {
        [Value::Text(key)] => Some(key.clone()),
        _ => None,
    }
}

impl RescueHook {
    pub fn install(db: &mut Db) {
        db.set_merge_hook(Arc::new(RescueHook::default()));
    }
}

impl MergeHook for RescueHook {
    fn before(&self, conn: &Connection, changes: &[Change]) -> rusqlite::Result<()> {
        let mut any = false;
        for c in changes {
            if let Some(hash) = deleted_key(c, "blobs") {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO blob_rescue (hash, size, data, gzip, br)
                     SELECT hash, size, data, gzip, br FROM blobs WHERE hash = ?1",
                )?
                .execute(params![hash])?;
                any = true;
            } else if let Some(id) = deleted_key(c, "versions") {
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO version_rescue
                     SELECT id, app_id, number, spa, file_count, total_bytes, created_at
                     FROM versions WHERE id = ?1",
                )?
                .execute(params![id])?;
                conn.prepare_cached(
                    "INSERT OR IGNORE INTO version_files_rescue
                     SELECT version_id, path, hash, size, mime FROM version_files WHERE version_id = ?1",
                )?
                .execute(params![id])?;
                any = true;
            }
        }
        self.deleting.store(any, Ordering::Relaxed);
        Ok(())
    }

    fn after(&self, conn: &Connection) -> rusqlite::Result<()> {
        if self.deleting.swap(false, Ordering::Relaxed) {
            // Versions first: the files of one kept here keep their blobs.
            conn.execute_batch(&format!(
                "DELETE FROM version_rescue
                 WHERE id IN (SELECT id FROM versions) OR id NOT IN (SELECT current_version FROM apps);
                 DELETE FROM version_files_rescue WHERE version_id NOT IN (SELECT id FROM version_rescue);
                 DELETE FROM blob_rescue
                 WHERE hash IN (SELECT hash FROM blobs) OR hash NOT IN ({REFERENCED});"
            ))?;
        }
        Ok(())
    }
}
