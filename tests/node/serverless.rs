//! Serverless apps: api/main.js answering /api on the app's host, in the original fazt API
//! and as a web-standard fetch handler, with storage, variables, logs and limits.

use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};

use crate::harness::{assert_same_state, Node, Server};
use crate::peers::{eventually, joined_pair, Pair};

/// A node serving one app `name` whose api/main.js is `main` (plus other files).
fn app(node: &Node, name: &str, main: &str, more: &[(&str, &str)]) -> std::path::PathBuf {
    let mut files = vec![("index.html", "static"), ("api/main.js", main)];
    files.extend_from_slice(more);
    let dir = node.site(name, &files);
    node.deploy(&dir, &["--name", name]);
    dir
}

fn call(
    server: &Server,
    app: &str,
    method: Method,
    path: &str,
) -> reqwest::blocking::RequestBuilder {
    server.request(method, &format!("{app}.localhost"), path)
}

/// Status and JSON body of a request.
fn send(req: reqwest::blocking::RequestBuilder) -> (u16, Value) {
    let resp = req.send().expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

fn get(server: &Server, app: &str, path: &str) -> (u16, Value) {
    send(call(server, app, Method::GET, path))
}

fn post_json(server: &Server, app: &str, path: &str, body: &Value) -> (u16, Value) {
    send(call(server, app, Method::POST, path).json(body))
}

/// The app's log lines on this node, as `fazt app logs --json` prints them.
fn logs(node: &Node, app: &str) -> Vec<Value> {
    node.ok(&["app", "logs", app, "--json", "-n", "1000"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn wait_for_log(node: &Node, app: &str, needle: &str) -> Vec<Value> {
    eventually(&format!("{app}'s log mentions {needle:?}"), || {
        let lines = logs(node, app);
        lines
            .iter()
            .any(|l| l["message"].as_str().unwrap().contains(needle))
            .then_some(lines)
    })
}

const ORIGINAL_API: &str = r#"
console.log('called', request.method, request.path);
var route = request.path.replace(/^\/api\/?/, '');
if (route === 'request') {
  return respond({ method: request.method, path: request.path, query: request.query,
                   agent: request.headers['x-agent'], body: request.body,
                   files: (request.files || []).map(function (f) {
                     return { name: f.name, type: f.type, size: f.size, bytes: f.data.byteLength, field: f.field };
                   }) });
}
if (route === 'status') return respond(201, { made: true }, { 'X-Extra': 'yes' });
if (route === 'text') return respond('plain words');
if (route === 'bytes') return respond(200, new Uint8Array([1, 2, 3]).buffer, { 'content-type': 'application/x-thing' });
if (route === 'value') return { returned: 'as JSON' };
if (route === 'noreturn') { respond(202, 'no return needed'); }
else if (route === 'throw') { throw new Error('broken on purpose'); }
else if (route === 'sloppy') { implicitGlobal = 41; respond({ value: implicitGlobal + 1 }); }
else if (route === 'require') { var lib = require('./lib/helper.js'); respond({ sum: lib.add(2, 3), again: require('./lib/helper').add(1, 1) }); }
else if (route === 'empty') { }
else respond(404, { error: 'no route ' + route });
"#;

const HELPER: &str = "exports.add = function (a, b) { return a + b; };";

#[test]
fn original_api_apps_run_unchanged() {
    let node = Node::new();
    app(
        &node,
        "orig",
        ORIGINAL_API,
        &[("api/lib/helper.js", HELPER)],
    );
    let server = node.start(&[]);

    let (status, body) = send(
        call(&server, "orig", Method::POST, "/api/request?a=1&b=two&a=3")
            .header("X-Agent", "tester")
            .json(&json!({"n": 1, "list": [1, 2]})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"method": "POST", "path": "/api/request", "query": {"a": "1", "b": "two"},
               "agent": "tester", "body": {"n": 1, "list": [1, 2]}, "files": []})
    );

    // Form bodies become fields; multipart files arrive as ArrayBuffers.
    let (_, body) = send(
        call(&server, "orig", Method::POST, "/api/request").form(&[("name", "ann"), ("age", "7")]),
    );
    assert_eq!(body["body"], json!({"name": "ann", "age": "7"}));
    let form = reqwest::blocking::multipart::Form::new()
        .text("title", "holiday")
        .part(
            "photo",
            reqwest::blocking::multipart::Part::bytes(vec![7u8; 1000])
                .file_name("beach.jpg")
                .mime_str("image/jpeg")
                .unwrap(),
        );
    let (status, body) = send(call(&server, "orig", Method::POST, "/api/request").multipart(form));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body"], json!({"title": "holiday"}));
    assert_eq!(
        body["files"],
        json!([{"name": "beach.jpg", "type": "image/jpeg", "size": 1000, "bytes": 1000, "field": "photo"}])
    );

    let resp = call(&server, "orig", Method::GET, "/api/status")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-extra"], "yes");
    assert_eq!(resp.headers()["content-type"], "application/json");
    assert_eq!(resp.json::<Value>().unwrap(), json!({"made": true}));

    let resp = call(&server, "orig", Method::GET, "/api/text")
        .send()
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert_eq!(resp.text().unwrap(), "plain words");
    let resp = call(&server, "orig", Method::GET, "/api/bytes")
        .send()
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "application/x-thing");
    assert_eq!(resp.bytes().unwrap().to_vec(), vec![1, 2, 3]);

    assert_eq!(
        get(&server, "orig", "/api/value"),
        (200, json!({"returned": "as JSON"}))
    );
    assert_eq!(
        get(&server, "orig", "/api/noreturn"),
        (202, json!("no return needed"))
    );
    assert_eq!(
        get(&server, "orig", "/api/sloppy"),
        (200, json!({"value": 42}))
    );
    assert_eq!(
        get(&server, "orig", "/api/require"),
        (200, json!({"sum": 5, "again": 2}))
    );
    assert_eq!(get(&server, "orig", "/api/empty").0, 204);
    // `/api` itself is the app's too; other paths stay static.
    assert_eq!(get(&server, "orig", "/api").1["error"], "no route ");
    assert_eq!(server.text("orig.localhost", "/"), "static");

    // A thrown error: 500 with a JSON message; the stack goes to the log only.
    let (status, body) = get(&server, "orig", "/api/throw");
    assert_eq!(status, 500);
    assert_eq!(body, json!({"error": "Error: broken on purpose"}));
    let lines = wait_for_log(&node, "orig", "broken on purpose");
    let error = lines.iter().find(|l| l["level"] == "error").unwrap();
    assert!(
        error["message"].as_str().unwrap().contains("api/main.js"),
        "{error}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l["message"] == "called GET /api/throw"),
        "{lines:?}"
    );
    let text = node.ok(&["app", "logs", "orig", "-n", "2"]);
    assert_eq!(
        text.lines()
            .filter(|l| l.contains(" error ") || l.contains(" info "))
            .count(),
        2,
        "{text}"
    );
}

#[test]
fn bad_requests_are_refused_before_the_app_runs() {
    let node = Node::new();
    app(
        &node,
        "strict",
        "console.log('ran', request.path); respond({ ok: true });",
        &[],
    );
    let server = node.start(&[]);
    let (status, body) = send(
        call(&server, "strict", Method::POST, "/api/x")
            .header("content-type", "application/json")
            .body("{not json"),
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("request body is not valid JSON"),
        "{body}"
    );
    let (status, body) = send(
        call(&server, "strict", Method::POST, "/api/x")
            .header("content-type", "multipart/form-data; boundary=zz")
            .body("--zz\r\ngarbage"),
    );
    assert_eq!(status, 400, "{body}");
    // Over the body limit (10 MiB): 413, whether the length is declared or streamed. The
    // server may answer before reading the rest, so the client here ignores failed writes.
    let declared = raw_exchange(server.port, "Content-Length: 10485761\r\n", &[]);
    assert!(declared.starts_with("HTTP/1.1 413"), "{declared}");
    let chunk = format!("100000\r\n{}\r\n", "x".repeat(0x100000));
    let chunks = vec![chunk.as_bytes(); 11];
    let streamed = raw_exchange(server.port, "Transfer-Encoding: chunked\r\n", &chunks);
    assert!(streamed.starts_with("HTTP/1.1 413"), "{streamed}");
    // The app never ran: its lines are written in order, in batches, so once the line of a
    // request made after the refused ones is there, any line of theirs would be too.
    assert_eq!(
        get(&server, "strict", "/api/after"),
        (200, json!({"ok": true}))
    );
    let lines = wait_for_log(&node, "strict", "ran /api/after");
    assert_eq!(lines.len(), 1, "{lines:?}");
}

/// Sends a POST to strict.localhost/api/x with `header` and `body` (write errors ignored:
/// the server may stop reading early) and returns the start of the response.
fn raw_exchange(port: u16, header: &str, body: &[&[u8]]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let head = format!(
        "POST /api/x HTTP/1.1\r\nHost: strict.localhost\r\n{header}Connection: close\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).unwrap();
    for part in body {
        if stream.write_all(part).is_err() {
            break;
        }
    }
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).chars().take(200).collect()
}

const STORAGE_APP: &str = r#"
var kv = fazt.app.kv, ds = fazt.app.ds, s3 = fazt.app.s3;
var r = request.path.slice(5), b = request.body || {};
if (r === 'kv/set') { kv.set(b.key, b.value, b.ttl); return respond({ ok: true }); }
if (r === 'kv/get') return respond({ value: kv.get(request.query.key) });
if (r === 'kv/delete') return respond({ deleted: kv.delete(request.query.key) });
if (r === 'kv/list') return respond(kv.list(request.query.prefix));
if (r === 'ds/insert') return respond({ id: ds.insert(b.collection, b.doc) });
if (r === 'ds/find') return respond(ds.find(b.collection, b.query, b.options));
if (r === 'ds/findOne') return respond({ doc: ds.findOne(b.collection, b.query) });
if (r === 'ds/update') return respond({ n: ds.update(b.collection, b.query, b.changes) });
if (r === 'ds/delete') return respond({ n: ds.delete(b.collection, b.query) });
if (r === 'ds/count') return respond({ n: ds.count(b.collection, b.query) });
if (r === 's3/put') return respond(s3.put(b.path, b.text, b.mime));
if (r === 's3/putBytes') return respond(s3.put(b.path, new Uint8Array(b.bytes)));
if (r === 's3/get') {
  var f = s3.get(request.query.path);
  return respond(f === null ? { found: false } : { mime: f.mime, size: f.size, hash: f.hash,
    isBuffer: f.data instanceof ArrayBuffer, bytes: Array.from(new Uint8Array(f.data)) });
}
if (r === 's3/raw') { var g = s3.get(request.query.path); return respond(200, g.data, { 'content-type': g.mime }); }
if (r === 's3/list') return respond(s3.list(request.query.prefix));
if (r === 's3/delete') return respond({ deleted: s3.delete(request.query.path) });
if (r === 'legacy') { fazt.storage.kv.set('old', 1); return respond({ same: fazt.app.kv.get('old') }); }
if (r === 'user') { try { fazt.app.user.kv.get('x'); } catch (e) { return respond(401, { error: e.message }); } }
if (r === 'error') { try { ds.update('c', {}, { $push: { a: 1 } }); } catch (e) { return respond(400, { error: e.message }); } }
respond(404, { error: 'no route ' + r });
"#;

#[test]
fn kv_documents_and_blobs_work_as_the_original_api_describes() {
    let node = Node::new();
    app(&node, "store", STORAGE_APP, &[]);
    let server = node.start(&[]);
    let s = &server;

    // Key-value: JSON values, prefixes, deletes, time to live.
    post_json(
        s,
        "store",
        "/api/kv/set",
        &json!({"key": "user:1", "value": {"name": "ann", "tags": [1]}}),
    );
    post_json(
        s,
        "store",
        "/api/kv/set",
        &json!({"key": "user:2", "value": 2}),
    );
    post_json(
        s,
        "store",
        "/api/kv/set",
        &json!({"key": "other", "value": "x"}),
    );
    post_json(
        s,
        "store",
        "/api/kv/set",
        &json!({"key": "brief", "value": true, "ttl": 50}),
    );
    assert_eq!(
        get(s, "store", "/api/kv/get?key=user:1").1,
        json!({"value": {"name": "ann", "tags": [1]}})
    );
    assert_eq!(
        get(s, "store", "/api/kv/get?key=missing").1,
        json!({"value": null})
    );
    let (_, list) = get(s, "store", "/api/kv/list?prefix=user:");
    assert_eq!(
        list,
        json!([{"key": "user:1", "value": {"name": "ann", "tags": [1]}}, {"key": "user:2", "value": 2}])
    );
    std::thread::sleep(Duration::from_millis(120));
    assert_eq!(
        get(s, "store", "/api/kv/get?key=brief").1,
        json!({"value": null})
    );
    // The next write removes the expired entry from storage.
    let stored = |key: &str| {
        let q = format!("SELECT count(*) AS n FROM app_kv WHERE key = '{key}'");
        node.json(&["sql", &q, "--json"])[0]["n"].clone()
    };
    assert_eq!(stored("brief"), json!(1));
    post_json(
        s,
        "store",
        "/api/kv/set",
        &json!({"key": "later", "value": 1}),
    );
    assert_eq!(stored("brief"), json!(0));
    assert_eq!(
        get(s, "store", "/api/kv/delete?key=user:2").1,
        json!({"deleted": true})
    );
    assert_eq!(
        get(s, "store", "/api/kv/delete?key=user:2").1,
        json!({"deleted": false})
    );
    assert_eq!(get(s, "store", "/api/legacy").1, json!({"same": 1}));

    // Documents.
    let ids: Vec<String> = [("ann", 30, "oslo"), ("bob", 25, "rome"), ("cy", 35, "oslo")]
        .iter()
        .map(|(n, age, city)| {
            let (_, r) = post_json(s, "store", "/api/ds/insert",
                &json!({"collection": "people", "doc": {"name": n, "age": age, "home": {"city": city}, "tags": [n]}}));
            r["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids[0].len(), 36, "a UUID: {}", ids[0]);
    let names = |query: Value, options: Value| -> Vec<String> {
        let (status, docs) = post_json(
            s,
            "store",
            "/api/ds/find",
            &json!({"collection": "people", "query": query, "options": options}),
        );
        assert_eq!(status, 200, "{docs}");
        docs.as_array()
            .unwrap()
            .iter()
            .map(|d| d["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(json!({}), json!({"order": "asc"})),
        ["ann", "bob", "cy"]
    );
    assert_eq!(
        names(json!({}), json!({})),
        ["cy", "bob", "ann"],
        "newest first by default"
    );
    assert_eq!(
        names(json!({"age": {"$gte": 30}}), json!({"order": "asc"})),
        ["ann", "cy"]
    );
    assert_eq!(
        names(json!({"home.city": "oslo", "age": {"$lt": 32}}), json!({})),
        ["ann"]
    );
    assert_eq!(
        names(
            json!({"name": {"$in": ["bob", "cy"]}}),
            json!({"order": "asc"})
        ),
        ["bob", "cy"]
    );
    assert_eq!(
        names(json!({"name": {"$nin": ["bob", "cy"]}}), json!({})),
        ["ann"]
    );
    assert_eq!(
        names(json!({"tags": {"$contains": "bob"}}), json!({})),
        ["bob"]
    );
    assert_eq!(
        names(
            json!({"age": {"$ne": 30}, "name": {"$eq": "cy"}}),
            json!({})
        ),
        ["cy"]
    );
    assert_eq!(
        names(
            json!({"age": {"$gt": 20, "$lte": 30}}),
            json!({"order": "asc"})
        ),
        ["ann", "bob"]
    );
    assert_eq!(
        names(json!({}), json!({"order": "asc", "limit": 1, "offset": 1})),
        ["bob"]
    );
    let (_, one) = post_json(
        s,
        "store",
        "/api/ds/findOne",
        &json!({"collection": "people", "query": ids[1]}),
    );
    assert_eq!(one["doc"]["name"], "bob");
    assert_eq!(one["doc"]["id"], ids[1].as_str());
    assert!(one["doc"]["_createdAt"].as_i64().unwrap() > 0);
    let (_, n) = post_json(
        s,
        "store",
        "/api/ds/update",
        &json!({"collection": "people", "query": {"home.city": "oslo"},
        "changes": {"$inc": {"visits": 2}, "$set": {"home.zip": "0150"}, "$unset": {"tags": 1}, "seen": true}}),
    );
    assert_eq!(n, json!({"n": 2}));
    post_json(
        s,
        "store",
        "/api/ds/update",
        &json!({"collection": "people", "query": {"name": "ann"}, "changes": {"$inc": {"visits": 1}}}),
    );
    let (_, one) = post_json(
        s,
        "store",
        "/api/ds/findOne",
        &json!({"collection": "people", "query": {"name": "ann"}}),
    );
    let doc = &one["doc"];
    assert_eq!(
        (
            doc["visits"].clone(),
            doc["home"].clone(),
            doc["seen"].clone()
        ),
        (
            json!(3),
            json!({"city": "oslo", "zip": "0150"}),
            json!(true)
        )
    );
    assert!(doc.get("tags").is_none(), "{doc}");
    assert_eq!(
        post_json(
            s,
            "store",
            "/api/ds/count",
            &json!({"collection": "people", "query": {"seen": true}})
        )
        .1,
        json!({"n": 2})
    );
    assert_eq!(
        post_json(
            s,
            "store",
            "/api/ds/delete",
            &json!({"collection": "people", "query": {"age": {"$gt": 26}}})
        )
        .1,
        json!({"n": 2})
    );
    assert_eq!(
        post_json(
            s,
            "store",
            "/api/ds/count",
            &json!({"collection": "people", "query": {}})
        )
        .1,
        json!({"n": 1})
    );
    let (status, body) = get(s, "store", "/api/error");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("unknown update operator $push"),
        "{body}"
    );

    // Blobs: strings and bytes in, ArrayBuffers out.
    let (_, meta) = post_json(
        s,
        "store",
        "/api/s3/put",
        &json!({"path": "notes/a.txt", "text": "hello", "mime": "text/plain"}),
    );
    assert_eq!(
        (meta["size"].clone(), meta["mime"].clone()),
        (json!(5), json!("text/plain"))
    );
    post_json(
        s,
        "store",
        "/api/s3/putBytes",
        &json!({"path": "notes/b.bin", "bytes": [0, 255, 7]}),
    );
    post_json(
        s,
        "store",
        "/api/s3/put",
        &json!({"path": "top.txt", "text": "x"}),
    );
    let (_, f) = get(s, "store", "/api/s3/get?path=notes/b.bin");
    assert_eq!(f["bytes"], json!([0, 255, 7]));
    assert_eq!(f["isBuffer"], true);
    assert_eq!(f["hash"].as_str().unwrap().len(), 64);
    let raw = call(s, "store", Method::GET, "/api/s3/raw?path=notes/a.txt")
        .send()
        .unwrap();
    assert_eq!(raw.headers()["content-type"], "text/plain");
    assert_eq!(raw.text().unwrap(), "hello");
    let (_, list) = get(s, "store", "/api/s3/list?prefix=notes/");
    let paths: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths, ["notes/a.txt", "notes/b.bin"]);
    assert_eq!(
        get(s, "store", "/api/s3/delete?path=notes/a.txt").1,
        json!({"deleted": true})
    );
    assert_eq!(
        get(s, "store", "/api/s3/get?path=notes/a.txt").1,
        json!({"found": false})
    );

    // Per-user storage needs a login, which this node does not have yet.
    let (status, body) = get(s, "store", "/api/user");
    assert_eq!(status, 401);
    assert!(
        body["error"].as_str().unwrap().contains("login required"),
        "{body}"
    );
}

#[test]
fn variables_are_set_from_the_cli_and_read_by_the_app() {
    let node = Node::new();
    app(
        &node,
        "conf",
        r#"respond({ greeting: fazt.env.get('GREETING'), fallback: fazt.env.get('NOPE', 'dflt'),
        has: fazt.env.has('GREETING'), missing: fazt.env.get('NOPE'), id: fazt.app.id, name: fazt.app.name })"#,
        &[],
    );
    let server = node.start(&[]);
    node.ok(&["app", "env", "set", "conf", "GREETING", "hej hej"]);
    node.ok(&["app", "env", "set", "conf", "OTHER", "2"]);
    let (_, body) = get(&server, "conf", "/api");
    assert_eq!(body["greeting"], "hej hej");
    assert_eq!(body["fallback"], "dflt");
    assert_eq!(body["has"], true);
    assert_eq!(body["missing"], Value::Null);
    assert_eq!(body["name"], "conf");
    assert!(body["id"].as_str().unwrap().starts_with("app_"));
    assert_eq!(
        node.ok(&["app", "env", "list", "conf"]),
        "GREETING=hej hej\nOTHER=2\n"
    );
    assert_eq!(
        node.json(&["app", "env", "list", "conf", "--json"]),
        json!({"GREETING": "hej hej", "OTHER": "2"})
    );
    node.ok(&["app", "env", "unset", "conf", "GREETING"]);
    assert_eq!(get(&server, "conf", "/api").1["has"], false);
    // The running server may still be writing the console lines of the requests above
    // (app_logs, node-local, in batches); everything else must stay as it is.
    let before = node.state_without(&["app_logs"]);
    assert!(node
        .fails(&["app", "env", "unset", "conf", "GREETING"])
        .contains("no variable GREETING"));
    assert!(node
        .fails(&["app", "env", "set", "nope", "A", "1"])
        .contains("no app named"));
    assert!(node
        .fails(&["app", "env", "set", "conf", "bad key", "1"])
        .contains("invalid variable name"));
    assert!(node
        .fails(&["app", "logs", "nope"])
        .contains("no app named"));
    assert_same_state(&before, &node.state_without(&["app_logs"]));
}

#[test]
fn apps_and_requests_are_isolated() {
    let node = Node::new();
    // Every way a script might leave something behind for the next request.
    let leaky = r#"
        var seen = {
          counter: typeof globalThis.counter === 'undefined' ? null : globalThis.counter,
          implicit: typeof implicitGlobal === 'undefined' ? null : implicitGlobal,
          viaThis: typeof viaThis === 'undefined' ? null : viaThis,
          viaFunction: Function('return this')().leaked === undefined ? null : 'leaked',
          polluted: ({}).polluted === undefined ? null : ({}).polluted,
          pushWorks: (function () { var a = []; a.push(1); return a.length === 1; })(),
          kvIntact: typeof fazt.app.kv.get === 'function',
          module: require('./state.js').bump(),
        };
        globalThis.counter = (globalThis.counter || 0) + 1;
        implicitGlobal = 'set';
        this.viaThis = 'set';
        try { Function('return this')().leaked = 'yes'; } catch (e) {}
        try { Object.prototype.polluted = 'yes'; } catch (e) {}
        try { Array.prototype.push = function () { return -1; }; } catch (e) {}
        try { fazt.app.kv.get = null; } catch (e) {}
        fazt.app.kv.set('mine', 'a');
        respond(seen)"#;
    let state = "var count = 0; exports.bump = function () { count += 1; return count; };";
    // What programs commonly do to objects that inherit from built-ins still works.
    let ordinary = r#"
        class NotFound extends Error { constructor(m) { super(m); this.name = 'NotFound'; } }
        var e = new NotFound('gone');
        var o = { toString: null }; o.toString = function () { return 'custom'; };
        function Old() {} Old.prototype = Object.create(Error.prototype); Old.prototype.constructor = Old;
        respond({ counter: typeof globalThis.counter, kv: fazt.app.kv.get('mine'),
                  error: e.name + ': ' + e.message, isError: e instanceof Error, custom: String(o),
                  old: new Old() instanceof Old })"#;
    app(&node, "a", leaky, &[("api/state.js", state)]);
    app(&node, "b", ordinary, &[]);
    let server = node.start(&[]);
    let clean = json!({"counter": null, "implicit": null, "viaThis": null, "viaFunction": null,
        "polluted": null, "pushWorks": true, "kvIntact": true, "module": 1});
    for _ in 0..3 {
        let (status, body) = get(&server, "a", "/api");
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, clean, "something survived a request");
        let (_, body) = get(&server, "b", "/api");
        assert_eq!(
            body,
            json!({"counter": "undefined", "kv": null, "error": "NotFound: gone", "isError": true,
                   "custom": "custom", "old": true})
        );
    }
}

#[test]
fn limits_fail_one_request_and_leave_the_node_and_other_apps_running() {
    let node = Node::new();
    app(
        &node,
        "spin",
        r#"
        if (request.path === '/api/loop') { fazt.app.kv.set('spinning', true); while (true) {} }
        if (request.path === '/api/memory') { var keep = []; while (true) keep.push(new Array(1e5).fill(keep.length)); }
        if (request.path === '/api/deep') { var f = function (n) { return f(n + 1) + 1; }; f(0); }
        respond({ alive: true })"#,
        &[],
    );
    app(&node, "calm", "respond({ calm: true })", &[]);
    let server = node.start(&[]);
    let port = server.port;
    let looping = std::thread::spawn(move || {
        let resp = reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{port}/api/loop"))
            .header("Host", "spin.localhost")
            .timeout(Duration::from_secs(60))
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    });
    // While one app spins (it says so in its storage first), another answers.
    eventually("the spin app stores that it is spinning", || {
        let spinning = "SELECT count(*) AS n FROM app_kv WHERE key = 'spinning'";
        (node.json(&["sql", spinning, "--json"])[0]["n"] == 1).then_some(())
    });
    assert_eq!(get(&server, "calm", "/api"), (200, json!({"calm": true})));
    assert!(
        !looping.is_finished(),
        "the loop ended before the other app answered"
    );
    let (status, body) = looping.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains("the request ran longer than the app's time limit (5 s)"),
        "{body}"
    );

    let (status, body) = get(&server, "spin", "/api/memory");
    assert_eq!(status, 500);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("the app ran out of memory (limit"),
        "{body}"
    );
    let (status, body) = get(&server, "spin", "/api/deep");
    assert_eq!(status, 500);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("RangeError: Maximum call stack size exceeded"),
        "{body}"
    );
    assert_eq!(get(&server, "spin", "/api"), (200, json!({"alive": true})));
    wait_for_log(&node, "spin", "ran longer than the app's time limit (5 s)");
}

