//! A replica: one SQLite connection with the engine's functions and bookkeeping.
//!
//! Every write to a replicated table happens inside [`Replica::write`], which takes SQLite's
//! write lock, allocates the transaction's db_version (a Lamport clock: one more than the
//! highest version this replica has made or merged) and numbers each captured change with
//! `seq`.
//!
//! Two numbers are kept in `fazt_sync_state`:
//! - `own_version`, the version of this replica's newest local write, stored by that write
//!   (in its transaction). It ends this replica's own coverage: it holds `1..=own_version`
//!   of its own origin, the versions it numbered, and never the versions its clock skipped
//!   when a merge moved it (see [`Replica::coverage`]).
//! - `db_version`, the Lamport clock as merges moved it: the maximum of everything merged,
//!   covered and made, so a merged change that replaces this replica's newest clock row
//!   cannot make a version number come round again.
//!
//! The clock is the larger of those two and of the newest version among this replica's own
//! clock rows (site ordinal 0, found through each clock's origin index), which counts local
//! writes made by an engine that did not store `own_version` yet. The values are cached per
//! connection and derived again whenever another connection has committed (`PRAGMA
//! data_version`) or this one merged. The triggers on replicated tables ask the connection
//! for those numbers; outside a `write` they refuse, so no write can slip past the engine.
//! Merges run with capture off.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::sync::Arc;

use rusqlite::functions::FunctionFlags;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior};

use crate::clock::DbVersion;
use crate::coverage::{Coverage, RangeSet, SiteId};
use crate::crr::TableInfo;
use crate::value::Value;
use crate::Error;

const IDLE: u8 = 0;
const LOCAL: u8 = 1;
const MERGING: u8 = 2;

/// What the triggers read: whether to capture, and the numbers to stamp changes with.
#[derive(Default)]
pub(crate) struct Capture {
    mode: AtomicU8,
    db_version: AtomicI64,
    seq: AtomicI64,
}

/// Puts capture back to idle however the transaction ends (error or panic included).
pub(crate) struct ModeGuard(Arc<Capture>);

impl Capture {
    pub(crate) fn enter(self: &Arc<Self>, mode: u8, db_version: DbVersion) -> ModeGuard {
        self.db_version.store(db_version.0, Ordering::Relaxed);
        self.seq.store(0, Ordering::Relaxed);
        self.mode.store(mode, Ordering::Relaxed);
        ModeGuard(self.clone())
    }

    pub(crate) fn merging(self: &Arc<Self>) -> ModeGuard {
        self.enter(MERGING, DbVersion(0))
    }

    fn captured(&self) -> i64 {
        self.seq.load(Ordering::Relaxed)
    }
}

impl Drop for ModeGuard {
    fn drop(&mut self) {
        self.0.mode.store(IDLE, Ordering::Relaxed);
    }
}

