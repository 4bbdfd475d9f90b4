//! Sessions end to end: two real databases over an in-memory pipe, or one session against a
//! peer played by hand.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::bail;
use fazt_proto::wire::{self, Changes, Content, Heads, Hello, Message, NetChange};
use fazt_proto::Digest;
use fazt_proto::NodeId;
use fazt_sync::{CausalLength, Change, ColVersion, Coverage, DbVersion, Seq, SiteId, Value};
use tokio::sync::watch;

use super::export::{to_net, Offers};
use super::*;
use crate::peer::error::{Closed, Stage, Theirs, Violation};
use crate::peer::frame::{read_message, write_message};

/// Connections as a node's own would be opened.
pub(super) fn connect(path: &std::path::Path) -> Connect {
    let path = path.to_path_buf();
    Connect::new(move || crate::db::open_existing(&path))
}

/// Ticks whenever anyone moves the replicated state of the database at `path`.
fn watch_db(path: &std::path::Path) -> anyhow::Result<watch::Receiver<u64>> {
    let db = crate::db::Database::open(path)?;
    let changed = db.replicated();
    // The watcher lives as long as a handle does: keep one for the test's lifetime.
    std::mem::forget(db);
    Ok(changed)
}

/// What the database at `path` holds, followed as a node follows its own (read again at each
/// move of its replicated state).
async fn holdings_of(path: &std::path::Path) -> Holdings {
    Holdings::follow(connect(path), watch_db(path).unwrap())
        .await
        .unwrap()
}

/// What the database at `path` holds now, never read again (for sessions that write
/// nothing on their own side, or a peer played by hand).
async fn holdings_now(path: &std::path::Path) -> Holdings {
    Holdings::follow(connect(path), watch::channel(0u64).1)
        .await
        .unwrap()
}

/// A session on `me`'s database with `other`, as a node runs one (its own connections, the
/// node's hooks, default limits).
fn session_with(
    me: &(PathBuf, NodeId),
    other: &(PathBuf, NodeId),
    peer_name: &str,
    mode: Mode,
    holdings: Holdings,
) -> Session {
    Session {
        connect: connect(&me.0),
        own: me.1,
        peer: other.1,
        peer_name: peer_name.into(),
        mode,
        node: crate::peer::session_node(),
        limits: Limits::default(),
        holdings,
        progress: None,
    }
}

pub(super) fn node(dir: &std::path::Path, name: &str) -> (PathBuf, NodeId) {
    let path = dir.join(name);
    let db = crate::db::create(&path).unwrap();
    let key = crate::identity::load(db.conn()).unwrap().unwrap();
    (path, crate::identity::node_id(&key))
}

pub(super) fn put_blob(path: &std::path::Path, bytes: &[u8]) {
    let mut db = crate::db::open_existing(path).unwrap();
    let hash = Digest::of(bytes).to_string();
    db.write(|tx| {
        tx.execute(
            "INSERT INTO blobs (hash, size, data) VALUES (?1, ?2, ?3)",
            rusqlite::params![hash, bytes.len() as i64, bytes],
        )
    })
    .unwrap();
}

