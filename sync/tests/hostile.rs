//! Hostile batches (forged by a peer or carried in a bundle): numbers beyond the bound,
//! forged coverage, a flood of changes for tables this replica lacks.

mod common;

use common::{clocks, data, exec, replica, sync};
use fazt_sync::{Batch, CausalLength, ColVersion, Coverage, DbVersion, Replica, Seq, MAX_VERSION};
use rusqlite::Connection;

/// Everything a batch could have changed on a replica.
fn state(r: &Replica) -> (Vec<String>, Vec<String>, Coverage, DbVersion, (i64, i64)) {
    (
        data(r),
        clocks(r),
        r.coverage().unwrap(),
        r.db_version().unwrap(),
        r.pending_usage().unwrap(),
    )
}

#[test]
fn a_version_beyond_the_bound_is_refused_and_writing_goes_on() {
    let mut a = replica();
    let mut b = replica();
    exec(&mut b, "INSERT INTO items (id, a) VALUES (1, 'mine')", []);
    exec(&mut a, "INSERT INTO items (id, a) VALUES (2, 'theirs')", []);
    let good = a.batch_since(&Coverage::default()).unwrap();
    type Poison = fn(&mut fazt_sync::Change);
    let poisons: [(&str, Poison); 7] = [
        ("db_version", |c| c.db_version = DbVersion(i64::MAX - 1)),
        ("db_version", |c| c.db_version = DbVersion(MAX_VERSION + 1)),
        ("db_version", |c| c.db_version = DbVersion(0)),
        ("seq", |c| c.seq = Seq(-1)),
        ("col_version", |c| c.col_version = ColVersion(i64::MAX)),
        ("col_version", |c| c.col_version = ColVersion(0)),
        ("causal length", |c| c.cl = CausalLength(-3)),
    ];
    let before = state(&b);
    for (field, poison) in poisons {
        let mut batch = good.clone();
        for c in &mut batch.changes {
            poison(c);
        }
        let err = b.apply(&batch).unwrap_err().to_string();
        assert!(
            err.contains(field) && err.contains("2^53") && err.contains("nothing applied"),
            "{err}"
        );
        assert_eq!(state(&b), before, "{field}: nothing changed");
    }
    // A cover beyond the bound is refused the same way.
    let mut batch = good.clone();
    batch
        .covers
        .insert(a.site_id(), DbVersion(1), DbVersion(1 << 62));
    let err = b.apply(&batch).unwrap_err().to_string();
    assert!(err.contains("covered") && err.contains("2^53"), "{err}");
    assert_eq!(state(&b), before);

    // The replica goes on writing, numbering and exporting as before.
    exec(&mut b, "INSERT INTO items (id, a) VALUES (3, 'later')", []);
    assert_eq!(b.db_version().unwrap(), before.3.next());
    let mut c = replica();
    sync(&b, &mut c);
    sync(&a, &mut b);
    sync(&b, &mut c);
    assert_eq!(data(&c), data(&b));
    assert_eq!(data(&b).len(), 3);
}

