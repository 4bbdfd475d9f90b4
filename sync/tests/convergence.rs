//! Property: replicas that make random writes — single statements and multi-statement
//! transactions, with ordinary and extreme values — and exchange changes in any order (late,
//! duplicated, reordered, partial, relayed) end with identical data and identical clocks.

mod common;

use common::{clocks, data, replica};
use fazt_sync::{DbVersion, Replica, Value};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Insert {
        at: usize,
        id: i64,
        a: Value,
        b: i64,
        c: Value,
    },
    Update {
        at: usize,
        id: i64,
        col: &'static str,
        val: Value,
    },
    Delete {
        at: usize,
        id: i64,
    },
    MoveKey {
        at: usize,
        from: i64,
        to: i64,
    },
    Pair {
        at: usize,
        x: &'static str,
        y: i64,
        v: Value,
    },
    DeletePair {
        at: usize,
        x: &'static str,
        y: i64,
    },
    /// Several writes at `at` in one transaction (their own `at` is ignored): all of them,
    /// or none when one fails.
    Txn {
        at: usize,
        writes: Vec<Op>,
    },
    /// Everything `to` lacks from `from` (never itself), with the delivery mangled as `how`
    /// says.
    Sync {
        from: usize,
        to: usize,
        how: Delivery,
    },
}

#[derive(Debug, Clone, Copy)]
enum Delivery {
    InOrder,
    Twice,
    Reversed,
    /// Only the origin transactions whose bit is set (transaction `i` is bit `i % 64`),
    /// covering just those.
    Partial(u64),
}

/// Long text and blobs: two of each that differ only at the end, so ties compare far in.
fn long(last: u8) -> Vec<u8> {
    let mut v = vec![b'x'; 3000];
    v.push(last);
    v
}

/// Few distinct values of every type, so that concurrent writes often tie on value, plus
/// the extremes: integer bounds, -0.0 beside 0.0, infinities, NaN (SQLite stores NULL),
/// empty and long text and blobs.
fn value() -> BoxedStrategy<Value> {
    prop_oneof![
        2 => Just(Value::Null),
        3 => (-2i64..3).prop_map(Value::Integer),
        1 => prop_oneof![Just(i64::MIN), Just(i64::MAX), Just(i64::MIN + 1)].prop_map(Value::Integer),
        3 => prop_oneof![Just(0.5f64), Just(-1.0), Just(2.0)].prop_map(Value::Real),
        1 => prop_oneof![Just(0.0f64), Just(-0.0), Just(f64::INFINITY), Just(f64::NEG_INFINITY), Just(f64::NAN), Just(f64::MIN_POSITIVE), Just(f64::MAX)]
            .prop_map(Value::Real),
        3 => prop_oneof![Just("a"), Just("b"), Just(""), Just("1"), Just("é✓")].prop_map(|s| Value::Text(s.into())),
        1 => prop_oneof![Just(b'a'), Just(b'b')].prop_map(|l| Value::Text(String::from_utf8(long(l)).unwrap())),
        3 => prop_oneof![Just(vec![]), Just(vec![0u8]), Just(vec![1u8, 2])].prop_map(Value::Blob),
        1 => prop_oneof![Just(0u8), Just(255u8)].prop_map(|l| Value::Blob(long(l))),
    ]
    .boxed()
}

/// Row keys: a few small ones (so writes collide) and the integer bounds.
fn id() -> impl Strategy<Value = i64> {
    prop_oneof![6 => 0i64..4, 1 => Just(i64::MIN), 1 => Just(i64::MAX)]
}

