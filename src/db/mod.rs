//! The node's one SQLite file: locating it, opening it safely, and its schema.
//!
//! The file is the instance. Opening refuses anything that is not a fazt database (a corrupt
//! file, another program's SQLite file) before writing a single byte to it.

mod database;
pub(crate) mod migrations;
mod pool;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use rusqlite::{Connection, OpenFlags};

pub use database::{poke_watchers, Counts, Database};
pub use migrations::{NODE_LOCAL_TABLES, REPLICATED_TABLES};
use pool::ReadPool;

/// The node's database: a connection with the replication engine on it. Reads go through
/// `conn()`; writes to replicated tables through `write()`, which captures them as changes.
pub type Db = fazt_sync::Replica;

/// SQLite's `application_id` for fazt databases ("FAZT").
const APPLICATION_ID: i32 = 0x4641_5A54;

/// How long a statement waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the database lives: `--db`, else `$FAZT_DB`, else `~/.fazt/data.db`.
pub fn default_path() -> Result<PathBuf> {
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "cannot find a home directory for ~/.fazt/data.db: pass --db PATH or set FAZT_DB"
            )
        })?;
    Ok(PathBuf::from(home).join(".fazt").join("data.db"))
}

/// A database opened for a command, remembering whether this open created it.
pub struct Opened {
    pub db: Db,
    pub created: bool,
}

/// Opens an existing fazt database. A missing file is an error that says how to make one.
pub fn open_existing(path: &Path) -> Result<Db> {
    open_existing_with(path, |_| Ok(()))
}

/// Like [`open_existing`], with `setup` run on the connection before the replication engine
/// takes it (for settings that need the connection itself, like a progress handler).
pub fn open_existing_with(
    path: &Path,
    setup: impl FnOnce(&mut Connection) -> Result<()>,
) -> Result<Db> {
    if !path.exists() {
        bail!(
            "no database at {}: create one with `fazt server init` or `fazt server start`",
            path.display()
        );
    }
    let mut conn = match open_checked(path)? {
        Checked::Existing(conn) => conn,
        Checked::Recreated(db) => db.into_inner(),
    };
    setup(&mut conn)?;
    into_db(conn)
}

/// Migrates the schema and puts the replication engine on the connection, registering every
/// replicated table (again after a migration, which may have changed their columns).
fn into_db(mut conn: Connection) -> Result<Db> {
    let migrated = migrations::migrate(&mut conn)?;
    let mut db = attach_engine(conn)?;
    let registered = db.tables();
    for table in REPLICATED_TABLES {
        if migrated || !registered.iter().any(|t| t == table) {
            db.replicate(table)
                .with_context(|| format!("registering {table} for replication"))?;
        }
    }
    Ok(db)
}

/// Puts the replication engine on a connection to a migrated database.
fn attach_engine(conn: Connection) -> Result<Db> {
    let mut db = fazt_sync::Replica::open(conn).context("starting the replication engine")?;
    // Every merge on every connection keeps the bytes of blobs it deletes that this node
    // still references (hosting::gc).
    crate::hosting::gc::RescueHook::install(&mut db);
    Ok(db)
}

/// Another engine connection to a database this process has opened (and so migrated) with
/// [`open_existing`]: the same checks, no migration (see [`Database::engine`]).
fn open_engine(path: &Path, setup: impl FnOnce(&mut Connection) -> Result<()>) -> Result<Db> {
    let mut conn = match open_checked(path)? {
        Checked::Existing(conn) => conn,
        Checked::Recreated(db) => db.into_inner(),
    };
    setup(&mut conn)?;
    attach_engine(conn)
}

/// Registers a user's own table for replication (`fazt db replicate`), or refreshes its
/// columns; says whether it was registered already. Refuses this node's own tables
/// ([`NODE_LOCAL_TABLES`]), SQLite's and the engine's, whatever their schema: they describe
/// this node and must never reach a peer.
pub fn replicate_user_table(db: &mut Db, table: &str) -> Result<bool> {
    check_user_table(table)?;
    let already = db.tables().iter().any(|t| t == table);
    db.replicate(table)?;
    Ok(already)
}

/// Refuses a name [`replicate_user_table`] would refuse without looking at any database.
pub fn check_user_table(table: &str) -> Result<()> {
    if NODE_LOCAL_TABLES.contains(&table)
        || table.starts_with("sqlite_")
        || fazt_sync::schema::is_engine_name(table)
    {
        bail!("{table} belongs to this node or to the engine and never replicates");
    }
    Ok(())
}

/// Opens the database, creating it (and its parent directory) when missing.
pub fn open_or_create(path: &Path) -> Result<Opened> {
    if path.exists() {
        return Ok(Opened {
            db: open_existing(path)?,
            created: false,
        });
    }
    Ok(Opened {
        db: create(path)?,
        created: true,
    })
}

/// Creates a new database; refuses to touch an existing file.
pub fn create(path: &Path) -> Result<Db> {
    if path.exists() {
        bail!(
            "a database already exists at {}: refusing to overwrite it",
            path.display()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_private_dir(parent)
            .with_context(|| format!("creating directory {}", parent.display()))?;
    }
    // The file exists, owner-only, before SQLite opens it (SQLite gives -wal, -shm and
    // -journal the database's mode), so no other user ever sees the key in it.
    create_private_file(path).with_context(|| format!("creating database {}", path.display()))?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("creating database {}", path.display()))?;
    let setup = (|| -> Result<Db> {
        conn.pragma_update(None, "application_id", APPLICATION_ID)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        configure(&conn)?;
        let db = into_db(conn)?;
        crate::identity::ensure(db.conn())?;
        Ok(db)
    })();
    setup.map_err(|e| {
        remove_database_files(path);
        e.context(format!("creating database {}", path.display()))
    })
}