#[test]
fn app_storage_replicates_between_peers() {
    let Pair {
        local,
        local_server,
        zyt,
        zyt_server,
    } = joined_pair();
    let dir = app(&local, "store", STORAGE_APP, &[]);
    local.deploy(&dir, &["--name", "store", "--to", "zyt"]);

    // Written on zyt, read on local.
    post_json(
        &zyt_server,
        "store",
        "/api/kv/set",
        &json!({"key": "from", "value": "zyt"}),
    );
    post_json(
        &zyt_server,
        "store",
        "/api/ds/insert",
        &json!({"collection": "c", "doc": {"id": "d1", "n": 1}}),
    );
    post_json(
        &zyt_server,
        "store",
        "/api/s3/putBytes",
        &json!({"path": "p.bin", "bytes": [9, 8, 7]}),
    );
    eventually("local sees zyt's writes", || {
        let kv = get(&local_server, "store", "/api/kv/get?key=from").1;
        let doc = post_json(
            &local_server,
            "store",
            "/api/ds/findOne",
            &json!({"collection": "c", "query": "d1"}),
        )
        .1;
        let blob = get(&local_server, "store", "/api/s3/get?path=p.bin").1;
        (kv == json!({"value": "zyt"}) && doc["doc"]["n"] == 1 && blob["bytes"] == json!([9, 8, 7]))
            .then_some(())
    });

    // Counters add up across nodes: both sides increment, every increment counts.
    for server in [&local_server, &zyt_server, &local_server] {
        post_json(
            server,
            "store",
            "/api/ds/update",
            &json!({"collection": "c", "query": "d1", "changes": {"$inc": {"n": 10}}}),
        );
    }
    for server in [&local_server, &zyt_server] {
        eventually("the counter adds up on both nodes", || {
            let doc = post_json(
                server,
                "store",
                "/api/ds/findOne",
                &json!({"collection": "c", "query": "d1"}),
            )
            .1;
            (doc["doc"]["n"] == 31).then_some(())
        });
    }
    // Written on local, read on zyt; logs stay on the node that ran the code.
    post_json(
        &local_server,
        "store",
        "/api/kv/set",
        &json!({"key": "from", "value": "local"}),
    );
    eventually("zyt sees local's write", || {
        (get(&zyt_server, "store", "/api/kv/get?key=from").1 == json!({"value": "local"}))
            .then_some(())
    });
    local.ok(&["app", "env", "set", "store", "MODE", "prod"]);
    eventually("the variable reaches zyt", || {
        (zyt.ok(&["app", "env", "list", "store"]) == "MODE=prod\n").then_some(())
    });
}

