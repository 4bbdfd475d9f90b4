//! Merging remote changes.
//!
//! Per (row, column) the state is a last-writer-wins register ordered by (col_version,
//! value, site id); per row, the causal length decides existence (odd alive, even deleted)
//! and a larger causal length starts a new incarnation that wipes the old one. Every
//! comparison ends in a total order, and metadata ties are broken the same way, so replicas
//! that receive the same changes in any order, any number of times, end byte-identical —
//! clocks included.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rusqlite::{params_from_iter, Connection, OptionalExtension};

use crate::changes::{Batch, Change, ROW_CID};
use crate::clock::{CausalLength, ColVersion, DbVersion, Seq};
use crate::coverage::{Coverage, RangeSet, SiteId};
use crate::crr::{quote, TableInfo};
use crate::pack;
use crate::replica::{set_db_version, Replica};
use crate::value::Value;
use crate::Error;

/// What an `apply` did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// Origin transactions merged.
    pub transactions: usize,
    /// Changes that changed this replica (data or clocks).
    pub applied: usize,
    /// Changes that lost to what this replica already had.
    pub unchanged: usize,
    /// Changes skipped because their origin transaction was already held.
    pub already_seen: usize,
    /// Changes kept for later: their table or column does not exist here yet.
    pub pending: usize,
    /// Changes neither applied nor kept because the pending area is full
    /// ([`MAX_PENDING_CHANGES`], [`MAX_PENDING_BYTES`]): their versions stay uncovered, so
    /// peers send them again later.
    pub pending_full: usize,
    /// Whether the merge wrote anything. A merge that brings nothing new (only changes this
    /// replica holds, covers it has, a clock it is past) writes nothing: it ends in a
    /// rollback, so it commits nothing, syncs nothing and other connections see no change
    /// (`PRAGMA data_version` stays).
    pub written: bool,
}

/// The most changes the pending area keeps (changes for tables or columns this replica does
/// not have yet).
pub const MAX_PENDING_CHANGES: i64 = 100_000;
/// The most bytes (keys, values and names, plus [`PENDING_ROW_OVERHEAD`] a change) the
/// pending area keeps.
pub const MAX_PENDING_BYTES: i64 = 64 << 20;
/// What one pending change counts for besides its keys, values and names.
pub const PENDING_ROW_OVERHEAD: i64 = 64;

/// What the pending area holds, sized as [`pending_size`] sizes a change (64 is
/// [`PENDING_ROW_OVERHEAD`]; a REAL's text may differ by a few bytes from Rust's).
const PENDING_SIZE_SQL: &str =
    "SELECT count(*), coalesce(sum(length(tbl) + length(pk) + length(cid) + coalesce(length(CAST(val AS BLOB)), 0) + 64), 0) FROM fazt_sync_pending";

/// The size of one change as the pending area counts it.
fn pending_size(c: &Change) -> i64 {
    let val = match &c.val {
        Value::Null => 0,
        Value::Integer(i) => i.to_string().len(),
        Value::Real(f) => f.to_string().len(),
        Value::Text(t) => t.len(),
        Value::Blob(b) => b.len(),
    };
    let len = c.table.len() + c.pk.len() + c.cid.len() + val;
    i64::try_from(len)
        .unwrap_or(i64::MAX)
        .saturating_add(PENDING_ROW_OVERHEAD)
}

/// What the pending area holds: (changes, bytes as counted against the caps).
pub(crate) fn pending_usage(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    conn.prepare_cached(PENDING_SIZE_SQL)?
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// Refuses changes carrying a number beyond [`fazt_proto::wire::MAX_VERSION`] or below its
/// valid minimum, before anything of them is applied.
fn check_changes(changes: &[Change]) -> Result<(), Error> {
    for c in changes {
        if let Err(field) =
            fazt_proto::wire::check_change_numbers(c.db_version.0, c.seq.0, c.col_version.0, c.cl.0)
        {
            return Err(Error::Malformed(format!(
                "{} of a change of origin {} in table {} is out of range (1..=2^53): the batch was refused and nothing applied; the sender is damaged or hostile",
                field,
                c.site_id,
                c.table
            )));
        }
    }
    Ok(())
}

/// Refuses covers beyond [`fazt_proto::wire::MAX_VERSION`] or below 1.
fn check_covers(covers: &Coverage) -> Result<(), Error> {
    for (site, set) in &covers.0 {
        if let (Some(&(start, _)), Some(&(_, end))) = (set.ranges().first(), set.ranges().last()) {
            if start < DbVersion(1) || end > DbVersion(fazt_proto::wire::MAX_VERSION) {
                return Err(Error::Malformed(format!(
                    "the versions covered of origin {site} are out of range (1..=2^53): the batch was refused and nothing applied; the sender is damaged or hostile"
                )));
            }
        }
    }
    Ok(())
}

/// Application code that runs inside every merge's transaction, with capture off (it must
/// not write replicated tables), once per part of the merge: `before` sees the part's
/// changes and the rows as they were, `after` the rows as the part left them. An error
/// rolls the whole merge back. The node uses it to keep the bytes of content a peer deleted
/// while this node still references it.
pub trait MergeHook: Send + Sync {
    /// Runs before a part of a merge is applied, with that part's changes.
    fn before(&self, conn: &Connection, changes: &[Change]) -> rusqlite::Result<()>;
    /// Runs after that part was applied, in the same transaction.
    fn after(&self, conn: &Connection) -> rusqlite::Result<()>;
}

/// A clock row's origin for tie-breaks: (site id, db_version, seq); a placeholder (a row
/// brought into existence by a column change before its creation arrived) sorts first.
type Origin = (Option<SiteId>, DbVersion, Seq);

/// A merge in progress: one IMMEDIATE transaction with capture off, fed changes in parts
/// ([`Merge::part`]) and ended by [`Merge::commit`]; dropped unfinished (or after an error),
/// it rolls back and nothing of it stays. An origin transaction may span parts, so a caller
/// can merge one of any size holding only a part in memory at a time.
pub struct Merge<'r> {
    replica: &'r mut Replica,
    /// The clock before the merge.
    clock_before: DbVersion,
    /// The connection's `total_changes()` when the merge began: rows written since count.
    changes_before: u64,
    /// What this replica held before the merge.
    held: Coverage,
    report: ApplyReport,
    /// Versions of this merge not held after it: parked, or neither applied nor kept.
    not_held: HashMap<SiteId, RangeSet>,
    /// What the pending area holds (changes, bytes), read when first needed.
    pending_use: Option<(i64, i64)>,
    /// The highest version merged. Groups already held or only parked do not count: a
    /// parked change is not held, and its version must not move the clock.
    max_version: DbVersion,
    /// The origin transaction the last part ended in: the next part may continue it.
    open: Option<Group>,
    /// Still in the transaction (not committed, not rolled back).
    active: bool,
    _capture_off: crate::replica::ModeGuard,
}