const BOOKKEEPING: &str = "
CREATE TABLE IF NOT EXISTS fazt_sync_sites (
    ord     INTEGER PRIMARY KEY NOT NULL,
    site_id BLOB NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS fazt_sync_state (
    key   TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS fazt_sync_columns (
    tbl  TEXT NOT NULL,
    cid  INTEGER NOT NULL,
    name TEXT NOT NULL,
    pk   INTEGER NOT NULL,
    PRIMARY KEY (tbl, cid)
);
CREATE TABLE IF NOT EXISTS fazt_sync_coverage (
    site_ord INTEGER NOT NULL,
    start    INTEGER NOT NULL,
    end      INTEGER NOT NULL,
    PRIMARY KEY (site_ord, start)
);
CREATE TABLE IF NOT EXISTS fazt_sync_pending (
    site_ord    INTEGER NOT NULL,
    db_version  INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    tbl         TEXT NOT NULL,
    pk          BLOB NOT NULL,
    cid         TEXT NOT NULL,
    val         ANY,
    col_version INTEGER NOT NULL,
    cl          INTEGER NOT NULL,
    PRIMARY KEY (site_ord, db_version, seq)
);
";

/// A fingerprint of what a replica can export: it moves whenever what
/// [`Replica::export_groups`] hands out to any holder may have grown, and stays put across
/// commits to tables that do not replicate, and across merges that bring nothing new. Cheap
/// to read whatever the coverage holds (`PRAGMA schema_version` and one look at two rows of
/// `fazt_sync_state`), so a node can read it after every commit and wake its exporters only
/// when it moved.
///
/// Exportable changes are the clock rows of the versions a replica covers (its coverage),
/// and grow only in three ways, each of which moves one part:
/// - a local write that captured something stores its version as `own_version`, which ends
///   this replica's own coverage and only ever rises;
/// - a merge that completes versions of other origins (also ones it only relays, or held as
///   pending and applied once their table exists: that is a merge too) saves their
///   coverage, and every save bumps the counter `coverage_saves` in the same transaction.
///   Nothing else writes `fazt_sync_coverage`. A merge that moves only the Lamport clock
///   exports nothing new and leaves the fingerprint as it was;
/// - registering a table (which backfills its rows as a local write) or rebuilding triggers
///   (`db replicate`, a schema upgrade) changes the schema: `PRAGMA schema_version` moves.
///
/// A database an older engine wrote has no `own_version` until this engine first opens it
/// with [`Replica::open`] (which stores the clock there): until then its own coverage ends
/// at the clock, as it did before, and the clock stands in for it (found as
/// [`Replica::db_version`] finds it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fingerprint {
    schema: i64,
    own: DbVersion,
    coverage_saves: i64,
}

impl Fingerprint {
    /// Reads the fingerprint through any connection to a replica's file (no engine needed:
    /// a read-only one will do).
    pub fn read(conn: &Connection) -> Result<Fingerprint, Error> {
        let (own, saves) = read_own_and_saves(conn)?;
        let own = match own {
            Some(own) => own,
            None => derive_versions(conn)?.own,
        };
        Fingerprint::with(conn, own, saves)
    }

    fn with(conn: &Connection, own: DbVersion, coverage_saves: i64) -> Result<Fingerprint, Error> {
        let schema: i64 = conn
            .prepare_cached("PRAGMA schema_version")?
            .query_row([], |r| r.get(0))?;
        Ok(Fingerprint {
            schema,
            own,
            coverage_saves,
        })
    }
}

/// `own_version` (None on a database no local write of this engine touched) and
/// `coverage_saves` (0 before the first save).
fn read_own_and_saves(conn: &Connection) -> rusqlite::Result<(Option<DbVersion>, i64)> {
    conn.prepare_cached(
        "SELECT (SELECT value FROM fazt_sync_state WHERE key = 'own_version'),
                coalesce((SELECT value FROM fazt_sync_state WHERE key = 'coverage_saves'), 0)",
    )?
    .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// A SQLite connection with the replication engine on it: the catalog of replicated tables,
/// the capture of local writes and the merging of changes from other replicas.
pub struct Replica {
    pub(crate) conn: Connection,
    pub(crate) capture: Arc<Capture>,
    pub(crate) site_id: SiteId,
    /// Site ordinal -> site id; ordinal 0 is this replica.
    pub(crate) sites: Vec<Option<SiteId>>,
    pub(crate) site_ords: HashMap<SiteId, i64>,
    pub(crate) tables: HashMap<String, TableInfo>,
    /// Bumped whenever `tables` changes, so cached SQL is rebuilt.
    pub(crate) catalog_version: u64,
    /// `PRAGMA schema_version` when the catalog was last loaded: another connection
    /// registering a table changes the schema, and the catalog is reloaded.
    pub(crate) schema_seen: i64,
    /// Whether the pending area held anything when the current merge began.
    pub(crate) has_pending: bool,
    /// The pending area's caps: (changes, bytes).
    pub(crate) pending_caps: (i64, i64),
    /// The merge path's statements per table, for `catalog_version`.
    pub(crate) merge_sql: (u64, HashMap<String, Arc<crate::merge::MergeSql>>),
    /// (`PRAGMA data_version`, the clock and own version) as last derived or allocated on
    /// this connection.
    pub(crate) version_cache: Cell<Option<(i64, Versions)>>,
    /// Code of the application's that sees every merge from inside its transaction.
    pub(crate) merge_hook: Option<Arc<dyn crate::merge::MergeHook>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica")
            .field("site_id", &self.site_id)
            .field("tables", &self.tables())
            .finish()
    }
}

impl Replica {
    /// Makes `conn` a replica: creates the bookkeeping tables and the site id on first use,
    /// registers the engine's SQL functions, and loads the replicated-table catalog.
    pub fn open(conn: Connection) -> Result<Replica, Error> {
        conn.execute_batch(BOOKKEEPING)?;
        let site_id = match conn
            .query_row(
                "SELECT site_id FROM fazt_sync_sites WHERE ord = 0",
                [],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .optional()?
        {
            Some(bytes) => SiteId(
                bytes
                    .try_into()
                    .map_err(|_| Error::Corrupt("site id is not 16 bytes".into()))?,
            ),
            None => {
                let mut id = [0u8; 16];
                getrandom::fill(&mut id)
                    .map_err(|e| Error::Corrupt(format!("no randomness for a site id: {e}")))?;
                // Shaped as a UUIDv4, like cr-sqlite's.
                id[6] = (id[6] & 0x0f) | 0x40;
                id[8] = (id[8] & 0x3f) | 0x80;
                conn.execute(
                    "INSERT INTO fazt_sync_sites (ord, site_id) VALUES (0, ?1)",
                    [&id[..]],
                )?;
                SiteId(id)
            }
        };
        let capture = Arc::new(Capture::default());
        register_functions(&conn, &capture)?;
        // The merge path keeps a few statements per table prepared.
        conn.set_prepared_statement_cache_capacity(256);
        // Plans must not depend on bound values: otherwise SQLite re-prepares a cached
        // statement whenever its bindings change, which on the merge path (`WHERE key = ?`
        // per row) cost about half the CPU time.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        // Multi-statement triggers keep a statement journal; keep it off the disk.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        let mut replica = Replica {
            conn,
            capture,
            site_id,
            sites: Vec::new(),
            site_ords: HashMap::new(),
            tables: HashMap::new(),
            catalog_version: 0,
            schema_seen: -1,
            has_pending: false,
            pending_caps: (
                crate::merge::MAX_PENDING_CHANGES,
                crate::merge::MAX_PENDING_BYTES,
            ),
            merge_sql: (0, HashMap::new()),
            version_cache: Cell::new(None),
            merge_hook: None,
        };
        replica.refresh()?;
        replica.upgrade_triggers()?;
        replica.keep_own_version()?;
        Ok(replica)
    }

    /// Rebuilds the triggers of every replicated table when an older engine wrote them
    /// (they capture writes; a fix to them must reach tables registered before it).
    fn upgrade_triggers(&mut self) -> Result<(), Error> {
        let stored: Option<i64> = self
            .conn
            .query_row(
                "SELECT value FROM fazt_sync_state WHERE key = 'triggers'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if stored.is_some_and(|v| v >= crate::crr::TRIGGERS_VERSION) {
            return Ok(());
        }
        let mut tables: Vec<String> = self.tables.keys().cloned().collect();
        tables.sort();
        for table in tables {
            self.replicate(&table)?;
        }
        self.conn.execute(
            "INSERT OR REPLACE INTO fazt_sync_state (key, value) VALUES ('triggers', ?1)",
            [crate::crr::TRIGGERS_VERSION],
        )?;
        Ok(())
    }

    /// Stores `own_version` on a database that lacks it: 0 on a new one; on one an older
    /// engine wrote, its clock, which ended that engine's own coverage. Its peers may hold
    /// all of that, so it stays covered; from then on, only local writes move it.
    fn keep_own_version(&mut self) -> Result<(), Error> {
        let (own, _) = read_own_and_saves(&self.conn)?;
        if own.is_none() {
            let clock = self.db_version()?;
            self.conn.execute(
                "INSERT OR IGNORE INTO fazt_sync_state (key, value) VALUES ('own_version', ?1)",
                [clock],
            )?;
            self.version_cache.set(None);
        }
        Ok(())
    }

    /// The underlying connection, for reads. Writes to replicated tables through it fail;
    /// use [`Replica::write`].
    pub fn conn(&self) -> &Connection {
        &self.conn
    }

    /// Hands the connection back (the engine's functions stay registered on it).
    pub fn into_inner(self) -> Connection {
        self.conn
    }

    /// This replica's site id, the origin of its own writes.
    pub fn site_id(&self) -> SiteId {
        self.site_id
    }

    /// Names of the replicated tables.
    pub fn tables(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tables.keys().cloned().collect();
        names.sort();
        names
    }

    /// The highest db_version this replica has made or merged (its Lamport clock).
    pub fn db_version(&self) -> Result<DbVersion, Error> {
        Ok(current_versions(&self.conn, &self.version_cache)?.1.clock)
    }

    /// The end of this replica's own coverage: the version of its newest local write (or,
    /// on a database an older engine wrote and this one has not opened yet, its clock).
    pub(crate) fn own_version(&self) -> Result<DbVersion, Error> {
        Ok(current_versions(&self.conn, &self.version_cache)?.1.own)
    }

    /// The [`Fingerprint`] of what this replica can export now.
    pub fn fingerprint(&self) -> Result<Fingerprint, Error> {
        let (_, saves) = read_own_and_saves(&self.conn)?;
        Fingerprint::with(&self.conn, self.own_version()?, saves)
    }

    /// Runs `f` in one SQLite transaction whose writes to replicated tables are captured as
    /// one origin transaction. Commits when `f` returns Ok; rolls back otherwise.
    pub fn write<T, E>(
        &mut self,
        f: impl FnOnce(&rusqlite::Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E>
    where
        E: From<rusqlite::Error>,
    {
        let cache = &self.version_cache;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let (data_version, current) = current_versions(&tx, cache)?;
        let version = next_version(current.clock.0, 1)
            .map(DbVersion)
            .map_err(rusqlite::Error::UserFunctionError)?;
        let guard = self.capture.enter(LOCAL, version);
        let result = f(&tx);
        let captured = self.capture.captured();
        drop(guard);
        let value = result?;
        if captured > 0 {
            // The version is now this replica's own: its coverage grows to it (and over any
            // versions the clock skipped since the previous local write; the group that
            // exports this write covers those too).
            tx.prepare_cached(
                "INSERT INTO fazt_sync_state (key, value) VALUES ('own_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
            )?
            .execute([version])?;
        }
        tx.commit()?;
        // This connection's own commits leave its data_version as it was.
        if captured > 0 {
            cache.set(Some((
                data_version,
                Versions {
                    clock: version,
                    own: version,
                },
            )));
        }
        Ok(value)
    }

    /// What this replica holds, per origin (itself included).
    ///
    /// Of its own origin it holds `1..=own_version`: the versions up to its newest local
    /// write, not up to its clock. A merge moves the clock past versions this replica never
    /// wrote; those hold nothing anywhere (only this replica writes its origin), so no peer
    /// needs them, and covering them would only send every peer an empty group to cover
    /// them in turn. The next local write is still numbered after the clock, and its group
    /// covers the skipped versions together with it (exports cover everything between two
    /// groups' changes). Own coverage never shrinks (`own_version` only rises; a database an
    /// older engine wrote covers up to its clock, which [`Replica::open`] then stores as its
    /// own version), so no other node ever holds a version of this origin that this replica
    /// lacks. An
    /// engine that did not store `own_version` writing to the file in between (a downgrade)
    /// would leave its writes uncovered here until the next local write of this one covers
    /// them; their numbers are never reused (the clock counts its clock rows).
    pub fn coverage(&self) -> Result<Coverage, Error> {
        let mut cov = Coverage::default();
        // Joined in SQL rather than through the cached site list, which may lag behind
        // another connection that registered a site.
        let mut stmt = self.conn.prepare_cached(
            "SELECT s.site_id, c.start, c.end FROM fazt_sync_coverage c JOIN fazt_sync_sites s ON s.ord = c.site_ord",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, DbVersion>(1)?,
                r.get::<_, DbVersion>(2)?,
            ))
        })?;
        for row in rows {
            let (site, start, end) = row?;
            let site = SiteId(
                site.try_into()
                    .map_err(|_| Error::Corrupt("site id is not 16 bytes".into()))?,
            );
            cov.insert(site, start, end);
        }
        let own = self.own_version()?;
        if own > DbVersion(0) {
            cov.insert(self.site_id, DbVersion(1), own);
        }
        Ok(cov)
    }

    /// The ordinal of a site already registered (by any connection), if it is.
    pub(crate) fn known_ord(&self, site: &SiteId) -> Result<Option<i64>, Error> {
        if let Some(&ord) = self.site_ords.get(site) {
            return Ok(Some(ord));
        }
        Ok(self
            .conn
            .prepare_cached("SELECT ord FROM fazt_sync_sites WHERE site_id = ?1")?
            .query_row([&site.0[..]], |r| r.get(0))
            .optional()?)
    }

    /// Replaces what this replica holds of the origin with ordinal `ord`, and bumps
    /// `coverage_saves` (part of the [`Fingerprint`]) in the same transaction.
    pub(crate) fn save_coverage(tx: &Connection, ord: i64, set: &RangeSet) -> Result<(), Error> {
        tx.prepare_cached(
            "INSERT INTO fazt_sync_state (key, value) VALUES ('coverage_saves', 1)
             ON CONFLICT (key) DO UPDATE SET value = value + 1",
        )?
        .execute([])?;
        tx.execute("DELETE FROM fazt_sync_coverage WHERE site_ord = ?1", [ord])?;
        let mut insert = tx.prepare_cached(
            "INSERT INTO fazt_sync_coverage (site_ord, start, end) VALUES (?1, ?2, ?3)",
        )?;
        for &(start, end) in set.ranges() {
            insert.execute(rusqlite::params![ord, start, end])?;
        }
        Ok(())
    }

    pub(crate) fn site_of(&self, ord: i64) -> Option<SiteId> {
        self.sites
            .get(usize::try_from(ord).ok()?)
            .copied()
            .flatten()
    }

    fn load_sites(&mut self) -> Result<(), Error> {
        let mut stmt = self
            .conn
            .prepare("SELECT ord, site_id FROM fazt_sync_sites")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)))?;
        let mut sites = Vec::new();
        let mut ords = HashMap::new();
        for row in rows {
            let (ord, bytes) = row?;
            let id = SiteId(
                bytes
                    .try_into()
                    .map_err(|_| Error::Corrupt("site id is not 16 bytes".into()))?,
            );
            let idx = ord as usize;
            if sites.len() <= idx {
                sites.resize(idx + 1, None);
            }
            sites[idx] = Some(id);
            ords.insert(id, ord);
        }
        drop(stmt);
        self.sites = sites;
        self.site_ords = ords;
        Ok(())
    }

    /// Catches up with what other connections to the same file registered since this one
    /// looked: origin sites (merges by another process or session) and replicated tables
    /// (`replicate` run elsewhere). Cheap when nothing changed: two indexed reads.
    pub fn refresh(&mut self) -> Result<(), Error> {
        let schema: i64 = self
            .conn
            .query_row("PRAGMA schema_version", [], |r| r.get(0))?;
        if schema != self.schema_seen {
            self.tables = crate::crr::load_catalog(&self.conn)?;
            self.catalog_version += 1;
            self.schema_seen = schema;
        }
        let max_ord: Option<i64> = self
            .conn
            .prepare_cached("SELECT max(ord) FROM fazt_sync_sites")?
            .query_row([], |r| r.get(0))?;
        if max_ord.is_some_and(|m| m as usize >= self.sites.len()) {
            self.load_sites()?;
        }
        Ok(())
    }

    /// The ordinal of `site`, registering it if new (inside the caller's write transaction,
    /// so the ordinal is allocated from the file, never from a stale cache).
    pub(crate) fn ord_of(&mut self, site: SiteId) -> Result<i64, Error> {
        if let Some(&ord) = self.site_ords.get(&site) {
            return Ok(ord);
        }
        // Another connection may have registered it meanwhile.
        self.load_sites()?;
        if let Some(&ord) = self.site_ords.get(&site) {
            return Ok(ord);
        }
        let ord: i64 = self.conn.query_row(
            "SELECT coalesce(max(ord), 0) + 1 FROM fazt_sync_sites",
            [],
            |r| r.get(0),
        )?;
        self.conn.execute(
            "INSERT INTO fazt_sync_sites (ord, site_id) VALUES (?1, ?2)",
            rusqlite::params![ord, &site.0[..]],
        )?;
        if self.sites.len() <= ord as usize {
            self.sites.resize(ord as usize + 1, None);
        }
        self.sites[ord as usize] = Some(site);
        self.site_ords.insert(site, ord);
        Ok(ord)
    }

    /// Forgets in-memory site registrations made by a transaction that rolled back.
    pub(crate) fn reload_sites(&mut self) -> Result<(), Error> {
        self.load_sites()
    }
}

