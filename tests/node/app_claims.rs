//! Claims of README.md and docs/ about apps that no other test guards: how concurrent
//! app-storage writes on two nodes merge, settings that replicate, CLI limits, HTTP rules,
//! fetch-handler features, promise jobs, the request queue and log retention.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{assert_same_state, sha256_hex, Node, Server};
use crate::peers::{eventually, start_on, ticket};

/// An app's `/api` that makes one storage call named by the JSON body,
/// `{"call": "ds.update", "args": [...]}`, and answers `{"result": ...}` or 400 `{"error": ...}`.
const STORAGE_CALLS: &str = r#"
var b = request.body, parts = b.call.split('.'), target = fazt.app[parts[0]];
try {
  var result = target[parts[1]].apply(target, b.args);
  respond({ result: result === undefined ? null : result });
} catch (e) {
  respond(400, { error: e.message });
}
"#;

/// One storage call through [`STORAGE_CALLS`]: its result, or the error it threw.
fn storage(server: &Server, app: &str, call: &str, args: Value) -> Result<Value, String> {
    let resp = server
        .request(Method::POST, &format!("{app}.localhost"), "/api")
        .json(&json!({"call": call, "args": args}))
        .send()
        .expect("request");
    let status = resp.status().as_u16();
    let body: Value = resp.json().expect("a JSON answer");
    match status {
        200 => Ok(body["result"].clone()),
        400 => Err(body["error"].as_str().unwrap().to_string()),
        _ => panic!("{call}: {status} {body}"),
    }
}