/// What becomes of one origin transaction in a merge, decided by its first part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// Already held: skipped.
    Held,
    /// Merged into the tables.
    Merged,
    /// Kept in the pending area (a table or column it names does not exist here).
    Parked,
    /// Kept in the pending area by an earlier merge.
    ParkedBefore,
    /// Neither applied nor kept: the pending area is full, or a later part of a merged
    /// transaction names a table this replica lacks. Its version stays uncovered.
    NotKept,
}

struct Group {
    site: SiteId,
    version: DbVersion,
    fate: Fate,
    /// Its changes seen so far, counted as its fate says.
    counted: ApplyReport,
    /// A savepoint named `fazt_group` was taken before it began (it may span parts).
    savepoint: bool,
    /// The pending area's use before it, to restore if it is undone.
    pending_before: Option<(i64, i64)>,
}

impl Replica {
    /// Applies a batch in one SQLite transaction: all of it, or (on error) none of it.
    /// Idempotent: origin transactions already held are skipped.
    pub fn apply(&mut self, batch: &Batch) -> Result<ApplyReport, Error> {
        self.apply_then(batch, |_| Ok(()))
    }

    /// [`Replica::apply`], then `then` in the same transaction, for bookkeeping of the
    /// caller's that must commit with the batch (it runs with capture off: it must not write
    /// replicated tables).
    pub fn apply_then(
        &mut self,
        batch: &Batch,
        then: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> Result<ApplyReport, Error> {
        let mut merge = self.begin_merge()?;
        merge.merge_changes(&batch.changes, false)?;
        merge.commit_then(&batch.covers, batch.sender_clock, then)
    }

    /// Starts a [`Merge`]: opens the transaction, in which the catalog and site list first
    /// catch up with other connections.
    pub fn begin_merge(&mut self) -> Result<Merge<'_>, Error> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let capture_off = self.capture.merging();
        let changes_before = self.conn.total_changes();
        let mut merge = Merge {
            replica: self,
            clock_before: DbVersion(0),
            changes_before,
            held: Coverage::default(),
            report: ApplyReport::default(),
            not_held: HashMap::new(),
            pending_use: None,
            max_version: DbVersion(0),
            open: None,
            active: true,
            _capture_off: capture_off,
        };
        let r = &mut *merge.replica;
        r.refresh()?;
        merge.clock_before = r.db_version()?;
        merge.held = r.coverage()?;
        r.has_pending = r
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM fazt_sync_pending)")?
            .query_row([], |row| row.get(0))?;
        Ok(merge)
    }

    /// Installs the [`MergeHook`] every later merge on this connection runs.
    pub fn set_merge_hook(&mut self, hook: Arc<dyn MergeHook>) {
        self.merge_hook = Some(hook);
    }
}