const FETCH_APP: &str = r#"
import { greet } from './lib/greet.js';
let served = 0;
export default {
  async fetch(request, env, ctx) {
    served += 1;
    const url = new URL(request.url);
    switch (url.pathname) {
      case '/api/echo': {
        const body = await request.json();
        return Response.json(
          { method: request.method, q: url.searchParams.get('q'), body, agent: request.headers.get('X-Agent'), served },
          { status: 201, headers: { 'X-Extra': 'yes' } });
      }
      case '/api/web': {
        const bytes = new TextEncoder().encode('héllo');
        const headers = new Headers({ 'A': '1' });
        headers.append('a', '2');
        return Response.json({
          greet: greet('you'), encoded: bytes.length, decoded: new TextDecoder().decode(bytes),
          b64: btoa('hi'), unb64: atob('aGk='), uuid: crypto.randomUUID(),
          random: crypto.getRandomValues(new Uint8Array(8)).length,
          params: new URLSearchParams({ a: '1 2', b: 'x&y' }).toString(), header: headers.get('a'),
          mode: env.MODE ?? null, stored: (env.app.kv.set('k', [1]), env.app.kv.get('k')),
          same: env.fazt === fazt,
        });
      }
      case '/api/text':
        return new Response('plain', { headers: { 'content-type': 'text/plain' } });
      case '/api/bytes':
        return new Response(new Uint8Array([4, 5, 6]));
      case '/api/wrong':
        return { not: 'a Response' };
      case '/api/throws':
        throw new RangeError('out of range on purpose');
      default:
        return new Response('nothing here', { status: 404 });
    }
  },
};
"#;