fn rows(path: &std::path::Path) -> Vec<(String, i64, Vec<u8>)> {
    let db = crate::db::open_existing(path).unwrap();
    let mut stmt = db
        .conn()
        .prepare("SELECT hash, size, data FROM blobs ORDER BY hash")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

/// Runs a one-off session from `a` (Once) against `b` (Live) over an in-memory pipe.
async fn sync(a: &(PathBuf, NodeId), b: &(PathBuf, NodeId)) -> (Stats, Stats) {
    for (me, other) in [(a, b), (b, a)] {
        let db = crate::db::open_existing(&me.0).unwrap();
        let name = crate::peer::store::PeerName::parse("peer").unwrap();
        crate::peer::store::add(db.conn(), &me.1, &name, &other.1, None).unwrap();
    }
    let (a_io, b_io) = tokio::io::duplex(64 * 1024);
    let (a_read, a_write) = tokio::io::split(a_io);
    let (b_read, b_write) = tokio::io::split(b_io);
    let changed_a = holdings_of(&a.0).await;
    let changed_b = holdings_of(&b.0).await;
    let session = |me: &(PathBuf, NodeId), other: &(PathBuf, NodeId), mode, holdings| {
        session_with(me, other, "peer", mode, holdings)
    };
    let live = tokio::spawn(session(b, a, Mode::Live, changed_b).run(b_read, b_write, None));
    let once = session(a, b, Mode::Once, changed_a).run(a_read, a_write, None);
    let a_stats = tokio::time::timeout(std::time::Duration::from_secs(20), once)
        .await
        .unwrap()
        .unwrap();
    let b_stats = tokio::time::timeout(std::time::Duration::from_secs(20), live)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (a_stats, b_stats)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_the_peer_already_holds_is_not_sent_again() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    let shared: Vec<u8> = (0..50_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let only_a: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 253) as u8).collect();
    // The same content written independently on both nodes, plus content only `a` has.
    put_blob(&a.0, &shared);
    put_blob(&b.0, &shared);
    put_blob(&a.0, &only_a);
    put_blob(&a.0, b"small values travel inline");
    // Large text travels as content too, and stays text.
    let text = "é".repeat(3000);
    crate::db::open_existing(&a.0)
        .unwrap()
        .write(|tx| {
            tx.execute(
                "INSERT INTO settings (key, value) VALUES ('big', ?1)",
                [&text],
            )
        })
        .unwrap();

    let (a_stats, b_stats) = sync(&a, &b).await;
    assert_eq!(rows(&a.0), rows(&b.0));
    let (kind, value): (String, String) = crate::db::open_existing(&b.0)
        .unwrap()
        .conn()
        .query_row(
            "SELECT typeof(value), value FROM settings WHERE key = 'big'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((kind.as_str(), value), ("text", text.clone()));
    assert_eq!(
        a_stats.sent_content,
        (only_a.len() + text.len()) as u64,
        "only the content b lacked travels"
    );
    assert_eq!(b_stats.sent_content, 0, "a already held everything b has");
    assert_eq!(
        crate::db::open_existing(&b.0).unwrap().coverage().unwrap(),
        crate::db::open_existing(&a.0).unwrap().coverage().unwrap()
    );
    // Nothing fetched is left behind once applied.
    let left: i64 = crate::db::open_existing(&b.0)
        .unwrap()
        .conn()
        .query_row("SELECT count(*) FROM peer_content", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);

    // A second sync has nothing to do and moves only the handshake.
    let (again, _) = sync(&a, &b).await;
    assert_eq!(
        (
            again.sent_changes,
            again.received_changes,
            again.sent_content
        ),
        (0, 0, 0)
    );
    assert!(
        again.sent_bytes < 1024,
        "idle handshake sent {} bytes",
        again.sent_bytes
    );
}

#[test]
fn heads_and_coverage_convert_both_ways_and_count_what_is_lacking() {
    let mut c = Coverage::default();
    let v = DbVersion;
    c.insert(SiteId([1; 16]), v(1), v(5));
    c.insert(SiteId([1; 16]), v(9), v(9));
    c.insert(SiteId([2; 16]), v(3), v(4));
    let h = Heads::from(&c);
    assert_eq!(
        h,
        Heads(vec![
            ([1; 16], vec![(1, 5), (9, 9)]),
            ([2; 16], vec![(3, 4)])
        ])
    );
    assert_eq!(Coverage::from(&h), c);
    // Overlapping and adjacent ranges from the wire merge into the coverage they mean.
    let messy = Heads(vec![([1; 16], vec![(1, 3), (2, 5), (6, 6), (9, 9)])]);
    assert_eq!(
        Coverage::from(&messy)
            .get(&SiteId([1; 16]))
            .unwrap()
            .ranges(),
        &[(v(1), v(6)), (v(9), v(9))]
    );
    assert_eq!(Coverage::from(&Heads::default()), Coverage::default());
    // The clock a peer declares is the highest version anywhere in its heads.
    assert_eq!(clock_of(&c), v(9));
    assert_eq!(clock_of(&Coverage::default()), v(0));
    // Lag: versions held here that the other side lacks, across origins.
    let mut theirs = Coverage::default();
    theirs.insert(SiteId([1; 16]), v(1), v(3));
    assert_eq!(versions_lacking(&c, &theirs), 2 + 1 + 2);
    assert_eq!(versions_lacking(&c, &c), 0);
    assert_eq!(versions_lacking(&theirs, &c), 0);
    let mut huge = Coverage::default();
    huge.insert(SiteId([3; 16]), v(1), v(wire::MAX_VERSION));
    assert_eq!(versions_lacking(&huge, &c), wire::MAX_VERSION as u64);
}

/// Changes a test adds to the scripted peer's group, with the version they complete.
type Forged = Option<(Vec<NetChange>, SiteId, DbVersion)>;

/// What a scripted peer does when the session under test asks for content.
type Answer = fn(Digest, &[u8]) -> Vec<Content>;

/// `a`'s real changes (everything it holds), as the wire carries them, with their content.
fn wire_changes(a: &std::path::Path) -> (Vec<NetChange>, Coverage, HashMap<Digest, Vec<u8>>) {
    let db = crate::db::open_existing(a).unwrap();
    let batch = db.batch_since(&Coverage::default()).unwrap();
    let offers = Offers::new(Limits::default().keep_offered_bytes);
    let mut offered = Vec::new();
    let nets = batch
        .changes
        .into_iter()
        .map(|c| to_net(c, &mut offered, &offers).0)
        .collect();
    let content = offered
        .into_iter()
        .map(|(d, o)| (d, o.bytes.unwrap().as_ref().clone()))
        .collect();
    (nets, db.coverage().unwrap(), content)
}

/// Plays `a` (trusted by `b`) by hand against a live session on `b`: Hello with `schema`,
/// all of `a`'s changes as one group, and content as `answer` says. Returns how `b`'s
/// session ended and the messages it sent after its Hello.
async fn scripted(
    a: &(PathBuf, NodeId),
    b: &(PathBuf, NodeId),
    schema: u32,
    answer: Answer,
    forged: Forged,
) -> (Result<Stats, Error>, Vec<Message>) {
    let db = crate::db::open_existing(&b.0).unwrap();
    let name = crate::peer::store::PeerName::parse("a").unwrap();
    if crate::peer::store::by_key(db.conn(), &a.1)
        .unwrap()
        .is_none()
    {
        crate::peer::store::add(db.conn(), &b.1, &name, &a.1, None).unwrap();
    }
    drop(db);
    let (mut nets, mut covers, content) = wire_changes(&a.0);
    if let Some((extra, site, version)) = forged {
        nets.extend(extra);
        covers.insert(site, version, version);
    }
    let (mine, theirs) = tokio::io::duplex(64 * 1024);
    let (b_read, b_write) = tokio::io::split(theirs);
    let (mut read, mut write) = tokio::io::split(mine);
    let session = session_with(b, a, "a", Mode::Live, holdings_now(&b.0).await);
    let run = tokio::spawn(session.run(b_read, b_write, None));
    let script = async {
        let mut seen = Vec::new();
        write_message(
            &mut write,
            &Message::Hello(Hello {
                node: a.1,
                protocol: fazt_proto::PROTOCOL_VERSION,
                schema,
                heads: Heads::from(&covers),
            }),
        )
        .await?;
        let Some((Message::Hello(_), _)) = read_message(&mut read).await? else {
            bail!("no Hello first");
        };
        write_message(
            &mut write,
            &Message::Changes(Changes {
                changes: nets,
                complete: Some(Heads::from(&covers)),
            }),
        )
        .await?;
        while let Some((msg, _)) = read_message(&mut read).await? {
            match &msg {
                Message::Want(digests) => {
                    for d in digests {
                        for c in answer(*d, &content[d]) {
                            write_message(&mut write, &Message::Content(c)).await?;
                        }
                    }
                }
                Message::Applied { .. } => {
                    seen.push(msg);
                    break;
                }
                _ => {}
            }
            seen.push(msg);
        }
        Ok(seen)
    };
    let seen = tokio::time::timeout(std::time::Duration::from_secs(20), script)
        .await
        .expect("the scripted peer finished");
    // The peer hangs up: a live session that ended well returns Ok. It still reads what the
    // session sends meanwhile (a merge may have moved this node's own coverage, which the
    // session then exports), as a peer that closes its side of the stream does.
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut write).await;
    tokio::spawn(async move { while let Ok(Some(_)) = read_message(&mut read).await {} });
    let result = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the session ended")
        .unwrap();
    (result, seen.unwrap_or_default())
}

fn chunks(digest: Digest, bytes: &[u8], size: usize) -> Vec<Content> {
    bytes
        .chunks(size)
        .enumerate()
        .map(|(i, data)| Content {
            digest,
            gone: false,
            total: bytes.len() as u64,
            offset: (i * size) as u64,
            data: data.to_vec(),
        })
        .collect()
}

