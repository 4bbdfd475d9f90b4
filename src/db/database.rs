//! [`Database`]: the one handle a server process shares between its subsystems.
//!
//! Everything that touches the node's SQLite file while the server runs goes through it:
//! reads through a small pool of read-only connections, writes through one writer (a
//! [`Db`], so writes to replicated tables are captured), and long-running jobs that need an
//! engine connection of their own (a peer session's exporter, an app's worker thread) get one
//! from [`Database::engine`], opened with the same checks and no migration (the server
//! migrated once, at start). One [`Database::commits`] watcher tells every subscriber when
//! anyone (this process or another, such as a CLI deploy) committed; [`Database::replicated`],
//! fed by the same watcher, only when the replicated state moved (the engine's
//! [`fazt_sync::Fingerprint`], read after each commit), so node-local bookkeeping wakes no
//! exporter.
//!
//! The async methods run SQLite on tokio's blocking threads; the `_blocking` ones are for code
//! already on such a thread (or on a thread of its own). No SQLite call runs on a tokio worker
//! thread, with one deliberate exception: [`Database::check_commits`], a read of SQLite's
//! shared memory (`PRAGMA data_version`) that does no I/O, made on the request path so that a
//! deploy from the CLI is served by the very next request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::Connection;
use tokio::sync::watch;

use fazt_sync::Fingerprint;

use super::{Db, ReadPool};

/// Read connections kept open for the server's requests and sessions.
const READERS: usize = 4;

/// How often the watcher looks for commits: every 5 ms while commits keep coming, slowing to
/// every 25 ms when idle (an idle node then costs 40 cheap reads a second, and a first commit
/// after a quiet spell is noticed within 25 ms).
const WATCH_BUSY: Duration = Duration::from_millis(5);
const WATCH_IDLE: Duration = Duration::from_millis(25);

/// A cloneable handle on the node's database (see the module docs).
#[derive(Clone)]
pub struct Database(Arc<Inner>);

struct Inner {
    path: PathBuf,
    reads: ReadPool,
    writer: Mutex<Db>,
    commits: Commits,
}

/// The commit watcher: one connection asking SQLite whether anyone committed, and a counter
/// that moves by one each time the answer is yes; a second counter moves when, after such a
/// commit, the replicated state's fingerprint differs from the one last read.
struct Commits {
    seen: Mutex<Watched>,
    tick: watch::Sender<u64>,
    replicated: watch::Sender<u64>,
    /// The polling thread, started by the first [`Database::commits`].
    started: std::sync::OnceLock<()>,
}

struct Watched {
    conn: Connection,
    data_version: Option<i64>,
    /// A commit was seen since the fingerprint was last read.
    stale: bool,
    fingerprint: Option<Fingerprint>,
}

impl Database {
    /// Opens an existing database with every check [`super::open_existing`] makes (and its
    /// migrations); that connection becomes the writer.
    pub fn open(path: &Path) -> Result<Database> {
        let db = super::open_existing(path)?;
        Database::with_writer(path, db)
    }

    /// A handle whose writer is `db`, a connection already opened (and migrated) on `path`.
    pub fn with_writer(path: &Path, db: Db) -> Result<Database> {
        let conn = super::open_reader(path)?;
        // What later commits are compared with.
        let fingerprint = Fingerprint::read(&conn).ok();
        Ok(Database(Arc::new(Inner {
            path: path.to_path_buf(),
            reads: ReadPool::new(path.to_path_buf(), READERS),
            writer: Mutex::new(db),
            commits: Commits {
                seen: Mutex::new(Watched {
                    conn,
                    data_version: None,
                    stale: fingerprint.is_none(),
                    fingerprint,
                }),
                tick: watch::Sender::new(0),
                replicated: watch::Sender::new(0),
                started: std::sync::OnceLock::new(),
            },
        })))
    }

