//! Apps, versions and aliases as the CLI manages them.

use anyhow::{anyhow, bail, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use super::names::{AppId, AppName, Subdomain, VersionId};
use crate::db::Db;

#[derive(Debug, Serialize)]
pub struct AppSummary {
    pub name: String,
    pub id: AppId,
    pub current_version: Option<VersionSummary>,
    pub aliases: Vec<String>,
    pub versions: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct VersionSummary {
    pub id: VersionId,
    pub number: i64,
    pub files: i64,
    pub bytes: i64,
    pub spa: bool,
    pub created_at: i64,
    pub current: bool,
}

/// Looks an app up by name; an unknown name is an error that says how to list apps.
pub fn find_app(conn: &Connection, name: &str) -> Result<AppId> {
    let id: Option<String> = conn
        .query_row(
            "SELECT id FROM apps WHERE name = ?1 ORDER BY id LIMIT 1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    id.map(AppId)
        .ok_or_else(|| anyhow!("no app named {name:?} (see `fazt app list`)"))
}

pub fn list_apps(conn: &Connection) -> Result<Vec<AppSummary>> {
    let ids: Vec<String> = conn
        .prepare("SELECT id FROM apps ORDER BY name, id")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    ids.into_iter()
        .map(|id| app_summary(conn, &AppId(id)))
        .collect()
}

pub fn app_summary(conn: &Connection, id: &AppId) -> Result<AppSummary> {
    let (name, current, created_at, updated_at): (String, String, i64, i64) = conn.query_row(
        "SELECT name, current_version, created_at, updated_at FROM apps WHERE id = ?1",
        [&id.0],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
    )?;
    let aliases = conn
        .prepare("SELECT subdomain FROM aliases WHERE app_id = ?1 ORDER BY subdomain")?
        .query_map([&id.0], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    let versions: i64 = conn.query_row(
        "SELECT count(*) FROM versions WHERE app_id = ?1",
        [&id.0],
        |r| r.get(0),
    )?;
    let current_version = list_versions(conn, id)?
        .into_iter()
        .find(|v| v.id.0 == current);
    Ok(AppSummary {
        name,
        id: id.clone(),
        current_version,
        aliases,
        versions,
        created_at,
        updated_at,
    })
}

/// Versions of an app, newest first.
pub fn list_versions(conn: &Connection, id: &AppId) -> Result<Vec<VersionSummary>> {
    let current: String = conn.query_row(
        "SELECT current_version FROM apps WHERE id = ?1",
        [&id.0],
        |r| r.get(0),
    )?;
    let mut stmt = conn.prepare(
        "SELECT id, number, file_count, total_bytes, spa, created_at FROM versions
         WHERE app_id = ?1 ORDER BY created_at DESC, number DESC, id DESC",
    )?;
    let rows = stmt.query_map([&id.0], |r| {
        let vid: String = r.get(0)?;
        Ok(VersionSummary {
            current: vid == current,
            id: VersionId(vid),
            number: r.get(1)?,
            files: r.get(2)?,
            bytes: r.get(3)?,
            spa: r.get(4)?,
            created_at: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Finds a version by number (`v3`, `3`) or by id (a prefix of at least 4 characters).
/// Numbers win over id prefixes, so `9` never means "the version whose id starts with 9".
fn resolve_version(versions: &[VersionSummary], app: &str, wanted: &str) -> Result<VersionSummary> {
    let unknown = || {
        anyhow!("app {app} has no version {wanted:?} (pruned or never deployed; see `fazt app versions {app}`)")
    };
    let digits = wanted.strip_prefix('v').unwrap_or(wanted);
    if let Ok(number) = digits.parse::<i64>() {
        let by_number: Vec<_> = versions.iter().filter(|v| v.number == number).collect();
        match by_number.len() {
            1 => return Ok(by_number[0].clone()),
            0 if wanted.starts_with('v') || wanted.len() < 4 => return Err(unknown()),
            0 => {}
            _ => bail!("several versions of {app} are numbered {number} (deployed on different nodes): give the version id"),
        }
    }
    if wanted.len() < 4 {
        return Err(unknown());
    }
    let by_id: Vec<_> = versions
        .iter()
        .filter(|v| v.id.0.starts_with(wanted))
        .collect();
    match by_id.len() {
        0 => Err(unknown()),
        1 => Ok(by_id[0].clone()),
        _ => bail!("{wanted:?} matches several versions of {app}: give more of the version id"),
    }
}

/// Makes another version current: `to`, or else the one deployed before the current one.
pub fn rollback(db: &mut Db, app: &AppName, to: Option<&str>) -> Result<VersionSummary> {
    db.write(|tx| {
        let id = find_app(tx, app.as_str())?;
        let versions = list_versions(tx, &id)?;
        let target = match to {
            Some(wanted) => resolve_version(&versions, app.as_str(), wanted)?,
            None => {
                let pos = versions.iter().position(|v| v.current);
                match pos.and_then(|p| versions.get(p + 1)) {
                    Some(v) => v.clone(),
                    None => bail!(
                        "app {app} has no version older than the current one: name one with --to"
                    ),
                }
            }
        };
        tx.execute(
            "UPDATE apps SET current_version = ?1, updated_at = ?2 WHERE id = ?3",
            params![target.id.0, crate::clock::now_secs(), id.0],
        )?;
        Ok(VersionSummary {
            current: true,
            ..target
        })
    })
}

#[derive(Debug, Serialize)]
pub struct Removed {
    pub app: String,
    pub id: AppId,
    pub versions: usize,
    pub aliases: Vec<String>,
}

/// Removes an app with its versions and aliases. Content blobs stay: other versions and
/// apps may share them; the collector (`hosting::gc`) frees those nothing uses.
pub fn remove_app(db: &mut Db, app: &AppName) -> Result<Removed> {
    db.write(|tx| {
        let id = find_app(tx, app.as_str())?;
        let aliases = tx
            .prepare("SELECT subdomain FROM aliases WHERE app_id = ?1 ORDER BY subdomain")?
            .query_map([&id.0], |r| r.get(0))?
            .collect::<Result<Vec<String>, _>>()?;
        tx.execute(
        "DELETE FROM version_files WHERE version_id IN (SELECT id FROM versions WHERE app_id = ?1)",
        [&id.0],
    )?;
        let versions = tx.execute("DELETE FROM versions WHERE app_id = ?1", [&id.0])?;
        tx.execute("DELETE FROM aliases WHERE app_id = ?1", [&id.0])?;
        tx.execute("DELETE FROM apps WHERE id = ?1", [&id.0])?;
        Ok(Removed {
            app: app.to_string(),
            id,
            versions,
            aliases,
        })
    })
}

#[derive(Debug, Serialize)]
pub struct Pruned {
    pub app: String,
    /// Versions deleted, newest first.
    pub deleted: Vec<VersionSummary>,
    pub kept: usize,
}

/// Deletes the versions of an app other than the current one and the `keep` newest, with
/// their file lists. Their content becomes garbage for the collector (`hosting::gc`) once
/// nothing else uses it.
pub fn prune(db: &mut Db, app: &AppName, keep: usize) -> Result<Pruned> {
    db.write(|tx| {
        let id = find_app(tx, app.as_str())?;
        let versions = list_versions(tx, &id)?;
        let (kept, deleted): (Vec<_>, Vec<_>) = versions
            .into_iter()
            .enumerate()
            .partition(|(i, v)| v.current || *i < keep);
        let mut files = tx.prepare("DELETE FROM version_files WHERE version_id = ?1")?;
        let mut version = tx.prepare("DELETE FROM versions WHERE id = ?1")?;
        for (_, v) in &deleted {
            files.execute([&v.id.0])?;
            version.execute([&v.id.0])?;
        }
        Ok(Pruned {
            app: app.to_string(),
            deleted: deleted.into_iter().map(|(_, v)| v).collect(),
            kept: kept.len(),
        })
    })
}

#[derive(Debug, Serialize)]
pub struct AliasRow {
    pub subdomain: String,
    pub app: String,
    pub app_id: String,
}

pub fn list_aliases(conn: &Connection) -> Result<Vec<AliasRow>> {
    let mut stmt = conn.prepare(
        "SELECT a.subdomain, coalesce(p.name, ''), a.app_id FROM aliases a
         LEFT JOIN apps p ON p.id = a.app_id ORDER BY a.subdomain",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(AliasRow {
            subdomain: r.get(0)?,
            app: r.get(1)?,
            app_id: r.get(2)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Points `sub` at `app`, creating the alias or moving it.
pub fn link(db: &mut Db, sub: &Subdomain, app: &AppName) -> Result<Option<String>> {
    db.write(|conn| {
    let id = find_app(conn, app.as_str())?;
    let previous: Option<String> = conn
        .query_row(
            "SELECT coalesce(p.name, a.app_id) FROM aliases a LEFT JOIN apps p ON p.id = a.app_id WHERE a.subdomain = ?1",
            [sub.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    conn.execute(
        "INSERT INTO aliases (subdomain, app_id, updated_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (subdomain) DO UPDATE SET app_id = excluded.app_id, updated_at = excluded.updated_at",
        params![sub.as_str(), id.0, crate::clock::now_secs()],
    )?;
    Ok(previous)
    })
}

pub fn unlink(db: &mut Db, sub: &Subdomain) -> Result<()> {
    db.write(|tx| {
        if tx.execute("DELETE FROM aliases WHERE subdomain = ?1", [sub.as_str()])? == 0 {
            bail!("no alias {sub} (see `fazt alias list`)");
        }
        Ok(())
    })
}

/// Exchanges the apps behind two aliases in one transaction.
pub fn swap(db: &mut Db, a: &Subdomain, b: &Subdomain) -> Result<()> {
    if a == b {
        bail!("cannot swap {a} with itself");
    }
    db.write(|tx| {
        let target = |sub: &Subdomain| -> Result<String> {
            tx.query_row(
                "SELECT app_id FROM aliases WHERE subdomain = ?1",
                [sub.as_str()],
                |r| r.get(0),
            )
            .optional()?
            .ok_or_else(|| anyhow!("no alias {sub} (see `fazt alias list`)"))
        };
        let (app_a, app_b) = (target(a)?, target(b)?);
        let now = crate::clock::now_secs();
        tx.execute(
            "UPDATE aliases SET app_id = ?1, updated_at = ?2 WHERE subdomain = ?3",
            params![app_b, now, a.as_str()],
        )?;
        tx.execute(
            "UPDATE aliases SET app_id = ?1, updated_at = ?2 WHERE subdomain = ?3",
            params![app_a, now, b.as_str()],
        )?;
        Ok(())
    })
}