fn store(server: &Server, app: &str, call: &str, args: Value) -> Value {
    storage(server, app, call, args.clone()).unwrap_or_else(|e| panic!("{call} {args}: {e}"))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// zyt serving, and `local` joined to it but running no server: nothing passes between them
/// until `local` runs `peer sync zyt` (zyt has no address for local, so it never dials).
fn apart() -> (Node, Node, Server) {
    let zyt = Node::new();
    let zyt_server = zyt.start(&[]);
    let local = Node::new();
    local.ok(&[
        "peer",
        "join",
        &ticket(&zyt, &[]),
        "--name",
        "zyt",
        "--as",
        "local",
    ]);
    (local, zyt, zyt_server)
}

fn sync_with_zyt(local: &Node) {
    let out = local.ok(&["peer", "sync", "zyt", "--timeout", "60"]);
    assert!(out.contains("both hold the same versions"), "{out}");
}

/// Every document of collection `c` and every KV entry of the app `merge`.
fn merged_storage(server: &Server) -> Value {
    json!({
        "docs": store(server, "merge", "ds.find", json!(["c", {}, {"order": "asc"}])),
        "kv": store(server, "merge", "kv.list", json!([""])),
    })
}

#[test]
fn concurrent_storage_writes_on_two_nodes_merge_as_documented() {
    let (local, zyt, mut zyt_server) = apart();
    let port = zyt_server.port;
    zyt.deploy(
        &zyt.site("merge", &[("api/main.js", STORAGE_CALLS)]),
        &["--name", "merge"],
    );
    let on = |server: &Server, call: &str, args: Value| store(server, "merge", call, args);
    for (id, doc) in [
        ("counter", json!({"n": 1})),
        ("set_vs_inc", json!({"n": 1})),
        ("inc_vs_set", json!({"n": 1})),
        ("delete_vs_update", json!({"v": 0})),
        ("update_vs_delete", json!({"v": 0})),
        ("fields", json!({"a": 0, "b": 0})),
    ] {
        let mut doc = doc;
        doc["id"] = json!(id);
        on(&zyt_server, "ds.insert", json!(["c", doc]));
    }
    on(&zyt_server, "kv.set", json!(["delete_vs_set", 0]));
    on(&zyt_server, "kv.set", json!(["set_vs_delete", 0]));
    sync_with_zyt(&local);

    // zyt writes while local runs nothing...
    let update = |server: &Server, id: &str, changes: Value| {
        assert_eq!(
            on(server, "ds.update", json!(["c", {"id": id}, changes])),
            1,
            "{id}"
        );
    };
    update(&zyt_server, "counter", json!({"$inc": {"n": 5}}));
    update(&zyt_server, "set_vs_inc", json!({"$set": {"n": 100}}));
    update(&zyt_server, "inc_vs_set", json!({"$inc": {"n": 7}}));
    on(
        &zyt_server,
        "ds.delete",
        json!(["c", {"id": "delete_vs_update"}]),
    );
    update(&zyt_server, "update_vs_delete", json!({"$set": {"v": 1}}));
    update(&zyt_server, "fields", json!({"$set": {"a": 1}}));
    on(&zyt_server, "kv.delete", json!(["delete_vs_set"]));
    on(&zyt_server, "kv.set", json!(["set_vs_delete", "zyt"]));
    on(&zyt_server, "kv.set", json!(["both", "zyt"]));
    zyt_server.stop_with("-TERM");

    // ...then local writes, later in time, while zyt is down: neither saw the other's writes.
    let mut local_server = local.start(&[]);
    update(&local_server, "counter", json!({"$inc": {"n": 10}}));
    update(&local_server, "set_vs_inc", json!({"$inc": {"n": 7}}));
    update(&local_server, "inc_vs_set", json!({"$set": {"n": 200}}));
    update(&local_server, "delete_vs_update", json!({"$set": {"v": 1}}));
    on(
        &local_server,
        "ds.delete",
        json!(["c", {"id": "update_vs_delete"}]),
    );
    update(&local_server, "fields", json!({"$set": {"b": 2}}));
    on(&local_server, "kv.set", json!(["delete_vs_set", "local"]));
    on(&local_server, "kv.delete", json!(["set_vs_delete"]));
    on(&local_server, "kv.set", json!(["both", "local"]));
    local_server.stop_with("-TERM");

    let zyt_server = start_on(&zyt, port);
    sync_with_zyt(&local);
    let on_zyt = merged_storage(&zyt_server);
    drop(zyt_server);
    let local_server = local.start(&[]);
    assert_eq!(
        merged_storage(&local_server),
        on_zyt,
        "both nodes hold the same data"
    );

    let docs = on_zyt["docs"].as_array().unwrap();
    let doc = |id: &str| docs.iter().find(|d| d["id"] == id).cloned();
    // $inc on both sides adds up; a $set beats a concurrent $inc, whichever came later.
    assert_eq!(doc("counter").unwrap()["n"], 16, "{on_zyt}");
    assert_eq!(doc("set_vs_inc").unwrap()["n"], 100, "{on_zyt}");
    assert_eq!(doc("inc_vs_set").unwrap()["n"], 200, "{on_zyt}");
    // A delete beats a concurrent update, whichever came later.
    assert_eq!(doc("delete_vs_update"), None, "{on_zyt}");
    assert_eq!(doc("update_vs_delete"), None, "{on_zyt}");
    // A document is one value: one of the two concurrent edits, whole.
    let fields = doc("fields").unwrap();
    let ab = (fields["a"].clone(), fields["b"].clone());
    assert!(
        ab == (json!(1), json!(0)) || ab == (json!(0), json!(2)),
        "{fields}"
    );
    assert_eq!(docs.len(), 4, "{on_zyt}");
    // The same for KV entries: the delete wins, and of two sets one whole value.
    let kv = on_zyt["kv"].as_array().unwrap();
    assert_eq!(kv.len(), 1, "{on_zyt}");
    assert_eq!(kv[0]["key"], "both");
    assert!(
        kv[0]["value"] == "zyt" || kv[0]["value"] == "local",
        "{on_zyt}"
    );

    // Writing a deleted document or key again later brings it back.
    let on_local = |call: &str, args: Value| store(&local_server, "merge", call, args);
    on_local(
        "ds.insert",
        json!(["c", {"id": "delete_vs_update", "v": 2}]),
    );
    assert_eq!(
        on_local("ds.findOne", json!(["c", "delete_vs_update"]))["v"],
        2
    );
    on_local("kv.set", json!(["delete_vs_set", "again"]));
    assert_eq!(on_local("kv.get", json!(["delete_vs_set"])), "again");
}

#[test]
fn the_file_size_limit_set_on_one_node_is_enforced_on_its_peer() {
    let (local, zyt, zyt_server) = apart();
    let limit = |node: &Node| node.json(&["server", "status", "--json"])["max_file_bytes"].clone();
    assert_eq!(limit(&zyt), json!({"value": 64 << 20, "source": "default"}));
    local.ok(&["server", "set-config", "--max-file-size", "1K"]);
    sync_with_zyt(&local);
    drop(zyt_server);
    assert_eq!(limit(&zyt), json!({"value": 1024, "source": "database"}));

    let big = "x".repeat(1025);
    let dir = zyt.site("big", &[("index.html", "small"), ("big.bin", &big)]);
    let before = zyt.state();
    let err = zyt.fails(&["app", "deploy", dir.to_str().unwrap()]);
    assert!(
        err.contains("big.bin is 1025 bytes, over the 1024-byte file limit"),
        "{err}"
    );
    // A refused deploy changes nothing.
    assert_same_state(&before, &zyt.state());
}

#[test]
fn a_first_deploy_leaves_a_subdomain_another_app_holds() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "the blog")]), &[]);
    node.ok(&["alias", "link", "news", "blog"]);
    let dir = node.site("news", &[("index.html", "the news app")]);
    let run = node.run(&["app", "deploy", dir.to_str().unwrap()]);
    assert!(run.status.success(), "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "subdomain news already points at another app: link one with `fazt alias link SUBDOMAIN news`"
        ),
        "{}",
        run.stderr
    );
    assert!(
        !run.stdout.contains("http://"),
        "no URL for news: {}",
        run.stdout
    );
    let aliases = node.json(&["alias", "list", "--json"]);
    let news: Vec<&Value> = aliases
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["subdomain"] == "news")
        .collect();
    assert_eq!(news.len(), 1, "{aliases}");
    assert_eq!(news[0]["app"], "blog", "{aliases}");
    let server = node.start(&[]);
    assert_eq!(server.text("news.localhost", "/"), "the blog");
}

