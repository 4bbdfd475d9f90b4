//! Deploying and serving: routing, headers, encodings, ranges, SPA, deploy while serving.

use std::io::Read;

use crate::harness::{sha256_hex, write, Node};

#[test]
fn deploy_prints_the_version_and_url_and_the_app_is_served_on_its_subdomain() {
    let node = Node::new();
    let site = node.site(
        "blog",
        &[("index.html", "<h1>blog</h1>"), ("about.txt", "about")],
    );
    let out = node.ok(&["app", "deploy", site.to_str().unwrap()]);
    assert!(out.contains("deployed blog v1"), "{out}");
    assert!(out.contains("http://blog.localhost:4698/"), "{out}");
    let server = node.start(&[]);
    assert_eq!(server.text("blog.localhost", "/"), "<h1>blog</h1>");
    assert_eq!(server.text("blog.localhost:4698", "/about.txt"), "about");
    assert_eq!(server.get("blog.localhost", "/nope.txt").status(), 404);
}

#[test]
fn the_name_comes_from_the_flag_then_the_manifest_then_the_directory() {
    let node = Node::new();
    let dir = node.site("dirname", &[("index.html", "a")]);
    assert_eq!(node.deploy(&dir, &[])["app"], "dirname");
    assert_eq!(node.deploy(&dir, &["--name", "flagged"])["app"], "flagged");
    write(&dir.join("manifest.json"), br#"{"name": "manifested"}"#);
    assert_eq!(node.deploy(&dir, &[])["app"], "manifested");
    assert_eq!(node.deploy(&dir, &["--name", "flagged"])["app"], "flagged");
}

#[test]
fn hosts_route_by_domain_apex_root_and_admin() {
    let node = Node::new();
    let root = node.site("root", &[("index.html", "root app")]);
    let blog = node.site("blog", &[("index.html", "blog app")]);
    node.deploy(&root, &["--name", "root"]);
    node.deploy(&blog, &[]);
    let server = node.start(&["--domain", "example.test"]);
    assert_eq!(server.text("example.test", "/"), "root app");
    assert_eq!(server.text("root.example.test", "/"), "root app");
    assert_eq!(server.text("blog.example.test", "/"), "blog app");
    assert_eq!(server.text("blog.localhost", "/"), "blog app");
    assert_eq!(server.get("admin.example.test", "/").status(), 404);
    assert_eq!(server.get("deep.blog.example.test", "/").status(), 404);
    assert_eq!(server.get("blog.other.test", "/").status(), 404);
}

#[test]
fn a_deployed_404_app_replaces_the_built_in_page() {
    let node = Node::new();
    node.deploy(
        &node.site("404", &[("index.html", "custom missing page")]),
        &["--name", "404"],
    );
    let server = node.start(&[]);
    let r = server.get("ghost.localhost", "/");
    assert_eq!(r.status(), 404);
    assert_eq!(r.text().unwrap(), "custom missing page");
}

#[test]
fn hidden_files_node_modules_and_gitignored_files_are_not_deployed() {
    let node = Node::new();
    let site = node.site(
        "site",
        &[
            ("index.html", "home"),
            (".env", "SECRET=1"),
            (".hidden/x.txt", "x"),
            ("node_modules/lib/index.js", "lib"),
            (".gitignore", "*.log\ncache/\n"),
            ("debug.log", "log"),
            ("cache/data.txt", "cached"),
            ("kept.txt", "kept"),
        ],
    );
    let report = node.deploy(&site, &[]);
    assert_eq!(report["files"], 2);
    let server = node.start(&[]);
    assert_eq!(server.text("site.localhost", "/kept.txt"), "kept");
    for path in [
        "/.env",
        "/.hidden/x.txt",
        "/node_modules/lib/index.js",
        "/debug.log",
        "/cache/data.txt",
        "/.gitignore",
    ] {
        assert_eq!(server.get("site.localhost", path).status(), 404, "{path}");
    }
}

#[test]
fn unchanged_files_are_stored_once_across_versions_and_apps() {
    let node = Node::new();
    let site = node.site("one", &[("index.html", "same"), ("a.txt", "a")]);
    assert_eq!(node.deploy(&site, &[])["new_blobs"], 2);
    assert_eq!(node.deploy(&site, &[])["new_blobs"], 0);
    write(&site.join("a.txt"), b"changed");
    assert_eq!(node.deploy(&site, &[])["new_blobs"], 1);
    assert_eq!(node.deploy(&site, &["--name", "two"])["new_blobs"], 0);
}

#[test]
fn etag_is_the_content_hash_and_if_none_match_answers_304() {
    let node = Node::new();
    let body = "style { color: red }";
    node.deploy(&node.site("s", &[("style.css", body)]), &[]);
    let server = node.start(&[]);
    let r = server.get("s.localhost", "/style.css");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert_eq!(etag, format!("\"{}\"", sha256_hex(body.as_bytes())));
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/css"));

    let r = server
        .request(reqwest::Method::GET, "s.localhost", "/style.css")
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.headers()["etag"], etag.as_str());
    assert!(r.bytes().unwrap().is_empty());

    let r = server
        .request(reqwest::Method::GET, "s.localhost", "/style.css")
        .header("If-None-Match", "\"other\", W/".to_string() + &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 304, "weak comparison and lists");
    let r = server
        .request(reqwest::Method::GET, "s.localhost", "/style.css")
        .header("If-None-Match", "\"stale\"")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[test]
fn ranges_answer_206_and_unsatisfiable_ranges_416() {
    let node = Node::new();
    let body: String = (0..1000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    node.deploy(&node.site("r", &[("data.txt", &body)]), &[]);
    let server = node.start(&[]);
    let range = |value: &str| {
        server
            .request(reqwest::Method::GET, "r.localhost", "/data.txt")
            .header("Range", value)
            .send()
            .unwrap()
    };
    let r = range("bytes=10-19");
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], "bytes 10-19/1000");
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(r.text().unwrap(), &body[10..20]);

    let r = range("bytes=-5");
    assert_eq!(r.status(), 206);
    assert_eq!(r.text().unwrap(), &body[995..]);
    let r = range("bytes=990-");
    assert_eq!(r.text().unwrap(), &body[990..]);

    let r = range("bytes=5000-6000");
    assert_eq!(r.status(), 416);
    assert_eq!(r.headers()["content-range"], "bytes */1000");

    let r = range("garbage");
    assert_eq!(r.status(), 200, "an invalid Range header is ignored");
    assert_eq!(r.text().unwrap().len(), 1000);

    let r = server
        .request(reqwest::Method::GET, "r.localhost", "/data.txt")
        .header("Range", "bytes=0-1")
        .header("If-Range", "\"old-etag\"")
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "If-Range with a stale ETag gets the whole file"
    );
}

