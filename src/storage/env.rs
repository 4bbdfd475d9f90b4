//! Per-app variables: `fazt app env set|list|unset`, read by `fazt.env` and a fetch
//! handler's `env`. They replicate with the app, like its files.

use anyhow::{bail, Result};
use rusqlite::{params, Connection};

use crate::db::Db;

fn check_key(key: &str) -> Result<()> {
    let valid = !key.is_empty()
        && key.len() <= 256
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !valid {
        bail!("invalid variable name {key:?}: use 1-256 characters from A-Z, a-z, 0-9, '_', '-' and '.'");
    }
    Ok(())
}

pub fn set(db: &mut Db, app_id: &str, key: &str, value: &str) -> Result<()> {
    check_key(key)?;
    if value.len() > 64 << 10 {
        bail!("value of {key} is larger than 64 KiB");
    }
    db.write(|tx| {
        tx.execute(
            "INSERT INTO app_env (app_id, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (app_id, key) DO UPDATE SET value = excluded.value",
            params![app_id, key, value],
        )?;
        Ok::<_, anyhow::Error>(())
    })
}

/// Removes a variable; says whether it was set.
pub fn unset(db: &mut Db, app_id: &str, key: &str) -> Result<bool> {
    let n = db.write(|tx| {
        Ok::<_, anyhow::Error>(tx.execute(
            "DELETE FROM app_env WHERE app_id = ?1 AND key = ?2",
            params![app_id, key],
        )?)
    })?;
    Ok(n > 0)
}

/// Every variable of an app, by name.
pub fn list(conn: &Connection, app_id: &str) -> Result<Vec<(String, String)>> {
    let mut stmt =
        conn.prepare_cached("SELECT key, value FROM app_env WHERE app_id = ?1 ORDER BY key")?;
    let rows = stmt.query_map([app_id], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}
