//! The engine's behaviour on small, named scenarios.

mod common;

use common::{clocks, data, exec, replica, sync};
use fazt_sync::{Batch, CausalLength, ColVersion, Coverage, DbVersion, Fingerprint, Replica, Seq};
use rusqlite::Connection;

#[test]
fn a_local_insert_reaches_another_replica() {
    let mut a = replica();
    let mut b = replica();
    exec(
        &mut a,
        "INSERT INTO items (id, a, b) VALUES (1, 'hello', 7)",
        [],
    );
    let batch = sync(&a, &mut b);
    assert_eq!(
        batch.changes.len(),
        3,
        "three columns; a live first incarnation needs no existence change"
    );
    assert_eq!(data(&a), data(&b));
    assert_eq!(clocks(&a), clocks(&b));
}

#[test]
fn change_rows_have_cr_sqlites_shape() {
    let mut a = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    let c = &batch.changes[0];
    assert_eq!(c.table, "items");
    assert_eq!(c.pk, vec![0x01, 0x09, 0x01]);
    assert_eq!(c.cid, "a");
    assert_eq!(c.val, fazt_sync::Value::Text("x".into()));
    assert_eq!(
        (c.col_version, c.db_version, c.cl, c.seq),
        (ColVersion(1), DbVersion(1), CausalLength(1), Seq(0))
    );
    assert_eq!(c.site_id, a.site_id());
    assert!(batch.changes.iter().all(|c| c.cid != "-1"));

    exec(&mut a, "DELETE FROM items WHERE id = 1", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    assert_eq!(
        batch.changes.len(),
        1,
        "a deleted row is only its tombstone"
    );
    let c = &batch.changes[0];
    assert_eq!(
        (c.cid.as_str(), c.cl, c.val.clone()),
        ("-1", CausalLength(2), fazt_sync::Value::Null)
    );
}

#[test]
fn applying_twice_changes_nothing() {
    let mut a = replica();
    let mut b = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    let first = b.apply(&batch).unwrap();
    assert!(first.applied > 0);
    let before = (data(&b), clocks(&b));
    let second = b.apply(&batch).unwrap();
    assert_eq!(second.applied, 0);
    assert_eq!(second.already_seen, batch.changes.len());
    assert_eq!((data(&b), clocks(&b)), before);
}

#[test]
fn col_version_rises_only_when_the_value_changes() {
    let mut a = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    exec(&mut a, "UPDATE items SET a = 'x', b = 5 WHERE id = 1", []);
    let versions: Vec<(i64, i64)> = a
        .conn()
        .prepare("SELECT cid, col_version FROM items__fazt_clock ORDER BY cid")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(versions, [(0, 1), (1, 2), (2, 1)]);
}

#[test]
fn concurrent_writes_converge_by_version_then_value_then_site() {
    let mut a = replica();
    let mut b = replica();
    exec(
        &mut a,
        "INSERT INTO items (id, a, b) VALUES (1, 'from a', 5)",
        [],
    );
    exec(
        &mut b,
        "INSERT INTO items (id, a, b) VALUES (1, 'from b', 5)",
        [],
    );
    sync(&a, &mut b);
    sync(&b, &mut a);
    assert_eq!(data(&a), data(&b));
    assert_eq!(clocks(&a), clocks(&b));
    let a_value: String = a
        .conn()
        .query_row("SELECT a FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(a_value, "from b", "equal versions: the larger value wins");
}

#[test]
fn delete_then_reinsert_converges_in_any_order() {
    let mut a = replica();
    let mut b = replica();
    let mut c = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'one')", []);
    let created = a.batch_since(&Coverage::default()).unwrap();
    exec(&mut a, "DELETE FROM items WHERE id = 1", []);
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'again')", []);
    let all = a.batch_since(&Coverage::default()).unwrap();
    // b gets the creation first, then everything; c gets everything in reverse group order.
    b.apply(&created).unwrap();
    b.apply(&all).unwrap();
    let mut reversed = all.changes.clone();
    reversed.reverse();
    reversed.sort_by_key(|ch| std::cmp::Reverse(ch.db_version));
    c.apply(&Batch {
        changes: reversed,
        covers: all.covers.clone(),
        sender_clock: all.sender_clock,
    })
    .unwrap();
    for r in [&b, &c] {
        assert_eq!(data(r), data(&a));
        assert_eq!(clocks(r), clocks(&a));
    }
    let cl: i64 = a
        .conn()
        .query_row(
            "SELECT col_version FROM items__fazt_clock WHERE cid = -1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(cl, 3, "created, deleted, created again");
}

#[test]
fn primary_key_updates_converge() {
    let mut a = replica();
    let mut b = replica();
    exec(
        &mut a,
        "INSERT INTO items (id, a, b) VALUES (1, 'moving', 3)",
        [],
    );
    sync(&a, &mut b);
    exec(&mut a, "UPDATE items SET id = 2 WHERE id = 1", []);
    exec(&mut b, "UPDATE items SET b = 4 WHERE id = 1", []);
    sync(&a, &mut b);
    sync(&b, &mut a);
    assert_eq!(data(&a), data(&b));
    assert_eq!(clocks(&a), clocks(&b));
    let ids: Vec<i64> = a
        .conn()
        .prepare("SELECT id FROM items")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(
        ids,
        [2],
        "the move deleted row 1; b's concurrent update of row 1 lost to the delete"
    );
}

#[test]
fn changes_relay_through_a_third_replica() {
    let mut a = replica();
    let mut b = replica();
    let mut c = replica();
    exec(
        &mut a,
        "INSERT INTO pairs (x, y, v) VALUES ('k', 1, x'00ff')",
        [],
    );
    sync(&a, &mut b);
    sync(&b, &mut c);
    assert_eq!(data(&c), data(&a));
    assert_eq!(clocks(&c), clocks(&a));
    // c now covers a's versions, so a has nothing more to send it.
    let batch = a.batch_since(&c.coverage().unwrap()).unwrap();
    assert!(batch.changes.is_empty());
}

#[test]
fn writes_outside_the_engine_are_refused() {
    let a = replica();
    let err = a
        .conn()
        .execute("INSERT INTO items (id) VALUES (1)", [])
        .unwrap_err();
    assert!(err.to_string().contains("replication engine"), "{err}");
    let count: i64 = a
        .conn()
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(count, 0);
}

#[test]
fn registering_records_rows_that_already_exist() {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(common::SCHEMA).unwrap();
    conn.execute_batch("INSERT INTO items (id, a) VALUES (1, 'old'), (2, 'older')")
        .unwrap();
    let mut a = Replica::open(conn).unwrap();
    a.replicate("items").unwrap();
    a.replicate("pairs").unwrap();
    let mut b = replica();
    sync(&a, &mut b);
    assert_eq!(data(&b), data(&a));
    assert_eq!(clocks(&b), clocks(&a));
}

#[test]
fn tables_that_break_the_rules_are_refused() {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch("CREATE TABLE bad (id TEXT PRIMARY KEY NOT NULL, email TEXT UNIQUE)")
        .unwrap();
    let mut a = Replica::open(conn).unwrap();
    let err = a.replicate("bad").unwrap_err().to_string();
    assert!(err.contains("unique index"), "{err}");
    assert!(a.tables().is_empty());
}

#[test]
fn a_user_table_named_like_an_engine_table_cannot_be_registered() {
    let mut a = replica();
    a.conn()
        .execute_batch(
            "CREATE TABLE notes (id TEXT PRIMARY KEY NOT NULL, body TEXT);
             CREATE TABLE notes__fazt_clock (key INTEGER PRIMARY KEY NOT NULL, note TEXT);
             CREATE TABLE my__fazt_things (id TEXT PRIMARY KEY NOT NULL, v TEXT);
             CREATE TABLE fazt_sync_extra (id TEXT PRIMARY KEY NOT NULL, v TEXT);",
        )
        .unwrap();
    let schema = |r: &Replica| -> Vec<String> {
        r.conn()
            .prepare("SELECT type || ' ' || name FROM sqlite_master ORDER BY name")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let before = (data(&a), clocks(&a), a.tables(), schema(&a));
    for (table, reason) in [
        (
            "fazt_sync_pending",
            "fazt_sync_pending is one of the replication engine's own tables",
        ),
        (
            "FAZT_SYNC_COVERAGE",
            "FAZT_SYNC_COVERAGE is one of the replication engine's own tables",
        ),
        (
            "fazt_sync_extra",
            "fazt_sync_extra is one of the replication engine's own tables",
        ),
        (
            "items__fazt_clock",
            "items__fazt_clock is one of the replication engine's own tables",
        ),
        (
            "pairs__fazt_pks",
            "pairs__fazt_pks is one of the replication engine's own tables",
        ),
        (
            "my__fazt_things",
            "my__fazt_things is one of the replication engine's own tables",
        ),
        (
            "notes",
            "table notes: notes__fazt_clock already exists, but the engine keeps notes's replication bookkeeping under that name",
        ),
    ] {
        let err = a.replicate(table).unwrap_err().to_string();
        assert!(err.starts_with(reason), "{table}: {err}");
    }
    assert_eq!((data(&a), clocks(&a), a.tables(), schema(&a)), before);
    // Registered tables can still be refreshed (their bookkeeping is theirs).
    a.replicate("items").unwrap();
    // Once the squatter is gone, the table registers.
    a.conn()
        .execute_batch("DROP TABLE notes__fazt_clock")
        .unwrap();
    a.replicate("notes").unwrap();
}

#[test]
fn changes_for_a_missing_table_wait_until_it_exists() {
    let mut a = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'early')", []);
    let conn = Connection::open_in_memory().unwrap();
    let mut b = Replica::open(conn).unwrap();
    let batch = a.batch_since(&b.coverage().unwrap()).unwrap();
    let report = b.apply(&batch).unwrap();
    assert_eq!(report.pending, batch.changes.len());
    assert!(
        !b.coverage().unwrap().contains(&a.site_id(), DbVersion(1)),
        "pending versions are not covered"
    );
    // The same changes again are kept once.
    b.apply(&batch).unwrap();
    b.conn().execute_batch(common::SCHEMA).unwrap();
    b.replicate("pairs").unwrap();
    b.replicate("items").unwrap();
    assert_eq!(data(&b), data(&a));
    assert_eq!(clocks(&b), clocks(&a));
    assert!(b.coverage().unwrap().contains(&a.site_id(), DbVersion(1)));
    let left: i64 = b
        .conn()
        .query_row("SELECT count(*) FROM fazt_sync_pending", [], |r| r.get(0))
        .unwrap();
    assert_eq!(left, 0);
}

#[test]
fn changes_for_a_missing_column_wait_until_it_exists() {
    let mut a = replica();
    a.conn()
        .execute_batch("ALTER TABLE items ADD COLUMN extra TEXT")
        .unwrap();
    a.replicate("items").unwrap();
    exec(
        &mut a,
        "INSERT INTO items (id, extra) VALUES (1, 'new column')",
        [],
    );
    let mut b = replica();
    let report = b
        .apply(&a.batch_since(&b.coverage().unwrap()).unwrap())
        .unwrap();
    assert!(report.pending > 0);
    let rows: i64 = b
        .conn()
        .query_row("SELECT count(*) FROM items", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0, "no half transaction is visible");
    b.conn()
        .execute_batch("ALTER TABLE items ADD COLUMN extra TEXT")
        .unwrap();
    b.replicate("items").unwrap();
    let extra: String = b
        .conn()
        .query_row("SELECT extra FROM items WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(extra, "new column");
}

#[test]
fn a_malformed_batch_changes_nothing() {
    let mut a = replica();
    let mut b = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    exec(&mut a, "INSERT INTO items (id, a) VALUES (2, 'y')", []);
    let mut batch = a.batch_since(&Coverage::default()).unwrap();
    let last = batch.changes.len() - 1;
    batch.changes[last].pk = vec![0x01, 0x19];
    assert!(b.apply(&batch).is_err());
    assert!(data(&b).is_empty());
    assert!(b.coverage().unwrap().get(&a.site_id()).is_none());
}

#[test]
fn grouped_export_hands_out_whole_transactions_with_exact_coverage() {
    let mut a = replica();
    for i in 0..20 {
        // Transactions of 3 changes each (three columns of a new row)...
        exec(
            &mut a,
            "INSERT INTO items (id, a, b) VALUES (?1, 'x', ?1)",
            [i],
        );
    }
    // ...and one whose only change is later superseded, leaving an empty version.
    exec(&mut a, "UPDATE items SET a = 'old' WHERE id = 1", []);
    exec(&mut a, "UPDATE items SET a = 'new' WHERE id = 1", []);

    let mut groups: Vec<fazt_sync::Batch> = vec![fazt_sync::Batch::default()];
    let mut b = replica();
    let need = a
        .export_groups(&b.coverage().unwrap(), 7, |e| {
            match e {
                fazt_sync::Exported::Change(c) => groups.last_mut().unwrap().changes.push(c),
                fazt_sync::Exported::Group(covers) => {
                    groups.last_mut().unwrap().covers = covers;
                    groups.push(fazt_sync::Batch::default());
                }
            }
            Ok::<(), fazt_sync::Error>(())
        })
        .unwrap();
    assert!(groups.pop().unwrap().changes.is_empty());
    assert!(
        groups.len() > 3,
        "7-change groups from 20 three-change transactions"
    );

    let mut covered = fazt_sync::Coverage::default();
    for (i, g) in groups.iter().enumerate() {
        // A group never splits a transaction: it starts where the previous one ended.
        let versions: std::collections::BTreeSet<DbVersion> =
            g.changes.iter().map(|c| c.db_version).collect();
        for v in &versions {
            assert!(
                g.covers.contains(&a.site_id(), *v),
                "group {i} covers its own versions"
            );
            assert!(
                !covered.contains(&a.site_id(), *v),
                "version {v} appears in two groups"
            );
        }
        covered.union(&g.covers);
        b.apply(g).unwrap();
        // After each group, b holds exactly the versions handed out so far.
        assert_eq!(
            b.coverage().unwrap().get(&a.site_id()),
            covered.get(&a.site_id())
        );
    }
    assert_eq!(covered, need);
    assert_eq!(data(&a), data(&b));
    assert_eq!(clocks(&a), clocks(&b));
}

#[test]
fn connections_to_one_file_see_each_others_origins_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.db");
    let open = || {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .unwrap();
        fazt_sync::Replica::open(conn).unwrap()
    };
    let mut first = open();
    first.conn().execute_batch(common::SCHEMA).unwrap();
    first.replicate("items").unwrap();
    // A second connection opened before `pairs` is registered and before any origin arrives.
    let mut second = open();
    first.replicate("pairs").unwrap();

    let mut x = replica();
    let mut y = replica();
    exec(&mut x, "INSERT INTO items (id, a) VALUES (1, 'from x')", []);
    exec(
        &mut y,
        "INSERT INTO pairs (x, y, v) VALUES ('k', 1, 'from y')",
        [],
    );
    // Each connection registers a different new origin: no ordinal clash.
    first
        .apply(&x.batch_since(&first.coverage().unwrap()).unwrap())
        .unwrap();
    let report = second
        .apply(&y.batch_since(&second.coverage().unwrap()).unwrap())
        .unwrap();
    assert_eq!(
        report.pending, 0,
        "the table registered by the other connection is used, not parked"
    );

    // Either connection exports what the other merged.
    second.refresh().unwrap();
    let mut z = replica();
    z.apply(&second.batch_since(&z.coverage().unwrap()).unwrap())
        .unwrap();
    assert_eq!(data(&z), data(&first));
    assert_eq!(first.coverage().unwrap(), second.coverage().unwrap());
}

/// Local writes do not store the db_version: it is read back from the replica's own clock
/// rows. A merged change that replaces the clock row of the newest local version must not
/// let that version number be handed out again.
#[test]
fn a_version_is_never_reused_after_a_merge_replaces_the_newest_local_clock() {
    let mut a = replica();
    let mut b = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'start')", []); // a: v1
    sync(&a, &mut b);
    exec(&mut a, "UPDATE items SET a = 'a1' WHERE id = 1", []); // a: v2
    exec(&mut a, "UPDATE items SET a = 'a2' WHERE id = 1", []); // a: v3, col_version 3
    assert_eq!(a.db_version().unwrap(), DbVersion(3));
    // b changes the same cell three times in one transaction: col_version 4 at b's v2.
    b.write(|tx| {
        for v in ["b1", "b2", "b3"] {
            tx.execute("UPDATE items SET a = ?1 WHERE id = 1", [v])?;
        }
        Ok::<_, rusqlite::Error>(())
    })
    .unwrap();
    assert_eq!(b.db_version().unwrap(), DbVersion(2));
    sync(&b, &mut a);
    assert_eq!(data(&a), data(&b), "b's cell wins on col_version");
    // a's clock rows now hold no version above 1, yet a made 3.
    let own_max: i64 = a
        .conn()
        .query_row(
            "SELECT max(db_version) FROM items__fazt_clock WHERE site_ord = 0",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(own_max, 1);
    assert_eq!(a.db_version().unwrap(), DbVersion(3));
    exec(&mut a, "INSERT INTO items (id, a) VALUES (2, 'next')", []);
    assert_eq!(a.db_version().unwrap(), DbVersion(4));
    let mine = a.batch_since(&Coverage::default()).unwrap();
    let versions: Vec<DbVersion> = mine
        .changes
        .iter()
        .filter(|c| c.site_id == a.site_id())
        .map(|c| c.db_version)
        .collect();
    assert!(versions.contains(&DbVersion(4)), "{versions:?}");
    sync(&a, &mut b);
    assert_eq!(data(&a), data(&b));
    assert_eq!(clocks(&a), clocks(&b));
}

/// Two connections to one file (a server and a `fazt sql`) take turns: each write is
/// numbered after the other connection's, also when the other registered a new table.
#[test]
fn connections_to_one_file_number_their_writes_after_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.db");
    let open = || {
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            common::SCHEMA
                .replace("CREATE TABLE", "CREATE TABLE IF NOT EXISTS")
                .as_str(),
        )
        .unwrap();
        Replica::open(conn).unwrap()
    };
    let mut one = open();
    one.replicate("items").unwrap();
    let mut two = open();
    let start = one.db_version().unwrap().0;
    for i in 0..3 {
        exec(
            &mut one,
            "INSERT INTO items (id, a) VALUES (?1, 'one')",
            [i * 2],
        );
        exec(
            &mut two,
            "INSERT INTO items (id, a) VALUES (?1, 'two')",
            [i * 2 + 1],
        );
    }
    assert_eq!(one.db_version().unwrap().0, start + 6);
    assert_eq!(two.db_version().unwrap().0, start + 6);
    // `two` registers a table and writes to it; `one` has never loaded it.
    two.replicate("pairs").unwrap();
    exec(
        &mut two,
        "INSERT INTO pairs (x, y, v) VALUES ('p', 1, 'two')",
        [],
    );
    let after_two = two.db_version().unwrap().0;
    assert!(after_two > start + 6);
    exec(
        &mut one,
        "INSERT INTO items (id, a) VALUES (100, 'one')",
        [],
    );
    assert_eq!(one.db_version().unwrap().0, after_two + 1);
    // Eight writes, eight versions (the three columns of an insert share theirs).
    one.refresh().unwrap();
    let all = one.batch_since(&Coverage::default()).unwrap();
    let mut versions: Vec<DbVersion> = all.changes.iter().map(|c| c.db_version).collect();
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 8, "{versions:?}");
    drop((one, two));
    assert_eq!(
        open().db_version().unwrap().0,
        after_two + 1,
        "derived again after reopening"
    );
}

