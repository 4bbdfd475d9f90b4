//! Immutable versions, rollback and removal.

use crate::harness::{assert_same_state, write, Node};

#[test]
fn each_deploy_is_a_version_and_rollback_switches_between_them() {
    let node = Node::new();
    let dir = node.site("app", &[("index.html", "first")]);
    let v1 = node.deploy(&dir, &[]);
    write(&dir.join("index.html"), b"second");
    let v2 = node.deploy(&dir, &[]);
    write(&dir.join("index.html"), b"third");
    node.deploy(&dir, &[]);
    assert_eq!(v1["number"], 1);
    assert_eq!(v2["number"], 2);

    let versions = node.json(&["app", "versions", "app", "--json"]);
    let versions = versions.as_array().unwrap();
    assert_eq!(versions.len(), 3);
    assert_eq!(versions[0]["number"], 3, "newest first");
    assert_eq!(versions[0]["current"], true);
    let table = node.ok(&["app", "versions", "app"]);
    assert!(table.lines().nth(1).unwrap().starts_with('*'), "{table}");

    let server = node.start(&[]);
    assert_eq!(server.text("app.localhost", "/"), "third");

    let back = node.json(&["app", "rollback", "app", "--json"]);
    assert_eq!(back["number"], 2);
    assert_eq!(server.text("app.localhost", "/"), "second");

    let out = node.ok(&["app", "rollback", "app", "--to", "1"]);
    assert!(out.contains("now serves v1"), "{out}");
    assert_eq!(server.text("app.localhost", "/"), "first");

    let id = v2["version"].as_str().unwrap();
    node.ok(&["app", "rollback", "app", "--to", &id[..8]]);
    assert_eq!(server.text("app.localhost", "/"), "second");
    node.ok(&["app", "rollback", "app", "--to", "v3"]);
    assert_eq!(server.text("app.localhost", "/"), "third");

    let info = node.json(&["app", "info", "app", "--json"]);
    assert_eq!(info["current_version"]["number"], 3);
    assert_eq!(info["versions"], 3);
}

#[test]
fn rollback_to_an_unknown_version_or_app_changes_nothing() {
    let node = Node::new();
    let dir = node.site("app", &[("index.html", "only")]);
    node.deploy(&dir, &[]);
    let before = node.state();
    let err = node.fails(&["app", "rollback", "app"]);
    assert!(
        err.contains("app app has no version older than the current one"),
        "{err}"
    );
    let err = node.fails(&["app", "rollback", "app", "--to", "9"]);
    assert!(
        err.contains("app app has no version \"9\" (pruned or never deployed"),
        "{err}"
    );
    let err = node.fails(&["app", "rollback", "ghost"]);
    assert!(err.contains("no app named"), "{err}");
    assert_same_state(&before, &node.state());
}

#[test]
fn spa_mode_belongs_to_the_version_and_comes_back_with_rollback() {
    let node = Node::new();
    let dir = node.site("s", &[("index.html", "shell")]);
    node.deploy(&dir, &["--spa"]);
    node.deploy(&dir, &[]);
    let server = node.start(&[]);
    assert_eq!(server.get("s.localhost", "/route").status(), 404);
    node.ok(&["app", "rollback", "s"]);
    assert_eq!(server.text("s.localhost", "/route"), "shell");
}

#[test]
fn remove_takes_the_app_its_versions_and_aliases_away() {
    let node = Node::new();
    let dir = node.site("gone", &[("index.html", "bye")]);
    node.deploy(&dir, &[]);
    node.deploy(&dir, &[]);
    node.deploy(&node.site("stays", &[("index.html", "hi")]), &[]);
    let server = node.start(&[]);
    assert_eq!(server.text("gone.localhost", "/"), "bye");
    let removed = node.json(&["app", "remove", "gone", "--json"]);
    assert_eq!(removed["versions"], 2);
    assert_eq!(removed["aliases"][0], "gone");
    assert_eq!(server.get("gone.localhost", "/").status(), 404);
    assert_eq!(server.text("stays.localhost", "/"), "hi");
    let apps = node.json(&["app", "list", "--json"]);
    assert_eq!(apps.as_array().unwrap().len(), 1);
    let before = node.state();
    assert!(node
        .fails(&["app", "remove", "gone"])
        .contains("no app named"));
    assert!(node
        .fails(&["app", "info", "gone"])
        .contains("no app named"));
    assert!(node
        .fails(&["app", "versions", "gone"])
        .contains("no app named"));
    assert_same_state(&before, &node.state());
}

#[test]
fn app_list_shows_every_app_with_its_current_version() {
    let node = Node::new();
    assert!(node.ok(&["server", "init"]).contains("created"));
    assert!(node.ok(&["app", "list"]).contains("no apps yet"));
    node.deploy(&node.site("alpha", &[("index.html", "a")]), &[]);
    let beta = node.site("beta", &[("index.html", "b")]);
    node.deploy(&beta, &[]);
    node.deploy(&beta, &[]);
    let table = node.ok(&["app", "list"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("alpha") && l.contains("v1")),
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("beta") && l.contains("v2")),
        "{table}"
    );
    let apps = node.json(&["app", "list", "--json"]);
    assert_eq!(apps[1]["name"], "beta");
    assert_eq!(apps[1]["current_version"]["number"], 2);
    assert!(apps[1]["id"].as_str().unwrap().starts_with("app_"));
}
