//! Claims of docs/sync-protocol.md and docs/cli.md about peers that the other peer tests do
//! not reach (sync_port.rs has those that need a hand-made QUIC peer): bundles that name
//! node-local tables, join defaults, `peer sync` failures, `deploy --to` an unknown peer,
//! `--sync-port`, `--db` anywhere, and version numbers after a merge.

use fazt_proto::bundle::{BundleReader, BundleWriter, Record, WireChange, WireValue};
use fazt_sync::Value;

use crate::harness::{assert_same_state, Node, Run};
use crate::peers::eventually;

/// A ticket from `node` (the last line `peer invite` prints).
fn ticket(node: &Node) -> String {
    let out = node.ok(&["peer", "invite"]);
    let t = out.lines().last().unwrap_or_default().trim().to_string();
    assert!(t.starts_with("fazt1"), "no ticket in:\n{out}");
    t
}

fn node_id(node: &Node) -> String {
    node.ok(&["peer", "id"]).trim().to_string()
}

/// `peer list --json` as (name, node id) pairs.
fn peer_names(node: &Node) -> Vec<(String, String)> {
    node.json(&["peer", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["node_id"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The one `error: ...` line of a run that must exit with status 1.
fn exit_1(run: &Run, what: &str) -> String {
    assert_eq!(
        run.status.code(),
        Some(1),
        "{what}: want exit status 1, got {:?}\n{}{}",
        run.status,
        run.stdout,
        run.stderr
    );
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{what}: {}", run.stderr);
    errors[0].to_string()
}

/// The node-local tables (first schema line and rows) in `state`, as `Node::state()` prints
/// them (the list in src/db/migrations.rs, NODE_LOCAL_TABLES).
fn node_local(state: &str) -> String {
    const TABLES: &[&str] = &[
        "node_config",
        "node_identity",
        "node_runtime",
        "peers",
        "peer_invites",
        "peer_content",
        "app_logs",
        "app_usage",
        "blob_unreferenced",
        "blob_rescue",
        "version_rescue",
        "version_files_rescue",
    ];
    let mut out = String::new();
    for line in state.lines() {
        if TABLES
            .iter()
            .any(|t| line.starts_with(&format!("table {t}: ")))
        {
            out.push_str(line);
            out.push('\n');
        }
    }
    for t in TABLES {
        let head = format!("== {t} (");
        let from = state
            .find(&head)
            .unwrap_or_else(|| panic!("no table {t} in the state"));
        let rest = &state[from..];
        let to = rest[1..].find("\n== ").map_or(rest.len(), |i| i + 2);
        out.push_str(&rest[..to]);
    }
    out
}

fn text_key(t: &str) -> Vec<u8> {
    fazt_sync::pack::pack(&[Value::Text(t.into())])
}

#[test]
fn node_local_tables_never_replicate_even_through_a_trusted_signed_bundle() {
    let a = Node::new();
    let b = Node::new();
    a.deploy(&a.site("blog", &[("index.html", "from a")]), &[]);
    b.ok(&["peer", "trust", &node_id(&a), "--name", "a"]);
    b.ok(&["peer", "invite"]);
    let honest = a.path("honest.fzb");
    a.ok(&["sync", "export", "-o", honest.to_str().unwrap()]);

    // The same bundle, re-signed with a's own key (read from its file, as a thief of that
    // key could), plus one more transaction of a's that writes b's node-local tables: its
    // secret key, its name, a's address and a new trusted key, an open invitation.
    let secret: Vec<u8> = rusqlite::Connection::open(a.db())
        .unwrap()
        .query_row(
            "SELECT secret_key FROM node_identity WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&secret.try_into().unwrap());
    let status = a.json(&["sync", "status", "--json"]);
    let site: [u8; 16] = hex::decode(status["site_id"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let version = status["db_version"].as_i64().unwrap() + 1;
    let forged = [
        (
            "node_identity",
            fazt_sync::pack::pack(&[Value::Integer(1)]),
            "secret_key",
            WireValue::Blob(vec![0; 32]),
        ),
        (
            "node_config",
            text_key("name"),
            "value",
            WireValue::Text("owned".into()),
        ),
        (
            "peers",
            text_key("a"),
            "addr",
            WireValue::Text("evil.example:1".into()),
        ),
        (
            "peers",
            text_key("evil"),
            "node_id",
            WireValue::Text(node_id(&Node::new())),
        ),
        (
            "peer_invites",
            text_key("00"),
            "expires_at",
            WireValue::Integer(1 << 40),
        ),
    ];
    let bundle = a.path("local-tables.fzb");
    let mut reader = BundleReader::new(std::fs::File::open(&honest).unwrap()).unwrap();
    let mut writer =
        BundleWriter::new(std::fs::File::create(&bundle).unwrap(), site, &key).unwrap();
    while let Some(record) = reader.next_record().unwrap() {
        match record {
            Record::Change(c) => writer.change(&c).unwrap(),
            Record::Cover { site, start, end } => writer.cover(site, start, end).unwrap(),
        }
    }
    for (seq, (table, pk, cid, val)) in forged.into_iter().enumerate() {
        writer
            .change(&WireChange {
                table: table.into(),
                pk,
                cid: cid.into(),
                val,
                col_version: 1,
                db_version: version,
                site,
                cl: 1,
                seq: seq as i64,
            })
            .unwrap();
    }
    writer.cover(site, version, version).unwrap();
    writer.finish().unwrap();

    let before = node_local(&b.state());
    let out = b.ok(&["sync", "import", bundle.to_str().unwrap()]);
    assert!(out.contains("signed by peer a"), "a trusted signer: {out}");
    assert!(out.contains("5 waiting"), "{out}");
    // The honest part is applied; the node-local part waits, never applied.
    assert_eq!(
        b.json(&["sql", "SELECT name FROM apps", "--json"]),
        serde_json::json!([{"name": "blog"}])
    );
    assert_eq!(
        node_local(&b.state()),
        before,
        "node-local tables unchanged"
    );
    let status = b.json(&["sync", "status", "--json"]);
    assert_eq!(status["pending_changes"], 5, "{status}");
    // The node still is itself: same key, one peer.
    assert_eq!(peer_names(&b), vec![("a".to_string(), node_id(&a))]);
}

/// The name `fazt` suggests for a node without `name` in its config: its host name, cleaned.
fn host_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    let cleaned: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(63)
        .collect();
    let cleaned = cleaned.trim_matches('-').to_string();
    if cleaned.is_empty() {
        "node".into()
    } else {
        cleaned
    }
}

/// Sets `name` in the node's (node-local) config, the way a user can: with `fazt sql`.
fn set_name(node: &Node, name: &str) {
    node.ok(&[
        "sql",
        &format!("INSERT OR REPLACE INTO node_config (key, value) VALUES ('name', '{name}')"),
    ]);
}

#[test]
fn join_defaults_to_the_names_the_nodes_suggest() {
    let zyt = Node::new();
    set_name(&zyt, "zyt-box");
    let _server = zyt.start(&[]);

    // No --name, no --as: the joiner takes the inviter's suggestion, and offers its own
    // host name (it has no name in its config).
    let plain = Node::new();
    let out = plain.ok(&["peer", "join", &ticket(&zyt)]);
    assert!(out.contains("joined zyt-box"), "{out}");
    assert_eq!(
        peer_names(&plain),
        vec![("zyt-box".to_string(), node_id(&zyt))]
    );
    assert_eq!(peer_names(&zyt), vec![(host_name(), node_id(&plain))]);

    // A joiner with a name in its config offers that; a taken name is made unique.
    let named = Node::new();
    set_name(&named, "laptop");
    named.ok(&["peer", "join", &ticket(&zyt)]);
    let again = Node::new();
    set_name(&again, "laptop");
    again.ok(&["peer", "join", &ticket(&zyt)]);
    let mut want = vec![
        (host_name(), node_id(&plain)),
        ("laptop".to_string(), node_id(&named)),
        ("laptop-2".to_string(), node_id(&again)),
    ];
    want.sort();
    assert_eq!(peer_names(&zyt), want);
    assert_eq!(peer_names(&again)[0].0, "zyt-box");
}

#[test]
fn peer_sync_pulls_into_a_node_without_a_server_and_fails_with_the_reason() {
    let zyt = Node::new();
    let server = zyt.start(&[]);
    let local = Node::new();
    local.ok(&[
        "peer",
        "join",
        &ticket(&zyt),
        "--name",
        "zyt",
        "--as",
        "local",
    ]);
    zyt.deploy(&zyt.site("pulled", &[("index.html", "from zyt")]), &[]);

    // local runs no server: the sync alone brings zyt's deploy.
    let out = local.ok(&["peer", "sync", "zyt", "--timeout", "30"]);
    assert!(out.contains("synced with zyt"), "{out}");
    assert_eq!(
        local.json(&["sql", "SELECT name FROM apps", "--json"]),
        serde_json::json!([{"name": "pulled"}])
    );
    let pulled = local.start(&[]);
    assert_eq!(pulled.text("pulled.localhost", "/"), "from zyt");
    drop(pulled);

    // zyt gone: nothing answers at its address any more.
    let port = server.port;
    drop(server);
    let before = local.state();
    let run = local.run(&["peer", "sync", "zyt", "--timeout", "2"]);
    let err = exit_1(&run, "peer sync with a stopped peer");
    assert!(
        err.contains(&format!(
            "could not reach zyt at localhost:{port} within 2s"
        )),
        "{err}"
    );
    // A failed sync changes nothing.
    assert_same_state(&before, &local.state());

    // An address nothing resolves to.
    local.ok(&[
        "peer",
        "add",
        "nowhere",
        "nowhere.invalid:4698",
        "--key",
        &node_id(&Node::new()),
    ]);
    let run = local.run(&["peer", "sync", "nowhere", "--timeout", "5"]);
    let err = exit_1(&run, "peer sync with an unresolvable address");
    assert!(err.contains("cannot resolve nowhere.invalid:4698"), "{err}");
}

#[test]
fn deploy_to_an_unknown_peer_changes_nothing() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "v1")]), &[]);
    let before = node.state();
    let dir = node.site("blog", &[("index.html", "v2")]);
    let run = node.run(&["app", "deploy", dir.to_str().unwrap(), "--to", "nosuch"]);
    let err = exit_1(&run, "deploy --to an unknown peer");
    assert!(err.contains("no peer named nosuch"), "{err}");
    assert_same_state(&before, &node.state());
}

/// The UDP port in a server banner ("... peers on udp N)").
fn udp_port(banner: &str) -> u16 {
    banner
        .split("peers on udp ")
        .nth(1)
        .and_then(|rest| rest.trim().trim_end_matches(')').parse().ok())
        .unwrap_or_else(|| panic!("no udp port in {banner:?}"))
}

#[test]
fn the_sync_port_follows_the_flag_and_zero_picks_a_free_one() {
    let zyt = Node::new();
    // --sync-port 0: a free port of its own, not the HTTP port's number.
    let server = zyt.start(&["--sync-port", "0"]);
    let picked = udp_port(&server.banner);
    assert_ne!(picked, 0);
    assert_ne!(picked, server.port, "{}", server.banner);
    let status = zyt.json(&["server", "status", "--json"]);
    assert_eq!(status["running"]["sync_port"], picked, "{status}");
    // A ticket made now points at that port, and joining through it works.
    let t = ticket(&zyt);
    let parsed: fazt_proto::ticket::Ticket = t.parse().unwrap();
    assert_eq!(parsed.addr, format!("localhost:{picked}"));
    let local = Node::new();
    local.ok(&["peer", "join", &t, "--name", "zyt", "--as", "local"]);
    drop(server);

    // A given port: the server listens exactly there (UDP), whatever the HTTP port.
    let free = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = zyt.start(&["--sync-port", &free.to_string()]);
    assert_eq!(udp_port(&server.banner), free);
    assert!(
        std::net::UdpSocket::bind(("127.0.0.1", free)).is_err(),
        "the server holds UDP {free}"
    );
    local.ok(&["peer", "remove", "zyt"]);
    local.ok(&[
        "peer",
        "add",
        "zyt",
        &format!("localhost:{free}"),
        "--key",
        &node_id(&zyt),
    ]);
    let out = local.ok(&["peer", "sync", "zyt", "--timeout", "30"]);
    assert!(out.contains("synced with zyt"), "{out}");
}

#[test]
fn the_db_flag_works_anywhere_on_the_line() {
    let node = Node::new();
    let other = node.path("other.db");
    let other = other.to_str().unwrap();
    let site = node.site("blog", &[("index.html", "x")]);
    let site = site.to_str().unwrap();
    node.ok(&["--db", other, "app", "deploy", site, "--name", "first"]);
    node.ok(&["app", "--db", other, "deploy", site, "--name", "second"]);
    node.ok(&["app", "deploy", site, "--name", "third", "--db", other]);
    node.ok(&[
        "app",
        "deploy",
        site,
        &format!("--db={other}"),
        "--name",
        "fourth",
    ]);
    let list = |args: &[&str]| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(&node.ok(args)).unwrap();
        let mut names: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["name"].as_str().unwrap().to_string())
            .collect();
        names.sort();
        names
    };
    let all = ["first", "fourth", "second", "third"];
    assert_eq!(list(&["--db", other, "app", "list", "--json"]), all);
    assert_eq!(list(&["app", "list", "--db", other, "--json"]), all);
    assert_eq!(list(&["app", "list", "--json", "--db", other]), all);
    // Nothing went to the database FAZT_DB names.
    assert!(!node.db().exists());
}

