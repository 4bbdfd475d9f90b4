//! The peer protocol: the messages two nodes exchange over one QUIC stream, and their
//! framing. docs/sync-protocol.md describes the conversation; this module owns the bytes.
//!
//! ```text
//! frame    u32 LE length (1..=MAX_FRAME) + payload
//! payload  tag byte + body
//!   1 Hello    node key [32], protocol varint, schema varint, heads
//!   2 Join     ticket secret [32], name string, address string ("" = not reachable)
//!   3 Welcome  name string
//!   4 Changes  strings (count + strings), sites (count + [16] each), changes (count + change),
//!              complete flag byte (1 = heads follow: the versions this group completes)
//!   5 Applied  groups varint (applied so far in this session), heads (at least these are
//!              held by the sender, in addition to what it said before: possibly none)
//!   6 Want     count + content digests [32]
//!   7 Content  digest [32], flags byte (1 = gone), total varint, offset varint, data bytes
//!   8 Refuse   reason string
//! heads    count + per site: site [16], count + ranges (start varint, end - start varint)
//! change   as in bundles ([`crate::change`]): table, cid, site (varint indexes), db_version,
//!          seq, col_version, cl (zigzag), packed pk (bytes), value: tag 0 NULL, 1 INTEGER
//!          (zigzag), 2 REAL (8 bytes LE), 3 TEXT, 4 BLOB (bytes), 5 BLOB CONTENT and
//!          6 TEXT CONTENT (digest [32], length varint)
//! ```
//! A CONTENT value stands for a large blob or text the receiver fetches with `Want` unless it
//! already holds bytes with that SHA-256 digest, so content is never sent twice.
//!
//! Decoding checks every length against the bytes that are left: arbitrary input yields an
//! error, never a panic or an oversized allocation.

use std::collections::HashMap;

use crate::change::{put_change, read_change, ChangeSource, WireChange};
use crate::codec::{put_bytes, put_varint, DecodeError, SliceReader};
use crate::{Digest, NodeId};

/// Largest frame a node sends or accepts.
pub const MAX_FRAME: usize = 16 << 20;
/// Content travels in chunks of at most this many bytes.
pub const CONTENT_CHUNK: usize = 1 << 20;
/// Blob and text values at least this long travel as content references.
pub const CONTENT_MIN: usize = 1024;

/// The largest db_version, seq, col_version or causal length a node accepts from outside
/// (peer messages, bundles) or makes itself: 2^53. An honest cluster never comes near it
/// (2^53 transactions at a million a second take 285 years), so a larger number can only be
/// forged, and refusing it keeps every clock step far from i64 overflow. The smallest valid
/// values are 1 (db_version, col_version, causal length) and 0 (seq).
pub const MAX_VERSION: i64 = 1 << 53;

/// Checks one change's numbers against [`MAX_VERSION`] and their valid minimums; the error
/// names the field.
pub fn check_change_numbers(
    db_version: i64,
    seq: i64,
    col_version: i64,
    cl: i64,
) -> Result<(), &'static str> {
    let fields = [
        ("db_version", db_version, 1),
        ("seq", seq, 0),
        ("col_version", col_version, 1),
        ("causal length", cl, 1),
    ];
    for (name, v, min) in fields {
        if v < min || v > MAX_VERSION {
            return Err(name);
        }
    }
    Ok(())
}

/// One origin site and the inclusive ranges of its versions held.
pub type SiteRanges = ([u8; 16], Vec<(i64, i64)>);

/// Per origin site, the inclusive version ranges held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Heads(pub Vec<SiteRanges>);

/// A large value sent by reference: the receiver fetches its bytes with [`Message::Want`]
/// unless it already holds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentRef {
    /// SHA-256 of the value's bytes.
    pub digest: Digest,
    /// Length of the value in bytes.
    pub len: u64,
    /// The value is TEXT (its UTF-8 bytes), not a BLOB.
    pub text: bool,
}

/// A change as it crosses the wire: either its value inline, or a reference to content.
#[derive(Debug, Clone, PartialEq)]
pub struct NetChange {
    /// When `content` is set, `change.val` is not sent (it decodes as NULL).
    pub change: WireChange,
    /// The value's content reference, for a value sent by reference.
    pub content: Option<ContentRef>,
}

/// The first message of a sync session, from each side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The sender's node key.
    pub node: NodeId,
    /// The protocol version the sender speaks.
    pub protocol: u32,
    /// The sender's database schema version.
    pub schema: u32,
    /// Everything the sender holds.
    pub heads: Heads,
}

