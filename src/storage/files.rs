//! `fazt.app.s3`: blobs by path. The bytes are content-addressed in the node's `blobs` table
//! (shared with deployed files, so identical bytes are stored and sent to peers once); the
//! path's metadata is one JSON column, so a put's hash, type and size always stay together.

use anyhow::{bail, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{check_name, Budget, Scope};
use crate::db::Db;

/// Largest object one put stores.
pub const MAX_OBJECT_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    pub hash: String,
    pub mime: String,
    pub size: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Listed {
    pub path: String,
    pub meta: Meta,
}

pub fn put(
    db: &mut Db,
    scope: &Scope,
    path: &str,
    data: &[u8],
    mime: Option<&str>,
    now: i64,
) -> Result<Meta> {
    check_name("a path", path)?;
    if data.len() > MAX_OBJECT_BYTES {
        bail!(
            "s3.put: the object is {} bytes, more than the {} MiB an object may hold",
            data.len(),
            MAX_OBJECT_BYTES >> 20
        );
    }
    let mime = match mime.map(str::trim) {
        Some(m) if !m.is_empty() => {
            if m.len() > 255 || m.bytes().any(|b| b.is_ascii_control()) {
                bail!("invalid content type {m:?}");
            }
            m.to_string()
        }
        _ => crate::content_type::mime_for(path),
    };
    let meta = Meta {
        hash: hex::encode(Sha256::digest(data)),
        mime,
        size: data.len() as i64,
        updated_at: now,
    };
    let json = serde_json::to_string(&meta)?;
    db.write(|tx| super::quota::guard(tx, &scope.app_id, || {
        tx.prepare_cached(
            "INSERT INTO blobs (hash, size, data) VALUES (?1, ?2, ?3) ON CONFLICT (hash) DO NOTHING",
        )?
        .execute(params![meta.hash, meta.size, data])?;
        tx.prepare_cached(
            "INSERT INTO app_files (app_id, user_id, path, meta) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (app_id, user_id, path) DO UPDATE SET meta = excluded.meta",
        )?
        .execute(params![scope.app_id, scope.user_id, path, json])?;
        Ok(())
    }))?;
    Ok(meta)
}

pub fn stat(conn: &Connection, scope: &Scope, path: &str) -> Result<Option<Meta>> {
    let json: Option<String> = conn
        .prepare_cached(
            "SELECT meta FROM app_files WHERE app_id = ?1 AND user_id = ?2 AND path = ?3",
        )?
        .query_row(params![scope.app_id, scope.user_id, path], |r| r.get(0))
        .optional()?;
    json.map(|j| Ok(serde_json::from_str(&j)?)).transpose()
}

/// A blob's metadata and bytes. Bytes not (yet) here — a peer's put whose content has not
/// arrived — read as an error rather than as empty data.
pub fn get(conn: &Connection, scope: &Scope, path: &str) -> Result<Option<(Meta, Vec<u8>)>> {
    let Some(meta) = stat(conn, scope, path)? else {
        return Ok(None);
    };
    let data: Option<Vec<u8>> = conn
        .prepare_cached("SELECT data FROM blobs WHERE hash = ?1")?
        .query_row([&meta.hash], |r| r.get(0))
        .optional()?;
    match data {
        Some(d) => Ok(Some((meta, d))),
        None => bail!("the content of {path} has not arrived on this node yet"),
    }
}

/// Removes a path; says whether it existed.
pub fn delete(db: &mut Db, scope: &Scope, path: &str) -> Result<bool> {
    let n = db.write(|tx| {
        Ok::<_, anyhow::Error>(
            tx.prepare_cached(
                "DELETE FROM app_files WHERE app_id = ?1 AND user_id = ?2 AND path = ?3",
            )?
            .execute(params![scope.app_id, scope.user_id, path])?,
        )
    })?;
    Ok(n > 0)
}

/// Paths starting with `prefix`, in path order, up to the budget's bytes.
pub fn list(
    conn: &Connection,
    scope: &Scope,
    prefix: &str,
    budget: &Budget,
) -> Result<Vec<Listed>> {
    let mut stmt = conn.prepare_cached(
        "SELECT path, meta FROM app_files WHERE app_id = ?1 AND user_id = ?2
           AND substr(path, 1, length(?3)) = ?3 ORDER BY path",
    )?;
    let mut rows = stmt.query(params![scope.app_id, scope.user_id, prefix])?;
    let mut out = Vec::new();
    let mut bytes = 0;
    loop {
        budget.check_time()?;
        let Some(row) = rows.next()? else {
            break;
        };
        let path: String = row.get(0)?;
        let meta = row.get_ref(1)?.as_str()?;
        budget.spend(
            &mut bytes,
            path.len() + meta.len() + 16,
            "s3.list would return",
        )?;
        out.push(Listed {
            meta: serde_json::from_str(meta)?,
            path,
        });
    }
    Ok(out)
}
