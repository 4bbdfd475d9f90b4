//! Change bundles: the file format that carries changes between nodes that never meet
//! online (`fazt sync export` / `fazt sync import`).
//!
//! ```text
//! magic     8 bytes  "FAZTBNDL"
//! version   u16 LE   FORMAT_VERSION; a reader refuses newer versions
//! sender    16 bytes site id of the exporting replica
//! signer    32 bytes ed25519 public key (node id) of the exporting node   (version 2)
//! records   tag byte + body, until tag 0:
//!             1 string: varint length, UTF-8 bytes      (interned: table and column names)
//!             2 site:   16 bytes                        (interned: origin site ids)
//!             3 change: varint table, varint cid, varint site (indexes into the above),
//!                       zigzag db_version, zigzag seq, zigzag col_version, zigzag cl,
//!                       varint pk length + packed pk, value (the encoding the peer
//!                       protocol shares: [`crate::change`])
//!             4 cover:  varint site, zigzag start, zigzag end (an inclusive version range)
//! end       tag 0
//! signature 64 bytes ed25519 by `signer` over SIGNATURE_CONTEXT + SHA-512 of every byte
//!                    from the magic through the end tag                    (version 2)
//! checksum  u32 LE   CRC-32 of every byte before it
//! ```
//! Values: tag 0 NULL, 1 INTEGER (zigzag varint), 2 REAL (8 bytes LE), 3 TEXT and 4 BLOB
//! (varint length + bytes). Within an origin, changes come in (db_version, seq) order.
//! Cover records name the versions the bundle completes; the reader reports them as they
//! come, so an importer can apply a large bundle in several transactions.
//!
//! The reader checks the checksum and then the signature when it reaches the end: a bad
//! signature is an error, never a warning. Version 1 (no signer, no signature) is still
//! read; [`BundleReader::signer`] is then `None` and the caller decides (fazt refuses it
//! unless told to trust unknown signers). Both sides enforce the same limits
//! ([`MAX_STRINGS`], [`MAX_STRING_BYTES`], [`MAX_SITES`], [`MAX_TXN_CHANGES`],
//! [`MAX_TXN_BYTES`]), so the writer never produces a bundle the reader refuses.

use std::collections::HashMap;
use std::io::{self, Read, Write};

pub use ed25519_dalek::SigningKey;
use ed25519_dalek::{Signature, Signer, VerifyingKey};
use sha2::{Digest, Sha512};

use crate::change::{put_change, read_change, ChangeSource};
use crate::codec::{unzigzag, zigzag};
use crate::NodeId;

/// The change a bundle carries (defined with its encoding in [`crate::change`]).
pub use crate::change::{WireChange, WireValue};

/// The first bytes of every bundle.
pub const MAGIC: [u8; 8] = *b"FAZTBNDL";
/// The format version this build writes; it reads this one and older.
pub const FORMAT_VERSION: u16 = 2;
/// Domain separation for bundle signatures: the signed message is this followed by the
/// SHA-512 digest of the bundle's content, so a bundle signature is never valid as anything
/// else the node key signs (TLS handshakes), nor the other way round.
pub const SIGNATURE_CONTEXT: &[u8] = b"fazt change bundle v2 signature\0";
/// Interned table and column names a bundle may declare.
pub const MAX_STRINGS: usize = 65_536;
/// Total bytes of the interned names a bundle may declare.
pub const MAX_STRING_BYTES: u64 = 16 << 20;
/// Interned origin site ids a bundle may declare (one per node that ever wrote).
pub const MAX_SITES: usize = 65_536;
/// Changes one origin transaction may hold in a bundle (an importer holds one whole
/// origin transaction in memory to apply it atomically).
pub const MAX_TXN_CHANGES: u64 = 1_000_000;
/// Encoded bytes one origin transaction may take in a bundle.
pub const MAX_TXN_BYTES: u64 = 1 << 30;
/// Longest string or blob a bundle may carry (guards allocations on hostile input).
const MAX_LEN: u64 = MAX_TXN_BYTES;

/// One record of a bundle as the reader hands it out.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A change.
    Change(WireChange),
    /// The bundle holds everything of `site`'s versions `start..=end`.
    Cover {
        /// The origin's site id.
        site: [u8; 16],
        /// The first version held.
        start: i64,
        /// The last version held.
        end: i64,
    },
}