/// A node that holds a ticket asks to be trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Join {
    /// The ticket's one-time secret.
    pub secret: [u8; 32],
    /// The name the joining node suggests for itself.
    pub name: String,
    /// Where the joining node accepts connections ("" when it does not).
    pub addr: String,
}

/// Part of a group of changes (whole origin transactions) the receiver lacks.
#[derive(Debug, Clone, PartialEq)]
pub struct Changes {
    /// The changes, in order.
    pub changes: Vec<NetChange>,
    /// Set on a group's last message: the versions the group completes.
    pub complete: Option<Heads>,
}

/// A chunk of content asked for with [`Message::Want`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Content {
    /// SHA-256 of the whole content.
    pub digest: Digest,
    /// The sender no longer holds these bytes (the value was overwritten meanwhile).
    pub gone: bool,
    /// Length of the whole content in bytes.
    pub total: u64,
    /// Where this chunk starts in the content.
    pub offset: u64,
    /// The chunk's bytes.
    pub data: Vec<u8>,
}

/// Every message of the peer protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    /// Opens a sync session.
    Hello(Hello),
    /// Asks to be trusted, with a ticket.
    Join(Join),
    /// The inviting node accepted a Join; carries the name it suggests for itself.
    Welcome {
        /// The name the inviting node suggests for itself.
        name: String,
    },
    /// Changes the receiver lacks.
    Changes(Changes),
    /// Groups applied so far in this session, and versions the sender now holds.
    Applied {
        /// Groups applied so far in this session.
        groups: u64,
        /// At least these versions are held by the sender, in addition to what it said before
        /// (its Hello and earlier Applied) and what either side sent: a receiver adds them to
        /// what it knows, never takes them as all the sender holds. May be empty. (Earlier
        /// releases sent everything they held here, and added what they received: either
        /// side reads the other right.)
        heads: Heads,
    },
    /// Asks for the content with these digests.
    Want(Vec<Digest>),
    /// A chunk of content.
    Content(Content),
    /// The sender ends the session; the reason is meant for people.
    Refuse(String),
}

const HELLO: u8 = 1;
const JOIN: u8 = 2;
const WELCOME: u8 = 3;
const CHANGES: u8 = 4;
const APPLIED: u8 = 5;
const WANT: u8 = 6;
const CONTENT: u8 = 7;
const REFUSE: u8 = 8;

/// The length announced by a frame header, checked against [`MAX_FRAME`].
pub fn frame_len(header: [u8; 4]) -> Result<usize, DecodeError> {
    let len = u32::from_le_bytes(header) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(DecodeError::Malformed("frame length out of range"));
    }
    Ok(len)
}

