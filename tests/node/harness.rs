//! Drives the real `fazt` binary: a temporary database, CLI runs, and servers on loopback.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

pub const FAZT: &str = env!("CARGO_BIN_EXE_fazt");

/// A node: a temporary directory holding its database (and whatever else a test writes).
pub struct Node {
    pub dir: tempfile::TempDir,
}

pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Node {
    pub fn new() -> Node {
        Node {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    pub fn db(&self) -> PathBuf {
        self.dir.path().join("data.db")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(FAZT);
        cmd.env("FAZT_DB", self.db())
            .env_remove("FAZT_LOG")
            .stdin(Stdio::null());
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        let out: Output = self.command().args(args).output().expect("run fazt");
        Run {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(
            r.status.success(),
            "fazt {args:?} failed:\n{}{}",
            r.stdout,
            r.stderr
        );
        r.stdout
    }

    /// Runs a command that must fail with a one-line error and exit status 1 (docs/cli.md);
    /// returns that line.
    pub fn fails(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(
            r.status.code(),
            Some(1),
            "fazt {args:?} should fail with exit status 1, but printed:\n{}{}",
            r.stdout,
            r.stderr
        );
        let lines: Vec<&str> = r
            .stderr
            .lines()
            .filter(|l| !l.starts_with("created database"))
            .collect();
        assert_eq!(
            lines.len(),
            1,
            "want a one-line error from {args:?}, got:\n{}",
            r.stderr
        );
        assert!(lines[0].starts_with("error: "), "{}", lines[0]);
        lines[0].to_string()
    }

    /// Runs a command line the argument parser refuses (unknown flag, missing argument): exit
    /// status 2, an `error: ` line first and the usage after it (docs/cli.md); returns that line.
    pub fn fails_usage(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert_eq!(
            r.status.code(),
            Some(2),
            "fazt {args:?} should be refused as a usage error, but printed:\n{}{}",
            r.stdout,
            r.stderr
        );
        let first = r.stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: "), "{}", r.stderr);
        assert!(r.stderr.contains("Usage: fazt"), "{}", r.stderr);
        first.to_string()
    }

    /// Everything the database holds, schema and rows of every table (replicated and
    /// node-local alike), as one sorted text: equal before and after a refused command
    /// means it changed nothing (compare with [`assert_same_state`]). Read-only; works while
    /// a server runs.
    pub fn state(&self) -> String {
        self.state_without(&[])
    }

    /// [`Node::state`] without the named tables: for a node whose running server legitimately
    /// writes node-local bookkeeping meanwhile. Each caller says which tables and why.
    pub fn state_without(&self, skipped: &[&str]) -> String {
        use rusqlite::types::ValueRef;
        let conn = rusqlite::Connection::open_with_flags(
            self.db(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open database read-only");
        let mut out = String::new();
        let mut schema = conn
            .prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name")
            .unwrap();
        let mut tables = Vec::new();
        let rows = schema
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<String>>(3)?,
                ))
            })
            .unwrap();
        for row in rows {
            let (kind, name, sql) = row.unwrap();
            out.push_str(&format!("{kind} {name}: {}\n", sql.unwrap_or_default()));
            if kind == "table" && !name.starts_with("sqlite_") && !skipped.contains(&name.as_str())
            {
                tables.push(name);
            }
        }
        for table in tables {
            let mut stmt = conn.prepare(&format!("SELECT * FROM \"{table}\"")).unwrap();
            let columns = stmt.column_count();
            let mut lines: Vec<String> = stmt
                .query_map([], |r| {
                    let mut line = String::new();
                    for i in 0..columns {
                        line.push_str(&match r.get_ref(i)? {
                            ValueRef::Null => "NULL".to_string(),
                            ValueRef::Integer(v) => v.to_string(),
                            ValueRef::Real(v) => format!("{v:?}"),
                            ValueRef::Text(t) => format!("{:?}", String::from_utf8_lossy(t)),
                            ValueRef::Blob(b) => format!("x'{}'", hex::encode(b)),
                        });
                        line.push('|');
                    }
                    Ok(line)
                })
                .unwrap()
                .map(|l| l.unwrap())
                .collect();
            lines.sort();
            out.push_str(&format!("== {table} ({} rows)\n", lines.len()));
            for line in lines {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.ok(args);
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("{args:?} printed invalid JSON ({e}):\n{out}"))
    }

    /// Writes a site directory from (path, content) pairs; returns its path.
    pub fn site(&self, name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.path(name);
        for (rel, content) in files {
            write(&dir.join(rel), content.as_bytes());
        }
        dir
    }

    /// Deploys and returns the `--json` report.
    pub fn deploy(&self, dir: &Path, extra: &[&str]) -> serde_json::Value {
        let mut args = vec!["app", "deploy", dir.to_str().unwrap(), "--json"];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    pub fn start(&self, extra: &[&str]) -> Server {
        let mut args = vec!["server", "start", "--port", "0"];
        args.extend_from_slice(extra);
        Server::spawn(self.command().args(&args))
    }
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// A running `fazt server start`, stopped with SIGKILL when dropped.
pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub banner: String,
    client: reqwest::blocking::Client,
}

impl Server {
    pub fn spawn(cmd: &mut Command) -> Server {
        Server::spawn_with_stderr(cmd, Stdio::piped())
    }

    /// [`Server::spawn`] with the server's log (its stderr) appended to the file `log`, which a
    /// test can read while the server runs.
    pub fn spawn_logging(cmd: &mut Command, log: &Path) -> Server {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open the server's log");
        Server::spawn_with_stderr(cmd, Stdio::from(file))
    }

    fn spawn_with_stderr(cmd: &mut Command, stderr: Stdio) -> Server {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn server");
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        reader.read_line(&mut banner).unwrap();
        if banner.is_empty() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "server did not start: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let port = banner
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|hostport| hostport.rsplit(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in banner {banner:?}"));
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in reader.lines() {});
        let client = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Server {
            child: Some(child),
            port,
            banner,
            client,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// A request to this server with the given Host header.
    pub fn request(
        &self,
        method: reqwest::Method,
        host: &str,
        path: &str,
    ) -> reqwest::blocking::RequestBuilder {
        self.client
            .request(method, format!("http://127.0.0.1:{}{path}", self.port))
            .header("Host", host)
    }

    pub fn get(&self, host: &str, path: &str) -> reqwest::blocking::Response {
        self.request(reqwest::Method::GET, host, path)
            .send()
            .expect("GET")
    }

    /// Body text of a GET that must answer 200.
    pub fn text(&self, host: &str, path: &str) -> String {
        let r = self.get(host, path);
        assert_eq!(r.status(), 200, "GET {host}{path}");
        r.text().unwrap()
    }

    /// Sends a signal and waits for the process to exit.
    pub fn stop_with(&mut self, signal: &str) -> Run {
        let child = self.child.take().unwrap();
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let out = child.wait_with_output().unwrap();
        Run {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Asserts that two [`Node::state`] texts are equal; when they are not, shows only the lines
/// that differ, under the table (or schema) they belong to, instead of both whole texts.
#[track_caller]
pub fn assert_same_state(before: &str, after: &str) {
    if before == after {
        return;
    }
    // (section, line) -> how many more times it is in `after` than in `before`.
    let mut diff: std::collections::BTreeMap<(String, String), i64> = Default::default();
    for (text, sign) in [(before, -1), (after, 1)] {
        let mut section = "schema".to_string();
        for line in text.lines() {
            if line.starts_with("== ") {
                section = line.to_string();
            }
            *diff.entry((section.clone(), line.to_string())).or_default() += sign;
        }
    }
    let mut shown = String::new();
    let mut last = String::new();
    for ((section, line), n) in diff.into_iter().filter(|(_, n)| *n != 0) {
        if section != last {
            shown.push_str(&format!("{section}\n"));
            last = section;
        }
        let sign = if n > 0 { '+' } else { '-' };
        shown.push_str(&format!("  {sign} {line}\n"));
    }
    panic!("the database changed (- before, + after):\n{shown}");
}

/// Says on the test process's own stderr (past libtest's capture, so it shows even when the
/// test passes) that part of a test did not run, and why.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED in {test}: {why}");
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}