/// Only registered tables' clocks are read for the db_version: a user table whose name
/// merely looks like a clock table changes nothing.
#[test]
fn a_table_named_like_a_clock_does_not_disturb_writes() {
    let mut a = replica();
    let mut b = replica();
    a.conn()
        .execute_batch("CREATE TABLE notes__fazt_clock (body TEXT)")
        .unwrap();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    exec(&mut b, "INSERT INTO items (id, a) VALUES (2, 'y')", []);
    // A merge makes the next write derive the number again from the file.
    sync(&b, &mut a);
    exec(&mut a, "INSERT INTO items (id, a) VALUES (3, 'z')", []);
    assert_eq!(a.db_version().unwrap(), DbVersion(2));
}

/// Records how many `items` rows there are before and after each merge; fails after the
/// merge when `fail` is set.
struct CountingHook {
    fail: bool,
}

impl fazt_sync::MergeHook for CountingHook {
    fn before(&self, conn: &Connection, changes: &[fazt_sync::Change]) -> rusqlite::Result<()> {
        conn.execute(
            "INSERT INTO seen (phase, items, changes) SELECT 'before', count(*), ?1 FROM items",
            [changes.len() as i64],
        )?;
        Ok(())
    }

    fn after(&self, conn: &Connection) -> rusqlite::Result<()> {
        conn.execute(
            "INSERT INTO seen (phase, items, changes) SELECT 'after', count(*), 0 FROM items",
            [],
        )?;
        if self.fail {
            return Err(rusqlite::Error::InvalidQuery);
        }
        Ok(())
    }
}

