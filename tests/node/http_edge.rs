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
            for owned in ["transfer-encoding", "keep-alive", "te", "trailer", "upgrade", "proxy-connection"] {
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
    for p in ["/api/status-high", "/api/status-low", "/api/status-nan", "/api/status-frac"] {
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
    for (first, second) in [("blog.localhost", "shop.localhost"), ("blog.localhost", "blog.localhost")] {
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
