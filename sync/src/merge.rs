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
use crate::coverage::{RangeSet, SiteId};
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

/// Refuses a batch carrying a number beyond [`fazt_proto::wire::MAX_VERSION`] or below its
/// valid minimum, before anything is applied.
fn check_bounds(batch: &Batch) -> Result<(), Error> {
    for c in &batch.changes {
        if let Err(field) =
            fazt_proto::wire::check_change_numbers(c.db_version, c.seq, c.col_version, c.cl)
        {
            return Err(Error::Malformed(format!(
                "{} of a change of origin {} in table {} is out of range (1..=2^53): the batch was refused and nothing applied; the sender is damaged or hostile",
                field,
                c.site_id,
                c.table
            )));
        }
    }
    for (site, set) in &batch.covers.0 {
        if let (Some(&(start, _)), Some(&(_, end))) = (set.ranges().first(), set.ranges().last()) {
            if start < 1 || end > fazt_proto::wire::MAX_VERSION {
                return Err(Error::Malformed(format!(
                    "the versions covered of origin {site} are out of range (1..=2^53): the batch was refused and nothing applied; the sender is damaged or hostile"
                )));
            }
        }
    }
    Ok(())
}

/// Application code that runs inside every merge's transaction, with capture off (it must
/// not write replicated tables): `before` sees the batch and the rows as they were, `after`
/// the rows as the merge left them. An error rolls the whole merge back. The node uses it to
/// keep the bytes of content a peer deleted while this node still references it.
pub trait MergeHook: Send + Sync {
    fn before(&self, conn: &Connection, batch: &Batch) -> rusqlite::Result<()>;
    fn after(&self, conn: &Connection) -> rusqlite::Result<()>;
}

