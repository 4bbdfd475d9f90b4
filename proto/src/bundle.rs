//! Change bundles: the file format that carries changes between nodes that never meet
//! online (`fazt sync export` / `fazt sync import`).
//!
//! ```text
//! magic     8 bytes  "FAZTBNDL"
//! version   u16 LE   FORMAT_VERSION; a reader refuses newer versions
//! sender    16 bytes site id of the exporting replica
//! records   tag byte + body, until tag 0:
//!             1 string: varint length, UTF-8 bytes      (interned: table and column names)
//!             2 site:   16 bytes                        (interned: origin site ids)
//!             3 change: varint table, varint cid, varint site (indexes into the above),
//!                       zigzag db_version, zigzag seq, zigzag col_version, zigzag cl,
//!                       varint pk length + packed pk, value
//!             4 cover:  varint site, zigzag start, zigzag end (an inclusive version range)
//! end       tag 0
//! checksum  u32 LE   CRC-32 of every byte before it
//! ```
//! Values: tag 0 NULL, 1 INTEGER (zigzag varint), 2 REAL (8 bytes LE), 3 TEXT and 4 BLOB
//! (varint length + bytes). Within an origin, changes come in (db_version, seq) order.
//! Cover records name the versions the bundle completes; the reader reports them as they
//! come, so an importer can apply a large bundle in several transactions.

use std::collections::HashMap;
use std::io::{self, Read, Write};

use crate::codec::{unzigzag, zigzag};

pub const MAGIC: [u8; 8] = *b"FAZTBNDL";
pub const FORMAT_VERSION: u16 = 1;
/// Longest string or blob a bundle may carry (guards allocations on hostile input).
const MAX_LEN: u64 = 1 << 30;

#[derive(Debug, Clone, PartialEq)]
pub enum WireValue {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct WireChange {
    pub table: String,
    pub pk: Vec<u8>,
    pub cid: String,
    pub val: WireValue,
    pub col_version: i64,
    pub db_version: i64,
    pub site: [u8; 16],
    pub cl: i64,
    pub seq: i64,
}

/// One record of a bundle as the reader hands it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    Change(WireChange),
    /// The bundle holds everything of `site`'s versions `start..=end`.
    Cover {
        site: [u8; 16],
        start: i64,
        end: i64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("not a fazt change bundle (wrong magic bytes)")]
    NotABundle,
    #[error("bundle format version {0} is newer than this fazt understands ({FORMAT_VERSION}): upgrade fazt")]
    NewerVersion(u16),
    #[error("the bundle is truncated")]
    Truncated,
    #[error("the bundle is corrupt: {0}")]
    Corrupt(&'static str),
    #[error("the bundle's checksum does not match: the file is damaged")]
    Checksum,
    #[error(transparent)]
    Io(io::Error),
}

impl From<io::Error> for BundleError {
    fn from(e: io::Error) -> Self {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            BundleError::Truncated
        } else {
            BundleError::Io(e)
        }
    }
}

const END: u8 = 0;
const STRING: u8 = 1;
const SITE: u8 = 2;
const CHANGE: u8 = 3;
const COVER: u8 = 4;

/// Writes a bundle, hashing everything it writes.
pub struct BundleWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    buf: Vec<u8>,
    strings: HashMap<String, u64>,
    sites: HashMap<[u8; 16], u64>,
    bytes: u64,
}

impl<W: Write> BundleWriter<W> {
    pub fn new(out: W, sender: [u8; 16]) -> io::Result<Self> {
        let mut w = BundleWriter {
            out,
            crc: crc32fast::Hasher::new(),
            buf: Vec::with_capacity(64 * 1024),
            strings: HashMap::new(),
            sites: HashMap::new(),
            bytes: 0,
        };
        w.buf.extend_from_slice(&MAGIC);
        w.buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        w.buf.extend_from_slice(&sender);
        Ok(w)
    }

    fn varint(&mut self, v: u64) {
        crate::codec::put_varint(&mut self.buf, v);
    }

    fn bytes_field(&mut self, b: &[u8]) {
        crate::codec::put_bytes(&mut self.buf, b);
    }

    fn string(&mut self, s: &str) -> u64 {
        if let Some(&i) = self.strings.get(s) {
            return i;
        }
        let i = self.strings.len() as u64;
        self.buf.push(STRING);
        self.bytes_field(s.as_bytes());
        self.strings.insert(s.to_string(), i);
        i
    }