    /// Where the file is (for messages; open connections through the handle).
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    /// Runs `f` on a read-only connection, on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.read_blocking(f))
            .await
            .context("a database read stopped")?
    }

    /// Runs `f` on a read-only connection, on this thread (which may block).
    pub fn read_blocking<T>(&self, f: impl FnOnce(&Connection) -> Result<T>) -> Result<T> {
        self.0.reads.with(f)
    }

    /// Runs `f` with the writer, on a blocking thread. Writes from the whole process take
    /// turns here (SQLite lets one connection write at a time anyway).
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Db) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.write_blocking(f))
            .await
            .context("a database write stopped")?
    }

    /// Runs `f` with the writer, on this thread (which may block). Must not be called from
    /// inside another `write`'s `f`.
    pub fn write_blocking<T>(&self, f: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        // A panic inside `f` rolled its transaction back as it unwound: the connection is
        // still usable.
        let mut writer = self.0.writer.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut writer)
    }

    /// An engine connection of its own, for work that holds one for long (a session's
    /// export, an app worker's storage calls). Opened with the node's checks, not migrated.
    pub fn engine(&self) -> Result<Db> {
        self.engine_with(|_| Ok(()))
    }

    /// Like [`Database::engine`], with `setup` run on the connection first (for settings
    /// that need the connection itself, like a progress handler).
    pub fn engine_with(&self, setup: impl FnOnce(&mut Connection) -> Result<()>) -> Result<Db> {
        super::open_engine(&self.0.path, setup)
    }

    /// Ticks once for every commit anyone makes to the database (several commits between two
    /// looks may count once). The first call starts the watcher thread, which ends with the
    /// last handle.
    pub fn commits(&self) -> watch::Receiver<u64> {
        self.start_watching();
        self.0.commits.tick.subscribe()
    }

    /// Ticks when a commit (by anyone) may have given the node more to export: a local write
    /// to a replicated table, a merge of changes from any origin, a table registered. Commits
    /// to node-local tables alone do not tick it. Several such commits between two looks may
    /// count once. Starts the watcher like [`Database::commits`]; only its thread reads the
    /// fingerprint, so this ticks within its polling interval of the commit.
    pub fn replicated(&self) -> watch::Receiver<u64> {
        self.start_watching();
        self.0.commits.replicated.subscribe()
    }

    fn start_watching(&self) {
        self.0.commits.started.get_or_init(|| {
            let inner = Arc::downgrade(&self.0);
            if let Err(e) = std::thread::Builder::new()
                .name("fazt-db-watch".into())
                .spawn(move || watch_commits(inner))
            {
                tracing::error!(error = %e, "cannot start the database watcher");
            }
        });
    }

    /// Looks for a commit now (one read of SQLite's shared memory), ticking the watcher if
    /// there was one; returns the watcher's count.
    pub fn check_commits(&self) -> Result<u64> {
        self.0.commits.check(false)
    }
}

impl Commits {
    /// Looks for a commit; with `fingerprint`, also reads the replicated state's fingerprint
    /// if a commit was seen since it was last read (only the watcher thread does: the
    /// request path reads no pages).
    fn check(&self, fingerprint: bool) -> Result<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let version: i64 = seen
            .conn
            .prepare_cached("PRAGMA data_version")?
            .query_row([], |r| r.get(0))?;
        if seen.data_version != Some(version) {
            // The first look counts too: whoever subscribed before it learns the state it
            // knew may be stale.
            seen.data_version = Some(version);
            seen.stale = true;
            self.tick.send_modify(|n| *n += 1);
        }
        if fingerprint && seen.stale {
            seen.stale = false;
            // Read after the commit was seen: a subscriber woken below finds the state it
            // was woken for (or newer). One that cannot be read wakes them all the same.
            let now = Fingerprint::read(&seen.conn);
            if let Err(e) = &now {
                tracing::debug!(error = %e, "reading the replicated state's fingerprint");
            }
            let now = now.ok();
            if now.is_none() || seen.fingerprint != now {
                seen.fingerprint = now;
                self.replicated.send_modify(|n| *n += 1);
            }
        }
        Ok(*self.tick.borrow())
    }
}

