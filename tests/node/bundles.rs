//! Nodes that never meet exchange change bundles; `fazt sql` and `fazt db replicate`.

use std::str::FromStr;

use crate::harness::{assert_same_state, write, Node};

fn count(node: &Node, sql: &str) -> i64 {
    node.json(&["sql", sql, "--json"])[0]["n"].as_i64().unwrap()
}

pub(crate) fn node_id(node: &Node) -> String {
    node.ok(&["peer", "id"]).trim().to_string()
}

/// `node` trusts `other` (pins its node id under `name`), as `fazt peer trust` does.
pub(crate) fn trust(node: &Node, other: &Node, name: &str) {
    node.ok(&["peer", "trust", &node_id(other), "--name", name]);
}

/// CRC-32 (IEEE), to re-seal a bundle altered on purpose so that only its signature is
/// left to catch the change.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 4;
    let sum = crc32(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum.to_le_bytes());
}

/// A node with a deployed site and a bundle of it; returns (node, bundle path).
fn exporter(content: &str) -> (Node, std::path::PathBuf) {
    let a = Node::new();
    a.deploy(&a.site("signed", &[("index.html", content)]), &[]);
    let bundle = a.path("a.fzb");
    let err = a
        .run(&["sync", "export", "-o", bundle.to_str().unwrap()])
        .stderr;
    assert!(
        err.contains(&format!("signed by this node ({})", node_id(&a))),
        "{err}"
    );
    (a, bundle)
}

#[test]
fn bundles_signed_by_this_node_or_a_trusted_peer_import_and_say_who_signed() {
    let (a, bundle) = exporter("from a");
    let b = Node::new();
    trust(&b, &a, "laptop");
    let out = b.ok(&["sync", "import", bundle.to_str().unwrap()]);
    assert!(
        out.contains(&format!("signed by peer laptop ({})", node_id(&a))),
        "{out}"
    );
    assert_eq!(count(&b, "SELECT count(*) AS n FROM apps"), 1);
    // A node's own bundle is trusted too.
    let own = a.ok(&["sync", "import", bundle.to_str().unwrap()]);
    assert!(
        own.contains(&format!("signed by this node ({})", node_id(&a))),
        "{own}"
    );
}

#[test]
fn a_bundle_from_an_unknown_node_is_refused_and_changes_nothing_unless_explicitly_trusted() {
    let (a, bundle) = exporter("from a");
    let b = Node::new();
    b.deploy(&b.site("mine", &[("index.html", "b's own")]), &[]);
    let before = b.state();
    let err = b.fails(&["sync", "import", bundle.to_str().unwrap()]);
    assert!(
        err.contains(&format!(
            "the bundle is signed by node {}, which is not a trusted peer of this node",
            node_id(&a)
        )) && err.contains("fazt peer trust"),
        "{err}"
    );
    assert_same_state(&before, &b.state());
    assert!(!b.path("data.db.import-spool").exists());

    let out = b.ok(&[
        "sync",
        "import",
        "--trust-unknown-signer",
        bundle.to_str().unwrap(),
    ]);
    assert!(
        out.contains(&format!(
            "signed by {}, not a trusted peer; imported because of --trust-unknown-signer",
            node_id(&a)
        )),
        "{out}"
    );
    assert_eq!(count(&b, "SELECT count(*) AS n FROM apps"), 2);
}

#[test]
fn a_bundle_altered_after_signing_is_refused_even_with_the_flag() {
    let (a, bundle) = exporter("the original page");
    let b = Node::new();
    trust(&b, &a, "a");
    let bytes = std::fs::read(&bundle).unwrap();
    let at = bytes
        .windows(17)
        .position(|w| w == b"the original page")
        .expect("page content in the bundle");
    let mut forged = bytes.clone();
    forged[at..at + 17].copy_from_slice(b"the attacker page");
    reseal(&mut forged);
    // The claimed signer replaced by b's own id: a valid CRC, but no valid signature.
    let mut impersonated = bytes.clone();
    let b_key = fazt_proto::NodeId::from_str(&node_id(&b)).unwrap();
    impersonated[26..58].copy_from_slice(b_key.as_bytes());
    reseal(&mut impersonated);

    let before = b.state();
    let bad = b.path("forged.fzb");
    for (content, signer) in [(&forged, node_id(&a)), (&impersonated, node_id(&b))] {
        std::fs::write(&bad, content).unwrap();
        for extra in [&[][..], &["--trust-unknown-signer"][..]] {
            let mut args = vec!["sync", "import", bad.to_str().unwrap()];
            args.extend_from_slice(extra);
            let err = b.fails(&args);
            assert!(
                err.contains(&format!("the bundle's signature does not match its content: it was altered after it was signed, or node {signer} never signed it")),
                "{err}"
            );
            assert_same_state(&before, &b.state());
        }
    }
}

