"""The observer of scripts/bench-peers and scripts/bench-mesh: watches fazt nodes from outside
(their database files read-only, their HTTP ports, /proc), so the observing side pays no
process start. Each command prints shell assignments the script evaluates."""
import json, math, os, random, re, sqlite3, subprocess, sys, time

now = time.perf_counter

def ro(path):
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, timeout=10)

def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, math.ceil(p / 100 * len(xs)) - 1)]

# --- scripts/bench-peers ------------------------------------------------------------------
def fazt_sql(fazt, db, sql):
    """Starts `fazt sql` on a database; the caller waits (see done())."""
    return subprocess.Popen([fazt, "--db", db, "sql", sql], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

def latency(fazt, a, b, n, warmup):
    """Inserts one row at a time on A; times when A's command returns and when B holds the row."""
    seen_b = ro(b)
    from_return, from_start, lost, early = [], [], 0, 0
    tag = f"{os.getpid()}-{time.time_ns()}"
    for i in range(warmup + n):
        key = f"lat-{tag}-{i}"
        start = now()
        p = fazt_sql(fazt, a, f"INSERT INTO kv (k, v) VALUES ('{key}', '{i}')")
        returned = seen = None
        while returned is None or seen is None:
            t = now()
            if returned is None and p.poll() is not None:
                returned = t
                if p.returncode != 0:
                    sys.exit(f"fazt sql on A failed: {p.stderr.read().decode().strip()}")
            if seen is None and seen_b.execute("SELECT 1 FROM kv WHERE k = ?", (key,)).fetchone():
                seen = t
            if t - start > 10:
                break
            time.sleep(0.001)
        if i < warmup:
            continue
        if seen is None or returned is None:
            lost += 1
            continue
        if seen < returned:
            early += 1
        from_return.append(max(0.0, seen - returned) * 1000)
        from_start.append((seen - start) * 1000)
    ok = from_return or [float("nan")]
    ok_start = from_start or [float("nan")]
    print(f"lat_p50={pct(ok, 50):.1f} lat_p99={pct(ok, 99):.1f} lat_max={max(ok):.1f}")
    print(f"lat_start_p50={pct(ok_start, 50):.1f} lat_start_p99={pct(ok_start, 99):.1f}")
    print(f"lat_lost={lost} lat_early={early} lat_n={len(from_return)}")

def done(p):
    if p.poll() is None:
        return False
    if p.returncode != 0:
        sys.exit(f"fazt sql failed: {p.stderr.read().decode().strip()}")
    return True

def coverage(fazt, db):
    out = subprocess.run([fazt, "--db", db, "sync", "status", "--json"], capture_output=True, check=True).stdout
    return sorted((o["site_id"], o["ranges"]) for o in json.loads(out)["coverage"])

def mesh(fazt, writes, parallel, seed, dbs):
    """Writes rows on random nodes, then times until every node holds them all and until
    every node reports the same coverage."""
    rng = random.Random(seed)
    watch = [ro(d) for d in dbs]
    start = now()
    running = []
    for i in range(writes):
        k = rng.randrange(len(dbs))
        # A burst: several commands in flight at once, as several users would.
        while len(running) >= parallel:
            time.sleep(0.0005)
            running = [p for p in running if not done(p)]
        running.append(fazt_sql(fazt, dbs[k], f"INSERT INTO kv (k, v) VALUES ('mesh-{i}', 'n{k}')"))
    while running:
        time.sleep(0.0005)
        running = [p for p in running if not done(p)]
    last = now()
    reached = [None] * len(dbs)
    while any(r is None for r in reached) and now() - last < 60:
        t = now()
        for j, c in enumerate(watch):
            if reached[j] is None and c.execute("SELECT count(*) FROM kv WHERE k LIKE 'mesh-%'").fetchone()[0] == writes:
                reached[j] = t
        time.sleep(0.002)
    rows_s = max(r - last for r in reached) if all(r is not None for r in reached) else float("nan")
    heads_s = float("nan")
    while now() - last < 60:
        if len({json.dumps(coverage(fazt, d)) for d in dbs}) == 1:
            heads_s = now() - last
            break
        time.sleep(0.01)
    missing = sum(r is None for r in reached)
    print(f"mesh_write_s={last - start:.2f} mesh_rows_s={rows_s:.3f} mesh_heads_s={heads_s:.3f} mesh_missing={missing}")
    print(f"mesh_origins={len(coverage(fazt, dbs[0]))}")

def gen(directory, count, seed):
    """Incompressible files, the same bytes for the same seed."""
    rng = random.Random(seed)
    os.makedirs(directory, exist_ok=True)
    for i in range(count):
        with open(os.path.join(directory, f"f{i:03d}.bin"), "wb") as out:
            out.write(rng.randbytes(1 << 20))

def baseline(source_db, plain_db, files, copy_dir):
    """The lower bound: the same rows into a fresh plain SQLite file (same pragmas as a node,
    one transaction), and the same files copied and fsynced."""
    start = now()
    rows = ro(source_db).execute("SELECT id, a, b FROM items").fetchall()
    dst = sqlite3.connect(plain_db, isolation_level=None)
    dst.execute("PRAGMA journal_mode=WAL")
    dst.execute("PRAGMA synchronous=FULL")
    dst.execute("CREATE TABLE items (id INTEGER PRIMARY KEY NOT NULL, a TEXT NOT NULL DEFAULT '', b INTEGER NOT NULL DEFAULT 0)")
    dst.execute("BEGIN")
    dst.executemany("INSERT INTO items VALUES (?, ?, ?)", rows)
    dst.execute("COMMIT")
    dst.close()
    rows_s = now() - start
    start = now()
    os.makedirs(copy_dir, exist_ok=True)
    total = 0
    for name in sorted(os.listdir(files)):
        with open(os.path.join(files, name), "rb") as src, open(os.path.join(copy_dir, name), "wb") as dst:
            data = src.read()
            dst.write(data)
            dst.flush()
            os.fsync(dst.fileno())
            total += len(data)
    files_s = now() - start
    print(f"base_rows={len(rows)} base_rows_s={rows_s:.3f} base_files_s={files_s:.3f} base_bytes={total}")

UNITS = {"B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}

def size(text):
    value, unit = text.split()
    return int(float(value) * UNITS[unit])

def synced(text, prefix):
    """The figures of `fazt peer sync`'s last line; sizes under 1 KiB are exact."""
    m = re.search(r"in ([\d.]+)s: sent (\d+) changes and ([\d.]+ [KMGT]?B) of content \(([\d.]+ [KMGT]?B) in all\), "
                  r"received (\d+) changes and ([\d.]+ [KMGT]?B) of content \(([\d.]+ [KMGT]?B) in all\)", text)
    if not m:
        sys.exit(f"cannot read the figures of `fazt peer sync`: {text.strip()!r}")
    secs, sc, scont, sall, rc, rcont, rall = m.groups()
    print(f"{prefix}_reported_s={secs} {prefix}_sent_changes={sc} {prefix}_sent_content={size(scont)} "
          f"{prefix}_sent_bytes={size(sall)} {prefix}_received_changes={rc} {prefix}_received_content={size(rcont)} "
          f"{prefix}_received_bytes={size(rall)} {prefix}_sent_text={sall.replace(' ', '_')} "
          f"{prefix}_received_text={rall.replace(' ', '_')}")

def udp(prefix, trace_prefix):
    """UDP payload bytes the traced process sent and received (QUIC packets: handshake, TLS,
    acknowledgements and the protocol's frames), from `strace -ff` output."""
    sent = received = sent_n = received_n = 0
    d = os.path.dirname(trace_prefix)
    for name in os.listdir(d):
        if not name.startswith(os.path.basename(trace_prefix) + "."):
            continue
        for line in open(os.path.join(d, name), errors="replace"):
            call = line.split("(", 1)[0].strip()
            if call in ("sendmsg", "sendto", "recvmsg", "recvfrom"):
                m = re.search(r"= (\d+)$", line.strip())
                if m:
                    n = int(m.group(1))
                    if call.startswith("send"):
                        sent += n
                        sent_n += 1
                    else:
                        received += n
                        received_n += 1
            elif call in ("sendmmsg", "recvmmsg"):
                # Each message's length, not its control messages' (cmsg_len).
                lens = [int(x) for x in re.findall(r"(?<![a-z_])msg_len=(\d+)", line)]
                if call == "sendmmsg":
                    sent += sum(lens)
                    sent_n += len(lens)
                else:
                    received += sum(lens)
                    received_n += len(lens)
    print(f"{prefix}_udp_sent={sent} {prefix}_udp_received={received} {prefix}_udp_sent_n={sent_n} {prefix}_udp_received_n={received_n}")

cmd = sys.argv[1]
if cmd == "latency":
    latency(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
elif cmd == "mesh":
    mesh(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
elif cmd == "gen":
    gen(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
elif cmd == "baseline":
    baseline(*sys.argv[2:6])
elif cmd == "synced":
    synced(sys.stdin.read(), sys.argv[2])
elif cmd == "udp":
    udp(sys.argv[2], sys.argv[3])
else:
    sys.exit(f"observe.py: unknown command {cmd}")