/// A replica's clock and the end of its own coverage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Versions {
    /// The highest db_version made or merged (the Lamport clock).
    pub(crate) clock: DbVersion,
    /// The newest local write's version (`own_version`); the clock on a database without it.
    pub(crate) own: DbVersion,
}

/// (`PRAGMA data_version`, the clock and own version), from `cache` while no other
/// connection has committed since it was filled.
fn current_versions(
    conn: &Connection,
    cache: &Cell<Option<(i64, Versions)>>,
) -> rusqlite::Result<(i64, Versions)> {
    let data_version: i64 = conn
        .prepare_cached("PRAGMA data_version")?
        .query_row([], |r| r.get(0))?;
    if let Some((seen, versions)) = cache.get() {
        if seen == data_version {
            return Ok((seen, versions));
        }
    }
    let versions = derive_versions(conn)?;
    cache.set(Some((data_version, versions)));
    Ok((data_version, versions))
}

/// The clock: the stored Lamport clock (what merges saw), the stored own version, or the
/// newest version among this replica's own clock rows, whichever is highest. Every
/// registered table's clock counts, also one that another connection registered since this
/// one loaded its catalog (the catalog is read from the file, not from memory). The own
/// version: the stored one, or the clock if none is stored.
fn derive_versions(conn: &Connection) -> rusqlite::Result<Versions> {
    let (stored_clock, stored_own): (Option<DbVersion>, Option<DbVersion>) = conn
        .prepare_cached(
            "SELECT (SELECT value FROM fazt_sync_state WHERE key = 'db_version'),
                    (SELECT value FROM fazt_sync_state WHERE key = 'own_version')",
        )?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut clock = stored_clock
        .unwrap_or_default()
        .max(stored_own.unwrap_or_default());
    let clocks: Vec<String> = conn
        .prepare_cached(
            "SELECT name FROM sqlite_schema WHERE type = 'table'
               AND name IN (SELECT tbl || '__fazt_clock' FROM fazt_sync_columns)",
        )?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for table in clocks {
        let own: Option<DbVersion> = conn
            .prepare_cached(&format!(
                "SELECT max(db_version) FROM {} WHERE site_ord = 0",
                crate::crr::quote(&table)
            ))?
            .query_row([], |r| r.get(0))?;
        clock = clock.max(own.unwrap_or_default());
    }
    Ok(Versions {
        clock,
        own: stored_own.unwrap_or(clock),
    })
}