#[test]
fn an_unsigned_version_1_bundle_is_refused_without_the_flag() {
    let (_a, bundle) = exporter("old format");
    // The same content in format version 1: no signer, no signature.
    let v2 = std::fs::read(&bundle).unwrap();
    let mut v1 = v2[..26].to_vec();
    v1[8..10].copy_from_slice(&1u16.to_le_bytes());
    v1.extend_from_slice(&v2[58..v2.len() - 4 - 64]);
    v1.extend_from_slice(&[0; 4]);
    reseal(&mut v1);
    let old = _a.path("v1.fzb");
    std::fs::write(&old, &v1).unwrap();

    let b = Node::new();
    b.ok(&["server", "init"]);
    let before = b.state();
    let err = b.fails(&["sync", "import", old.to_str().unwrap()]);
    assert!(
        err.contains("the bundle is unsigned (format version 1, from an older fazt)")
            && err.contains("--trust-unknown-signer"),
        "{err}"
    );
    assert_same_state(&before, &b.state());
    let out = b.ok(&[
        "sync",
        "import",
        "--trust-unknown-signer",
        old.to_str().unwrap(),
    ]);
    assert!(out.contains("the bundle is unsigned"), "{out}");
    assert_eq!(count(&b, "SELECT count(*) AS n FROM apps"), 1);
}

#[test]
fn a_deploy_travels_by_bundle_and_is_served_by_the_other_node() {
    let laptop = Node::new();
    let server_node = Node::new();
    laptop.deploy(
        &laptop.site(
            "blog",
            &[("index.html", "written offline"), ("style.css", "p{}")],
        ),
        &[],
    );
    let bundle = laptop.path("changes.fzb");
    laptop.ok(&["sync", "export", "-o", bundle.to_str().unwrap()]);

    trust(&server_node, &laptop, "laptop");
    let server = server_node.start(&[]);
    let out = server_node.ok(&["sync", "import", bundle.to_str().unwrap()]);
    assert!(out.contains("imported 1 transactions"), "{out}");
    assert_eq!(server.text("blog.localhost", "/"), "written offline");
    assert_eq!(server.text("blog.localhost", "/style.css"), "p{}");

    // The same bundle again changes nothing.
    let before = server_node.state();
    let out = server_node.ok(&["sync", "import", bundle.to_str().unwrap()]);
    assert!(out.contains("0 changes applied"), "{out}");
    assert_same_state(&before, &server_node.state());
}

