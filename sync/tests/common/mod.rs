//! Replicas for tests: in-memory SQLite databases with the engine, and a way to compare them.

#![allow(dead_code)]

use fazt_sync::{Batch, Coverage, DbVersion, Replica, SiteId};
use rusqlite::Connection;

/// `items.c` converts as NUMERIC affinity does (2.0 is stored as 2, -0.0 as 0); `pairs.v` has
/// no type, so it keeps every value as given (-0.0 stays a REAL with its sign).
pub(crate) const SCHEMA: &str = "
CREATE TABLE items (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER NOT NULL DEFAULT 0, c ANY);
CREATE TABLE pairs (x TEXT NOT NULL, y INTEGER NOT NULL, v, PRIMARY KEY (x, y));
";

pub(crate) fn replica() -> Replica {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(SCHEMA).unwrap();
    let mut r = Replica::open(conn).unwrap();
    r.replicate("items").unwrap();
    r.replicate("pairs").unwrap();
    r
}

pub(crate) fn exec(r: &mut Replica, sql: &str, params: impl rusqlite::Params) {
    r.write(|tx| tx.execute(sql, params).map(|_| ())).unwrap();
}

/// Sends everything `to` lacks from `from`.
pub(crate) fn sync(from: &Replica, to: &mut Replica) -> Batch {
    let batch = from.batch_since(&to.coverage().unwrap()).unwrap();
    to.apply(&batch).unwrap();
    batch
}

/// `batch` with its origin transactions in reverse order (last origin first, and within an
/// origin the highest version first); each transaction's changes keep their order.
pub(crate) fn reversed(batch: &Batch) -> Batch {
    let mut changes = batch.changes.clone();
    changes.sort_by_key(|c| std::cmp::Reverse((c.site_id, c.db_version)));
    Batch {
        changes,
        covers: batch.covers.clone(),
        sender_clock: batch.sender_clock,
    }
}

/// Part of `batch`: the origin transactions whose bit in `mask` is set (the `i`-th
/// transaction is bit `i % 64`), covering just those.
pub(crate) fn partial(batch: &Batch, mask: u64) -> Batch {
    let mut groups: Vec<(SiteId, DbVersion)> = batch
        .changes
        .iter()
        .map(|c| (c.site_id, c.db_version))
        .collect();
    groups.dedup();
    let keep: Vec<(SiteId, DbVersion)> = groups
        .into_iter()
        .enumerate()
        .filter(|(i, _)| mask >> (i % 64) & 1 == 1)
        .map(|(_, g)| g)
        .collect();
    let mut covers = Coverage::default();
    for &(site, v) in &keep {
        covers.insert(site, v, v);
    }
    Batch {
        changes: batch
            .changes
            .iter()
            .filter(|c| keep.contains(&(c.site_id, c.db_version)))
            .cloned()
            .collect(),
        covers,
        sender_clock: batch.sender_clock,
    }
}

/// Table contents, in a canonical text form. Values are read as they are (not `quote()`d,
/// which prints -0.0 as 0.0).
pub(crate) fn data(r: &Replica) -> Vec<String> {
    let mut out = Vec::new();
    for sql in [
        "SELECT id, a, b, c FROM items ORDER BY id",
        "SELECT x, y, v FROM pairs ORDER BY x, y",
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
pub(crate) fn clocks(r: &Replica) -> Vec<String> {
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
