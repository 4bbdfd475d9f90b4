//! Property: replicas that make random writes and exchange changes in any order — late,
//! duplicated, reordered, partial, relayed — end with identical data and identical clocks.

mod common;

use common::{clocks, data, replica};
use fazt_sync::{Batch, Coverage, Replica, Value};
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
    /// Everything `to` lacks from `from`, with the delivery mangled as `how` says.
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
    /// Only every other origin transaction, covering just those.
    Partial,
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        (-2i64..3).prop_map(Value::Integer),
        prop_oneof![Just(0.5f64), Just(-1.0), Just(2.0)].prop_map(Value::Real),
        prop_oneof![Just("a"), Just("b"), Just("")].prop_map(|s| Value::Text(s.into())),
        prop_oneof![Just(vec![]), Just(vec![0u8]), Just(vec![1u8, 2])].prop_map(Value::Blob),
    ]
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    let id = 0i64..4;
    let at = 0..n;
    prop_oneof![
        3 => (at.clone(), id.clone(), value(), -1i64..2, value()).prop_map(|(at, id, a, b, c)| Op::Insert { at, id, a, b, c }),
        3 => (at.clone(), id.clone(), prop_oneof![Just("a"), Just("b"), Just("c")], value())
            .prop_map(|(at, id, col, val)| Op::Update { at, id, col, val }),
        1 => (at.clone(), id.clone()).prop_map(|(at, id)| Op::Delete { at, id }),
        1 => (at.clone(), id.clone(), id.clone()).prop_map(|(at, from, to)| Op::MoveKey { at, from, to }),
        2 => (at.clone(), prop_oneof![Just("k"), Just("l")], 0i64..2, value()).prop_map(|(at, x, y, v)| Op::Pair { at, x, y, v }),
        1 => (at.clone(), prop_oneof![Just("k"), Just("l")], 0i64..2).prop_map(|(at, x, y)| Op::DeletePair { at, x, y }),
        4 => (at.clone(), 0..n, prop_oneof![Just(Delivery::InOrder), Just(Delivery::Twice), Just(Delivery::Reversed), Just(Delivery::Partial)])
            .prop_map(|(from, to, how)| Op::Sync { from, to, how }),
    ]
}

fn write(r: &mut Replica, sql: &str, params: &[&dyn rusqlite::ToSql]) {
    // Constraint failures (a duplicate key) are ordinary outcomes of random writes.
    let _ = r.write(|tx| tx.execute(sql, params).map(|_| ()));
}

fn deliver(replicas: &mut [Replica], from: usize, to: usize, how: Delivery) {
    if from == to {
        return;
    }
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
            let mut changes = batch.changes.clone();
            changes.sort_by_key(|c| std::cmp::Reverse((c.site_id, c.db_version)));
            target
                .apply(&Batch {
                    changes,
                    covers: batch.covers,
                    sender_clock: batch.sender_clock,
                })
                .unwrap();
        }
        Delivery::Partial => {
            let mut groups: Vec<(fazt_sync::SiteId, i64)> = batch
                .changes
                .iter()
                .map(|c| (c.site_id, c.db_version))
                .collect();
            groups.dedup();
            let keep: Vec<_> = groups.iter().step_by(2).copied().collect();
            let mut covers = Coverage::default();
            for &(site, v) in &keep {
                covers.insert(site, v, v);
            }
            let changes = batch
                .changes
                .iter()
                .filter(|c| keep.contains(&(c.site_id, c.db_version)))
                .cloned()
                .collect();
            target
                .apply(&Batch {
                    changes,
                    covers,
                    sender_clock: batch.sender_clock,
                })
                .unwrap();
        }
    }
}

fn run(n: usize, ops: &[Op]) -> Vec<Replica> {
    let mut replicas: Vec<Replica> = (0..n).map(|_| replica()).collect();
    for op in ops {
        match op.clone() {
            Op::Insert { at, id, a, b, c } => write(
                &mut replicas[at],
                "INSERT INTO items (id, a, b, c) VALUES (?1, ?2, ?3, ?4)",
                &[&id, &a, &b, &c],
            ),
            Op::Update { at, id, col, val } => {
                write(&mut replicas[at], &format!("UPDATE items SET {col} = ?1 WHERE id = ?2"), &[&val, &id])
            }
            Op::Delete { at, id } => write(&mut replicas[at], "DELETE FROM items WHERE id = ?1", &[&id]),
            Op::MoveKey { at, from, to } => {
                write(&mut replicas[at], "UPDATE items SET id = ?1 WHERE id = ?2", &[&to, &from])
            }
            Op::Pair { at, x, y, v } => write(
                &mut replicas[at],
                "INSERT INTO pairs (x, y, v) VALUES (?1, ?2, ?3) ON CONFLICT (x, y) DO UPDATE SET v = excluded.v",
                &[&x, &y, &v],
            ),
            Op::DeletePair { at, x, y } => {
                write(&mut replicas[at], "DELETE FROM pairs WHERE x = ?1 AND y = ?2", &[&x, &y])
            }
            Op::Sync { from, to, how } => deliver(&mut replicas, from, to, how),
        }
    }
    // Settle: everyone talks to everyone until nothing moves (two full rounds suffice).
    for _ in 0..2 {
        for from in 0..n {
            for to in 0..n {
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
        // Nothing is missed: every replica covers every origin up to that origin's clock.
        for r in &replicas {
            let cov = r.coverage().unwrap();
            for origin in &replicas {
                let head = cov.get(&origin.site_id()).map_or(0, |s| s.head());
                prop_assert!(head >= origin.db_version().unwrap());
            }
        }
    }
}
