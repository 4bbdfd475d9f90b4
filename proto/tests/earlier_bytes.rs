//! Bytes written by an earlier build read back as they were written, and this build writes
//! the same bytes for the same content: a bundle file (`fixtures/v2.bundle`) and a peer
//! message carrying changes (`fixtures/changes.frame`), both made before bundles and the
//! peer protocol shared one change encoding.
//!
//! The fixtures are committed; `FAZT_WRITE_FIXTURES=1` writes them afresh (only ever from a
//! build whose format is the one to pin).

use std::path::PathBuf;

use fazt_proto::bundle::{BundleReader, BundleWriter, Record, SigningKey, WireChange, WireValue};
use fazt_proto::wire::{Changes, ContentRef, Heads, Message, NetChange};
use fazt_proto::Digest;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Compares `bytes` with the committed fixture, or writes it when asked to.
fn pinned(name: &str, bytes: &[u8]) -> Vec<u8> {
    let path = fixture(name);
    if std::env::var_os("FAZT_WRITE_FIXTURES").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, bytes).unwrap();
    }
    std::fs::read(&path).unwrap()
}

fn change(table: &str, cid: &str, val: WireValue, numbers: [i64; 4]) -> WireChange {
    let [db_version, seq, col_version, cl] = numbers;
    WireChange {
        table: table.into(),
        pk: vec![1, 0x0b, 3, b'a', b'b', b'c'],
        cid: cid.into(),
        val,
        col_version,
        db_version,
        site: [3; 16],
        cl,
        seq,
    }
}

/// Every kind of value, names and sites that repeat, negative and large numbers.
fn changes() -> Vec<WireChange> {
    vec![
        change("apps", "name", WireValue::Text("blog".into()), [1, 0, 1, 1]),
        change("apps", "-1", WireValue::Null, [1, 1, 1, 2]),
        change("kv", "n", WireValue::Integer(-5), [2, 0, 3, 1]),
        change("kv", "r", WireValue::Real(-0.0), [2, 1, 1, 1]),
        change("kv", "n", WireValue::Integer(i64::MIN), [3, 0, 4, 1]),
        change(
            "blobs",
            "data",
            WireValue::Blob(vec![0, 255, 7]),
            [1 << 53, 2, 9, 3],
        ),
        change(
            "blobs",
            "data",
            WireValue::Text(String::new()),
            [1 << 40, 0, 1, 5],
        ),
    ]
}

fn records() -> Vec<Record> {
    let mut out: Vec<Record> = changes().into_iter().map(Record::Change).collect();
    out.push(Record::Cover {
        site: [3; 16],
        start: 1,
        end: 3,
    });
    out.push(Record::Cover {
        site: [4; 16],
        start: 9,
        end: 1 << 40,
    });
    out
}

fn write_bundle() -> Vec<u8> {
    let key = SigningKey::from_bytes(&[11; 32]);
    let mut w = BundleWriter::new(Vec::new(), [9; 16], &key).unwrap();
    for r in records() {
        match r {
            Record::Change(c) => w.change(&c).unwrap(),
            Record::Cover { site, start, end } => w.cover(site, start, end).unwrap(),
        }
    }
    w.finish().unwrap().0
}

#[test]
fn a_bundle_written_by_an_earlier_build_reads_back_and_is_written_the_same() {
    let earlier = pinned("v2.bundle", &write_bundle());
    let mut reader = BundleReader::new(&earlier[..]).unwrap();
    assert_eq!(reader.sender(), [9; 16]);
    let mut read = Vec::new();
    while let Some(r) = reader.next_record().unwrap() {
        read.push(r);
    }
    // Debug compares REALs by what they print (-0.0 included).
    assert_eq!(format!("{read:?}"), format!("{:?}", records()));
    assert!(fazt_proto::bundle::verify(&earlier[..])
        .unwrap()
        .signer
        .is_some());
    assert_eq!(write_bundle(), earlier, "this build writes the same bytes");
}

fn message() -> Message {
    let mut changes: Vec<NetChange> = changes()
        .into_iter()
        .map(|change| NetChange {
            change,
            content: None,
        })
        .collect();
    changes.push(NetChange {
        change: change("blobs", "data", WireValue::Null, [4, 0, 2, 1]),
        content: Some(ContentRef {
            digest: Digest::of(b"large"),
            len: 5,
            text: false,
        }),
    });
    changes.push(NetChange {
        change: change("kv", "value", WireValue::Null, [4, 1, 1, 1]),
        content: Some(ContentRef {
            digest: Digest::from_bytes([8; 32]),
            len: 9000,
            text: true,
        }),
    });
    Message::Changes(Changes {
        changes,
        complete: Some(Heads(vec![([3; 16], vec![(1, 4)])])),
    })
}

#[test]
fn a_changes_message_of_an_earlier_build_decodes_and_is_encoded_the_same() {
    let earlier = pinned("changes.frame", &message().encode());
    let decoded = Message::decode(&earlier[4..]).unwrap();
    assert_eq!(format!("{decoded:?}"), format!("{:?}", message()));
    assert_eq!(
        message().encode(),
        earlier,
        "this build writes the same bytes"
    );
}