#[test]
fn a_version_at_the_bound_stops_local_writes_loudly_instead_of_wrapping() {
    let mut a = replica();
    let mut b = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    let mut batch = a.batch_since(&Coverage::default()).unwrap();
    for c in &mut batch.changes {
        c.db_version = DbVersion(MAX_VERSION);
    }
    batch.covers = Coverage::default();
    let max = DbVersion(MAX_VERSION);
    batch.covers.insert(a.site_id(), max, max);
    b.apply(&batch).unwrap();
    assert_eq!(b.db_version().unwrap(), max);
    let before = state(&b);
    let err = b
        .write(|tx| {
            tx.execute("INSERT INTO items (id, a) VALUES (2, 'y')", [])
                .map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("bound of 2^53"), "{err}");
    assert_eq!(state(&b), before, "the refused write left nothing");
}

#[test]
fn a_col_version_at_the_bound_stops_writes_to_that_cell_loudly() {
    let mut a = replica();
    let mut b = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    let mut batch = a.batch_since(&Coverage::default()).unwrap();
    for c in &mut batch.changes {
        c.col_version = ColVersion(MAX_VERSION);
    }
    b.apply(&batch).unwrap();
    let before = state(&b);
    let err = b
        .write(|tx| {
            tx.execute("UPDATE items SET a = 'y' WHERE id = 1", [])
                .map(|_| ())
        })
        .unwrap_err()
        .to_string();
    assert!(err.contains("bound of 2^53"), "{err}");
    assert_eq!(state(&b), before);
    // Other rows are written as usual.
    exec(&mut b, "INSERT INTO items (id, a) VALUES (2, 'z')", []);
}

#[test]
fn a_parked_change_does_not_move_the_clock() {
    let mut a = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'x')", []);
    let mut batch = a.batch_since(&Coverage::default()).unwrap();
    for c in &mut batch.changes {
        c.db_version = DbVersion(1_000_000);
    }
    batch.covers = Coverage::default();
    let far = DbVersion(1_000_000);
    batch.covers.insert(a.site_id(), far, far);
    batch.sender_clock = DbVersion(0);
    // This replica has no `items` table yet: the change waits in the pending area.
    let mut b = Replica::open(Connection::open_in_memory().unwrap()).unwrap();
    b.conn()
        .execute_batch("CREATE TABLE notes (id INTEGER PRIMARY KEY NOT NULL, t TEXT)")
        .unwrap();
    b.replicate("notes").unwrap();
    let report = b.apply(&batch).unwrap();
    assert_eq!(report.pending, batch.changes.len());
    assert_eq!(
        b.db_version().unwrap(),
        DbVersion(0),
        "a parked version does not move the clock"
    );
    assert!(
        b.coverage().unwrap().get(&a.site_id()).is_none(),
        "the parked version is not held"
    );
    b.write(|tx| {
        tx.execute("INSERT INTO notes (id, t) VALUES (1, 'n')", [])
            .map(|_| ())
    })
    .unwrap();
    assert_eq!(b.db_version().unwrap(), DbVersion(1));
}

#[test]
fn a_forged_cover_does_not_hide_an_origins_later_changes() {
    let mut a = replica();
    let mut b = replica();
    let mut m = replica();
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'first')", []);
    sync(&a, &mut b);
    // A tiny batch (from a hostile peer, or a bundle) that claims to cover almost every
    // version `a` will ever make, with one harmless change of its own.
    exec(
        &mut m,
        "INSERT INTO pairs (x, y, v) VALUES ('m', 1, 'm')",
        [],
    );
    let mut forged = m.batch_since(&Coverage::default()).unwrap();
    forged
        .covers
        .insert(a.site_id(), DbVersion(1), DbVersion(MAX_VERSION));
    b.apply(&forged).unwrap();
    let held = b.coverage().unwrap();
    let held_of_a = held.get(&a.site_id()).unwrap();
    assert_eq!(
        held_of_a.ranges(),
        &[(DbVersion(1), DbVersion(1))],
        "the cover was clipped to the clock"
    );
    // Without the changes: only a cover.
    let cover_only = Batch {
        changes: Vec::new(),
        covers: {
            let mut c = Coverage::default();
            c.insert(a.site_id(), DbVersion(1), DbVersion(1 << 40));
            c
        },
        sender_clock: DbVersion(0),
    };
    b.apply(&cover_only).unwrap();
    assert_eq!(b.coverage().unwrap(), held);

    for i in 2..=5 {
        exec(
            &mut a,
            "INSERT INTO items (id, a) VALUES (?1, 'later')",
            [i],
        );
    }
    sync(&a, &mut b);
    assert_eq!(data(&b).len(), 6, "a's later rows arrived: {:?}", data(&b));
    assert_eq!(clocks(&b).len(), clocks(&a).len() + clocks(&m).len());
}

