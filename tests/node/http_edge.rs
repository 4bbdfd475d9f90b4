//! The HTTP edge against hostile apps and clients: framing headers an app sets, invalid
//! headers and statuses, duplicate Host headers, slow and idle clients, connection caps.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::harness::{Node, Server};

/// A node serving app `name` with the given api/main.js.
fn app(node: &Node, name: &str, main: &str) {
    let dir = node.site(name, &[("index.html", "static"), ("api/main.js", main)]);
    node.deploy(&dir, &["--name", name]);
}

/// One response as it arrived on the wire.
#[derive(Debug)]
struct Wire {
    status: u16,
    /// Lower-case names.
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Wire {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Splits everything a connection received into responses, framed the way a client frames
/// them (content-length; no body for 204/304 and for answers to HEAD). Panics on bytes that
/// are not a complete response.
fn split_responses(mut bytes: &[u8], heads: &[bool]) -> Vec<Wire> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(bytes)));
        let head = std::str::from_utf8(&bytes[..end]).unwrap();
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        assert!(status_line.starts_with("HTTP/1.1 "), "{status_line:?}");
        let status: u16 = status_line[9..12].parse().unwrap();
        let headers: Vec<(String, String)> = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        bytes = &bytes[end + 4..];
        let wire_head = heads.get(out.len()).copied().unwrap_or(false);
        let len = if status == 204 || status == 304 || wire_head {
            0
        } else {
            assert!(
                !headers.iter().any(|(k, _)| k == "transfer-encoding"),
                "{headers:?}"
            );
            headers
                .iter()
                .find(|(k, _)| k == "content-length")
                .map(|(_, v)| v.parse::<usize>().unwrap())
                .unwrap_or_else(|| panic!("no content-length in {headers:?}"))
        };
        assert!(bytes.len() >= len, "body shorter than its content-length");
        out.push(Wire {
            status,
            headers,
            body: bytes[..len].to_vec(),
        });
        bytes = &bytes[len..];
    }
    out
}

/// Sends `requests` on one connection at once (pipelined) and reads until the server closes.
fn pipeline(server: &Server, requests: &[String]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let all: String = requests.concat();
    s.write_all(all.as_bytes()).unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).unwrap();
    got
}