/// One write at a replica below `n`.
fn write_op(n: usize) -> BoxedStrategy<Op> {
    let at = 0..n;
    let b = prop_oneof![4 => -1i64..2, 1 => Just(i64::MIN), 1 => Just(i64::MAX)];
    let y = prop_oneof![4 => 0i64..2, 1 => Just(i64::MIN)];
    prop_oneof![
        3 => (at.clone(), id(), value(), b, value()).prop_map(|(at, id, a, b, c)| Op::Insert { at, id, a, b, c }),
        3 => (at.clone(), id(), prop_oneof![Just("a"), Just("b"), Just("c")], value())
            .prop_map(|(at, id, col, val)| Op::Update { at, id, col, val }),
        1 => (at.clone(), id()).prop_map(|(at, id)| Op::Delete { at, id }),
        1 => (at.clone(), id(), id()).prop_map(|(at, from, to)| Op::MoveKey { at, from, to }),
        2 => (at.clone(), prop_oneof![Just("k"), Just("l")], y.clone(), value()).prop_map(|(at, x, y, v)| Op::Pair { at, x, y, v }),
        1 => (at, prop_oneof![Just("k"), Just("l")], y).prop_map(|(at, x, y)| Op::DeletePair { at, x, y }),
    ]
    .boxed()
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    let how = prop_oneof![
        Just(Delivery::InOrder),
        Just(Delivery::Twice),
        Just(Delivery::Reversed),
        any::<u64>().prop_map(Delivery::Partial),
    ];
    prop_oneof![
        11 => write_op(n),
        2 => (0..n, proptest::collection::vec(write_op(n), 2..5)).prop_map(|(at, writes)| Op::Txn { at, writes }),
        4 => (0..n, 1..n, how).prop_map(move |(from, hop, how)| Op::Sync { from, to: (from + hop) % n, how }),
    ]
}

/// A write's SQL and parameters.
fn statement(op: &Op) -> (&'static str, Vec<Value>) {
    let i = Value::Integer;
    let t = |s: &str| Value::Text(s.into());
    match op.clone() {
        Op::Insert { id, a, b, c, .. } => ("INSERT INTO items (id, a, b, c) VALUES (?1, ?2, ?3, ?4)", vec![i(id), a, i(b), c]),
        Op::Update { id, col: "a", val, .. } => ("UPDATE items SET a = ?1 WHERE id = ?2", vec![val, i(id)]),
        Op::Update { id, col: "b", val, .. } => ("UPDATE items SET b = ?1 WHERE id = ?2", vec![val, i(id)]),
        Op::Update { id, val, .. } => ("UPDATE items SET c = ?1 WHERE id = ?2", vec![val, i(id)]),
        Op::Delete { id, .. } => ("DELETE FROM items WHERE id = ?1", vec![i(id)]),
        Op::MoveKey { from, to, .. } => ("UPDATE items SET id = ?1 WHERE id = ?2", vec![i(to), i(from)]),
        Op::Pair { x, y, v, .. } => (
            "INSERT INTO pairs (x, y, v) VALUES (?1, ?2, ?3) ON CONFLICT (x, y) DO UPDATE SET v = excluded.v",
            vec![t(x), i(y), v],
        ),
        Op::DeletePair { x, y, .. } => ("DELETE FROM pairs WHERE x = ?1 AND y = ?2", vec![t(x), i(y)]),
        Op::Txn { .. } | Op::Sync { .. } => unreachable!("not a single write: {op:?}"),
    }
}

/// Lets through only the refusals random writes are bound to meet: a key that is taken (an
/// insert, or a key moved onto another row's) and NULL for `items.b` (NOT NULL). Either rolls
/// the whole transaction back; any other error fails the test.
fn expect_ok_or_constraint(result: rusqlite::Result<()>, what: &dyn std::fmt::Debug) {
    use rusqlite::ffi::{SQLITE_CONSTRAINT_NOTNULL, SQLITE_CONSTRAINT_PRIMARYKEY};
    match result {
        Ok(()) => {}
        Err(rusqlite::Error::SqliteFailure(e, _))
            if [SQLITE_CONSTRAINT_PRIMARYKEY, SQLITE_CONSTRAINT_NOTNULL]
                .contains(&e.extended_code) => {}
        Err(e) => panic!("write refused for an unexpected reason: {what:?} {e:?}"),
    }
}

