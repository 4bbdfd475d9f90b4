//! Bad input gets a one-line error, a non-zero exit, and changes nothing.

use crate::harness::{assert_same_state, write, Node};

/// Everything the database holds, to check that a refused command wrote nothing.
fn snapshot(node: &Node) -> String {
    node.state()
}

fn node_with_one_app() -> (Node, String) {
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
    assert_same_state(&before, &snapshot(&node));
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
    assert_same_state(&before, &snapshot(&node));
}

#[test]
fn invalid_and_reserved_names_are_refused() {
    let (node, before) = node_with_one_app();
    let site = node.site("ok", &[("index.html", "x")]);
    let long = "x".repeat(64);
    for (name, reason) in [
        ("Bad_Name", "invalid app name"),
        ("-dash", "invalid app name"),
        ("dash-", "invalid app name"),
        ("has.dot", "invalid app name"),
        ("admin", "is reserved by fazt"),
        ("api", "is reserved by fazt"),
        (long.as_str(), "invalid app name"),
    ] {
        let err = node.fails(&[
            "app",
            "deploy",
            site.to_str().unwrap(),
            &format!("--name={name}"),
        ]);
        assert!(err.contains(reason), "{name}: {err}");
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
    assert_same_state(&before, &snapshot(&node));
}

#[test]
fn a_file_over_the_size_limit_is_refused() {
    let (node, _) = node_with_one_app();
    node.ok(&["server", "set-config", "--max-file-size", "1K"]);
    let before = snapshot(&node);
    let site = node.site("big", &[("index.html", "small")]);
    write(&site.join("huge.bin"), &vec![7u8; 2048]);
    let err = node.fails(&["app", "deploy", site.to_str().unwrap()]);
    assert!(
        err.contains("huge.bin is 2048 bytes, over the 1024-byte file limit"),
        "{err}"
    );
    assert_same_state(&before, &snapshot(&node));
    assert!(node
        .fails(&["server", "set-config", "--max-file-size", "lots"])
        .contains("size \"lots\" must look like 512, 10K, 64M or 1G"));
}

#[test]
fn symlinks_that_escape_the_directory_are_refused() {
    let (node, before) = node_with_one_app();
    write(&node.path("outside/secret.txt"), b"secret");
    let site = node.site("linky", &[("index.html", "x")]);
    std::os::unix::fs::symlink(node.path("outside/secret.txt"), site.join("leak.txt")).unwrap();
    let err = node.fails(&["app", "deploy", site.to_str().unwrap()]);
    assert!(
        err.contains("leak.txt resolves to") && err.contains(", outside "),
        "{err}"
    );

    std::fs::remove_file(site.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(node.path("outside"), site.join("dirlink")).unwrap();
    let err = node.fails(&["app", "deploy", site.to_str().unwrap()]);
    assert!(
        err.contains("dirlink/secret.txt resolves to") && err.contains(", outside "),
        "{err}"
    );
    assert_same_state(&before, &snapshot(&node));
}

#[test]
fn a_file_instead_of_a_directory_is_refused() {
    let (node, before) = node_with_one_app();
    write(&node.path("file.html"), b"x");
    let err = node.fails(&["app", "deploy", node.path("file.html").to_str().unwrap()]);
    assert!(err.contains("not a directory"), "{err}");
    assert_same_state(&before, &snapshot(&node));
}

#[test]
fn bad_configuration_values_are_refused() {
    let node = Node::new();
    node.ok(&["server", "init"]);
    assert!(node
        .fails(&["server", "set-config", "--domain", "https://example.com"])
        .contains("must be a bare host name"));
    assert!(node
        .fails(&["server", "set-config", "--domain", "bad_domain"])
        .contains("is not a valid host name"));
    assert!(node
        .fails(&["server", "set-config", "--port", "0"])
        .contains("port 0 cannot be stored"));
    assert!(node
        .fails(&["server", "set-config"])
        .contains("nothing to set"));
    let status = node.json(&["server", "status", "--json"]);
    assert_eq!(status["domain"]["source"], "default");
    assert_eq!(status["port"]["source"], "default");
}

#[test]
fn a_manifest_naming_another_existing_app_is_refused_without_name() {
    let (node, before) = node_with_one_app();
    let pages_before = node.json(&["app", "info", "existing", "--json"]);
    let dir = node.site("other", &[("index.html", "not existing's page")]);
    write(&dir.join("manifest.json"), br#"{"name": "existing"}"#);
    let err = node.fails(&["app", "deploy", dir.to_str().unwrap()]);
    assert!(
        err.contains("manifest.json names the app existing, which already exists, but the directory is other"),
        "{err}"
    );
    assert!(
        err.contains("would replace existing's current version"),
        "{err}"
    );
    assert!(err.contains("--name existing"), "{err}");
    assert_same_state(&before, &snapshot(&node));
    assert_eq!(
        node.json(&["app", "info", "existing", "--json"]),
        pages_before
    );

    // Saying so deploys it; a directory named like the app needs nothing more.
    assert_eq!(node.deploy(&dir, &["--name", "existing"])["number"], 2);
    let same = node.site("existing", &[("index.html", "y")]);
    write(&same.join("manifest.json"), br#"{"name": "existing"}"#);
    assert_eq!(node.deploy(&same, &[])["number"], 3);
}

#[test]
fn a_first_deploy_of_root_or_404_needs_the_name_spelled_out() {
    let (node, before) = node_with_one_app();
    for (dir, manifest, captures) in [
        ("root", None, "serves the apex domain"),
        ("404", None, "answers every unknown host"),
        ("site", Some("root"), "serves the apex domain"),
    ] {
        let site = node.site(dir, &[("index.html", "takeover")]);
        if let Some(name) = manifest {
            write(
                &site.join("manifest.json"),
                format!(r#"{{"name": "{name}"}}"#).as_bytes(),
            );
        }
        let err = node.fails(&["app", "deploy", site.to_str().unwrap()]);
        assert!(err.contains(captures), "{err}");
        let name = manifest.unwrap_or(dir);
        assert!(err.contains(&format!("say so with --name {name}")), "{err}");
        assert_same_state(&before, &snapshot(&node));
    }

    let site = node.path("root");
    let run = node.run(&["app", "deploy", site.to_str().unwrap(), "--name", "root"]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("an app named root serves the apex domain")
            && run.stderr.contains("that starts now"),
        "{}",
        run.stderr
    );
    // Redeploys (say, from a script) need nothing more and say nothing more.
    let again = node.run(&["app", "deploy", site.to_str().unwrap()]);
    assert!(again.status.success(), "{}", again.stderr);
    assert_eq!(again.stderr, "");
}