fn get(host: &str, path: &str, last: bool) -> String {
    let close = if last { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{close}\r\n")
}

/// A response an app tries to smuggle after its own.
const SMUGGLED: &str = "HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED";

#[test]
fn framing_headers_from_app_code_are_dropped() {
    let node = Node::new();
    let evil = format!(
        r#"
var body = 'ok' + {SMUGGLED:?};
if (request.path === '/api/second') return respond('second');
if (request.path === '/api/nothing') return respond(204, 'a body a 204 must not carry', {{ 'Content-Length': '27' }});
if (request.path === '/api/unchanged') return respond(304, 'neither a 304', {{ 'ETag': '"x"' }});
return respond(200, body, {{ 'Content-Length': '2', 'Connection': 'keep-alive', 'Keep-Alive': 'timeout=999',
  'Transfer-Encoding': 'identity', 'TE': 'trailers', 'Trailer': 'x', 'Upgrade': 'h2c', 'Proxy-Connection': 'keep-alive',
  'X-Kept': 'yes' }});
"#
    );
    app(&node, "classic", &evil);
    app(
        &node,
        "fetcher",
        &format!(
            r#"
export default {{
  fetch(req) {{
    const path = new URL(req.url).pathname;
    if (path === '/api/second') return new Response('second');
    if (path === '/api/nothing') return new Response(null, {{ status: 204, headers: {{ 'content-length': '27' }} }});
    if (path === '/api/unchanged') return new Response(null, {{ status: 304, headers: {{ 'content-length': '13', 'transfer-encoding': 'chunked' }} }});
    const h = new Headers();
    h.append('content-length', '2');
    h.append('transfer-encoding', 'chunked');
    h.append('connection', 'keep-alive');
    h.append('x-kept', 'yes');
    return new Response('ok' + {SMUGGLED:?}, {{ headers: h }});
  }}
}};
"#
        ),
    );
    let server = node.start(&[]);
    for name in ["classic", "fetcher"] {
        let host = format!("{name}.localhost");
        let got = pipeline(
            &server,
            &[
                get(&host, "/api/inject", false),
                get(&host, "/api/nothing", false),
                get(&host, "/api/unchanged", false),
                get(&host, "/api/second", true),
            ],
        );
        let responses = split_responses(&got, &[]);
        let summary: Vec<(u16, String)> = responses
            .iter()
            .map(|r| (r.status, String::from_utf8_lossy(&r.body).into_owned()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (200, format!("ok{SMUGGLED}")),
                (204, String::new()),
                (304, String::new()),
                (200, "second".to_string()),
            ],
            "{name}: {}",
            String::from_utf8_lossy(&got)
        );
        let first = &responses[0];
        assert_eq!(first.header("x-kept"), Some("yes"), "{name}");
        assert_eq!(
            first.header("content-length"),
            Some(format!("{}", 2 + SMUGGLED.len()).as_str()),
            "{name}"
        );
        for r in &responses {
            for owned in [
                "transfer-encoding",
                "keep-alive",
                "te",
                "trailer",
                "upgrade",
                "proxy-connection",
            ] {
                assert_eq!(r.header(owned), None, "{name}: {owned} in {:?}", r.headers);
            }
            assert_ne!(r.header("connection"), Some("keep-alive"), "{name}");
        }
        for r in &responses[1..3] {
            assert_eq!(r.header("content-length"), None, "{name}: {:?}", r.headers);
        }
    }
}

#[test]
fn invalid_headers_and_statuses_from_app_code_do_not_break_the_server() {
    let node = Node::new();
    app(
        &node,
        "odd",
        r#"
var p = request.path;
if (p === '/api/names') return respond(200, 'names', { 'bad name': 'x', '': 'y', 'x\r\ninjected': 'z', 'ok-name': 'kept' });
if (p === '/api/values') return respond(200, 'values', { 'x-a': 'line\r\nInjected: yes', 'x-b': 'nul\u0000', 'x-c': 'fine' });
if (p === '/api/status-high') return respond(700, 'no');
if (p === '/api/status-low') return respond(99, 'no');
if (p === '/api/status-nan') return respond(NaN, 'no');
if (p === '/api/status-frac') return respond(200.5, 'no');
return respond('alive');
"#,
    );
    let server = node.start(&[]);
    let names = server.get("odd.localhost", "/api/names");
    assert_eq!(names.status(), 200);
    assert_eq!(names.headers()["ok-name"], "kept");
    assert!(names.headers().get("injected").is_none());
    assert_eq!(names.text().unwrap(), "names");
    let values = server.get("odd.localhost", "/api/values");
    assert_eq!(values.status(), 200);
    assert!(values.headers().get("x-a").is_none());
    assert!(values.headers().get("injected").is_none());
    assert!(values.headers().get("x-b").is_none());
    assert_eq!(values.headers()["x-c"], "fine");
    for p in [
        "/api/status-high",
        "/api/status-low",
        "/api/status-nan",
        "/api/status-frac",
    ] {
        let r = server.get("odd.localhost", p);
        assert_eq!(r.status(), 500, "{p}");
        let text = r.text().unwrap();
        assert!(text.contains("between 200 and 599"), "{p}: {text}");
    }
    assert_eq!(server.text("odd.localhost", "/api/alive"), "alive");
}

#[test]
fn a_second_host_header_gets_400() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "blog page")]), &[]);
    node.deploy(&node.site("shop", &[("index.html", "shop page")]), &[]);
    let server = node.start(&[]);
    for (first, second) in [
        ("blog.localhost", "shop.localhost"),
        ("blog.localhost", "blog.localhost"),
    ] {
        let got = pipeline(
            &server,
            &[format!(
                "GET / HTTP/1.1\r\nHost: {first}\r\nHost: {second}\r\nConnection: close\r\n\r\n"
            )],
        );
        let r = split_responses(&got, &[]);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].status, 400, "{}", String::from_utf8_lossy(&got));
        let body = String::from_utf8_lossy(&r[0].body);
        assert!(body.contains("more than one Host header"), "{body}");
    }
    assert_eq!(server.text("blog.localhost", "/"), "blog page");
}