/// Everything `b` holds that a group from a peer could change.
/// Blob rows, coverage, and staged content rows.
type Contents = (Vec<(String, i64, Vec<u8>)>, Coverage, i64);

fn holdings(path: &std::path::Path) -> Contents {
    let db = crate::db::open_existing(path).unwrap();
    let staged: i64 = db
        .conn()
        .query_row("SELECT count(*) FROM peer_content", [], |r| r.get(0))
        .unwrap();
    (rows(path), db.coverage().unwrap(), staged)
}

/// Two nodes; `a` holds a blob large enough to travel as content.
fn with_content() -> (
    tempfile::TempDir,
    (PathBuf, NodeId),
    (PathBuf, NodeId),
    Vec<u8>,
) {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    let blob: Vec<u8> = (0..40_000u32).map(|i| (i * 31 % 241) as u8).collect();
    put_blob(&a.0, &blob);
    (dir, a, b, blob)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_content_in_chunks_is_applied_and_acknowledged() {
    let (_dir, a, b, blob) = with_content();
    let (result, seen) = scripted(
        &a,
        &b,
        crate::db::migrations::latest_version(),
        |d, b| chunks(d, b, 7_000),
        None,
    )
    .await;
    result.unwrap();
    assert!(
        matches!(seen.last(), Some(Message::Applied { groups: 1, .. })),
        "{seen:?}"
    );
    let (blobs, coverage, staged) = holdings(&b.0);
    assert!(blobs.iter().any(|(_, _, data)| *data == blob));
    let theirs = crate::db::open_existing(&a.0).unwrap().coverage().unwrap();
    assert_eq!(
        theirs.minus(&coverage),
        Coverage::default(),
        "b holds all of a"
    );
    assert_eq!(staged, 0);
}

/// A hostile answer ends the session with `reason`; the group is not applied.
async fn refused(answer: Answer, reason: &str) {
    let (_dir, a, b, blob) = with_content();
    let before = holdings(&b.0);
    let (result, seen) = scripted(
        &a,
        &b,
        crate::db::migrations::latest_version(),
        answer,
        None,
    )
    .await;
    let err = format!(
        "{:#}",
        result.expect_err("the session must end with an error")
    );
    assert!(err.contains(reason), "{err}");
    assert!(
        !seen.iter().any(|m| matches!(m, Message::Applied { .. })),
        "{seen:?}"
    );
    assert_eq!(holdings(&b.0), before, "nothing of the group was applied");
    assert!(!holdings(&b.0).0.iter().any(|(_, _, d)| *d == blob));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_that_does_not_match_its_digest_ends_the_session() {
    refused(
        |d, b| {
            let mut bytes = b.to_vec();
            bytes[100] ^= 1;
            chunks(d, &bytes, 7_000)
        },
        "does not match its digest",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_chunks_out_of_order_end_the_session() {
    refused(
        |d, b| {
            let mut parts = chunks(d, b, 7_000);
            parts.swap(0, 1);
            parts
        },
        "content out of order",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_the_peer_says_is_gone_ends_the_session() {
    refused(
        |d, _| {
            vec![Content {
                digest: d,
                gone: true,
                total: 0,
                offset: 0,
                data: Vec::new(),
            }]
        },
        "content changed on the peer",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_longer_than_the_peer_announced_ends_the_session() {
    refused(
        |d, b| {
            let mut parts = chunks(d, b, 7_000);
            for p in &mut parts {
                p.total = 1_000;
            }
            parts
        },
        "content chunk beyond its total",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_newer_schema_is_accepted_and_changes_for_tables_this_node_lacks_wait() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    // `a` runs a newer fazt: it has a replicated table `b` does not know yet.
    let create = "CREATE TABLE future_things (id TEXT PRIMARY KEY NOT NULL, note TEXT)";
    {
        let mut db = crate::db::open_existing(&a.0).unwrap();
        db.conn().execute_batch(create).unwrap();
        db.replicate("future_things").unwrap();
        db.write(|tx| {
            tx.execute(
                "INSERT INTO future_things (id, note) VALUES ('one', 'from the future')",
                [],
            )
        })
        .unwrap();
    }
    put_blob(&a.0, b"a blob b can apply now");
    let (result, seen) = scripted(
        &a,
        &b,
        crate::db::migrations::latest_version() + 1,
        |d, b| chunks(d, b, 1 << 20),
        None,
    )
    .await;
    result.unwrap();
    assert!(
        matches!(seen.last(), Some(Message::Applied { .. })),
        "{seen:?}"
    );
    let pending = |path: &std::path::Path| -> i64 {
        crate::db::open_existing(path)
            .unwrap()
            .conn()
            .query_row(
                "SELECT count(*) FROM fazt_sync_pending WHERE tbl = 'future_things'",
                [],
                |r| r.get(0),
            )
            .unwrap()
    };
    assert!(pending(&b.0) > 0, "the change waits in the pending area");
    assert!(rows(&b.0)
        .iter()
        .any(|(_, _, d)| d == b"a blob b can apply now"));

    // The upgrade creates the table: the waiting change is applied.
    let mut db = crate::db::open_existing(&b.0).unwrap();
    db.conn().execute_batch(create).unwrap();
    db.replicate("future_things").unwrap();
    let note: String = db
        .conn()
        .query_row("SELECT note FROM future_things WHERE id = 'one'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(note, "from the future");
    assert_eq!(pending(&b.0), 0);
}

/// The whole database file as text (schema and every row), for "nothing changed".
fn everything(path: &std::path::Path) -> String {
    let conn = rusqlite::Connection::open(path).unwrap();
    let names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let mut out = String::new();
    for name in names {
        let mut stmt = conn.prepare(&format!("SELECT * FROM \"{name}\"")).unwrap();
        let n = stmt.column_count();
        let mut lines: Vec<String> = stmt
            .query_map([], |r| {
                Ok((0..n)
                    .map(|i| format!("{:?}", r.get_ref(i).unwrap()))
                    .collect::<Vec<_>>()
                    .join("|"))
            })
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        lines.sort();
        out.push_str(&format!("== {name}\n{}\n", lines.join("\n")));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_naming_node_local_tables_changes_none_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    // Trusted first (the session needs it), so the peers row exists before the snapshot.
    crate::peer::store::add(
        crate::db::open_existing(&b.0).unwrap().conn(),
        &b.1,
        &crate::peer::store::PeerName::parse("a").unwrap(),
        &a.1,
        None,
    )
    .unwrap();
    let local = |p: &std::path::Path| {
        let all = everything(p);
        crate::db::NODE_LOCAL_TABLES
            .iter()
            .map(|t| {
                let head = format!("== {t}\n");
                let from = all.find(&head).unwrap_or_else(|| panic!("no table {t}"));
                let rest = &all[from + head.len()..];
                let to = rest.find("\n== ").map_or(rest.len(), |i| i + 1);
                format!("{head}{}", &rest[..to])
            })
            .collect::<String>()
    };
    let before = local(&b.0);
    // a's honest changes, plus one transaction of a's that writes b's node-local tables:
    // a new address for a, a new name and key for this node, a fresh invitation.
    let site = crate::db::open_existing(&a.0).unwrap().site_id();
    let text = |t: &str| fazt_sync::pack::pack(&[Value::Text(t.into())]);
    let forged = [
        (
            "peers",
            text("a"),
            "addr",
            Value::Text("evil.example:1".into()),
        ),
        (
            "peers",
            text("evil"),
            "node_id",
            Value::Text(a.1.to_string()),
        ),
        (
            "node_config",
            text("name"),
            "value",
            Value::Text("owned".into()),
        ),
        (
            "node_identity",
            fazt_sync::pack::pack(&[Value::Integer(1)]),
            "secret",
            Value::Blob(vec![0; 32]),
        ),
        (
            "peer_invites",
            text("00"),
            "expires_at",
            Value::Integer(i64::MAX >> 12),
        ),
    ];
    let version = crate::db::open_existing(&a.0)
        .unwrap()
        .db_version()
        .unwrap()
        .next();
    let extra: Vec<NetChange> = forged
        .into_iter()
        .enumerate()
        .map(|(seq, (table, pk, cid, val))| NetChange {
            change: Change {
                table: table.into(),
                pk,
                cid: cid.into(),
                val,
                col_version: ColVersion(1),
                db_version: version,
                site_id: site,
                cl: CausalLength(1),
                seq: Seq(seq as i64),
            }
            .to_wire(),
            content: None,
        })
        .collect();
    let (result, seen) = scripted(
        &a,
        &b,
        crate::db::migrations::latest_version(),
        |d, b| chunks(d, b, 1 << 20),
        Some((extra, site, version)),
    )
    .await;
    result.unwrap();
    assert!(
        matches!(seen.last(), Some(Message::Applied { .. })),
        "{seen:?}"
    );
    assert_eq!(local(&b.0), before, "node-local tables are byte-identical");
    let parked: i64 = crate::db::open_existing(&b.0)
        .unwrap()
        .conn()
        .query_row("SELECT count(*) FROM fazt_sync_pending", [], |r| r.get(0))
        .unwrap();
    assert_eq!(parked, 5, "the forged changes wait, never applied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_refuses_a_peer_that_is_not_the_one_expected() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    let c = node(dir.path(), "c.db");
    // `a` expects to talk to `c`, but `b` answers.
    let (a_io, b_io) = tokio::io::duplex(64 * 1024);
    let (a_read, a_write) = tokio::io::split(a_io);
    let (b_read, b_write) = tokio::io::split(b_io);
    let sa = session_with(&a, &c, "c", Mode::Once, holdings_now(&a.0).await);
    let sb = session_with(&b, &a, "a", Mode::Live, holdings_now(&b.0).await);
    let other = tokio::spawn(sb.run(b_read, b_write, None));
    let err = sa.run(a_read, a_write, None).await.unwrap_err();
    assert!(err.to_string().contains("another node"), "{err}");
    other.abort();
}

/// Runs a one-off session on `b` against a hand-played `a` whose first message is
/// `first(a's id)`, not a proper Hello; returns how the session ended.
async fn answered_with(first: impl FnOnce(NodeId) -> Message) -> Error {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    let (mine, theirs) = tokio::io::duplex(64 * 1024);
    let (b_read, b_write) = tokio::io::split(theirs);
    let (mut read, mut write) = tokio::io::split(mine);
    let session = session_with(&b, &a, "a", Mode::Once, holdings_now(&b.0).await);
    let run = tokio::spawn(session.run(b_read, b_write, None));
    let _hello = read_message(&mut read).await.unwrap();
    write_message(&mut write, &first(a.1)).await.unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the session ended")
        .unwrap()
        .expect_err("the session must fail")
}

/// Runs a one-off session on `b` against a hand-played `a` that sends `script(a's id)`, then
/// ends the stream (still reading what `b` sends); returns how the session ended.
async fn hung_up_after(script: impl FnOnce(NodeId) -> Vec<Message>) -> Error {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    let (mine, theirs) = tokio::io::duplex(64 * 1024);
    let (b_read, b_write) = tokio::io::split(theirs);
    let (mut read, mut write) = tokio::io::split(mine);
    let session = session_with(&b, &a, "a", Mode::Once, holdings_now(&b.0).await);
    let run = tokio::spawn(session.run(b_read, b_write, None));
    for msg in script(a.1) {
        write_message(&mut write, &msg).await.unwrap();
    }
    write.shutdown().await.unwrap();
    let drain =
        tokio::spawn(async move { while let Ok(Some(_)) = read_message(&mut read).await {} });
    let err = tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the session ended")
        .unwrap()
        .expect_err("the session must fail");
    drain.abort();
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_session_cut_off_says_whether_it_was_greeting_or_catching_up() {
    let err = hung_up_after(|_| Vec::new()).await;
    assert!(
        matches!(
            err,
            Error::Closed {
                when: Closed::BeforeHello,
                ..
            }
        ),
        "{err:?}"
    );
    // `a` says it holds versions `b` lacks, then hangs up before sending them.
    let err = hung_up_after(|a| {
        let mut heads = Coverage::default();
        heads.insert(SiteId([9; 16]), DbVersion(1), DbVersion(5));
        vec![Message::Hello(Hello {
            node: a,
            protocol: fazt_proto::PROTOCOL_VERSION,
            schema: crate::db::migrations::latest_version(),
            heads: Heads::from(&heads),
        })]
    })
    .await;
    assert!(
        matches!(
            err,
            Error::Closed {
                when: Closed::BeforeConverged,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_instead_of_hello_is_refused_with_the_other_nodes_reason() {
    let err = answered_with(|_| Message::Refuse("this node does not trust yours".into())).await;
    match &err {
        Error::Refused {
            peer,
            during: Stage::Hello,
            reason,
        } => {
            assert_eq!(peer, "a");
            assert_eq!(reason, "this node does not trust yours");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        format!("{err:#}"),
        "a refused the session: this node does not trust yours"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_message_other_than_hello_breaks_the_protocol() {
    let err = answered_with(|_| Message::Welcome { name: "a".into() }).await;
    assert!(
        matches!(
            err,
            Error::Protocol {
                what: Violation::FirstNotHello,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        format!("{err:#}"),
        "a broke the protocol: its first message was not Hello"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_in_another_protocol_version_is_a_version_mismatch() {
    let theirs = fazt_proto::PROTOCOL_VERSION + 1;
    let err = answered_with(|a| {
        Message::Hello(Hello {
            node: a,
            protocol: theirs,
            schema: crate::db::migrations::latest_version(),
            heads: Heads::from(&Coverage::default()),
        })
    })
    .await;
    assert!(
        matches!(
            err,
            Error::VersionMismatch { theirs: Theirs::Hello(v), .. } if v == theirs
        ),
        "{err:?}"
    );
    assert_eq!(
        format!("{err:#}"),
        format!(
            "a speaks protocol version {theirs}, this node {}: upgrade the older one",
            fazt_proto::PROTOCOL_VERSION
        )
    );
}

/// Copies what `from` sends to `to` until `stop` changes, then ends `to` (the session behind
/// it sees the peer hang up) and drains `from`, so that its session's writes still land.
async fn relay(
    mut from: impl tokio::io::AsyncRead + Unpin,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => if to.write_all(&buf[..n]).await.is_err() { break },
            },
            _ = stop.changed() => break,
        }
    }
    let _ = to.shutdown().await;
    while matches!(from.read(&mut buf).await, Ok(n) if n > 0) {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_local_commits_start_no_export_pass_and_a_replicated_write_still_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let a = node(dir.path(), "a.db");
    let b = node(dir.path(), "b.db");
    for (me, other) in [(&a, &b), (&b, &a)] {
        let db = crate::db::open_existing(&me.0).unwrap();
        let name = crate::peer::store::PeerName::parse("peer").unwrap();
        crate::peer::store::add(db.conn(), &me.1, &name, &other.1, None).unwrap();
    }
    // Two live sessions, joined through pipes the test can end.
    let (a_io, a_far) = tokio::io::duplex(64 * 1024);
    let (b_io, b_far) = tokio::io::duplex(64 * 1024);
    let (stop_tx, stop) = watch::channel(false);
    let (a_far_read, a_far_write) = tokio::io::split(a_far);
    let (b_far_read, b_far_write) = tokio::io::split(b_far);
    let relays = [
        tokio::spawn(relay(a_far_read, b_far_write, stop.clone())),
        tokio::spawn(relay(b_far_read, a_far_write, stop)),
    ];
    let live = |me: &(PathBuf, NodeId), other: &(PathBuf, NodeId), io, holdings| {
        let (read, write) = tokio::io::split(io);
        let session = session_with(me, other, "peer", Mode::Live, holdings);
        tokio::spawn(session.run(read, write, None))
    };
    let a_session = live(&a, &b, a_io, holdings_of(&a.0).await);
    let b_session = live(&b, &a, b_io, holdings_of(&b.0).await);

    // A burst of node-local bookkeeping on both nodes (what the peer service and the app
    // logs write all the time), each commit seen by the watchers on its own.
    for i in 0..30 {
        for node in [&a, &b] {
            let db = crate::db::open_existing(&node.0).unwrap();
            crate::config::set_local(db.conn(), &format!("bookkeeping-{i}"), "x").unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    // A replicated write still arrives.
    put_blob(&a.0, b"a replicated write");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while rows(&b.0) != rows(&a.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the replicated write did not arrive"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    stop_tx.send_replace(true);
    let a_stats = a_session.await.unwrap().unwrap();
    let b_stats = b_session.await.unwrap().unwrap();
    for r in relays {
        r.await.unwrap();
    }
    assert!(a_stats.sent_changes > 0);
    assert_eq!(b_stats.received_changes, a_stats.sent_changes);
    // Each side looks once at the start; then `a` for its write and `b` for applying it
    // (and each perhaps once more, for its watcher's first look). None for bookkeeping.
    for (side, stats) in [("a", &a_stats), ("b", &b_stats)] {
        assert!(
            stats.export_passes <= 3,
            "{side} started {} export passes",
            stats.export_passes
        );
    }
}

/// Connections to a node's database that count themselves: how many were opened, and how
/// many are open now.
struct Counted {
    connect: Connect,
    opened: Arc<std::sync::atomic::AtomicUsize>,
    /// Each open connection holds a clone until SQLite closes it (in a function registered
    /// on it, which the connection drops when it closes).
    alive: Arc<()>,
}

impl Counted {
    fn new(path: &std::path::Path) -> Counted {
        let opened = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let alive = Arc::new(());
        let (inner, count, held) = (connect(path), opened.clone(), Arc::downgrade(&alive));
        let connect = Connect::new(move || {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let db = inner.open()?;
            let held = held.upgrade().expect("the test holds it");
            db.conn().create_scalar_function(
                "test_alive",
                0,
                rusqlite::functions::FunctionFlags::SQLITE_UTF8,
                move |_| Ok(Arc::strong_count(&held) as i64),
            )?;
            Ok(db)
        });
        Counted {
            connect,
            opened,
            alive,
        }
    }

    fn opened(&self) -> usize {
        self.opened.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn open_now(&self) -> usize {
        Arc::strong_count(&self.alive) - 1
    }

    /// Waits (at most 20 s) until `n` connections are open.
    async fn until_open(&self, n: usize, what: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while self.open_now() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{what}: {} open",
                self.open_now()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Plays a peer that holds nothing, by hand: sends Hello and reads what the session sends
/// until its first group is complete. Returns the first content reference in it.
async fn greet_and_take_a_group(
    me: NodeId,
    read: &mut (impl tokio::io::AsyncRead + Unpin),
    write: &mut (impl tokio::io::AsyncWrite + Unpin),
) -> anyhow::Result<Option<Digest>> {
    write_message(
        write,
        &Message::Hello(Hello {
            node: me,
            protocol: fazt_proto::PROTOCOL_VERSION,
            schema: crate::db::migrations::latest_version(),
            heads: Heads::from(&Coverage::default()),
        }),
    )
    .await?;
    let mut digest = None;
    while let Some((msg, _)) = read_message(read).await? {
        if let Message::Changes(c) = msg {
            digest = digest.or(c
                .changes
                .iter()
                .find_map(|n| n.content.as_ref().map(|r| r.digest)));
            if c.complete.is_some() {
                break;
            }
        }
    }
    Ok(digest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_is_served_on_a_connection_opened_when_asked_and_closed_when_idle() {
    let (_dir, a, b, blob) = with_content();
    let counted = Counted::new(&a.0);
    let opens = || counted.opened();
    let session = Session {
        connect: counted.connect.clone(),
        limits: Limits {
            content_idle: std::time::Duration::from_millis(100),
            // The exporter's connection stays for the count below.
            export_idle: std::time::Duration::from_secs(600),
            ..Limits::default()
        },
        ..session_with(&a, &b, "b", Mode::Live, holdings_now(&a.0).await)
    };
    let (mine, theirs) = tokio::io::duplex(64 * 1024);
    let (a_read, a_write) = tokio::io::split(theirs);
    let (mut read, mut write) = tokio::io::split(mine);
    let run = tokio::spawn(session.run(a_read, a_write, None));

    // `b`, played by hand, holds nothing and asks for nothing until `a`'s group is complete.
    let script = async {
        let digest = greet_and_take_a_group(b.1, &mut read, &mut write).await?;
        let digest = digest.expect("the blob travels as a content reference");
        assert_eq!(
            opens(),
            2,
            "exporting and applying, nothing to serve content"
        );
        assert_eq!(counted.open_now(), 2);

        // Asked for three times: first from memory, then read from the database (served
        // content is not kept), again once the serving connection was closed for idling.
        let mut want = async |opened_after: usize| -> anyhow::Result<()> {
            write_message(&mut write, &Message::Want(vec![digest])).await?;
            let mut got = Vec::new();
            while let Some((msg, _)) = read_message(&mut read).await? {
                if let Message::Content(c) = msg {
                    assert!(!c.gone, "content served");
                    got.extend(c.data);
                    if got.len() as u64 == c.total {
                        break;
                    }
                }
            }
            assert_eq!(got, blob);
            assert_eq!(opens(), opened_after);
            Ok(())
        };
        want(2).await?;
        want(3).await?;
        counted
            .until_open(2, "the idle content connection stayed open")
            .await;
        want(4).await?;
        anyhow::Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), script)
        .await
        .expect("the scripted peer finished")
        .unwrap();
    hang_up(read, write, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_exporter_closes_its_connection_and_opens_one_for_the_next_pass() {
    let (_dir, a, b, _) = with_content();
    let counted = Counted::new(&a.0);
    let (tick, ticks) = watch::channel(0u64);
    let session = Session {
        connect: counted.connect.clone(),
        limits: Limits {
            export_idle: std::time::Duration::from_millis(100),
            ..Limits::default()
        },
        ..session_with(
            &a,
            &b,
            "b",
            Mode::Live,
            Holdings::follow(connect(&a.0), ticks).await.unwrap(),
        )
    };
    let (mine, theirs) = tokio::io::duplex(64 * 1024);
    let (a_read, a_write) = tokio::io::split(theirs);
    let (mut read, mut write) = tokio::io::split(mine);
    let run = tokio::spawn(session.run(a_read, a_write, None));

    let script = async {
        greet_and_take_a_group(b.1, &mut read, &mut write).await?;
        assert_eq!(counted.opened(), 2, "exporting and applying");
        counted
            .until_open(1, "the idle exporter's connection stayed open")
            .await;
        // A write after the exporter idled: the next pass opens a connection and sends it.
        put_blob(&a.0, b"written after the exporter idled");
        tick.send_replace(1);
        let mut arrived = false;
        while let Some((msg, _)) = read_message(&mut read).await? {
            if let Message::Changes(c) = msg {
                arrived |= c.changes.iter().any(|n| {
                    Change::from_wire(n.change.clone()).val
                        == Value::Blob(b"written after the exporter idled".to_vec())
                });
                if c.complete.is_some() && arrived {
                    break;
                }
            }
        }
        assert!(arrived);
        assert_eq!(counted.opened(), 3, "one more connection, for the new pass");
        anyhow::Ok(())
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), script)
        .await
        .expect("the scripted peer finished")
        .unwrap();
    hang_up(read, write, run).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sessions_of_a_node_share_one_applying_connection_while_any_runs() {
    let (dir, a, b, _) = with_content();
    let c = node(dir.path(), "c.db");
    let counted = Counted::new(&a.0);
    let mut runs = Vec::new();
    let mut peers = Vec::new();
    for peer in [&b, &c] {
        let session = Session {
            connect: counted.connect.clone(),
            // The exporters' connections stay for the counts below.
            limits: Limits {
                export_idle: std::time::Duration::from_secs(600),
                ..Limits::default()
            },
            ..session_with(&a, peer, "peer", Mode::Live, holdings_now(&a.0).await)
        };
        let (mine, theirs) = tokio::io::duplex(64 * 1024);
        let (a_read, a_write) = tokio::io::split(theirs);
        let (mut read, mut write) = tokio::io::split(mine);
        runs.push(tokio::spawn(session.run(a_read, a_write, None)));
        tokio::time::timeout(
            std::time::Duration::from_secs(20),
            greet_and_take_a_group(peer.1, &mut read, &mut write),
        )
        .await
        .expect("the session exported")
        .unwrap();
        peers.push((read, write));
    }
    // An exporting connection each, and one applying connection for both.
    assert_eq!(counted.opened(), 3);
    assert_eq!(counted.open_now(), 3);

    // The peers hang up: the sessions end and close every connection, the shared one with
    // the last.
    drop(peers.pop());
    tokio::time::timeout(std::time::Duration::from_secs(20), runs.pop().unwrap())
        .await
        .expect("the session ended")
        .unwrap()
        .unwrap();
    counted.until_open(2, "the first session's exporter").await;
    drop(peers);
    tokio::time::timeout(std::time::Duration::from_secs(20), runs.pop().unwrap())
        .await
        .expect("the session ended")
        .unwrap()
        .unwrap();
    counted
        .until_open(0, "the last session's connections")
        .await;
}

#[test]
fn applied_heads_that_carry_only_what_is_new_add_to_what_the_peer_said_before() {
    let v = DbVersion;
    let (one, two) = (SiteId([1; 16]), SiteId([2; 16]));
    let mut mine = Coverage::default();
    mine.insert(one, v(1), v(5));
    mine.insert(two, v(1), v(3));
    let shared: SharedRef = Arc::new(Mutex::new(Shared {
        mine: Arc::new(mine.clone()),
        ..Shared::default()
    }));
    let heard = |site, start, end| {
        let mut heads = Coverage::default();
        if end > 0 {
            heads.insert(site, v(start), v(end));
        }
        let mut s = lock(&shared);
        s.heard(&heads);
        (
            s.peer_known.clone(),
            s.their_heads.clone(),
            s.peer_clock,
            s.stats.lag,
        )
    };
    // Hello: the peer holds 1..=2 of the first origin.
    let (known, theirs, clock, lag) = heard(one, 1, 2);
    assert_eq!((clock, lag), (v(2), 3 + 3));
    assert_eq!(known, theirs);
    assert!(!converged(&shared));
    // An Applied with what is new only: 3..=5.
    let (known, theirs, clock, lag) = heard(one, 3, 5);
    assert_eq!((clock, lag), (v(5), 3));
    assert_eq!(theirs.get(&one).unwrap().ranges(), &[(v(1), v(5))]);
    assert_eq!(known, theirs);
    // An Applied with nothing new (a count only) takes nothing away.
    let (_, theirs, clock, lag) = heard(one, 0, 0);
    assert_eq!((clock, lag), (v(5), 3));
    assert_eq!(theirs.get(&one).unwrap().ranges(), &[(v(1), v(5))]);
    // Lower versions of another origin leave the declared clock where it was.
    let (known, theirs, clock, lag) = heard(two, 1, 3);
    assert_eq!((clock, lag), (v(5), 0));
    assert_eq!(theirs, mine);
    assert_eq!(known, mine);
    assert!(converged(&shared));
}

/// Trusts each of `nodes` on each of the others, under the others' file names.
fn trust_all(nodes: &[&(PathBuf, NodeId)]) {
    for me in nodes {
        let db = crate::db::open_existing(&me.0).unwrap();
        for other in nodes.iter().filter(|o| o.1 != me.1) {
            let stem = other.0.file_stem().unwrap().to_str().unwrap();
            let name = crate::peer::store::PeerName::parse(stem).unwrap();
            crate::peer::store::add(db.conn(), &me.1, &name, &other.1, None).unwrap();
        }
    }
}

/// A one-off session of `me` (with `holdings`) against a live one of `other`, to the end.
async fn once(
    me: &(PathBuf, NodeId),
    holdings: Holdings,
    other: &(PathBuf, NodeId),
) -> (Stats, Stats) {
    let (me_io, other_io) = tokio::io::duplex(64 * 1024);
    let (me_read, me_write) = tokio::io::split(me_io);
    let (other_read, other_write) = tokio::io::split(other_io);
    let live = session_with(other, me, "me", Mode::Live, holdings_now(&other.0).await);
    let live = tokio::spawn(live.run(other_read, other_write, None));
    let session = session_with(me, other, "other", Mode::Once, holdings);
    let within = std::time::Duration::from_secs(30);
    let mine = tokio::time::timeout(within, session.run(me_read, me_write, None))
        .await
        .expect("the one-off session converged")
        .unwrap();
    let theirs = tokio::time::timeout(within, live)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    (mine, theirs)
}

/// What passed through a [`tap`]: bytes forwarded, and the heads of every Applied forwarded.
#[derive(Default, Clone)]
struct Tapped {
    bytes: u64,
    told: Coverage,
}

/// Forwards the messages `from` sends to `to`, except that Changes wait while `hold` is
/// true (so a test decides when groups arrive, while acknowledgements and announcements
/// pass), publishing what it forwarded in `tapped`; ends `to` when `stop` changes.
async fn tap(
    mut from: impl tokio::io::AsyncRead + Unpin + Send + 'static,
    mut to: impl tokio::io::AsyncWrite + Unpin,
    mut hold: watch::Receiver<bool>,
    tapped: watch::Sender<Tapped>,
    mut stop: watch::Receiver<bool>,
) {
    use tokio::io::AsyncWriteExt;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok(Some((msg, _))) = read_message(&mut from).await {
            if tx.send(msg).is_err() {
                // Keep reading, so that the sender's writes still land.
                continue;
            }
        }
    });
    let mut held = Vec::new();
    let forward = |msg: Message| {
        tapped.send_modify(|t| {
            t.bytes += msg.encode().len() as u64;
            if let Message::Applied { heads, .. } = &msg {
                t.told.union(&Coverage::from(heads));
            }
        });
        msg.encode()
    };
    loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                None => break,
                Some(msg @ Message::Changes(_)) if *hold.borrow() => held.push(msg),
                Some(msg) => if to.write_all(&forward(msg)).await.is_err() { break },
            },
            Ok(()) = hold.changed() => if !*hold.borrow_and_update() {
                for msg in std::mem::take(&mut held) {
                    if to.write_all(&forward(msg)).await.is_err() { break }
                }
            },
            _ = stop.changed() => break,
        }
    }
    let _ = to.shutdown().await;
}

/// Waits, with a generous deadline, until `done` holds for what `rx` shows.
async fn wait_for<T>(rx: &mut watch::Receiver<T>, what: &str, done: impl FnMut(&T) -> bool) {
    tokio::time::timeout(std::time::Duration::from_secs(30), rx.wait_for(done))
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_tells_its_other_peers_what_it_applied_and_they_do_not_send_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let (o, x, b) = (
        node(dir.path(), "o.db"),
        node(dir.path(), "x.db"),
        node(dir.path(), "b.db"),
    );
    trust_all(&[&o, &x, &b]);
    put_blob(&o.0, b"the change c, written on o");
    let c = crate::db::open_existing(&o.0).unwrap().coverage().unwrap();
    put_blob(&x.0, b"a change of x's own");
    let (x_holds, b_holds) = (holdings_of(&x.0).await, holdings_of(&b.0).await);

    // x and b in a live session. The groups x sends b are held back, what else x says
    // passes; and x sends one group ahead of b's acknowledgements: so x's own change, sent
    // first, keeps c from leaving x (b could only learn from that group that x holds c).
    let (x_io, x_far) = tokio::io::duplex(64 * 1024);
    let (b_io, b_far) = tokio::io::duplex(64 * 1024);
    let (stop_tx, stop) = watch::channel(false);
    let (hold_tx, hold) = watch::channel(true);
    let (tapped_tx, mut tapped) = watch::channel(Tapped::default());
    let (x_far_read, x_far_write) = tokio::io::split(x_far);
    let (b_far_read, b_far_write) = tokio::io::split(b_far);
    let relays = [
        tokio::spawn(tap(x_far_read, b_far_write, hold, tapped_tx, stop.clone())),
        tokio::spawn(relay(b_far_read, x_far_write, stop)),
    ];
    let (x_read, x_write) = tokio::io::split(x_io);
    let (b_read, b_write) = tokio::io::split(b_io);
    let mut x_session = session_with(&x, &b, "b", Mode::Live, x_holds.clone());
    x_session.limits.window = 1;
    let mut b_session = session_with(&b, &x, "x", Mode::Live, b_holds.clone());
    let (b_progress, mut b_seen) = watch::channel(Stats::default());
    b_session.progress = Some(b_progress);
    let x_session = tokio::spawn(x_session.run(x_read, x_write, None));
    let b_session = tokio::spawn(b_session.run(b_read, b_write, None));

    // x gets c from o in another session (sharing x's holdings).
    once(&x, x_holds, &o).await;
    // x tells b at once that it holds c, and b takes it in.
    wait_for(&mut tapped, "x told b that it holds c", |t| {
        c.minus(&t.told).0.is_empty()
    })
    .await;
    let told = tapped.borrow().bytes;
    wait_for(&mut b_seen, "b read what x told it", |s| {
        s.received_bytes >= told
    })
    .await;

    // b gets c from o too; then writes d, which goes to x with whatever b sends.
    once(&b, b_holds, &o).await;
    hold_tx.send_replace(false);
    put_blob(&b.0, b"the change d, written on b");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !rows(&x.0)
        .iter()
        .any(|r| r.2 == b"the change d, written on b")
    {
        assert!(std::time::Instant::now() < deadline, "d did not arrive");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop_tx.send_replace(true);
    let x_stats = x_session.await.unwrap().unwrap();
    let b_stats = b_session.await.unwrap().unwrap();
    for r in relays {
        r.await.unwrap();
    }
    assert!(b_stats.sent_changes > 0, "b sent d");
    assert_eq!(
        x_stats.duplicates, 0,
        "b sent x changes x held already ({} received in all)",
        x_stats.received_changes
    );
}

/// Live sessions between every two of `nodes` (each node's sessions sharing its holdings),
/// through pipes that end when `stop` changes. Returns each session's handle, with its
/// node's index.
async fn mesh(
    nodes: &[&(PathBuf, NodeId)],
    stop: &watch::Receiver<bool>,
) -> Vec<(usize, tokio::task::JoinHandle<Result<Stats, Error>>)> {
    let mut holdings = Vec::new();
    for n in nodes {
        holdings.push(holdings_of(&n.0).await);
    }
    let mut sessions = Vec::new();
    for i in 0..nodes.len() {
        for j in i + 1..nodes.len() {
            let (i_io, i_far) = tokio::io::duplex(64 * 1024);
            let (j_io, j_far) = tokio::io::duplex(64 * 1024);
            let (i_far_read, i_far_write) = tokio::io::split(i_far);
            let (j_far_read, j_far_write) = tokio::io::split(j_far);
            tokio::spawn(relay(i_far_read, j_far_write, stop.clone()));
            tokio::spawn(relay(j_far_read, i_far_write, stop.clone()));
            for (me, other, io) in [(i, j, i_io), (j, i, j_io)] {
                let (read, write) = tokio::io::split(io);
                let session = session_with(
                    nodes[me],
                    nodes[other],
                    "peer",
                    Mode::Live,
                    holdings[me].clone(),
                );
                sessions.push((me, tokio::spawn(session.run(read, write, None))));
            }
        }
    }
    sessions
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicates_in_a_triangle_over_20_changes_a_figure_printed_not_asserted() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (
        node(dir.path(), "a.db"),
        node(dir.path(), "b.db"),
        node(dir.path(), "c.db"),
    );
    trust_all(&[&a, &b, &c]);
    let (stop_tx, stop) = watch::channel(false);
    let sessions = mesh(&[&a, &b, &c], &stop).await;
    for i in 0..20 {
        let data = format!("change {i}, written on a");
        put_blob(&a.0, data.as_bytes());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while [&b, &c]
            .iter()
            .any(|n| !rows(&n.0).iter().any(|r| r.2 == data.as_bytes()))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{data} did not arrive"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }
    stop_tx.send_replace(true);
    let (mut received, mut duplicates) = (0, 0);
    for (_, s) in sessions {
        let stats = s.await.unwrap().unwrap();
        received += stats.received_changes;
        duplicates += stats.duplicates;
    }
    println!("triangle, 20 changes written on a: {received} changes received in all, {duplicates} of them held already");
    assert!(received > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_off_session_ends_when_both_hold_the_same_versions_told_only_what_is_new() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (node(dir.path(), "a.db"), node(dir.path(), "b.db"));
    trust_all(&[&a, &b]);
    // Each holds transactions the other lacks, so each side's Applied must carry what it
    // came to hold for the other to see both sides hold the same.
    for i in 0..3 {
        put_blob(&a.0, format!("a's change {i}").as_bytes());
    }
    for i in 0..2 {
        put_blob(&b.0, format!("b's change {i}").as_bytes());
    }
    let (a_stats, b_stats) = once(&a, holdings_of(&a.0).await, &b).await;
    assert!(a_stats.sent_changes > 0 && b_stats.sent_changes > 0);
    assert_eq!(rows(&a.0), rows(&b.0));
    assert_eq!(
        crate::db::open_existing(&a.0).unwrap().coverage().unwrap(),
        crate::db::open_existing(&b.0).unwrap().coverage().unwrap()
    );
    assert_eq!(a_stats.lag, 0);
    // Again: nothing to send either way, and it still ends.
    let (again, _) = once(&a, holdings_of(&a.0).await, &b).await;
    assert_eq!((again.sent_changes, again.received_changes), (0, 0));
}

/// The scripted peer hangs up: the session ends well (within a guard against hanging).
async fn hang_up(
    read: tokio::io::ReadHalf<tokio::io::DuplexStream>,
    write: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    run: tokio::task::JoinHandle<Result<Stats, Error>>,
) {
    drop(write);
    drop(read);
    tokio::time::timeout(std::time::Duration::from_secs(20), run)
        .await
        .expect("the session ended")
        .unwrap()
        .unwrap();
}