    fn site(&mut self, site: [u8; 16]) -> u64 {
        if let Some(&i) = self.sites.get(&site) {
            return i;
        }
        let i = self.sites.len() as u64;
        self.buf.push(SITE);
        self.buf.extend_from_slice(&site);
        self.sites.insert(site, i);
        i
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= 60 * 1024 {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        self.crc.update(&self.buf);
        self.out.write_all(&self.buf)?;
        self.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    pub fn change(&mut self, c: &WireChange) -> io::Result<()> {
        let table = self.string(&c.table);
        let cid = self.string(&c.cid);
        let site = self.site(c.site);
        self.buf.push(CHANGE);
        self.varint(table);
        self.varint(cid);
        self.varint(site);
        self.varint(zigzag(c.db_version));
        self.varint(zigzag(c.seq));
        self.varint(zigzag(c.col_version));
        self.varint(zigzag(c.cl));
        self.bytes_field(&c.pk);
        match &c.val {
            WireValue::Null => self.buf.push(0),
            WireValue::Integer(i) => {
                self.buf.push(1);
                self.varint(zigzag(*i));
            }
            WireValue::Real(f) => {
                self.buf.push(2);
                self.buf.extend_from_slice(&f.to_le_bytes());
            }
            WireValue::Text(t) => {
                self.buf.push(3);
                self.bytes_field(t.as_bytes());
            }
            WireValue::Blob(b) => {
                self.buf.push(4);
                self.bytes_field(b);
            }
        }
        self.flush_if_full()
    }

    pub fn cover(&mut self, site: [u8; 16], start: i64, end: i64) -> io::Result<()> {
        let s = self.site(site);
        self.buf.push(COVER);
        self.varint(s);
        self.varint(zigzag(start));
        self.varint(zigzag(end));
        self.flush_if_full()
    }

    /// Ends the bundle and writes its checksum; returns the writer and the bundle's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.buf.push(END);
        self.flush_buf()?;
        let sum = self.crc.clone().finalize().to_le_bytes();
        self.out.write_all(&sum)?;
        self.out.flush()?;
        Ok((self.out, self.bytes + 4))
    }
}

/// Reads a bundle record by record. The checksum is checked when the end is reached: a
/// caller that must not act on a damaged file reads it through once ([`verify`]) first.
pub struct BundleReader<R: Read> {
    input: HashingReader<R>,
    strings: Vec<String>,
    sites: Vec<[u8; 16]>,
    sender: [u8; 16],
    done: bool,
}

struct HashingReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> HashingReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), BundleError> {
        self.inner.read_exact(buf)?;
        self.crc.update(buf);
        Ok(())
    }

    fn byte(&mut self) -> Result<u8, BundleError> {
        let mut b = [0u8; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    fn varint(&mut self) -> Result<u64, BundleError> {
        crate::codec::get_varint(|| self.byte(), BundleError::Corrupt("varint too long"))
    }

    fn bytes_field(&mut self) -> Result<Vec<u8>, BundleError> {
        let len = self.varint()?;
        if len > MAX_LEN {
            return Err(BundleError::Corrupt("length out of range"));
        }
        let mut out = Vec::new();
        (&mut self.inner).take(len).read_to_end(&mut out)?;
        if out.len() as u64 != len {
            return Err(BundleError::Truncated);
        }
        self.crc.update(&out);
        Ok(out)
    }
}

impl<R: Read> BundleReader<R> {
    pub fn new(input: R) -> Result<Self, BundleError> {
        let mut input = HashingReader {
            inner: input,
            crc: crc32fast::Hasher::new(),
        };
        let mut magic = [0u8; 8];
        input.exact(&mut magic).map_err(|e| match e {
            BundleError::Truncated => BundleError::NotABundle,
            other => other,
        })?;
        if magic != MAGIC {
            return Err(BundleError::NotABundle);
        }
        let mut version = [0u8; 2];
        input.exact(&mut version)?;
        let version = u16::from_le_bytes(version);
        if version > FORMAT_VERSION {
            return Err(BundleError::NewerVersion(version));
        }
        if version == 0 {
            return Err(BundleError::Corrupt("format version 0"));
        }
        let mut sender = [0u8; 16];
        input.exact(&mut sender)?;
        Ok(BundleReader {
            input,
            strings: Vec::new(),
            sites: Vec::new(),
            sender,
            done: false,
        })
    }

    pub fn sender(&self) -> [u8; 16] {
        self.sender
    }

    fn site_at(&self, i: u64) -> Result<[u8; 16], BundleError> {
        self.sites
            .get(i as usize)
            .copied()
            .ok_or(BundleError::Corrupt("unknown site index"))
    }

    fn string_at(&self, i: u64) -> Result<String, BundleError> {
        self.strings
            .get(i as usize)
            .cloned()
            .ok_or(BundleError::Corrupt("unknown string index"))
    }

    /// The next record, or None at the end (after checking the checksum).
    pub fn next_record(&mut self) -> Result<Option<Record>, BundleError> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.input.byte()? {
                END => {
                    let expected = self.input.crc.clone().finalize();
                    let mut sum = [0u8; 4];
                    self.input.inner.read_exact(&mut sum)?;
                    if u32::from_le_bytes(sum) != expected {
                        return Err(BundleError::Checksum);
                    }
                    let mut rest = [0u8; 1];
                    if self.input.inner.read(&mut rest)? != 0 {
                        return Err(BundleError::Corrupt("bytes after the checksum"));
                    }
                    self.done = true;
                    return Ok(None);
                }
                STRING => {
                    let bytes = self.input.bytes_field()?;
                    let s = String::from_utf8(bytes)
                        .map_err(|_| BundleError::Corrupt("name is not UTF-8"))?;
                    self.strings.push(s);
                }
                SITE => {
                    let mut site = [0u8; 16];
                    self.input.exact(&mut site)?;
                    self.sites.push(site);
                }
                CHANGE => {
                    let (t, c, s) = (
                        self.input.varint()?,
                        self.input.varint()?,
                        self.input.varint()?,
                    );
                    let (table, cid, site) =
                        (self.string_at(t)?, self.string_at(c)?, self.site_at(s)?);
                    let db_version = unzigzag(self.input.varint()?);
                    let seq = unzigzag(self.input.varint()?);
                    let col_version = unzigzag(self.input.varint()?);
                    let cl = unzigzag(self.input.varint()?);
                    let pk = self.input.bytes_field()?;
                    let val = match self.input.byte()? {
                        0 => WireValue::Null,
                        1 => WireValue::Integer(unzigzag(self.input.varint()?)),
                        2 => {
                            let mut b = [0u8; 8];
                            self.input.exact(&mut b)?;
                            WireValue::Real(f64::from_le_bytes(b))
                        }
                        3 => WireValue::Text(
                            String::from_utf8(self.input.bytes_field()?)
                                .map_err(|_| BundleError::Corrupt("text is not UTF-8"))?,
                        ),
                        4 => WireValue::Blob(self.input.bytes_field()?),
                        _ => return Err(BundleError::Corrupt("unknown value type")),
                    };
                    return Ok(Some(Record::Change(WireChange {
                        table,
                        pk,
                        cid,
                        val,
                        col_version,
                        db_version,
                        site,
                        cl,
                        seq,
                    })));
                }
                COVER => {
                    let s = self.input.varint()?;
                    let site = self.site_at(s)?;
                    let start = unzigzag(self.input.varint()?);
                    let end = unzigzag(self.input.varint()?);
                    if start < 1 || end < start {
                        return Err(BundleError::Corrupt("invalid version range"));
                    }
                    return Ok(Some(Record::Cover { site, start, end }));
                }
                _ => return Err(BundleError::Corrupt("unknown record type")),
            }
        }
    }
}