/// Why a bundle could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// The input does not start with [`MAGIC`].
    #[error("not a fazt change bundle (wrong magic bytes)")]
    NotABundle,
    /// The format is newer than [`FORMAT_VERSION`].
    #[error("bundle format version {0} is newer than this fazt understands ({FORMAT_VERSION}): upgrade fazt")]
    NewerVersion(u16),
    /// The input ends before the bundle does.
    #[error("the bundle is truncated")]
    Truncated,
    /// The bytes break the format; the text says how.
    #[error("the bundle is corrupt: {0}")]
    Corrupt(&'static str),
    /// The CRC-32 does not match.
    #[error("the bundle's checksum does not match: the file is damaged")]
    Checksum,
    /// The signature does not verify with the signer's key.
    #[error("the bundle's signature does not match its content: it was altered after it was signed, or node {0} never signed it; refused (ask for a fresh export)")]
    BadSignature(NodeId),
    /// The bundle exceeds one of the limits; the text names it.
    #[error("{0}")]
    Limit(String),
    /// Reading or writing failed.
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

/// Tracks the origin transaction being read or written against [`MAX_TXN_CHANGES`] and
/// [`MAX_TXN_BYTES`] (a transaction is a run of changes with one site and db_version).
#[derive(Default)]
struct TxnSize {
    current: Option<([u8; 16], i64)>,
    changes: u64,
    bytes: u64,
}

impl TxnSize {
    fn add(&mut self, site: [u8; 16], db_version: i64, bytes: u64) -> Result<(), String> {
        if self.current != Some((site, db_version)) {
            *self = TxnSize {
                current: Some((site, db_version)),
                ..TxnSize::default()
            };
        }
        self.changes += 1;
        self.bytes = self.bytes.saturating_add(bytes);
        // The site's hex only on the error path: this runs once per change.
        if self.changes > MAX_TXN_CHANGES {
            return Err(format!(
                "origin transaction {db_version} of site {} holds more than {MAX_TXN_CHANGES} changes, the most a bundle may carry in one transaction",
                hex(&site)
            ));
        }
        if self.bytes > MAX_TXN_BYTES {
            return Err(format!(
                "origin transaction {db_version} of site {} takes more than {MAX_TXN_BYTES} bytes, the most a bundle may carry in one transaction",
                hex(&site)
            ));
        }
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a bundle, hashing and signing everything it writes.
pub struct BundleWriter<W: Write> {
    out: W,
    crc: crc32fast::Hasher,
    digest: Sha512,
    key: SigningKey,
    buf: Vec<u8>,
    strings: HashMap<String, u64>,
    string_bytes: u64,
    sites: HashMap<[u8; 16], u64>,
    txn: TxnSize,
    bytes: u64,
}

/// What an exporter wrote past a limit its importers enforce.
fn writer_limit(what: String) -> BundleError {
    BundleError::Limit(format!(
        "cannot export: {what}, and an importing node would refuse it"
    ))
}

impl<W: Write> BundleWriter<W> {
    /// A bundle from replica `sender`, signed with `key` (the exporting node's key).
    pub fn new(out: W, sender: [u8; 16], key: &SigningKey) -> io::Result<Self> {
        let mut w = BundleWriter {
            out,
            crc: crc32fast::Hasher::new(),
            digest: Sha512::new(),
            key: key.clone(),
            buf: Vec::with_capacity(64 * 1024),
            strings: HashMap::new(),
            string_bytes: 0,
            sites: HashMap::new(),
            txn: TxnSize::default(),
            bytes: 0,
        };
        w.buf.extend_from_slice(&MAGIC);
        w.buf.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        w.buf.extend_from_slice(&sender);
        w.buf.extend_from_slice(&key.verifying_key().to_bytes());
        Ok(w)
    }

    fn varint(&mut self, v: u64) {
        crate::codec::put_varint(&mut self.buf, v);
    }

    fn bytes_field(&mut self, b: &[u8]) {
        crate::codec::put_bytes(&mut self.buf, b);
    }

    fn string(&mut self, s: &str) -> Result<u64, BundleError> {
        if let Some(&i) = self.strings.get(s) {
            return Ok(i);
        }
        self.string_bytes = self.string_bytes.saturating_add(s.len() as u64);
        if self.strings.len() >= MAX_STRINGS || self.string_bytes > MAX_STRING_BYTES {
            return Err(writer_limit(format!(
                "the changes name more than {MAX_STRINGS} tables and columns or {MAX_STRING_BYTES} bytes of names"
            )));
        }
        let i = self.strings.len() as u64;
        self.buf.push(STRING);
        self.bytes_field(s.as_bytes());
        self.strings.insert(s.to_string(), i);
        Ok(i)
    }

    fn site(&mut self, site: [u8; 16]) -> Result<u64, BundleError> {
        if let Some(&i) = self.sites.get(&site) {
            return Ok(i);
        }
        if self.sites.len() >= MAX_SITES {
            return Err(writer_limit(format!(
                "the changes come from more than {MAX_SITES} sites"
            )));
        }
        let i = self.sites.len() as u64;
        self.buf.push(SITE);
        self.buf.extend_from_slice(&site);
        self.sites.insert(site, i);
        Ok(i)
    }

    fn flush_if_full(&mut self) -> io::Result<()> {
        if self.buf.len() >= 60 * 1024 {
            self.flush_buf()?;
        }
        Ok(())
    }

    fn flush_buf(&mut self) -> io::Result<()> {
        self.crc.update(&self.buf);
        self.digest.update(&self.buf);
        self.out.write_all(&self.buf)?;
        self.bytes += self.buf.len() as u64;
        self.buf.clear();
        Ok(())
    }

    /// Writes one change; refuses one that would exceed a limit.
    pub fn change(&mut self, c: &WireChange) -> Result<(), BundleError> {
        let table = self.string(&c.table)?;
        let cid = self.string(&c.cid)?;
        let site = self.site(c.site)?;
        let start = self.buf.len();
        self.buf.push(CHANGE);
        put_change(&mut self.buf, (table, cid), site, c, None);
        let len = (self.buf.len() - start) as u64;
        self.txn
            .add(c.site, c.db_version, len)
            .map_err(writer_limit)?;
        Ok(self.flush_if_full()?)
    }

    /// Records that the bundle holds everything of `site`'s versions `start..=end`.
    pub fn cover(&mut self, site: [u8; 16], start: i64, end: i64) -> Result<(), BundleError> {
        let s = self.site(site)?;
        self.buf.push(COVER);
        self.varint(s);
        self.varint(zigzag(start));
        self.varint(zigzag(end));
        Ok(self.flush_if_full()?)
    }

    /// Ends the bundle, signs it and writes its checksum; returns the writer and the
    /// bundle's size.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.buf.push(END);
        self.flush_buf()?;
        let digest = self.digest.clone().finalize();
        let signature = self.key.sign(&signed_message(&digest));
        self.buf.extend_from_slice(&signature.to_bytes());
        self.flush_buf()?;
        let sum = self.crc.clone().finalize().to_le_bytes();
        self.out.write_all(&sum)?;
        self.out.flush()?;
        Ok((self.out, self.bytes + 4))
    }
}

fn signed_message(digest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_CONTEXT.len() + digest.len());
    m.extend_from_slice(SIGNATURE_CONTEXT);
    m.extend_from_slice(digest);
    m
}

/// Reads a bundle record by record. The checksum and the signature are checked when the
/// end is reached: a caller that must not act on a damaged or forged file reads it through
/// once ([`verify`]) first.
pub struct BundleReader<R: Read> {
    input: HashingReader<R>,
    strings: Vec<String>,
    string_bytes: u64,
    sites: Vec<[u8; 16]>,
    sender: [u8; 16],
    signer: Option<NodeId>,
    txn: TxnSize,
    done: bool,
}

struct HashingReader<R> {
    inner: R,
    crc: crc32fast::Hasher,
    digest: Sha512,
    /// Bytes read so far.
    read: u64,
}

impl<R: Read> HashingReader<R> {
    fn exact(&mut self, buf: &mut [u8]) -> Result<(), BundleError> {
        self.inner.read_exact(buf)?;
        self.crc.update(buf);
        self.digest.update(&*buf);
        self.read += buf.len() as u64;
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

    /// A length-prefixed field of at most `max` bytes.
    fn bytes_field(&mut self, max: u64) -> Result<Vec<u8>, BundleError> {
        let len = self.varint()?;
        if len > max {
            return Err(BundleError::Corrupt("length out of range"));
        }
        let mut out = Vec::new();
        (&mut self.inner).take(len).read_to_end(&mut out)?;
        if out.len() as u64 != len {
            return Err(BundleError::Truncated);
        }
        self.crc.update(&out);
        self.digest.update(&out);
        self.read += len;
        Ok(out)
    }
}

/// What a reader refuses past a limit.
fn reader_limit(what: String) -> BundleError {
    BundleError::Limit(format!(
        "the bundle is refused: {what} (fazt's export never writes such a bundle)"
    ))
}

impl<R: Read> BundleReader<R> {
    /// Reads the header; refuses input that is not a bundle or is of a newer format.
    pub fn new(input: R) -> Result<Self, BundleError> {
        let mut input = HashingReader {
            inner: input,
            crc: crc32fast::Hasher::new(),
            digest: Sha512::new(),
            read: 0,
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
        let signer = if version >= 2 {
            let mut key = [0u8; 32];
            input.exact(&mut key)?;
            Some(NodeId::from_bytes(key))
        } else {
            None
        };
        Ok(BundleReader {
            input,
            strings: Vec::new(),
            string_bytes: 0,
            sites: Vec::new(),
            sender,
            signer,
            txn: TxnSize::default(),
            done: false,
        })
    }

    /// The site id of the replica that exported the bundle.
    pub fn sender(&self) -> [u8; 16] {
        self.sender
    }

    /// The node that signed the bundle, as its header claims; `None` for an unsigned
    /// (version 1) bundle. The claim is proven only once [`Self::next_record`] has returned
    /// `None` (the end, where the signature is checked).
    pub fn signer(&self) -> Option<NodeId> {
        self.signer
    }

    /// Checks the checksum and the signature after the end tag.
    fn check_end(&mut self) -> Result<(), BundleError> {
        let digest = self.input.digest.clone().finalize();
        let signature = match self.signer {
            Some(_) => {
                let mut sig = [0u8; 64];
                self.input.exact(&mut sig)?;
                Some(sig)
            }
            None => None,
        };
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
        if let (Some(signer), Some(sig)) = (self.signer, signature) {
            let valid = VerifyingKey::from_bytes(signer.as_bytes())
                .map(|key| {
                    key.verify_strict(&signed_message(&digest), &Signature::from_bytes(&sig))
                        .is_ok()
                })
                .unwrap_or(false);
            if !valid {
                return Err(BundleError::BadSignature(signer));
            }
        }
        Ok(())
    }

    /// The next record, or None at the end (after checking the checksum and signature).
    pub fn next_record(&mut self) -> Result<Option<Record>, BundleError> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.input.byte()? {
                END => {
                    self.check_end()?;
                    self.done = true;
                    return Ok(None);
                }
                STRING => {
                    if self.strings.len() >= MAX_STRINGS {
                        return Err(reader_limit(format!(
                            "it declares more than {MAX_STRINGS} table and column names"
                        )));
                    }
                    let left = MAX_STRING_BYTES - self.string_bytes;
                    let bytes = self.input.bytes_field(left).map_err(|e| match e {
                        BundleError::Corrupt(_) => reader_limit(format!(
                            "its table and column names take more than {MAX_STRING_BYTES} bytes"
                        )),
                        other => other,
                    })?;
                    self.string_bytes += bytes.len() as u64;
                    let s = String::from_utf8(bytes)
                        .map_err(|_| BundleError::Corrupt("name is not UTF-8"))?;
                    self.strings.push(s);
                }
                SITE => {
                    if self.sites.len() >= MAX_SITES {
                        return Err(reader_limit(format!(
                            "it declares more than {MAX_SITES} origin sites"
                        )));
                    }
                    let mut site = [0u8; 16];
                    self.input.exact(&mut site)?;
                    self.sites.push(site);
                }
                CHANGE => {
                    let start = self.input.read - 1;
                    let mut source = Source {
                        input: &mut self.input,
                        strings: &self.strings,
                        sites: &self.sites,
                    };
                    // Bundles carry values inline; their numbers are checked by the merge.
                    let (change, _) = read_change(&mut source, false)?;
                    self.txn
                        .add(change.site, change.db_version, self.input.read - start)
                        .map_err(reader_limit)?;
                    return Ok(Some(Record::Change(change)));
                }
                COVER => {
                    let s = self.input.varint()?;
                    let site = site_at(&self.sites, s)?;
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

fn site_at(sites: &[[u8; 16]], i: u64) -> Result<[u8; 16], BundleError> {
    usize::try_from(i)
        .ok()
        .and_then(|i| sites.get(i))
        .copied()
        .ok_or(BundleError::Corrupt("unknown site index"))
}

/// A change record's body as the shared decoder reads it: from the hashed input, with the
/// names and sites declared so far, in the bundle's words.
struct Source<'a, R> {
    input: &'a mut HashingReader<R>,
    strings: &'a [String],
    sites: &'a [[u8; 16]],
}

impl<R: Read> ChangeSource for Source<'_, R> {
    type Error = BundleError;

    fn byte(&mut self) -> Result<u8, BundleError> {
        self.input.byte()
    }

    fn varint(&mut self) -> Result<u64, BundleError> {
        self.input.varint()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BundleError> {
        let mut out = [0u8; N];
        self.input.exact(&mut out)?;
        Ok(out)
    }

    fn bytes(&mut self) -> Result<Vec<u8>, BundleError> {
        self.input.bytes_field(MAX_LEN)
    }

    fn name(&self, i: u64) -> Result<String, BundleError> {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.strings.get(i))
            .cloned()
            .ok_or(BundleError::Corrupt("unknown string index"))
    }

    fn site(&self, i: u64) -> Result<[u8; 16], BundleError> {
        site_at(self.sites, i)
    }

    fn numbers(&self, _: [i64; 4]) -> Result<(), BundleError> {
        Ok(())
    }

    fn malformed(what: &'static str) -> BundleError {
        BundleError::Corrupt(what)
    }
}

/// What [`verify`] found in a whole, intact bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The node whose signature checked out; `None` for an unsigned (version 1) bundle.
    pub signer: Option<NodeId>,
    /// Change records in the bundle.
    pub changes: u64,
    /// Cover records in the bundle.
    pub covers: u64,
}

/// Reads a whole bundle and checks it (format, limits, checksum, signature).
pub fn verify<R: Read>(input: R) -> Result<Verified, BundleError> {
    let mut reader = BundleReader::new(input)?;
    let (mut changes, mut covers) = (0, 0);
    while let Some(record) = reader.next_record()? {
        match record {
            Record::Change(_) => changes += 1,
            Record::Cover { .. } => covers += 1,
        }
    }
    Ok(Verified {
        signer: reader.signer(),
        changes,
        covers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key() -> SigningKey {
        SigningKey::from_bytes(&[5; 32])
    }

    fn signer() -> NodeId {
        NodeId::from_bytes(key().verifying_key().to_bytes())
    }

    fn sample() -> Vec<u8> {
        let mut w = BundleWriter::new(Vec::new(), [9; 16], &key()).unwrap();
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
        assert_eq!(
            verify(&bytes[..]).unwrap(),
            Verified {
                signer: Some(signer()),
                changes: 3,
                covers: 1
            }
        );
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

    /// Replaces the trailing CRC so that only the signature can catch a change.
    fn fix_crc(bytes: &mut [u8]) {
        let n = bytes.len() - 4;
        let sum = crc32fast::hash(&bytes[..n]);
        bytes[n..].copy_from_slice(&sum.to_le_bytes());
    }

    #[test]
    fn altered_content_signer_or_signature_fails_the_signature_check() {
        let bytes = sample();
        let sig_at = bytes.len() - 4 - 64;
        // A change's value ("app1" -> "bpp1"), the claimed signer, the signature itself.
        let value_at = bytes.windows(4).position(|w| w == b"app1").unwrap();
        for at in [value_at, 8 + 2 + 16 + 3, sig_at + 10] {
            let mut forged = bytes.clone();
            forged[at] ^= 0x03;
            fix_crc(&mut forged);
            match verify(&forged[..]) {
                Err(BundleError::BadSignature(_)) => {}
                other => panic!("byte {at}: {other:?}"),
            }
        }
        // A bundle re-signed by another key is intact, and names that key.
        let other = SigningKey::from_bytes(&[6; 32]);
        let mut w = BundleWriter::new(Vec::new(), [9; 16], &other).unwrap();
        w.cover([1; 16], 1, 1).unwrap();
        let v = verify(&w.finish().unwrap().0[..]).unwrap();
        assert_eq!(
            v.signer.unwrap().as_bytes(),
            &other.verifying_key().to_bytes()
        );
    }

    #[test]
    fn an_unsigned_version_1_bundle_reads_with_no_signer() {
        let mut v1 = MAGIC.to_vec();
        v1.extend_from_slice(&1u16.to_le_bytes());
        v1.extend_from_slice(&[9; 16]);
        v1.extend_from_slice(&[SITE, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]);
        v1.extend_from_slice(&[COVER, 0, 2, 4, END]);
        v1.extend_from_slice(&crc32fast::hash(&v1).to_le_bytes());
        assert_eq!(
            verify(&v1[..]).unwrap(),
            Verified {
                signer: None,
                changes: 0,
                covers: 1
            }
        );
    }

    fn change(site: u8, db_version: i64, seq: i64, val: WireValue) -> WireChange {
        WireChange {
            table: "t".into(),
            pk: vec![1],
            cid: "c".into(),
            val,
            col_version: 1,
            db_version,
            site: [site; 16],
            cl: 1,
            seq,
        }
    }

    #[test]
    fn the_writer_refuses_what_the_reader_would_refuse() {
        // One origin transaction past MAX_TXN_BYTES: the writer stops before it is complete.
        let mut w = BundleWriter::new(std::io::sink(), [9; 16], &key()).unwrap();
        let big = WireValue::Blob(vec![0; 64 << 20]);
        let mut refused = None;
        for seq in 0..=(MAX_TXN_BYTES / (64 << 20)) as i64 {
            if let Err(e) = w.change(&change(1, 3, seq, big.clone())) {
                refused = Some((seq, e));
                break;
            }
        }
        let (seq, e) = refused.expect("the writer took an oversized transaction");
        assert_eq!(
            seq, 15,
            "16 values of 64 MiB plus their encoding exceed 1 GiB"
        );
        assert!(
            e.to_string()
                .contains("cannot export: origin transaction 3"),
            "{e}"
        );
        // Separate transactions of the same size are fine.
        let mut w = BundleWriter::new(std::io::sink(), [9; 16], &key()).unwrap();
        for v in 1..=20 {
            w.change(&change(1, v, 0, big.clone())).unwrap();
        }
    }

    /// A hand-written signed bundle: `body` between the header and the end tag.
    fn signed(body: &[u8]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        b.extend_from_slice(&[9; 16]);
        b.extend_from_slice(&key().verifying_key().to_bytes());
        b.extend_from_slice(body);
        b.push(END);
        let sig = key().sign(&signed_message(&Sha512::digest(&b)));
        b.extend_from_slice(&sig.to_bytes());
        b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
        b
    }

    #[test]
    fn hostile_interning_and_transactions_are_refused_at_the_limit() {
        let ok = signed(&[STRING, 1, b'a']);
        assert_eq!(verify(&ok[..]).unwrap().changes, 0);

        let mut strings = Vec::new();
        for i in 0..=MAX_STRINGS as u32 {
            strings.push(STRING);
            crate::codec::put_bytes(&mut strings, i.to_string().as_bytes());
        }
        let e = verify(&signed(&strings)[..]).unwrap_err().to_string();
        assert!(e.contains("more than 65536 table and column names"), "{e}");

        let mut long = vec![STRING];
        crate::codec::put_varint(&mut long, MAX_STRING_BYTES + 1);
        let e = verify(&signed(&long)[..]).unwrap_err().to_string();
        assert!(e.contains("names take more than 16777216 bytes"), "{e}");

        let mut sites = Vec::new();
        for i in 0..=MAX_SITES as u32 {
            sites.push(SITE);
            sites.extend_from_slice(&[0; 12]);
            sites.extend_from_slice(&i.to_le_bytes());
        }
        let e = verify(&signed(&sites)[..]).unwrap_err().to_string();
        assert!(e.contains("more than 65536 origin sites"), "{e}");

        // MAX_TXN_CHANGES + 1 tiny changes of one origin transaction.
        let mut txn = vec![STRING, 1, b't', SITE];
        txn.extend_from_slice(&[1; 16]);
        for seq in 0..=MAX_TXN_CHANGES {
            txn.extend_from_slice(&[CHANGE, 0, 0, 0, 2 * 7]);
            crate::codec::put_varint(&mut txn, zigzag(seq as i64));
            txn.extend_from_slice(&[2, 2, 1, 1, 0]);
        }
        let e = verify(&signed(&txn)[..]).unwrap_err().to_string();
        assert!(
            e.contains("origin transaction 7 of site 0101")
                && e.contains("more than 1000000 changes"),
            "{e}"
        );
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
            bytes.extend_from_slice(&tail);
            let _ = verify(&bytes[..]);
        }
    }
}
