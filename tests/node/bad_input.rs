//! Bad input gets a one-line error, a non-zero exit, and changes nothing.

use crate::harness::{write, Node};

/// The database's bytes, to check that a refused command wrote nothing.
fn snapshot(node: &Node) -> serde_json::Value {
    node.json(&["app", "list", "--json"])
}

fn node_with_one_app() -> (Node, serde_json::Value) {
    let node = Node::new();
    node.deploy(&node.site("existing", &[("index.html", "x")]), &[]);
    let before = snapshot(&node);
    (node, before)
}

#[test]
fn a_missing_directory_is_refused() {
    let (node, before) = node_with_one_app();
    let err = node.fails(&["app", "deploy", node.path("nope").to_str().unwrap()]);
    assert!(err.contains("does not exist"), "{err}");
    assert_eq!(snapshot(&node), before);
}

#[test]
fn a_missing_directory_does_not_create_a_database() {
    let node = Node::new();
    node.fails(&["app", "deploy", node.path("nope").to_str().unwrap()]);
    assert!(!node.db().exists());
}

#[test]
fn an_empty_directory_is_refused() {
    let (node, before) = node_with_one_app();
    let empty = node.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    write(&empty.join(".only-hidden"), b"x");
    let err = node.fails(&["app", "deploy", empty.to_str().unwrap()]);
    assert!(err.contains("no files"), "{err}");
    assert_eq!(snapshot(&node), before);
}

#[test]
fn invalid_and_reserved_names_are_refused() {
    let (node, before) = node_with_one_app();
    let site = node.site("ok", &[("index.html", "x")]);
    for name in [
        "Bad_Name",
        "-dash",
        "dash-",
        "has.dot",
        "admin",
        "api",
        &"x".repeat(64),
    ] {
        let err = node.fails(&[
            "app",
            "deploy",
            site.to_str().unwrap(),
            &format!("--name={name}"),
        ]);
        assert!(
            err.contains("invalid app name") || err.contains("reserved"),
            "{name}: {err}"
        );
    }
    let badly_named = node.site("Not_Valid", &[("index.html", "x")]);
    let err = node.fails(&["app", "deploy", badly_named.to_str().unwrap()]);
    assert!(err.contains("--name"), "{err}");
    write(&site.join("manifest.json"), br#"{"name": "UPPER"}"#);
    assert!(node
        .fails(&["app", "deploy", site.to_str().unwrap()])
        .contains("manifest.json"));
    write(&site.join("manifest.json"), b"{broken");
    assert!(node
        .fails(&["app", "deploy", site.to_str().unwrap()])
        .contains("manifest.json"));
    assert_eq!(snapshot(&node), before);
}

#[test]
fn a_file_over_the_size_limit_is_refused() {
    let (node, _) = node_with_one_app();
    node.ok(&["server", "set-config", "--max-file-size", "1K"]);
    let before = snapshot(&node);
    let site = node.site("big", &[("index.html", "small")]);
    write(&site.join("huge.bin"), &vec![7u8; 2048]);
    let err = node.fails(&["app", "deploy", site.to_str().unwrap()]);
    assert!(err.contains("huge.bin") && err.contains("limit"), "{err}");
    assert_eq!(snapshot(&node), before);
    assert!(node
        .fails(&["server", "set-config", "--max-file-size", "lots"])
        .contains("size"));
}

#[test]
fn symlinks_that_escape_the_directory_are_refused() {
    let (node, before) = node_with_one_app();
    write(&node.path("outside/secret.txt"), b"secret");
    let site = node.site("linky", &[("index.html", "x")]);
    std::os::unix::fs::symlink(node.path("outside/secret.txt"), site.join("leak.txt")).unwrap();
    let err = node.fails(&["app", "deploy", site.to_str().unwrap()]);
    assert!(err.contains("leak.txt") && err.contains("outside"), "{err}");

    std::fs::remove_file(site.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(node.path("outside"), site.join("dirlink")).unwrap();
    let err = node.fails(&["app", "deploy", site.to_str().unwrap()]);
    assert!(err.contains("outside"), "{err}");
    assert_eq!(snapshot(&node), before);
}

#[test]
fn a_file_instead_of_a_directory_is_refused() {
    let (node, before) = node_with_one_app();
    write(&node.path("file.html"), b"x");
    let err = node.fails(&["app", "deploy", node.path("file.html").to_str().unwrap()]);
    assert!(err.contains("not a directory"), "{err}");
    assert_eq!(snapshot(&node), before);
}

#[test]
fn bad_configuration_values_are_refused() {
    let node = Node::new();
    node.ok(&["server", "init"]);
    assert!(node
        .fails(&["server", "set-config", "--domain", "https://example.com"])
        .contains("domain"));
    assert!(node
        .fails(&["server", "set-config", "--domain", "bad_domain"])
        .contains("domain"));
    assert!(node
        .fails(&["server", "set-config", "--port", "0"])
        .contains("port"));
    assert!(node
        .fails(&["server", "set-config"])
        .contains("nothing to set"));
    let status = node.json(&["server", "status", "--json"]);
    assert_eq!(status["domain"]["source"], "default");
    assert_eq!(status["port"]["source"], "default");
}
