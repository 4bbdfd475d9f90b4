//! The database is the instance: creation, configuration, status, lifecycle.

use crate::harness::Node;

#[test]
fn first_start_creates_the_database_and_identity_and_serves_the_root_page() {
    let node = Node::new();
    let mut server = node.start(&[]);
    assert!(node.db().exists());
    assert!(
        server.banner.starts_with("fazt serving http://localhost:"),
        "{}",
        server.banner
    );

    let home = server.get("localhost", "/");
    assert_eq!(home.status(), 200);
    assert!(home.text().unwrap().contains("fazt is running"));
    let missing = server.get("nothing-here.localhost", "/");
    assert_eq!(missing.status(), 404);
    assert!(missing.text().unwrap().contains("404"));
    assert_eq!(server.get("localhost", "/no/such/page").status(), 404);

    let status = node.json(&["server", "status", "--json"]);
    assert_eq!(status["node_id"].as_str().unwrap().len(), 52);
    assert_eq!(status["running"]["pid"], server.pid());
    assert_eq!(status["running"]["port"], server.port);

    let stopped = server.stop_with("-INT");
    assert!(stopped.status.success(), "{}", stopped.stderr);
    assert!(
        stopped.stderr.contains("created database"),
        "{}",
        stopped.stderr
    );
    assert!(
        stopped.stderr.contains("fazt stopped"),
        "{}",
        stopped.stderr
    );
    assert!(node.json(&["server", "status", "--json"])["running"].is_null());
}

#[test]
fn the_node_id_survives_restarts() {
    let node = Node::new();
    node.ok(&["server", "init"]);
    let first = node.json(&["server", "status", "--json"])["node_id"].clone();
    let mut server = node.start(&[]);
    server.stop_with("-TERM");
    assert_eq!(node.json(&["server", "status", "--json"])["node_id"], first);
}

#[test]
fn init_creates_a_database_once_and_refuses_to_overwrite_it() {
    let node = Node::new();
    let out = node.ok(&[
        "server",
        "init",
        "--domain",
        "example.test",
        "--port",
        "8123",
    ]);
    assert!(out.contains("created database"));
    let status = node.json(&["server", "status", "--json"]);
    assert_eq!(status["domain"]["value"], "example.test");
    assert_eq!(status["domain"]["source"], "database");
    assert_eq!(status["port"]["value"], 8123);
    let before = std::fs::read(node.db()).unwrap();
    let err = node.fails(&["server", "init"]);
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(std::fs::read(node.db()).unwrap(), before);
}

#[test]
fn config_persists_and_start_flags_override_for_one_run_only() {
    let node = Node::new();
    node.ok(&[
        "server",
        "set-config",
        "--domain",
        "example.test",
        "--port",
        "8124",
    ]);
    let status = node.json(&["server", "status", "--json"]);
    assert_eq!(status["port"]["value"], 8124);
    assert_eq!(status["port"]["source"], "database");
    assert_eq!(status["domain"]["source"], "database");

    let site = node.site("blog", &[("index.html", "blog home")]);
    node.deploy(&site, &[]);
    let server = node.start(&["--domain", "flag.test"]);
    assert!(
        server.banner.contains("domain flag.test"),
        "{}",
        server.banner
    );
    assert_eq!(server.text("blog.flag.test", "/"), "blog home");
    assert_eq!(server.get("blog.example.test", "/").status(), 404);
    let status = node.json(&["server", "status", "--json"]);
    assert_eq!(
        status["domain"]["value"], "example.test",
        "flags are never persisted"
    );
    assert_eq!(status["running"]["domain"], "flag.test");
    drop(server);

    let plain = node.ok(&["server", "status"]);
    assert!(plain.contains("example.test (database)"), "{plain}");
    assert!(plain.contains("8124 (database)"), "{plain}");
}

#[test]
fn status_shows_defaults_and_their_source() {
    let node = Node::new();
    node.ok(&["server", "init"]);
    let status = node.json(&["server", "status", "--json"]);
    assert_eq!(status["domain"]["value"], "localhost");
    assert_eq!(status["domain"]["source"], "default");
    assert_eq!(status["port"]["value"], 4698);
    assert_eq!(status["port"]["source"], "default");
    assert!(status["running"].is_null());
}

#[test]
fn read_commands_on_a_missing_database_say_so_and_create_nothing() {
    let node = Node::new();
    for args in [
        &["server", "status"][..],
        &["app", "list"],
        &["alias", "list"],
        &["app", "info", "x"],
    ] {
        let err = node.fails(args);
        assert!(err.contains("no database"), "{args:?}: {err}");
    }
    assert!(!node.db().exists());
}