#[test]
fn fetch_handlers_get_web_standard_requests_and_return_responses() {
    let node = Node::new();
    let dir = node.site(
        "fx",
        &[
            ("index.html", "static"),
            ("api/main.js", FETCH_APP),
            (
                "api/lib/greet.js",
                "export function greet(name) { return `hi ${name}`; }",
            ),
        ],
    );
    node.deploy(&dir, &["--name", "fx"]);
    node.ok(&["app", "env", "set", "fx", "MODE", "prod"]);
    let server = node.start(&[]);

    for _ in 0..2 {
        let resp = call(&server, "fx", Method::POST, "/api/echo?q=1")
            .header("X-Agent", "tester")
            .header("content-type", "application/json")
            .body(r#"{"not": "parsed by fazt"}"#)
            .send()
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert_eq!(resp.headers()["x-extra"], "yes");
        // `served` counts from 1 again: module state does not outlive a request.
        assert_eq!(
            resp.json::<Value>().unwrap(),
            json!({"method": "POST", "q": "1", "body": {"not": "parsed by fazt"}, "agent": "tester", "served": 1})
        );
    }
    let (status, web) = get(&server, "fx", "/api/web");
    assert_eq!(status, 200, "{web}");
    assert_eq!(web["greet"], "hi you");
    assert_eq!(
        (web["encoded"].clone(), web["decoded"].clone()),
        (json!(6), json!("héllo"))
    );
    assert_eq!(
        (web["b64"].clone(), web["unb64"].clone()),
        (json!("aGk="), json!("hi"))
    );
    let uuid = web["uuid"].as_str().unwrap();
    assert_eq!((uuid.len(), &uuid[14..15]), (36, "4"), "{uuid}");
    assert_eq!(web["random"], 8);
    assert_eq!(web["params"], "a=1+2&b=x%26y");
    assert_eq!(web["header"], "1, 2");
    assert_eq!(web["mode"], "prod");
    assert_eq!(web["stored"], json!([1]));
    assert_eq!(web["same"], true);

    let resp = call(&server, "fx", Method::GET, "/api/text")
        .send()
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/plain");
    assert_eq!(resp.text().unwrap(), "plain");
    let resp = call(&server, "fx", Method::GET, "/api/bytes")
        .send()
        .unwrap();
    assert_eq!(resp.bytes().unwrap().to_vec(), vec![4, 5, 6]);
    assert_eq!(
        get(&server, "fx", "/api/elsewhere"),
        (404, json!("nothing here"))
    );
    let (status, body) = get(&server, "fx", "/api/wrong");
    assert_eq!(status, 500);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("must return a Response"),
        "{body}"
    );
    let (status, body) = get(&server, "fx", "/api/throws");
    assert_eq!(
        (status, body),
        (500, json!({"error": "RangeError: out of range on purpose"}))
    );
    wait_for_log(&node, "fx", "out of range on purpose");
    // A body a fetch handler reads itself is not checked by fazt.
    let (status, _) = send(
        call(&server, "fx", Method::POST, "/api/text")
            .header("content-type", "application/json")
            .body("{not json"),
    );
    assert_eq!(status, 200);
}

