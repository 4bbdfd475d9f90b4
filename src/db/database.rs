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
//! exporter. The watcher polls for commits from other processes (a CLI deploy); commits made
//! through this handle, and any an in-process committer reports with [`Database::poke`]
//! (a session's applier), make it look at once.
//!
//! Node-local bookkeeping (peer figures, app logs) is committed without waiting for the disk
//! ([`Database::write_local`]): see its docs for what a power cut may lose.
//!
//! The async methods run SQLite on tokio's blocking threads; the `_blocking` ones are for code
//! already on such a thread (or on a thread of its own). No SQLite call runs on a tokio worker
//! thread, with one deliberate exception: [`Database::check_commits`], a read of SQLite's
//! shared memory (`PRAGMA data_version`) that does no I/O, made on the request path so that a
//! deploy from the CLI is served by the very next request.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
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
    /// Shared with the polling thread, which holds no strong handle on the database.
    poke: Arc<Poke>,
    /// How long the polling thread waits between looks: while busy, and at most.
    busy: Duration,
    idle: Duration,
}

/// Tells the polling thread to look now rather than at the end of its interval.
#[derive(Default)]
struct Poke {
    poked: Mutex<bool>,
    wake: Condvar,
}

impl Poke {
    fn poke(&self) {
        *self.poked.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.wake.notify_one();
    }

    /// Waits until poked or `timeout` passed, whichever comes first, and clears the poke.
    fn wait(&self, timeout: Duration) {
        let poked = self.poked.lock().unwrap_or_else(|e| e.into_inner());
        let (mut poked, _) = self
            .wake
            .wait_timeout_while(poked, timeout, |poked| !*poked)
            .unwrap_or_else(|e| e.into_inner());
        *poked = false;
    }
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
                poke: Arc::default(),
                busy: WATCH_BUSY,
                idle: WATCH_IDLE,
            },
        })))
    }

    /// A handle whose watcher polls every `poll` (tests: long enough never to be what wakes
    /// a subscriber).
    #[cfg(test)]
    pub(crate) fn open_polling_every(path: &Path, poll: Duration) -> Result<Database> {
        let mut db = Database::open(path)?;
        let inner = Arc::get_mut(&mut db.0).expect("a new handle is the only one");
        inner.commits.busy = poll;
        inner.commits.idle = poll;
        Ok(db)
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
        let done = {
            // A panic inside `f` rolled its transaction back as it unwound: the connection
            // is still usable.
            let mut writer = self.0.writer.lock().unwrap_or_else(|e| e.into_inner());
            f(&mut writer)
        };
        self.poke();
        done
    }

    /// Like [`Database::write`], for node-local bookkeeping only (the peers table's session
    /// figures, app logs): its commits do not wait for the disk. They are durable once any
    /// later commit is (every other commit waits for the disk, and syncing the write-ahead
    /// log syncs all it holds), so a power cut may lose the bookkeeping of the last moments,
    /// nothing else; the server rewrites these figures as it runs. Never for data anyone
    /// may have been told is stored: replicated tables, applied changes, deploys.
    pub async fn write_local<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut Db) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        let db = self.clone();
        tokio::task::spawn_blocking(move || db.write_local_blocking(f))
            .await
            .context("a database write stopped")?
    }

    /// Like [`Database::write_local`], on this thread (which may block).
    pub fn write_local_blocking<T>(&self, f: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        self.write_blocking(|w| {
            // NORMAL, not OFF: in WAL mode a NORMAL commit does not sync, but a checkpoint
            // it runs still syncs the database file before the log can be reused, so what
            // earlier commits made durable stays so.
            w.conn().pragma_update(None, "synchronous", "NORMAL")?;
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(w)));
            let restored = w.conn().pragma_update(None, "synchronous", "FULL");
            let done = done.unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            // Cannot fail outside a transaction (and `f`'s has ended); reported if it did.
            restored.context("restoring synchronous commits")?;
            done
        })
    }

    /// Makes the watcher look for commits now instead of at its next poll: for code that
    /// commits through a connection of its own (a session's applier, after each group it
    /// applied). Writes through this handle do it themselves. See also [`poke_watchers`].
    pub fn poke(&self) {
        self.0.commits.poke.poke();
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
            let poke = self.0.commits.poke.clone();
            watchers().register(&self.0.path, &poke);
            if let Err(e) = std::thread::Builder::new()
                .name("fazt-db-watch".into())
                .spawn(move || watch_commits(inner, &poke))
            {
                tracing::error!(error = %e, "cannot start the database watcher");
            }
        });
    }

    /// Looks for a commit now (one read of SQLite's shared memory), ticking the watcher if
    /// there was one; returns the watcher's count.
    pub fn check_commits(&self) -> Result<u64> {
        Ok(self.0.commits.check(false)?.commits)
    }

    /// The counts of [`Database::commits`] and [`Database::replicated`] as of the last look
    /// for commits, if the fingerprint was read after the last commit seen (no I/O); `None`
    /// if not: then [`Database::replicated_now_blocking`] tells.
    pub fn replicated_known(&self) -> Option<Counts> {
        let seen = self
            .0
            .commits
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (!seen.stale).then(|| self.0.commits.counts())
    }

    /// Looks for a commit now and, if one was seen since the fingerprint was last read,
    /// reads it (a few page reads: call on a blocking thread); returns both counts. A
    /// state read after this returned holds every commit `commits` counts.
    pub fn replicated_now_blocking(&self) -> Result<Counts> {
        self.0.commits.check(true)
    }
}

