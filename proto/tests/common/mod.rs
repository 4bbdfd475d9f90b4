//! Random bundles for the property tests: generators, and writing and reading them whole.

#![allow(dead_code)]

use fazt_proto::bundle::{
    self, BundleReader, BundleWriter, Record, SigningKey, WireChange, WireValue,
};
use fazt_proto::NodeId;
use proptest::prelude::*;

/// The signing key every generated bundle is signed with.
pub(crate) fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// Names: a few that repeat (so interning is exercised) and arbitrary ones.
pub(crate) fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop_oneof![Just("apps"), Just("kv"), Just("-1"), Just("")].prop_map(String::from),
        1 => ".{0,12}",
    ]
}

pub(crate) fn site() -> impl Strategy<Value = [u8; 16]> {
    prop_oneof![3 => (0u8..3).prop_map(|b| [b; 16]), 1 => any::<[u8; 16]>()]
}

pub(crate) fn value() -> impl Strategy<Value = WireValue> {
    prop_oneof![
        Just(WireValue::Null),
        any::<i64>().prop_map(WireValue::Integer),
        prop_oneof![
            any::<f64>(),
            Just(-0.0),
            Just(f64::NAN),
            Just(f64::from_bits(0x7ff8_dead_beef_0001)),
            Just(f64::NEG_INFINITY)
        ]
        .prop_map(WireValue::Real),
        ".{0,40}".prop_map(WireValue::Text),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(WireValue::Blob),
    ]
}

/// A change whose numbers are any i64 (a bundle carries what it is given; importers check).
pub(crate) fn bundle_change() -> impl Strategy<Value = WireChange> {
    (
        (
            name(),
            proptest::collection::vec(any::<u8>(), 0..20),
            name(),
            value(),
        ),
        (
            any::<i64>(),
            any::<i64>(),
            site(),
            any::<i64>(),
            any::<i64>(),
        ),
    )
        .prop_map(
            |((table, pk, cid, val), (col_version, db_version, site, cl, seq))| WireChange {
                table,
                pk,
                cid,
                val,
                col_version,
                db_version,
                site,
                cl,
                seq,
            },
        )
}

pub(crate) fn record() -> impl Strategy<Value = Record> {
    prop_oneof![
        4 => bundle_change().prop_map(Record::Change),
        1 => (site(), 1i64..=i64::MAX, 0i64..1000).prop_map(|(site, start, len)| Record::Cover {
            site,
            start,
            end: start.saturating_add(len),
        }),
    ]
}

/// Writes `records` as one bundle from `sender`, signed with [`key`].
pub(crate) fn write_bundle(sender: [u8; 16], records: &[Record]) -> Vec<u8> {
    let mut w = BundleWriter::new(Vec::new(), sender, &key()).unwrap();
    for r in records {
        match r {
            Record::Change(c) => w.change(c).unwrap(),
            Record::Cover { site, start, end } => w.cover(*site, *start, *end).unwrap(),
        }
    }
    let (bytes, size) = w.finish().unwrap();
    assert_eq!(
        size,
        bytes.len() as u64,
        "finish() reports the bundle's size"
    );
    bytes
}

/// What a bundle says: its sender, its signer, its records.
pub(crate) type Read = ([u8; 16], Option<NodeId>, Vec<Record>);

/// Reads a whole bundle (checksum and signature included).
pub(crate) fn read_bundle(bytes: &[u8]) -> Result<Read, bundle::BundleError> {
    let mut r = BundleReader::new(bytes)?;
    let mut records = Vec::new();
    while let Some(record) = r.next_record()? {
        records.push(record);
    }
    Ok((r.sender(), r.signer(), records))
}
