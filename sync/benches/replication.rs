//! The replication engine's benchmark: fazt-sync next to plain SQLite and cr-sqlite.
//!
//! Run it with `scripts/bench-sync` (or `cargo bench -p fazt-sync --bench replication`); what
//! each figure measures and the recorded results are in docs/performance.md.
//!
//! Every database is a real file in a temporary directory, opened with the same pragmas
//! (WAL, synchronous=NORMAL; figure 1b FULL, as the node runs) whoever the contender is, so
//! the figures differ only by what each system does per write. Figure 8 is no contender: it
//! times plain SQLite with the least a trigger-captured design writes, the floor under
//! figures 1 and 2. cr-sqlite is the extension `scripts/build-crsqlite-oracle`
//! builds (`FAZT_CRSQLITE` points elsewhere); without it its column is skipped.
//!
//! A benchmark, not a test: a missed target prints MISS and the program still exits 0.
//!
//!   BENCH_ROUNDS=3   runs of each timed step (fresh databases each time); the median is reported

use std::error::Error;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fazt_sync::{ApplyReport, Batch, Change, Coverage, Replica};
use rusqlite::types::Value as SqlValue;
use rusqlite::{params, Connection, TransactionBehavior};

type Res<T> = Result<T, Box<dyn Error>>;

const SCHEMA: &str =
    "CREATE TABLE items (id INTEGER PRIMARY KEY NOT NULL, a TEXT, b INTEGER NOT NULL DEFAULT 0, c REAL)";
const INSERT: &str = "INSERT INTO items (id, a, b, c) VALUES (?1, ?2, ?3, ?4)";
/// Figure 1: transactions of one row each.
const SMALL_TXS: i64 = 5_000;
/// Figure 1b: one-row transactions with a full fsync per commit (fewer: each waits on the disk).
const DURABLE_TXS: i64 = 1_000;
/// Figure 1b: unsynced one-row commits before the timed ones, past the first checkpoint.
const WARM_TXS: i64 = 1_200;
/// Figure 2 and everything after it: rows inserted in one transaction.
const BULK_ROWS: i64 = 100_000;
/// Changes per `apply` (and per cr-sqlite merge transaction).
const APPLY_CHUNK: usize = 10_000;

fn main() -> Res<()> {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it,
    // and a minutes-long benchmark has no place in a test run.
    if !std::env::args().any(|a| a == "--bench") {
        println!("replication benchmark: skipped (run scripts/bench-sync or cargo bench)");
        return Ok(());
    }
    let rounds: usize = match std::env::var("BENCH_ROUNDS") {
        Ok(v) => v
            .parse()
            .map_err(|_| format!("BENCH_ROUNDS={v}: expected a positive number"))?,
        Err(_) => 3,
    };
    if rounds == 0 {
        return Err("BENCH_ROUNDS must be at least 1".into());
    }
    let dir = tempfile::Builder::new()
        .prefix("fazt-bench-sync")
        .tempdir()?;
    let crsqlite = crsqlite_path();
    println!(
        "fazt-sync replication benchmark: {} cores, {}, SQLite {}, median of {rounds} rounds, databases in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu_model(),
        rusqlite::version(),
        dir.path().display()
    );
    if crsqlite.is_none() {
        println!("cr-sqlite baseline skipped (run scripts/build-crsqlite-oracle)");
    }
    let mut bench = Bench {
        dir: dir.path().to_path_buf(),
        crsqlite,
        rounds,
        summary: Vec::new(),
        files: 0,
    };
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let before = cpu_times();
    bench.run()?;
    println!("\n{}", bench.markdown());
    // On a virtual machine, time the host gives to others ("steal") slows every figure.
    if let (Some(b), Some(a)) = (before, cpu_times()) {
        let total = (a.0 - b.0).max(1) as f64;
        let others = (a.2 - b.2).saturating_sub(a.3 - b.3);
        println!(
            "Machine while measuring: load average {} at the start; of all cores' time, {:.0}% stolen by the \
             hypervisor and {:.0}% used by other processes",
            load.split_whitespace().next().unwrap_or("?"),
            100.0 * (a.1 - b.1) as f64 / total,
            100.0 * others as f64 / total,
        );
    }
    Ok(())
}

/// Clock ticks: (all of every core, stolen, busy (user+nice+system), this process's own).
fn cpu_times() -> Option<(u64, u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let all = fields.iter().take(8).sum();
    // After the command name in parentheses, utime and stime are the 12th and 13th fields.
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    let own: Vec<u64> = own
        .rsplit_once(") ")?
        .1
        .split_whitespace()
        .skip(11)
        .take(2)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    Some((
        all,
        *fields.get(7)?,
        fields.iter().take(3).sum(),
        own.iter().sum(),
    ))
}

/// The cr-sqlite extension, if it has been built.
fn crsqlite_path() -> Option<PathBuf> {
    let path = std::env::var_os("FAZT_CRSQLITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/crsqlite-oracle/crsqlite.so")
        });
    path.is_file().then_some(path)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// The row with key `i`; every contender inserts exactly these.
fn row(i: i64) -> (i64, String, i64, f64) {
    (i, format!("item number {i}"), i % 1000, i as f64 * 0.25)
}

fn insert_rows(conn: &Connection, ids: std::ops::RangeInclusive<i64>) -> rusqlite::Result<()> {
    let mut stmt = conn.prepare_cached(INSERT)?;
    for i in ids {
        let (id, a, b, c) = row(i);
        stmt.execute(params![id, a, b, c])?;
    }
    Ok(())
}