#[test]
fn variable_names_and_values_are_bounded_as_documented() {
    let node = Node::new();
    node.deploy(&node.site("conf", &[("index.html", "x")]), &[]);
    let longest_name = "N".repeat(256);
    let longest_value = "v".repeat(64 << 10);
    node.ok(&["app", "env", "set", "conf", &longest_name, "1"]);
    node.ok(&["app", "env", "set", "conf", "Az09_-.", &longest_value]);
    assert_eq!(
        node.json(&["app", "env", "list", "conf", "--json"]),
        Value::Object(
            [
                ("Az09_-.", longest_value.as_str()),
                (longest_name.as_str(), "1")
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect()
        )
    );

    let before = node.state();
    let too_long = "N".repeat(257);
    for name in ["", too_long.as_str(), "a b", "a/b", "a=b", "é"] {
        let err = node.fails(&["app", "env", "set", "conf", name, "1"]);
        assert!(
            err.contains("use 1-256 characters from A-Z, a-z, 0-9, '_', '-' and '.'"),
            "{name:?}: {err}"
        );
    }
    let err = node.fails(&[
        "app",
        "env",
        "set",
        "conf",
        "BIG",
        &"v".repeat((64 << 10) + 1),
    ]);
    assert!(err.contains("value of BIG is larger than 64 KiB"), "{err}");
    // Refused variables change nothing.
    assert_same_state(&before, &node.state());
}

/// A pseudo-terminal: (master, slave), both close-on-exec (other tests spawn processes
/// meanwhile, which must not hold the slave open), the master non-blocking.
fn pty() -> (std::fs::File, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors, which we then own; fcntl only sets flags.
    unsafe {
        let r = libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
        assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
        for fd in [master, slave] {
            assert_eq!(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC), 0);
        }
        assert_eq!(libc::fcntl(master, libc::F_SETFL, libc::O_NONBLOCK), 0);
        (
            std::fs::File::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

#[test]
fn sync_export_refuses_to_write_a_bundle_to_a_terminal() {
    let node = Node::new();
    node.deploy(&node.site("blog", &[("index.html", "hello")]), &[]);
    let (mut master, slave) = pty();
    let out = node
        .command()
        .args(["sync", "export"])
        .stdout(std::process::Stdio::from(slave))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: a bundle is binary: write it to a file with -o FILE (or redirect standard output)\n"
    );
    // Nothing reached the terminal: the process has exited, so whatever it wrote is there to
    // read, and an empty terminal answers "would block" (or EIO once its other end closed).
    let mut written = [0u8; 256];
    let read = master.read(&mut written);
    assert!(
        read.is_err() || read.as_ref().is_ok_and(|n| *n == 0),
        "the terminal got {read:?}: {:?}",
        &written[..*read.as_ref().unwrap_or(&0)]
    );

    // Redirected, the same command writes the bundle.
    let out = node.command().args(["sync", "export"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stdout.len() > 100);
}

#[test]
fn several_ranges_get_the_whole_file_and_a_matching_if_range_gets_the_range() {
    let node = Node::new();
    let body: String = (0..1000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    node.deploy(&node.site("r", &[("data.txt", &body)]), &[]);
    let server = node.start(&[]);
    let get = |headers: &[(&str, &str)]| {
        let mut req = server.request(Method::GET, "r.localhost", "/data.txt");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send().unwrap()
    };

    let r = get(&[("Range", "bytes=0-1,5-6")]);
    assert_eq!(r.status(), 200, "several ranges get the whole file");
    assert!(r.headers().get("content-range").is_none());
    assert_eq!(r.text().unwrap(), body);

    let etag = format!("\"{}\"", sha256_hex(body.as_bytes()));
    let r = get(&[("Range", "bytes=10-19"), ("If-Range", &etag)]);
    assert_eq!(r.status(), 206, "If-Range with the current ETag");
    assert_eq!(r.headers()["content-range"], "bytes 10-19/1000");
    assert_eq!(r.text().unwrap(), &body[10..20]);
    // If-Range compares strongly: a weak tag never matches.
    let r = get(&[("Range", "bytes=10-19"), ("If-Range", &format!("W/{etag}"))]);
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), body);
}

/// Deploys app `name` with `api/main.js` and more files.
fn app(node: &Node, name: &str, main: &str, more: &[(&str, &str)]) {
    let mut files = vec![("api/main.js", main)];
    files.extend_from_slice(more);
    node.deploy(&node.site(name, &files), &["--name", name]);
}

/// Status and body text of a request.
fn answer(req: reqwest::blocking::RequestBuilder) -> (u16, String) {
    let resp = req.send().expect("request");
    (resp.status().as_u16(), resp.text().unwrap())
}

fn json_answer(req: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let (status, text) = answer(req);
    let body = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, body)
}

#[test]
fn repeated_request_headers_reach_the_app_joined() {
    let node = Node::new();
    app(
        &node,
        "orig",
        "respond({ multi: request.headers['x-multi'] })",
        &[],
    );
    app(
        &node,
        "fx",
        "export default { fetch(request) { return Response.json({ multi: request.headers.get('x-multi') }); } };",
        &[],
    );
    let server = node.start(&[]);
    for app in ["orig", "fx"] {
        let req = server
            .request(Method::GET, &format!("{app}.localhost"), "/api")
            .header("X-Multi", "one")
            .header("x-multi", "two, three");
        assert_eq!(
            json_answer(req),
            (200, json!({"multi": "one, two, three"})),
            "{app}"
        );
    }
}

#[test]
fn require_and_import_load_only_files_under_api() {
    let node = Node::new();
    let outside = [
        ("api/lib/inside.js", "exports.value = 'inside';"),
        ("outside.js", "exports.value = 'outside';"),
        ("private/p.js", "exports.value = 'private';"),
    ];
    app(
        &node,
        "req",
        "try { respond({ value: require(request.query.name).value }); } catch (e) { respond(400, { error: e.message }); }",
        &outside,
    );
    app(
        &node,
        "esm",
        "import { value } from '../outside.js'; export default { fetch() { return new Response(value); } };",
        &outside,
    );
    let server = node.start(&[]);
    let load = |name: &str| {
        json_answer(
            // Module names here need no escaping in a query string.
            server.request(Method::GET, "req.localhost", &format!("/api?name={name}")),
        )
    };
    assert_eq!(load("./lib/inside.js"), (200, json!({"value": "inside"})));
    assert_eq!(load("./lib/inside"), (200, json!({"value": "inside"})));
    for name in [
        "../outside.js",
        "/outside.js",
        "../private/p.js",
        "./lib/../../outside.js",
    ] {
        assert_eq!(
            load(name),
            (
                400,
                json!({"error": format!("cannot load module {name:?}: it is outside api/")})
            )
        );
    }
    let (status, body) = load("outside");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("only files under api/ can be loaded"),
        "{body}"
    );
    let (status, text) = answer(server.request(Method::GET, "esm.localhost", "/api"));
    assert_eq!(status, 500);
    assert!(text.contains("it is outside api/"), "{text}");
}

