//! The rules a table must follow to replicate.
//!
//! Merging works per (primary key, column): rows are identified only by their primary key,
//! so any other uniqueness constraint could reject a merge that every replica must accept,
//! and foreign keys could reject changes that arrive in a different order than they were
//! made. AUTOINCREMENT hands out keys from a per-node counter, so two nodes would mint the
//! same key for different rows. A NOT NULL column without a default cannot be filled in when
//! a row's columns arrive one change at a time.

use rusqlite::Connection;

/// Why a table cannot be replicated. Each message names the rule and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CrrRuleViolation {
    /// The name is one of the engine's own tables, or named like one.
    #[error("{0} is one of the replication engine's own tables (fazt_sync_*, <table>__fazt_*): they describe this replica and never replicate")]
    EngineTable(String),
    /// Something else already has a name the engine would give the table's bookkeeping.
    #[error("table {table}: {object} already exists, but the engine keeps {table}'s replication bookkeeping under that name: rename {object} or {table}")]
    NameTaken {
        /// The table being registered.
        table: String,
        /// The existing object that has one of its bookkeeping names.
        object: String,
    },
    /// No such table.
    #[error("table {0} does not exist")]
    NoSuchTable(String),
    /// The table has no primary key.
    #[error("table {0} has no primary key: replicated rows are identified by their primary key")]
    NoPrimaryKey(String),
    /// A primary-key column may be NULL.
    #[error("table {table}: primary key column {column} must be declared NOT NULL")]
    NullablePrimaryKey {
        /// The table.
        table: String,
        /// The nullable key column.
        column: String,
    },
    /// The table has a UNIQUE index besides its primary key.
    #[error("table {table}: unique index {index} is not allowed (only the primary key may be unique): merges could violate it")]
    UniqueIndex {
        /// The table.
        table: String,
        /// The unique index besides the primary key.
        index: String,
    },
    /// The table uses AUTOINCREMENT.
    #[error("table {0} uses AUTOINCREMENT: two nodes would mint the same key; use random or content-derived keys")]
    Autoincrement(String),
    /// The table has a FOREIGN KEY.
    #[error("table {0} has a FOREIGN KEY: changes may arrive in any order, so references cannot be enforced")]
    ForeignKey(String),
    /// A NOT NULL column has no DEFAULT.
    #[error("table {table}: NOT NULL column {column} needs a DEFAULT so rows can be built one column at a time")]
    NotNullWithoutDefault {
        /// The table.
        table: String,
        /// The NOT NULL column without a default.
        column: String,
    },
    /// SQLite failed while the schema was read.
    #[error("reading the schema of {table}: {message}")]
    Sqlite {
        /// The table whose schema was being read.
        table: String,
        /// SQLite's error.
        message: String,
    },
}

struct Column {
    name: String,
    not_null: bool,
    has_default: bool,
    pk_position: i64,
}

/// Whether `name` is, or is named like, one of the engine's own tables: `fazt_sync_*` (the
/// replica's bookkeeping) or anything with `__fazt_` in it (the clock and key tables, indexes
/// and triggers kept beside each replicated table). SQLite names ignore ASCII case, so this
/// does too.
pub fn is_engine_name(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    name.starts_with("fazt_sync_") || name.contains("__fazt_")
}

/// Checks that `table` follows every rule for replicated tables.
///
/// Returns the first violation found, in a fixed order (an engine name, existence, primary
/// key, uniqueness, AUTOINCREMENT, foreign keys, defaults), so that the message is stable.
pub fn check_replicable(conn: &Connection, table: &str) -> Result<(), CrrRuleViolation> {
    if is_engine_name(table) {
        return Err(CrrRuleViolation::EngineTable(table.to_string()));
    }
    let sqlite_err = |e: rusqlite::Error| CrrRuleViolation::Sqlite {
        table: table.to_string(),
        message: e.to_string(),
    };
    let create_sql: Option<String> = conn
        .query_row(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
            [table],
            |row| row.get(0),
        )
        .map(Some)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(None),
            other => Err(other),
        })
        .map_err(sqlite_err)?;
    let Some(create_sql) = create_sql else {
        return Err(CrrRuleViolation::NoSuchTable(table.to_string()));
    };

    let columns = table_columns(conn, table).map_err(sqlite_err)?;
    let pk: Vec<&Column> = columns.iter().filter(|c| c.pk_position > 0).collect();
    if pk.is_empty() {
        return Err(CrrRuleViolation::NoPrimaryKey(table.to_string()));
    }
    if let Some(col) = pk.iter().find(|c| !c.not_null) {
        return Err(CrrRuleViolation::NullablePrimaryKey {
            table: table.to_string(),
            column: col.name.clone(),
        });
    }

    let mut stmt = conn
        .prepare("SELECT name, \"unique\", origin FROM pragma_index_list(?1)")
        .map_err(sqlite_err)?;
    let indexes = stmt
        .query_map([table], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, bool>(1)?,
                row.get::<_, String>(2)?,
            ))
        })
        .map_err(sqlite_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sqlite_err)?;
    if let Some((index, _, _)) = indexes
        .iter()
        .find(|(_, unique, origin)| *unique && origin != "pk")
    {
        return Err(CrrRuleViolation::UniqueIndex {
            table: table.to_string(),
            index: index.clone(),
        });
    }

    if create_sql.to_ascii_uppercase().contains("AUTOINCREMENT") {
        return Err(CrrRuleViolation::Autoincrement(table.to_string()));
    }

    let foreign_keys: i64 = conn
        .query_row(
            "SELECT count(*) FROM pragma_foreign_key_list(?1)",
            [table],
            |row| row.get(0),
        )
        .map_err(sqlite_err)?;
    if foreign_keys > 0 {
        return Err(CrrRuleViolation::ForeignKey(table.to_string()));
    }

    if let Some(col) = columns
        .iter()
        .find(|c| c.pk_position == 0 && c.not_null && !c.has_default)
    {
        return Err(CrrRuleViolation::NotNullWithoutDefault {
            table: table.to_string(),
            column: col.name.clone(),
        });
    }
    Ok(())
}

