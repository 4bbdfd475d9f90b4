"""The observer of scripts/bench-peers and scripts/bench-mesh: watches fazt nodes from outside
(their database files read-only, their HTTP ports, /proc), so the observing side pays no
process start. Each command prints shell assignments the script evaluates."""
import hashlib, http.client, json, math, os, random, re, signal, sqlite3, statistics, subprocess, sys, tempfile, threading, time

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

# --- scripts/bench-mesh -------------------------------------------------------------------
HZ = os.sysconf("SC_CLK_TCK")
FSYNC_MODE = os.environ.get("BENCH_FSYNC_MODE", "none")
FSYNC = re.compile(r"^\d+\s+(fsync|fdatasync)\(")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
APPLIED = re.compile(r"\bapplied=(\d+)")
SEEN = re.compile(r"\balready_seen=(\d+)")

class Node:
    """One running server, from a line of the node file: name, database, HTTP port, pid of
    the fazt process, its strace log of fsyncs (or -), its stderr, number of peers."""

    def __init__(self, line):
        self.name, self.db, port, pid, trace, self.log, degree = line.split()
        self.port, self.pid, self.degree = int(port), int(pid), int(degree)
        self.trace = None if trace == "-" else trace
        self.conn = None
        self.http = None

    def ticks(self):
        """User plus system CPU of the server, all its threads, dead ones included."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    def rss_kb(self):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fsyncs(self):
        """fsync and fdatasync calls the server made so far (strace's log, one line a call)."""
        if self.trace is None:
            return 0
        with open(self.trace, errors="replace") as f:
            return sum(1 for line in f if FSYNC.match(line))

    def groups(self):
        """Groups of changes this server applied, those of them that merged no origin
        transaction (everything in them was held already), groups it sent, changes it
        received that it held already (duplicates), and changes it applied: from the debug
        lines of fazt::peer::session in its stderr ("applied a group" carries applied= and
        already_seen=)."""
        received = empty = sent = seen = applied = 0
        if self.log == "-":
            return (0, 0, 0, 0, 0)
        with open(self.log, errors="replace") as f:
            for line in f:
                if "a group" not in line:
                    continue
                line = ANSI.sub("", line)
                if "applied a group" in line:
                    received += 1
                    empty += " transactions=0" in line
                    m = APPLIED.search(line)
                    applied += int(m.group(1)) if m else 0
                    m = SEEN.search(line)
                    seen += int(m.group(1)) if m else 0
                elif "sent a group" in line:
                    sent += 1
        return (received, empty, sent, seen, applied)

    def current(self, apps):
        """The hash of t.txt in the current version of each of these apps, as this node's
        database holds them."""
        if self.conn is None:
            self.conn = ro(self.db)
        marks = ",".join("?" * len(apps))
        try:
            return dict(self.conn.execute(
                "SELECT a.name, f.hash FROM apps a JOIN version_files f"
                f" ON f.version_id = a.current_version AND f.path = 't.txt' WHERE a.name IN ({marks})",
                list(apps)).fetchall())
        except sqlite3.OperationalError:
            return {}

    def get(self, host, path):
        """One GET over a kept-alive connection: (status, body), or (None, b"") when it fails."""
        for _ in range(2):
            try:
                if self.http is None:
                    self.http = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
                self.http.request("GET", path, headers={"Host": host})
                r = self.http.getresponse()
                return r.status, r.read()
            except (OSError, http.client.HTTPException):
                self.http.close()
                self.http = None
        return None, b""

def load_nodes(path):
    with open(path) as f:
        return [Node(line) for line in f if line.strip()]

class Window:
    """What every server used between its opening and close(): CPU, fsyncs (by the means
    BENCH_FSYNC_MODE names: perf, strace or none) and groups of changes."""

    def __init__(self, nodes, work):
        self.nodes = nodes
        self.perf = None
        if FSYNC_MODE == "perf":
            # Kernel counters of the two system calls in every thread of every server, its
            # future threads included; nothing stops the servers.
            fd, self.perf_out = tempfile.mkstemp(suffix=".perf", dir=work)
            os.close(fd)
            self.perf = subprocess.Popen(
                ["perf", "stat", "-x,", "-e", "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync",
                 "-p", ",".join(str(n.pid) for n in nodes), "-o", self.perf_out],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)
        self.t = now()
        self.ticks = [n.ticks() for n in nodes]
        self.traced = [n.fsyncs() for n in nodes]
        self.received = [n.groups() for n in nodes]

    def close(self):
        """Sets span (s), cpu_ms (per node), fsyncs (all nodes), fsyncs_each (per node, or
        None when only the total is known), groups (received, of them nothing new, sent:
        means over nodes) and duplicates (per node: changes received that it held already,
        divided by the changes the window's writes made)."""
        self.span = now() - self.t
        self.cpu_ms = [(n.ticks() - a) * 1000 / HZ for n, a in zip(self.nodes, self.ticks)]
        self.fsyncs_each = None
        if self.perf is not None:
            self.perf.send_signal(signal.SIGINT)
            self.perf.wait()
            with open(self.perf_out) as f:
                self.fsyncs = sum(int(line.split(",")[0]) for line in f if line[:1].isdigit())
        else:
            self.fsyncs_each = [n.fsyncs() - a for n, a in zip(self.nodes, self.traced)]
            self.fsyncs = sum(self.fsyncs_each)
        later = [n.groups() for n in self.nodes]
        self.groups = [statistics.mean(b[i] - a[i] for a, b in zip(self.received, later)) for i in range(3)]
        # Every change a write made is applied once by each node but its origin: the changes
        # made are what all nodes applied divided by N - 1 (writes that conflict with nothing,
        # as the benchmark's deploys, apply every change they carry).
        made = sum(b[4] - a[4] for a, b in zip(self.received, later)) / max(1, len(self.nodes) - 1)
        self.duplicates = [(b[3] - a[3]) / made if made else float("nan") for a, b in zip(self.received, later)]
        return self

    def cost(self, writes, idle):
        """Per node per write, less what the nodes use when idle over the same span: mean and
        busiest node's CPU ms, mean and most fsyncs of a node (nan when unknown); then the
        groups received, received with nothing new, and sent; then duplicates received per
        change, mean over nodes and most on one node (per change, not per write)."""
        span, n = self.span, len(self.nodes)
        cpu = [c - idle["cpu_ms"] * span for c in self.cpu_ms]
        fs = (self.fsyncs - idle["fsyncs"] * span * n) / n
        fs_max = max(self.fsyncs_each) - idle["fsyncs"] * span if self.fsyncs_each else float("nan")
        return (statistics.mean(cpu) / writes, max(cpu) / writes, fs / writes, fs_max / writes,
                *(g / writes for g in self.groups), statistics.mean(self.duplicates), max(self.duplicates))

def settle(nodes, idle, limit=15.0, step=0.5):
    """Waits until the servers together use about as much CPU as when idle (replication may
    go on after every node serves a change: coverage, relays, bookkeeping)."""
    end = now() + limit
    prev, t0 = sum(n.ticks() for n in nodes), now()
    while now() < end:
        time.sleep(step)
        cur, t1 = sum(n.ticks() for n in nodes), now()
        if (cur - prev) * 1000 / HZ <= 1.5 * idle["cpu_ms"] * len(nodes) * (t1 - t0) + 2000 / HZ:
            return
        prev, t0 = cur, t1

def deploy(fazt, node, app, content, work, extra=None):
    """Starts `fazt app deploy` of one file, t.txt, as a new version of an app on a node
    (with `extra`, a second file: {name: bytes})."""
    d = os.path.join(work, f"{app}-{hashlib.sha256(content).hexdigest()[:12]}")
    os.makedirs(d, exist_ok=True)
    for name, data in [("t.txt", content), *(extra or {}).items()]:
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
    return Deploy([fazt, "--db", node.db, "app", "deploy", d, "--name", app])

class Deploy:
    """A running `fazt app deploy`; a thread notes when it returns, so a slow HTTP answer in
    the polling loop does not delay the note."""

    def __init__(self, argv):
        self.p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.returned = None
        self.thread = threading.Thread(target=self._wait, daemon=True)
        self.thread.start()

    def _wait(self):
        self.p.wait()
        self.returned = now()

    def done(self):
        """The time it returned, or None while it runs; exits when it failed."""
        if self.returned is not None and self.p.returncode != 0:
            sys.exit(f"fazt app deploy failed: {self.p.stderr.read().decode().strip()}")
        return self.returned

def serve_all(nodes, expect, deploys, limit):
    """Polls until every node serves every app's expected t.txt over HTTP. A node's database
    says first when the version is there (cheap, from outside); then its HTTP port is asked
    until it serves the bytes. Polling HTTP alone would cost the servers more CPU than the
    change itself. Returns {(node index, app): time served} and each deploy's return time."""
    hashes = {app: hashlib.sha256(c).hexdigest() for app, c in expect.items()}
    pending = [set(expect) for _ in nodes]
    confirm = [set() for _ in nodes]
    served = {}
    end = now() + limit
    while now() < end:
        round_start = now()
        for d in deploys:
            d.done()
        busy = False
        for j, node in enumerate(nodes):
            if not pending[j]:
                continue
            busy = True
            unseen = pending[j] - confirm[j]
            for app, h in (node.current(unseen) if unseen else {}).items():
                if h == hashes[app]:
                    confirm[j].add(app)
            for app in list(confirm[j]):
                status, body = node.get(f"{app}.localhost", "/t.txt")
                if status == 200 and body == expect[app]:
                    served[(j, app)] = now()
                    pending[j].discard(app)
                    confirm[j].discard(app)
        if not busy and all(d.done() is not None for d in deploys):
            break
        # The observer shares the cores with the servers: it polls at most a third of the
        # time, but waits at most 20 ms between rounds. A round's GETs are work that has to be
        # done once anyway (each pair is asked once it is in the database); waiting twice
        # their time after a long round delayed the figures by seconds at 40 and 60 nodes
        # (the servers' logs showed every change applied 2.5 s into a burst measured as 7 s).
        time.sleep(min(0.02, max(0.002, 2 * (now() - round_start))))
    for d in deploys:
        d.thread.join()
    return served, [d.done() for d in deploys]

def down(fazt, nodes_file):
    """Peer links not (yet) connected, summed over nodes, as each running server reports them."""
    missing = 0
    for node in load_nodes(nodes_file):
        out = subprocess.run([fazt, "--db", node.db, "peer", "status", "--json"],
                             capture_output=True, check=True).stdout
        peers = json.loads(out)
        missing += sum(not p["connected"] for p in peers) + max(0, node.degree - len(peers))
    print(missing)

def sessions(nodes_file, links_file, prefix):
    """Sessions started per link so far: each end logs "replicating peer=<name>" (INFO of
    fazt::peer::service) when a session with that peer starts, whoever dialled. One session
    per pair of peers shows as 1 at both ends."""
    started = {}
    for node in load_nodes(nodes_file):
        with open(node.log, errors="replace") as f:
            for line in f:
                m = re.search(r"replicating peer=(\S+)", ANSI.sub("", line))
                if m:
                    started[(node.name, m.group(1))] = started.get((node.name, m.group(1)), 0) + 1
    with open(links_file) as f:
        links = [line.split() for line in f if line.strip()]
    per_link = [(started.get((a, b), 0) + started.get((b, a), 0)) / 2 for a, b in links]
    print(f"{prefix}_per_link={statistics.mean(per_link):.2f} "
          f"{prefix}_multi={100 * sum(s > 1 for s in per_link) / len(per_link):.0f}")

def rss(nodes_file, out):
    with open(out, "w") as f:
        json.dump([n.rss_kb() for n in load_nodes(nodes_file)], f)

def probe(port, host, path, seconds, out):
    """Static requests one after another, 5 ms apart, on one kept-alive connection, each timed,
    until `seconds` have passed or SIGTERM; writes the latencies (ms) and failures to `out`."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    parent = os.getppid()
    node = Node(f"probe - {port} 0 - - 0")
    times, failed = [], 0
    end = now() + seconds if seconds > 0 else float("inf")
    while not stop and now() < end and os.getppid() == parent:
        t = now()
        status, _ = node.get(host, path)
        if status == 200:
            times.append((now() - t) * 1000)
        else:
            failed += 1
        time.sleep(0.005)
    with open(out, "w") as f:
        json.dump({"ms": times, "failed": failed}, f)

def probe_figures(out, prefix):
    with open(out) as f:
        r = json.load(f)
    ms = r["ms"] or [float("nan")]
    return (f"{prefix}_n={len(r['ms'])} {prefix}_failed={r['failed']} {prefix}_p50={pct(ms, 50):.1f} "
            f"{prefix}_p99={pct(ms, 99):.1f} {prefix}_max={max(ms):.1f}")

def median(xs):
    return statistics.median(xs) if xs else float("nan")

def mesh_run(fazt, nodes_file, work, reps, burst_writes, seed):
    """Everything after the nodes are connected: warm-up deploys, idle cost, single tiny
    deploys, and a burst of concurrent ones with HTTP timed on one node meanwhile."""
    nodes = load_nodes(nodes_file)
    n = len(nodes)
    rng = random.Random(seed)
    out = []
    me = os.path.abspath(__file__)
    # The burst's writers: one deploy per node, on distinct nodes other than the probed n0
    # when there are enough, else on every node (fewer deploys: two at once on one node
    # would measure how they wait for each other).
    burst_writes = min(burst_writes, n)
    writers = rng.sample(range(1, n), burst_writes) if n > burst_writes else list(range(n))
    burst_apps = [f"burst{i}" for i in range(burst_writes)]

    # Warm-up: every app the benchmark uses exists everywhere before anything is measured.
    # The probed app also holds p.txt, the 1 KiB file requested while the burst replicates.
    expect = {"tiny": b"w0000\n", "probe": b"p0000\n"}
    ps = [deploy(fazt, nodes[0], "tiny", expect["tiny"], work),
          deploy(fazt, nodes[0], "probe", expect["probe"], work,
                 {"p.txt": bytes(random.Random(seed).choices(b"abcdefghijklmnopqrstuvwxyz", k=1024))})]
    for i, (w, app) in enumerate(zip(writers, burst_apps)):
        expect[app] = f"w{i + 1:04d}\n".encode()
        ps.append(deploy(fazt, nodes[w], app, expect[app], work))
    start = now()
    served, _ = serve_all(nodes, expect, ps, 120)
    missing = n * len(expect) - len(served)
    out.append(f"warm_s={now() - start:.2f} warm_missing={missing}")
    if missing:
        sys.exit(f"warm-up: {missing} app versions not served within 120 s")
    for node in nodes:
        if node.get("probe.localhost", "/p.txt")[0] != 200:
            sys.exit(f"{node.name} does not serve probe.localhost/p.txt")

    # Idle: 5 s with nothing happening, once the warm-up's work has settled.
    settle(nodes, {"cpu_ms": 10.0, "fsyncs": 0})
    time.sleep(1)
    w = Window(nodes, work)
    time.sleep(5)
    w.close()
    per_node = [c / w.span for c in w.cpu_ms]
    idle = {"cpu_ms": statistics.mean(per_node), "fsyncs": w.fsyncs / n / w.span}
    out.append(f"idle_cpu_ms={idle['cpu_ms']:.1f} idle_cpu_max_ms={max(per_node):.1f} idle_fsyncs={idle['fsyncs']:.2f}")

    # Single tiny deploys (one 6-byte file), each from a random node, one at a time.
    every, nodes_s, starts, costs, windows, lost = [], [], [], [], [], 0
    for r in range(reps):
        origin = rng.randrange(n)
        content = f"s{r:04d}\n".encode()
        w = Window(nodes, work)
        t0 = now()
        p = deploy(fazt, nodes[origin], "tiny", content, work)
        served, (returned,) = serve_all(nodes, {"tiny": content}, [p], 60)
        if len(served) < n:
            lost += 1
        else:
            times = [max(0.0, t - returned) for t in served.values()]
            every.append(max(times))
            starts.append(max(served.values()) - t0)
            nodes_s.extend(times)
        settle(nodes, idle)
        costs.append(w.close().cost(1, idle))
        windows.append(w.span)
    nan = float("nan")
    out.append(f"single_n={reps} single_lost={lost} single_all_med={median(every):.2f} "
               f"single_all_max={max(every, default=nan):.2f} single_node_med={median(nodes_s):.2f} "
               f"single_start_med={median(starts):.2f} single_window_s={statistics.mean(windows):.1f}")
    cpu, cpu_max, fs, fs_max, got, empty, sent, dup, dup_max = (statistics.mean(c[i] for c in costs) for i in range(9))
    out.append(f"single_cpu_ms={cpu:.1f} single_cpu_max_ms={cpu_max:.1f} single_fsyncs={fs:.1f} single_fsyncs_max={fs_max:.1f}")
    out.append(f"single_groups={got:.1f} single_groups_empty={empty:.1f} single_groups_sent={sent:.1f}")
    out.append(f"single_dups={dup:.2f} single_dups_max={dup_max:.2f}")

    # A burst: burst_writes deploys at once, while n0 serves a static file to a client that
    # times each request. First the same client on the idle node, for comparison.
    probe_cmd = [sys.executable, me, "probe", str(nodes[0].port), "probe.localhost", "/p.txt"]
    idle_out, busy_out = os.path.join(work, "probe-idle.json"), os.path.join(work, "probe-burst.json")
    subprocess.run(probe_cmd + ["2", idle_out], check=True)
    out.append(probe_figures(idle_out, "probe_idle"))
    probe_p = subprocess.Popen(probe_cmd + ["0", busy_out])
    try:
        time.sleep(0.2)
        expect = {app: f"b{i:03d}x\n".encode() for i, app in enumerate(burst_apps)}
        w = Window(nodes, work)
        t0 = now()
        ps = [deploy(fazt, nodes[w], app, expect[app], work) for w, app in zip(writers, burst_apps)]
        served, returned = serve_all(nodes, expect, ps, 120)
    finally:
        probe_p.send_signal(signal.SIGTERM)
        probe_p.wait()
    out.append(probe_figures(busy_out, "probe_burst"))
    missing = n * len(expect) - len(served)
    per_change = [max(0.0, max(served[(j, app)] for j in range(n)) - returned[i])
                  for i, app in enumerate(burst_apps) if all((j, app) in served for j in range(n))]
    last_return = max(returned)
    out.append(f"burst_writes={burst_writes} burst_missing={missing} "
               f"burst_deploy_s={last_return - t0:.2f} burst_deploy_med={median([r - t0 for r in returned]):.2f} "
               f"burst_all_s={(max(served.values()) - t0) if not missing else nan:.2f} "
               f"burst_change_med={median(per_change):.2f} burst_change_max={max(per_change, default=nan):.2f}")
    settle(nodes, idle)
    cpu, cpu_max, fs, fs_max, got, empty, sent, dup, dup_max = w.close().cost(burst_writes, idle)
    out.append(f"burst_cpu_ms={cpu:.1f} burst_cpu_max_ms={cpu_max:.1f} burst_fsyncs={fs:.1f} burst_fsyncs_max={fs_max:.1f}")
    out.append(f"burst_groups={got:.1f} burst_groups_empty={empty:.1f} burst_groups_sent={sent:.1f}")
    out.append(f"burst_dups={dup:.2f} burst_dups_max={dup_max:.2f}")
    print("\n".join(out))

def rss_figures(nodes_file, alone_file, connected_file):
    """RSS per node (MB, 10^6 bytes) alone, with its sessions, and now; and per peer session
    (median over nodes of the growth divided by the node's number of peers)."""
    nodes = load_nodes(nodes_file)
    with open(alone_file) as f:
        alone = json.load(f)
    with open(connected_file) as f:
        connected = json.load(f)
    end = [node.rss_kb() for node in nodes]
    mb = lambda kb: kb * 1024 / 1e6
    per_session = [mb(c - a) / node.degree for node, a, c in zip(nodes, alone, connected)]
    per_session_end = [mb(e - a) / node.degree for node, a, e in zip(nodes, alone, end)]
    print(f"rss_alone={mb(median(alone)):.1f} rss_connected={mb(median(connected)):.1f} "
          f"rss_end={mb(median(end)):.1f} rss_end_max={mb(max(end)):.1f} "
          f"session_mb={median(per_session):.2f} session_end_mb={median(per_session_end):.2f}")

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
elif cmd == "down":
    down(sys.argv[2], sys.argv[3])
elif cmd == "sessions":
    sessions(sys.argv[2], sys.argv[3], sys.argv[4])
elif cmd == "rss":
    rss(sys.argv[2], sys.argv[3])
elif cmd == "rss-figures":
    rss_figures(sys.argv[2], sys.argv[3], sys.argv[4])
elif cmd == "probe":
    probe(int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6])
elif cmd == "mesh-run":
    mesh_run(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7]))
else:
    sys.exit(f"observe.py: unknown command {cmd}")