const FETCH_FEATURES: &str = r#"
export default {
  async fetch(request, env, ctx) {
    switch (new URL(request.url).pathname) {
      case '/api/form': {
        const form = await request.formData();
        return Response.json({ name: form.get('name'), tags: form.getAll('tag'), used: request.bodyUsed });
      }
      case '/api/clone': {
        const copy = request.clone();
        const first = await request.text();
        let again = null;
        try { await request.text(); } catch (e) { again = e.message; }
        return Response.json({ first, copy: await copy.json(), again, method: copy.method, tag: copy.headers.get('x-tag') });
      }
      case '/api/bytes': {
        const buf = await request.arrayBuffer();
        return Response.json({ isBuffer: buf instanceof ArrayBuffer, bytes: Array.from(new Uint8Array(buf)) });
      }
      case '/api/wait': {
        const returned = ctx.waitUntil(Promise.resolve('later'));
        return Response.json({ kind: typeof ctx.waitUntil, returned: returned === undefined ? 'undefined' : returned });
      }
    }
    return new Response('no route', { status: 404 });
  },
};
"#;

#[test]
fn fetch_handlers_read_forms_clones_and_bytes_and_have_wait_until() {
    let node = Node::new();
    app(&node, "fx", FETCH_FEATURES, &[]);
    let server = node.start(&[]);
    let post = |path: &str| server.request(Method::POST, "fx.localhost", path);

    assert_eq!(
        json_answer(post("/api/form").form(&[("name", "ann b"), ("tag", "x"), ("tag", "y&z")])),
        (
            200,
            json!({"name": "ann b", "tags": ["x", "y&z"], "used": true})
        )
    );
    // Only urlencoded bodies: a multipart one is the handler's error.
    let form = reqwest::blocking::multipart::Form::new().text("name", "ann");
    let (status, body) = json_answer(post("/api/form").multipart(form));
    assert_eq!(status, 500);
    assert_eq!(
        body["error"],
        "TypeError: formData() supports only application/x-www-form-urlencoded bodies"
    );

    let (status, body) = json_answer(
        post("/api/clone")
            .header("x-tag", "t")
            .header("content-type", "application/json")
            .body(r#"{"n": 1}"#),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"first": r#"{"n": 1}"#, "copy": {"n": 1}, "again": "Body has already been used",
               "method": "POST", "tag": "t"})
    );

    assert_eq!(
        json_answer(
            post("/api/bytes")
                .header("content-type", "application/octet-stream")
                .body(vec![0u8, 1, 254, 255])
        ),
        (200, json!({"isBuffer": true, "bytes": [0, 1, 254, 255]}))
    );
    assert_eq!(
        json_answer(server.request(Method::GET, "fx.localhost", "/api/wait")),
        (200, json!({"kind": "function", "returned": "undefined"}))
    );
}

