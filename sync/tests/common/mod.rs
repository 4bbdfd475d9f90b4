//! Replicas for tests: in-memory SQLite databases with the engine, and a way to compare them.

#![allow(dead_code)]

use fazt_sync::{Batch, Replica};
use rusqlite::Connection;

pub const SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER NOT NULL DEFAULT 0, c ANY);
CREATE TABLE pairs (x TEXT NOT NULL, y INTEGER NOT NULL, v ANY, PRIMARY KEY (x, y));
";

pub fn replica() -> Replica {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    let mut r = Replica::open(conn).unwrap();
    r.replicate("items").unwrap();
    r.replicate("pairs").unwrap();
    r
}

pub fn exec(r: &mut Replica, sql: &str, params: impl rusqlite::Params) {
    r.write(|tx| tx.execute(sql, params).map(|_| ())).unwrap();
}

/// Sends everything `to` lacks from `from`.
pub fn sync(from: &Replica, to: &mut Replica) -> Batch {
    let batch = from.batch_since(&to.coverage().unwrap()).unwrap();
    to.apply(&batch).unwrap();
    batch
}

/// Table contents, in a canonical text form.
pub fn data(r: &Replica) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT id, quote(a), b, quote(c) FROM items ORDER BY id",
        "SELECT quote(x), y, quote(v) FROM pairs ORDER BY x, y",
    ] {
        let mut stmt = r.conn().prepare(sql).unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |row| {
                Ok((0..n)
                    .map(|i| format!("{:?}", row.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap();
        out.extend(rows.map(|r| r.unwrap()));
    }
    out
}

/// Clock metadata with site ordinals and row keys replaced by what they stand for, so that
/// replicas can be compared byte for byte.
pub fn clocks(r: &Replica) -> Vec<String> {
    let mut out = Vec::new();
    for (table, pk, join) in [
        ("items", "c.key", String::new()),
        (
            "pairs",
            "quote(p.x) || ',' || p.y",
            "JOIN pairs__fazt_pks p ON p.__fazt_key = c.key".to_string(),
        ),
    ] {
        let sql = format!(
            "SELECT {pk}, c.cid, c.col_version, c.db_version, coalesce(hex(s.site_id), 'placeholder'), c.seq
             FROM {table}__fazt_clock c {join}
             LEFT JOIN fazt_sync_sites s ON s.ord = c.site_ord ORDER BY 1, 2"
        );
        let mut stmt = r.conn().prepare(&sql).unwrap();
        let rows = stmt
            .query_map([], |row| {
                Ok(format!(
                    "{table}:{:?}|{}|{}|{}|{}|{}",
                    row.get_ref(0)?,
                    row.get::<_, i64>(1)?,
                    row.get::<_, i64>(2)?,
                    row.get::<_, i64>(3)?,
                    row.get::<_, String>(4)?,
                    row.get::<_, i64>(5)?
                ))
            })
            .unwrap();
        out.extend(rows.map(|r| r.unwrap()));
    }
    out
}
