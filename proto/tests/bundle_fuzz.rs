//! Fuzzing bundle records *behind* a valid checksum and signature: a random bundle has its
//! record bytes mutated and is then sealed again (signature and CRC recomputed with the
//! signing key), so that only the record parser stands between the bytes and the importer.
//! The reader must refuse cleanly (an error, no panic, memory bounded by the input's size,
//! whatever lengths the bytes claim) or accept records that write and read back the same.
//!
//! This binary holds one test: it counts the allocations of the thread that reads.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::RefCell;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::{key, read_bundle, record, write_bundle};
use ed25519_dalek::Signer;
use fazt_proto::bundle::{BundleError, Record, SIGNATURE_CONTEXT};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};
use sha2::{Digest, Sha512};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The peak of live heap bytes while `f` runs, above what was live when it started.
fn peak_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = f();
    (out, PEAK.load(Ordering::Relaxed).saturating_sub(base))
}

/// magic 8 + version 2 + sender 16 + signer 32: left alone, so the signer stays the key.
const HEADER: usize = 58;
/// signature 64 + CRC 4.
const TRAILER: usize = 68;

/// `header` + `records` (through the end tag), signed by the test key and checksummed, as
/// `BundleWriter::finish` does.
fn seal(header: &[u8], records: &[u8]) -> Vec<u8> {
    let mut b = header.to_vec();
    b.extend_from_slice(records);
    let mut message = SIGNATURE_CONTEXT.to_vec();
    message.extend_from_slice(&Sha512::digest(&b));
    b.extend_from_slice(&key().sign(&message).to_bytes());
    b.extend_from_slice(&crc32fast::hash(&b).to_le_bytes());
    b
}

#[derive(Debug, Clone)]
enum Mutation {
    Xor(usize, u8),
    Set(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// A varint claiming about 2^30 (a length near MAX_TXN_BYTES), or 2^63.
    HugeLength(usize, bool),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (any::<usize>(), 1u8..=255).prop_map(|(at, x)| Mutation::Xor(at, x)),
        2 => (any::<usize>(), prop_oneof![Just(0u8), 1u8..=6, any::<u8>()]).prop_map(|(at, b)| Mutation::Set(at, b)),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        1 => (any::<usize>(), 1usize..8).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(at, max)| Mutation::HugeLength(at, max)),
    ]
}

fn mutate(records: &mut Vec<u8>, m: &Mutation) {
    let len = records.len();
    match m.clone() {
        Mutation::Xor(at, x) if len > 0 => records[at % len] ^= x,
        Mutation::Set(at, b) if len > 0 => records[at % len] = b,
        Mutation::Insert(at, bytes) => {
            let at = at % (len + 1);
            records.splice(at..at, bytes);
        }
        Mutation::Delete(at, n) if len > 0 => {
            let at = at % len;
            records.drain(at..(at + n).min(len));
        }
        Mutation::HugeLength(at, max) => {
            let at = at % (len + 1);
            let varint: &[u8] = if max {
                &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]
            } else {
                &[0xff, 0xff, 0xff, 0xff, 0x03]
            };
            records.splice(at..at, varint.iter().copied());
        }
        _ => {}
    }
}

#[derive(Debug, Default)]
struct Outcomes {
    accepted: u32,
    /// Refused by the record parser or a limit, before the end.
    refused_by_records: u32,
    /// Refused at the end: the mutation moved the end tag, so the seal is read elsewhere.
    refused_by_seal: u32,
}

fn case(
    sender: [u8; 16],
    records: &[Record],
    mutations: &[Mutation],
    outcomes: &RefCell<Outcomes>,
) -> Result<(), TestCaseError> {
    let original = write_bundle(sender, records);
    let (header, body) = original.split_at(HEADER);
    let mut body = body[..body.len() - TRAILER].to_vec();
    prop_assert_eq!(
        &seal(header, &body),
        &original,
        "sealing again without a mutation must give the writer's bytes"
    );
    for m in mutations {
        mutate(&mut body, m);
    }
    let sealed = seal(header, &body);

    let (outcome, peak) = peak_during(|| read_bundle(&sealed));
    prop_assert!(
        peak <= 64 * 1024 + 4 * sealed.len(),
        "reading {} bytes took {} bytes of heap",
        sealed.len(),
        peak
    );
    match outcome {
        Ok((read_sender, _, read)) => {
            outcomes.borrow_mut().accepted += 1;
            prop_assert_eq!(read_sender, sender);
            // What the format promises of every record it hands out.
            for r in &read {
                if let Record::Cover { start, end, .. } = *r {
                    prop_assert!(
                        1 <= start && start <= end,
                        "accepted the cover {}..={}",
                        start,
                        end
                    );
                }
            }
            // Whatever was accepted is a set of records the writer can write again, and
            // that reads back the same.
            let again = write_bundle(sender, &read);
            let (_, _, reread) = read_bundle(&again).unwrap();
            prop_assert_eq!(format!("{reread:?}"), format!("{read:?}"));
            prop_assert_eq!(&write_bundle(sender, &reread), &again);
        }
        Err(BundleError::Checksum | BundleError::BadSignature(_)) => {
            outcomes.borrow_mut().refused_by_seal += 1
        }
        Err(e) => {
            outcomes.borrow_mut().refused_by_records += 1;
            prop_assert!(
                matches!(
                    e,
                    BundleError::Corrupt(_) | BundleError::Truncated | BundleError::Limit(_)
                ),
                "unexpected refusal: {:?}",
                e
            );
        }
    }
    Ok(())
}

#[test]
fn mutated_records_behind_a_valid_seal_are_refused_cleanly_or_read_consistently() {
    let mut config = Config {
        failure_persistence: None,
        ..Config::default()
    };
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = 4000;
    }
    let cases = config.cases;
    let mut runner = TestRunner::new(config);
    let outcomes = RefCell::new(Outcomes::default());
    let strategy = (
        any::<[u8; 16]>(),
        proptest::collection::vec(record(), 1..8),
        proptest::collection::vec(mutation(), 1..4),
    );
    let result = runner.run(&strategy, |(sender, records, mutations)| {
        case(sender, &records, &mutations, &outcomes)
    });
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, input)) => panic!("{why}\nminimal input:\n{input:#?}"),
        Err(TestError::Abort(why)) => panic!("aborted: {why}"),
    }
    let outcomes = outcomes.into_inner();
    eprintln!("{outcomes:?}");
    // The fuzzing reaches past the seal: most mutated bundles are judged by their records.
    assert!(
        outcomes.accepted >= cases / 20 && outcomes.refused_by_records >= cases / 4,
        "{outcomes:?}"
    );
}
