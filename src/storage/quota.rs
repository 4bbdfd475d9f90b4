//! Per-app storage quotas: one byte budget for what an app keeps in kv, ds and s3 together
//! (its users' data included), plus per-item caps (`kv::MAX_VALUE_BYTES`,
//! `docs::MAX_DOC_BYTES`, `files::MAX_OBJECT_BYTES`).
//!
//! A quota is a replicated setting (`app_quotas`): the same on every peer. Usage is counted on
//! each node by triggers (`app_usage`, see migration 0005), over the rows the node holds, so
//! rows merged from peers count too. Merges are never refused: merged data may take an app
//! past its quota (say, a quota lowered while peers kept writing). Reads always work, and a
//! local write that would leave the app over its quota with more bytes than before fails and
//! changes nothing; writes that shrink usage are always allowed.

use anyhow::{bail, Result};
use rusqlite::{params, Connection, OptionalExtension};

use crate::db::Db;

/// An app's storage quota when none was set.
pub const DEFAULT_STORAGE_BYTES: u64 = 256 << 20;
/// The largest quota that can be set.
pub const MAX_STORAGE_BYTES: u64 = 1 << 50;

/// The app's quota in bytes.
pub fn limit(conn: &Connection, app_id: &str) -> Result<u64> {
    let set: Option<i64> = conn
        .prepare_cached("SELECT storage_bytes FROM app_quotas WHERE app_id = ?1")?
        .query_row([app_id], |r| r.get(0))
        .optional()?;
    Ok(match set {
        Some(n) if n > 0 => n as u64,
        _ => DEFAULT_STORAGE_BYTES,
    })
}

/// Whether the app's quota was set (rather than the default).
pub fn is_set(conn: &Connection, app_id: &str) -> Result<bool> {
    let set: Option<i64> = conn
        .prepare_cached("SELECT storage_bytes FROM app_quotas WHERE app_id = ?1")?
        .query_row([app_id], |r| r.get(0))
        .optional()?;
    Ok(set.is_some_and(|n| n > 0))
}

/// Sets the app's quota; `None` goes back to the default.
pub fn set(db: &mut Db, app_id: &str, bytes: Option<u64>) -> Result<()> {
    let bytes = match bytes {
        Some(0) => bail!("a storage quota must be at least 1 byte"),
        Some(n) if n > MAX_STORAGE_BYTES => {
            bail!("a storage quota must be at most {MAX_STORAGE_BYTES} bytes")
        }
        Some(n) => n as i64,
        None => 0,
    };
    db.write(|tx| {
        tx.execute(
            "INSERT INTO app_quotas (app_id, storage_bytes) VALUES (?1, ?2)
             ON CONFLICT (app_id) DO UPDATE SET storage_bytes = excluded.storage_bytes",
            params![app_id, bytes],
        )?;
        Ok::<_, anyhow::Error>(())
    })
}

/// Bytes the app stores on this node, as quotas count them.
pub fn usage(conn: &Connection, app_id: &str) -> Result<u64> {
    let n: Option<i64> = conn
        .prepare_cached("SELECT bytes FROM app_usage WHERE app_id = ?1")?
        .query_row([app_id], |r| r.get(0))
        .optional()?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

/// Runs `write` (inside a write transaction) and fails it — so the transaction rolls back —
/// when it grew the app's usage past its quota.
pub(crate) fn guard<T>(
    conn: &Connection,
    app_id: &str,
    write: impl FnOnce() -> Result<T>,
) -> Result<T> {
    let before = usage(conn, app_id)?;
    let value = write()?;
    let after = usage(conn, app_id)?;
    if after > before {
        let quota = limit(conn, app_id)?;
        if after > quota {
            bail!(
                "the app's storage quota is full ({} of {} bytes used, this write needs {} more): delete data, or raise the quota with `fazt app quota`",
                before,
                quota,
                after - before
            );
        }
    }
    Ok(value)
}

/// A size such as `100MB`, `1.5GiB`, `4096` (bytes); K/M/G/T are powers of 1024.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let shift = match unit.as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => bail!("invalid size {text:?}: use a number with an optional unit, like 100MB or 2GB"),
    };
    let n: f64 = num
        .parse()
        .ok()
        .filter(|n: &f64| n.is_finite() && *n >= 0.0)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "invalid size {text:?}: use a number with an optional unit, like 100MB or 2GB"
            )
        })?;
    let bytes = n * (1u64 << shift) as f64;
    if bytes > MAX_STORAGE_BYTES as f64 {
        bail!("size {text:?} is too large (at most {MAX_STORAGE_BYTES} bytes)");
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("100MB").unwrap(), 100 << 20);
        assert_eq!(parse_size("1.5 GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert!(parse_size("ten").is_err());
        assert!(parse_size("-1MB").is_err());
        assert!(parse_size("5PB").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