#[test]
fn a_broken_script_answers_500_and_says_why_in_the_log() {
    let node = Node::new();
    app(&node, "broken", "respond({ ok: true ", &[]);
    let server = node.start(&[]);
    let (status, body) = get(&server, "broken", "/api");
    assert_eq!(status, 500);
    assert!(
        body["error"].as_str().unwrap().starts_with("SyntaxError"),
        "{body}"
    );
    wait_for_log(&node, "broken", "SyntaxError");
    // Fixing the script is a deploy away; the next request runs the new version.
    app(&node, "broken", "respond({ ok: true })", &[]);
    assert_eq!(get(&server, "broken", "/api"), (200, json!({"ok": true})));
}

#[test]
fn logs_can_be_followed_as_they_are_written() {
    use std::io::{BufRead, BufReader};
    let node = Node::new();
    app(
        &node,
        "chatty",
        "console.warn('visit', request.query.n); respond({ ok: true })",
        &[],
    );
    let server = node.start(&[]);
    get(&server, "chatty", "/api?n=1");
    wait_for_log(&node, "chatty", "visit 1");
    let mut follow = node
        .command()
        .args(["app", "logs", "chatty", "-f", "--json", "-n", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // The follower prints the newest line first: once it has, its cursor is past that line,
    // so the next request's line can only reach it by being followed.
    let first: Value = serde_json::from_str(
        &rx.recv_timeout(Duration::from_secs(30))
            .expect("the newest line"),
    )
    .unwrap();
    assert_eq!(first["message"], "visit 1");
    get(&server, "chatty", "/api?n=2");
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("a followed line");
    let _ = follow.kill();
    let _ = follow.wait();
    let line: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (line["level"].clone(), line["message"].clone()),
        (json!("warn"), json!("visit 2"))
    );
}