impl Merge<'_> {
    /// Merges a part of the changes, in origin-transaction order. The origin transaction
    /// it ends in may continue in the next part. An error leaves the merge unusable: drop
    /// it (that rolls everything back).
    pub fn part(&mut self, changes: &[Change]) -> Result<(), Error> {
        self.merge_changes(changes, true)
    }

    /// Records `covers` (believed up to the receiver's clock or `sender_clock`, the clock
    /// the sender declares; 0 if none), moves the clock and commits.
    pub fn commit(self, covers: &Coverage, sender_clock: DbVersion) -> Result<ApplyReport, Error> {
        self.commit_then(covers, sender_clock, |_| Ok(()))
    }

    /// [`Merge::commit`], running `then` (capture off) just before the commit. A merge in
    /// which nothing wrote a row (neither the merge nor `then`) rolls back instead: it
    /// leaves the file as it was ([`ApplyReport::written`] is false).
    pub fn commit_then(
        mut self,
        covers: &Coverage,
        sender_clock: DbVersion,
        then: impl FnOnce(&Connection) -> rusqlite::Result<()>,
    ) -> Result<ApplyReport, Error> {
        if !self.active {
            return Err(Error::Corrupt("a failed merge cannot be committed".into()));
        }
        let result = (|| {
            check_covers(covers)?;
            self.finish_group()?;
            self.record_covers(covers, sender_clock)?;
            then(&self.replica.conn)?;
            if self.wrote() {
                self.replica.conn.execute_batch("COMMIT")?;
                self.report.written = true;
            } else {
                // Nothing to keep: no commit, no log frame, no fsync, and other connections'
                // `data_version` stays, so nothing wakes for it.
                self.replica.conn.execute_batch("ROLLBACK")?;
            }
            Ok(())
        })();
        match result {
            Ok(()) => {
                self.active = false;
                Ok(std::mem::take(&mut self.report))
            }
            Err(e) => Err(e),
        }
    }

    fn merge_changes(&mut self, changes: &[Change], may_continue: bool) -> Result<(), Error> {
        if !self.active {
            return Err(Error::Corrupt(
                "a failed merge cannot take more changes".into(),
            ));
        }
        let result = self.merge_changes_inner(changes, may_continue);
        if result.is_err() {
            self.rollback();
        }
        result
    }

    /// Whether any row was written since the merge began (by the merge, its hook or the
    /// caller's `then`).
    fn wrote(&self) -> bool {
        self.replica.conn.total_changes() != self.changes_before
    }

    fn merge_changes_inner(&mut self, changes: &[Change], may_continue: bool) -> Result<(), Error> {
        check_changes(changes)?;
        let hook = self.replica.merge_hook.clone();
        if let Some(hook) = &hook {
            // The hook sees what may be merged: transactions already held are skipped, and
            // what it would keep for them is not needed (nor written, so a merge of held
            // changes writes nothing).
            if changes
                .iter()
                .any(|c| self.held.contains(&c.site_id, c.db_version))
            {
                let fresh: Vec<Change> = changes
                    .iter()
                    .filter(|c| !self.held.contains(&c.site_id, c.db_version))
                    .cloned()
                    .collect();
                hook.before(&self.replica.conn, &fresh)?;
            } else {
                hook.before(&self.replica.conn, changes)?;
            }
        }
        let mut start = 0;
        while start < changes.len() {
            let (site, version) = (changes[start].site_id, changes[start].db_version);
            let end = start
                + changes[start..]
                    .iter()
                    .take_while(|c| c.site_id == site && c.db_version == version)
                    .count();
            let run = &changes[start..end];
            let continues = start == 0
                && self
                    .open
                    .as_ref()
                    .is_some_and(|g| g.site == site && g.version == version);
            if !continues {
                self.finish_group()?;
                // The last run of a part may go on in the next one: make it undoable.
                let savepoint = may_continue && end == changes.len();
                self.begin_group(site, version, run, savepoint)?;
            }
            self.merge_run(run)?;
            start = end;
        }
        if let Some(hook) = &hook {
            hook.after(&self.replica.conn)?;
        }
        Ok(())
    }

    /// Decides an origin transaction's fate from its first run of changes.
    fn begin_group(
        &mut self,
        site: SiteId,
        version: DbVersion,
        run: &[Change],
        savepoint: bool,
    ) -> Result<(), Error> {
        if savepoint {
            self.replica.conn.execute_batch("SAVEPOINT fazt_group")?;
        }
        let r = &mut *self.replica;
        let fate = if self.held.contains(&site, version) {
            Fate::Held
        } else if run.iter().any(|c| !r.resolvable(c)) {
            if r.has_pending && r.is_parked(site, version)? {
                Fate::ParkedBefore
            } else {
                Fate::Parked
            }
        } else {
            // A copy parked earlier (before this replica had the table) is now applied.
            if r.has_pending {
                let ord = r.ord_of(site)?;
                r.conn
                    .prepare_cached(
                        "DELETE FROM fazt_sync_pending WHERE site_ord = ?1 AND db_version = ?2",
                    )?
                    .execute(rusqlite::params![ord, version])?;
            }
            Fate::Merged
        };
        self.open = Some(Group {
            site,
            version,
            fate,
            counted: ApplyReport::default(),
            savepoint,
            pending_before: self.pending_use,
        });
        Ok(())
    }

    /// Merges (or parks, or skips) a run of the open group's changes.
    fn merge_run(&mut self, run: &[Change]) -> Result<(), Error> {
        let Some(fate) = self.open.as_ref().map(|g| g.fate) else {
            return Ok(());
        };
        let r = &mut *self.replica;
        match fate {
            Fate::Held => self.count(|c| c.already_seen += run.len()),
            Fate::ParkedBefore => self.count(|c| c.pending += run.len()),
            Fate::NotKept => self.count(|c| c.pending_full += run.len()),
            Fate::Merged => {
                if run.iter().any(|c| !r.resolvable(c)) {
                    // A later part names a table this replica lacks, and the earlier parts
                    // are gone: the whole transaction is undone and left uncovered.
                    return self.not_kept(run.len());
                }
                let (mut applied, mut unchanged) = (0, 0);
                let mut row = None;
                for change in run {
                    if r.merge_one(change, &mut row)? {
                        applied += 1;
                    } else {
                        unchanged += 1;
                    }
                }
                r.flush_row(&mut row)?;
                self.count(|c| {
                    c.applied += applied;
                    c.unchanged += unchanged;
                });
            }
            Fate::Parked => {
                let (count, bytes) = match self.pending_use {
                    Some(u) => u,
                    None => pending_usage(&r.conn)?,
                };
                let size = run
                    .iter()
                    .fold(0i64, |n, c| n.saturating_add(pending_size(c)));
                let count = count.saturating_add(i64::try_from(run.len()).unwrap_or(i64::MAX));
                let bytes = bytes.saturating_add(size);
                if count > r.pending_caps.0 || bytes > r.pending_caps.1 {
                    // Not kept and not covered: a peer sends it again later.
                    return self.not_kept(run.len());
                }
                r.keep_pending(run)?;
                self.pending_use = Some((count, bytes));
                self.count(|c| c.pending += run.len());
            }
        }
        Ok(())
    }

    /// Adds to the open group's counts.
    fn count(&mut self, f: impl FnOnce(&mut ApplyReport)) {
        if let Some(g) = self.open.as_mut() {
            f(&mut g.counted);
        }
    }

    /// The open group is neither applied nor kept: what it wrote is undone.
    fn not_kept(&mut self, more: usize) -> Result<(), Error> {
        let Some(g) = self.open.as_mut() else {
            return Ok(());
        };
        let c = &g.counted;
        let seen = c.applied + c.unchanged + c.pending + c.pending_full + more;
        if seen > more {
            // Only a group that spans parts has written anything before this run.
            if !g.savepoint {
                return Err(Error::Corrupt(
                    "an origin transaction went on past its part without a savepoint".into(),
                ));
            }
            self.replica.conn.execute_batch("ROLLBACK TO fazt_group")?;
            // Sites registered since the savepoint are gone from the database.
            self.replica.reload_sites()?;
        }
        g.fate = Fate::NotKept;
        g.counted = ApplyReport {
            pending_full: seen,
            ..ApplyReport::default()
        };
        self.pending_use = g.pending_before;
        Ok(())
    }

    /// Closes the open origin transaction: its counts join the report.
    fn finish_group(&mut self) -> Result<(), Error> {
        let Some(g) = self.open.take() else {
            return Ok(());
        };
        if g.savepoint {
            self.replica.conn.execute_batch("RELEASE fazt_group")?;
        }
        match g.fate {
            Fate::Merged => {
                self.max_version = self.max_version.max(g.version);
                self.report.transactions += 1;
            }
            Fate::Parked | Fate::ParkedBefore | Fate::NotKept => {
                self.not_held
                    .entry(g.site)
                    .or_default()
                    .insert(g.version, g.version);
            }
            Fate::Held => {}
        }
        add_report(&mut self.report, &g.counted);
        Ok(())
    }

    fn record_covers(&mut self, covers: &Coverage, sender_clock: DbVersion) -> Result<(), Error> {
        let r = &mut *self.replica;
        // Lamport: the next local write is numbered after everything merged. What this
        // replica made itself is stored too: a merged change may just have replaced the
        // clock row that held its newest version (a database without `own_version`).
        let clock = self.max_version.max(self.clock_before);
        // Covers are believed up to this bound (see below), and the clock follows what
        // was believed, so that this replica never covers a version beyond its own clock.
        let bound = clock.max(sender_clock);
        let mut clock = clock;

        // A declared cover is believed only up to `bound`: the receiver's clock after the
        // merge, or the clock the sender declares (a peer's heads, a bundle's sender). An
        // honest sender covers version V of origin O only if it made or merged V, so its
        // clock is at least V: every honest cover is within its declared clock. The
        // receiver's own clock alone does not suffice: V's changes may have been superseded
        // everywhere by changes with a higher col_version but a lower db_version, and then
        // nothing that reaches the receiver carries V. A cover that claims versions beyond
        // every clock in sight — versions nobody has made yet, which would hide the
        // origin's later writes — is clipped, not refused: the rest of the batch is sound.
        // A sender that also declares a forged clock can only do what forging a change at
        // that version already does (raise clocks, up to MAX_VERSION).
        let parked = r.parked_versions()?;
        for (site, set) in &covers.0 {
            if *site == r.site_id {
                continue;
            }
            let mut set = set.within(DbVersion(1), bound);
            if let Some(p) = self.not_held.get(site) {
                set = set.minus(p);
            }
            if let Some(p) = parked.get(site) {
                set = set.minus(p);
            }
            if let Some(&(_, end)) = set.ranges().last() {
                clock = clock.max(end);
            }
            let mut merged = self.held.get(site).cloned().unwrap_or_default();
            merged.union(&set);
            if Some(&merged) != self.held.get(site) {
                let ord = r.ord_of(*site)?;
                Replica::save_coverage(&r.conn, ord, &merged)?;
            }
        }
        // A merge that wrote nothing and leaves the clock where it was stores nothing: the
        // clock derived from the file is still `clock_before`.
        if clock > self.clock_before || r.conn.total_changes() != self.changes_before {
            set_db_version(&r.conn, clock)?;
        }
        r.version_cache.set(None);
        Ok(())
    }

    fn rollback(&mut self) {
        if self.active {
            self.active = false;
            let _ = self.replica.conn.execute_batch("ROLLBACK");
            let _ = self.replica.reload_sites();
            self.replica.version_cache.set(None);
        }
    }
}

