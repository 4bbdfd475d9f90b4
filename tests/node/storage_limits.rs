//! App storage limits: reads of large collections stay within a request's limits, and
//! per-app quotas bound what an app stores.

use serde_json::{json, Value};

use crate::harness::{assert_same_state, Node, Server};
use crate::peers::{eventually, joined_pair, Pair};

const STORAGE_API: &str = r#"
var kv = fazt.app.kv, ds = fazt.app.ds, s3 = fazt.app.s3;
var r = request.path.replace(/^\/api\/?/, '');
var q = request.query;
function attempt(f) {
  try { return respond(f()); } catch (e) { return respond(400, { error: e.message }); }
}
var query = JSON.parse(q.query || '{}');
if (r === 'count') return attempt(function () { return { n: ds.count('c', query) }; });
if (r === 'find') return attempt(function () {
  var d = ds.find('c', query, JSON.parse(q.options || '{}'));
  return { ns: d.map(function (x) { return x.n; }), hits: d.map(function (x) { return x.hits; }) };
});
if (r === 'inc') return attempt(function () { return { n: ds.update('c', query, { $inc: { hits: 1 } }) }; });
if (r === 'list') return attempt(function () { return { n: kv.list(q.prefix || '').length }; });
if (r === 'kv/set') return attempt(function () { kv.set(q.key, 'x'.repeat(Number(q.size))); return {}; });
if (r === 'kv/get') return attempt(function () { var v = kv.get(q.key); return { size: v === null ? null : v.length }; });
if (r === 'kv/delete') return attempt(function () { return { deleted: kv.delete(q.key) }; });
if (r === 'ds/insert') return attempt(function () { return { id: ds.insert('d', { pad: 'x'.repeat(Number(q.size)) }) }; });
if (r === 's3/put') return attempt(function () { s3.put(q.path, new Uint8Array(Number(q.size)).buffer); return {}; });
if (r === 's3/list') return attempt(function () { return { n: s3.list('').length }; });
respond(404, { error: 'no route ' + r });
"#;

fn storage_app(node: &Node, name: &str) -> String {
    storage_app_to(node, name, &[])
}

/// Deploys the app (with `extra` deploy arguments); returns its id.
fn storage_app_to(node: &Node, name: &str, extra: &[&str]) -> String {
    let dir = node.site(
        name,
        &[("index.html", "static"), ("api/main.js", STORAGE_API)],
    );
    let mut args = vec!["--name", name];
    args.extend_from_slice(extra);
    node.deploy(&dir, &args);
    node.json(&["app", "info", name, "--json"])["id"]
        .as_str()
        .unwrap()
        .to_string()
}

