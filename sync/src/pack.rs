//! Primary keys packed into one blob, byte for byte as cr-sqlite 0.16.3 packs them in
//! `crsql_changes.pk`, so that our change rows can be compared with cr-sqlite's.
//!
//! Layout: one byte with the number of columns, then per column a type byte (low 3 bits:
//! INTEGER 1, REAL 2, TEXT 3, BLOB 4, NULL 5; high 5 bits: a byte count n) followed by:
//! INTEGER: the value in n big-endian bytes; REAL: 8 big-endian bytes; TEXT and BLOB: the
//! length in n big-endian bytes, then the bytes. n is the smallest count that holds the
//! value's non-zero bytes (0 for the value 0; 8 for any negative number).

use crate::value::Value;

/// A packed primary key that does not follow the layout above.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("malformed packed primary key: {0}")]
pub struct PackError(&'static str);

const INTEGER: u8 = 1;
const REAL: u8 = 2;
const TEXT: u8 = 3;
const BLOB: u8 = 4;
const NULL: u8 = 5;

fn width(v: u64) -> u8 {
    (8 - (v.leading_zeros() / 8)) as u8
}

fn put_sized(out: &mut Vec<u8>, tag: u8, n: u64) {
    let w = width(n);
    out.push(w << 3 | tag);
    out.extend_from_slice(&n.to_be_bytes()[8 - w as usize..]);
}

/// Packs a primary key's values, in primary-key order.
pub fn pack(values: &[Value]) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 + values.len() * 9);
    out.push(values.len() as u8);
    for v in values {
        match v {
            Value::Integer(i) => put_sized(&mut out, INTEGER, *i as u64),
            Value::Real(f) => {
                out.push(REAL);
                out.extend_from_slice(&f.to_be_bytes());
            }
            Value::Text(t) => {
                put_sized(&mut out, TEXT, t.len() as u64);
                out.extend_from_slice(t.as_bytes());
            }
            Value::Blob(b) => {
                put_sized(&mut out, BLOB, b.len() as u64);
                out.extend_from_slice(b);
            }
            Value::Null => out.push(NULL),
        }
    }
    out
}

/// The values of a packed primary key; refuses bytes that do not follow the layout
/// (truncated, trailing bytes, unknown types, text that is not UTF-8).
pub fn unpack(mut data: &[u8]) -> Result<Vec<Value>, PackError> {
    fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], PackError> {
        if data.len() < n {
            return Err(PackError("truncated"));
        }
        let (head, rest) = data.split_at(n);
        *data = rest;
        Ok(head)
    }
    fn int(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0u64, |acc, b| acc << 8 | *b as u64)
    }
    let count = take(&mut data, 1)?[0];
    let mut values = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let tag = take(&mut data, 1)?[0];
        let n = (tag >> 3) as usize;
        if n > 8 {
            return Err(PackError("integer wider than 8 bytes"));
        }
        values.push(match tag & 7 {
            INTEGER => Value::Integer(int(take(&mut data, n)?) as i64),
            REAL => Value::Real(f64::from_be_bytes(
                take(&mut data, 8)?.try_into().expect("8 bytes"),
            )),
            TEXT => {
                let len = int(take(&mut data, n)?) as usize;
                let bytes = take(&mut data, len)?;
                Value::Text(
                    String::from_utf8(bytes.to_vec())
                        .map_err(|_| PackError("text is not UTF-8"))?,
                )
            }
            BLOB => {
                let len = int(take(&mut data, n)?) as usize;
                Value::Blob(take(&mut data, len)?.to_vec())
            }
            NULL => Value::Null,
            _ => return Err(PackError("unknown type")),
        });
    }
    if !data.is_empty() {
        return Err(PackError("trailing bytes"));
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn matches_cr_sqlite_bytes() {
        assert_eq!(pack(&[Value::Integer(1)]), [0x01, 0x09, 0x01]);
        assert_eq!(pack(&[Value::Integer(0)]), [0x01, 0x01]);
        assert_eq!(pack(&[Value::Integer(256)]), [0x01, 0x11, 0x01, 0x00]);
        assert_eq!(
            pack(&[Value::Integer(-1)]),
            [0x01, 0x41, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff]
        );
        assert_eq!(
            pack(&[Value::Text("ab".into())]),
            [0x01, 0x0b, 0x02, b'a', b'b']
        );
        assert_eq!(pack(&[Value::Text(String::new())]), [0x01, 0x03]);
        assert_eq!(
            pack(&[Value::Null, Value::Blob(vec![7])]),
            [0x02, 0x05, 0x0c, 0x01, 0x07]
        );
    }

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<i64>().prop_map(Value::Integer),
            any::<f64>()
                .prop_filter("NaN never equals itself", |f| !f.is_nan())
                .prop_map(Value::Real),
            ".{0,40}".prop_map(Value::Text),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Value::Blob),
        ]
    }

    proptest! {
        #[test]
        fn unpack_inverts_pack(values in proptest::collection::vec(value(), 1..5)) {
            prop_assert_eq!(unpack(&pack(&values)).unwrap(), values);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = unpack(&bytes);
        }
    }
}
