//! Change rows and exporting them.
//!
//! A change is shaped like a row of cr-sqlite's `crsql_changes`: the table, the packed
//! primary key, the column name (`-1` for the row's existence), the column's current value,
//! its column version, the db_version and site of the write that produced it (its origin),
//! the row's causal length, and the write's position in its origin transaction.

use crate::clock::{CausalLength, ColVersion, DbVersion, Seq};
use crate::coverage::{Coverage, SiteId};
use crate::crr::quote;
use crate::replica::Replica;
use crate::value::Value;
use crate::Error;

/// The column id of a row's existence (its causal length), as in cr-sqlite.
pub const ROW_CID: &str = "-1";

/// One change row, shaped like a row of cr-sqlite's `crsql_changes`.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The replicated table.
    pub table: String,
    /// The row's primary key, packed ([`crate::pack`]).
    pub pk: Vec<u8>,
    /// The column's name, or [`ROW_CID`] for the row's existence.
    pub cid: String,
    /// The column's value (NULL for the row's existence).
    pub val: Value,
    /// How many times the column was written in this incarnation of the row.
    pub col_version: ColVersion,
    /// The origin's db_version of the write that produced this change.
    pub db_version: DbVersion,
    /// The origin: the replica that made the write.
    pub site_id: SiteId,
    /// The row's causal length: odd while it exists, even once deleted.
    pub cl: CausalLength,
    /// The write's position in its origin transaction.
    pub seq: Seq,
}

/// What [`Replica::export_groups`] hands out, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Exported {
    /// The next change.
    Change(Change),
    /// The changes handed out since the previous group complete these versions.
    Group(Coverage),
}

/// Changes plus the coverage they complete: applying them gives the receiver everything the
/// sender held for those (origin, version) ranges.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// The changes, origin transaction by origin transaction.
    pub changes: Vec<Change>,
    /// The (origin, version) ranges these changes complete.
    pub covers: Coverage,
    /// The sender's Lamport clock as it declares it (0: not declared). Covers are believed
    /// only up to the receiver's clock after the merge, or this; see `docs/sync-protocol.md`.
    pub sender_clock: DbVersion,
}

impl Replica {
    /// Streams every change the holder of `have` lacks, origin by origin and, within an
    /// origin, in (db_version, seq) order, so each origin transaction arrives whole and in
    /// order. Returns the coverage the streamed changes complete.
    ///
    /// Reads happen in one read transaction: the changes and the coverage are consistent
    /// even while other connections write.
    pub fn changes_since(
        &self,
        have: &Coverage,
        mut sink: impl FnMut(Change) -> Result<(), Error>,
    ) -> Result<Coverage, Error> {
        self.export_groups(have, usize::MAX, |e| match e {
            Exported::Change(c) => sink(c),
            Exported::Group(_) => Ok(()),
        })
    }

    /// Like [`Replica::changes_since`], cut into groups of whole origin transactions: after
    /// at least `group_changes` changes, the next transaction boundary emits
    /// [`Exported::Group`] with exactly the versions the changes since the previous group
    /// complete (versions whose changes were all superseded included). Applying each group
    /// as one batch, in order, gives the receiver everything; stopping between groups leaves
    /// it with whole transactions and accurate coverage.
    ///
    /// An error from `sink` stops the export and is returned as it is: its type is the
    /// caller's, so a caller that stops for its own reasons (its peer went away) says so in
    /// its own words rather than in the engine's.
    pub fn export_groups<E: From<Error>>(
        &self,
        have: &Coverage,
        group_changes: usize,
        mut sink: impl FnMut(Exported) -> Result<(), E>,
    ) -> Result<Coverage, E> {
        let tx = self.conn.unchecked_transaction().map_err(Error::from)?;
        let need = self.coverage()?.minus(have);
        let mut done = Coverage::default();
        let mut count = 0usize;
        let sql = (!self.tables.is_empty()).then(|| self.export_sql());
        let mut stmt = match &sql {
            Some(sql) => Some(tx.prepare_cached(sql).map_err(Error::from)?),
            None => None,
        };
        for (site, ranges) in &need.0 {
            // Versions of this site from `mark` on have not been handed out in a group yet.
            let mut mark = DbVersion(i64::MIN);
            let mut last_version = None;
            if let (Some(stmt), Some(ord)) = (stmt.as_mut(), self.known_ord(site)?) {
                for &(lo, hi) in ranges.ranges() {
                    let mut rows = stmt
                        .query(rusqlite::params![ord, lo, hi])
                        .map_err(Error::from)?;
                    while let Some(row) = rows.next().map_err(Error::from)? {
                        let db_version: DbVersion = row.get(5).map_err(Error::from)?;
                        if count >= group_changes && last_version.is_some_and(|v| v != db_version) {
                            done.0
                                .entry(*site)
                                .or_default()
                                .union(&ranges.within(mark, db_version.prev()));
                            sink(Exported::Group(std::mem::take(&mut done)))?;
                            count = 0;
                            mark = db_version;
                        }
                        last_version = Some(db_version);
                        count += 1;
                        sink(Exported::Change(change_at(row, *site, db_version)?))?;
                    }
                }
            }
            let rest = ranges.within(mark, DbVersion(i64::MAX));
            if !rest.is_empty() {
                done.0.entry(*site).or_default().union(&rest);
            }
        }
        if !done.0.is_empty() {
            sink(Exported::Group(done))?;
        }
        drop(stmt);
        tx.commit().map_err(Error::from)?;
        Ok(need)
    }