#[test]
fn head_answers_headers_without_a_body() {
    let node = Node::new();
    node.deploy(&node.site("h", &[("index.html", "twelve bytes")]), &[]);
    let server = node.start(&[]);
    let r = server
        .request(reqwest::Method::HEAD, "h.localhost", "/")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "12");
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.bytes().unwrap().is_empty());
    let r = server
        .request(reqwest::Method::POST, "h.localhost", "/")
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET, HEAD");
}

#[test]
fn compressible_files_are_served_gzip_or_brotli_by_accept_encoding() {
    let node = Node::new();
    let js = "export function hello() { return 'hello from fazt'; }\n".repeat(100);
    let png = vec![0x89u8; 4000];
    let dir = node.site("z", &[("app.js", &js)]);
    write(&dir.join("logo.png"), &png);
    node.deploy(&dir, &[]);
    let server = node.start(&[]);
    let get = |accept: Option<&str>, path: &str| {
        let mut req = server.request(reqwest::Method::GET, "z.localhost", path);
        if let Some(a) = accept {
            req = req.header("Accept-Encoding", a);
        }
        req.send().unwrap()
    };

    let r = get(Some("gzip, deflate, br"), "/app.js");
    assert_eq!(r.headers()["content-encoding"], "br");
    assert_eq!(r.headers()["vary"], "Accept-Encoding");
    let etag_br = r.headers()["etag"].clone();
    let compressed = r.bytes().unwrap();
    assert!(compressed.len() < js.len() / 5);
    let mut plain = Vec::new();
    brotli::Decompressor::new(&compressed[..], 4096)
        .read_to_end(&mut plain)
        .unwrap();
    assert_eq!(plain, js.as_bytes());

    let r = get(Some("gzip"), "/app.js");
    assert_eq!(r.headers()["content-encoding"], "gzip");
    assert_ne!(
        r.headers()["etag"],
        etag_br,
        "each encoding has its own ETag"
    );
    let mut plain = String::new();
    flate2::read::GzDecoder::new(&r.bytes().unwrap()[..])
        .read_to_string(&mut plain)
        .unwrap();
    assert_eq!(plain, js);

    let r = get(None, "/app.js");
    assert!(r.headers().get("content-encoding").is_none());
    assert_eq!(r.headers()["vary"], "Accept-Encoding");
    assert_eq!(r.text().unwrap(), js);

    let r = get(Some("gzip, br"), "/logo.png");
    assert!(
        r.headers().get("content-encoding").is_none(),
        "images are not recompressed"
    );
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.bytes().unwrap().to_vec(), png);
}

