//! A change row as bundles and the peer protocol carry it, and the one encoding of its body
//! that both use.
//!
//! ```text
//! change   table, cid, site (varint indexes into the names and sites declared before),
//!          db_version, seq, col_version, cl (zigzag varints), packed pk (varint length +
//!          bytes), value
//! value    tag 0 NULL, 1 INTEGER (zigzag varint), 2 REAL (8 bytes LE), 3 TEXT and 4 BLOB
//!          (varint length + bytes); on the wire only, 5 BLOB CONTENT and 6 TEXT CONTENT
//!          (digest [32], length varint): a reference to content fetched separately
//! ```
//!
//! Where the names and sites are declared, how long a field may be and what an error says
//! belong to each format: a [`ChangeSource`] supplies them.

use crate::codec::{put_bytes, put_varint, unzigzag, zigzag};
use crate::wire::ContentRef;
use crate::Digest;

/// A column value as bundles and the peer protocol carry it.
#[derive(Debug, Clone, PartialEq)]
pub enum WireValue {
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

/// A change row as bundles and the peer protocol carry it (the fields of cr-sqlite's
/// `crsql_changes`).
#[derive(Debug, Clone, PartialEq)]
pub struct WireChange {
    /// The replicated table.
    pub table: String,
    /// The row's packed primary key.
    pub pk: Vec<u8>,
    /// The column's name, or `-1` for the row's existence.
    pub cid: String,
    /// The column's value.
    pub val: WireValue,
    /// The column's version.
    pub col_version: i64,
    /// The origin's db_version of the write.
    pub db_version: i64,
    /// The origin's site id.
    pub site: [u8; 16],
    /// The row's causal length.
    pub cl: i64,
    /// The write's position in its origin transaction.
    pub seq: i64,
}

const NULL: u8 = 0;
const INTEGER: u8 = 1;
const REAL: u8 = 2;
const TEXT: u8 = 3;
const BLOB: u8 = 4;
const BLOB_CONTENT: u8 = 5;
const TEXT_CONTENT: u8 = 6;

/// Appends a change's body to `buf`: `names` are the indexes of its table and column and
/// `site` of its origin, as the format declared them; a `content` reference replaces the
/// value (the peer protocol only).
pub(crate) fn put_change(
    buf: &mut Vec<u8>,
    names: (u64, u64),
    site: u64,
    c: &WireChange,
    content: Option<&ContentRef>,
) {
    put_varint(buf, names.0);
    put_varint(buf, names.1);
    put_varint(buf, site);
    for v in [c.db_version, c.seq, c.col_version, c.cl] {
        put_varint(buf, zigzag(v));
    }
    put_bytes(buf, &c.pk);
    match (content, &c.val) {
        (Some(content), _) => {
            buf.push(if content.text {
                TEXT_CONTENT
            } else {
                BLOB_CONTENT
            });
            buf.extend_from_slice(content.digest.as_bytes());
            put_varint(buf, content.len);
        }
        (None, WireValue::Null) => buf.push(NULL),
        (None, WireValue::Integer(i)) => {
            buf.push(INTEGER);
            put_varint(buf, zigzag(*i));
        }
        (None, WireValue::Real(f)) => {
            buf.push(REAL);
            buf.extend_from_slice(&f.to_le_bytes());
        }
        (None, WireValue::Text(t)) => {
            buf.push(TEXT);
            put_bytes(buf, t.as_bytes());
        }
        (None, WireValue::Blob(b)) => {
            buf.push(BLOB);
            put_bytes(buf, b);
        }
    }
}

/// Where a change's body is read from, in the words of one format (bundle or wire).
pub(crate) trait ChangeSource {
    /// The format's error.
    type Error;
    /// One byte.
    fn byte(&mut self) -> Result<u8, Self::Error>;
    /// One varint.
    fn varint(&mut self) -> Result<u64, Self::Error>;
    /// `N` bytes.
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Self::Error>;
    /// A length-prefixed field, bounded as the format bounds it.
    fn bytes(&mut self) -> Result<Vec<u8>, Self::Error>;
    /// The table or column name declared at `index`.
    fn name(&self, index: u64) -> Result<String, Self::Error>;
    /// The origin site declared at `index`.
    fn site(&self, index: u64) -> Result<[u8; 16], Self::Error>;
    /// Checks the change's numbers (db_version, seq, col_version, cl) as soon as they are
    /// read, if the format refuses them at decode.
    fn numbers(&self, numbers: [i64; 4]) -> Result<(), Self::Error>;
    /// The bytes break the format.
    fn malformed(what: &'static str) -> Self::Error;
}

/// Reads a change's body (after its record tag, if any). With `content`, the value may be a
/// content reference (returned beside the change, whose value is then NULL); without, such a
/// value is an unknown value type.
pub(crate) fn read_change<S: ChangeSource>(
    src: &mut S,
    content: bool,
) -> Result<(WireChange, Option<ContentRef>), S::Error> {
    let (t, c, s) = (src.varint()?, src.varint()?, src.varint()?);
    let (table, cid, site) = (src.name(t)?, src.name(c)?, src.site(s)?);
    let db_version = unzigzag(src.varint()?);
    let seq = unzigzag(src.varint()?);
    let col_version = unzigzag(src.varint()?);
    let cl = unzigzag(src.varint()?);
    src.numbers([db_version, seq, col_version, cl])?;
    let pk = src.bytes()?;
    let mut reference = None;
    let val = match src.byte()? {
        NULL => WireValue::Null,
        INTEGER => WireValue::Integer(unzigzag(src.varint()?)),
        REAL => WireValue::Real(f64::from_le_bytes(src.array()?)),
        TEXT => WireValue::Text(
            String::from_utf8(src.bytes()?).map_err(|_| S::malformed("text is not UTF-8"))?,
        ),
        BLOB => WireValue::Blob(src.bytes()?),
        tag @ (BLOB_CONTENT | TEXT_CONTENT) if content => {
            reference = Some(ContentRef {
                digest: Digest::from_bytes(src.array()?),
                len: src.varint()?,
                text: tag == TEXT_CONTENT,
            });
            WireValue::Null
        }
        _ => return Err(S::malformed("unknown value type")),
    };
    let change = WireChange {
        table,
        pk,
        cid,
        val,
        col_version,
        db_version,
        site,
        cl,
        seq,
    };
    Ok((change, reference))
}
