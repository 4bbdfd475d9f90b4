//! What app code printed (`console.*`) and the errors it raised, kept per node (the node
//! that ran the code) and shown by `fazt app logs`. The newest `KEEP` lines per app stay.

use anyhow::Result;
use rusqlite::{params, Connection};
use serde::Serialize;

/// Lines kept per app; older ones are pruned as new ones arrive.
pub const KEEP: i64 = 10_000;

#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub level: String,
    pub message: String,
}

/// Appends lines (one transaction), pruning the app's oldest beyond `KEEP`.
pub fn append(conn: &mut Connection, app_id: &str, lines: &[(i64, String, String)]) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let tx = conn.transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO app_logs (app_id, at, level, message) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (at, level, message) in lines {
            insert.execute(params![app_id, at, level, message])?;
        }
        let last = tx.last_insert_rowid();
        // Cheap when nothing is old enough: one indexed probe.
        tx.prepare_cached("DELETE FROM app_logs WHERE app_id = ?1 AND id <= ?2 - ?3")?
            .execute(params![app_id, last, KEEP])?;
    }
    tx.commit()?;
    Ok(())
}

/// Lines after `after` (an id), oldest first; at most `limit`.
pub fn since(conn: &Connection, app_id: &str, after: i64, limit: i64) -> Result<Vec<Line>> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at, level, message FROM app_logs WHERE app_id = ?1 AND id > ?2 ORDER BY id LIMIT ?3",
    )?;
    let rows = stmt.query_map(params![app_id, after, limit], |r| {
        Ok(Line {
            id: r.get(0)?,
            at: r.get(1)?,
            level: r.get(2)?,
            message: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The newest `n` lines, oldest first.
pub fn tail(conn: &Connection, app_id: &str, n: i64) -> Result<Vec<Line>> {
    let from: i64 = conn.query_row(
        "SELECT coalesce(min(id), 0) FROM (SELECT id FROM app_logs WHERE app_id = ?1 ORDER BY id DESC LIMIT ?2)",
        params![app_id, n],
        |r| r.get(0),
    )?;
    since(conn, app_id, from - 1, n)
}

/// The id of the app's newest line (0 when none).
pub fn newest(conn: &Connection, app_id: &str) -> Result<i64> {
    Ok(conn.query_row(
        "SELECT coalesce(max(id), 0) FROM app_logs WHERE app_id = ?1",
        [app_id],
        |r| r.get(0),
    )?)
}