impl Message {
    /// The message's kind, as logs and protocol errors name it ("Hello", "Changes", ...).
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello(_) => "Hello",
            Message::Join(_) => "Join",
            Message::Welcome { .. } => "Welcome",
            Message::Changes(_) => "Changes",
            Message::Applied { .. } => "Applied",
            Message::Want(_) => "Want",
            Message::Content(_) => "Content",
            Message::Refuse(_) => "Refuse",
        }
    }

    /// The message as one frame: length header plus payload.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; 4];
        match self {
            Message::Hello(h) => {
                buf.push(HELLO);
                buf.extend_from_slice(h.node.as_bytes());
                put_varint(&mut buf, h.protocol as u64);
                put_varint(&mut buf, h.schema as u64);
                put_heads(&mut buf, &h.heads);
            }
            Message::Join(j) => {
                buf.push(JOIN);
                buf.extend_from_slice(&j.secret);
                put_bytes(&mut buf, j.name.as_bytes());
                put_bytes(&mut buf, j.addr.as_bytes());
            }
            Message::Welcome { name } => {
                buf.push(WELCOME);
                put_bytes(&mut buf, name.as_bytes());
            }
            Message::Changes(c) => {
                buf.push(CHANGES);
                put_changes(&mut buf, c);
            }
            Message::Applied { groups, heads } => {
                buf.push(APPLIED);
                put_varint(&mut buf, *groups);
                put_heads(&mut buf, heads);
            }
            Message::Want(digests) => {
                buf.push(WANT);
                put_varint(&mut buf, digests.len() as u64);
                for d in digests {
                    buf.extend_from_slice(d.as_bytes());
                }
            }
            Message::Content(c) => {
                buf.push(CONTENT);
                buf.extend_from_slice(c.digest.as_bytes());
                buf.push(c.gone as u8);
                put_varint(&mut buf, c.total);
                put_varint(&mut buf, c.offset);
                put_bytes(&mut buf, &c.data);
            }
            Message::Refuse(reason) => {
                buf.push(REFUSE);
                put_bytes(&mut buf, reason.as_bytes());
            }
        }
        let len = (buf.len() - 4) as u32;
        buf[..4].copy_from_slice(&len.to_le_bytes());
        buf
    }

    /// Decodes a frame's payload (without the length header).
    pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
        let mut r = SliceReader::new(payload);
        let msg = match r.byte()? {
            HELLO => Message::Hello(Hello {
                node: NodeId::from_bytes(r.array()?),
                protocol: u32::try_from(r.varint()?)
                    .map_err(|_| DecodeError::Malformed("protocol out of range"))?,
                schema: u32::try_from(r.varint()?)
                    .map_err(|_| DecodeError::Malformed("schema out of range"))?,
                heads: read_heads(&mut r)?,
            }),
            JOIN => Message::Join(Join {
                secret: r.array()?,
                name: r.string()?,
                addr: r.string()?,
            }),
            WELCOME => Message::Welcome { name: r.string()? },
            CHANGES => Message::Changes(read_changes(&mut r)?),
            APPLIED => Message::Applied {
                groups: r.varint()?,
                heads: read_heads(&mut r)?,
            },
            WANT => {
                let n = r.count()?;
                let mut digests = Vec::with_capacity(n.min(r.remaining() / 32));
                for _ in 0..n {
                    digests.push(Digest::from_bytes(r.array()?));
                }
                Message::Want(digests)
            }
            CONTENT => {
                let digest = Digest::from_bytes(r.array()?);
                let gone = match r.byte()? {
                    0 => false,
                    1 => true,
                    _ => return Err(DecodeError::Malformed("unknown content flags")),
                };
                let total = r.varint()?;
                let offset = r.varint()?;
                let data = r.bytes()?.to_vec();
                if offset
                    .checked_add(data.len() as u64)
                    .is_none_or(|end| end > total)
                {
                    return Err(DecodeError::Malformed("content chunk beyond its total"));
                }
                Message::Content(Content {
                    digest,
                    gone,
                    total,
                    offset,
                    data,
                })
            }
            REFUSE => Message::Refuse(r.string()?),
            _ => return Err(DecodeError::Malformed("unknown message type")),
        };
        r.finish()?;
        Ok(msg)
    }
}

fn put_heads(buf: &mut Vec<u8>, heads: &Heads) {
    put_varint(buf, heads.0.len() as u64);
    for (site, ranges) in &heads.0 {
        buf.extend_from_slice(site);
        put_varint(buf, ranges.len() as u64);
        for &(start, end) in ranges {
            put_varint(buf, start as u64);
            put_varint(buf, (end - start) as u64);
        }
    }
}

fn read_heads(r: &mut SliceReader<'_>) -> Result<Heads, DecodeError> {
    let sites = r.count()?;
    let mut out = Vec::with_capacity(sites.min(r.remaining() / 17));
    for _ in 0..sites {
        let site: [u8; 16] = r.array()?;
        let n = r.count()?;
        let mut ranges = Vec::with_capacity(n.min(r.remaining() / 2));
        for _ in 0..n {
            let start = i64::try_from(r.varint()?)
                .map_err(|_| DecodeError::Malformed("version out of range"))?;
            let span = i64::try_from(r.varint()?)
                .map_err(|_| DecodeError::Malformed("version out of range"))?;
            let end = start
                .checked_add(span)
                .ok_or(DecodeError::Malformed("version out of range"))?;
            if start < 1 {
                return Err(DecodeError::Malformed("versions start at 1"));
            }
            if end > MAX_VERSION {
                return Err(DecodeError::Malformed("version beyond the bound of 2^53"));
            }
            // In order and apart, as a node writes them: decoding and merging stay linear.
            if ranges
                .last()
                .is_some_and(|&(_, prev): &(i64, i64)| start <= prev.saturating_add(1))
            {
                return Err(DecodeError::Malformed("version ranges out of order"));
            }
            ranges.push((start, end));
        }
        out.push((site, ranges));
    }
    Ok(Heads(out))
}

