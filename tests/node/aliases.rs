//! Aliases: subdomains point at apps by id, so moving one changes what it serves.

use crate::harness::{assert_same_state, Node};

fn two_apps(node: &Node) {
    node.deploy(&node.site("a", &[("index.html", "app a")]), &[]);
    node.deploy(&node.site("b", &[("index.html", "app b")]), &[]);
}

#[test]
fn link_points_a_new_subdomain_at_an_app() {
    let node = Node::new();
    two_apps(&node);
    let server = node.start(&[]);
    let out = node.ok(&["alias", "link", "www", "a"]);
    assert!(out.contains("www points at a"), "{out}");
    assert_eq!(server.text("www.localhost", "/"), "app a");
    let out = node.ok(&["alias", "link", "www", "b"]);
    assert!(out.contains("was a"), "{out}");
    assert_eq!(server.text("www.localhost", "/"), "app b");
    assert_eq!(server.text("a.localhost", "/"), "app a");
}

#[test]
fn swap_exchanges_what_two_subdomains_serve() {
    let node = Node::new();
    two_apps(&node);
    let server = node.start(&[]);
    node.ok(&["alias", "swap", "a", "b"]);
    assert_eq!(server.text("a.localhost", "/"), "app b");
    assert_eq!(server.text("b.localhost", "/"), "app a");
    // Deploying app a updates whatever subdomain points at it now.
    node.deploy(
        &node.site("a2", &[("index.html", "app a, v2")]),
        &["--name", "a"],
    );
    assert_eq!(server.text("b.localhost", "/"), "app a, v2");
}

#[test]
fn unlink_stops_serving_a_subdomain() {
    let node = Node::new();
    two_apps(&node);
    let server = node.start(&[]);
    node.ok(&["alias", "unlink", "a"]);
    assert_eq!(server.get("a.localhost", "/").status(), 404);
    assert!(node.fails(&["alias", "unlink", "a"]).contains("no alias"));
    // The app is still there and can be linked again.
    node.ok(&["alias", "link", "again", "a"]);
    assert_eq!(server.text("again.localhost", "/"), "app a");
}

#[test]
fn alias_list_shows_subdomains_and_apps() {
    let node = Node::new();
    two_apps(&node);
    node.ok(&["alias", "link", "www", "b"]);
    let list = node.json(&["alias", "list", "--json"]);
    let pairs: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["subdomain"].as_str().unwrap().into(),
                a["app"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        pairs,
        [
            ("a".into(), "a".into()),
            ("b".into(), "b".into()),
            ("www".into(), "b".into())
        ]
    );
    let table = node.ok(&["alias", "list"]);
    assert!(
        table.contains("www") && table.starts_with("SUBDOMAIN"),
        "{table}"
    );
}

#[test]
fn bad_alias_commands_are_refused() {
    let node = Node::new();
    two_apps(&node);
    let before = node.state();
    assert!(node
        .fails(&["alias", "link", "admin", "a"])
        .contains("\"admin\" is reserved by fazt"));
    assert!(node
        .fails(&["alias", "link", "Bad_Sub", "a"])
        .contains("invalid subdomain"));
    assert!(node
        .fails(&["alias", "link", "x", "ghost"])
        .contains("no app named"));
    assert!(node
        .fails(&["alias", "swap", "a", "ghost"])
        .contains("no alias"));
    assert!(node
        .fails(&["alias", "swap", "a", "a"])
        .contains("cannot swap a with itself"));
    let usage = node.fails_usage(&["alias", "link", "x"]);
    assert!(
        usage.contains("required arguments were not provided"),
        "{usage}"
    );
    assert_same_state(&before, &node.state());
}
