//! `fazt.app.kv`: JSON values by key, with an optional time to live.
//!
//! A row's `data` is `{"value": V}` or `{"value": V, "expiresAt": MS}`: value and expiry are
//! one column, so concurrent writes on two nodes never pair one write's value with the
//! other's expiry. Expired entries read as absent and are removed by later writes.

use anyhow::{bail, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::Value;

use super::{check_name, Budget, Scope};
use crate::db::Db;

/// Expired entries removed by one write, at most.
const PURGE_PER_WRITE: i64 = 100;

/// Largest value, as JSON text.
pub const MAX_VALUE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub key: String,
    pub value: Value,
    pub expires_at: Option<i64>,
}

pub fn set(
    db: &mut Db,
    scope: &Scope,
    key: &str,
    value: Value,
    ttl_ms: Option<f64>,
    now: i64,
) -> Result<()> {
    check_name("a key", key)?;
    let mut data = serde_json::Map::new();
    data.insert("value".into(), value);
    if let Some(ttl) = ttl_ms {
        if !ttl.is_finite() || ttl <= 0.0 {
            bail!("ttl must be a positive number of milliseconds");
        }
        data.insert(
            "expiresAt".into(),
            Value::from(now.saturating_add(ttl as i64)),
        );
    }
    let data = Value::Object(data).to_string();
    if data.len() > MAX_VALUE_BYTES {
        bail!("value is larger than {} bytes as JSON", MAX_VALUE_BYTES);
    }
    db.write(|tx| {
        super::quota::guard(tx, &scope.app_id, || {
            tx.prepare_cached(
                "INSERT INTO app_kv (app_id, user_id, key, data) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (app_id, user_id, key) DO UPDATE SET data = excluded.data",
            )?
            .execute(params![scope.app_id, scope.user_id, key, data])?;
            // Entries past their expiry read as absent; writes remove them, a bounded number at a
            // time, so storage does not grow with dead entries. (Every node may remove the same
            // entry: the deletes converge.)
            tx.prepare_cached(
                "DELETE FROM app_kv WHERE rowid IN (SELECT rowid FROM app_kv
                   WHERE json_extract(data, '$.expiresAt') IS NOT NULL
                     AND json_extract(data, '$.expiresAt') <= ?1 LIMIT ?2)",
            )?
            .execute(params![now, PURGE_PER_WRITE])?;
            Ok(())
        })
    })
}

fn parse(key: String, data: &str, now: i64) -> Option<Entry> {
    let Value::Object(mut data) = serde_json::from_str(data).ok()? else {
        return None;
    };
    let expires_at = data.get("expiresAt").and_then(Value::as_i64);
    if expires_at.is_some_and(|at| at <= now) {
        return None;
    }
    Some(Entry {
        key,
        value: data.remove("value").unwrap_or(Value::Null),
        expires_at,
    })
}

pub fn get(conn: &Connection, scope: &Scope, key: &str, now: i64) -> Result<Option<Entry>> {
    let data: Option<String> = conn
        .prepare_cached("SELECT data FROM app_kv WHERE app_id = ?1 AND user_id = ?2 AND key = ?3")?
        .query_row(params![scope.app_id, scope.user_id, key], |r| r.get(0))
        .optional()?;
    Ok(data.and_then(|d| parse(key.to_string(), &d, now)))
}

/// Removes a key; says whether it held a live value.
pub fn delete(db: &mut Db, scope: &Scope, key: &str, now: i64) -> Result<bool> {
    let existed = get(db.conn(), scope, key, now)?.is_some();
    db.write(|tx| {
        tx.prepare_cached("DELETE FROM app_kv WHERE app_id = ?1 AND user_id = ?2 AND key = ?3")?
            .execute(params![scope.app_id, scope.user_id, key])?;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(existed)
}

/// Live entries whose key starts with `prefix`, in key order, up to the budget's bytes.
pub fn list(
    conn: &Connection,
    scope: &Scope,
    prefix: &str,
    now: i64,
    budget: &Budget,
) -> Result<Vec<Entry>> {
    let mut stmt = conn.prepare_cached(
        "SELECT key, data FROM app_kv WHERE app_id = ?1 AND user_id = ?2
           AND substr(key, 1, length(?3)) = ?3 ORDER BY key",
    )?;
    let mut rows = stmt.query(params![scope.app_id, scope.user_id, prefix])?;
    let mut out = Vec::new();
    let mut bytes = 0;
    loop {
        budget.check_time()?;
        let Some(row) = rows.next()? else {
            break;
        };
        let key: String = row.get(0)?;
        let data = row.get_ref(1)?.as_str()?;
        if let Some(entry) = parse(key, data, now) {
            budget.spend(
                &mut bytes,
                entry.key.len() + data.len(),
                "kv.list would return",
            )?;
            out.push(entry);
        }
    }
    Ok(out)
}