/// A server started with extra environment (the `FAZT_HTTP_*` knobs) and, when given, an
/// open-file limit (soft and hard, so the server cannot raise it).
fn start_with(node: &Node, env: &[(&str, &str)], open_files: Option<u64>) -> Server {
    let mut cmd = node.command();
    cmd.args(["server", "start", "--port", "0"]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(n) = open_files {
        use std::os::unix::process::CommandExt;
        // SAFETY: only setrlimit runs between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: n as libc::rlim_t,
                    rlim_max: n as libc::rlim_t,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    Server::spawn(&mut cmd)
}

/// Reads until the server closes the connection; fails if it is still open after 20 s.
fn read_until_closed(s: &mut TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    match s.read_to_end(&mut got) {
        Ok(_) => got,
        // A reset is a close too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => got,
        Err(e) => panic!(
            "the server kept the connection open ({e}); received {:?}",
            String::from_utf8_lossy(&got)
        ),
    }
}

/// Reads one response with a content-length body from a connection that stays open.
fn read_one(s: &mut TcpStream) -> Wire {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if got.len() >= end + 4 + len {
                return split_responses(&got, &[]).remove(0);
            }
        }
        let n = s.read(&mut buf).expect("a response");
        assert!(n > 0, "closed before a whole response");
        got.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn a_request_head_that_never_ends_is_closed() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "blog page")]), &[]);
    let server = start_with(&node, &[("FAZT_HTTP_HEADER_TIMEOUT_MS", "300")], None);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: blog.localhost\r\nX-Slow: 1")
        .unwrap();
    let got = read_until_closed(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert!(!text.contains("200 OK"), "{text}");
    // A connection that sends nothing at all is closed too.
    let mut silent = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    read_until_closed(&mut silent);
    assert_eq!(server.text("blog.localhost", "/"), "blog page");
}

#[test]
fn an_idle_kept_alive_connection_is_closed() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "blog page")]), &[]);
    let server = start_with(&node, &[("FAZT_HTTP_HEADER_TIMEOUT_MS", "300")], None);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(get("blog.localhost", "/", false).as_bytes())
        .unwrap();
    let first = read_one(&mut s);
    assert_eq!(
        (first.status, first.body.as_slice()),
        (200, &b"blog page"[..])
    );
    assert_eq!(first.header("connection"), None, "kept alive");
    let after = read_until_closed(&mut s);
    assert!(
        after.is_empty() || String::from_utf8_lossy(&after).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&after)
    );
}

#[test]
fn a_request_body_that_stops_arriving_gets_408() {
    let node = Node::new();
    app(
        &node,
        "upload",
        "console.log('ran', request.path); return respond({ got: request.body });",
    );
    let server = start_with(&node, &[("FAZT_HTTP_BODY_TIMEOUT_MS", "300")], None);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(
        b"POST /api/x HTTP/1.1\r\nHost: upload.localhost\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nonly ten b",
    )
    .unwrap();
    let got = read_until_closed(&mut s);
    let r = split_responses(&got, &[]);
    assert_eq!(r.len(), 1, "{}", String::from_utf8_lossy(&got));
    assert_eq!(r[0].status, 408);
    let body = String::from_utf8_lossy(&r[0].body);
    assert!(body.contains("did not arrive within 0.3 s"), "{body}");
    // The app never ran: its lines are written in order, in batches, so once the line of a
    // request made afterwards is there, a line of the cut request would be too.
    assert_eq!(server.get("upload.localhost", "/api/after").status(), 200);
    let logs = crate::peers::eventually("the later request's line is written", || {
        let logs = node.ok(&["app", "logs", "upload"]);
        logs.contains("ran /api/after").then_some(logs)
    });
    assert_eq!(logs.lines().count(), 1, "{logs}");
}