#[test]
fn since_exports_only_what_the_other_node_lacks() {
    let a = Node::new();
    let b = Node::new();
    let site = a.site("app", &[("index.html", "v1")]);
    a.deploy(&site, &[]);
    let full = a.path("full.fzb");
    a.ok(&["sync", "export", "-o", full.to_str().unwrap()]);
    trust(&b, &a, "a");
    b.ok(&["sync", "import", full.to_str().unwrap()]);

    write(&site.join("index.html"), b"v2");
    a.deploy(&site, &[]);
    std::fs::write(b.path("status.json"), b.ok(&["sync", "status", "--json"])).unwrap();
    let delta = a.path("delta.fzb");
    let r = a.run(&[
        "sync",
        "export",
        "--since",
        b.path("status.json").to_str().unwrap(),
        "-o",
        delta.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", r.stderr);
    let full_size = std::fs::metadata(&full).unwrap().len();
    let delta_size = std::fs::metadata(&delta).unwrap().len();
    assert!(
        delta_size < full_size,
        "delta {delta_size} vs full {full_size}"
    );
    b.ok(&["sync", "import", delta.to_str().unwrap()]);
    let server = b.start(&[]);
    assert_eq!(server.text("app.localhost", "/"), "v2");
    assert_eq!(
        b.json(&["app", "versions", "app", "--json"])
            .as_array()
            .unwrap()
            .len(),
        2
    );

    // A delta from a node that has nothing new is empty.
    std::fs::write(b.path("status.json"), b.ok(&["sync", "status", "--json"])).unwrap();
    let r = a.run(&[
        "sync",
        "export",
        "--since",
        b.path("status.json").to_str().unwrap(),
        "-o",
        delta.to_str().unwrap(),
    ]);
    assert!(r.stderr.contains("exported 0 changes"), "{}", r.stderr);
}

#[test]
fn edits_on_both_sides_converge_through_bundles() {
    let a = Node::new();
    let b = Node::new();
    for n in [&a, &b] {
        n.ok(&["sql", "CREATE TABLE notes (id TEXT PRIMARY KEY NOT NULL, body TEXT, stars INTEGER NOT NULL DEFAULT 0)"]);
        n.ok(&["db", "replicate", "notes"]);
    }
    a.ok(&[
        "sql",
        "INSERT INTO notes (id, body) VALUES ('shared', 'from a'), ('a-only', 'x')",
    ]);
    b.ok(&[
        "sql",
        "INSERT INTO notes (id, body, stars) VALUES ('shared', 'from b', 3), ('b-only', 'y', 1)",
    ]);
    let (ab, ba) = (a.path("ab.fzb"), b.path("ba.fzb"));
    a.ok(&["sync", "export", "-o", ab.to_str().unwrap()]);
    b.ok(&["sync", "export", "-o", ba.to_str().unwrap()]);
    trust(&a, &b, "b");
    trust(&b, &a, "a");
    a.ok(&["sync", "import", ba.to_str().unwrap()]);
    b.ok(&["sync", "import", ab.to_str().unwrap()]);
    let query = "SELECT id, body, stars FROM notes ORDER BY id";
    assert_eq!(
        a.json(&["sql", query, "--json"]),
        b.json(&["sql", query, "--json"])
    );
    assert_eq!(count(&a, "SELECT count(*) AS n FROM notes"), 3);
}

#[test]
fn truncated_corrupt_and_foreign_bundles_are_refused_and_change_nothing() {
    let a = Node::new();
    a.deploy(&a.site("x", &[("index.html", "x")]), &[]);
    let bundle = a.path("x.fzb");
    a.ok(&["sync", "export", "-o", bundle.to_str().unwrap()]);
    let bytes = std::fs::read(&bundle).unwrap();

    let b = Node::new();
    b.ok(&["server", "init"]);
    let before = b.state();
    let bad = b.path("bad.fzb");
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "the bundle is truncated",
            bytes[..bytes.len() * 2 / 3].to_vec(),
        ),
        (
            "the bundle's checksum does not match: the file is damaged",
            {
                let mut v = bytes.clone();
                let i = v.len() / 2;
                v[i] ^= 0x01;
                v
            },
        ),
        (
            "not a fazt change bundle (wrong magic bytes)",
            b"{\"json\": true}".to_vec(),
        ),
        ("not a fazt change bundle (wrong magic bytes)", Vec::new()),
    ];
    for (expect, content) in cases {
        std::fs::write(&bad, &content).unwrap();
        let err = b.fails(&["sync", "import", bad.to_str().unwrap()]);
        assert!(err.contains(expect), "{expect}: {err}");
        assert_same_state(&before, &b.state());
    }
    assert!(b
        .fails(&["sync", "import", b.path("missing.fzb").to_str().unwrap()])
        .contains("no bundle"));
    assert!(b
        .fails(&[
            "sync",
            "export",
            "--since",
            bad.to_str().unwrap(),
            "-o",
            "/dev/null"
        ])
        .contains("sync status --json"));
}

/// Rows in `settings`, read without waiting for any writer (WAL), or 0 before it exists.
fn settings_rows(node: &Node) -> i64 {
    let Ok(conn) = rusqlite::Connection::open_with_flags(
        node.db(),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    ) else {
        return 0;
    };
    conn.query_row("SELECT count(*) FROM settings", [], |r| r.get(0))
        .unwrap_or(0)
}

/// Everything an import writes: the whole database but the tables that differ between two
/// nodes for reasons of their own (their identity, the peers they pinned and when, and the
/// site-id table, whose own entry is each node's site id).
fn imported_state(node: &Node) -> String {
    node.state_without(&["node_identity", "peers", "fazt_sync_sites"])
}