fn put_changes(buf: &mut Vec<u8>, c: &Changes) {
    // Names and sites are interned per message.
    let mut strings: Vec<&str> = Vec::new();
    let mut string_ix: HashMap<&str, u64> = HashMap::new();
    let mut sites: Vec<[u8; 16]> = Vec::new();
    let mut site_ix: HashMap<[u8; 16], u64> = HashMap::new();
    let mut body = Vec::new();
    for nc in &c.changes {
        let w = &nc.change;
        for s in [w.table.as_str(), w.cid.as_str()] {
            if !string_ix.contains_key(s) {
                string_ix.insert(s, strings.len() as u64);
                strings.push(s);
            }
        }
        site_ix.entry(w.site).or_insert_with(|| {
            sites.push(w.site);
            sites.len() as u64 - 1
        });
        let names = (string_ix[w.table.as_str()], string_ix[w.cid.as_str()]);
        put_change(&mut body, names, site_ix[&w.site], w, nc.content.as_ref());
    }
    put_varint(buf, strings.len() as u64);
    for s in &strings {
        put_bytes(buf, s.as_bytes());
    }
    put_varint(buf, sites.len() as u64);
    for s in &sites {
        buf.extend_from_slice(s);
    }
    put_varint(buf, c.changes.len() as u64);
    buf.extend_from_slice(&body);
    match &c.complete {
        Some(heads) => {
            buf.push(1);
            put_heads(buf, heads);
        }
        None => buf.push(0),
    }
}

fn read_changes(r: &mut SliceReader<'_>) -> Result<Changes, DecodeError> {
    let n = r.count()?;
    let mut strings = Vec::with_capacity(n);
    for _ in 0..n {
        strings.push(r.string()?);
    }
    let n = r.count()?;
    let mut sites: Vec<[u8; 16]> = Vec::with_capacity(n.min(r.remaining() / 16));
    for _ in 0..n {
        sites.push(r.array()?);
    }
    let n = r.count()?;
    let mut changes = Vec::with_capacity(n.min(r.remaining() / 8));
    let mut source = Source {
        r,
        strings: &strings,
        sites: &sites,
    };
    for _ in 0..n {
        let (change, content) = read_change(&mut source, true)?;
        changes.push(NetChange { change, content });
    }
    let complete = match r.byte()? {
        0 => None,
        1 => Some(read_heads(r)?),
        _ => return Err(DecodeError::Malformed("unknown completion flag")),
    };
    Ok(Changes { changes, complete })
}

/// A change's body as the shared decoder reads it: from the message, with the names and
/// sites it declared, numbers checked at once, in the protocol's words.
struct Source<'r, 'a> {
    r: &'r mut SliceReader<'a>,
    strings: &'r [String],
    sites: &'r [[u8; 16]],
}

impl ChangeSource for Source<'_, '_> {
    type Error = DecodeError;

    fn byte(&mut self) -> Result<u8, DecodeError> {
        self.r.byte()
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        self.r.varint()
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.r.array()
    }

    fn bytes(&mut self) -> Result<Vec<u8>, DecodeError> {
        Ok(self.r.bytes()?.to_vec())
    }

    fn name(&self, i: u64) -> Result<String, DecodeError> {
        self.strings
            .get(i as usize)
            .cloned()
            .ok_or(DecodeError::Malformed("unknown name index"))
    }

    fn site(&self, i: u64) -> Result<[u8; 16], DecodeError> {
        self.sites
            .get(i as usize)
            .copied()
            .ok_or(DecodeError::Malformed("unknown site index"))
    }

    fn numbers(&self, [db_version, seq, col_version, cl]: [i64; 4]) -> Result<(), DecodeError> {
        check_change_numbers(db_version, seq, col_version, cl).map_err(|_| {
            DecodeError::Malformed(
                "change number (db_version, seq, col_version or causal length) out of range",
            )
        })
    }