#[test]
fn promise_jobs_a_request_leaves_queued_run_before_it_is_answered() {
    let node = Node::new();
    app(
        &node,
        "classic",
        "Promise.resolve().then(function () { return 1; }).then(function () { fazt.app.kv.set('late', 'classic'); }); respond('answered');",
        &[],
    );
    app(
        &node,
        "module",
        "export default { fetch(request, env) { Promise.resolve().then(() => 1).then(() => env.app.kv.set('late', 'module')); return new Response('answered'); } };",
        &[],
    );
    let server = node.start(&[]);
    let late = || {
        node.json(&[
            "sql",
            "SELECT data FROM app_kv WHERE key = 'late' ORDER BY data",
            "--json",
        ])
    };
    for (app, stored) in [
        ("classic", json!([{"data": r#"{"value":"classic"}"#}])),
        (
            "module",
            json!([{"data": r#"{"value":"classic"}"#}, {"data": r#"{"value":"module"}"#}]),
        ),
    ] {
        assert_eq!(
            answer(server.request(Method::GET, &format!("{app}.localhost"), "/api")),
            (200, "answered".to_string())
        );
        // Read at once: the jobs ran before the answer was sent, not after.
        assert_eq!(late(), stored, "{app}");
    }
}

#[test]
fn kv_list_shows_expiry_and_a_taken_document_id_is_refused() {
    let node = Node::new();
    app(&node, "s", STORAGE_CALLS, &[]);
    let server = node.start(&[]);
    let before_set = now_ms();
    store(&server, "s", "kv.set", json!(["a", 1, 60000]));
    let after_set = now_ms();
    store(&server, "s", "kv.set", json!(["b", {"x": 2}]));
    let list = store(&server, "s", "kv.list", json!([""]));
    let entries = list.as_array().unwrap();
    assert_eq!(entries.len(), 2, "{list}");
    assert_eq!(
        (entries[0]["key"].clone(), entries[0]["value"].clone()),
        (json!("a"), json!(1))
    );
    let expires = entries[0]["expiresAt"].as_i64().unwrap();
    assert!(
        (before_set + 60000..=after_set + 60000).contains(&expires),
        "{expires} not within {before_set}..{after_set} + 60 s"
    );
    assert_eq!(
        entries[1],
        json!({"key": "b", "value": {"x": 2}}),
        "no expiresAt without a ttl"
    );

    assert_eq!(
        store(&server, "s", "ds.insert", json!(["c", {"id": "x", "v": 1}])),
        "x"
    );
    let before = node.state();
    assert_eq!(
        storage(&server, "s", "ds.insert", json!(["c", {"id": "x", "v": 2}])),
        Err("collection c already has a document with id \"x\"".to_string())
    );
    // A refused insert changes nothing.
    assert_same_state(&before, &node.state());
    assert_eq!(store(&server, "s", "ds.findOne", json!(["c", "x"]))["v"], 1);
}

/// Sends `GET /api?n=N` to busy.localhost on a connection of its own; returns the whole answer.
fn exchange(port: u16, n: usize) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "GET /api?n={n} HTTP/1.1\r\nHost: busy.localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn more_than_256_waiting_requests_are_answered_503() {
    let node = Node::new();
    // Each request says it runs, then holds its worker until the test writes `go`.
    app(
        &node,
        "busy",
        "var n = request.query.n; fazt.app.kv.set('running/' + n, true); while (!fazt.app.kv.get('go')) {} respond('done ' + n);",
        &[],
    );
    let app_id = node.json(&["app", "info", "busy", "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    // One client holds about 260 connections here: above the default per-client cap.
    let server = Server::spawn(
        node.command()
            .env("FAZT_HTTP_MAX_PER_CLIENT", "1000")
            .args(["server", "start", "--port", "0"]),
    );
    // An app has one worker per core, at most 4 (src/runtime/mod.rs).
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(4));
    let (tx, rx) = std::sync::mpsc::channel();
    let send = |n: usize| {
        let (tx, port) = (tx.clone(), server.port);
        std::thread::spawn(move || {
            let _ = tx.send((n, exchange(port, n)));
        });
    };
    for n in 0..workers {
        send(n);
    }
    eventually("every worker runs a request", || {
        let running = node.json(&[
            "sql",
            "SELECT count(*) AS n FROM app_kv WHERE key LIKE 'running/%'",
            "--json",
        ])[0]["n"]
            .as_u64()
            .unwrap();
        (running == workers as u64).then_some(())
    });
    // 256 wait; the one more is refused at once, whichever it is.
    for n in workers..workers + 257 {
        send(n);
    }
    let (_, refused) = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("an answer while every request waits");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(
        refused.contains("the app is busy: too many requests are waiting"),
        "{refused}"
    );
    node.ok(&[
        "sql",
        &format!(
            "INSERT INTO app_kv (app_id, key, data) VALUES ('{app_id}', 'go', '{{\"value\":true}}')"
        ),
    ]);
    for _ in 0..workers + 256 {
        let (n, answer) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("every waiting request is answered");
        assert!(answer.starts_with("HTTP/1.1 200"), "request {n}: {answer}");
        assert!(answer.ends_with(&format!("done {n}")), "{answer}");
    }
}

/// Every log line of `app`, oldest first.
fn log_messages(node: &Node, app: &str) -> Vec<String> {
    node.ok(&["app", "logs", app, "--json", "-n", "100000"])
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            v["message"].as_str().unwrap().to_string()
        })
        .collect()
}

#[test]
fn the_log_keeps_the_newest_10000_lines_within_16_mib_and_prints_50_by_default() {
    // Each request logs `lines` lines of `size` bytes: "r<request> <line> xxx...".
    let logger = "var q = request.query; for (var i = 0; i < +q.lines; i++) { var head = 'r' + q.r + ' ' + i + ' '; console.log(head + 'x'.repeat(+q.size - head.length)); } respond('ok');";
    let node = Node::new();
    app(&node, "lines", logger, &[]);
    app(&node, "bytes", logger, &[]);
    let server = node.start(&[]);
    let run = |app: &str, r: usize, lines: usize, size: usize| {
        let path = format!("/api?r={r}&lines={lines}&size={size}");
        assert_eq!(server.text(&format!("{app}.localhost"), &path), "ok");
    };
    let newest = |app: &str| {
        let out = node.ok(&["app", "logs", app, "--json", "-n", "1"]);
        serde_json::from_str::<Value>(out.trim())
            .ok()
            .map(|v| v["message"].as_str().unwrap().to_string())
    };

    // 11 requests of 1,000 lines (the most one request keeps): the newest 10,000 stay.
    for r in 0..11 {
        run("lines", r, 1000, 20);
    }
    eventually("the last request's lines are written", || {
        newest("lines")
            .filter(|m| m.starts_with("r10 999 "))
            .map(|_| ())
    });
    let kept = log_messages(&node, "lines");
    assert_eq!(kept.len(), 10_000);
    assert!(kept[0].starts_with("r1 0 "), "{}", kept[0]);

    // Without -n: the newest 50 lines, oldest first.
    let human = node.ok(&["app", "logs", "lines"]);
    let human: Vec<&str> = human.lines().collect();
    assert_eq!(human.len(), 50);
    assert!(human[0].contains(" r10 950 "), "{}", human[0]);
    assert!(human[49].contains(" r10 999 "), "{}", human[49]);

    // 70 requests of 15 lines of 16 KiB (within a request's 256 KiB): 1,050 lines, of which
    // the newest 1,024 make exactly 16 MiB.
    for r in 0..70 {
        run("bytes", r, 15, 16 << 10);
    }
    eventually("the last request's lines are written", || {
        newest("bytes")
            .filter(|m| m.starts_with("r69 14 "))
            .map(|_| ())
    });
    let kept = log_messages(&node, "bytes");
    assert_eq!(kept.len(), 1024);
    assert!(kept.iter().all(|m| m.len() == 16 << 10));
    assert!(kept[0].starts_with("r1 11 "), "{}", &kept[0][..20]);
}