/// A database file with the pragmas every contender gets, and the `items` table.
fn open_file(path: &Path) -> Res<Connection> {
    open_file_with(path, "NORMAL")
}

/// [`open_file`] with another `synchronous` setting (figure 1b uses the node's, FULL).
fn open_file_with(path: &Path, synchronous: &str) -> Res<Connection> {
    let conn = Connection::open(path)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if mode != "wal" {
        return Err(format!("{}: journal_mode is {mode}, not wal", path.display()).into());
    }
    conn.execute_batch(&format!("PRAGMA synchronous = {synchronous}"))?;
    conn.execute_batch(SCHEMA)?;
    Ok(conn)
}

fn open_replica(path: &Path) -> Res<Replica> {
    open_replica_with(path, "NORMAL")
}

fn open_replica_with(path: &Path, synchronous: &str) -> Res<Replica> {
    let mut r = Replica::open(open_file_with(path, synchronous)?)?;
    r.replicate("items")?;
    Ok(r)
}

/// One-row write transactions, one per key in `ids`, on a plain connection (or a cr-sqlite
/// one).
fn one_row_transactions(
    conn: &mut Connection,
    ids: std::ops::RangeInclusive<i64>,
) -> Res<Duration> {
    let start = Instant::now();
    for i in ids {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_rows(&tx, i..=i)?;
        tx.commit()?;
    }
    Ok(start.elapsed())
}

/// The side table of figure 8: shaped like a clock table, optionally with an origin index.
fn floor_schema(with_index: bool) -> String {
    let mut sql = String::from(
        "CREATE TABLE side (key INTEGER NOT NULL, cid INTEGER NOT NULL, col_version INTEGER NOT NULL,
           db_version INTEGER NOT NULL, site_ord INTEGER NOT NULL, seq INTEGER NOT NULL,
           PRIMARY KEY (key, cid)) WITHOUT ROWID;
         CREATE TRIGGER items_side AFTER INSERT ON items BEGIN
           INSERT INTO side VALUES (NEW.id, -1, 1, 1, 0, NEW.id);
         END;",
    );
    if with_index {
        sql += "CREATE INDEX side_origin ON side (site_ord, db_version, seq, col_version);";
    }
    sql
}

/// A cr-sqlite database with `items` as a CRR. Says goodbye to cr-sqlite (`crsql_finalize`)
/// before the connection closes, as cr-sqlite asks.
struct CrSqlite {
    conn: Connection,
}

impl CrSqlite {
    fn open(extension: &Path, path: &Path) -> Res<CrSqlite> {
        let conn = open_file(path)?;
        // SAFETY: the extension is cr-sqlite, built from its published source by
        // scripts/build-crsqlite-oracle; loading is switched off again right after.
        unsafe {
            conn.load_extension_enable()?;
            let loaded = conn.load_extension(extension, Some("sqlite3_crsqlite_init"));
            conn.load_extension_disable()?;
            loaded.map_err(|e| format!("loading {}: {e}", extension.display()))?;
        }
        // The schema is named: cr-sqlite's one-argument form misreads its own "main" literal.
        conn.query_row("SELECT crsql_as_crr('main', 'items')", [], |_| Ok(()))?;
        Ok(CrSqlite { conn })
    }