fn get(server: &Server, app: &str, path: &str) -> (u16, Value) {
    let resp = server.get(&format!("{app}.localhost"), path);
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

fn enc(v: &Value) -> String {
    let mut out = String::new();
    for b in v.to_string().bytes() {
        if b.is_ascii_alphanumeric() {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// 3000 documents of about 4 KB (12 MB) and 300 kv entries of 40 KB (12 MB), made in bulk.
fn fill(node: &Node, app_id: &str) {
    node.ok(&[
        "sql",
        &format!(
            "WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n < 2999)
             INSERT INTO app_docs (app_id, user_id, collection, id, data, created_at, updated_at)
             SELECT '{app_id}', '', 'c', 'd' || n,
                    json_object('n', n, 'odd', json(CASE WHEN n % 2 = 1 THEN 'true' ELSE 'false' END), 'pad', hex(zeroblob(2000))), n, n FROM i;
             WITH RECURSIVE i(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM i WHERE n < 299)
             INSERT INTO app_kv (app_id, user_id, key, data)
             SELECT '{app_id}', '', 'k' || n, json_object('value', hex(zeroblob(20000))) FROM i;"
        ),
    ]);
}

#[test]
fn large_collections_are_read_in_bounded_pieces() {
    let node = Node::new();
    let id = storage_app(&node, "big");
    fill(&node, &id);
    let server = node.start(&[]);
    let count = |q: Value| get(&server, "big", &format!("/api/count?query={}", enc(&q)));
    assert_eq!(count(json!({})), (200, json!({"n": 3000})));
    assert_eq!(count(json!({"n": {"$gte": 2990}})), (200, json!({"n": 10})));
    assert_eq!(
        count(json!({"odd": true, "n": {"$lt": 10}})),
        (200, json!({"n": 5}))
    );

    // find stops at its limit, newest first by default.
    let find = |q: Value, o: Value| {
        get(
            &server,
            "big",
            &format!("/api/find?query={}&options={}", enc(&q), enc(&o)),
        )
    };
    let (status, body) = find(json!({}), json!({"limit": 3}));
    assert_eq!((status, &body["ns"]), (200, &json!([2999, 2998, 2997])));
    let (status, body) = find(json!({"n": {"$in": [5, 7, "7"]}}), json!({"order": "asc"}));
    assert_eq!((status, &body["ns"]), (200, &json!([5, 7])));

    // Whole-collection reads past the result cap fail with a clear error.
    let (status, body) = find(json!({}), json!({}));
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"],
        "ds.find would return more than 8 MiB: narrow the query (or page with limit and offset)"
    );
    let (status, body) = get(&server, "big", "/api/list");
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["error"],
        "kv.list would return more than 8 MiB: narrow the query (or page with limit and offset)"
    );
    assert_eq!(
        get(&server, "big", "/api/list?prefix=k29"),
        (200, json!({"n": 11}))
    );

    // Counter fields still count, and queries on them see the totals.
    let inc = format!("/api/inc?query={}", enc(&json!({"n": 42})));
    assert_eq!(get(&server, "big", &inc), (200, json!({"n": 1})));
    assert_eq!(get(&server, "big", &inc), (200, json!({"n": 1})));
    let (_, body) = find(json!({"hits": 2}), json!({}));
    assert_eq!((&body["ns"], &body["hits"]), (&json!([42]), &json!([2])));
    assert_eq!(count(json!({"hits": {"$gte": 1}})), (200, json!({"n": 1})));
}

fn usage(node: &Node, app: &str) -> Value {
    node.json(&["app", "info", app, "--json"])["storage"].clone()
}

#[test]
fn quotas_bound_what_an_app_stores_and_a_refused_write_changes_nothing() {
    let node = Node::new();
    storage_app(&node, "q");
    assert_eq!(
        usage(&node, "q"),
        json!({"used_bytes": 0, "quota_bytes": 256 << 20, "quota_set": false})
    );
    let before = node.state();
    let err = node.fails(&["app", "quota", "q", "--storage", "lots"]);
    assert!(err.contains("invalid size \"lots\""), "{err}");
    let err = node.fails(&["app", "quota", "q", "--storage", "0"]);
    assert!(err.contains("at least 1 byte"), "{err}");
    assert_same_state(&before, &node.state());
    let set = node.json(&["app", "quota", "q", "--storage", "64KB", "--json"]);
    assert_eq!(
        set,
        json!({"used_bytes": 0, "quota_bytes": 65536, "quota_set": true})
    );
    let server = node.start(&[]);

    // Each entry counts 64 + key + value JSON ({"value":"x..."}) = 10078 bytes: six fit.
    for i in 0..6 {
        let (status, body) = get(&server, "q", &format!("/api/kv/set?key=k{i}&size=10000"));
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(usage(&node, "q")["used_bytes"], 6 * 10078);
    // The running server writes the app's console lines (app_logs, node-local) in batches;
    // every other table must be left as it is by the refused writes.
    let before = node.state_without(&["app_logs"]);
    let (status, body) = get(&server, "q", "/api/kv/set?key=k6&size=10000");
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        "the app's storage quota is full (60468 of 65536 bytes used, this write needs 10078 more): delete data, or raise the quota with `fazt app quota`"
    );
    // Growing an existing value is refused too; ds and s3 count against the same quota.
    let (status, _) = get(&server, "q", "/api/kv/set?key=k0&size=20000");
    assert_eq!(status, 400);
    let (status, body) = get(&server, "q", "/api/ds/insert?size=10000");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("the app's storage quota is full"),
        "{body}"
    );
    let (status, body) = get(&server, "q", "/api/s3/put?path=a.bin&size=10000");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("the app's storage quota is full"),
        "{body}"
    );
    // Nothing changed.
    assert_same_state(&before, &node.state_without(&["app_logs"]));

    // Shrinking and deleting always work; the freed bytes can be used again.
    assert_eq!(get(&server, "q", "/api/kv/set?key=k0&size=10").0, 200);
    assert_eq!(
        get(&server, "q", "/api/kv/delete?key=k1"),
        (200, json!({"deleted": true}))
    );
    assert_eq!(
        get(&server, "q", "/api/s3/put?path=a.bin&size=10000").0,
        200
    );

    // A quota lowered below what the app holds: reads work, growing writes fail.
    node.ok(&["app", "quota", "q", "--storage", "1KB"]);
    assert_eq!(
        get(&server, "q", "/api/kv/get?key=k2"),
        (200, json!({"size": 10000}))
    );
    assert_eq!(get(&server, "q", "/api/kv/set?key=new&size=1").0, 400);
    assert_eq!(
        get(&server, "q", "/api/kv/delete?key=k2"),
        (200, json!({"deleted": true}))
    );
    node.ok(&["app", "quota", "q", "--storage", "default"]);
    assert_eq!(usage(&node, "q")["quota_bytes"], 256 << 20);
    let human = node.ok(&["app", "info", "q"]);
    assert!(human.contains("storage    "), "{human}");
}

