//! What the node writes to disk is owner-only: the database (the node's secret key, apps'
//! environment values), its -wal/-shm files, its directory, exported bundles.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::Path;
use std::process::Command;

use crate::harness::{Node, Server};

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Runs with umask 000: fazt must not rely on the user's umask for its secrets.
fn loose_umask(cmd: &mut Command) -> &mut Command {
    // SAFETY: umask is async-signal-safe; the closure runs in the child before exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    }
}

#[test]
fn a_new_database_its_directory_and_its_wal_files_are_owner_only_whatever_the_umask() {
    let node = Node::new();
    let db = node.path("fresh/nested/data.db");
    let mut cmd = node.command();
    cmd.env("FAZT_DB", &db)
        .args(["server", "start", "--port", "0", "--sync-port", "0"]);
    let _server = Server::spawn(loose_umask(&mut cmd));
    assert_eq!(mode(&node.path("fresh")), 0o700);
    assert_eq!(mode(&node.path("fresh/nested")), 0o700);
    for file in ["data.db", "data.db-wal", "data.db-shm"] {
        assert_eq!(
            mode(&node.path(&format!("fresh/nested/{file}"))),
            0o600,
            "{file}"
        );
    }
}

#[test]
fn an_existing_readable_database_is_made_owner_only_at_start_and_says_so() {
    let node = Node::new();
    node.ok(&["server", "init"]);
    std::fs::set_permissions(node.db(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = std::fs::read(node.db()).unwrap();

    let run = node.run(&["app", "list"]);
    assert!(run.status.success(), "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{}", run.stderr);
    assert!(lines[0].starts_with("made owner-only"), "{}", lines[0]);
    assert!(
        lines[0].contains(&format!("{} (was 0644, now 0600)", node.db().display())),
        "{}",
        lines[0]
    );
    assert_eq!(mode(&node.db()), 0o600);
    assert_eq!(
        std::fs::read(node.db()).unwrap(),
        before,
        "only the mode changed"
    );

    // Once tight, nothing more is said.
    let again = node.run(&["app", "list"]);
    assert!(again.status.success());
    assert_eq!(again.stderr, "");
}

#[test]
fn an_exported_bundle_is_owner_only_and_a_planted_temporary_file_is_not_written_through() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "hi")]), &[]);
    let victim = node.path("victim.txt");
    std::fs::write(&victim, "keep me").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).unwrap();
    // Where the export writes before renaming: a symlink planted there must not be followed.
    std::os::unix::fs::symlink(&victim, node.path("out.partial")).unwrap();
    // An older, world-readable bundle at the destination is replaced.
    std::fs::write(node.path("out.bundle"), "old").unwrap();
    std::fs::set_permissions(
        node.path("out.bundle"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let mut cmd = node.command();
    cmd.args([
        "sync",
        "export",
        "-o",
        node.path("out.bundle").to_str().unwrap(),
    ]);
    let out = loose_umask(&mut cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(mode(&node.path("out.bundle")), 0o600);
    assert!(std::fs::read(node.path("out.bundle")).unwrap().len() > 3);
    assert!(!node.path("out.partial").exists());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep me");
    assert_eq!(mode(&victim), 0o644);

    let other = Node::new();
    crate::bundles::trust(&other, &node, "node");
    other.ok(&["sync", "import", node.path("out.bundle").to_str().unwrap()]);
}

#[test]
fn a_bundle_carries_apps_environment_values_but_never_the_node_key() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "hi")]), &[]);
    node.ok(&["app", "env", "set", "blog", "TOKEN", "s3cr3t-env-value"]);
    let out = node.path("out.bundle");
    node.ok(&["sync", "export", "-o", out.to_str().unwrap()]);
    let bundle = std::fs::read(&out).unwrap();
    let secret: Vec<u8> = rusqlite::Connection::open(node.db())
        .unwrap()
        .query_row("SELECT secret_key FROM node_identity", [], |r| r.get(0))
        .unwrap();
    assert_eq!(secret.len(), 32);
    let holds = |needle: &[u8]| bundle.windows(needle.len()).any(|w| w == needle);
    assert!(!holds(&secret), "the node's secret key is in the bundle");
    assert!(!holds(hex::encode(&secret).as_bytes()));
    assert!(
        holds(b"s3cr3t-env-value"),
        "env values replicate, so bundles carry them"
    );
}