#[test]
fn cache_control_depends_on_the_kind_of_file() {
    let node = Node::new();
    let dir = node.site(
        "c",
        &[
            ("index.html", "i"),
            ("assets/app-3f9a1c.js", "h"),
            ("assets/index-DiwrgTda.css", "v"),
            ("logo.svg", "<svg/>"),
        ],
    );
    node.deploy(&dir, &[]);
    let server = node.start(&[]);
    let cc = |path: &str| {
        server.get("c.localhost", path).headers()["cache-control"]
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(cc("/"), "no-cache");
    assert_eq!(cc("/index.html"), "no-cache");
    assert_eq!(
        cc("/assets/app-3f9a1c.js"),
        "public, max-age=31536000, immutable"
    );
    assert_eq!(
        cc("/assets/index-DiwrgTda.css"),
        "public, max-age=31536000, immutable"
    );
    assert_eq!(cc("/logo.svg"), "public, max-age=300");
}

#[test]
fn directories_serve_their_index() {
    let node = Node::new();
    node.deploy(
        &node.site(
            "d",
            &[("index.html", "top"), ("docs/index.html", "docs index")],
        ),
        &[],
    );
    let server = node.start(&[]);
    assert_eq!(server.text("d.localhost", "/docs"), "docs index");
    assert_eq!(server.text("d.localhost", "/docs/"), "docs index");
    assert_eq!(server.text("d.localhost", "/docs/index.html"), "docs index");
}

#[test]
fn spa_fallback_applies_only_when_asked_for() {
    let node = Node::new();
    let dir = node.site("spa", &[("index.html", "shell"), ("app.js", "js")]);
    node.deploy(&dir, &[]);
    let server = node.start(&[]);
    assert_eq!(server.get("spa.localhost", "/users/42").status(), 404);

    node.deploy(&dir, &["--spa"]);
    assert_eq!(server.text("spa.localhost", "/users/42"), "shell");
    assert_eq!(server.text("spa.localhost", "/app.js"), "js");
    assert_eq!(
        server.get("spa.localhost", "/missing.js").status(),
        404,
        "paths with an extension do not fall back"
    );

    let other = node.site(
        "spa2",
        &[
            ("index.html", "shell2"),
            ("manifest.json", r#"{"spa": true}"#),
        ],
    );
    node.deploy(&other, &[]);
    assert_eq!(server.text("spa2.localhost", "/deep/link"), "shell2");
}

#[test]
fn private_and_api_paths_are_never_served_as_files() {
    let node = Node::new();
    let dir = node.site(
        "p",
        &[
            ("index.html", "pub"),
            ("private/secret.txt", "secret"),
            ("api/main.js", "respond(1)"),
        ],
    );
    node.deploy(&dir, &[]);
    let plain = node.site(
        "q",
        &[("index.html", "pub"), ("api/helper.js", "secret code")],
    );
    node.deploy(&plain, &[]);
    let server = node.start(&[]);
    for path in ["/private/secret.txt", "/private", "/%70rivate/secret.txt"] {
        let r = server.get("p.localhost", path);
        assert_eq!(r.status(), 404, "{path}");
        assert!(!r.text().unwrap().contains("secret"));
    }
    // With api/main.js, /api paths run the code; its source is never the answer.
    for path in ["/api/main.js", "/api"] {
        assert_eq!(server.text("p.localhost", path), "1", "{path}");
    }
    // Without it, api/ files are not served either.
    for path in ["/api/helper.js", "/api"] {
        let r = server.get("q.localhost", path);
        assert_eq!(r.status(), 404, "{path}");
        assert!(!r.text().unwrap().contains("secret"));
    }
}

#[test]
fn hostile_paths_do_not_escape() {
    let node = Node::new();
    node.deploy(&node.site("safe", &[("index.html", "safe")]), &[]);
    let server = node.start(&[]);
    for path in [
        "/../data.db",
        "/%2e%2e/data.db",
        "/..%2fdata.db",
        "/%00",
        "/a%5c..%5cindex.html",
    ] {
        assert_eq!(server.get("safe.localhost", path).status(), 404, "{path}");
    }
}

#[test]
fn a_deploy_while_serving_is_served_at_once_and_never_half_way() {
    let node = Node::new();
    let dir = node.path("live");
    for (p, c) in files_of("one") {
        write(&dir.join(p), c.as_bytes());
    }
    write(&dir.join("index.html"), b"one");
    node.deploy(&dir, &[]);
    let server = std::sync::Arc::new(node.start(&[]));
    assert_eq!(server.text("live.localhost", "/"), "one");

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Over HTTP, file after file: once any file of the new version is served, every file is,
    // from then on (a half deploy shows as a new file followed by an old one).
    let reader = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen = 0;
            let mut new_since = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let i = seen % 20;
                let body = server.text("live.localhost", &format!("/f{i}.txt"));
                if body == format!("two-{i}") {
                    new_since.get_or_insert(seen);
                } else {
                    assert_eq!(body, format!("one-{i}"), "unexpected body");
                    assert!(
                        new_since.is_none(),
                        "half a deploy: f{i}.txt of the old version served after a file of \
                         the new version (request {new_since:?})"
                    );
                }
                seen += 1;
            }
            seen
        })
    };
    // In the database, every file of the current version in one read (one statement, one
    // snapshot, as a request reads it): always all of one version or all of the other.
    let snapshots = {
        let (db, stop) = (node.db(), stop.clone());
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open_with_flags(
                db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            let mut read = conn
                .prepare(
                    "SELECT vf.path, CAST(b.data AS TEXT) FROM apps a
                     JOIN version_files vf ON vf.version_id = a.current_version
                     JOIN blobs b ON b.hash = vf.hash
                     WHERE a.name = 'live' AND vf.path != 'index.html' ORDER BY vf.path",
                )
                .unwrap();
            let mut seen = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut files: Vec<(String, String)> = read
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                    .unwrap()
                    .map(|r| r.unwrap())
                    .collect();
                files.sort();
                let whole = |tag: &str| {
                    let mut all = files_of(tag);
                    all.sort();
                    all == files
                };
                assert!(whole("one") || whole("two"), "half a deploy: {files:?}");
                seen += 1;
            }
            seen
        })
    };
    for (p, c) in files_of("two") {
        write(&dir.join(p), c.as_bytes());
    }
    write(&dir.join("index.html"), b"two");
    node.deploy(&dir, &[]);
    // The very next request sees the new version, with no restart.
    assert_eq!(server.text("live.localhost", "/"), "two");
    assert_eq!(server.text("live.localhost", "/f7.txt"), "two-7");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.join().unwrap() > 0);
    assert!(snapshots.join().unwrap() > 0);
}

/// The 20 numbered files of a test version tagged `tag`, as (path, content).
fn files_of(tag: &str) -> Vec<(String, String)> {
    (0..20)
        .map(|i| (format!("f{i}.txt"), format!("{tag}-{i}")))
        .collect()
}