#[test]
fn write_commands_create_a_missing_database_and_say_so() {
    let node = Node::new();
    let r = node.run(&["server", "set-config", "--port", "8125"]);
    assert!(r.status.success());
    assert!(r.stderr.contains("created database"), "{}", r.stderr);
    assert!(node.db().exists());

    let other = Node::new();
    let site = other.site("site", &[("index.html", "x")]);
    let r = other.run(&["app", "deploy", site.to_str().unwrap()]);
    assert!(r.status.success(), "{}", r.stderr);
    assert!(r.stderr.contains("created database"), "{}", r.stderr);
}

#[test]
fn the_db_flag_takes_precedence_over_the_environment() {
    let node = Node::new();
    let elsewhere = node.path("elsewhere.db");
    node.ok(&["--db", elsewhere.to_str().unwrap(), "server", "init"]);
    assert!(elsewhere.exists());
    assert!(!node.db().exists());
}

#[test]
fn a_corrupt_or_foreign_database_is_refused_and_left_unchanged() {
    let node = Node::new();
    let junk: Vec<u8> = (0..64 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(node.db(), &junk).unwrap();
    for args in [
        &["server", "status"][..],
        &["app", "list"],
        &["server", "set-config", "--port", "9000"],
    ] {
        let err = node.fails(args);
        assert!(err.contains("not a fazt database"), "{err}");
    }
    let r = node.run(&["server", "start", "--port", "0"]);
    assert!(!r.status.success());
    assert!(r.stderr.contains("not a fazt database"), "{}", r.stderr);
    assert_eq!(std::fs::read(node.db()).unwrap(), junk);

    let foreign = Node::new();
    write_foreign_sqlite_file(&foreign.db());
    let before = std::fs::read(foreign.db()).unwrap();
    let err = foreign.fails(&["app", "list"]);
    assert!(err.contains("not a fazt database"), "{err}");
    assert_eq!(std::fs::read(foreign.db()).unwrap(), before);
}

/// A valid SQLite file that belongs to some other program.
fn write_foreign_sqlite_file(path: &std::path::Path) {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
        .unwrap();
}

#[test]
fn a_port_in_use_is_a_clear_error() {
    let node = Node::new();
    let server = node.start(&[]);
    let port = server.port.to_string();
    let r = node.run(&["server", "start", "--port", &port]);
    assert!(!r.status.success());
    assert!(r.stderr.contains("already in use"), "{}", r.stderr);
    // The first server is unaffected.
    assert_eq!(server.get("localhost", "/").status(), 200);
}

#[test]
fn content_persists_across_restart_and_kill_9() {
    let node = Node::new();
    let site = node.site("keep", &[("index.html", "kept")]);
    let mut server = node.start(&[]);
    node.deploy(&site, &[]);
    assert_eq!(server.text("keep.localhost", "/"), "kept");
    server.stop_with("-KILL");
    // kill -9 leaves a stale runtime row; status must not believe it.
    assert!(node.json(&["server", "status", "--json"])["running"].is_null());
    let server = node.start(&[]);
    assert_eq!(server.text("keep.localhost", "/"), "kept");
}

#[test]
fn a_user_table_named_like_an_engine_table_cannot_be_registered() {
    let node = Node::new();
    node.ok(&[
        "sql",
        "CREATE TABLE notes (id TEXT PRIMARY KEY NOT NULL, body TEXT);
         CREATE TABLE notes__fazt_clock (id TEXT PRIMARY KEY NOT NULL, mine TEXT);
         CREATE TABLE fazt_sync_mine (id TEXT PRIMARY KEY NOT NULL, v TEXT)",
    ]);
    let before = node.state();
    for (table, reason) in [
        (
            "fazt_sync_pending",
            "error: fazt_sync_pending belongs to this node or to the engine and never replicates",
        ),
        (
            "fazt_sync_mine",
            "error: fazt_sync_mine belongs to this node or to the engine and never replicates",
        ),
        (
            "apps__fazt_clock",
            "error: apps__fazt_clock belongs to this node or to the engine and never replicates",
        ),
        (
            "notes__fazt_clock",
            "error: notes__fazt_clock belongs to this node or to the engine and never replicates",
        ),
        (
            "notes",
            "error: table notes: notes__fazt_clock already exists, but the engine keeps notes's replication bookkeeping under that name: rename notes__fazt_clock or notes",
        ),
    ] {
        assert_eq!(node.fails(&["db", "replicate", table]), reason);
    }
    crate::harness::assert_same_state(&before, &node.state());
}
