//! `fazt sql` and `fazt db ...`: direct access to the node's database, through the
//! replication engine so that writes to replicated tables become changes.

use std::path::Path;

use anyhow::Result;
use clap::Subcommand;
use fallible_iterator::FallibleIterator;
use fazt_sync::Value;
use serde_json::{Map, Value as Json};

use super::output;

#[derive(Subcommand)]
pub enum DbCmd {
    /// Make a table replicate to peers (it must follow the replication rules)
    Replicate { table: String },
    /// Delete content (blobs) that no version and no s3 object uses any more
    Gc {
        /// Only delete blobs unreferenced for at least this many seconds (0: now)
        #[arg(long, value_name = "SECONDS", default_value_t = crate::hosting::gc::DEFAULT_GRACE_SECS)]
        grace: u32,
        /// Print the result as JSON
        #[arg(long)]
        json: bool,
    },
}

/// Rows of a statement: column names and values.
type Rows = (Vec<String>, Vec<Vec<Value>>);

/// Runs `sql` (one or more statements) in one transaction and prints the last statement's rows.
pub fn sql(db: &Path, sql: &str, json: bool) -> Result<()> {
    let mut database = super::open_for_write(db)?;
    let rows: Option<Rows> = database.write(|tx| -> Result<Option<Rows>> {
        let mut batch = rusqlite::Batch::new(tx, sql);
        let mut last = None;
        while let Some(mut stmt) = batch.next()? {
            if stmt.column_count() == 0 {
                stmt.raw_execute()?;
                last = None;
                continue;
            }
            let names: Vec<String> = stmt.column_names().map(String::from).collect();
            let n = names.len();
            let mut rows = Vec::new();
            let mut cursor = stmt.raw_query();
            while let Some(row) = cursor.next()? {
                rows.push(
                    (0..n)
                        .map(|i| row.get::<_, Value>(i))
                        .collect::<rusqlite::Result<Vec<_>>>()?,
                );
            }
            last = Some((names, rows));
        }
        Ok(last)
    })?;
    let Some((names, rows)) = rows else {
        if json {
            println!("[]");
        }
        return Ok(());
    };
    if json {
        let list: Vec<Json> = rows
            .iter()
            .map(|row| {
                let obj: Map<String, Json> =
                    names.iter().cloned().zip(row.iter().map(to_json)).collect();
                Json::Object(obj)
            })
            .collect();
        return output::json(&list);
    }
    let text: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(to_text).collect())
        .collect();
    let headers: Vec<&str> = names.iter().map(String::as_str).collect();
    output::table(&headers, &text);
    Ok(())
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::Null => Json::Null,
        Value::Integer(i) => Json::from(*i),
        Value::Real(f) => serde_json::Number::from_f64(*f)
            .map(Json::Number)
            .unwrap_or(Json::Null),
        Value::Text(t) => Json::String(t.clone()),
        // Blobs as lower-case hex.
        Value::Blob(b) => Json::String(hex::encode(b)),
    }
}

fn to_text(v: &Value) -> String {
    match v {
        Value::Null => "NULL".into(),
        Value::Integer(i) => i.to_string(),
        Value::Real(f) => f.to_string(),
        Value::Text(t) => t.clone(),
        Value::Blob(b) => format!("x'{}'", hex::encode(b)),
    }
}

pub fn run(cmd: DbCmd, db: &Path) -> Result<()> {
    match cmd {
        DbCmd::Gc { grace, json } => {
            let mut database = crate::db::open_existing(db)?;
            let done = crate::hosting::gc::collect(
                &mut database,
                i64::from(grace),
                crate::clock::now_secs(),
            )?;
            if json {
                return output::json(&done);
            }
            println!(
                "deleted {} unreferenced blobs ({} freed); {} more wait out the grace period{}",
                done.deleted,
                output::size(done.freed_bytes),
                done.waiting,
                if done.rescued > 0 || done.rescued_versions > 0 {
                    format!(
                        "; re-inserted {} blobs and {} versions a peer had deleted",
                        done.rescued, done.rescued_versions
                    )
                } else {
                    String::new()
                }
            );
            Ok(())
        }
        DbCmd::Replicate { table } => {
            // Refused before the database is opened, so even without one.
            crate::db::check_user_table(&table)?;
            let mut database = super::open_for_write(db)?;
            let already = crate::db::replicate_user_table(&mut database, &table)?;
            if already {
                println!("{table} was already replicated; its columns are up to date");
            } else {
                println!("{table} now replicates (its existing rows are recorded as changes of this node)");
            }
            Ok(())
        }
    }
}