    /// Every change row, as `crsql_changes` shows it.
    fn changes(&self) -> Res<Vec<Vec<SqlValue>>> {
        let mut stmt = self
            .conn
            .prepare("SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes")?;
        let rows = stmt.query_map([], |r| (0..9).map(|i| r.get::<_, SqlValue>(i)).collect())?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Merges change rows, one transaction per chunk, as a peer receiving them would.
    fn merge(&mut self, chunks: &[&[Vec<SqlValue>]]) -> Res<()> {
        for chunk in chunks {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut insert = tx.prepare_cached(
                    "INSERT INTO crsql_changes (\"table\", pk, cid, val, col_version, db_version, site_id, cl, seq)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                )?;
                for change in chunk.iter() {
                    insert.execute(rusqlite::params_from_iter(change))?;
                }
            }
            tx.commit()?;
        }
        Ok(())
    }
}

impl Drop for CrSqlite {
    fn drop(&mut self) {
        let _ = self
            .conn
            .query_row("SELECT crsql_finalize()", [], |_| Ok(()));
    }
}

/// Splits an exported batch into `apply`-sized pieces, as a receiver would: a piece ends
/// at the first origin-transaction boundary after `size` changes, because an origin
/// transaction is applied whole (the 100,000-row bulk insert is one piece). Each piece
/// covers the versions it holds; the last also carries the versions that wrote nothing.
fn chunked(batch: &Batch, size: usize) -> Vec<Batch> {
    let mut out: Vec<Batch> = Vec::new();
    let mut current = Batch::default();
    for (i, c) in batch.changes.iter().enumerate() {
        current.changes.push(c.clone());
        let next = batch.changes.get(i + 1);
        let boundary =
            next.is_none_or(|d: &Change| (d.site_id, d.db_version) != (c.site_id, c.db_version));
        if boundary {
            current.covers.insert(c.site_id, c.db_version, c.db_version);
            if current.changes.len() >= size {
                out.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.changes.is_empty() {
        out.push(current);
    }
    match out.last_mut() {
        Some(last) => last.covers.union(&batch.covers),
        None => out.push(Batch {
            changes: Vec::new(),
            covers: batch.covers.clone(),
            sender_clock: batch.sender_clock,
        }),
    }
    out
}

fn apply_all(r: &mut Replica, chunks: &[Batch]) -> Res<ApplyReport> {
    let mut total = ApplyReport::default();
    for chunk in chunks {
        let rep = r.apply(chunk)?;
        total.transactions += rep.transactions;
        total.applied += rep.applied;
        total.unchanged += rep.unchanged;
        total.already_seen += rep.already_seen;
        total.pending += rep.pending;
    }
    Ok(total)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `1234567.8` -> `1,234,568`.
fn thousands(x: f64) -> String {
    let digits = format!("{:.0}", x);
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}

/// A kB field of /proc/self/status.
fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Runs `f` and says by how much the peak resident set rose above the resident set before it.
/// The peak is reset first (Linux's clear_refs), so earlier steps' peaks do not hide this one's.
fn peak_growth<T>(f: impl FnOnce() -> Res<T>) -> Res<(T, Option<u64>)> {
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = status_kib("VmRSS:");
    let value = f()?;
    let after = status_kib("VmHWM:");
    let growth = match (reset, before, after) {
        (true, Some(b), Some(a)) => Some(a.saturating_sub(b)),
        _ => None,
    };
    Ok((value, growth))
}

/// Bytes of each b-tree of a database, after VACUUM has packed it: (table it belongs to,
/// b-tree name, bytes). An index belongs to its table.
fn btree_bytes(conn: &Connection) -> Res<Vec<(String, String, u64)>> {
    conn.execute_batch("VACUUM")?;
    let mut stmt = conn.prepare(
        "SELECT coalesce(s.tbl_name, d.name), d.name, sum(d.pgsize) FROM dbstat d
         LEFT JOIN sqlite_schema s ON s.name = d.name GROUP BY d.name ORDER BY 1, 2",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get::<_, i64>(2)? as u64))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Bytes of `table`, its indexes included.
fn bytes_of(btrees: &[(String, String, u64)], table: &str) -> u64 {
    btrees
        .iter()
        .filter(|(t, _, _)| t == table)
        .map(|(_, _, b)| b)
        .sum()
}

fn total_bytes(btrees: &[(String, String, u64)]) -> u64 {
    btrees.iter().map(|(_, _, b)| b).sum()
}

/// The b-trees that are not the rows themselves, largest first (those over two pages).
fn describe_metadata(btrees: &[(String, String, u64)]) -> String {
    let mut meta: Vec<&(String, String, u64)> = btrees
        .iter()
        .filter(|(t, _, b)| t != "items" && *b > 2 * 4096)
        .collect();
    meta.sort_by_key(|(_, _, b)| std::cmp::Reverse(*b));
    meta.iter()
        .map(|(_, name, b)| format!("{name} {}", thousands(*b as f64)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One row of the summary table.
struct Line {
    figure: String,
    fazt: String,
    plain: String,
    crsqlite: String,
    ratios: String,
    target: String,
    verdict: &'static str,
}

fn verdict(pass: bool) -> &'static str {
    if pass {
        "PASS"
    } else {
        "MISS"
    }
}

/// The bulk-inserted databases, kept for the figures that read them.
struct BulkDbs {
    plain: Connection,
    fazt: Replica,
    crsqlite: Option<CrSqlite>,
}

struct Bench {
    dir: PathBuf,
    crsqlite: Option<PathBuf>,
    rounds: usize,
    summary: Vec<Line>,
    files: usize,
}

impl Bench {
    /// A fresh database path.
    fn path(&mut self, what: &str) -> PathBuf {
        self.files += 1;
        self.dir.join(format!("{what}-{}.db", self.files))
    }

    fn run(&mut self) -> Res<()> {
        let small = self.small_transactions()?;
        let bulk = self.bulk_insert()?;
        // Export before the merges: they hold whole batches in memory, and the allocator keeps
        // those pages, which would hide the export's own peak.
        self.export(&bulk)?;
        self.merge(&bulk)?;
        self.merge_small_transactions(&small)?;
        self.metadata_size(&bulk)?;
        self.capture_floor()?;
        Ok(())
    }

    /// Figure 1: tx/s of one-row write transactions. Returns the last round's fazt and
    /// cr-sqlite databases (5,000 origin transactions) for the merge of small transactions.
    fn small_transactions(&mut self) -> Res<(Replica, Option<CrSqlite>)> {
        println!("\n1. Small write transactions: {SMALL_TXS} transactions of one row each");
        let kept = self.one_row_figure("1", "NORMAL", SMALL_TXS)?;
        println!(
            "\n1b. The same with synchronous=FULL, as the node opens its database: {DURABLE_TXS} transactions"
        );
        self.one_row_figure("1b", "FULL", DURABLE_TXS)?;
        Ok(kept)
    }

    /// Times `n` one-row write transactions per contender with `synchronous` set as given,
    /// prints and records the figure, and returns the last round's fazt and cr-sqlite
    /// databases.
    fn one_row_figure(
        &mut self,
        figure: &str,
        synchronous: &str,
        n: i64,
    ) -> Res<(Replica, Option<CrSqlite>)> {
        let (mut plain_t, mut fazt_t, mut cr_t) = (Vec::new(), Vec::new(), Vec::new());
        let mut kept = None;
        // With a sync per commit, appending to a WAL file that still grows costs more than
        // overwriting one already full size (the file system also commits the new size), and
        // the engine's larger commits get to the first checkpoint sooner. So with FULL every
        // contender first makes WARM_TXS unsynced commits, past its first checkpoint, and is
        // timed in that steady state.
        let warm = synchronous != "NORMAL";
        let warm_ids = 1_000_001..=1_000_000 + WARM_TXS;
        let set_sync = |conn: &Connection, value: &str| {
            conn.execute_batch(&format!("PRAGMA synchronous = {value}"))
        };
        for _ in 0..self.rounds {
            let mut plain = open_file_with(&self.path("small-plain"), synchronous)?;
            if warm {
                set_sync(&plain, "OFF")?;
                one_row_transactions(&mut plain, warm_ids.clone())?;
                set_sync(&plain, synchronous)?;
            }
            plain_t.push(one_row_transactions(&mut plain, 1..=n)?);

            let mut fazt = open_replica_with(&self.path("small-fazt"), synchronous)?;
            if warm {
                set_sync(fazt.conn(), "OFF")?;
                for i in warm_ids.clone() {
                    fazt.write(|tx| insert_rows(tx, i..=i))?;
                }
                set_sync(fazt.conn(), synchronous)?;
            }
            let start = Instant::now();
            for i in 1..=n {
                fazt.write(|tx| insert_rows(tx, i..=i))?;
            }
            fazt_t.push(start.elapsed());

            let mut cr = None;
            if let Some(ext) = self.crsqlite.clone() {
                let mut db = CrSqlite::open(&ext, &self.path("small-crsqlite"))?;
                if warm {
                    set_sync(&db.conn, "OFF")?;
                    one_row_transactions(&mut db.conn, warm_ids.clone())?;
                }
                set_sync(&db.conn, synchronous)?;
                cr_t.push(one_row_transactions(&mut db.conn, 1..=n)?);
                cr = Some(db);
            }
            kept = Some((fazt, cr));
        }
        let rate = |t: Duration| n as f64 / secs(t);
        let plain = rate(median(plain_t));
        let fazt = rate(median(fazt_t));
        let cr = (!cr_t.is_empty()).then(|| rate(median(cr_t)));
        let ratio = fazt / plain;
        let pass = ratio >= 0.6;
        println!("   plain SQLite  {:>12} tx/s", thousands(plain));
        println!(
            "   fazt          {:>12} tx/s  {ratio:.2}x plain  target >= 0.60x  {}",
            thousands(fazt),
            verdict(pass)
        );
        if let Some(cr) = cr {
            println!(
                "   cr-sqlite     {:>12} tx/s  {:.2}x plain",
                thousands(cr),
                cr / plain
            );
        }
        let label = if synchronous == "NORMAL" {
            format!(
                "{figure}. one-row write transactions ({})",
                thousands(n as f64)
            )
        } else {
            format!(
                "{figure}. one-row write transactions, synchronous={synchronous} ({})",
                thousands(n as f64)
            )
        };
        self.summary.push(Line {
            figure: label,
            fazt: format!("{} tx/s", thousands(fazt)),
            plain: format!("{} tx/s", thousands(plain)),
            crsqlite: cr.map_or("—".into(), |c| format!("{} tx/s", thousands(c))),
            ratios: format!(
                "fazt {ratio:.2}x plain{}",
                cr.map_or(String::new(), |c| format!("; cr-sqlite {:.2}x", c / plain))
            ),
            target: "fazt ≥ 0.6x plain".into(),
            verdict: verdict(pass),
        });
        Ok(kept.expect("at least one round"))
    }

    /// Figure 8: what capturing writes with a trigger into a lookaside table costs by itself,
    /// before any replication logic: plain SQLite plus an AFTER INSERT trigger that writes one
    /// constant row per inserted row into a clock-shaped side table (no function calls, no
    /// db_version row), with and without the origin index. Plain SQLite is timed again in
    /// the same rounds.
    fn capture_floor(&mut self) -> Res<()> {
        println!(
            "\n8. Capture floor: plain SQLite plus a trigger writing one side row per inserted row"
        );
        for (figure, with_index, what) in [
            ("8a", false, "one side row per row, no index"),
            ("8b", true, "one side row per row and its origin index"),
        ] {
            let (mut plain_bulk, mut floor_bulk, mut plain_small, mut floor_small) =
                (Vec::new(), Vec::new(), Vec::new(), Vec::new());
            for _ in 0..self.rounds {
                for floor in [false, true] {
                    let mut conn = open_file(&self.path("floor-bulk"))?;
                    if floor {
                        conn.execute_batch(&floor_schema(with_index))?;
                    }
                    let start = Instant::now();
                    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
                    insert_rows(&tx, 1..=BULK_ROWS)?;
                    tx.commit()?;
                    (if floor {
                        &mut floor_bulk
                    } else {
                        &mut plain_bulk
                    })
                    .push(start.elapsed());

                    let mut conn = open_file(&self.path("floor-small"))?;
                    if floor {
                        conn.execute_batch(&floor_schema(with_index))?;
                    }
                    let t = one_row_transactions(&mut conn, 1..=SMALL_TXS)?;
                    (if floor {
                        &mut floor_small
                    } else {
                        &mut plain_small
                    })
                    .push(t);
                }
            }
            let bulk_ratio = secs(median(floor_bulk.clone())) / secs(median(plain_bulk.clone()));
            let small_ratio = secs(median(plain_small.clone())) / secs(median(floor_small.clone()));
            let rate = |t: Duration| SMALL_TXS as f64 / secs(t);
            println!(
                "   {what}: bulk {:.3} s vs plain {:.3} s = {bulk_ratio:.2}x plain; one-row transactions {} vs {} tx/s = {small_ratio:.2}x plain",
                secs(median(floor_bulk.clone())),
                secs(median(plain_bulk.clone())),
                thousands(rate(median(floor_small.clone()))),
                thousands(rate(median(plain_small.clone()))),
            );
            self.summary.push(Line {
                figure: format!("{figure}. capture floor: plain SQLite + trigger, {what}"),
                fazt: "—".into(),
                plain: format!(
                    "bulk {:.3} s; {} tx/s",
                    secs(median(plain_bulk)),
                    thousands(rate(median(plain_small)))
                ),
                crsqlite: "—".into(),
                ratios: format!("bulk {bulk_ratio:.2}x plain; one-row tx {small_ratio:.2}x plain"),
                target: "(none: the least figures 1 and 2 can cost)".into(),
                verdict: "—",
            });
        }
        Ok(())
    }

    /// Figure 2: one transaction inserting `BULK_ROWS` rows.
    fn bulk_insert(&mut self) -> Res<BulkDbs> {
        println!("\n2. Bulk insert: {BULK_ROWS} rows in one transaction");
        let (mut plain_t, mut fazt_t, mut cr_t) = (Vec::new(), Vec::new(), Vec::new());
        let mut kept = None;
        for _ in 0..self.rounds {
            let mut plain = open_file(&self.path("bulk-plain"))?;
            let start = Instant::now();
            let tx = plain.transaction_with_behavior(TransactionBehavior::Immediate)?;
            insert_rows(&tx, 1..=BULK_ROWS)?;
            tx.commit()?;
            plain_t.push(start.elapsed());

            let mut fazt = open_replica(&self.path("bulk-fazt"))?;
            let start = Instant::now();
            fazt.write(|tx| insert_rows(tx, 1..=BULK_ROWS))?;
            fazt_t.push(start.elapsed());

            let mut crsqlite = None;
            if let Some(ext) = self.crsqlite.clone() {
                let mut db = CrSqlite::open(&ext, &self.path("bulk-crsqlite"))?;
                let start = Instant::now();
                let tx = db
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)?;
                insert_rows(&tx, 1..=BULK_ROWS)?;
                tx.commit()?;
                cr_t.push(start.elapsed());
                crsqlite = Some(db);
            }
            kept = Some(BulkDbs {
                plain,
                fazt,
                crsqlite,
            });
        }
        let plain = median(plain_t);
        let fazt = median(fazt_t);
        let cr = (!cr_t.is_empty()).then(|| median(cr_t));
        let slowdown = secs(fazt) / secs(plain);
        let pass = slowdown <= 5.0;
        let rows_per_s = |t: Duration| thousands(BULK_ROWS as f64 / secs(t));
        println!(
            "   plain SQLite  {:>8.3} s  ({} rows/s)",
            secs(plain),
            rows_per_s(plain)
        );
        println!(
            "   fazt          {:>8.3} s  ({} rows/s)  {slowdown:.2}x slower than plain  target <= 5x  {}",
            secs(fazt),
            rows_per_s(fazt),
            verdict(pass)
        );
        if let Some(cr) = cr {
            println!(
                "   cr-sqlite     {:>8.3} s  ({} rows/s)  {:.2}x slower than plain",
                secs(cr),
                rows_per_s(cr),
                secs(cr) / secs(plain)
            );
        }
        self.summary.push(Line {
            figure: format!(
                "2. bulk insert, {} rows in one transaction",
                thousands(BULK_ROWS as f64)
            ),
            fazt: format!("{:.3} s", secs(fazt)),
            plain: format!("{:.3} s", secs(plain)),
            crsqlite: cr.map_or("—".into(), |c| format!("{:.3} s", secs(c))),
            ratios: format!(
                "fazt {slowdown:.2}x plain{}",
                cr.map_or(String::new(), |c| format!(
                    "; cr-sqlite {:.1}x",
                    secs(c) / secs(plain)
                ))
            ),
            target: "fazt ≤ 5x plain".into(),
            verdict: verdict(pass),
        });
        Ok(kept.expect("at least one round"))
    }

    /// Figures 3 and 5: the bulk replica's changes applied to fresh replicas in chunks, then
    /// the same chunks again (all already held).
    fn merge(&mut self, bulk: &BulkDbs) -> Res<()> {
        let batch = bulk.fazt.batch_since(&Coverage::default())?;
        let total = batch.changes.len();
        let chunks = chunked(&batch, APPLY_CHUNK);
        drop(batch);
        let cr_changes = bulk.crsqlite.as_ref().map(CrSqlite::changes).transpose()?;
        println!(
            "\n3. Merging remote changes: {} changes ({} rows) in applies of {APPLY_CHUNK}{}",
            thousands(total as f64),
            thousands(BULK_ROWS as f64),
            cr_changes.as_ref().map_or(String::new(), |c| format!(
                "; cr-sqlite: {} changes from crsql_changes",
                thousands(c.len() as f64)
            ))
        );

        let (mut fazt_t, mut fazt_again_t, mut cr_t, mut cr_again_t) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.rounds {
            let mut dst = open_replica(&self.path("merge-fazt"))?;
            let start = Instant::now();
            let first = apply_all(&mut dst, &chunks)?;
            fazt_t.push(start.elapsed());
            if first.applied != total {
                return Err(format!(
                    "merge applied {} of {total} changes: {first:?}",
                    first.applied
                )
                .into());
            }
            let start = Instant::now();
            let again = apply_all(&mut dst, &chunks)?;
            fazt_again_t.push(start.elapsed());
            if again.already_seen != total || again.applied != 0 {
                return Err(format!("re-applying changed something: {again:?}").into());
            }
            let rows: i64 = dst
                .conn()
                .query_row("SELECT count(*) FROM items", [], |r| r.get(0))?;
            if rows != BULK_ROWS {
                return Err(format!("the merged replica has {rows} rows, not {BULK_ROWS}").into());
            }

            if let (Some(ext), Some(changes)) = (self.crsqlite.clone(), cr_changes.as_ref()) {
                let mut db = CrSqlite::open(&ext, &self.path("merge-crsqlite"))?;
                let pieces: Vec<&[Vec<SqlValue>]> = changes.chunks(APPLY_CHUNK).collect();
                let start = Instant::now();
                db.merge(&pieces)?;
                cr_t.push(start.elapsed());
                let start = Instant::now();
                db.merge(&pieces)?;
                cr_again_t.push(start.elapsed());
                let rows: i64 = db
                    .conn
                    .query_row("SELECT count(*) FROM items", [], |r| r.get(0))?;
                if rows != BULK_ROWS {
                    return Err(format!(
                        "the merged cr-sqlite replica has {rows} rows, not {BULK_ROWS}"
                    )
                    .into());
                }
            }
        }
        let fazt = total as f64 / secs(median(fazt_t));
        let fazt_again = total as f64 / secs(median(fazt_again_t));
        let cr_n = cr_changes.as_ref().map_or(0, Vec::len) as f64;
        let cr = (!cr_t.is_empty()).then(|| cr_n / secs(median(cr_t)));
        let cr_again = (!cr_again_t.is_empty()).then(|| cr_n / secs(median(cr_again_t)));

        let pass = fazt >= 250_000.0;
        // Per row too: cr-sqlite sends no existence change for a row created by an insert.
        let rows_per_s =
            |changes_per_s: f64, n: f64| thousands(changes_per_s / n * BULK_ROWS as f64);
        println!(
            "   fazt          {:>12} changes/s  ({} rows/s)  target >= 250,000  {}",
            thousands(fazt),
            rows_per_s(fazt, total as f64),
            verdict(pass)
        );
        if let Some(cr) = cr {
            println!(
                "   cr-sqlite     {:>12} changes/s  ({} rows/s)  (fazt {:.2}x cr-sqlite per change)",
                thousands(cr),
                rows_per_s(cr, cr_n),
                fazt / cr
            );
        }
        self.summary.push(Line {
            figure: format!(
                "3. merge remote changes, applies of {}",
                thousands(APPLY_CHUNK as f64)
            ),
            fazt: format!(
                "{} changes/s ({} rows/s)",
                thousands(fazt),
                rows_per_s(fazt, total as f64)
            ),
            plain: "—".into(),
            crsqlite: cr.map_or("—".into(), |c| {
                format!(
                    "{} changes/s ({} rows/s)",
                    thousands(c),
                    rows_per_s(c, cr_n)
                )
            }),
            ratios: cr.map_or("—".into(), |c| {
                format!("fazt {:.2}x cr-sqlite per change", fazt / c)
            }),
            target: "≥ 250,000 changes/s".into(),
            verdict: verdict(pass),
        });

        println!(
            "\n5. Re-applying changes already held: the same {} changes again",
            thousands(total as f64)
        );
        let pass = fazt_again >= 1_000_000.0;
        println!(
            "   fazt          {:>12} changes/s  target >= 1,000,000  {}",
            thousands(fazt_again),
            verdict(pass)
        );
        if let Some(cr) = cr_again {
            println!(
                "   cr-sqlite     {:>12} changes/s  (fazt {:.2}x cr-sqlite)",
                thousands(cr),
                fazt_again / cr
            );
        }
        self.summary.push(Line {
            figure: "5. re-apply changes already held".into(),
            fazt: format!("{} changes/s", thousands(fazt_again)),
            plain: "—".into(),
            crsqlite: cr_again.map_or("—".into(), |c| format!("{} changes/s", thousands(c))),
            ratios: cr_again.map_or("—".into(), |c| {
                format!("fazt {:.1}x cr-sqlite", fazt_again / c)
            }),
            target: "≥ 1,000,000 changes/s".into(),
            verdict: verdict(pass),
        });
        Ok(())
    }

    /// Figures 3b and 5b (no targets): merging many small origin transactions, then the same
    /// again, where the per-transaction work (coverage, grouping) shows rather than the
    /// per-change work.
    fn merge_small_transactions(&mut self, small: &(Replica, Option<CrSqlite>)) -> Res<()> {
        let (src, cr_src) = small;
        let batch = src.batch_since(&Coverage::default())?;
        let total = batch.changes.len();
        let chunks = chunked(&batch, APPLY_CHUNK);
        let cr_changes = cr_src.as_ref().map(CrSqlite::changes).transpose()?;
        println!(
            "\n3b/5b. Merging {} one-row origin transactions ({} changes) in applies of {APPLY_CHUNK}, then again (no target)",
            thousands(SMALL_TXS as f64),
            thousands(total as f64)
        );
        let (mut fazt_t, mut fazt_again_t, mut cr_t, mut cr_again_t) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..self.rounds {
            let mut dst = open_replica(&self.path("merge-small-fazt"))?;
            let start = Instant::now();
            let report = apply_all(&mut dst, &chunks)?;
            fazt_t.push(start.elapsed());
            if report.transactions != SMALL_TXS as usize {
                return Err(format!(
                    "merged {} of {SMALL_TXS} origin transactions",
                    report.transactions
                )
                .into());
            }
            let start = Instant::now();
            let again = apply_all(&mut dst, &chunks)?;
            fazt_again_t.push(start.elapsed());
            if again.already_seen != total {
                return Err(format!("re-applying small transactions: {again:?}").into());
            }
            if let (Some(ext), Some(changes)) = (self.crsqlite.clone(), cr_changes.as_ref()) {
                let mut db = CrSqlite::open(&ext, &self.path("merge-small-crsqlite"))?;
                let pieces: Vec<&[Vec<SqlValue>]> = changes.chunks(APPLY_CHUNK).collect();
                let start = Instant::now();
                db.merge(&pieces)?;
                cr_t.push(start.elapsed());
                let start = Instant::now();
                db.merge(&pieces)?;
                cr_again_t.push(start.elapsed());
            }
        }
        let cr_n = cr_changes.as_ref().map_or(0, Vec::len) as f64;
        for (figure, what, fazt_t, cr_t) in [
            ("3b", "merge", fazt_t, cr_t),
            (
                "5b",
                "re-apply (all already held)",
                fazt_again_t,
                cr_again_t,
            ),
        ] {
            let fazt = total as f64 / secs(median(fazt_t));
            let cr = (!cr_t.is_empty()).then(|| cr_n / secs(median(cr_t)));
            print!(
                "   {what}:\n   fazt          {:>12} changes/s\n",
                thousands(fazt)
            );
            if let Some(cr) = cr {
                println!(
                    "   cr-sqlite     {:>12} changes/s  (fazt {:.2}x cr-sqlite)",
                    thousands(cr),
                    fazt / cr
                );
            }
            self.summary.push(Line {
                figure: format!(
                    "{figure}. {what}, {} one-row origin transactions",
                    thousands(SMALL_TXS as f64)
                ),
                fazt: format!("{} changes/s", thousands(fazt)),
                plain: "—".into(),
                crsqlite: cr.map_or("—".into(), |c| format!("{} changes/s", thousands(c))),
                ratios: cr.map_or("—".into(), |c| format!("fazt {:.2}x cr-sqlite", fazt / c)),
                target: "(none)".into(),
                verdict: "—",
            });
        }
        Ok(())
    }

    /// Figures 4 and 7: streaming every change of the bulk replica (counting only), and
    /// writing them as a bundle into memory.
    fn export(&mut self, bulk: &BulkDbs) -> Res<()> {
        println!(
            "\n4. Exporting changes: every change of the {} rows",
            thousands(BULK_ROWS as f64)
        );
        let (mut stream_t, mut bundle_t, mut cr_t, mut scan_t) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut streamed, mut stream_growth) = (0u64, None);
        let mut bundle_report = None;
        let mut bundle_growth = None;
        let mut cr_n = 0u64;
        for round in 0..self.rounds {
            let ((n, t), growth) = peak_growth(|| {
                let mut n = 0u64;
                let start = Instant::now();
                bulk.fazt.changes_since(&Coverage::default(), |_| {
                    n += 1;
                    Ok(())
                })?;
                Ok((n, start.elapsed()))
            })?;
            stream_t.push(t);
            streamed = n;
            if round == 0 {
                stream_growth = growth;
            }

            let ((report, t), growth) = peak_growth(|| {
                let mut out = Vec::new();
                let start = Instant::now();
                let report = bulk.fazt.export_bundle(
                    &Coverage::default(),
                    &fazt_proto::bundle::SigningKey::from_bytes(&[7; 32]),
                    &mut out,
                )?;
                let t = start.elapsed();
                if report.bytes != out.len() as u64 {
                    return Err(
                        format!("bundle says {} bytes, wrote {}", report.bytes, out.len()).into(),
                    );
                }
                Ok((report, t))
            })?;
            bundle_t.push(t);
            bundle_report = Some(report);
            if round == 0 {
                bundle_growth = growth;
            }

            // The floor: reading the same rows from a plain table.
            let start = Instant::now();
            let mut rows = 0u64;
            let mut stmt = bulk.plain.prepare_cached("SELECT id, a, b, c FROM items")?;
            let mut q = stmt.query([])?;
            while q.next()?.is_some() {
                rows += 1;
            }
            scan_t.push(start.elapsed());
            if rows != BULK_ROWS as u64 {
                return Err(format!("the plain table has {rows} rows").into());
            }

            if let Some(db) = &bulk.crsqlite {
                let start = Instant::now();
                let mut stmt = db.conn.prepare_cached(
                    "SELECT \"table\", pk, cid, val, col_version, db_version, site_id, cl, seq FROM crsql_changes",
                )?;
                let mut q = stmt.query([])?;
                let mut n = 0u64;
                while q.next()?.is_some() {
                    n += 1;
                }
                cr_t.push(start.elapsed());
                cr_n = n;
            }
        }
        let report = bundle_report.expect("at least one round");
        let stream = streamed as f64 / secs(median(stream_t));
        let bundle = report.changes as f64 / secs(median(bundle_t));
        let scan_rows = BULK_ROWS as f64 / secs(median(scan_t));
        let cr = (!cr_t.is_empty()).then(|| cr_n as f64 / secs(median(cr_t)));
        let mib = |k: Option<u64>| {
            k.map_or("unknown".to_string(), |k| {
                format!("{:.1} MiB", k as f64 / 1024.0)
            })
        };
        let pass = stream >= 700_000.0;
        println!(
            "   fazt stream   {:>12} changes/s  ({} changes; peak RSS growth {})  target >= 700,000  {}",
            thousands(stream),
            thousands(streamed as f64),
            mib(stream_growth),
            verdict(pass)
        );
        println!(
            "   fazt bundle   {:>12} changes/s  (into a Vec of {:.1} MiB; peak RSS growth {})",
            thousands(bundle),
            report.bytes as f64 / 1048576.0,
            mib(bundle_growth)
        );
        println!(
            "   plain SQLite  {:>12} rows/s    (SELECT of the rows themselves)",
            thousands(scan_rows)
        );
        if let Some(cr) = cr {
            println!(
                "   cr-sqlite     {:>12} changes/s  (SELECT FROM crsql_changes; fazt {:.2}x cr-sqlite)",
                thousands(cr),
                stream / cr
            );
        }
        self.summary.push(Line {
            figure: "4. export, streaming (changes_since, counting)".into(),
            fazt: format!("{} changes/s", thousands(stream)),
            plain: format!("{} rows/s (table scan)", thousands(scan_rows)),
            crsqlite: cr.map_or("—".into(), |c| format!("{} changes/s", thousands(c))),
            ratios: format!(
                "peak RSS +{}{}",
                mib(stream_growth),
                cr.map_or(String::new(), |c| format!(
                    "; fazt {:.2}x cr-sqlite",
                    stream / c
                ))
            ),
            target: "≥ 700,000 changes/s".into(),
            verdict: verdict(pass),
        });
        self.summary.push(Line {
            figure: "4b. export as a bundle into memory".into(),
            fazt: format!("{} changes/s", thousands(bundle)),
            plain: "—".into(),
            crsqlite: "—".into(),
            ratios: format!(
                "peak RSS +{} (bundle {:.1} MiB)",
                mib(bundle_growth),
                report.bytes as f64 / 1048576.0
            ),
            target: "(none)".into(),
            verdict: "—",
        });

        println!("\n7. Bundle size");
        let per_change = report.bytes as f64 / report.changes as f64;
        let pass = per_change <= 32.0;
        println!(
            "   fazt          {:>12.1} bytes/change  ({} bytes, {} changes, uncompressed)  target <= 32  {}",
            per_change,
            thousands(report.bytes as f64),
            thousands(report.changes as f64),
            verdict(pass)
        );
        self.summary.push(Line {
            figure: "7. bundle bytes per change (uncompressed)".into(),
            fazt: format!("{per_change:.1} B/change"),
            plain: "—".into(),
            crsqlite: "—".into(),
            ratios: format!(
                "{} B for {} changes",
                thousands(report.bytes as f64),
                thousands(report.changes as f64)
            ),
            target: "≤ 32 B/change".into(),
            verdict: verdict(pass),
        });
        Ok(())
    }

    /// Figure 6: what replication stores besides the rows, after VACUUM, against the rows
    /// themselves in a plain table.
    fn metadata_size(&mut self, bulk: &BulkDbs) -> Res<()> {
        println!(
            "\n6. Metadata size after the {}-row bulk insert (VACUUMed, from dbstat)",
            thousands(BULK_ROWS as f64)
        );
        let plain = btree_bytes(&bulk.plain)?;
        let plain_rows = bytes_of(&plain, "items");
        let fazt = btree_bytes(bulk.fazt.conn())?;
        let fazt_meta = total_bytes(&fazt) - bytes_of(&fazt, "items");
        let ratio = fazt_meta as f64 / plain_rows as f64;
        let pass = ratio <= 3.0;
        println!(
            "   plain SQLite  {:>12} bytes of rows",
            thousands(plain_rows as f64)
        );
        println!(
            "   fazt          {:>12} bytes of metadata  {ratio:.2}x the rows  target <= 3x  {}  ({})",
            thousands(fazt_meta as f64),
            verdict(pass),
            describe_metadata(&fazt)
        );
        let mut cr_ratio = None;
        if let Some(db) = &bulk.crsqlite {
            let cr = btree_bytes(&db.conn)?;
            let cr_meta = total_bytes(&cr) - bytes_of(&cr, "items");
            let r = cr_meta as f64 / plain_rows as f64;
            println!(
                "   cr-sqlite     {:>12} bytes of metadata  {r:.2}x the rows  ({})",
                thousands(cr_meta as f64),
                describe_metadata(&cr)
            );
            cr_ratio = Some((cr_meta, r));
        }
        self.summary.push(Line {
            figure: "6. metadata bytes / plain-table bytes".into(),
            fazt: format!("{:.2}x ({} B)", ratio, thousands(fazt_meta as f64)),
            plain: format!("{} B of rows", thousands(plain_rows as f64)),
            crsqlite: cr_ratio.map_or("—".into(), |(b, r)| {
                format!("{r:.2}x ({} B)", thousands(b as f64))
            }),
            ratios: format!(
                "fazt {ratio:.2}x the rows{}",
                cr_ratio.map_or(String::new(), |(_, r)| format!("; cr-sqlite {r:.2}x"))
            ),
            target: "≤ 3x".into(),
            verdict: verdict(pass),
        });
        Ok(())
    }

    /// The summary as a Markdown table, figure order, for docs/performance.md.
    fn markdown(&self) -> String {
        let mut out = String::from(
            "| Figure | fazt | plain SQLite | cr-sqlite | Ratios | Target | |\n|---|---|---|---|---|---|---|\n",
        );
        let mut lines: Vec<&Line> = self.summary.iter().collect();
        lines.sort_by(|a, b| a.figure.cmp(&b.figure));
        for l in lines {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} |",
                l.figure, l.fazt, l.plain, l.crsqlite, l.ratios, l.target, l.verdict
            );
        }
        out
    }
}
