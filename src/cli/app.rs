//! `fazt app ...`

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Subcommand;
use rusqlite::{Connection, OptionalExtension as _};

use super::output;
use crate::config::{self, NodeConfig, Overrides};
use crate::hosting::deploy::{self, Limits};
use crate::hosting::names::AppName;
use crate::hosting::store;

#[derive(Subcommand)]
pub enum AppCmd {
    /// Deploy a directory as a new version of an app
    Deploy {
        dir: PathBuf,
        /// App name [default: manifest.json's name, else the directory name]
        #[arg(long)]
        name: Option<String>,
        /// Serve index.html for paths without an extension (single-page apps)
        #[arg(long)]
        spa: bool,
        /// Then sync with this peer and return once it has the new version
        #[arg(long, value_name = "PEER")]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List apps
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one app
    Info {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// List an app's versions, newest first
    Versions {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Serve an earlier version (default: the one before the current)
    Rollback {
        app: String,
        /// Version number (3 or v3) or id
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove an app, its versions and aliases
    Remove {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete old versions: all but the current one and the KEEP newest
    Prune {
        app: String,
        /// How many of the newest versions to keep (the current one is always kept)
        #[arg(long, value_name = "N")]
        keep: u32,
        #[arg(long)]
        json: bool,
    },
    /// Show what the app's serverless code printed, and its errors, on this node
    Logs {
        app: String,
        /// Keep printing new lines as they come
        #[arg(short, long)]
        follow: bool,
        /// How many of the latest lines to show first
        #[arg(short = 'n', long, default_value_t = 50)]
        lines: i64,
        /// One JSON object per line
        #[arg(long)]
        json: bool,
    },
    /// Variables the app's code reads (fazt.env, a fetch handler's env); they replicate
    #[command(subcommand)]
    Env(EnvCmd),
    /// Show or set how much the app may store in kv, ds and s3 together (replicates)
    Quota {
        app: String,
        /// New quota, like 100MB or 2GB (K/M/G/T are powers of 1024), or "default"
        #[arg(long, value_name = "SIZE")]
        storage: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum EnvCmd {
    /// Set a variable
    Set {
        app: String,
        key: String,
        value: String,
    },
    /// List an app's variables
    List {
        app: String,
        #[arg(long)]
        json: bool,
    },
    /// Remove a variable
    Unset { app: String, key: String },
}

pub fn run(cmd: AppCmd, db: &Path) -> Result<()> {
    match cmd {
        AppCmd::Logs {
            app,
            follow,
            lines,
            json,
        } => logs(db, &app, follow, lines, json),
        AppCmd::Env(cmd) => env(db, cmd),
        AppCmd::Quota { app, storage, json } => quota(db, &app, storage.as_deref(), json),
        AppCmd::Deploy {
            dir,
            name,
            spa,
            to,
            json,
        } => deploy(db, &dir, name.as_deref(), spa, to.as_deref(), json),
        AppCmd::List { json } => {
            let database = crate::db::open_existing(db)?;
            let conn = database.conn();
            let apps = store::list_apps(conn)?;
            if json {
                return output::json(&apps);
            }
            if apps.is_empty() {
                println!("no apps yet: deploy one with `fazt app deploy DIR`");
                return Ok(());
            }
            let rows = apps
                .iter()
                .map(|a| {
                    let v = a.current_version.as_ref();
                    vec![
                        a.name.clone(),
                        v.map(|v| format!("v{}", v.number))
                            .unwrap_or_else(|| "-".into()),
                        v.map(|v| v.files.to_string()).unwrap_or_default(),
                        v.map(|v| output::size(v.bytes as u64)).unwrap_or_default(),
                        a.aliases.join(","),
                        output::time(a.updated_at),
                    ]
                })
                .collect::<Vec<_>>();
            output::table(
                &["NAME", "VERSION", "FILES", "SIZE", "ALIASES", "UPDATED"],
                &rows,
            );
            Ok(())
        }
        AppCmd::Info { app, json } => {
            let database = crate::db::open_existing(db)?;
            let conn = database.conn();
            let id = store::find_app(conn, &app)?;
            let info = store::app_summary(conn, &id)?;
            let storage = storage_of(conn, &id.0)?;
            if json {
                let mut value = serde_json::to_value(&info)?;
                value["storage"] = serde_json::to_value(&storage)?;
                return output::json(&value);
            }
            println!("name       {}", info.name);
            println!("id         {}", info.id);
            match &info.current_version {
                Some(v) => println!(
                    "version    v{} ({}), {} files, {}{}",
                    v.number,
                    v.id,
                    v.files,
                    output::size(v.bytes as u64),
                    if v.spa { ", spa" } else { "" }
                ),
                None => println!("version    -"),
            }
            println!("versions   {}", info.versions);
            println!(
                "aliases    {}",
                if info.aliases.is_empty() {
                    "-".into()
                } else {
                    info.aliases.join(", ")
                }
            );
            for a in &info.aliases {
                println!("url        {}", url(conn, a)?);
            }
            println!("storage    {}", storage.human());
            println!("created    {}", output::time(info.created_at));
            println!("updated    {}", output::time(info.updated_at));
            Ok(())
        }
        AppCmd::Versions { app, json } => {
            let database = crate::db::open_existing(db)?;
            let conn = database.conn();
            let id = store::find_app(conn, &app)?;
            let versions = store::list_versions(conn, &id)?;
            if json {
                return output::json(&versions);
            }
            let rows = versions
                .iter()
                .map(|v| {
                    vec![
                        if v.current { "*".into() } else { String::new() },
                        format!("v{}", v.number),
                        v.id.to_string(),
                        v.files.to_string(),
                        output::size(v.bytes as u64),
                        if v.spa { "spa".into() } else { String::new() },
                        output::time(v.created_at),
                    ]
                })
                .collect::<Vec<_>>();
            output::table(
                &["", "VERSION", "ID", "FILES", "SIZE", "MODE", "DEPLOYED"],
                &rows,
            );
            Ok(())
        }
        AppCmd::Rollback { app, to, json } => {
            let name = AppName::parse(&app)?;
            let mut database = crate::db::open_existing(db)?;
            let v = store::rollback(&mut database, &name, to.as_deref())?;
            if json {
                return output::json(&v);
            }
            println!("{name} now serves v{} ({})", v.number, v.id);
            Ok(())
        }
        AppCmd::Prune { app, keep, json } => {
            let name = AppName::parse(&app)?;
            let mut database = crate::db::open_existing(db)?;
            let keep = usize::try_from(keep).unwrap_or(usize::MAX);
            let pruned = store::prune(&mut database, &name, keep)?;
            if json {
                return output::json(&pruned);
            }
            let numbers: Vec<String> = pruned
                .deleted
                .iter()
                .map(|v| format!("v{}", v.number))
                .collect();
            println!(
                "deleted {} old versions of {}{}; kept {} (run `fazt db gc` to free content nothing else uses)",
                pruned.deleted.len(),
                pruned.app,
                if numbers.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", numbers.join(", "))
                },
                pruned.kept
            );
            Ok(())
        }
        AppCmd::Remove { app, json } => {
            let name = AppName::parse(&app)?;
            let mut database = crate::db::open_existing(db)?;
            let removed = store::remove_app(&mut database, &name)?;
            if json {
                return output::json(&removed);
            }
            println!(
                "removed {} ({} versions{})",
                removed.app,
                removed.versions,
                if removed.aliases.is_empty() {
                    String::new()
                } else {
                    format!(", aliases {}", removed.aliases.join(", "))
                }
            );
            Ok(())
        }
    }
}

/// How long `deploy --to` waits for the peer.
const DEPLOY_SYNC_TIMEOUT: u64 = 300;

fn deploy(
    db: &Path,
    dir: &Path,
    name: Option<&str>,
    spa: bool,
    to: Option<&str>,
    json: bool,
) -> Result<()> {
    // Everything is read and checked before the database is touched (or created).
    let max_file_bytes = if db.exists() {
        let database = crate::db::open_existing(db)?;
        if let Some(peer) = to {
            crate::peer::store::ready_to_dial(database.conn(), peer)?;
        }
        config::max_file_bytes(database.conn())?.value
    } else {
        if let Some(peer) = to {
            bail!("no peer named {peer}: this node has no database yet, so no peers");
        }
        config::DEFAULT_MAX_FILE_BYTES
    };
    let staged = deploy::stage(dir, &Limits { max_file_bytes })?;
    let app = staged.app_name(name, dir)?;
    if name.is_none() {
        check_implicit_name(db, &staged, &app, dir)?;
    }
    let spa = staged.spa(spa);
    let mut database = super::open_for_write(db)?;
    let report = deploy::commit(&mut database, &app, spa, staged)?;
    let conn = database.conn();
    if let Some(alias) = &report.alias {
        if let Some(captures) = captures(alias.as_str()) {
            eprintln!("{captures}: that starts now ({} is a new app)", report.app);
        }
    }
    if let Some(peer) = to {
        eprintln!(
            "deployed {} v{} locally; syncing with {peer}...",
            report.app, report.number
        );
        let synced = crate::peer::client::sync_once(
            db,
            peer,
            std::time::Duration::from_secs(DEPLOY_SYNC_TIMEOUT),
            !json,
        )
        .map_err(|e| {
            e.context(format!(
                "{} v{} is deployed here but did not reach {peer}",
                report.app, report.number
            ))
        })?;
        // Converged: the peer holds exactly what this node holds, this version included.
        let current: String = conn.query_row(
            "SELECT current_version FROM apps WHERE id = ?1",
            [&report.app_id.0],
            |r| r.get(0),
        )?;
        if current != report.version.0 {
            eprintln!(
                "{peer} has v{}, but a newer deploy from elsewhere is now current on both nodes",
                report.number
            );
        } else {
            eprintln!(
                "{peer} serves {} v{} (sync took {:.2}s, {} sent)",
                report.app,
                report.number,
                synced.elapsed.as_secs_f64(),
                output::size(synced.stats.sent_bytes)
            );
        }
    }
    if json {
        return output::json(&report);
    }
    println!(
        "deployed {} v{} ({}): {} files, {}, {} new",
        report.app,
        report.number,
        report.version,
        report.files,
        output::size(report.bytes),
        report.new_blobs
    );
    let aliases = store::app_summary(conn, &report.app_id)?.aliases;
    if report.alias_taken {
        eprintln!(
            "subdomain {} already points at another app: link one with `fazt alias link SUBDOMAIN {}`",
            report.app, report.app
        );
    }
    for alias in aliases {
        println!("{}", url(conn, &alias)?);
    }
    Ok(())
}

/// What an app of this name takes over on its first deploy, beyond its own subdomain.
fn captures(name: &str) -> Option<&'static str> {
    match name {
        "root" => Some("an app named root serves the apex domain (the domain itself, root.<domain>, localhost and IP addresses)"),
        "404" => Some("an app named 404 answers every unknown host and every missing path (its index.html, with status 404)"),
        _ => None,
    }
}

/// A name that came from manifest.json or the directory (not from --name) must not surprise:
/// it may not pick an existing app the directory is not named after, nor take over the apex
/// or the not-found page on a first deploy.
fn check_implicit_name(
    db: &Path,
    staged: &deploy::Staged,
    app: &AppName,
    dir: &Path,
) -> Result<()> {
    let exists = db.exists()
        && crate::db::open_existing(db)?
            .conn()
            .query_row(
                "SELECT 1 FROM apps WHERE name = ?1 LIMIT 1",
                [app.as_str()],
                |_| Ok(()),
            )
            .optional()?
            .is_some();
    let dir_name = deploy::dir_name(dir);
    if exists && staged.manifest_names_app() && dir_name.as_deref() != Some(app.as_str()) {
        bail!(
            "manifest.json names the app {app}, which already exists, but the directory is {}: deploying would replace {app}'s current version with these files; pass --name {app} if that is what you want, or --name NAME to deploy them as another app",
            dir_name.unwrap_or_else(|| dir.display().to_string())
        );
    }
    if !exists {
        if let Some(captures) = captures(app.as_str()) {
            bail!(
                "{captures}: to deploy {} as {app}, say so with --name {app}",
                dir.display()
            );
        }
    }
    Ok(())
}

/// The URL an alias is served at, by the running server if there is one.
pub fn url(conn: &Connection, alias: &str) -> Result<String> {
    let (domain, port) = match crate::server::running(conn)? {
        Some(r) => (r.domain, r.port),
        None => {
            let c = NodeConfig::load(conn, &Overrides::default())?;
            (c.domain.value.to_string(), c.port.value)
        }
    };
    let host = if alias == "root" {
        domain
    } else {
        format!("{alias}.{domain}")
    };
    Ok(if port == 80 {
        format!("http://{host}/")
    } else {
        format!("http://{host}:{port}/")
    })
}

/// What an app stores on this node against its quota.
#[derive(serde::Serialize)]
struct StorageInfo {
    used_bytes: u64,
    quota_bytes: u64,
    /// The quota was set with `fazt app quota` (rather than the default).
    quota_set: bool,
}

impl StorageInfo {
    fn human(&self) -> String {
        format!(
            "{} of {} used (kv, ds and s3 on this node; quota {})",
            output::size(self.used_bytes),
            output::size(self.quota_bytes),
            if self.quota_set { "set" } else { "default" }
        )
    }
}

fn storage_of(conn: &Connection, app_id: &str) -> Result<StorageInfo> {
    use crate::storage::quota;
    Ok(StorageInfo {
        used_bytes: quota::usage(conn, app_id)?,
        quota_bytes: quota::limit(conn, app_id)?,
        quota_set: quota::is_set(conn, app_id)?,
    })
}

fn quota(db: &Path, app: &str, storage: Option<&str>, json: bool) -> Result<()> {
    use crate::storage::quota;
    let mut database = crate::db::open_existing(db)?;
    let id = store::find_app(database.conn(), app)?;
    if let Some(size) = storage {
        let bytes = match size.trim() {
            "default" => None,
            s => Some(quota::parse_size(s)?),
        };
        quota::set(&mut database, &id.0, bytes)?;
    }
    let info = storage_of(database.conn(), &id.0)?;
    if json {
        return output::json(&info);
    }
    println!("{app}: {}", info.human());
    Ok(())
}

fn env(db: &Path, cmd: EnvCmd) -> Result<()> {
    use crate::storage::env;
    let mut database = crate::db::open_existing(db)?;
    match cmd {
        EnvCmd::Set { app, key, value } => {
            let id = store::find_app(database.conn(), &app)?;
            env::set(&mut database, &id.0, &key, &value)?;
            println!("{app}: {key} set");
        }
        EnvCmd::List { app, json } => {
            let id = store::find_app(database.conn(), &app)?;
            let vars = env::list(database.conn(), &id.0)?;
            if json {
                let map: serde_json::Map<String, serde_json::Value> = vars
                    .into_iter()
                    .map(|(k, v)| (k, serde_json::Value::String(v)))
                    .collect();
                return output::json(&map);
            }
            for (k, v) in vars {
                println!("{k}={v}");
            }
        }
        EnvCmd::Unset { app, key } => {
            let id = store::find_app(database.conn(), &app)?;
            if !env::unset(&mut database, &id.0, &key)? {
                bail!("{app} has no variable {key}");
            }
            println!("{app}: {key} removed");
        }
    }
    Ok(())
}

/// An app's log text made safe for a terminal: control characters (newlines, carriage
/// returns, escape sequences, C1 codes) and bidirectional overrides are written as `\n`,
/// `\r`, `\t` or `\u{..}`, so one stored line is one printed line and cannot move the
/// cursor, recolour the terminal or pass for another line.
fn escape_controls(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        c.is_control()
            || matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if unsafe_char(c) => out.push_str(&format!("\\u{{{:x}}}", c as u32)),
            c => out.push(c),
        }
    }
    std::borrow::Cow::Owned(out)
}

fn logs(db: &Path, app: &str, follow: bool, lines: i64, json: bool) -> Result<()> {
    use crate::storage::logs;
    let database = crate::db::open_existing(db)?;
    let conn = database.conn();
    let id = store::find_app(conn, app)?;
    let print = |line: &logs::Line| -> Result<()> {
        if json {
            println!("{}", serde_json::to_string(line)?);
        } else {
            let at =
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(line.at.max(0) as u64);
            println!(
                "{} {:<5} {}",
                humantime::format_rfc3339_millis(at),
                escape_controls(&line.level),
                escape_controls(&line.message)
            );
        }
        Ok(())
    };
    let mut last = logs::newest(conn, &id.0)?;
    for line in logs::tail(conn, &id.0, lines.max(0))? {
        print(&line)?;
        last = line.id;
    }
    if !follow {
        return Ok(());
    }
    loop {
        std::thread::sleep(std::time::Duration::from_millis(200));
        for line in logs::since(conn, &id.0, last, 1000)? {
            print(&line)?;
            last = line.id;
        }
    }
}
