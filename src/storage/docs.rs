//! `fazt.app.ds`: JSON documents in collections, with a small query language.
//!
//! Merging: a document is one JSON column, so concurrent edits of the same document on two
//! nodes merge per document — one whole version wins, the same on every node. Fields
//! changed with `$inc` are counters and merge by adding up: each node keeps its own running
//! total per field in `app_doc_counters`, and a field's value is its stored value plus every
//! node's total. `$set`/`$unset` of a field starts its counters afresh: the document keeps a
//! stamp per field an update set or unset (under the reserved key `$fazt`), and only totals
//! made on top of the current stamps of the field and of the objects that hold it count. A
//! set and a concurrent increment: the set wins, even where the setting node had never seen
//! the field incremented.

use anyhow::{anyhow, bail, Result};
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Number, Value};

use super::{check_name, Budget, Scope};
use crate::db::Db;

/// The key under which a document keeps its counter stamps; never shown to apps.
const STAMPS: &str = "$fazt";
/// Largest document, as JSON text.
pub const MAX_DOC_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, Default)]
pub struct FindOptions {
    pub limit: Option<usize>,
    pub offset: usize,
    /// Newest first (the default) or oldest first, by creation time.
    pub ascending: bool,
}

/// A stored document with its counters applied.
struct Stored {
    id: String,
    data: Map<String, Value>,
    created_at: i64,
    updated_at: i64,
}

impl Stored {
    /// The document as apps see it: fields, `id`, `_createdAt`, `_updatedAt`.
    fn public(&self) -> Value {
        let mut out = self.data.clone();
        out.remove(STAMPS);
        out.insert("id".into(), Value::String(self.id.clone()));
        out.insert("_createdAt".into(), Value::from(self.created_at));
        out.insert("_updatedAt".into(), Value::from(self.updated_at));
        Value::Object(out)
    }

    fn stamp(&self, path: &str) -> String {
        stamp_of(&self.data, path)
    }
}

/// The stamp a counter on `path` is counted against: the stamps of `path` and of every object
/// that holds it (`a`, `a.b` for `a.b.c`), so setting `a` also restarts a counter on `a.b`. A
/// path with no stamped prefix has stamp `""`, and one with only its own stamp has that stamp.
fn stamp_of(data: &Map<String, Value>, path: &str) -> String {
    let Some(stamps) = data.get(STAMPS) else {
        return String::new();
    };
    let mut out = String::new();
    let mut end = 0;
    for part in path.split('.') {
        end += part.len();
        if let Some(stamp) = stamps.get(&path[..end]).and_then(Value::as_str) {
            if !out.is_empty() {
                out.push('/');
            }
            out.push_str(stamp);
        }
        end += 1;
    }
    out
}

fn new_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the system has randomness");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn check_doc_size(data: &Map<String, Value>) -> Result<String> {
    let text = serde_json::to_string(data)?;
    if text.len() > MAX_DOC_BYTES {
        bail!("document is larger than {MAX_DOC_BYTES} bytes as JSON");
    }
    Ok(text)
}

/// Stores a new document; returns its id (the document's `id` field, or a new UUID).
pub fn insert(
    db: &mut Db,
    scope: &Scope,
    collection: &str,
    doc: Value,
    now: i64,
) -> Result<String> {
    check_name("a collection name", collection)?;
    let Value::Object(mut data) = doc else {
        bail!("a document must be an object");
    };
    if data.contains_key(STAMPS) {
        bail!("field name {STAMPS} is reserved");
    }
    let id = match data.remove("id") {
        None | Some(Value::Null) => new_id(),
        Some(Value::String(s)) => {
            check_name("a document id", &s)?;
            s
        }
        Some(Value::Number(n)) => n.to_string(),
        Some(_) => bail!("a document id must be a string or a number"),
    };
    data.remove("_createdAt");
    data.remove("_updatedAt");
    let text = check_doc_size(&data)?;
    db.write(|tx| super::quota::guard(tx, &scope.app_id, || {
        let exists: Option<i64> = tx
            .prepare_cached(
                "SELECT 1 FROM app_docs WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND id = ?4",
            )?
            .query_row(params![scope.app_id, scope.user_id, collection, id], |r| r.get(0))
            .optional()?;
        if exists.is_some() {
            bail!("collection {collection} already has a document with id {id:?}");
        }
        tx.prepare_cached(
            "INSERT INTO app_docs (app_id, user_id, collection, id, data, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )?
        .execute(params![scope.app_id, scope.user_id, collection, id, text, now])?;
        Ok(())
    }))?;
    Ok(id)
}

/// Counter fields of a collection, when there are few enough to reason about (queries on
/// other fields are filtered in SQL); `None` when there are more.
fn counter_fields_of(
    conn: &Connection,
    scope: &Scope,
    collection: &str,
) -> Result<Option<Vec<String>>> {
    const MAX: usize = 256;
    let mut stmt = conn.prepare_cached(
        "SELECT DISTINCT field FROM app_doc_counters
         WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 LIMIT ?4",
    )?;
    let rows = stmt.query_map(
        params![scope.app_id, scope.user_id, collection, MAX as i64 + 1],
        |r| r.get::<_, String>(0),
    )?;
    let fields: Vec<String> = rows.collect::<Result<_, _>>()?;
    Ok((fields.len() <= MAX).then_some(fields))
}

/// Adds one document's counter totals (those made on top of its current stamps) to its data.
fn apply_counters(
    conn: &Connection,
    scope: &Scope,
    collection: &str,
    doc: &mut Stored,
) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "SELECT field, base, sum(amount) FROM app_doc_counters
         WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND doc_id = ?4
         GROUP BY field, base",
    )?;
    let rows = stmt.query_map(
        params![scope.app_id, scope.user_id, collection, doc.id],
        |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, f64>(2)?,
            ))
        },
    )?;
    let mut added: Vec<(String, f64)> = Vec::new();
    for row in rows {
        let (field, base, sum) = row?;
        if base != doc.stamp(&field) {
            continue;
        }
        match added.iter_mut().find(|(f, _)| *f == field) {
            Some((_, total)) => *total += sum,
            None => added.push((field, sum)),
        }
    }
    for (field, total) in added {
        if total != 0.0 {
            let start = lookup(&doc.data, &field)
                .and_then(Value::as_f64)
                .unwrap_or(0.0);
            set_path(&mut doc.data, &field, number(start + total))?;
        }
    }
    Ok(())
}