/// Refuses to register `table` for the first time while something else already has a name the
/// engine would give its bookkeeping (`<table>__fazt_clock`, `<table>__fazt_pks`, their
/// indexes and triggers): the engine's `CREATE ... IF NOT EXISTS` would adopt a user's table.
pub(crate) fn check_names_free(conn: &Connection, table: &str) -> Result<(), CrrRuleViolation> {
    let prefix = format!("{}__fazt_", table.to_ascii_lowercase());
    let names = conn
        .prepare("SELECT name FROM sqlite_master ORDER BY name")
        .and_then(|mut stmt| {
            stmt.query_map([], |row| row.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()
        })
        .map_err(|e| CrrRuleViolation::Sqlite {
            table: table.to_string(),
            message: e.to_string(),
        })?;
    match names
        .into_iter()
        .find(|name| name.to_ascii_lowercase().starts_with(&prefix))
    {
        Some(object) => Err(CrrRuleViolation::NameTaken {
            table: table.to_string(),
            object,
        }),
        None => Ok(()),
    }
}

fn table_columns(conn: &Connection, table: &str) -> rusqlite::Result<Vec<Column>> {
    let mut stmt = conn.prepare(
        "SELECT name, \"notnull\", dflt_value IS NOT NULL, pk FROM pragma_table_info(?1)",
    )?;
    let rows = stmt.query_map([table], |row| {
        Ok(Column {
            name: row.get(0)?,
            not_null: row.get(1)?,
            has_default: row.get(2)?,
            pk_position: row.get(3)?,
        })
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(ddl: &str) -> Result<(), CrrRuleViolation> {
        let conn = Connection::open_in_memory().unwrap();
        conn.execute_batch(ddl).unwrap();
        check_replicable(&conn, "t")
    }

    #[test]
    fn a_well_formed_table_is_accepted() {
        check("CREATE TABLE t (id TEXT PRIMARY KEY NOT NULL, n INTEGER NOT NULL DEFAULT 0, note TEXT)")
            .unwrap();
        check("CREATE TABLE t (a TEXT NOT NULL, b INTEGER NOT NULL, v BLOB, PRIMARY KEY (a, b))")
            .unwrap();
        check("CREATE TABLE t (id TEXT PRIMARY KEY NOT NULL, k TEXT); CREATE INDEX t_k ON t(k)")
            .unwrap();
    }

    #[test]
    fn each_rule_is_named_when_broken() {
        assert!(matches!(
            check("CREATE TABLE x (a)"),
            Err(CrrRuleViolation::NoSuchTable(_))
        ));
        assert!(matches!(
            check("CREATE TABLE t (a TEXT)"),
            Err(CrrRuleViolation::NoPrimaryKey(_))
        ));
        assert!(matches!(
            check("CREATE TABLE t (a TEXT PRIMARY KEY)"),
            Err(CrrRuleViolation::NullablePrimaryKey { .. })
        ));
        assert!(matches!(
            check("CREATE TABLE t (a TEXT PRIMARY KEY NOT NULL, b TEXT UNIQUE)"),
            Err(CrrRuleViolation::UniqueIndex { .. })
        ));
        assert!(matches!(
            check("CREATE TABLE t (a TEXT PRIMARY KEY NOT NULL, b TEXT); CREATE UNIQUE INDEX u ON t(b)"),
            Err(CrrRuleViolation::UniqueIndex { .. })
        ));
        assert!(matches!(
            check("CREATE TABLE t (a INTEGER PRIMARY KEY AUTOINCREMENT NOT NULL)"),
            Err(CrrRuleViolation::Autoincrement(_))
        ));
        assert!(matches!(
            check("CREATE TABLE p (id TEXT PRIMARY KEY NOT NULL); CREATE TABLE t (a TEXT PRIMARY KEY NOT NULL, p TEXT REFERENCES p(id))"),
            Err(CrrRuleViolation::ForeignKey(_))
        ));
        assert!(matches!(
            check("CREATE TABLE t (a TEXT PRIMARY KEY NOT NULL, b TEXT NOT NULL)"),
            Err(CrrRuleViolation::NotNullWithoutDefault { .. })
        ));
    }
}