/// The watcher's counts at one moment: every commit, and moves of the replicated state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    pub commits: u64,
    pub replicated: u64,
}

impl Commits {
    fn counts(&self) -> Counts {
        Counts {
            commits: *self.tick.borrow(),
            replicated: *self.replicated.borrow(),
        }
    }

    /// Looks for a commit; with `fingerprint`, also reads the replicated state's fingerprint
    /// if a commit was seen since it was last read (the watcher thread, or a blocking
    /// thread through [`Database::replicated_now_blocking`]: the request path reads no
    /// pages). Returns the counts as of this look: with
    /// `fingerprint`, each commit `commits` counts is in the replicated count too.
    fn check(&self, fingerprint: bool) -> Result<Counts> {
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
        Ok(self.counts())
    }
}

/// Makes every watcher this process runs on `conn`'s file look for commits now, as
/// [`Database::poke`] does: for code that committed on a connection it was given without
/// the handle (the session applier's hook after each group, see `peer::session_node`).
pub fn poke_watchers(conn: &Connection) {
    if let Some(path) = conn.path() {
        watchers().poke(Path::new(path));
    }
}

/// The watchers running in this process, by the file they watch.
#[derive(Default)]
struct Watchers(Mutex<Vec<(PathBuf, Weak<Poke>)>>);

fn watchers() -> &'static Watchers {
    static WATCHERS: std::sync::OnceLock<Watchers> = std::sync::OnceLock::new();
    WATCHERS.get_or_init(Watchers::default)
}

impl Watchers {
    fn register(&self, path: &Path, poke: &Arc<Poke>) {
        let Ok(path) = path.canonicalize() else {
            return;
        };
        let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|(_, p)| p.strong_count() > 0);
        all.push((path, Arc::downgrade(poke)));
    }

    fn poke(&self, path: &Path) {
        let Ok(path) = path.canonicalize() else {
            return;
        };
        let all = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for poke in all.iter().filter(|(p, _)| *p == path) {
            if let Some(poke) = poke.1.upgrade() {
                poke.poke();
            }
        }
    }
}