impl Drop for Merge<'_> {
    fn drop(&mut self) {
        self.rollback();
    }
}

/// Adds `r`'s counts to `total` (written if either wrote).
pub(crate) fn add_report(total: &mut ApplyReport, r: &ApplyReport) {
    total.written |= r.written;
    total.transactions += r.transactions;
    total.applied += r.applied;
    total.unchanged += r.unchanged;
    total.already_seen += r.already_seen;
    total.pending += r.pending;
    total.pending_full += r.pending_full;
}

impl Replica {
    /// The pending area's caps: (changes, bytes); [`MAX_PENDING_CHANGES`] and
    /// [`MAX_PENDING_BYTES`] unless set otherwise.
    pub fn pending_caps(&self) -> (i64, i64) {
        self.pending_caps
    }

    /// Sets this connection's pending-area caps (lower ones suit tests and small machines).
    pub fn set_pending_caps(&mut self, changes: i64, bytes: i64) {
        self.pending_caps = (changes, bytes);
    }

    /// What the pending area holds: (changes, bytes as counted against its byte cap).
    pub fn pending_usage(&self) -> Result<(i64, i64), Error> {
        Ok(pending_usage(&self.conn)?)
    }

    fn is_parked(&self, site: SiteId, version: DbVersion) -> Result<bool, Error> {
        let Some(ord) = self.known_ord(&site)? else {
            return Ok(false);
        };
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM fazt_sync_pending WHERE site_ord = ?1 AND db_version = ?2)",
            )?
            .query_row(rusqlite::params![ord, version], |r| r.get(0))?)
    }

    fn parked_versions(&self) -> Result<HashMap<SiteId, RangeSet>, Error> {
        let mut out: HashMap<SiteId, RangeSet> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT site_ord, db_version FROM fazt_sync_pending")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, DbVersion>(1)?)))?;
        for row in rows {
            let (ord, v) = row?;
            if let Some(site) = self.site_of(ord) {
                out.entry(site).or_default().insert(v, v);
            }
        }
        Ok(out)
    }

    fn resolvable(&self, c: &Change) -> bool {
        self.tables
            .get(&c.table)
            .is_some_and(|t| c.cid == ROW_CID || t.cid_of(&c.cid).is_some())
    }

    fn keep_pending(&mut self, group: &[Change]) -> Result<(), Error> {
        for c in group {
            let ord = self.ord_of(c.site_id)?;
            self.conn
                .prepare_cached(
                    "INSERT OR IGNORE INTO fazt_sync_pending
                     (site_ord, db_version, seq, tbl, pk, cid, val, col_version, cl)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?
                .execute(rusqlite::params![
                    ord,
                    c.db_version,
                    c.seq,
                    c.table,
                    c.pk,
                    c.cid,
                    c.val,
                    c.col_version,
                    c.cl
                ])?;
        }
        Ok(())
    }

    /// The prepared SQL of a table's merge path (built once per catalog change).
    fn merge_sql(&mut self, table: &str) -> Arc<MergeSql> {
        if self.merge_sql.0 != self.catalog_version {
            self.merge_sql = (self.catalog_version, HashMap::new());
        }
        if let Some(sql) = self.merge_sql.1.get(table) {
            return sql.clone();
        }
        let sql = Arc::new(MergeSql::new(&self.tables[table]));
        self.merge_sql.1.insert(table.to_string(), sql.clone());
        sql
    }

    /// Merges one change; returns whether anything changed. Winning column values are
    /// collected in `row` and written with one statement per row by [`Replica::flush_row`].
    fn merge_one<'a>(
        &mut self,
        c: &'a Change,
        row: &mut Option<RowState<'a>>,
    ) -> Result<bool, Error> {
        let ord = self.ord_of(c.site_id)?;
        let sql = self.merge_sql(&c.table);
        // Consecutive changes usually touch the same row: look it up once.
        let cached = row
            .as_ref()
            .is_some_and(|r| r.table == c.table && r.pk_bytes == c.pk);
        if !cached {
            self.flush_row(row)?;
            let pk =
                pack::unpack(&c.pk).map_err(|e| Error::Malformed(format!("{}: {e}", c.table)))?;
            if pk.len() != sql.pk_len {
                return Err(Error::Malformed(format!(
                    "{}: primary key has {} values, the table has {} key columns",
                    c.table,
                    pk.len(),
                    sql.pk_len
                )));
            }
            let (key, created) = row_key(&self.conn, &sql, &pk)?;
            let (mut cl, mut sentinel, mut fresh) = (CausalLength(0), None, true);
            if !created {
                // One look at the row's clocks: the sentinel (cid -1) sorts first, then any
                // column clock.
                let mut found: Option<(CausalLength, DbVersion, i64, Seq)> = None;
                let mut has_columns = false;
                {
                    let mut stmt = self.conn.prepare_cached(&sql.row_clocks)?;
                    let mut rows = stmt.query([key])?;
                    while let Some(r) = rows.next()? {
                        if r.get::<_, i64>(0)? == -1 {
                            found = Some((r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?));
                        } else {
                            has_columns = true;
                        }
                    }
                }
                fresh = !has_columns;
                match found {
                    Some((l, d, o, q)) => {
                        cl = l;
                        sentinel = Some((d, o, q));
                    }
                    // Column clocks without a sentinel: a live first incarnation.
                    None if has_columns => cl = CausalLength::FIRST,
                    None => {}
                }
            }
            *row = Some(RowState {
                sql: sql.clone(),
                table: &c.table,
                pk_bytes: &c.pk,
                pk,
                key,
                cl,
                sentinel,
                fresh,
                pending: Vec::new(),
                cids: Vec::new(),
                clocks: Vec::new(),
            });
        }
        let state = row.as_mut().expect("filled above");
        let key = state.key;
        if c.cl < state.cl {
            return Ok(false);
        }
        let conn = &self.conn;

        if c.cid == ROW_CID {
            if c.cl == state.cl {
                let (d, o, q) = state.sentinel.unwrap_or((DbVersion(0), -1, Seq(0)));
                let local: Origin = (site_of_ord(&self.sites, o), d, q);
                let incoming: Origin = (Some(c.site_id), c.db_version, c.seq);
                if incoming <= local {
                    return Ok(false);
                }
            } else {
                write_pending(conn, state)?;
                if !c.cl.is_live() {
                    delete_row(conn, &sql, &state.pk, key)?;
                } else {
                    reset_row(conn, &sql, &state.pk, key)?;
                }
                state.fresh = true;
            }
            conn.prepare_cached(&sql.sentinel_upsert)?
                .execute(rusqlite::params![key, c.cl, c.db_version, ord, c.seq])?;
            state.cl = c.cl;
            state.sentinel = Some((c.db_version, ord, c.seq));
            return Ok(true);
        }

        if !c.cl.is_live() {
            // A column value cannot belong to a deleted incarnation; nothing to merge.
            return Ok(false);
        }
        let column = sql.columns.get(&c.cid).expect("checked resolvable");
        let mut changed = false;
        if c.cl > state.cl {
            if state.cl == CausalLength(0) && c.cl == CausalLength::FIRST {
                // A first incarnation: the column clocks will say the row exists.
                state.cl = CausalLength::FIRST;
            } else {
                write_pending(conn, state)?;
                reset_row(conn, &sql, &state.pk, key)?;
                // Until the creation itself arrives, a placeholder that loses every tie.
                conn.prepare_cached(&sql.sentinel_upsert)?
                    .execute(rusqlite::params![key, c.cl, DbVersion(0), -1, Seq(0)])?;
                state.cl = c.cl;
                state.sentinel = Some((DbVersion(0), -1, Seq(0)));
                state.fresh = true;
            }
            changed = true;
        }
        let wins = state.fresh || {
            let local: Option<(ColVersion, i64)> = conn
                .prepare_cached(&sql.column_clock_select)?
                .query_row([key, column.cid], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            match local {
                None => true,
                Some((version, _)) if version != c.col_version => c.col_version > version,
                Some((_, local_ord)) => {
                    let current: Value = conn
                        .prepare_cached(&column.read)?
                        .query_row(params_from_iter(state.pk.iter()), |r| r.get(0))
                        .optional()?
                        .unwrap_or(Value::Null);
                    match c.val.merge_cmp(&current) {
                        Ordering::Greater => true,
                        Ordering::Less => false,
                        Ordering::Equal => Some(c.site_id) > site_of_ord(&self.sites, local_ord),
                    }
                }
            }
        };
        if !wins {
            return Ok(changed);
        }
        state.pending.push((column.cid, &c.val));
        state.clocks.push([
            key,
            column.cid,
            c.col_version.0,
            c.db_version.0,
            ord,
            c.seq.0,
        ]);
        Ok(true)
    }

    /// Writes the winning column values collected for a row.
    fn flush_row(&mut self, row: &mut Option<RowState<'_>>) -> Result<(), Error> {
        if let Some(state) = row.as_mut() {
            write_pending(&self.conn, state)?;
        }
        Ok(())
    }

    /// Applies pending changes whose tables and columns now exist.
    pub(crate) fn apply_pending(&mut self) -> Result<ApplyReport, Error> {
        let rows: Vec<(i64, Change)> = {
            let mut stmt = self.conn.prepare(
                "SELECT site_ord, db_version, seq, tbl, pk, cid, val, col_version, cl
                 FROM fazt_sync_pending ORDER BY site_ord, db_version, seq",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, DbVersion>(1)?,
                    r.get::<_, Seq>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Value>(6)?,
                    r.get::<_, ColVersion>(7)?,
                    r.get::<_, CausalLength>(8)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (ord, db_version, seq, table, pk, cid, val, col_version, cl) = row?;
                let site_id = self
                    .site_of(ord)
                    .ok_or_else(|| Error::Corrupt(format!("unknown site ordinal {ord}")))?;
                out.push((
                    ord,
                    Change {
                        table,
                        pk,
                        cid,
                        val,
                        col_version,
                        db_version,
                        site_id,
                        cl,
                        seq,
                    },
                ));
            }
            out
        };
        let mut groups: Vec<(i64, DbVersion, Vec<Change>)> = Vec::new();
        for (ord, change) in rows {
            match groups.last_mut() {
                Some((o, v, g)) if *o == ord && *v == change.db_version => g.push(change),
                _ => groups.push((ord, change.db_version, vec![change])),
            }
        }
        let mut batch = Batch::default();
        let mut ready = Vec::new();
        for (ord, version, group) in groups {
            if group.iter().all(|c| self.resolvable(c)) {
                batch.covers.insert(group[0].site_id, version, version);
                batch.changes.extend(group);
                ready.push((ord, version));
            }
        }
        if ready.is_empty() {
            return Ok(ApplyReport::default());
        }
        let mut merge = self.begin_merge()?;
        {
            let mut delete = merge.replica.conn.prepare_cached(
                "DELETE FROM fazt_sync_pending WHERE site_ord = ?1 AND db_version = ?2",
            )?;
            for (ord, version) in ready {
                delete.execute(rusqlite::params![ord, version])?;
            }
        }
        merge.merge_changes(&batch.changes, false)?;
        merge.commit(&batch.covers, DbVersion(0))
    }
}