#[test]
fn kill_9_during_import_leaves_a_consistent_database_and_importing_again_completes_it() {
    // Import applies at most 20,000 changes per transaction (IMPORT_BATCH), never splitting an
    // origin transaction: three transactions of 12,000 rows (over 20,000 changes each) are
    // three batches, after a first one holding the deploy.
    const ROWS: i64 = 3 * 12_000;
    let a = Node::new();
    a.deploy(&a.site("site", &[("index.html", "a site")]), &[]);
    for part in 0..3 {
        a.ok(&[
            "sql",
            &format!(
                "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < 11999)
                 INSERT INTO settings (key, value) SELECT 'k{part}-' || i, 'v' || i FROM n"
            ),
        ]);
    }
    let bundle = a.path("big.fzb");
    a.ok(&["sync", "export", "-o", bundle.to_str().unwrap()]);

    // What a clean import gives.
    let clean = Node::new();
    clean.ok(&["server", "init"]);
    trust(&clean, &a, "a");
    clean.ok(&["sync", "import", bundle.to_str().unwrap()]);
    assert_eq!(settings_rows(&clean), ROWS);

    // Killed after a batch of settings committed and before the last one did. A machine fast
    // enough to finish the import between two looks is given a fresh node to try again on.
    let (b, cut_at) = (0..5)
        .find_map(|_| {
            let b = Node::new();
            b.ok(&["server", "init"]);
            trust(&b, &a, "a");
            let mut child = b
                .command()
                .args(["sync", "import", bundle.to_str().unwrap()])
                .spawn()
                .unwrap();
            let rows = loop {
                let rows = settings_rows(&b);
                if rows > 0 || child.try_wait().unwrap().is_some() {
                    break rows;
                }
            };
            child.kill().unwrap();
            child.wait().unwrap();
            let rows_after_kill = settings_rows(&b);
            (rows > 0 && rows_after_kill < ROWS).then_some((b, rows_after_kill))
        })
        .expect("no import was killed between its batches in five tries");
    // Whole batches only: every origin transaction is there entirely or not at all.
    assert!(
        cut_at % 12_000 == 0 && cut_at > 0 && cut_at < ROWS,
        "{cut_at} rows after the kill"
    );
    let check = b.json(&["sql", "PRAGMA integrity_check", "--json"]);
    assert_eq!(check[0]["integrity_check"], "ok");

    let out = b.ok(&["sync", "import", bundle.to_str().unwrap()]);
    assert!(out.contains("imported"), "{out}");
    assert_same_state(&imported_state(&clean), &imported_state(&b));
    let server = b.start(&[]);
    assert_eq!(server.text("site.localhost", "/"), "a site");
}

#[test]
fn sql_prints_rows_and_refuses_bad_statements_without_changing_anything() {
    let a = Node::new();
    a.ok(&["server", "init"]);
    a.ok(&["sql", "CREATE TABLE t (id INTEGER PRIMARY KEY NOT NULL, v)"]);
    let before = a.state();
    let err = a.fails(&[
        "sql",
        "INSERT INTO t VALUES (1, 'a'); INSERT INTO nope VALUES (1)",
    ]);
    assert!(err.contains("no such table: nope"), "{err}");
    // The whole command rolled back.
    assert_same_state(&before, &a.state());
    let rows = a.json(&[
        "sql",
        "INSERT INTO t VALUES (1, x'00ff'), (2, 2.5); SELECT * FROM t ORDER BY id",
        "--json",
    ]);
    assert_eq!(rows[0]["v"], "00ff");
    assert_eq!(rows[1]["v"], 2.5);
    let table = a.ok(&["sql", "SELECT id, v FROM t ORDER BY id"]);
    assert!(
        table.starts_with("id") && table.contains("x'00ff'"),
        "{table}"
    );
}

#[test]
fn db_replicate_refuses_tables_that_break_the_rules_or_belong_to_the_node() {
    let a = Node::new();
    a.ok(&[
        "sql",
        "CREATE TABLE people (email TEXT PRIMARY KEY NOT NULL, name TEXT NOT NULL)",
    ]);
    let before = a.state();
    let err = a.fails(&["db", "replicate", "people"]);
    assert!(err.contains("needs a DEFAULT"), "{err}");
    assert!(a
        .fails(&["db", "replicate", "node_identity"])
        .contains("never replicates"));
    assert!(a
        .fails(&["db", "replicate", "missing"])
        .contains("table missing does not exist"));
    assert_same_state(&before, &a.state());
}
