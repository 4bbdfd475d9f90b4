//! Property: every bundle and every peer message this crate writes reads back as exactly what
//! was written — random change sets and random messages of every kind, not fixed samples.
//!
//! "Exactly": the decoded value prints the same (`Debug`, every field) and encodes to the same
//! bytes again, which also compares REALs by their bits (NaN and -0.0 included).

mod common;

use common::{bundle_change, key, read_bundle, record, site, write_bundle};
use fazt_proto::bundle::{self, Record, WireValue};
use fazt_proto::wire::{
    frame_len, Changes, Content, ContentRef, Heads, Hello, Join, Message, NetChange, MAX_VERSION,
};
use fazt_proto::{Digest, NodeId};
use proptest::prelude::*;

/// A number the peer protocol accepts in a change: 1..=MAX_VERSION (seq from 0).
fn version(min: i64) -> impl Strategy<Value = i64> {
    prop_oneof![4 => min..1000, 1 => Just(MAX_VERSION), 1 => min..=MAX_VERSION]
}

fn net_change() -> impl Strategy<Value = NetChange> {
    (
        bundle_change(),
        (version(1), version(1), version(0), version(1)),
        proptest::option::of((any::<[u8; 32]>(), any::<u64>(), any::<bool>())),
    )
        .prop_map(
            |(mut change, (db_version, col_version, seq, cl), content)| {
                change.db_version = db_version;
                change.col_version = col_version;
                change.seq = seq;
                change.cl = cl;
                let content = content.map(|(digest, len, text)| {
                    // A change with content carries no inline value.
                    change.val = WireValue::Null;
                    ContentRef {
                        digest: Digest::from_bytes(digest),
                        len,
                        text,
                    }
                });
                NetChange { change, content }
            },
        )
}

/// Heads as a node writes them: per site, ranges in order, apart, within 1..=MAX_VERSION.
fn heads() -> impl Strategy<Value = Heads> {
    let ranges =
        proptest::collection::vec((1i64..1 << 40, 0i64..1 << 40), 0..4).prop_map(|steps| {
            let mut out = Vec::new();
            let mut prev_end = -1i64;
            for (gap, len) in steps {
                let start = prev_end + 1 + gap;
                let end = start + len;
                if end > MAX_VERSION {
                    break;
                }
                out.push((start, end));
                prev_end = end;
            }
            out
        });
    proptest::collection::vec((site(), ranges), 0..4).prop_map(Heads)
}

fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<[u8; 32]>(), any::<u32>(), any::<u32>(), heads()).prop_map(
            |(node, protocol, schema, heads)| Message::Hello(Hello {
                node: NodeId::from_bytes(node),
                protocol,
                schema,
                heads
            })
        ),
        (any::<[u8; 32]>(), ".{0,20}", ".{0,30}")
            .prop_map(|(secret, name, addr)| Message::Join(Join { secret, name, addr })),
        ".{0,20}".prop_map(|name| Message::Welcome { name }),
        (
            proptest::collection::vec(net_change(), 0..6),
            proptest::option::of(heads())
        )
            .prop_map(|(changes, complete)| Message::Changes(Changes { changes, complete })),
        (any::<u64>(), heads()).prop_map(|(groups, heads)| Message::Applied { groups, heads }),
        proptest::collection::vec(any::<[u8; 32]>().prop_map(Digest::from_bytes), 0..5)
            .prop_map(Message::Want),
        (
            any::<[u8; 32]>(),
            any::<bool>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            0u64..1 << 40,
            prop_oneof![Just(0u64), 0u64..1 << 40],
        )
            .prop_map(
                |(digest, gone, data, offset, extra)| Message::Content(Content {
                    digest: Digest::from_bytes(digest),
                    gone,
                    total: offset + data.len() as u64 + extra,
                    offset,
                    data,
                })
            ),
        ".{0,40}".prop_map(Message::Refuse),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn every_bundle_reads_back_as_written(
        sender in any::<[u8; 16]>(),
        records in proptest::collection::vec(record(), 0..30),
    ) {
        let bytes = write_bundle(sender, &records);
        let (read_sender, signer, read) = read_bundle(&bytes).unwrap();
        prop_assert_eq!(read_sender, sender);
        prop_assert_eq!(signer, Some(NodeId::from_bytes(key().verifying_key().to_bytes())));
        prop_assert_eq!(format!("{read:?}"), format!("{records:?}"));
        prop_assert_eq!(&write_bundle(sender, &read), &bytes, "written again, the records give other bytes");
        let verified = bundle::verify(&bytes[..]).unwrap();
        let changes = records.iter().filter(|r| matches!(r, Record::Change(_))).count() as u64;
        prop_assert_eq!((verified.changes, verified.covers), (changes, records.len() as u64 - changes));
    }

    #[test]
    fn every_message_reads_back_as_written(msg in message()) {
        let frame = msg.encode();
        prop_assert_eq!(frame_len(frame[..4].try_into().unwrap()).unwrap(), frame.len() - 4);
        let decoded = Message::decode(&frame[4..]).unwrap();
        prop_assert_eq!(format!("{decoded:?}"), format!("{msg:?}"));
        prop_assert_eq!(&decoded.encode(), &frame, "encoded again, the message gives other bytes");
    }
}