fn watch_commits(inner: Weak<Inner>) {
    let mut interval = WATCH_BUSY;
    loop {
        let Some(db) = inner.upgrade() else { return };
        let before = *db.commits.tick.borrow();
        match db.commits.check(true) {
            Ok(now) if now != before => interval = WATCH_BUSY,
            Ok(_) => interval = (interval + Duration::from_millis(1)).min(WATCH_IDLE),
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "looking for commits"),
        }
        drop(db);
        std::thread::sleep(interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set for the child process of [`every_subscriber_wakes_once_per_commit_from_another_process`].
    const COMMIT_INTO: &str = "FAZT_TEST_COMMIT_INTO";
    /// Set too when the child's commit is to a replicated table.
    const REPLICATED: &str = "FAZT_TEST_COMMIT_REPLICATED";

    /// Not a test on its own: the other process of the test below, which commits once.
    #[test]
    #[ignore]
    fn commit_once_as_another_process() {
        let Some(path) = std::env::var_os(COMMIT_INTO) else {
            return;
        };
        let mut db = crate::db::open_existing(Path::new(&path)).unwrap();
        if std::env::var_os(REPLICATED).is_some() {
            put_setting(&mut db);
            return;
        }
        let n: i64 = db
            .conn()
            .query_row("SELECT count(*) FROM node_config", [], |r| r.get(0))
            .unwrap();
        crate::config::set_local(db.conn(), &format!("test-{n}"), "x").unwrap();
    }

    /// A write to a replicated table (a cluster-wide setting).
    fn put_setting(db: &mut Db) {
        db.write(|tx| {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES ('test', 1)
                 ON CONFLICT (key) DO UPDATE SET value = value + 1",
                [],
            )
        })
        .unwrap();
    }

    fn commit_from_another_process(path: &Path) {
        commit_as_another_process(path, false)
    }

    fn commit_as_another_process(path: &Path, replicated: bool) {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        if replicated {
            child.env(REPLICATED, "1");
        }
        let status = child
            .args([
                "--exact",
                "db::database::tests::commit_once_as_another_process",
                "--ignored",
                "--quiet",
            ])
            .env(COMMIT_INTO, path)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_subscriber_wakes_once_per_commit_from_another_process() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        crate::db::create(&path).unwrap();
        let db = Database::open(&path).unwrap();
        db.check_commits().unwrap();
        let mut subscribers: Vec<_> = (0..3).map(|_| db.commits()).collect();
        let start = *subscribers[0].borrow();
        for commit in 1..=4u64 {
            commit_from_another_process(&path);
            for s in &mut subscribers {
                tokio::time::timeout(Duration::from_secs(10), s.changed())
                    .await
                    .expect("a subscriber was not woken by a commit")
                    .unwrap();
                assert_eq!(*s.borrow_and_update(), start + commit);
            }
            // Nothing more happened, so nobody is woken again.
            tokio::time::sleep(WATCH_IDLE * 4).await;
            for s in &subscribers {
                assert!(!s.has_changed().unwrap(), "woken twice for one commit");
            }
        }
    }

    async fn woken(rx: &mut watch::Receiver<u64>, what: &str) {
        tokio::time::timeout(Duration::from_secs(10), rx.changed())
            .await
            .unwrap_or_else(|_| panic!("not woken by {what}"))
            .unwrap();
        rx.borrow_and_update();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn only_commits_that_move_replicated_state_wake_its_subscribers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        crate::db::create(&path).unwrap();
        let db = Database::open(&path).unwrap();
        db.check_commits().unwrap();
        let mut commits = db.commits();
        let mut replicated = db.replicated();
        commits.borrow_and_update();
        replicated.borrow_and_update();
        // Node-local bookkeeping, from this process and another.
        for i in 0..3 {
            db.write(move |w| crate::config::set_local(w.conn(), &format!("local-{i}"), "x"))
                .await
                .unwrap();
            woken(&mut commits, "a node-local commit").await;
        }
        commit_from_another_process(&path);
        woken(&mut commits, "a node-local commit from another process").await;
        tokio::time::sleep(WATCH_IDLE * 4).await;
        assert!(
            !replicated.has_changed().unwrap(),
            "node-local commits woke the subscribers of replicated state"
        );
        // A replicated write through this handle, and one from another process (a deploy),
        // the first seen by the request path's look before the watcher thread's.
        db.write(|w| {
            put_setting(w);
            Ok(())
        })
        .await
        .unwrap();
        db.check_commits().unwrap();
        woken(&mut replicated, "a replicated write").await;
        commit_as_another_process(&path, true);
        woken(&mut replicated, "a replicated write from another process").await;
    }
}
