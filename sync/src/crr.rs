//! Turning a table into a conflict-free replicated table (CRR).
//!
//! Next to table `t` the engine keeps:
//! - `t__fazt_pks (__fazt_key INTEGER PRIMARY KEY, <pk columns>)`: a small integer per primary key
//!   ever seen, deleted rows included (their tombstones must outlive them);
//! - `t__fazt_clock (key, cid, col_version, db_version, site_ord, seq)`: one row per live
//!   (row, column) with the version of its last write and that write's origin, plus a
//!   sentinel row (`cid = -1`) whose `col_version` is the row's causal length: odd while the
//!   row exists, even once deleted. A live row in its first incarnation has no sentinel
//!   (its column clocks imply causal length 1), unless the table has no other columns. Column ids are small integers mapped to names in
//!   `fazt_sync_columns`; the names are what travel.
//! - AFTER INSERT/UPDATE/DELETE triggers that record local writes. They stamp changes with
//!   `fazt_sync_db_version()` and `fazt_sync_seq()`, which refuse to answer outside
//!   `Replica::write`; during merges `fazt_sync_capturing()` turns them off.

use std::collections::HashMap;

use rusqlite::Connection;

use crate::replica::Replica;
use crate::Error;

/// The catalog entry of one replicated table.
#[derive(Debug, Clone)]
pub(crate) struct TableInfo {
    pub(crate) name: String,
    /// Primary-key column names, in primary-key order.
    pub(crate) pk: Vec<String>,
    /// Non-key columns: (cid, name).
    pub(crate) columns: Vec<(i64, String)>,
    /// The key is one `INTEGER PRIMARY KEY` (the rowid): its value is the clock's row key
    /// and no key table is needed.
    pub(crate) rowid_key: bool,
}

impl TableInfo {
    pub(crate) fn cid_of(&self, name: &str) -> Option<i64> {
        self.columns
            .iter()
            .find(|(_, n)| n == name)
            .map(|(cid, _)| *cid)
    }

    /// SQL for the clock's row key of the row `row` (`NEW.`, `OLD.`, `src.`).
    pub(crate) fn key_of(&self, row: &str) -> String {
        if self.rowid_key {
            format!("{row}{}", quote(&self.pk[0]))
        } else {
            format!(
                "(SELECT __fazt_key FROM {} WHERE {})",
                self.pks_table(),
                self.pk_match("", row)
            )
        }
    }

    pub(crate) fn pks_table(&self) -> String {
        quote(&format!("{}__fazt_pks", self.name))
    }

    pub(crate) fn clock_table(&self) -> String {
        quote(&format!("{}__fazt_clock", self.name))
    }