fn write(r: &mut Replica, sql: &str, params: &[&dyn rusqlite::ToSql]) {
    expect_ok_or_constraint(r.write(|tx| tx.execute(sql, params).map(|_| ())), &sql);
}

/// Several writes in one transaction.
fn write_txn(r: &mut Replica, writes: &[Op]) {
    let statements: Vec<_> = writes.iter().map(statement).collect();
    let result = r.write(|tx| {
        for (sql, params) in &statements {
            tx.execute(sql, rusqlite::params_from_iter(params))?;
        }
        Ok::<_, rusqlite::Error>(())
    });
    expect_ok_or_constraint(result, &writes);
}

fn deliver(replicas: &mut [Replica], from: usize, to: usize, how: Delivery) {
    assert_ne!(from, to, "an exchange with itself tests nothing");
    let batch = replicas[from]
        .batch_since(&replicas[to].coverage().unwrap())
        .unwrap();
    let target = &mut replicas[to];
    match how {
        Delivery::InOrder => {
            target.apply(&batch).unwrap();
        }
        Delivery::Twice => {
            target.apply(&batch).unwrap();
            target.apply(&batch).unwrap();
        }
        Delivery::Reversed => {
            target.apply(&common::reversed(&batch)).unwrap();
        }
        Delivery::Partial(mask) => {
            target.apply(&common::partial(&batch, mask)).unwrap();
        }
    }
}

fn run(n: usize, ops: &[Op]) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = (0..n).map(|_| replica()).collect();
    for op in ops {
        match op {
            Op::Sync { from, to, how } => deliver(&mut replicas, *from, *to, *how),
            Op::Txn { at, writes } => write_txn(&mut replicas[*at], writes),
            Op::Insert { at, .. }
            | Op::Update { at, .. }
            | Op::Delete { at, .. }
            | Op::MoveKey { at, .. }
            | Op::Pair { at, .. }
            | Op::DeletePair { at, .. } => {
                let (sql, params) = statement(op);
                let params: Vec<&dyn rusqlite::ToSql> =
                    params.iter().map(|p| p as &dyn rusqlite::ToSql).collect();
                write(&mut replicas[*at], sql, &params)
            }
        }
    }
    // Settle: everyone talks to everyone until nothing moves (two full rounds suffice).
    for _ in 0..2 {
        for from in 0..n {
            for to in (0..n).filter(|&to| to != from) {
                deliver(&mut replicas, from, to, Delivery::InOrder);
            }
        }
    }
    replicas
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, max_shrink_iters: 2000, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_on_data_and_clocks(
        (n, ops) in (3usize..=5).prop_flat_map(|n| (Just(n), proptest::collection::vec(op(n), 1..40)))
    ) {
        let replicas = run(n, &ops);
        let want_data = data(&replicas[0]);
        let want_clocks = clocks(&replicas[0]);
        for r in &replicas[1..] {
            prop_assert_eq!(&data(r), &want_data);
            prop_assert_eq!(&clocks(r), &want_clocks);
        }
        // Nothing is missed: every replica covers every origin up to the origin's newest
        // write (its own coverage, which ends there and has no gaps), and all hold the same.
        let want_coverage = replicas[0].coverage().unwrap();
        for r in &replicas {
            let cov = r.coverage().unwrap();
            prop_assert_eq!(&cov, &want_coverage);
            for origin in &replicas {
                let own = origin.coverage().unwrap();
                let own = own.get(&origin.site_id()).map_or(&[][..], |s| s.ranges());
                prop_assert!(own.len() <= 1, "own coverage has no gaps: {:?}", own);
                let written = own.last().map_or(DbVersion(0), |&(_, end)| end);
                let head = cov.get(&origin.site_id()).map_or(DbVersion(0), |s| s.head());
                prop_assert!(head >= written);
            }
        }
    }
}