#[test]
fn an_honest_cover_of_superseded_versions_is_believed_up_to_the_senders_clock() {
    // b writes a cell many times (high col_version, low db_version); a, whose clock is
    // high, writes it once: a's version loses everywhere and no clock row keeps it.
    let mut a = replica();
    let mut b = replica();
    for i in 0..20 {
        exec(
            &mut a,
            "INSERT INTO items (id, a) VALUES (?1, 'x')",
            [100 + i],
        );
    }
    exec(&mut a, "INSERT INTO items (id, a) VALUES (1, 'a')", []);
    for v in ["b1", "b2", "b3"] {
        exec(
            &mut b,
            "INSERT OR REPLACE INTO items (id, a) VALUES (1, ?1)",
            [v],
        );
        exec(
            &mut b,
            "UPDATE items SET a = ?1 WHERE id = 1",
            [format!("{v}!")],
        );
    }
    sync(&a, &mut b);
    sync(&b, &mut a);
    assert_eq!(data(&a), data(&b));
    // A third replica learns from b only: a's newest version has no surviving change, so
    // without b's declared clock its cover cannot be believed.
    let mut c = replica();
    let mut batch = b.batch_since(&c.coverage().unwrap()).unwrap();
    let declared = batch.sender_clock;
    batch.sender_clock = DbVersion(0);
    c.apply(&batch).unwrap();
    assert_eq!(data(&c), data(&b));
    let (bc, cc) = (b.coverage().unwrap(), c.coverage().unwrap());
    assert_ne!(
        cc.get(&a.site_id()),
        bc.get(&a.site_id()),
        "the version lies beyond every clock c can see"
    );
    // With the sender's clock (as `sync` and peers declare it), the cover is believed.
    batch.sender_clock = declared;
    c.apply(&batch).unwrap();
    let cc = c.coverage().unwrap();
    for site in [a.site_id(), b.site_id()] {
        assert_eq!(cc.get(&site), bc.get(&site));
    }
    assert_eq!(c.db_version().unwrap(), b.db_version().unwrap());
}

#[test]
fn the_pending_area_is_capped_and_what_does_not_fit_comes_again() {
    let mut a = replica();
    exec(
        &mut a,
        "INSERT INTO items (id, a, b) VALUES (1, 'one', 1)",
        [],
    );
    exec(
        &mut a,
        "INSERT INTO items (id, a, b) VALUES (2, 'two', 2)",
        [],
    );
    let batch = a.batch_since(&Coverage::default()).unwrap();
    assert_eq!(batch.changes.len(), 6, "two transactions of three changes");

    let mut b = Replica::open(Connection::open_in_memory().unwrap()).unwrap();
    b.set_pending_caps(4, 1 << 20);
    let report = b.apply(&batch).unwrap();
    assert_eq!((report.pending, report.pending_full), (3, 3));
    assert_eq!(b.pending_usage().unwrap().0, 3);
    assert!(b.coverage().unwrap().get(&a.site_id()).is_none());
    // Again: the kept transaction is not kept twice, the other still does not fit.
    let report = b.apply(&batch).unwrap();
    assert_eq!((report.pending, report.pending_full), (3, 3));
    assert_eq!(b.pending_usage().unwrap().0, 3);

    // A byte cap the same way: only one transaction fits.
    let mut d = Replica::open(Connection::open_in_memory().unwrap()).unwrap();
    let one: i64 = batch.changes[..3]
        .iter()
        .map(|c| (c.table.len() + c.pk.len() + c.cid.len()) as i64 + 64 + 8)
        .sum();
    d.set_pending_caps(1000, one);
    let report = d.apply(&batch).unwrap();
    assert_eq!((report.pending, report.pending_full), (3, 3));
    let (_, bytes) = d.pending_usage().unwrap();
    assert!(bytes > 0 && bytes <= one, "{bytes} <= {one}");

    // Once the table exists, what was kept applies and the rest comes with the next sync.
    b.conn().execute_batch(common::SCHEMA).unwrap();
    b.replicate("items").unwrap();
    b.replicate("pairs").unwrap();
    assert_eq!(data(&b).len(), 1);
    sync(&a, &mut b);
    assert_eq!(data(&b), data(&a));
    assert_eq!(clocks(&b), clocks(&a));
    assert_eq!(b.pending_usage().unwrap(), (0, 0));
}