#[test]
fn an_s3_object_is_capped_whatever_the_quota() {
    let node = Node::new();
    storage_app(&node, "s");
    node.ok(&["app", "quota", "s", "--storage", "1GB"]);
    let server = node.start(&[]);
    let (status, body) = get(
        &server,
        "s",
        &format!("/api/s3/put?path=big&size={}", (16 << 20) + 1),
    );
    assert_eq!(status, 400);
    assert_eq!(
        body["error"],
        format!(
            "s3.put: the object is {} bytes, more than the 16 MiB an object may hold",
            (16 << 20) + 1
        )
    );
    assert_eq!(get(&server, "s", "/api/s3/list"), (200, json!({"n": 0})));
    assert_eq!(usage(&node, "s")["used_bytes"], 0);
}

#[test]
fn quotas_replicate_and_merged_data_over_a_quota_stays_readable() {
    let Pair {
        local,
        local_server,
        zyt,
        zyt_server,
    } = joined_pair();
    storage_app_to(&local, "q", &["--to", "zyt"]);
    // Both nodes write three 10 KB entries; merged, each holds all six.
    for (server, side) in [(&local_server, "l"), (&zyt_server, "z")] {
        for i in 0..3 {
            let (status, body) = get(
                server,
                "q",
                &format!("/api/kv/set?key={side}{i}&size=10000"),
            );
            assert_eq!(status, 200, "{body}");
        }
    }
    for node in [&local, &zyt] {
        eventually("both nodes hold all six entries", || {
            (usage(node, "q")["used_bytes"] == 6 * 10078).then_some(())
        });
    }
    // A quota set later, below what the app holds, reaches the peer.
    local.ok(&["app", "quota", "q", "--storage", "40KB"]);
    eventually("zyt has the new quota", || {
        (usage(&zyt, "q")
            == json!({"used_bytes": 6 * 10078, "quota_bytes": 40960, "quota_set": true}))
        .then_some(())
    });
    // There, the merged data stays readable; growing writes fail, deletes work.
    assert_eq!(
        get(&zyt_server, "q", "/api/kv/get?key=l0"),
        (200, json!({"size": 10000}))
    );
    let (status, body) = get(&zyt_server, "q", "/api/kv/set?key=z9&size=1");
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("the app's storage quota is full (60468 of 40960 bytes used"),
        "{body}"
    );
    assert_eq!(
        get(&zyt_server, "q", "/api/kv/delete?key=l0"),
        (200, json!({"deleted": true}))
    );
    assert_eq!(usage(&zyt, "q")["used_bytes"], 5 * 10078);
}