/// Opens a connection for the server's readers (no migrations; the server migrated at start).
pub fn open_reader(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("opening database {}", path.display()))?;
    configure(&conn)?;
    conn.pragma_update(None, "query_only", true)?;
    Ok(conn)
}

enum Checked {
    Existing(Connection),
    /// The file was empty and has been made a new database.
    Recreated(Box<Db>),
}

fn open_checked(path: &Path) -> Result<Checked> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("opening database {}", path.display()))?;
    let not_fazt = || {
        anyhow!(
            "{} is not a fazt database (corrupt, or another program's file): point --db at a fazt database or a new path",
            path.display()
        )
    };
    let app_id: i32 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(|_| not_fazt())?;
    if app_id != APPLICATION_ID {
        let empty_file = std::fs::metadata(path)
            .map(|m| m.len() == 0)
            .unwrap_or(false);
        if !empty_file {
            return Err(not_fazt());
        }
        // A zero-byte file (say, made by `touch`) holds nothing to protect: make it a database.
        drop(conn);
        std::fs::remove_file(path)?;
        return Ok(Checked::Recreated(Box::new(create(path)?)));
    }
    // Only now that it is known to be ours: another program's file is left as it is.
    make_private(path);
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(|_| not_fazt())?;
    configure(&conn)?;
    Ok(Checked::Existing(conn))
}

/// Reads every page once (SQLite's quick_check). The server runs it at start, so that a
/// damaged file is reported up front rather than as failures of random requests.
pub fn check_integrity(conn: &Connection, path: &Path) -> Result<()> {
    let integrity: String = conn.query_row("PRAGMA quick_check(1)", [], |row| row.get(0))?;
    if integrity != "ok" {
        bail!(
            "{} is damaged ({integrity}): restore it from a copy or a peer",
            path.display()
        );
    }
    for table in REPLICATED_TABLES {
        fazt_sync::check_replicable(conn, table)
            .with_context(|| format!("{} has a schema fazt cannot replicate", path.display()))?;
    }
    Ok(())
}

fn configure(conn: &Connection) -> Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // FULL: a commit that returned is on disk, even across power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", false)?;
    Ok(())
}

/// The database file and the files SQLite keeps beside it.
const DATABASE_SUFFIXES: [&str; 4] = ["", "-wal", "-shm", "-journal"];

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(suffix);
    PathBuf::from(p)
}

fn remove_database_files(path: &Path) {
    for suffix in DATABASE_SUFFIXES {
        let _ = std::fs::remove_file(with_suffix(path, suffix));
    }
}

/// Mode of the files that hold the node's secret key and apps' secrets: owner only.
const PRIVATE_FILE: u32 = 0o600;
/// Mode of a directory fazt creates for its database: owner only.
const PRIVATE_DIR: u32 = 0o700;

/// Creates `dir` (and missing parents) owner-only. An existing directory is left as it is:
/// it may be shared (say, `--db /srv/x/data.db`); see [`make_private`] for `~/.fazt`.
fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR)
        .create(dir)
}

/// Creates an empty file, owner-only whatever the umask; refuses an existing one.
pub fn create_private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)?;
    file.set_permissions(std::fs::Permissions::from_mode(PRIVATE_FILE))?;
    Ok(file)
}

/// Takes group and other access away from the database, its -wal/-shm/-journal files and,
/// when the database is at the default location, `~/.fazt`; says so in one line on stderr
/// when anything changed. A file this user cannot change is reported, not fatal.
fn make_private(path: &Path) {
    use std::os::unix::fs::PermissionsExt as _;
    let mut targets: Vec<(PathBuf, u32)> = DATABASE_SUFFIXES
        .iter()
        .map(|s| (with_suffix(path, s), PRIVATE_FILE))
        .collect();
    let default_dir = default_path()
        .ok()
        .and_then(|d| d.parent().map(Path::to_path_buf));
    if let (Some(parent), Some(default_dir)) = (path.parent(), default_dir) {
        if parent == default_dir {
            targets.push((default_dir, PRIVATE_DIR));
        }
    }
    let mut tightened = Vec::new();
    for (target, mode) in targets {
        let Ok(meta) = std::fs::metadata(&target) else {
            continue;
        };
        let was = meta.permissions().mode() & 0o777;
        if was & 0o077 == 0 {
            continue;
        }
        let now = was & mode;
        match std::fs::set_permissions(&target, std::fs::Permissions::from_mode(now)) {
            Ok(()) => tightened.push(format!("{} (was {was:04o}, now {now:04o})", target.display())),
            Err(e) => eprintln!(
                "warning: {} is readable by other users ({was:04o}) and could not be made owner-only ({e}): it holds the node's secret key, run `chmod go= {}`",
                target.display(),
                target.display()
            ),
        }
    }
    if !tightened.is_empty() {
        eprintln!(
            "made owner-only, as they hold the node's secret key: {}",
            tightened.join(", ")
        );
    }
}

// The peer session and service still name the clock through db; it lives in crate::clock.
pub use crate::clock::now_secs;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_refused_and_left_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.db");
        let junk = vec![0x5Au8; 8192];
        std::fs::write(&path, &junk).unwrap();
        let err = open_existing(&path).unwrap_err().to_string();
        assert!(err.contains("not a fazt database"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), junk);
    }

    #[test]
    fn another_programs_sqlite_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("other.db");
        Connection::open(&path)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        let err = open_existing(&path).unwrap_err().to_string();
        assert!(err.contains("not a fazt database"), "{err}");
    }

    #[test]
    fn create_refuses_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        create(&path).unwrap();
        assert!(create(&path)
            .unwrap_err()
            .to_string()
            .contains("already exists"));
        open_existing(&path).unwrap();
    }
}