    /// Collects [`Replica::changes_since`] into a batch.
    pub fn batch_since(&self, have: &Coverage) -> Result<Batch, Error> {
        let mut changes = Vec::new();
        let covers = self.changes_since(have, |c| {
            changes.push(c);
            Ok(())
        })?;
        Ok(Batch {
            changes,
            covers,
            sender_clock: self.db_version()?,
        })
    }

    /// One query over every replicated table: clock rows of one origin within a version
    /// range, with the packed key, the column's name and current value, and the causal length.
    fn export_sql(&self) -> String {
        let mut names: Vec<&String> = self.tables.keys().collect();
        names.sort();
        let parts: Vec<String> = names
            .into_iter()
            .map(|name| {
                let t = &self.tables[name];
                let cid_name = t
                    .columns
                    .iter()
                    .map(|(cid, n)| format!("WHEN {cid} THEN '{}'", n.replace('\'', "''")))
                    .collect::<String>();
                let val = t
                    .columns
                    .iter()
                    .map(|(cid, n)| format!("WHEN {cid} THEN b.{}", quote(n)))
                    .collect::<String>();
                let (cid_expr, val_expr) = if t.columns.is_empty() {
                    ("'-1'".to_string(), "NULL".to_string())
                } else {
                    (
                        format!("CASE c.cid WHEN -1 THEN '-1' {cid_name} END"),
                        format!("CASE c.cid {val} ELSE NULL END"),
                    )
                };
                let (pk, from) = if t.rowid_key {
                    (
                        "fazt_sync_pack(c.key)".to_string(),
                        format!(
                            "{clock} c LEFT JOIN {clock} s ON s.key = c.key AND s.cid = -1
                             LEFT JOIN {base} b ON b.{col} = c.key",
                            clock = t.clock_table(),
                            base = quote(name),
                            col = quote(&t.pk[0]),
                        ),
                    )
                } else {
                    (
                        format!("fazt_sync_pack({})", t.pk_list("p.")),
                        format!(
                            "{clock} c JOIN {pks} p ON p.__fazt_key = c.key
                             LEFT JOIN {clock} s ON s.key = c.key AND s.cid = -1
                             LEFT JOIN {base} b ON {m}",
                            clock = t.clock_table(),
                            pks = t.pks_table(),
                            base = quote(name),
                            m = t.pk_match("b.", "p."),
                        ),
                    )
                };
                format!(
                    "SELECT '{tname}' AS tbl, {pk} AS pk, {cid_expr} AS cid, {val_expr} AS val,
                            c.col_version, c.db_version, coalesce(s.col_version, 1) AS cl, c.seq
                     FROM {from}
                     WHERE c.site_ord = ?1 AND c.db_version BETWEEN ?2 AND ?3",
                    tname = name.replace('\'', "''"),
                )
            })
            .collect();
        format!("{} ORDER BY 6, 8", parts.join(" UNION ALL "))
    }
}

/// The change an export row describes (the columns of [`Replica::export_sql`]).
fn change_at(
    row: &rusqlite::Row<'_>,
    site: SiteId,
    db_version: DbVersion,
) -> Result<Change, Error> {
    Ok(Change {
        table: row.get(0)?,
        pk: row.get(1)?,
        cid: row.get(2)?,
        val: row.get(3)?,
        col_version: row.get(4)?,
        db_version,
        site_id: site,
        cl: row.get(6)?,
        seq: row.get(7)?,
    })
}

impl Replica {
    /// The current value of one cell, addressed as changes address it (table, packed primary
    /// key, column name); None when the table, column or row does not exist here.
    pub fn cell(&self, table: &str, pk: &[u8], cid: &str) -> Result<Option<Value>, Error> {
        use rusqlite::OptionalExtension;
        let Some(info) = self.tables.get(table) else {
            return Ok(None);
        };
        if info.cid_of(cid).is_none() {
            return Ok(None);
        }
        let key = crate::pack::unpack(pk).map_err(|e| Error::Malformed(format!("{table}: {e}")))?;
        if key.len() != info.pk.len() {
            return Ok(None);
        }
        let filter: Vec<String> = info
            .pk
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{} = ?{}", quote(c), i + 1))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            quote(cid),
            quote(table),
            filter.join(" AND ")
        );
        let mut stmt = self.conn.prepare_cached(&sql)?;
        Ok(stmt
            .query_row(rusqlite::params_from_iter(key.iter()), |r| {
                r.get::<_, Value>(0)
            })
            .optional()?)
    }
}
