//! Bundles forged to poison replication: numbers beyond the bound, forged coverage.

use std::path::Path;

use fazt_proto::bundle::{BundleReader, BundleWriter, Record};

use crate::bundles::trust;
use crate::harness::{assert_same_state, write, Node};

/// Rewrites the bundle at `from` into `to` through `edit`, which may drop records (None)
/// and add covers at the end. The result is signed by a key no node trusts, so importing it
/// takes `--trust-unknown-signer`: what is refused here is refused for a trusted signer too.
fn rewrite(
    from: &Path,
    to: &Path,
    mut edit: impl FnMut(Record) -> Option<Record>,
    extra_covers: &[([u8; 16], i64, i64)],
) {
    let mut reader = BundleReader::new(std::fs::File::open(from).unwrap()).unwrap();
    let mut writer = BundleWriter::new(
        std::fs::File::create(to).unwrap(),
        reader.sender(),
        &stranger(),
    )
    .unwrap();
    while let Some(record) = reader.next_record().unwrap() {
        match edit(record) {
            Some(Record::Change(c)) => writer.change(&c).unwrap(),
            Some(Record::Cover { site, start, end }) => writer.cover(site, start, end).unwrap(),
            None => {}
        }
    }
    for &(site, start, end) in extra_covers {
        writer.cover(site, start, end).unwrap();
    }
    writer.finish().unwrap();
}

fn stranger() -> ed25519_dalek::SigningKey {
    ed25519_dalek::SigningKey::from_bytes(&[7; 32])
}

const STRANGER: &str = "--trust-unknown-signer";

fn site_of(node: &Node) -> [u8; 16] {
    let status = node.json(&["sync", "status", "--json"]);
    hex::decode(status["site_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap()
}

#[test]
fn a_bundle_with_a_version_near_i64_max_is_refused_and_changes_nothing() {
    let a = Node::new();
    let b = Node::new();
    a.deploy(&a.site("blog", &[("index.html", "theirs")]), &[]);
    b.deploy(&b.site("mine", &[("index.html", "mine")]), &[]);
    let honest = a.path("honest.fzb");
    a.ok(&["sync", "export", "-o", honest.to_str().unwrap()]);
    let poisoned = a.path("poisoned.fzb");
    rewrite(
        &honest,
        &poisoned,
        |r| match r {
            Record::Change(mut c) => {
                c.db_version = i64::MAX - 1;
                Some(Record::Change(c))
            }
            other => Some(other),
        },
        &[],
    );
    let before = b.json(&["sync", "status", "--json"]);
    let state = b.state();
    let err = b.fails(&["sync", "import", poisoned.to_str().unwrap(), STRANGER]);
    assert!(
        err.contains("db_version") && err.contains("2^53") && err.contains("nothing applied"),
        "{err}"
    );
    assert_same_state(&state, &b.state());
    assert_eq!(before["pending_max_changes"], 100_000);
    assert_eq!(before["pending_max_bytes"], 64 << 20);
    assert_eq!(before["bundle_limits"]["transaction_changes"], 1_000_000);
    assert_eq!(before["bundle_limits"]["sites"], 65_536);

    // b goes on writing with ordinary version numbers, and what it writes travels.
    let clock = before["db_version"].as_i64().unwrap();
    b.deploy(&b.site("later", &[("index.html", "later")]), &[]);
    let after = b.json(&["sync", "status", "--json"]);
    let next = after["db_version"].as_i64().unwrap();
    assert!(next > clock && next < clock + 100, "{clock} -> {next}");
    let out = b.path("out.fzb");
    b.ok(&["sync", "export", "-o", out.to_str().unwrap()]);
    let c = Node::new();
    trust(&c, &b, "b");
    c.ok(&["sync", "import", out.to_str().unwrap()]);
    let apps = c.ok(&["sql", "SELECT name FROM apps ORDER BY name", "--json"]);
    assert!(apps.contains("later") && apps.contains("mine"), "{apps}");
}

#[test]
fn a_forged_cover_does_not_hide_an_origins_later_changes() {
    let a = Node::new();
    let b = Node::new();
    let site = a.site("blog", &[("index.html", "v1")]);
    a.deploy(&site, &[]);
    let first = a.path("first.fzb");
    a.ok(&["sync", "export", "-o", first.to_str().unwrap()]);
    trust(&b, &a, "a");
    b.ok(&["sync", "import", first.to_str().unwrap()]);
    let a_site = site_of(&a);
    let a_hex = hex::encode(a_site);

    // A tiny bundle from a stranger: no changes, one cover of almost all of a's future.
    let forged = b.path("forged.fzb");
    let beyond = b.path("beyond.fzb");
    let empty = |_| None;
    rewrite(&first, &forged, empty, &[(a_site, 1, 1 << 50)]);
    rewrite(&first, &beyond, empty, &[(a_site, 1, 1 << 62)]);

    let before = b.state();
    let err = b.fails(&["sync", "import", beyond.to_str().unwrap(), STRANGER]);
    assert!(err.contains("2^53") && err.contains(&a_hex), "{err}");
    assert_same_state(&before, &b.state());

    b.ok(&["sync", "import", forged.to_str().unwrap(), STRANGER]);
    // The forged cover added nothing.
    assert_same_state(&before, &b.state());

    // a's later deploy reaches b through an export of what b lacks.
    write(&site.join("index.html"), b"v2");
    a.deploy(&site, &[]);
    std::fs::write(b.path("status.json"), b.ok(&["sync", "status", "--json"])).unwrap();
    let delta = a.path("delta.fzb");
    a.ok(&[
        "sync",
        "export",
        "--since",
        b.path("status.json").to_str().unwrap(),
        "-o",
        delta.to_str().unwrap(),
    ]);
    b.ok(&["sync", "import", delta.to_str().unwrap()]);
    let server = b.start(&[]);
    assert_eq!(server.text("blog.localhost", "/"), "v2");
}
