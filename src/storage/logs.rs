//! What app code printed (`console.*`) and the errors it raised, kept per node (the node
//! that ran the code) and shown by `fazt app logs`. The newest `KEEP` lines per app stay, and
//! no more than `KEEP_BYTES` of messages.

use anyhow::Result;
use rusqlite::{params, Connection};
use serde::Serialize;

/// Lines kept per app; older ones are pruned as new ones arrive.
pub const KEEP: i64 = 10_000;
/// Message bytes kept per app; the oldest lines beyond it are pruned as new ones arrive.
pub const KEEP_BYTES: i64 = 16 << 20;

#[derive(Debug, Clone, Serialize)]
pub struct Line {
    pub id: i64,
    /// Milliseconds since the Unix epoch.
    pub at: i64,
    pub level: String,
    pub message: String,
}

/// Appends lines, pruning the app's oldest beyond `KEEP` lines or `KEEP_BYTES` of messages.
/// Run it in a transaction: its statements belong together.
pub fn append(conn: &Connection, app_id: &str, lines: &[(i64, String, String)]) -> Result<()> {
    append_within(conn, app_id, lines, KEEP, KEEP_BYTES)
}

fn append_within(
    tx: &Connection,
    app_id: &str,
    lines: &[(i64, String, String)],
    keep: i64,
    keep_bytes: i64,
) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
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
            .execute(params![app_id, last, keep])?;
        // The newest lines whose messages fit in `keep_bytes` stay (octet_length reads the
        // size from the row header, not the text).
        tx.prepare_cached(
            "DELETE FROM app_logs WHERE app_id = ?1 AND id <= (
               SELECT id FROM (
                 SELECT id, sum(octet_length(message)) OVER (ORDER BY id DESC) AS newer
                 FROM app_logs WHERE app_id = ?1)
               WHERE newer > ?2 ORDER BY id DESC LIMIT 1)",
        )?
        .execute(params![app_id, keep_bytes])?;
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Connection {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(
            "CREATE TABLE app_logs (id INTEGER PRIMARY KEY, app_id TEXT NOT NULL, at INTEGER NOT NULL,
                                    level TEXT NOT NULL, message TEXT NOT NULL);
             CREATE INDEX app_logs_by_app ON app_logs (app_id, id);",
        )
        .unwrap();
        conn
    }

    fn line(n: usize, size: usize) -> (i64, String, String) {
        (0, "info".into(), format!("{n:0size$}"))
    }

    #[test]
    fn an_apps_stored_log_keeps_its_newest_lines_within_the_byte_budget() {
        let conn = table();
        let lines: Vec<_> = (0..10).map(|n| line(n, 100)).collect();
        append_within(&conn, "a", &lines, 1000, 350).unwrap();
        append_within(&conn, "b", &[line(0, 100)], 1000, 350).unwrap();
        let kept: Vec<String> = since(&conn, "a", 0, 100)
            .unwrap()
            .into_iter()
            .map(|l| l.message)
            .collect();
        assert_eq!(kept, vec![line(7, 100).2, line(8, 100).2, line(9, 100).2]);
        // Another app's lines are its own.
        assert_eq!(since(&conn, "b", 0, 100).unwrap().len(), 1);
        // One line larger than the whole budget leaves nothing older behind.
        append_within(&conn, "a", &[line(10, 400)], 1000, 350).unwrap();
        assert_eq!(since(&conn, "a", 0, 100).unwrap().len(), 0);
    }
}