pub(crate) fn set_db_version(conn: &Connection, version: DbVersion) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO fazt_sync_state (key, value) VALUES ('db_version', ?1)
         ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
    )?
    .execute([version])?;
    Ok(())
}

/// `current + step`, refused past [`fazt_proto::wire::MAX_VERSION`]: a clock, col_version or
/// causal length that reached the bound (only forged input can bring it there) fails the
/// write loudly instead of wrapping or making numbers every peer refuses.
pub(crate) fn next_version(
    current: i64,
    step: i64,
) -> Result<i64, Box<dyn std::error::Error + Send + Sync>> {
    match current.checked_add(step) {
        Some(v) if v <= fazt_proto::wire::MAX_VERSION => Ok(v),
        _ => Err(format!(
            "a replication counter reached its bound of 2^53 (at {current}): only a damaged or hostile peer or bundle can bring it there; writes to the affected data are refused"
        )
        .into()),
    }
}

fn register_functions(conn: &Connection, capture: &Arc<Capture>) -> Result<(), Error> {
    let flags = FunctionFlags::SQLITE_UTF8;
    conn.create_scalar_function(
        "fazt_sync_next",
        2,
        flags | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let current: i64 = ctx.get(0)?;
            let step: i64 = ctx.get(1)?;
            next_version(current, step).map_err(rusqlite::Error::UserFunctionError)
        },
    )?;
    let c = capture.clone();
    conn.create_scalar_function("fazt_sync_capturing", 0, flags, move |_| {
        Ok(c.mode.load(Ordering::Relaxed) != MERGING)
    })?;
    let c = capture.clone();
    conn.create_scalar_function("fazt_sync_db_version", 0, flags, move |_| {
        if c.mode.load(Ordering::Relaxed) != LOCAL {
            return Err(rusqlite::Error::UserFunctionError(
                "writes to replicated tables must go through the replication engine (Replica::write or `fazt sql`)".into(),
            ));
        }
        Ok(c.db_version.load(Ordering::Relaxed))
    })?;
    let c = capture.clone();
    conn.create_scalar_function("fazt_sync_seq", 0, flags, move |_| {
        if c.mode.load(Ordering::Relaxed) != LOCAL {
            return Err(rusqlite::Error::UserFunctionError(
                "writes to replicated tables must go through the replication engine".into(),
            ));
        }
        Ok(c.seq.fetch_add(1, Ordering::Relaxed))
    })?;
    // A column "changes" when its value does, exactly: SQLite's `IS` holds 0 and 0.0, or
    // 0.0 and -0.0, equal, but replicas that kept the old one would then differ from this
    // one forever. The update triggers ask this only when a REAL is involved.
    conn.create_scalar_function(
        "fazt_sync_differ",
        2,
        flags | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            use rusqlite::types::ValueRef;
            Ok(match (ctx.get_raw(0), ctx.get_raw(1)) {
                (ValueRef::Real(a), ValueRef::Real(b)) => a.to_bits() != b.to_bits(),
                (a, b) => a != b,
            })
        },
    )?;
    conn.create_scalar_function(
        "fazt_sync_pack",
        -1,
        flags | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            let values: Vec<Value> = (0..ctx.len())
                .map(|i| Value::from_ref(ctx.get_raw(i)))
                .collect();
            Ok(crate::pack::pack(&values))
        },
    )?;
    Ok(())
}