    fn malformed(what: &'static str) -> DecodeError {
        DecodeError::Malformed(what)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::WireValue;
    use proptest::prelude::*;

    fn change(table: &str, cid: &str, val: WireValue) -> WireChange {
        WireChange {
            table: table.into(),
            pk: vec![1, 0x0b, 3, b'a', b'b', b'c'],
            cid: cid.into(),
            val,
            col_version: 2,
            db_version: 7,
            site: [9; 16],
            cl: 1,
            seq: 3,
        }
    }

    fn samples() -> Vec<Message> {
        let heads = Heads(vec![
            ([1; 16], vec![(1, 10), (12, 12)]),
            ([2; 16], vec![(3, 4)]),
        ]);
        vec![
            Message::Hello(Hello {
                node: NodeId::from_bytes([7; 32]),
                protocol: 1,
                schema: 2,
                heads: heads.clone(),
            }),
            Message::Join(Join {
                secret: [5; 32],
                name: "laptop".into(),
                addr: "".into(),
            }),
            Message::Welcome { name: "zyt".into() },
            Message::Changes(Changes {
                changes: vec![
                    NetChange {
                        change: change("apps", "name", WireValue::Text("blog".into())),
                        content: None,
                    },
                    NetChange {
                        change: change("apps", "-1", WireValue::Null),
                        content: None,
                    },
                    NetChange {
                        change: change("t", "n", WireValue::Integer(-5)),
                        content: None,
                    },
                    NetChange {
                        change: change("t", "r", WireValue::Real(2.5)),
                        content: None,
                    },
                    NetChange {
                        change: change("blobs", "gzip", WireValue::Blob(vec![1, 2])),
                        content: None,
                    },
                    NetChange {
                        change: change("blobs", "data", WireValue::Null),
                        content: Some(ContentRef {
                            digest: Digest::from_bytes([3; 32]),
                            len: 4096,
                            text: false,
                        }),
                    },
                    NetChange {
                        change: change("kv", "value", WireValue::Null),
                        content: Some(ContentRef {
                            digest: Digest::from_bytes([4; 32]),
                            len: 9000,
                            text: true,
                        }),
                    },
                ],
                complete: Some(heads.clone()),
            }),
            Message::Changes(Changes {
                changes: vec![],
                complete: None,
            }),
            Message::Applied { groups: 3, heads },
            Message::Want(vec![
                Digest::from_bytes([1; 32]),
                Digest::from_bytes([2; 32]),
            ]),
            Message::Content(Content {
                digest: Digest::from_bytes([4; 32]),
                gone: false,
                total: 10,
                offset: 4,
                data: vec![0; 6],
            }),
            Message::Content(Content {
                digest: Digest::from_bytes([4; 32]),
                gone: true,
                total: 0,
                offset: 0,
                data: vec![],
            }),
            Message::Refuse("no".into()),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            let frame = msg.encode();
            let len = frame_len(frame[..4].try_into().unwrap()).unwrap();
            assert_eq!(len, frame.len() - 4);
            assert_eq!(Message::decode(&frame[4..]).unwrap(), msg);
        }
    }

    #[test]
    fn every_truncation_is_an_error() {
        for msg in samples() {
            let frame = msg.encode();
            for cut in 0..frame.len() - 4 {
                assert!(
                    Message::decode(&frame[4..4 + cut]).is_err(),
                    "{msg:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn oversized_and_empty_frames_are_refused() {
        assert!(frame_len(0u32.to_le_bytes()).is_err());
        assert!(frame_len(((MAX_FRAME + 1) as u32).to_le_bytes()).is_err());
        assert_eq!(
            frame_len((MAX_FRAME as u32).to_le_bytes()).unwrap(),
            MAX_FRAME
        );
    }

    #[test]
    fn numbers_beyond_the_bound_are_refused() {
        let decode = |m: &Message| Message::decode(&m.encode()[4..]);
        for (field, value) in [(0, MAX_VERSION + 1), (0, 0), (1, -1), (2, 0), (3, i64::MAX)] {
            let mut c = change("t", "n", WireValue::Integer(1));
            match field {
                0 => c.db_version = value,
                1 => c.seq = value,
                2 => c.col_version = value,
                _ => c.cl = value,
            }
            let msg = Message::Changes(Changes {
                changes: vec![NetChange {
                    change: c,
                    content: None,
                }],
                complete: None,
            });
            assert!(
                matches!(decode(&msg), Err(DecodeError::Malformed(m)) if m.contains("out of range")),
                "field {field} = {value}"
            );
        }
        let mut at_bound = change("t", "n", WireValue::Integer(1));
        at_bound.db_version = MAX_VERSION;
        let ok = Message::Changes(Changes {
            changes: vec![NetChange {
                change: at_bound,
                content: None,
            }],
            complete: Some(Heads(vec![([1; 16], vec![(1, MAX_VERSION)])])),
        });
        assert_eq!(decode(&ok).unwrap(), ok);
        let forged = Message::Applied {
            groups: 1,
            heads: Heads(vec![([1; 16], vec![(1, 1 << 62)])]),
        };
        assert!(matches!(decode(&forged), Err(DecodeError::Malformed(m)) if m.contains("2^53")));
    }

    #[test]
    fn a_content_chunk_past_its_total_is_refused() {
        let bad = Message::Content(Content {
            digest: Digest::from_bytes([0; 32]),
            gone: false,
            total: 3,
            offset: 2,
            data: vec![1, 2],
        });
        assert!(Message::decode(&bad.encode()[4..]).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Message::decode(&bytes);
        }

        #[test]
        fn mutated_frames_never_panic(ix in 0usize..10, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6)) {
            let samples = samples();
            let mut frame = samples[ix % samples.len()].encode().split_off(4);
            for (at, byte) in flips {
                let at = at % frame.len();
                frame[at] = byte;
            }
            let _ = Message::decode(&frame);
        }
    }
}