/// The row a run of changes is about, looked up once.
pub(crate) struct RowState<'a> {
    sql: Arc<MergeSql>,
    table: &'a str,
    pk_bytes: &'a [u8],
    pk: Vec<Value>,
    key: i64,
    /// The row's causal length here (1 when implied by column clocks).
    cl: CausalLength,
    /// (db_version, site ordinal, seq) of the sentinel, if the row has one.
    sentinel: Option<(DbVersion, i64, Seq)>,
    /// No column clocks exist for the row: every column change wins without a lookup.
    fresh: bool,
    /// Winning values not yet written to the row: (cid, value).
    pending: Vec<(i64, &'a Value)>,
    /// Scratch space for the written column ids (a cache key).
    cids: Vec<i64>,
    /// Their clock rows: (key, cid, col_version, db_version, site ordinal, seq).
    clocks: Vec<[i64; 6]>,
}

/// Writes a row's collected column values with one upsert.
fn write_pending(conn: &rusqlite::Connection, state: &mut RowState<'_>) -> Result<(), Error> {
    if state.pending.is_empty() {
        return Ok(());
    }
    state.cids.clear();
    state.cids.extend(state.pending.iter().map(|(cid, _)| *cid));
    let mut upserts = state.sql.upserts.lock().unwrap_or_else(|e| e.into_inner());
    if !upserts.contains_key(&state.cids[..]) {
        let names: Vec<String> = state
            .cids
            .iter()
            .map(|cid| {
                quote(
                    &state
                        .sql
                        .columns
                        .values()
                        .find(|c| c.cid == *cid)
                        .expect("known column")
                        .name,
                )
            })
            .collect();
        let n = state.pk.len() + names.len();
        let placeholders = (1..=n)
            .map(|i| format!("?{i}"))
            .collect::<Vec<_>>()
            .join(", ");
        let set = names
            .iter()
            .map(|c| format!("{c} = excluded.{c}"))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "INSERT INTO {} ({}, {}) VALUES ({placeholders}) ON CONFLICT ({}) DO UPDATE SET {set}",
            state.sql.table,
            state.sql.pk_cols,
            names.join(", "),
            state.sql.pk_cols
        );
        upserts.insert(state.cids.clone(), sql);
    }
    conn.prepare_cached(&upserts[&state.cids[..]])?
        .execute(params_from_iter(
            state.pk.iter().chain(state.pending.iter().map(|(_, v)| *v)),
        ))?;
    drop(upserts);
    state.pending.clear();
    // The clock rows, in one statement.
    let n = state.clocks.len();
    let mut inserts = state
        .sql
        .clock_inserts
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let clock_sql = inserts.entry(n).or_insert_with(|| {
        let rows = (0..n)
            .map(|i| {
                format!(
                    "(?{}, ?{}, ?{}, ?{}, ?{}, ?{})",
                    6 * i + 1,
                    6 * i + 2,
                    6 * i + 3,
                    6 * i + 4,
                    6 * i + 5,
                    6 * i + 6
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "INSERT INTO {} (key, cid, col_version, db_version, site_ord, seq) VALUES {rows}
             ON CONFLICT (key, cid) DO UPDATE SET col_version = excluded.col_version,
               db_version = excluded.db_version, site_ord = excluded.site_ord, seq = excluded.seq",
            state.sql.clock
        )
    });
    conn.prepare_cached(clock_sql)?
        .execute(params_from_iter(state.clocks.iter().flatten()))?;
    drop(inserts);
    state.clocks.clear();
    Ok(())
}

fn site_of_ord(sites: &[Option<SiteId>], ord: i64) -> Option<SiteId> {
    usize::try_from(ord)
        .ok()
        .and_then(|i| sites.get(i).copied().flatten())
}

/// A column's statements: read its value, write it (creating the row if needed).
pub(crate) struct ColumnSql {
    cid: i64,
    name: String,
    read: String,
}

/// Every statement the merge path runs against one table, built once.
pub(crate) struct MergeSql {
    /// The row key is the INTEGER PRIMARY KEY itself (no key table).
    rowid_key: bool,
    /// The quoted table name and its quoted key columns.
    table: String,
    pk_cols: String,
    pk_len: usize,
    /// The clock table (quoted).
    clock: String,
    /// The sentinel first, then at most one column clock, of one row.
    row_clocks: String,
    /// Row upserts by the column ids they write.
    upserts: Mutex<HashMap<Vec<i64>, String>>,
    /// Multi-row clock inserts by row count.
    clock_inserts: Mutex<HashMap<usize, String>>,
    key_select: String,
    key_insert: String,
    sentinel_upsert: String,
    delete_base: String,
    delete_column_clocks: String,
    insert_pk_only: String,
    column_clock_select: String,
    columns: HashMap<String, ColumnSql>,
}

impl MergeSql {
    fn new(t: &TableInfo) -> MergeSql {
        let table = quote(&t.name);
        let pks = t.pks_table();
        let clock = t.clock_table();
        let pk_where = t.pk_params("", 1);
        let placeholders = |n: usize| {
            (1..=n)
                .map(|i| format!("?{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let n = t.pk.len();
        let upsert = |cid: &str| {
            format!(
                "INSERT INTO {clock} (key, cid, col_version, db_version, site_ord, seq) VALUES ({cid})
                 ON CONFLICT (key, cid) DO UPDATE SET col_version = excluded.col_version,
                   db_version = excluded.db_version, site_ord = excluded.site_ord, seq = excluded.seq"
            )
        };
        MergeSql {
            rowid_key: t.rowid_key,
            table: table.clone(),
            pk_cols: t.pk_list(""),
            pk_len: n,
            clock: clock.clone(),
            upserts: Mutex::new(HashMap::new()),
            clock_inserts: Mutex::new(HashMap::new()),
            row_clocks: format!(
                "SELECT cid, col_version, db_version, site_ord, seq FROM {clock} WHERE key = ?1 ORDER BY cid LIMIT 2"
            ),
            key_select: format!("SELECT __fazt_key FROM {pks} WHERE {pk_where}"),
            key_insert: format!("INSERT INTO {pks} ({}) VALUES ({})", t.pk_list(""), placeholders(n)),
            sentinel_upsert: upsert("?1, -1, ?2, ?3, ?4, ?5"),
            delete_base: format!("DELETE FROM {table} WHERE {pk_where}"),
            delete_column_clocks: format!("DELETE FROM {clock} WHERE key = ?1 AND cid >= 0"),
            insert_pk_only: format!("INSERT INTO {table} ({}) VALUES ({})", t.pk_list(""), placeholders(n)),
            column_clock_select: format!("SELECT col_version, site_ord FROM {clock} WHERE key = ?1 AND cid = ?2"),
            columns: t
                .columns
                .iter()
                .map(|(cid, name)| {
                    let c = quote(name);
                    (
                        name.clone(),
                        ColumnSql {
                            cid: *cid,
                            name: name.clone(),
                            read: format!("SELECT {c} FROM {table} WHERE {pk_where}"),
                        },
                    )
                })
                .collect(),
        }
    }
}

/// The small integer key of a primary key, created on first sight (then `true`).
fn row_key(
    conn: &rusqlite::Connection,
    sql: &MergeSql,
    pk: &[Value],
) -> Result<(i64, bool), Error> {
    if sql.rowid_key {
        return match pk {
            [Value::Integer(key)] => Ok((*key, false)),
            _ => Err(Error::Malformed(
                "the key of an INTEGER PRIMARY KEY table is not an integer".into(),
            )),
        };
    }
    let found: Option<i64> = conn
        .prepare_cached(&sql.key_select)?
        .query_row(params_from_iter(pk.iter()), |r| r.get(0))
        .optional()?;
    if let Some(key) = found {
        return Ok((key, false));
    }
    conn.prepare_cached(&sql.key_insert)?
        .execute(params_from_iter(pk.iter()))?;
    Ok((conn.last_insert_rowid(), true))
}

fn delete_row(
    conn: &rusqlite::Connection,
    sql: &MergeSql,
    pk: &[Value],
    key: i64,
) -> Result<(), Error> {
    conn.prepare_cached(&sql.delete_base)?
        .execute(params_from_iter(pk.iter()))?;
    conn.prepare_cached(&sql.delete_column_clocks)?
        .execute([key])?;
    Ok(())
}

/// Starts a new incarnation of a row: defaults everywhere, no column clocks.
fn reset_row(
    conn: &rusqlite::Connection,
    sql: &MergeSql,
    pk: &[Value],
    key: i64,
) -> Result<(), Error> {
    delete_row(conn, sql, pk, key)?;
    conn.prepare_cached(&sql.insert_pk_only)?
        .execute(params_from_iter(pk.iter()))?;
    Ok(())
}