/// A connection to the server from the given local address.
fn connect_from(local: &str, port: u16) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: std::net::SocketAddr = format!("{local}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    let server: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    socket.connect(&server.into()).unwrap();
    socket.into()
}

#[test]
fn many_slow_connections_from_one_client_do_not_starve_others() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "blog page")]), &[]);
    // 256 open files: without caps, 300 held connections would take every one of them.
    let server = start_with(&node, &[("FAZT_HTTP_MAX_PER_CLIENT", "50")], Some(256));
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: blog.localhost\r\n");
        slow.push(s);
    }
    // Another client (127.0.0.2 is loopback too) is answered while they are held open.
    let mut other = connect_from("127.0.0.2", server.port);
    other
        .write_all(get("blog.localhost", "/", true).as_bytes())
        .unwrap();
    let got = read_until_closed(&mut other);
    let r = split_responses(&got, &[]);
    assert_eq!(
        (r[0].status, r[0].body.as_slice()),
        (200, &b"blog page"[..])
    );
    // Beyond the per-client cap, connections were closed at once.
    let mut closed = 0;
    for s in &mut slow[250..] {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 16];
        match s.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => closed += 1,
            other => panic!("a connection beyond the cap is open: {other:?}"),
        }
    }
    assert_eq!(closed, 50);
    // And IPv6 clients are served by the same dual-stack listener. A host without IPv6
    // loopback fails here unless FAZT_TEST_NO_IPV6=1 says it has none (README, Development).
    match TcpStream::connect(("::1", server.port)) {
        Ok(mut v6) => {
            v6.write_all(get("blog.localhost", "/", true).as_bytes())
                .unwrap();
            let got = read_until_closed(&mut v6);
            assert_eq!(split_responses(&got, &[])[0].status, 200);
        }
        Err(e) if std::env::var("FAZT_TEST_NO_IPV6").is_ok_and(|v| v == "1") => {
            crate::harness::skipped(
                "http_edge::many_slow_connections_from_one_client_do_not_starve_others",
                &format!(
                    "IPv6 part not run: [::1]:{} refused ({e}), FAZT_TEST_NO_IPV6=1",
                    server.port
                ),
            );
        }
        Err(e) => panic!(
            "no IPv6 client could reach the dual-stack listener at [::1]:{} ({e}); \
             on a host without IPv6 loopback, set FAZT_TEST_NO_IPV6=1",
            server.port
        ),
    }
}

#[test]
fn a_client_that_stops_reading_an_answer_is_cut_off() {
    let node = Node::new();
    let big = "z".repeat(16 << 20);
    node.deploy(
        &node.site("big", &[("index.html", "x"), ("big.bin", &big)]),
        &[],
    );
    let server = start_with(&node, &[("FAZT_HTTP_STALL_TIMEOUT_MS", "300")], None);
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.write_all(get("big.localhost", "/big.bin", true).as_bytes())
        .unwrap();
    // Read nothing for a while: the server's writes stall on full socket buffers.
    std::thread::sleep(Duration::from_secs(3));
    let got = read_until_closed(&mut s);
    assert!(got.starts_with(b"HTTP/1.1 200 OK"));
    assert!(
        got.len() < big.len(),
        "the whole answer ({} bytes) was sent to a client that stopped reading",
        got.len()
    );
    assert_eq!(server.text("big.localhost", "/"), "x");
}