fn seen(r: &Replica) -> Vec<(String, i64, i64)> {
    r.conn()
        .prepare("SELECT phase, items, changes FROM seen ORDER BY rowid")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[test]
fn a_merge_hook_sees_the_rows_before_and_after_and_its_error_undoes_the_merge() {
    let mut a = replica();
    let mut b = replica();
    b.conn()
        .execute_batch("CREATE TABLE seen (phase TEXT, items INTEGER, changes INTEGER)")
        .unwrap();
    b.set_merge_hook(std::sync::Arc::new(CountingHook { fail: false }));
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'one')", []);
    let changes = sync(&a, &mut b).changes.len() as i64;
    assert_eq!(
        seen(&b),
        [
            ("before".to_string(), 0, changes),
            ("after".to_string(), 1, 0)
        ]
    );

    b.set_merge_hook(std::sync::Arc::new(CountingHook { fail: true }));
    exec(&mut a, "INSERT INTO items (id, a) VALUES (2, 'two')", []);
    let (data_before, clocks_before, seen_before) = (data(&b), clocks(&b), seen(&b));
    let cover_before = b.coverage().unwrap();
    let batch = a.batch_since(&b.coverage().unwrap()).unwrap();
    assert!(b.apply(&batch).is_err());
    assert_eq!(data(&b), data_before);
    assert_eq!(clocks(&b), clocks_before);
    assert_eq!(
        seen(&b),
        seen_before,
        "the hook's own writes are undone too"
    );
    assert_eq!(b.coverage().unwrap(), cover_before);
}