    /// `"a" = <prefix>"a" AND "b" = <prefix>"b"` over the primary key.
    pub(crate) fn pk_match(&self, left: &str, right: &str) -> String {
        self.pk
            .iter()
            .map(|c| format!("{left}{q} = {right}{q}", q = quote(c)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `"a" = ?1 AND "b" = ?2` (parameters numbered from `first`).
    pub(crate) fn pk_params(&self, prefix: &str, first: usize) -> String {
        self.pk
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{prefix}{} = ?{}", quote(c), first + i))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    pub(crate) fn pk_list(&self, prefix: &str) -> String {
        self.pk
            .iter()
            .map(|c| format!("{prefix}{}", quote(c)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Whether `pk` is a single `INTEGER PRIMARY KEY` of a rowid table (an alias of the rowid,
/// so its values are always integers).
fn is_rowid_key(conn: &Connection, table: &str, pk: &[String]) -> Result<bool, Error> {
    if pk.len() != 1 {
        return Ok(false);
    }
    let ty: String = conn.query_row(
        "SELECT upper(type) FROM pragma_table_info(?1) WHERE name = ?2",
        [table, &pk[0]],
        |r| r.get(0),
    )?;
    let without_rowid: bool = conn.query_row(
        "SELECT wr FROM pragma_table_list WHERE name = ?1 AND schema = 'main'",
        [table],
        |r| r.get(0),
    )?;
    Ok(ty == "INTEGER" && !without_rowid)
}

/// Quotes an identifier for SQL.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

pub(crate) fn load_catalog(conn: &Connection) -> Result<HashMap<String, TableInfo>, Error> {
    let mut stmt =
        conn.prepare("SELECT tbl, cid, name, pk FROM fazt_sync_columns ORDER BY tbl, pk, cid")?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut tables: HashMap<String, TableInfo> = HashMap::new();
    let mut pks: HashMap<String, Vec<(i64, String)>> = HashMap::new();
    for row in rows {
        let (tbl, cid, name, pk) = row?;
        let info = tables.entry(tbl.clone()).or_insert_with(|| TableInfo {
            name: tbl.clone(),
            pk: Vec::new(),
            columns: Vec::new(),
            rowid_key: false,
        });
        if pk > 0 {
            pks.entry(tbl).or_default().push((pk, name));
        } else {
            info.columns.push((cid, name));
        }
    }
    for (tbl, mut cols) in pks {
        cols.sort();
        if let Some(info) = tables.get_mut(&tbl) {
            info.pk = cols.into_iter().map(|(_, n)| n).collect();
            info.rowid_key = is_rowid_key(conn, &tbl, &info.pk)?;
        }
    }
    Ok(tables)
}

impl Replica {
    /// Registers `table` as a replicated table (or refreshes it after `ALTER TABLE ... ADD
    /// COLUMN`): checks the replication rules, creates its clock and key tables and its
    /// triggers, records existing rows as changes of this replica, and applies pending
    /// changes that were waiting for this table or its new columns.
    ///
    /// Refuses the engine's own tables, and a first registration while another object already
    /// has one of the names the engine would give the table's bookkeeping.
    pub fn replicate(&mut self, table: &str) -> Result<(), Error> {
        crate::schema::check_replicable(&self.conn, table)?;
        if !self.tables.contains_key(table) {
            crate::schema::check_names_free(&self.conn, table)?;
        }
        let columns: Vec<(String, i64)> = self
            .conn
            .prepare("SELECT name, pk FROM pragma_table_info(?1) ORDER BY cid")?
            .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        let mut pk: Vec<(i64, String)> = columns
            .iter()
            .filter(|(_, p)| *p > 0)
            .map(|(n, p)| (*p, n.clone()))
            .collect();
        pk.sort();
        let pk: Vec<String> = pk.into_iter().map(|(_, n)| n).collect();

        let previous = self.tables.get(table).cloned();
        if let Some(prev) = &previous {
            if prev.pk != pk {
                return Err(Error::Schema(format!(
                    "the primary key of {table} changed ({} -> {}): a replicated table's primary key cannot change",
                    prev.pk.join(", "),
                    pk.join(", ")
                )));
            }
        }
        let rowid_key = is_rowid_key(&self.conn, table, &pk)?;
        let mut info = previous.unwrap_or(TableInfo {
            name: table.to_string(),
            pk: pk.clone(),
            columns: Vec::new(),
            rowid_key,
        });
        info.rowid_key = rowid_key;
        let mut next_cid = info.columns.iter().map(|(c, _)| c + 1).max().unwrap_or(0);
        for (name, p) in &columns {
            if *p == 0 && info.cid_of(name).is_none() {
                info.columns.push((next_cid, name.clone()));
                next_cid += 1;
            }
        }

        let info_for_tx = info.clone();
        self.write(|tx| -> Result<(), Error> {
            tx.execute("DELETE FROM fazt_sync_columns WHERE tbl = ?1", [table])?;
            for (i, name) in info_for_tx.pk.iter().enumerate() {
                tx.execute(
                    "INSERT INTO fazt_sync_columns (tbl, cid, name, pk) VALUES (?1, ?2, ?3, ?4)",
                    rusqlite::params![table, -2 - i as i64, name, i as i64 + 1],
                )?;
            }
            for (cid, name) in &info_for_tx.columns {
                tx.execute(
                    "INSERT INTO fazt_sync_columns (tbl, cid, name, pk) VALUES (?1, ?2, ?3, 0)",
                    rusqlite::params![table, cid, name],
                )?;
            }
            tx.execute_batch(&create_sql(tx, &info_for_tx)?)?;
            tx.execute_batch(&backfill_sql(&info_for_tx))?;
            Ok(())
        })?;
        self.tables.insert(table.to_string(), info);
        self.catalog_version += 1;
        self.apply_pending()?;
        Ok(())
    }
}

/// The version of the triggers [`create_sql`] writes: raise it whenever they change, and
/// [`Replica::open`] rebuilds the triggers of tables registered by an older engine
/// (2: checked clock steps; 3: updates that change only a value's type or a zero's sign).
pub(crate) const TRIGGERS_VERSION: i64 = 3;

/// The clock and key tables, their indexes, and the triggers.
fn create_sql(conn: &Connection, t: &TableInfo) -> Result<String, Error> {
    let name = quote(&t.name);
    let pks = t.pks_table();
    let clock = t.clock_table();
    let pk_defs =
        t.pk.iter()
            .map(|c| {
                let ty: String = conn
                    .query_row(
                        "SELECT type FROM pragma_table_info(?1) WHERE name = ?2",
                        [&t.name, c],
                        |r| r.get(0),
                    )
                    .unwrap_or_default();
                format!("{} {} NOT NULL", quote(c), ty)
            })
            .collect::<Vec<_>>()
            .join(", ");
    let pk_cols = t.pk_list("");
    let idx = |suffix: &str| quote(&format!("{}__fazt_{suffix}", t.name));
    let trig = |suffix: &str| quote(&format!("{}__fazt_{suffix}", t.name));

    let mut sql = if t.rowid_key {
        String::new()
    } else {
        format!(
            "CREATE TABLE IF NOT EXISTS {pks} (__fazt_key INTEGER PRIMARY KEY NOT NULL, {pk_defs});
             CREATE UNIQUE INDEX IF NOT EXISTS {pks_idx} ON {pks} ({pk_cols});\n",
            pks_idx = idx("pks_pk"),
        )
    };
    sql += &format!(
        "CREATE TABLE IF NOT EXISTS {clock} (
             key INTEGER NOT NULL, cid INTEGER NOT NULL, col_version INTEGER NOT NULL,
             db_version INTEGER NOT NULL, site_ord INTEGER NOT NULL, seq INTEGER NOT NULL,
             PRIMARY KEY (key, cid)) WITHOUT ROWID;
         CREATE INDEX IF NOT EXISTS {clock_idx} ON {clock} (site_ord, db_version, seq, col_version);
         DROP TRIGGER IF EXISTS {ins}; DROP TRIGGER IF EXISTS {upd};
         DROP TRIGGER IF EXISTS {updpk}; DROP TRIGGER IF EXISTS {del};
        ",
        clock_idx = idx("clock_origin"),
        ins = trig("ins"),
        upd = trig("upd"),
        updpk = trig("updpk"),
        del = trig("del"),
    );

    let same_pk =
        t.pk.iter()
            .map(|c| format!("NEW.{q} IS OLD.{q}", q = quote(c)))
            .collect::<Vec<_>>()
            .join(" AND ");
    let insert_body = capture_insert(t, "NEW.");
    let delete_body = capture_delete(t, "OLD.");
    let update_body: String = t
        .columns
        .iter()
        .map(|(cid, col)| {
            format!(
                "INSERT INTO {clock} (key, cid, col_version, db_version, site_ord, seq)
                   SELECT {key}, {cid}, 1, fazt_sync_db_version(), 0, fazt_sync_seq()
                   WHERE NEW.{q} IS NOT OLD.{q}
                     OR ((typeof(NEW.{q}) = 'real' OR typeof(OLD.{q}) = 'real')
                         AND fazt_sync_differ(NEW.{q}, OLD.{q}))
                   ON CONFLICT (key, cid) DO UPDATE SET col_version = fazt_sync_next(col_version, 1),
                     db_version = excluded.db_version, site_ord = 0, seq = excluded.seq;\n",
                key = t.key_of("NEW."),
                q = quote(col)
            )
        })
        .collect();
    sql += &format!(
        "CREATE TRIGGER {ins} AFTER INSERT ON {name} WHEN fazt_sync_capturing() BEGIN {insert_body} END;
         CREATE TRIGGER {del} AFTER DELETE ON {name} WHEN fazt_sync_capturing() BEGIN {delete_body} END;
         CREATE TRIGGER {updpk} AFTER UPDATE ON {name} WHEN fazt_sync_capturing() AND NOT ({same_pk})
           BEGIN {delete_body} {insert_body} END;\n",
        ins = trig("ins"),
        del = trig("del"),
        updpk = trig("updpk"),
    );
    if !update_body.is_empty() {
        sql += &format!(
            "CREATE TRIGGER {upd} AFTER UPDATE ON {name} WHEN fazt_sync_capturing() AND {same_pk}
               BEGIN {update_body} END;\n",
            upd = trig("upd"),
        );
    }
    Ok(sql)
}

/// `(VALUES (0), (1), ...)` over the table's column ids.
fn column_ids(t: &TableInfo) -> String {
    let ids = t
        .columns
        .iter()
        .map(|(cid, _)| format!("({cid})"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("(VALUES {ids})")
}

/// A row `row` (NEW. or OLD.) came into existence: a new incarnation if it was deleted
/// (even causal length -> next odd), and a fresh version of every column.
///
/// A live row of a table with non-key columns has no sentinel while its causal length is
/// 1: the column clocks say it exists (as in cr-sqlite). The sentinel appears with the
/// first delete and stays, as the tombstone and then the incarnation counter.
fn capture_insert(t: &TableInfo, row: &str) -> String {
    let clock = t.clock_table();
    let key = t.key_of(row);
    let mut sql = String::new();
    if !t.rowid_key {
        let pk_values =
            t.pk.iter()
                .map(|c| format!("{row}{}", quote(c)))
                .collect::<Vec<_>>()
                .join(", ");
        sql += &format!(
            "INSERT INTO {pks} ({cols}) VALUES ({pk_values}) ON CONFLICT DO NOTHING;\n",
            pks = t.pks_table(),
            cols = t.pk_list(""),
        );
    }
    if t.columns.is_empty() {
        sql += &format!(
            "INSERT INTO {clock} (key, cid, col_version, db_version, site_ord, seq)
               SELECT {key}, -1, 1, fazt_sync_db_version(), 0, fazt_sync_seq() WHERE true
               ON CONFLICT (key, cid) DO UPDATE SET col_version = fazt_sync_next(col_version, 1),
                 db_version = excluded.db_version, site_ord = 0, seq = excluded.seq
               WHERE col_version % 2 = 0;\n"
        );
        return sql;
    }
    sql += &format!(
        "UPDATE {clock} SET col_version = fazt_sync_next(col_version, 1), db_version = fazt_sync_db_version(),
           site_ord = 0, seq = fazt_sync_seq()
           WHERE key = {key} AND cid = -1 AND col_version % 2 = 0;
         INSERT INTO {clock} (key, cid, col_version, db_version, site_ord, seq)
           SELECT {key}, v.column1, 1, fazt_sync_db_version(), 0, fazt_sync_seq()
           FROM {ids} AS v WHERE true
           ON CONFLICT (key, cid) DO UPDATE SET col_version = fazt_sync_next(col_version, 1),
             db_version = excluded.db_version, site_ord = 0, seq = excluded.seq;\n",
        ids = column_ids(t),
    );
    sql
}

/// A row went away: its causal length becomes even and its column clocks are dropped.
fn capture_delete(t: &TableInfo, row: &str) -> String {
    let clock = t.clock_table();
    let key = t.key_of(row);
    format!(
        "INSERT INTO {clock} (key, cid, col_version, db_version, site_ord, seq)
           SELECT {key}, -1, 2, fazt_sync_db_version(), 0, fazt_sync_seq() WHERE true
           ON CONFLICT (key, cid) DO UPDATE SET col_version = fazt_sync_next(col_version, 1 + (col_version % 2 = 0)),
             db_version = excluded.db_version, site_ord = 0, seq = excluded.seq;
         DELETE FROM {clock} WHERE cid >= 0 AND key = {key};\n"
    )
}

/// Rows that existed before registration become changes of this replica: every column of
/// a row that has no clock yet gets version 1 (tables without non-key columns get a
/// sentinel instead).
fn backfill_sql(t: &TableInfo) -> String {
    let name = quote(&t.name);
    let clock = t.clock_table();
    let mut sql = String::new();
    if !t.rowid_key {
        sql += &format!(
            "INSERT INTO {pks} ({cols}) SELECT {src_cols} FROM {name} AS src
               WHERE NOT EXISTS (SELECT 1 FROM {pks} AS p WHERE {m});\n",
            pks = t.pks_table(),
            cols = t.pk_list(""),
            src_cols = t.pk_list("src."),
            m = t.pk_match("p.", "src."),
        );
    }
    let key = t.key_of("src.");
    let without_clock = format!("NOT EXISTS (SELECT 1 FROM {clock} c WHERE c.key = {key})");
    if t.columns.is_empty() {
        sql += &format!(
            "INSERT INTO {clock} (key, cid, col_version, db_version, site_ord, seq)
               SELECT {key}, -1, 1, fazt_sync_db_version(), 0, fazt_sync_seq() FROM {name} AS src
               WHERE {without_clock};\n"
        );
    } else {
        sql += &format!(
            "INSERT INTO {clock} (key, cid, col_version, db_version, site_ord, seq)
               SELECT {key}, v.column1, 1, fazt_sync_db_version(), 0, fazt_sync_seq()
               FROM {name} AS src, {ids} AS v WHERE {without_clock};\n",
            ids = column_ids(t),
        );
    }
    sql
}