/// A clock row's origin for tie-breaks: (site id, db_version, seq); a placeholder (a row
/// brought into existence by a column change before its creation arrived) sorts first.
type Origin = (Option<SiteId>, i64, i64);

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
        // Inside the write transaction, the catalog and site list catch up with other
        // connections before anything is decided from them.
        let result = self.in_merge_transaction(|this| {
            this.refresh()?;
            let hook = this.merge_hook.clone();
            if let Some(hook) = &hook {
                hook.before(&this.conn, batch)?;
            }
            let report = this.merge_batch(batch)?;
            if let Some(hook) = &hook {
                hook.after(&this.conn)?;
            }
            then(&this.conn)?;
            Ok(report)
        });
        if result.is_err() {
            self.reload_sites()?;
        }
        result
    }

    /// Installs the [`MergeHook`] every later merge on this connection runs.
    pub fn set_merge_hook(&mut self, hook: Arc<dyn MergeHook>) {
        self.merge_hook = Some(hook);
    }

    /// Runs `f` in one IMMEDIATE transaction with capture off; commits on Ok.
    fn in_merge_transaction<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        let capture = self.capture.clone();
        let merging = capture.merging();
        let result = f(self);
        drop(merging);
        match result {
            Ok(value) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(value)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    fn merge_batch(&mut self, batch: &Batch) -> Result<ApplyReport, Error> {
        check_bounds(batch)?;
        let own_version = self.db_version()?;
        let held = self.coverage()?;
        self.has_pending = self
            .conn
            .prepare_cached("SELECT EXISTS (SELECT 1 FROM fazt_sync_pending)")?
            .query_row([], |r| r.get(0))?;
        let mut report = ApplyReport::default();
        // Versions of this batch not held after it: parked, or refused by a full pending area.
        let mut not_held: HashMap<SiteId, RangeSet> = HashMap::new();
        // What the pending area holds (changes, bytes), read when first needed.
        let mut pending_use: Option<(i64, i64)> = None;
        // The highest version merged here. Groups already held or only parked do not count:
        // a parked change is not held, and its version must not move the clock.
        let mut max_version = 0;

        let mut start = 0;
        while start < batch.changes.len() {
            let (site, version) = (
                batch.changes[start].site_id,
                batch.changes[start].db_version,
            );
            let end = start
                + batch.changes[start..]
                    .iter()
                    .take_while(|c| c.site_id == site && c.db_version == version)
                    .count();
            let group = &batch.changes[start..end];
            start = end;
            if held.contains(&site, version) {
                report.already_seen += group.len();
                continue;
            }
            if group.iter().any(|c| !self.resolvable(c)) {
                not_held.entry(site).or_default().insert(version, version);
                if self.has_pending && self.is_parked(site, version)? {
                    // Kept already (an earlier batch brought it).
                    report.pending += group.len();
                    continue;
                }
                let (count, bytes) = match pending_use {
                    Some(u) => u,
                    None => {
                        let u = pending_usage(&self.conn)?;
                        pending_use = Some(u);
                        u
                    }
                };
                let size = group
                    .iter()
                    .fold(0i64, |n, c| n.saturating_add(pending_size(c)));
                let count = count.saturating_add(i64::try_from(group.len()).unwrap_or(i64::MAX));
                let bytes = bytes.saturating_add(size);
                if count > self.pending_caps.0 || bytes > self.pending_caps.1 {
                    // Not kept and not covered: a peer sends it again later.
                    report.pending_full += group.len();
                    continue;
                }
                self.keep_pending(group)?;
                pending_use = Some((count, bytes));
                report.pending += group.len();
                continue;
            }
            max_version = max_version.max(version);
            let mut row = None;
            for change in group {
                if self.merge_one(change, &mut row)? {
                    report.applied += 1;
                } else {
                    report.unchanged += 1;
                }
            }
            self.flush_row(&mut row)?;
            // A copy parked earlier (before this replica had the table) is now applied.
            if self.has_pending {
                let ord = self.ord_of(site)?;
                self.conn
                    .prepare_cached(
                        "DELETE FROM fazt_sync_pending WHERE site_ord = ?1 AND db_version = ?2",
                    )?
                    .execute([ord, version])?;
            }
            report.transactions += 1;
        }

        // Lamport: the next local write is numbered after everything merged. What this
        // replica made itself is stored too: a merged change may just have replaced the
        // clock row that held its newest version.
        let clock = max_version.max(own_version);
        // Covers are believed up to this bound (see below), and the clock follows what
        // was believed, so that this replica never covers a version beyond its own clock.
        let bound = clock.max(batch.sender_clock);
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
        let parked = self.parked_versions()?;
        for (site, set) in &batch.covers.0 {
            if *site == self.site_id {
                continue;
            }
            let mut set = set.within(1, bound);
            if let Some(p) = not_held.get(site) {
                set = set.minus(p);
            }
            if let Some(p) = parked.get(site) {
                set = set.minus(p);
            }
            if let Some(&(_, end)) = set.ranges().last() {
                clock = clock.max(end);
            }
            let mut merged = held.get(site).cloned().unwrap_or_default();
            merged.union(&set);
            if Some(&merged) != held.get(site) {
                let ord = self.ord_of(*site)?;
                Replica::save_coverage(&self.conn, ord, &merged)?;
            }
        }
        set_db_version(&self.conn, clock)?;
        self.version_cache.set(None);
        Ok(report)
    }

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

    fn is_parked(&self, site: SiteId, version: i64) -> Result<bool, Error> {
        let Some(ord) = self.known_ord(&site)? else {
            return Ok(false);
        };
        Ok(self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM fazt_sync_pending WHERE site_ord = ?1 AND db_version = ?2)",
            )?
            .query_row([ord, version], |r| r.get(0))?)
    }

    fn parked_versions(&self) -> Result<HashMap<SiteId, RangeSet>, Error> {
        let mut out: HashMap<SiteId, RangeSet> = HashMap::new();
        let mut stmt = self
            .conn
            .prepare_cached("SELECT DISTINCT site_ord, db_version FROM fazt_sync_pending")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)))?;
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
            let (mut cl, mut sentinel, mut fresh) = (0, None, true);
            if !created {
                // One look at the row's clocks: the sentinel (cid -1) sorts first, then any
                // column clock.
                let mut found: Option<(i64, i64, i64, i64)> = None;
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
                    None if has_columns => cl = 1,
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
                let (d, o, q) = state.sentinel.unwrap_or((0, -1, 0));
                let local: Origin = (site_of_ord(&self.sites, o), d, q);
                let incoming: Origin = (Some(c.site_id), c.db_version, c.seq);
                if incoming <= local {
                    return Ok(false);
                }
            } else {
                write_pending(conn, state)?;
                if c.cl % 2 == 0 {
                    delete_row(conn, &sql, &state.pk, key)?;
                } else {
                    reset_row(conn, &sql, &state.pk, key)?;
                }
                state.fresh = true;
            }
            conn.prepare_cached(&sql.sentinel_upsert)?.execute([
                key,
                c.cl,
                c.db_version,
                ord,
                c.seq,
            ])?;
            state.cl = c.cl;
            state.sentinel = Some((c.db_version, ord, c.seq));
            return Ok(true);
        }

        if c.cl % 2 == 0 {
            // A column value cannot belong to a deleted incarnation; nothing to merge.
            return Ok(false);
        }
        let column = sql.columns.get(&c.cid).expect("checked resolvable");
        let mut changed = false;
        if c.cl > state.cl {
            if state.cl == 0 && c.cl == 1 {
                // A first incarnation: the column clocks will say the row exists.
                state.cl = 1;
            } else {
                write_pending(conn, state)?;
                reset_row(conn, &sql, &state.pk, key)?;
                // Until the creation itself arrives, a placeholder that loses every tie.
                conn.prepare_cached(&sql.sentinel_upsert)?
                    .execute([key, c.cl, 0, -1, 0])?;
                state.cl = c.cl;
                state.sentinel = Some((0, -1, 0));
                state.fresh = true;
            }
            changed = true;
        }
        let wins = state.fresh || {
            let local: Option<(i64, i64)> = conn
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
        state
            .clocks
            .push([key, column.cid, c.col_version, c.db_version, ord, c.seq]);
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
                    r.get::<_, i64>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Vec<u8>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, Value>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
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
        let mut groups: Vec<(i64, i64, Vec<Change>)> = Vec::new();
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
        let result = self.in_merge_transaction(|this| {
            let mut delete = this.conn.prepare_cached(
                "DELETE FROM fazt_sync_pending WHERE site_ord = ?1 AND db_version = ?2",
            )?;
            for (ord, version) in ready {
                delete.execute([ord, version])?;
            }
            drop(delete);
            this.merge_batch(&batch)
        });
        if result.is_err() {
            self.reload_sites()?;
        }
        let report = result?;
        Ok(report)
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
    cl: i64,
    /// (db_version, site ordinal, seq) of the sentinel, if the row has one.
    sentinel: Option<(i64, i64, i64)>,
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