/// A replica with `items` replicated but not `pairs` (as an older schema would be).
fn replica_without_pairs() -> Replica {
    let conn = Connection::open_in_memory().unwrap();
    conn.execute_batch(common::SCHEMA).unwrap();
    let mut r = Replica::open(conn).unwrap();
    r.replicate("items").unwrap();
    r
}

/// Merges `batch` in parts of `size` changes through one [`fazt_sync::Merge`].
fn merge_in_parts(r: &mut Replica, batch: &Batch, size: usize) -> fazt_sync::ApplyReport {
    let mut merge = r.begin_merge().unwrap();
    for part in batch.changes.chunks(size) {
        merge.part(part).unwrap();
    }
    merge.commit(&batch.covers, batch.sender_clock).unwrap()
}

#[test]
fn a_transaction_merged_in_parts_ends_as_if_merged_whole() {
    let mut a = replica();
    a.write(|tx| {
        for i in 0..40 {
            tx.execute("INSERT INTO items (id, a, b) VALUES (?1, 'x', ?1)", [i])?;
            tx.execute("INSERT INTO pairs (x, y, v) VALUES ('p', ?1, ?1)", [i])?;
        }
        Ok::<_, rusqlite::Error>(())
    })
    .unwrap();
    exec(&mut a, "UPDATE items SET a = 'y' WHERE id < 10", []);
    exec(&mut a, "DELETE FROM pairs WHERE y >= 30", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    assert!(batch.changes.len() > 100);
    let mut whole = replica();
    let want = whole.apply(&batch).unwrap();
    assert_eq!(want.transactions, 3);
    for size in [1, 7, 64, 1000] {
        let mut b = replica();
        let report = merge_in_parts(&mut b, &batch, size);
        assert_eq!(report, want, "parts of {size}");
        assert_eq!(data(&b), data(&whole), "parts of {size}");
        assert_eq!(clocks(&b), clocks(&whole), "parts of {size}");
        let site = a.site_id();
        assert_eq!(
            b.coverage().unwrap().get(&site),
            whole.coverage().unwrap().get(&site)
        );
        assert_eq!(b.db_version().unwrap(), whole.db_version().unwrap());
        // And again: everything is held.
        let again = merge_in_parts(&mut b, &batch, size);
        assert_eq!(again.already_seen, batch.changes.len());
    }
}

#[test]
fn a_transaction_whose_later_part_names_a_missing_table_is_undone_and_left_uncovered() {
    let mut a = replica();
    // One transaction: items first, then a table the receiver lacks.
    a.write(|tx| {
        for i in 0..5 {
            tx.execute("INSERT INTO items (id, a) VALUES (?1, 'x')", [i])?;
        }
        tx.execute("INSERT INTO pairs (x, y) VALUES ('p', 1)", [])?;
        Ok::<_, rusqlite::Error>(())
    })
    .unwrap();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (9, 'later')", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    let first = batch
        .changes
        .iter()
        .filter(|c| c.db_version == DbVersion(1))
        .count();
    assert!(batch.changes[..first - 2]
        .iter()
        .all(|c| c.table == "items"));

    let mut b = replica_without_pairs();
    let report = merge_in_parts(&mut b, &batch, 2);
    assert_eq!(
        report.pending_full, first,
        "the whole first transaction is not kept"
    );
    let later = batch.changes.len() - first;
    assert_eq!(
        (report.applied, report.pending, report.transactions),
        (later, 0, 1)
    );
    // Nothing of it stayed; the later transaction merged; only its version is covered.
    let ids: Vec<i64> = b
        .conn()
        .prepare("SELECT id FROM items")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(ids, vec![9]);
    assert_eq!(b.pending_usage().unwrap(), (0, 0));
    let covered = b.coverage().unwrap();
    let set = covered.get(&a.site_id()).unwrap();
    assert!(
        !set.contains(DbVersion(1)) && set.contains(DbVersion(2)),
        "{set:?}"
    );

    // Merged whole, the same transaction is parked instead, and applies once the table exists.
    let mut c = replica_without_pairs();
    let report = c.apply(&batch).unwrap();
    assert_eq!(report.pending, first);
    c.replicate("pairs").unwrap();
    b.replicate("pairs").unwrap();
    sync(&a, &mut b);
    assert_eq!(data(&b), data(&a));
    assert_eq!(data(&c), data(&a));
}

#[test]
fn a_parked_transaction_spanning_parts_past_the_pending_cap_is_undone() {
    let mut a = replica();
    a.write(|tx| {
        for i in 0..6 {
            tx.execute("INSERT INTO pairs (x, y, v) VALUES ('p', ?1, 1)", [i])?;
        }
        Ok::<_, rusqlite::Error>(())
    })
    .unwrap();
    exec(&mut a, "INSERT INTO pairs (x, y) VALUES ('q', 1)", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    let first = batch
        .changes
        .iter()
        .filter(|c| c.db_version == DbVersion(1))
        .count();
    let second = batch.changes.len() - first;
    assert!(first > 4 && second <= 4, "{first} {second}");

    let mut b = replica_without_pairs();
    b.set_pending_caps(4, 1 << 20);
    let report = merge_in_parts(&mut b, &batch, 3);
    assert_eq!((report.pending_full, report.pending), (first, second));
    // The first transaction's kept part was undone, so the second one fits.
    assert_eq!(b.pending_usage().unwrap().0, second as i64);
    assert!(b.coverage().unwrap().get(&a.site_id()).is_none());
}

#[test]
fn a_merge_dropped_before_commit_changes_nothing() {
    let mut a = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    let mut b = replica();
    exec(&mut b, "INSERT INTO items (id, a) VALUES (2, 'mine')", []);
    let before = (
        data(&b),
        clocks(&b),
        b.coverage().unwrap(),
        b.db_version().unwrap(),
    );
    {
        let mut merge = b.begin_merge().unwrap();
        merge.part(&batch.changes).unwrap();
    }
    assert_eq!(
        (
            data(&b),
            clocks(&b),
            b.coverage().unwrap(),
            b.db_version().unwrap()
        ),
        before
    );
    // The replica is usable afterwards.
    exec(&mut b, "INSERT INTO items (id, a) VALUES (3, 'more')", []);
    sync(&a, &mut b);
    assert_eq!(data(&b).len(), 3);
}

/// SQLite's `IS` holds 0 and 0.0, and 0.0 and -0.0, equal; a write from one to the other
/// still changes the value, and must replicate, or the writer differs from everyone else
/// for as long as nobody writes that cell again.
#[test]
fn an_update_that_changes_only_a_values_type_or_a_zeros_sign_replicates() {
    // `v` has no type: SQLite keeps every value as given, -0.0 and 0 and 0.0 apart.
    let open = || {
        let mut r = replica();
        r.conn()
            .execute_batch("CREATE TABLE raw (k INTEGER PRIMARY KEY NOT NULL, v)")
            .unwrap();
        r.replicate("raw").unwrap();
        r
    };
    let (mut a, mut b) = (open(), open());
    let value = |r: &Replica| -> String {
        r.conn()
            .query_row("SELECT v FROM raw WHERE k = 1", [], |row| {
                Ok(format!("{:?}", row.get_ref(0)?))
            })
            .unwrap()
    };
    exec(&mut a, "INSERT INTO raw (k, v) VALUES (1, 0.0)", []);
    sync(&a, &mut b);
    assert_eq!(value(&b), "Real(0.0)");
    for (v, want) in [
        (fazt_sync::Value::Integer(0), "Integer(0)"),
        (fazt_sync::Value::Real(-0.0), "Real(-0.0)"),
        (fazt_sync::Value::Real(0.0), "Real(0.0)"),
    ] {
        exec(&mut a, "UPDATE raw SET v = ?1 WHERE k = 1", [&v]);
        let batch = sync(&a, &mut b);
        assert_eq!(
            batch.changes.len(),
            1,
            "the write to {want} was not captured"
        );
        assert_eq!((value(&a), value(&b)), (want.to_string(), want.to_string()));
    }
    exec(&mut a, "UPDATE raw SET v = 0.0 WHERE k = 1", []);
    assert!(
        sync(&a, &mut b).changes.is_empty(),
        "writing the very same value again is no change"
    );
}

#[test]
fn triggers_written_by_an_older_engine_are_rebuilt_at_open() {
    let mut a = replica();
    let mut b = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    sync(&a, &mut b);
    // As an older engine left it: an update trigger that captures nothing, and no stamp.
    let conn = a.into_inner();
    conn.execute_batch(
        "DROP TRIGGER items__fazt_upd;
         CREATE TRIGGER items__fazt_upd AFTER UPDATE ON items BEGIN SELECT 1; END;
         DELETE FROM fazt_sync_state WHERE key = 'triggers';",
    )
    .unwrap();
    let mut a = Replica::open(conn).unwrap();
    exec(&mut a, "UPDATE items SET a = 'y' WHERE id = 1", []);
    sync(&a, &mut b);
    assert_eq!(data(&b), data(&a), "the update was captured and reached b");
    assert_eq!(clocks(&b), clocks(&a));
}

#[test]
fn the_fingerprint_moves_with_a_local_write_and_not_with_a_node_local_one() {
    let mut r = replica();
    r.conn()
        .execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        .unwrap();
    let before = r.fingerprint().unwrap();
    assert_eq!(Fingerprint::read(r.conn()).unwrap(), before);
    // Commits to a table that does not replicate, and a write that captured nothing.
    for i in 0..3 {
        r.conn()
            .execute("INSERT INTO notes (body) VALUES (?1)", [format!("n{i}")])
            .unwrap();
    }
    exec(&mut r, "UPDATE items SET a = 'x' WHERE id = 42", []);
    assert_eq!(r.fingerprint().unwrap(), before);
    exec(&mut r, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    let after = r.fingerprint().unwrap();
    assert_ne!(after, before);
    assert_eq!(Fingerprint::read(r.conn()).unwrap(), after);
    // Registering a table backfills its rows: there is more to export.
    r.conn()
        .execute_batch("CREATE TABLE later (id INTEGER PRIMARY KEY NOT NULL, v TEXT); INSERT INTO later VALUES (1, 'old')")
        .unwrap();
    let unregistered = r.fingerprint().unwrap();
    r.replicate("later").unwrap();
    assert_ne!(r.fingerprint().unwrap(), unregistered);
}

#[test]
fn a_merge_moves_the_fingerprint_even_when_the_clock_does_not() {
    let mut a = replica();
    let mut b = replica();
    let mut c = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'from a')", []);
    for i in 10..13 {
        exec(
            &mut b,
            "INSERT INTO items (id, a) VALUES (?1, 'from b')",
            [i],
        );
        exec(
            &mut c,
            "INSERT INTO items (id, a) VALUES (?1, 'from c')",
            [i],
        );
    }
    // `a`'s version 1 is below `b`'s clock: merging it moves only what `b` covers.
    let before = b.fingerprint().unwrap();
    let clock = b.db_version().unwrap();
    sync(&a, &mut b);
    assert_eq!(b.db_version().unwrap(), clock);
    let merged = b.fingerprint().unwrap();
    assert_ne!(merged, before, "a merge of another origin's version");
    // Nothing new: the fingerprint stays.
    sync(&a, &mut b);
    assert_eq!(b.fingerprint().unwrap(), merged);
    // Relayed: `c` learns `a`'s write from `b`, and `b`'s own writes, none of them above
    // `c`'s clock.
    let before = c.fingerprint().unwrap();
    let clock = c.db_version().unwrap();
    sync(&b, &mut c);
    assert_eq!(c.db_version().unwrap(), clock);
    assert_ne!(c.fingerprint().unwrap(), before, "a relayed merge");
}

/// Every group `from` would export to a holder of `have`, as batches.
fn groups_for(from: &Replica, have: &Coverage) -> Vec<Batch> {
    let mut groups = vec![Batch::default()];
    from.export_groups(have, 1, |e| {
        match e {
            fazt_sync::Exported::Change(c) => groups.last_mut().unwrap().changes.push(c),
            fazt_sync::Exported::Group(covers) => {
                groups.last_mut().unwrap().covers = covers;
                groups.push(Batch::default());
            }
        }
        Ok::<(), fazt_sync::Error>(())
    })
    .unwrap();
    assert!(groups.pop().unwrap().changes.is_empty());
    groups
}

/// A merge moves the clock past versions this replica never wrote: they are not its own
/// coverage (no peer needs them), and the next local write's group covers them.
#[test]
fn merging_an_origin_far_ahead_leaves_own_coverage_to_own_writes() {
    let mut far = replica();
    for i in 0..50 {
        exec(
            &mut far,
            "INSERT INTO items (id, a) VALUES (?1, 'far')",
            [i],
        );
    }
    let mut b = replica();
    exec(&mut b, "INSERT INTO items (id, a) VALUES (100, 'b')", []); // b: v1
    let mut peer = replica();
    sync(&b, &mut peer);
    sync(&far, &mut peer);
    let own_before = b.coverage().unwrap().get(&b.site_id()).cloned();

    sync(&far, &mut b);
    assert_eq!(
        b.db_version().unwrap(),
        DbVersion(50),
        "the clock follows the merge"
    );
    assert_eq!(
        b.coverage().unwrap().get(&b.site_id()).cloned(),
        own_before,
        "own coverage stays at the own write"
    );
    assert_eq!(b.coverage().unwrap(), peer.coverage().unwrap());
    assert!(
        groups_for(&b, &peer.coverage().unwrap()).is_empty(),
        "nothing to send to a peer that holds what b holds"
    );

    // The next local write is numbered after the clock; its group covers the skipped
    // versions with it, and the peer then holds all of it.
    exec(&mut b, "INSERT INTO items (id, a) VALUES (101, 'b')", []);
    assert_eq!(b.db_version().unwrap(), DbVersion(51));
    let groups = groups_for(&b, &peer.coverage().unwrap());
    assert_eq!(groups.len(), 1);
    let mut gap = Coverage::default();
    gap.insert(b.site_id(), DbVersion(2), DbVersion(51));
    assert_eq!(groups[0].covers, gap);
    assert!(groups[0]
        .changes
        .iter()
        .all(|c| c.db_version == DbVersion(51)));
    let report = peer.apply(&groups[0]).unwrap();
    assert_eq!(report.transactions, 1);
    assert_eq!(peer.coverage().unwrap(), b.coverage().unwrap());
    assert_eq!(data(&peer), data(&b));
}

/// A file with the engine's tables and a second connection to it, as a node has.
fn file_replica(dir: &tempfile::TempDir) -> (Replica, Connection) {
    let path = dir.path().join("node.db");
    let conn = Connection::open(&path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.execute_batch(common::SCHEMA).unwrap();
    let mut r = Replica::open(conn).unwrap();
    r.replicate("items").unwrap();
    r.replicate("pairs").unwrap();
    (r, Connection::open(&path).unwrap())
}

fn data_version(conn: &Connection) -> i64 {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn applying_a_batch_again_writes_nothing() {
    let mut a = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'one')", []);
    exec(&mut a, "UPDATE items SET b = 2 WHERE id = 1", []);
    let dir = tempfile::tempdir().unwrap();
    let (mut b, other) = file_replica(&dir);
    exec(&mut b, "INSERT INTO items (id, a) VALUES (2, 'b')", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();

    let seen = data_version(&other);
    let first = b.apply(&batch).unwrap();
    assert!(first.written && first.transactions == 2, "{first:?}");
    let seen_after_first = data_version(&other);
    assert_ne!(seen_after_first, seen, "the first merge committed");
    let fingerprint = b.fingerprint().unwrap();

    let again = b.apply(&batch).unwrap();
    assert_eq!(
        data_version(&other),
        seen_after_first,
        "nothing was committed: other connections see no change"
    );
    assert!(!again.written, "{again:?}");
    assert_eq!(again.transactions, 0);
    assert_eq!(again.already_seen, batch.changes.len());
    assert_eq!(b.fingerprint().unwrap(), fingerprint);
    assert_eq!(Fingerprint::read(&other).unwrap(), fingerprint);
    // The replica goes on as before.
    exec(&mut b, "INSERT INTO items (id, a) VALUES (3, 'b')", []);
    assert_eq!(b.db_version().unwrap(), DbVersion(3));
}

/// A batch whose changes are all held but which covers versions the receiver lacks (whose
/// changes were superseded) records the covers.
#[test]
fn held_changes_with_new_covers_record_the_covers() {
    let mut a = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []); // v1
    exec(&mut a, "UPDATE items SET a = 'y' WHERE id = 1", []); // v2: superseded by v3
    exec(&mut a, "UPDATE items SET a = 'z' WHERE id = 1", []); // v3
    let full = a.batch_since(&Coverage::default()).unwrap();
    let site = a.site_id();
    let mut partial = full.clone();
    partial.covers = Coverage::default();
    partial.covers.insert(site, DbVersion(1), DbVersion(1));
    partial.covers.insert(site, DbVersion(3), DbVersion(3));
    let dir = tempfile::tempdir().unwrap();
    let (mut b, other) = file_replica(&dir);
    b.apply(&partial).unwrap();
    assert!(!b.coverage().unwrap().contains(&site, DbVersion(2)));
    let (seen, fingerprint) = (data_version(&other), b.fingerprint().unwrap());

    let report = b.apply(&full).unwrap();
    assert!(report.written && report.transactions == 0, "{report:?}");
    assert_eq!(
        b.coverage().unwrap().get(&site),
        a.coverage().unwrap().get(&site)
    );
    assert_ne!(data_version(&other), seen);
    assert_ne!(b.fingerprint().unwrap(), fingerprint, "more to export");
}

/// Transactions already held are skipped: the merge hook is not shown them, so it keeps
/// nothing for them (and a merge of held changes writes nothing on its account).
#[test]
fn a_merge_hook_is_not_shown_changes_already_held() {
    let mut a = replica();
    let mut b = replica();
    b.conn()
        .execute_batch("CREATE TABLE seen (phase TEXT, items INTEGER, changes INTEGER)")
        .unwrap();
    b.set_merge_hook(std::sync::Arc::new(CountingHook { fail: false }));
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'one')", []);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    b.apply(&batch).unwrap();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (2, 'two')", []);
    let both = a.batch_since(&Coverage::default()).unwrap();
    b.apply(&both).unwrap();
    let new = (both.changes.len() - batch.changes.len()) as i64;
    assert_eq!(
        seen(&b)[2..],
        [("before".to_string(), 1, new), ("after".to_string(), 2, 0)]
    );
}

/// A database written by an engine that did not store its own version covers its own
/// origin up to its clock (as that engine did); opened again, that is where its own coverage
/// stays until its next local write.
#[test]
fn a_database_without_own_version_keeps_covering_up_to_its_clock() {
    let mut far = replica();
    for i in 0..5 {
        exec(
            &mut far,
            "INSERT INTO items (id, a) VALUES (?1, 'far')",
            [i],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut b, other) = file_replica(&dir);
    exec(&mut b, "INSERT INTO items (id, a) VALUES (100, 'b')", []);
    sync(&far, &mut b);
    other
        .execute("DELETE FROM fazt_sync_state WHERE key = 'own_version'", [])
        .unwrap();
    let own_of = |r: &Replica| r.coverage().unwrap().get(&r.site_id()).cloned().unwrap();
    let upto = |n| fazt_sync::RangeSet::from_ranges([(DbVersion(1), DbVersion(n))]);
    assert_eq!(own_of(&b), upto(5));
    let fingerprint = b.fingerprint().unwrap();
    assert_eq!(Fingerprint::read(&other).unwrap(), fingerprint);

    // Opened again (as after an upgrade): the clock is kept as its own version, and a merge
    // that moves the clock further does not move it.
    drop(b);
    let mut b = Replica::open(Connection::open(dir.path().join("node.db")).unwrap()).unwrap();
    assert_eq!(own_of(&b), upto(5));
    for i in 5..10 {
        exec(
            &mut far,
            "INSERT INTO items (id, a) VALUES (?1, 'far')",
            [i],
        );
    }
    sync(&far, &mut b);
    assert_eq!(b.db_version().unwrap(), DbVersion(10));
    assert_eq!(own_of(&b), upto(5));

    exec(&mut b, "INSERT INTO items (id, a) VALUES (101, 'b')", []);
    assert_eq!(
        own_of(&b),
        upto(11),
        "the write covers the versions its clock skipped"
    );
    assert_ne!(b.fingerprint().unwrap(), fingerprint);
    assert_eq!(Fingerprint::read(&other).unwrap(), b.fingerprint().unwrap());
}

/// The fingerprint follows what can be exported, not the clock: a merge that moves the
/// clock moves it through the coverage it saves; a batch that brings nothing does not.
#[test]
fn the_fingerprint_moves_with_new_covers_and_not_with_held_changes() {
    let mut a = replica();
    for i in 0..5 {
        exec(&mut a, "INSERT INTO items (id, a) VALUES (?1, 'a')", [i]);
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut b, other) = file_replica(&dir);
    let batch = a.batch_since(&Coverage::default()).unwrap();
    let before = b.fingerprint().unwrap();
    b.apply(&batch).unwrap();
    let merged = b.fingerprint().unwrap();
    assert_ne!(merged, before);
    assert_eq!(Fingerprint::read(&other).unwrap(), merged);
    b.apply(&batch).unwrap();
    assert_eq!(b.fingerprint().unwrap(), merged);
    // Only a part of it, sent again with a clock far ahead: nothing new either.
    let mut again = common::partial(&batch, 0b10);
    again.sender_clock = DbVersion(1000);
    b.apply(&again).unwrap();
    assert_eq!(b.fingerprint().unwrap(), merged);
    assert_eq!(Fingerprint::read(&other).unwrap(), merged);
}
