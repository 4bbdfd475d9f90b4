//! SQLite values as the engine compares and ships them.

use std::cmp::Ordering;

use rusqlite::types::{ToSqlOutput, Value as SqlValue, ValueRef};

/// One SQLite value. Ordering follows cr-sqlite's tie-break between concurrent writes of the
/// same column version: across types INTEGER > REAL > TEXT > BLOB > NULL; numbers compare
/// numerically within their type, text and blobs bytewise.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// NULL.
    Null,
    /// A 64-bit signed integer.
    Integer(i64),
    /// A 64-bit float.
    Real(f64),
    /// UTF-8 text.
    Text(String),
    /// Bytes.
    Blob(Vec<u8>),
}

impl Value {
    fn type_rank(&self) -> u8 {
        match self {
            Value::Null => 0,
            Value::Blob(_) => 1,
            Value::Text(_) => 2,
            Value::Real(_) => 3,
            Value::Integer(_) => 4,
        }
    }

    /// Copies a value read from SQLite (text that is not UTF-8 is converted lossily).
    pub fn from_ref(v: ValueRef<'_>) -> Value {
        match v {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => Value::Integer(i),
            ValueRef::Real(f) => Value::Real(f),
            ValueRef::Text(t) => Value::Text(String::from_utf8_lossy(t).into_owned()),
            ValueRef::Blob(b) => Value::Blob(b.to_vec()),
        }
    }

    /// A total order: the merge's tie-break must give the same answer on every replica.
    pub fn merge_cmp(&self, other: &Value) -> Ordering {
        match (self, other) {
            (Value::Integer(a), Value::Integer(b)) => a.cmp(b),
            (Value::Real(a), Value::Real(b)) => a.total_cmp(b),
            (Value::Text(a), Value::Text(b)) => a.as_bytes().cmp(b.as_bytes()),
            (Value::Blob(a), Value::Blob(b)) => a.cmp(b),
            _ => self.type_rank().cmp(&other.type_rank()),
        }
    }
}

impl rusqlite::ToSql for Value {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Value::Null => ToSqlOutput::Owned(SqlValue::Null),
            Value::Integer(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Value::Real(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            Value::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Value::Blob(b) => ToSqlOutput::Borrowed(ValueRef::Blob(b)),
        })
    }
}

impl rusqlite::types::FromSql for Value {
    fn column_result(v: ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
        Ok(Value::from_ref(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_order_integer_real_text_blob_null() {
        let ordered = [
            Value::Null,
            Value::Blob(vec![0xff]),
            Value::Text("zzz".into()),
            Value::Real(1e300),
            Value::Integer(-5),
        ];
        for w in ordered.windows(2) {
            assert_eq!(
                w[0].merge_cmp(&w[1]),
                Ordering::Less,
                "{:?} < {:?}",
                w[0],
                w[1]
            );
        }
        assert_eq!(
            Value::Integer(5).merge_cmp(&Value::Real(100.5)),
            Ordering::Greater
        );
        assert_eq!(
            Value::Text("b".into()).merge_cmp(&Value::Text("ab".into())),
            Ordering::Greater
        );
    }
}