#[test]
fn two_versions_deployed_apart_share_a_number_and_the_cli_asks_for_the_id() {
    let a = Node::new();
    let b = Node::new();
    let on = |node: &Node, body: &str| {
        node.deploy(
            &node.site(&format!("blog-{body}"), &[("index.html", body)]),
            &["--name", "blog"],
        )
    };
    let from_a = on(&a, "from a");
    let from_b = on(&b, "from b");
    assert_eq!(
        (from_a["number"].as_i64(), from_b["number"].as_i64()),
        (Some(1), Some(1))
    );
    // Merge b into a through a bundle (the same engine as a session).
    b.ok(&["peer", "trust", &node_id(&a), "--name", "a"]);
    a.ok(&["peer", "trust", &node_id(&b), "--name", "b"]);
    let bundle = b.path("b.fzb");
    b.ok(&["sync", "export", "-o", bundle.to_str().unwrap()]);
    a.ok(&["sync", "import", bundle.to_str().unwrap()]);

    let versions = a.json(&["app", "versions", "blog", "--json"]);
    let versions = versions.as_array().unwrap();
    assert_eq!(versions.len(), 2, "{versions:?}");
    assert!(versions.iter().all(|v| v["number"] == 1), "{versions:?}");
    let before = a.state();
    for wanted in ["1", "v1"] {
        let err = a.fails(&["app", "rollback", "blog", "--to", wanted]);
        assert!(
            err.contains("several versions of blog are numbered 1") && err.contains("version id"),
            "{err}"
        );
    }
    assert_same_state(&before, &a.state());
    // The id picks one.
    let id = from_b["version"].as_str().unwrap();
    a.ok(&["app", "rollback", "blog", "--to", id]);
    let server = a.start(&[]);
    eventually("a serves b's version", || {
        (server.text("blog.localhost", "/") == "from b").then_some(())
    });
}
