//! The blob collector: `fazt db gc` frees content nothing uses, never content something
//! uses, and a delete that races with a peer's new reference is undone on merge.

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{assert_same_state, sha256_hex, Node};

/// Hashes of every blob row, sorted.
fn blob_hashes(node: &Node) -> Vec<String> {
    node.json(&["sql", "SELECT hash FROM blobs ORDER BY hash", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["hash"].as_str().unwrap().to_string())
        .collect()
}

/// The whole blobs table: (hash, size, data, gzip, br) as hex, sorted by hash.
fn blobs(node: &Node) -> Value {
    node.json(&[
        "sql",
        "SELECT hash, size, hex(data) AS data, hex(gzip) AS gzip, hex(br) AS br FROM blobs ORDER BY hash",
        "--json",
    ])
}

fn gc(node: &Node, grace: &str) -> Value {
    node.json(&["db", "gc", "--grace", grace, "--json"])
}

/// Text that does not compress, `len` bytes.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

const S3_APP: &str = r#"
var s3 = fazt.app.s3, r = request.path.slice(5), b = request.body || {};
if (r === 'put') return respond(s3.put(b.path, b.text, 'text/plain'));
if (r === 'delete') return respond({ deleted: s3.delete(request.query.path) });
respond(404, { error: 'no route ' + r });
"#;

#[test]
fn a_deleted_s3_object_is_freed_and_nothing_else() {
    let node = Node::new();
    let dir = node.site(
        "store",
        &[("index.html", "static"), ("api/main.js", S3_APP)],
    );
    node.deploy(&dir, &["--name", "store"]);
    let server = node.start(&[]);
    let text = noise(1, 100_000);
    let hash = sha256_hex(text.as_bytes());
    let put = server
        .request(Method::POST, "store.localhost", "/api/put")
        .json(&json!({"path": "big.txt", "text": text}))
        .send()
        .unwrap();
    assert_eq!(put.status(), 200);
    let with_object = blobs(&node);
    assert!(blob_hashes(&node).contains(&hash));

    // Stored and referenced: nothing is collected, the table is untouched.
    let done = gc(&node, "0");
    assert_eq!(
        (done["deleted"].as_u64(), done["waiting"].as_u64()),
        (Some(0), Some(0)),
        "{done}"
    );
    assert_eq!(blobs(&node), with_object);

    let del = server
        .request(Method::GET, "store.localhost", "/api/delete?path=big.txt")
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(del.contains("true"), "{del}");
    let done = gc(&node, "0");
    assert_eq!(done["deleted"], 1, "{done}");
    assert_eq!(done["freed_bytes"], 100_000, "{done}");
    // Exactly that blob went; the app's own files stay and it still runs.
    let mut expected: Vec<String> = blob_hashes_of(&with_object);
    expected.retain(|h| *h != hash);
    assert_eq!(blob_hashes(&node), expected);
    assert_eq!(server.text("store.localhost", "/"), "static");
}

fn blob_hashes_of(table: &Value) -> Vec<String> {
    table
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["hash"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn a_removed_app_frees_its_own_blobs_after_the_grace_period_and_shared_ones_stay() {
    let node = Node::new();
    let own = noise(2, 50_000);
    node.deploy(
        &node.site("gone", &[("index.html", "shared page"), ("own.txt", &own)]),
        &[],
    );
    node.deploy(&node.site("kept", &[("index.html", "shared page")]), &[]);
    let before = blobs(&node);
    assert_eq!(before.as_array().unwrap().len(), 2);

    // Every blob is referenced: nothing to do, with any grace, and nothing written.
    let state = node.state();
    assert_eq!(gc(&node, "0")["deleted"], 0);
    assert_same_state(&state, &node.state());

    // What own.txt takes: its bytes and the compressed variants made at deploy time.
    let own_bytes = node.json(&[
        "sql",
        &format!(
            "SELECT length(data) + coalesce(length(gzip), 0) + coalesce(length(br), 0) AS n FROM blobs WHERE hash = '{}'",
            sha256_hex(own.as_bytes())
        ),
        "--json",
    ])[0]["n"]
        .as_u64()
        .unwrap();
    assert!(own_bytes > 50_000, "{own_bytes}");
    node.ok(&["app", "remove", "gone"]);
    // First seen unreferenced now: it waits out the (default, one day) grace period.
    let out = node.ok(&["db", "gc"]);
    assert!(
        out.contains("deleted 0 unreferenced blobs") && out.contains("1 more wait"),
        "{out}"
    );
    assert_eq!(blobs(&node), before);
    let done = gc(&node, "0");
    assert_eq!(done["deleted"], 1, "{done}");
    assert_eq!(done["freed_bytes"], own_bytes, "{done}");
    assert_eq!(done["waiting"], 0, "{done}");
    assert_eq!(blob_hashes(&node), vec![sha256_hex(b"shared page")]);
    let server = node.start(&[]);
    assert_eq!(server.text("kept.localhost", "/"), "shared page");
}

#[test]
fn every_version_keeps_its_blobs() {
    let node = Node::new();
    let site = node.site("app", &[("index.html", "one"), ("a.css", "p{}")]);
    node.deploy(&site, &[]);
    crate::harness::write(&site.join("index.html"), b"two");
    node.deploy(&site, &[]);
    assert_eq!(blobs(&node).as_array().unwrap().len(), 3);
    let state = node.state();
    assert_eq!(gc(&node, "0")["deleted"], 0);
    assert_same_state(&state, &node.state());
    node.ok(&["app", "rollback", "app"]);
    let server = node.start(&[]);
    assert_eq!(server.text("app.localhost", "/"), "one");
}

/// Exports everything `from` holds and imports it into `to` (which trusts `from`'s key from
/// the first carry on); returns import's output.
fn carry(from: &Node, to: &Node, name: &str) -> String {
    let id = from.ok(&["peer", "id"]).trim().to_string();
    // Refused (and nothing changes) when `to` trusts `from` already.
    let peer = format!("p{}", id[..8].to_lowercase());
    let _ = to.run(&["peer", "trust", &id, "--name", &peer]);
    let bundle = from.path(name);
    from.ok(&["sync", "export", "-o", bundle.to_str().unwrap()]);
    to.ok(&["sync", "import", bundle.to_str().unwrap()])
}

/// Node `a` collects blob X (unreferenced there) while node `b`, which already holds X,
/// deploys a version that uses it (so its deploy writes no blob row). Returns (a, b, X).
fn race() -> (Node, Node, String) {
    let a = Node::new();
    let b = Node::new();
    let x = noise(3, 20_000);
    a.deploy(&a.site("old", &[("x.txt", &x)]), &[]);
    carry(&a, &b, "first.fzb");
    a.ok(&["app", "remove", "old"]);
    assert_eq!(gc(&a, "0")["deleted"], 1);
    let report = b.deploy(&b.site("new", &[("x.txt", &x)]), &[]);
    assert_eq!(report["new_blobs"], 0, "{report}");
    (a, b, x)
}

fn serves_everywhere(nodes: &[&Node], x: &str) {
    let first = blobs(nodes[0]);
    assert!(blob_hashes_of(&first).contains(&sha256_hex(x.as_bytes())));
    for node in nodes {
        assert_eq!(blobs(node), first, "the nodes hold different blobs");
        let server = node.start(&[]);
        assert_eq!(server.text("new.localhost", "/x.txt"), x);
    }
}

#[test]
fn a_collected_blob_that_a_peer_just_used_comes_back_when_the_delete_reaches_it() {
    let (a, b, x) = race();
    let out = carry(&a, &b, "delete.fzb");
    assert!(out.contains("re-inserted 1 blobs and 0 versions"), "{out}");
    carry(&b, &a, "back.fzb");
    serves_everywhere(&[&a, &b], &x);
    // Referenced again on both: the collector leaves it alone from now on.
    assert_eq!(gc(&a, "0")["deleted"], 0);
    assert_eq!(gc(&b, "0")["deleted"], 0);
}

#[test]
fn a_version_arriving_at_the_collecting_node_first_is_complete_once_its_author_merged_the_delete() {
    let (a, b, x) = race();
    // A gets the version before B hears of the delete: A cannot serve x.txt yet (it deleted
    // the bytes, and B's blob row is older than A's delete).
    carry(&b, &a, "version.fzb");
    assert!(!blob_hashes(&a).contains(&sha256_hex(x.as_bytes())));
    // A's collector must not delete anything on its behalf meanwhile.
    assert_eq!(gc(&a, "0")["deleted"], 0);
    let out = carry(&a, &b, "delete.fzb");
    assert!(out.contains("re-inserted 1 blobs and 0 versions"), "{out}");
    carry(&b, &a, "back.fzb");
    serves_everywhere(&[&a, &b], &x);
}

/// Waits until `server` answers `body` for `http://APP.localhost/PATH`.
fn wait_for(server: &crate::harness::Server, app: &str, path: &str, body: &str) {
    crate::peers::eventually(&format!("{app}.localhost{path} serves its content"), || {
        let r = server
            .request(Method::GET, &format!("{app}.localhost"), path)
            .send()
            .ok()?;
        (r.status() == 200 && r.text().ok()? == body).then_some(())
    });
}

#[test]
fn over_a_peer_session_the_node_that_uses_a_collected_blob_puts_it_back() {
    let crate::peers::Pair {
        local,
        local_server,
        zyt,
        zyt_server,
    } = crate::peers::joined_pair();
    let x = noise(4, 100_000);
    local.deploy(&local.site("old", &[("x.txt", &x)]), &[]);
    wait_for(&zyt_server, "old", "/x.txt", &x);
    let port = zyt_server.port;
    drop(zyt_server);

    // Apart: zyt removes the app and collects x.txt's blob; local, which holds the blob,
    // deploys a new app that uses it.
    zyt.ok(&["app", "remove", "old"]);
    assert_eq!(gc(&zyt, "0")["deleted"], 1);
    let report = local.deploy(&local.site("new", &[("x.txt", &x)]), &[]);
    assert_eq!(report["new_blobs"], 0, "{report}");

    // Together again: local merges the delete, puts the blob back, and zyt gets it.
    let zyt_server = crate::harness::Server::spawn(zyt.command().args([
        "server",
        "start",
        "--port",
        &port.to_string(),
    ]));
    wait_for(&zyt_server, "new", "/x.txt", &x);
    assert_eq!(local_server.text("new.localhost", "/x.txt"), x);
    crate::peers::eventually("both nodes hold the same blobs", || {
        (blobs(&local) == blobs(&zyt)).then_some(())
    });
    assert!(blob_hashes(&zyt).contains(&sha256_hex(x.as_bytes())));
}

fn version_numbers(node: &Node, app: &str) -> Vec<(i64, bool)> {
    node.json(&["app", "versions", app, "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|v| {
            (
                v["number"].as_i64().unwrap(),
                v["current"].as_bool().unwrap(),
            )
        })
        .collect()
}

#[test]
fn prune_keeps_the_current_and_the_newest_versions_and_their_content() {
    let node = Node::new();
    let site = node.site("app", &[("index.html", "one"), ("a.css", "p{}")]);
    node.deploy(&site, &[]);
    for body in ["two", "three", "four"] {
        crate::harness::write(&site.join("index.html"), body.as_bytes());
        node.deploy(&site, &[]);
    }
    node.ok(&["app", "rollback", "app", "--to", "v2"]);
    let out = node.ok(&["app", "prune", "app", "--keep", "1"]);
    assert!(
        out.contains("deleted 2 old versions of app (v3, v1); kept 2"),
        "{out}"
    );
    assert_eq!(version_numbers(&node, "app"), vec![(4, false), (2, true)]);
    let before = node.state();
    let err = node.fails(&["app", "rollback", "app", "--to", "v1"]);
    assert!(err.contains("no version \"v1\" (pruned"), "{err}");
    assert_same_state(&before, &node.state());

    let done = gc(&node, "0");
    assert_eq!(done["deleted"], 2, "{done}");
    let mut left = vec![sha256_hex(b"two"), sha256_hex(b"four"), sha256_hex(b"p{}")];
    left.sort();
    assert_eq!(blob_hashes(&node), left);
    let server = node.start(&[]);
    assert_eq!(server.text("app.localhost", "/"), "two");
    assert_eq!(server.text("app.localhost", "/a.css"), "p{}");
}

#[test]
fn a_version_pruned_on_one_node_while_another_rolls_back_to_it_comes_back() {
    let a = Node::new();
    let b = Node::new();
    let site = a.site("app", &[("index.html", "one")]);
    a.deploy(&site, &[]);
    crate::harness::write(&site.join("index.html"), b"two");
    a.deploy(&site, &[]);
    carry(&a, &b, "first.fzb");

    // Apart: a prunes v1 and collects its content; b goes back to v1.
    a.ok(&["app", "prune", "app", "--keep", "1"]);
    assert_eq!(gc(&a, "0")["deleted"], 1);
    b.ok(&["app", "rollback", "app", "--to", "v1"]);

    let out = carry(&a, &b, "prune.fzb");
    assert!(out.contains("re-inserted 1 blobs and 1 versions"), "{out}");
    carry(&b, &a, "back.fzb");
    for node in [&a, &b] {
        assert_eq!(version_numbers(node, "app"), vec![(2, false), (1, true)]);
        let server = node.start(&[]);
        assert_eq!(server.text("app.localhost", "/"), "one");
    }
    assert_eq!(blobs(&a), blobs(&b));
    let files = |n: &Node| {
        n.json(&[
            "sql",
            "SELECT * FROM version_files ORDER BY version_id, path",
            "--json",
        ])
    };
    assert_eq!(files(&a), files(&b));
}