fn watch_commits(inner: Weak<Inner>, poke: &Poke) {
    let mut interval = Duration::ZERO;
    loop {
        let Some(db) = inner.upgrade() else { return };
        let before = *db.commits.tick.borrow();
        let (busy, idle) = (db.commits.busy, db.commits.idle);
        match db.commits.check(true) {
            Ok(now) if now.commits != before => interval = busy,
            Ok(_) => interval = (interval + Duration::from_millis(1)).clamp(busy, idle),
            Err(e) => tracing::debug!(error = %format!("{e:#}"), "looking for commits"),
        }
        drop(db);
        poke.wait(interval);
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

    fn synchronous(db: &Database) -> i64 {
        db.write_blocking(|w| Ok(w.conn().query_row("PRAGMA synchronous", [], |r| r.get(0))?))
            .unwrap()
    }

    /// SQLite's values of `PRAGMA synchronous`.
    const NORMAL: i64 = 1;
    const FULL: i64 = 2;

    // Whether a commit calls fsync cannot be seen from here without a VFS of our own: what is
    // checked is that the commit runs with synchronous=NORMAL (which in WAL mode does not
    // sync at commit: SQLite's documented behaviour), that FULL is back for every later
    // write whatever the bookkeeping did, and that the data is in the file.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bookkeeping_commits_skip_the_sync_and_leave_later_writes_synced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        crate::db::create(&path).unwrap();
        let db = Database::open(&path).unwrap();
        assert_eq!(synchronous(&db), FULL);
        let during = db
            .write_local(|w| {
                crate::config::set_local(w.conn(), "bookkeeping", "kept")?;
                Ok(w.conn()
                    .query_row("PRAGMA synchronous", [], |r| r.get::<_, i64>(0))?)
            })
            .await
            .unwrap();
        assert_eq!(during, NORMAL);
        assert_eq!(synchronous(&db), FULL);
        // A bookkeeping write that fails, and one that panics, leave FULL behind too.
        let failed = db.write_local_blocking(|_| -> Result<()> { anyhow::bail!("no") });
        assert!(failed.is_err());
        assert_eq!(synchronous(&db), FULL);
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            db.write_local_blocking(|_| -> Result<()> { panic!("bookkeeping panicked") })
        }));
        assert!(panicked.is_err());
        assert_eq!(synchronous(&db), FULL);
        drop(db);
        let reopened = crate::db::open_existing(&path).unwrap();
        let kept: String = reopened
            .conn()
            .query_row(
                "SELECT value FROM node_config WHERE key = 'bookkeeping'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(kept, "kept");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_poke_wakes_subscribers_without_waiting_for_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        crate::db::create(&path).unwrap();
        // Polling once an hour: only pokes wake anyone within the test.
        let db = Database::open_polling_every(&path, Duration::from_secs(3600)).unwrap();
        // The first look, made here rather than raced by the watcher's.
        db.check_commits().unwrap();
        let mut commits = db.commits();
        let mut replicated = db.replicated();
        commits.borrow_and_update();
        replicated.borrow_and_update();

        // A write through the handle pokes by itself.
        db.write(|w| {
            put_setting(w);
            Ok(())
        })
        .await
        .unwrap();
        woken(&mut commits, "a write through the handle").await;
        woken(&mut replicated, "a replicated write through the handle").await;

        // A commit on a connection of its own (as a session's applier makes) is found when
        // the committer pokes, through the handle or through the connection.
        let mut engine = db.engine().unwrap();
        put_setting(&mut engine);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!commits.has_changed().unwrap(), "woken with no poke");
        db.poke();
        woken(&mut commits, "a poke").await;
        woken(&mut replicated, "a poke after a replicated commit").await;
        put_setting(&mut engine);
        super::poke_watchers(engine.conn());
        woken(&mut commits, "a poke through the committing connection").await;
        woken(&mut replicated, "a poke through the committing connection").await;
        // Each commit woke each subscriber once.
        assert!(!commits.has_changed().unwrap());
        assert!(!replicated.has_changed().unwrap());
    }
}