/// Reads a whole bundle and checks it; returns (changes, cover records).
pub fn verify<R: Read>(input: R) -> Result<(u64, u64), BundleError> {
    let mut reader = BundleReader::new(input)?;
    let (mut changes, mut covers) = (0, 0);
    while let Some(record) = reader.next_record()? {
        match record {
            Record::Change(_) => changes += 1,
            Record::Cover { .. } => covers += 1,
        }
    }
    Ok((changes, covers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<u8> {
        let mut w = BundleWriter::new(Vec::new(), [9; 16]).unwrap();
        for i in 0..3 {
            w.change(&WireChange {
                table: "apps".into(),
                pk: vec![1, 9, i as u8],
                cid: "name".into(),
                val: WireValue::Text(format!("app{i}")),
                col_version: 1,
                db_version: 7,
                site: [1; 16],
                cl: 1,
                seq: i,
            })
            .unwrap();
        }
        w.cover([1; 16], 1, 7).unwrap();
        w.finish().unwrap().0
    }

    #[test]
    fn records_round_trip() {
        let bytes = sample();
        let mut r = BundleReader::new(&bytes[..]).unwrap();
        assert_eq!(r.sender(), [9; 16]);
        let mut n = 0;
        while let Some(rec) = r.next_record().unwrap() {
            if let Record::Change(c) = rec {
                assert_eq!(c.val, WireValue::Text(format!("app{n}")));
                n += 1;
            }
        }
        assert_eq!(n, 3);
        assert_eq!(verify(&bytes[..]).unwrap(), (3, 1));
    }

    #[test]
    fn damage_is_detected() {
        let bytes = sample();
        for cut in [0, 5, 20, bytes.len() - 1] {
            assert!(verify(&bytes[..cut]).is_err(), "truncated at {cut}");
        }
        let mut flipped = bytes.clone();
        let mid = bytes.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(verify(&flipped[..]).is_err());
        assert!(matches!(
            verify(&b"PK\x03\x04 some zip file"[..]),
            Err(BundleError::NotABundle)
        ));
        let mut newer = bytes.clone();
        newer[8] = 99;
        assert!(matches!(
            verify(&newer[..]),
            Err(BundleError::NewerVersion(99))
        ));
        let mut extra = bytes;
        extra.push(0);
        assert!(verify(&extra[..]).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&1u16.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = verify(&bytes[..]);
        }
    }
}