/// Streams the documents of a collection that match `query`, counters applied, in creation
/// order (or its reverse), to `visit` until it returns false. SQL narrows the rows (see
/// [`Pushdown`]); the evaluator below decides, so its semantics are the only ones. One row is
/// held at a time, and the request's deadline is checked between rows.
fn scan(
    conn: &Connection,
    scope: &Scope,
    collection: &str,
    query: &Value,
    ascending: bool,
    budget: &Budget,
    mut visit: impl FnMut(Stored, usize) -> Result<bool>,
) -> Result<()> {
    let query = normalize_query(query)?;
    let only_id = match query.get("id") {
        Some(Value::String(s)) => Some(s.clone()),
        _ => None,
    };
    let counters = counter_fields_of(conn, scope, collection)?;
    let has_counters = counters.as_ref().is_none_or(|f| !f.is_empty());
    let mut push = Pushdown::default();
    if let Some(fields) = &counters {
        push.query(&query, fields);
    }
    let dir = if ascending { "ASC" } else { "DESC" };
    let sql = format!(
        "SELECT id, data, created_at, updated_at FROM app_docs
         WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND (?4 IS NULL OR id = ?4){}
         ORDER BY created_at {dir}, id {dir}",
        push.sql
    );
    let mut stmt = conn.prepare(&sql)?;
    let mut params: Vec<rusqlite::types::Value> = vec![
        scope.app_id.clone().into(),
        scope.user_id.clone().into(),
        collection.to_string().into(),
        only_id.map_or(rusqlite::types::Value::Null, Into::into),
    ];
    params.append(&mut push.params);
    let mut rows = stmt.query(rusqlite::params_from_iter(params))?;
    loop {
        budget.check_time()?;
        let Some(row) = rows.next()? else {
            break;
        };
        let id: String = row.get(0)?;
        let text = row.get_ref(1)?.as_str()?;
        let size = text.len() + id.len();
        let data = match serde_json::from_str(text) {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let mut doc = Stored {
            id,
            data,
            created_at: row.get(2)?,
            updated_at: row.get(3)?,
        };
        if has_counters {
            apply_counters(conn, scope, collection, &mut doc)?;
        }
        if matches(&doc.public(), &query)? && !visit(doc, size)? {
            break;
        }
    }
    Ok(())
}

/// SQL conditions implied by a query: each one holds for every document the evaluator
/// accepts (it may accept more), so filtering in SQL never changes an answer, only the rows
/// read. Only fields whose value is plainly in the stored JSON are filtered: not `id` or the
/// timestamps, not counter fields (their value is partly in app_doc_counters), not paths with
/// array indexes (`a.0`: an index to the evaluator, a key to SQLite's JSON paths).
#[derive(Default)]
struct Pushdown {
    sql: String,
    params: Vec<rusqlite::types::Value>,
}

impl Pushdown {
    /// Parameters at most (SQLite's limit is far higher; beyond this the evaluator filters).
    const MAX_PARAMS: usize = 500;

    fn param(&mut self, v: impl Into<rusqlite::types::Value>) -> String {
        self.params.push(v.into());
        format!("?{}", self.params.len() + 4)
    }

    fn query(&mut self, query: &Map<String, Value>, counters: &[String]) {
        for (path, cond) in query {
            let Some(json_path) = sql_path(path) else {
                continue;
            };
            let dot = |a: &str, b: &str| {
                a.len() > b.len() && a.starts_with(b) && a.as_bytes()[b.len()] == b'.'
            };
            if counters
                .iter()
                .any(|f| f == path || dot(f, path) || dot(path, f))
            {
                continue;
            }
            let conds: Vec<(&str, &Value)> = if is_operator_object(cond) {
                cond.as_object()
                    .expect("checked")
                    .iter()
                    .map(|(op, arg)| (op.as_str(), arg))
                    .collect()
            } else {
                vec![("$eq", cond)]
            };
            for (op, arg) in conds {
                if self.params.len() >= Self::MAX_PARAMS {
                    return;
                }
                let mark = self.params.len();
                match self.condition(&json_path, op, arg) {
                    // Nothing can match: no row needs reading (nor the path parameter).
                    Some(c) if c == "0" => {
                        self.params.truncate(mark);
                        self.sql.push_str(" AND 0");
                    }
                    Some(c) => {
                        self.sql.push_str(" AND CASE WHEN json_valid(data) THEN ");
                        self.sql.push_str(&c);
                        self.sql.push_str(" ELSE 1 END");
                    }
                    None => self.params.truncate(mark),
                }
            }
        }
    }

    fn condition(&mut self, path: &str, op: &str, arg: &Value) -> Option<String> {
        let p = self.param(path.to_string());
        let ty = format!("json_type(data, {p})");
        let val = format!("json_extract(data, {p})");
        Some(match op {
            "$eq" => self.equals(&ty, &val, arg)?,
            "$in" => {
                let items = arg.as_array()?;
                if items.len() > 64 {
                    return None;
                }
                if items.is_empty() {
                    return Some("0".into());
                }
                let mut any = Vec::new();
                for item in items {
                    any.push(self.equals(&ty, &val, item)?);
                }
                format!("({})", any.join(" OR "))
            }
            "$gt" | "$gte" | "$lt" | "$lte" => {
                let sign = match op {
                    "$gt" => ">",
                    "$gte" => ">=",
                    "$lt" => "<",
                    _ => "<=",
                };
                match arg {
                    Value::Number(n) => {
                        let n = self.param(n.as_f64()?);
                        format!("({ty} IN ('integer', 'real') AND CAST({val} AS REAL) {sign} {n})")
                    }
                    Value::String(s) if !s.contains('\0') => {
                        let s = self.param(s.clone());
                        format!("({ty} = 'text' AND {val} {sign} {s})")
                    }
                    Value::String(_) => return None,
                    // Only numbers and strings are ordered: nothing matches.
                    _ => "0".into(),
                }
            }
            "$exists" if arg.as_bool().unwrap_or(true) => format!("{ty} IS NOT NULL"),
            "$contains" => match arg {
                Value::String(s) if !s.contains('\0') => {
                    let s = self.param(s.clone());
                    format!("({ty} = 'array' OR ({ty} = 'text' AND instr({val}, {s}) > 0))")
                }
                Value::String(_) => return None,
                _ => format!("{ty} = 'array'"),
            },
            _ => return None,
        })
    }

    /// What [`equals`] needs of a present field (a missing field only equals null).
    fn equals(&mut self, ty: &str, val: &str, want: &Value) -> Option<String> {
        Some(match want {
            Value::Null => return None,
            Value::Bool(true) => format!("{ty} IN ('array', 'true')"),
            Value::Bool(false) => format!("{ty} IN ('array', 'false')"),
            Value::Number(n) => {
                let n = self.param(n.as_f64()?);
                format!("({ty} = 'array' OR ({ty} IN ('integer', 'real') AND CAST({val} AS REAL) = {n}))")
            }
            Value::String(s) if !s.contains('\0') => {
                let s = self.param(s.clone());
                format!("({ty} = 'array' OR ({ty} = 'text' AND {val} = {s}))")
            }
            Value::String(_) => return None,
            Value::Array(_) => format!("{ty} = 'array'"),
            Value::Object(_) => format!("{ty} IN ('array', 'object')"),
        })
    }
}

/// A dotted field path as an SQLite JSON path (`a.b` → `$."a"."b"`), when both read the same
/// value: object keys only, no array indexes, none of the fields the evaluator adds.
fn sql_path(path: &str) -> Option<String> {
    let mut out = String::from("$");
    for (i, part) in path.split('.').enumerate() {
        if i == 0 && ["id", "_createdAt", "_updatedAt", STAMPS].contains(&part) {
            return None;
        }
        if part.is_empty()
            || part.parse::<usize>().is_ok()
            || part
                .chars()
                .any(|c| c == '"' || c == '\\' || c.is_control())
        {
            return None;
        }
        out.push_str(".\"");
        out.push_str(part);
        out.push('"');
    }
    Some(out)
}

fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.007_199_254_740_992e15 {
        Value::from(x as i64)
    } else {
        Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

/// Documents matching `query`, as apps see them: at most `limit`, after `offset`, and no
/// more than the budget's bytes.
pub fn find(
    conn: &Connection,
    scope: &Scope,
    collection: &str,
    query: &Value,
    opts: &FindOptions,
    budget: &Budget,
) -> Result<Vec<Value>> {
    let limit = opts.limit.unwrap_or(usize::MAX);
    let mut out = Vec::new();
    if limit == 0 {
        return Ok(out);
    }
    let mut skip = opts.offset;
    let mut bytes = 0;
    scan(
        conn,
        scope,
        collection,
        query,
        opts.ascending,
        budget,
        |doc, size| {
            if skip > 0 {
                skip -= 1;
                return Ok(true);
            }
            budget.spend(&mut bytes, size + 64, "ds.find would return")?;
            out.push(doc.public());
            Ok(out.len() < limit)
        },
    )?;
    Ok(out)
}

/// The first match (newest first), or the document with that id when `query` is an id.
pub fn find_one(
    conn: &Connection,
    scope: &Scope,
    collection: &str,
    query: &Value,
    budget: &Budget,
) -> Result<Option<Value>> {
    let opts = FindOptions {
        limit: Some(1),
        ..Default::default()
    };
    Ok(find(conn, scope, collection, query, &opts, budget)?
        .into_iter()
        .next())
}

pub fn count(
    conn: &Connection,
    scope: &Scope,
    collection: &str,
    query: &Value,
    budget: &Budget,
) -> Result<usize> {
    let mut n = 0;
    scan(conn, scope, collection, query, true, budget, |_, _| {
        n += 1;
        Ok(true)
    })?;
    Ok(n)
}

/// A query object; a bare string or number means "the document with this id"; null or
/// undefined means "every document".
fn normalize_query(query: &Value) -> Result<Map<String, Value>> {
    match query {
        Value::Null => Ok(Map::new()),
        Value::Object(m) => Ok(m.clone()),
        Value::String(_) | Value::Number(_) => {
            let id = match query {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            Ok(Map::from_iter([("id".to_string(), Value::String(id))]))
        }
        _ => bail!("a query must be an object (or a document id)"),
    }
}

/// The value at a dotted path (`a.b.0.c`: object keys and array indexes).
fn lookup<'a>(data: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut cur = data.get(parts.next()?)?;
    for part in parts {
        cur = match cur {
            Value::Object(m) => m.get(part)?,
            Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn set_path(data: &mut Map<String, Value>, path: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("invalid field path {path:?}");
    }
    let mut cur = data;
    for part in &parts[..parts.len() - 1] {
        let next = cur
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !next.is_object() {
            *next = Value::Object(Map::new());
        }
        cur = next.as_object_mut().expect("just made an object");
    }
    cur.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

fn unset_path(data: &mut Map<String, Value>, path: &str) {
    let parts: Vec<&str> = path.split('.').collect();
    let mut cur = data;
    for part in &parts[..parts.len() - 1] {
        match cur.get_mut(*part).and_then(Value::as_object_mut) {
            Some(next) => cur = next,
            None => return,
        }
    }
    cur.remove(parts[parts.len() - 1]);
}

/// JSON equality with numbers compared by value (1 equals 1.0).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| json_eq(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// Order between two numbers or two strings; None for anything else.
fn json_cmp(a: &Value, b: &Value) -> Option<std::cmp::Ordering> {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64()?.partial_cmp(&y.as_f64()?),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        _ => None,
    }
}

fn is_operator_object(v: &Value) -> bool {
    matches!(v, Value::Object(m) if !m.is_empty() && m.keys().all(|k| k.starts_with('$')))
}

fn matches(doc: &Value, query: &Map<String, Value>) -> Result<bool> {
    let data = doc.as_object().expect("documents are objects");
    for (path, cond) in query {
        let actual = lookup(data, path);
        let ok = if is_operator_object(cond) {
            let mut all = true;
            for (op, arg) in cond.as_object().expect("checked") {
                if !operator(op, actual, arg)? {
                    all = false;
                    break;
                }
            }
            all
        } else {
            equals(actual, cond)
        };
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Field equality: a missing field equals null; an array field matches any of its elements.
fn equals(actual: Option<&Value>, want: &Value) -> bool {
    match actual {
        None => want.is_null(),
        Some(v) if json_eq(v, want) => true,
        Some(Value::Array(items)) => items.iter().any(|i| json_eq(i, want)),
        Some(_) => false,
    }
}

fn operator(op: &str, actual: Option<&Value>, arg: &Value) -> Result<bool> {
    use std::cmp::Ordering::*;
    let cmp = |accept: &[std::cmp::Ordering]| {
        actual
            .and_then(|a| json_cmp(a, arg))
            .is_some_and(|o| accept.contains(&o))
    };
    let list = || arg.as_array().ok_or_else(|| anyhow!("{op} needs an array"));
    Ok(match op {
        "$eq" => equals(actual, arg),
        "$ne" => !equals(actual, arg),
        "$gt" => cmp(&[Greater]),
        "$gte" => cmp(&[Greater, Equal]),
        "$lt" => cmp(&[Less]),
        "$lte" => cmp(&[Less, Equal]),
        "$in" => list()?.iter().any(|w| equals(actual, w)),
        "$nin" => !list()?.iter().any(|w| equals(actual, w)),
        "$contains" => match (actual, arg) {
            (Some(Value::Array(items)), _) => items.iter().any(|i| json_eq(i, arg)),
            (Some(Value::String(s)), Value::String(sub)) => s.contains(sub.as_str()),
            _ => false,
        },
        "$exists" => actual.is_some() == arg.as_bool().unwrap_or(true),
        other => bail!("unknown query operator {other} (supported: $eq $ne $gt $gte $lt $lte $in $nin $contains $exists)"),
    })
}

/// What an update does, from `{"$set": {...}, "$unset": {...}, "$inc": {...}}` (bare fields
/// mean `$set`).
#[derive(Default)]
struct Changes {
    set: Vec<(String, Value)>,
    unset: Vec<String>,
    inc: Vec<(String, f64)>,
}

fn parse_changes(changes: &Value) -> Result<Changes> {
    let Value::Object(map) = changes else {
        bail!("changes must be an object");
    };
    let mut out = Changes::default();
    let check = |path: &str| -> Result<()> {
        if path == "id"
            || path == "_createdAt"
            || path == "_updatedAt"
            || path.split('.').next() == Some(STAMPS)
        {
            bail!("field {path} cannot be changed");
        }
        if path.is_empty() || path.split('.').any(str::is_empty) {
            bail!("invalid field path {path:?}");
        }
        Ok(())
    };
    for (key, value) in map {
        match key.as_str() {
            "$set" => {
                let fields = value
                    .as_object()
                    .ok_or_else(|| anyhow!("$set needs an object"))?;
                for (path, v) in fields {
                    check(path)?;
                    out.set.push((path.clone(), v.clone()));
                }
            }
            "$unset" => match value {
                Value::Object(fields) => {
                    for path in fields.keys() {
                        check(path)?;
                        out.unset.push(path.clone());
                    }
                }
                Value::Array(paths) => {
                    for p in paths {
                        let path = p
                            .as_str()
                            .ok_or_else(|| anyhow!("$unset lists field names"))?;
                        check(path)?;
                        out.unset.push(path.to_string());
                    }
                }
                _ => bail!("$unset needs an object or an array of field names"),
            },
            "$inc" => {
                let fields = value
                    .as_object()
                    .ok_or_else(|| anyhow!("$inc needs an object"))?;
                for (path, v) in fields {
                    check(path)?;
                    let n = v
                        .as_f64()
                        .filter(|n| n.is_finite())
                        .ok_or_else(|| anyhow!("$inc of {path} needs a number"))?;
                    out.inc.push((path.clone(), n));
                }
            }
            op if op.starts_with('$') => {
                bail!("unknown update operator {op} (supported: $set $unset $inc)")
            }
            path => {
                check(path)?;
                out.set.push((path.to_string(), value.clone()));
            }
        }
    }
    Ok(out)
}

/// Applies `changes` to every matching document in one transaction; returns how many.
pub fn update(
    db: &mut Db,
    scope: &Scope,
    collection: &str,
    query: &Value,
    changes: &Value,
    now: i64,
    budget: &Budget,
) -> Result<usize> {
    let changes = parse_changes(changes)?;
    let node = hex::encode(db.site_id().0);
    let mut plans = Vec::new();
    let mut bytes = 0;
    let conn = db.conn();
    scan(conn, scope, collection, query, true, budget, |doc, size| {
        budget.spend(&mut bytes, size, "ds.update would rewrite")?;
        // What the stored document becomes: stored values (without counter totals) changed.
        let stored = load_raw(conn, scope, collection, &doc.id)?;
        let mut data = stored.clone();
        for (path, value) in &changes.set {
            set_path(&mut data, path, value.clone())?;
        }
        for path in &changes.unset {
            unset_path(&mut data, path);
        }
        // Every field set or unset gets a new stamp, whether or not this node has seen it
        // counted: another node may be incrementing it concurrently, and the set must win.
        let touched = changes.set.iter().map(|(p, _)| p).chain(&changes.unset);
        let mut touched = touched.peekable();
        if touched.peek().is_some() {
            let stamp = new_id();
            let stamps = data
                .entry(STAMPS.to_string())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(s) = stamps {
                for path in touched {
                    s.insert(path.clone(), Value::String(stamp.clone()));
                }
            }
        }
        let mut incs = Vec::new();
        for (path, n) in &changes.inc {
            // The field as the app sees it must be a number (or absent).
            match lookup(&doc.data, path) {
                None | Some(Value::Number(_)) | Some(Value::Null) => {}
                Some(other) => bail!(
                    "cannot $inc {path} of document {:?}: it holds {}",
                    doc.id,
                    kind(other)
                ),
            }
            if changes.set.iter().any(|(p, _)| p == path) {
                // Set and incremented at once: the sum is the new stored value.
                let base = lookup(&data, path).and_then(Value::as_f64).unwrap_or(0.0);
                set_path(&mut data, path, number(base + n))?;
                continue;
            }
            let stamp = stamp_of(&data, path);
            incs.push((path.clone(), stamp, *n));
        }
        let text = (data != stored)
            .then(|| check_doc_size(&data))
            .transpose()?;
        plans.push((doc.id, text, incs));
        Ok(true)
    })?;
    if plans.is_empty() {
        return Ok(0);
    }
    db.write(|tx| super::quota::guard(tx, &scope.app_id, || {
        for (id, text, incs) in &plans {
            if let Some(text) = text {
                tx.prepare_cached(
                    "UPDATE app_docs SET data = ?5, updated_at = ?6
                     WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND id = ?4",
                )?
                .execute(params![scope.app_id, scope.user_id, collection, id, text, now])?;
            } else {
                tx.prepare_cached(
                    "UPDATE app_docs SET updated_at = ?5
                     WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND id = ?4",
                )?
                .execute(params![scope.app_id, scope.user_id, collection, id, now])?;
            }
            for (field, stamp, n) in incs {
                // This node's total restarts when the field was set since it last counted.
                tx.prepare_cached(
                    "INSERT INTO app_doc_counters (app_id, user_id, collection, doc_id, field, node, base, amount)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                     ON CONFLICT (app_id, user_id, collection, doc_id, field, node) DO UPDATE SET
                       amount = CASE WHEN base = excluded.base THEN amount + excluded.amount ELSE excluded.amount END,
                       base = excluded.base",
                )?
                .execute(params![scope.app_id, scope.user_id, collection, id, field, node, stamp, n])?;
            }
        }
        Ok(())
    }))?;
    Ok(plans.len())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A document's stored fields (stamps included, counter totals not applied).
fn load_raw(
    conn: &Connection,
    scope: &Scope,
    collection: &str,
    id: &str,
) -> Result<Map<String, Value>> {
    let data: String = conn
        .prepare_cached("SELECT data FROM app_docs WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND id = ?4")?
        .query_row(params![scope.app_id, scope.user_id, collection, id], |r| r.get(0))?;
    Ok(match serde_json::from_str(&data) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    })
}

/// Deletes every matching document (and its counters); returns how many.
pub fn delete(
    db: &mut Db,
    scope: &Scope,
    collection: &str,
    query: &Value,
    budget: &Budget,
) -> Result<usize> {
    let mut ids = Vec::new();
    let mut bytes = 0;
    scan(
        db.conn(),
        scope,
        collection,
        query,
        true,
        budget,
        |doc, _| {
            budget.spend(&mut bytes, doc.id.len() + 64, "ds.delete would collect")?;
            ids.push(doc.id);
            Ok(true)
        },
    )?;
    if ids.is_empty() {
        return Ok(0);
    }
    db.write(|tx| {
        for id in &ids {
            tx.prepare_cached("DELETE FROM app_docs WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND id = ?4")?
                .execute(params![scope.app_id, scope.user_id, collection, id])?;
            tx.prepare_cached(
                "DELETE FROM app_doc_counters WHERE app_id = ?1 AND user_id = ?2 AND collection = ?3 AND doc_id = ?4",
            )?
            .execute(params![scope.app_id, scope.user_id, collection, id])?;
        }
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ids.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::create(&dir.path().join("data.db")).unwrap();
        (dir, db)
    }

    #[test]
    fn queries_use_every_operator_and_dotted_paths() {
        let (_d, mut db) = db();
        let s = Scope::app("a");
        for (i, (name, tags)) in [("ann", vec!["x"]), ("bob", vec!["y", "z"]), ("cy", vec![])]
            .iter()
            .enumerate()
        {
            insert(
                &mut db,
                &s,
                "p",
                json!({"name": name, "n": i, "tags": tags, "addr": {"city": format!("c{i}")}}),
                i as i64,
            )
            .unwrap();
        }
        let names = |q: Value| -> Vec<String> {
            let opts = FindOptions {
                ascending: true,
                ..Default::default()
            };
            find(db.conn(), &s, "p", &q, &opts, &Budget::untimed())
                .unwrap()
                .iter()
                .map(|d| d["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(names(json!({"name": "bob"})), ["bob"]);
        assert_eq!(names(json!({"n": {"$gte": 1}})), ["bob", "cy"]);
        assert_eq!(names(json!({"n": {"$gt": 0, "$lt": 2}})), ["bob"]);
        assert_eq!(names(json!({"n": {"$lte": 0}})), ["ann"]);
        assert_eq!(names(json!({"name": {"$ne": "ann"}})), ["bob", "cy"]);
        assert_eq!(
            names(json!({"name": {"$in": ["ann", "cy"]}})),
            ["ann", "cy"]
        );
        assert_eq!(names(json!({"name": {"$nin": ["ann", "cy"]}})), ["bob"]);
        assert_eq!(names(json!({"tags": {"$contains": "z"}})), ["bob"]);
        assert_eq!(names(json!({"name": {"$contains": "o"}})), ["bob"]);
        assert_eq!(names(json!({"addr.city": "c2"})), ["cy"]);
        assert_eq!(names(json!({"missing": null})).len(), 3);
        assert_eq!(names(json!({"n": 1.0})), ["bob"]);
        assert!(find(
            db.conn(),
            &s,
            "p",
            &json!({"n": {"$near": 1}}),
            &FindOptions::default(),
            &Budget::untimed()
        )
        .is_err());
        assert_eq!(
            count(db.conn(), &s, "p", &json!({}), &Budget::untimed()).unwrap(),
            3
        );
        assert_eq!(
            count(
                db.conn(),
                &Scope::app("b"),
                "p",
                &json!({}),
                &Budget::untimed()
            )
            .unwrap(),
            0
        );
    }

    #[test]
    fn updates_set_unset_and_count_up() {
        let (_d, mut db) = db();
        let s = Scope::app("a");
        let id = insert(
            &mut db,
            &s,
            "c",
            json!({"n": 1, "keep": true, "drop": 1}),
            1,
        )
        .unwrap();
        assert_eq!(
            update(
                &mut db,
                &s,
                "c",
                &json!(id.clone()),
                &json!({"$inc": {"n": 2}, "$unset": {"drop": 1}, "label": "x"}),
                2,
                &Budget::untimed()
            )
            .unwrap(),
            1
        );
        let doc = find_one(db.conn(), &s, "c", &json!(id.clone()), &Budget::untimed())
            .unwrap()
            .unwrap();
        assert_eq!(doc["n"], json!(3));
        assert_eq!(doc["label"], json!("x"));
        assert!(doc.get("drop").is_none());
        assert!(doc.get(STAMPS).is_none());
        update(
            &mut db,
            &s,
            "c",
            &json!({}),
            &json!({"$inc": {"n": 0.5}}),
            3,
            &Budget::untimed(),
        )
        .unwrap();
        assert_eq!(
            find_one(db.conn(), &s, "c", &json!(id.clone()), &Budget::untimed())
                .unwrap()
                .unwrap()["n"],
            json!(3.5)
        );
        // Setting a counter starts it afresh.
        update(
            &mut db,
            &s,
            "c",
            &json!({}),
            &json!({"$set": {"n": 10}}),
            4,
            &Budget::untimed(),
        )
        .unwrap();
        update(
            &mut db,
            &s,
            "c",
            &json!({}),
            &json!({"$inc": {"n": 1}}),
            5,
            &Budget::untimed(),
        )
        .unwrap();
        assert_eq!(
            find_one(db.conn(), &s, "c", &json!(id.clone()), &Budget::untimed())
                .unwrap()
                .unwrap()["n"],
            json!(11)
        );
        assert!(update(
            &mut db,
            &s,
            "c",
            &json!({}),
            &json!({"$inc": {"label": 1}}),
            6,
            &Budget::untimed()
        )
        .is_err());
        assert!(update(
            &mut db,
            &s,
            "c",
            &json!({}),
            &json!({"$push": {"a": 1}}),
            6,
            &Budget::untimed()
        )
        .is_err());
        assert_eq!(
            delete(&mut db, &s, "c", &json!({"keep": true}), &Budget::untimed()).unwrap(),
            1
        );
        assert_eq!(
            count(db.conn(), &s, "c", &json!({}), &Budget::untimed()).unwrap(),
            0
        );
    }

    #[test]
    fn a_set_beats_increments_made_concurrently_on_another_node() {
        let (_d, mut db) = db();
        let s = Scope::app("a");
        let id = insert(&mut db, &s, "c", json!({"n": 1, "home": {"visits": 1}}), 1).unwrap();
        let set = |db: &mut Db, changes: Value| {
            update(db, &s, "c", &json!({}), &changes, 2, &Budget::untimed()).unwrap()
        };
        // Set here, where neither field was ever incremented...
        set(&mut db, json!({"$set": {"n": 100, "home": {"visits": 5}}}));
        // ...while another node, which had not seen the sets, incremented both fields.
        for field in ["n", "home.visits"] {
            db.write(|tx| {
                tx.execute(
                    "INSERT INTO app_doc_counters (app_id, user_id, collection, doc_id, field, node, base, amount)
                     VALUES ('a', '', 'c', ?1, ?2, 'ff', '', 7)",
                    params![id, field],
                )
            })
            .unwrap();
        }
        let doc = |db: &Db| {
            find_one(db.conn(), &s, "c", &json!(id.clone()), &Budget::untimed())
                .unwrap()
                .unwrap()
        };
        let doc_now = doc(&db);
        assert_eq!(
            (doc_now["n"].clone(), doc_now["home"].clone()),
            (json!(100), json!({"visits": 5}))
        );
        // Increments made after the set count.
        set(&mut db, json!({"$inc": {"n": 1, "home.visits": 2}}));
        let doc_now = doc(&db);
        assert_eq!(
            (doc_now["n"].clone(), doc_now["home"].clone()),
            (json!(101), json!({"visits": 7}))
        );
    }

    /// Filtering in SQL only narrows what the evaluator sees: on awkward data (mixed types,
    /// missing fields, arrays, big integers, odd keys, counters, unparseable rows) every query
    /// answers exactly what evaluating every document answers.
    #[test]
    fn sql_filtering_agrees_with_the_evaluator() {
        let (_d, mut db) = db();
        let s = Scope::app("a");
        let docs = [
            json!({"v": 1, "w": "1"}),
            json!({"v": 1.0}),
            json!({"v": "1"}),
            json!({"v": "10"}),
            json!({"v": "b"}),
            json!({"v": true}),
            json!({"v": false}),
            json!({"v": null}),
            json!({"v": [1, "b", null]}),
            json!({"v": [[1]]}),
            json!({"v": {"x": 1}}),
            json!({"v": 9007199254740993u64}),
            json!({"v": 9007199254740992.0}),
            json!({"v": -0.5, "a b": {"c\"d": 1}}),
            json!({"w": 2}),
            json!({"v": {"0": "key"}, "arr": [{"x": 5}]}),
            json!({"v": "héllo", "n": 3}),
            json!({"a b": 1, "x[0]": {"y": 2}, "é": "3", "$y": 4}),
            json!({}),
        ];
        for (i, d) in docs.iter().enumerate() {
            let mut d = d.clone();
            d["id"] = json!(format!("d{i:02}"));
            insert(&mut db, &s, "c", d, i as i64).unwrap();
        }
        // A counter field: its stored value (3) differs from what apps see (3 + 4).
        update(
            &mut db,
            &s,
            "c",
            &json!("d16"),
            &json!({"$inc": {"n": 4}}),
            99,
            &Budget::untimed(),
        )
        .unwrap();
        // A row no JSON parser accepts (say, written by a buggy peer): an empty document.
        db.write(|tx| {
            tx.execute(
                "INSERT INTO app_docs (app_id, user_id, collection, id, data, created_at, updated_at)
                 VALUES ('a', '', 'c', 'bad', '{not json', 100, 100)",
                [],
            )
        })
        .unwrap();
        // Plain fields are filtered in SQL; ids, counter fields and array indexes are not.
        let mut push = Pushdown::default();
        let q = json!({"v": 1, "id": "x", "n": 1, "a.0": 1, "_createdAt": 1});
        push.query(&normalize_query(&q).unwrap(), &["n".to_string()]);
        assert_eq!(push.params.len(), 2, "{}", push.sql);
        let all: Vec<Value> = {
            let opts = FindOptions {
                ascending: true,
                ..Default::default()
            };
            find(db.conn(), &s, "c", &json!({}), &opts, &Budget::untimed()).unwrap()
        };
        assert_eq!(all.len(), docs.len() + 1);
        let queries = [
            json!({"v": 1}),
            json!({"v": 1.0}),
            json!({"v": "1"}),
            json!({"v": "b"}),
            json!({"v": true}),
            json!({"v": false}),
            json!({"v": null}),
            json!({"v": [1]}),
            json!({"v": {"x": 1}}),
            json!({"v": 9007199254740992u64}),
            json!({"v": {"$gt": 0}}),
            json!({"v": {"$gte": "1"}}),
            json!({"v": {"$lt": "c"}}),
            json!({"v": {"$lte": 1}}),
            json!({"v": {"$gt": true}}),
            json!({"v": {"$in": [1, "b", null]}}),
            json!({"v": {"$in": []}}),
            json!({"v": {"$nin": [1, "b"]}}),
            json!({"v": {"$ne": 1}}),
            json!({"v": {"$exists": true}}),
            json!({"v": {"$exists": false}}),
            json!({"v": {"$exists": 0}}),
            json!({"v": {"$contains": "b"}}),
            json!({"v": {"$contains": "é"}}),
            json!({"v": {"$contains": 1}}),
            json!({"v": {"$contains": ""}}),
            json!({"v.x": 1}),
            json!({"v.0": 1}),
            json!({"v.0": "key"}),
            json!({"arr.0.x": 5}),
            json!({"a b.c\"d": 1}),
            json!({"a b": 1}),
            json!({"x[0].y": 2}),
            json!({"x": {"$exists": true}}),
            json!({"é": "3"}),
            json!({"$y": 4}),
            json!({"n": 7}),
            json!({"n": 3}),
            json!({"n": {"$gt": 5}}),
            json!({"w": {"$gte": 1}}),
            json!({"id": "d03"}),
            json!({"_createdAt": {"$gte": 15}}),
            json!({"v": {"$gt": 0, "$lt": 2}}),
            json!({"v": {"$gt": "1", "$contains": "0"}}),
        ];
        for q in queries {
            let want: Vec<&Value> = all
                .iter()
                .filter(|d| matches(d, &normalize_query(&q).unwrap()).unwrap())
                .collect();
            let opts = FindOptions {
                ascending: true,
                ..Default::default()
            };
            let got = find(db.conn(), &s, "c", &q, &opts, &Budget::untimed()).unwrap();
            assert_eq!(got.iter().collect::<Vec<_>>(), want, "query {q}");
            assert_eq!(
                count(db.conn(), &s, "c", &q, &Budget::untimed()).unwrap(),
                want.len(),
                "count {q}"
            );
        }
    }

    #[test]
    fn reads_stop_at_the_limit_and_refuse_too_many_bytes() {
        let (_d, mut db) = db();
        let s = Scope::app("a");
        let big = "x".repeat(100_000);
        for i in 0..30 {
            insert(&mut db, &s, "c", json!({"i": i, "big": big}), i).unwrap();
        }
        let mut budget = Budget::untimed();
        budget.max_bytes = 1_000_000;
        let newest = FindOptions {
            limit: Some(3),
            ..Default::default()
        };
        let got = find(db.conn(), &s, "c", &json!({}), &newest, &budget).unwrap();
        assert_eq!(
            got.iter().map(|d| d["i"].clone()).collect::<Vec<_>>(),
            [json!(29), json!(28), json!(27)]
        );
        let paged = FindOptions {
            limit: Some(2),
            offset: 25,
            ascending: true,
        };
        let got = find(db.conn(), &s, "c", &json!({}), &paged, &budget).unwrap();
        assert_eq!(
            got.iter().map(|d| d["i"].clone()).collect::<Vec<_>>(),
            [json!(25), json!(26)]
        );
        let err = find(
            db.conn(),
            &s,
            "c",
            &json!({}),
            &FindOptions::default(),
            &budget,
        )
        .unwrap_err();
        assert!(
            format!("{err}").starts_with("ds.find would return more than 0 MiB: narrow the query"),
            "{err}"
        );
        // Counting holds one document at a time, whatever the collection's size.
        assert_eq!(
            count(db.conn(), &s, "c", &json!({"i": {"$gte": 10}}), &budget).unwrap(),
            20
        );
        let err = update(
            &mut db,
            &s,
            "c",
            &json!({}),
            &json!({"$set": {"big": 1}}),
            50,
            &budget,
        )
        .unwrap_err();
        assert!(
            format!("{err}").starts_with("ds.update would rewrite more than"),
            "{err}"
        );
        assert_eq!(
            count(db.conn(), &s, "c", &json!({"big": 1}), &budget).unwrap(),
            0
        );
        let expired = Budget::new(std::sync::Arc::new(|| true));
        let err = count(db.conn(), &s, "c", &json!({}), &expired).unwrap_err();
        assert_eq!(
            format!("{err}"),
            "the request ran out of time while using app storage"
        );
    }

    /// SQLite's own loops (a scan that skips rows in SQL) stop at the deadline too: the
    /// worker's progress handler interrupts them, and the app is told why.
    #[test]
    fn sqlite_work_stops_when_the_progress_handler_says_so() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.db");
        let mut db = crate::db::create(&path).unwrap();
        let s = Scope::app("a");
        for i in 0..50 {
            insert(&mut db, &s, "c", json!({"i": i}), i).unwrap();
        }
        drop(db);
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let db = crate::db::open_existing_with(&path, move |c| {
            c.progress_handler(1, Some(move || flag.load(Ordering::Relaxed)))?;
            Ok(())
        })
        .unwrap();
        let q = json!({"i": {"$gte": 10}});
        assert_eq!(
            count(db.conn(), &s, "c", &q, &Budget::untimed()).unwrap(),
            40
        );
        stop.store(true, Ordering::Relaxed);
        let err = count(db.conn(), &s, "c", &q, &Budget::untimed()).unwrap_err();
        assert_eq!(
            format!("{:#}", crate::storage::explain(err)),
            "the request ran out of time while using app storage"
        );
    }
}
