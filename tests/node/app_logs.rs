//! `fazt app logs` against hostile app output: byte budgets per line and per request, and
//! control characters that must not reach the operator's terminal.

use serde_json::Value;

use crate::harness::Node;
use crate::peers::eventually;

fn json_logs(node: &Node, app: &str) -> Vec<Value> {
    node.ok(&["app", "logs", app, "--json", "-n", "100000"])
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn message(v: &Value) -> &str {
    v["message"].as_str().unwrap()
}

#[test]
fn console_output_is_bounded_per_line_and_per_request() {
    let node = Node::new();
    let dir = node.site(
        "chatty",
        &[(
            "api/main.js",
            r#"
console.log('long:' + 'x'.repeat(100 * 1024));
for (var i = 0; i < 1000; i++) console.log('line ' + i + ' ' + 'y'.repeat(1024));
console.log('the last word');
return respond('done');
"#,
        )],
    );
    node.deploy(&dir, &["--name", "chatty"]);
    let server = node.start(&[]);
    assert_eq!(server.text("chatty.localhost", "/api"), "done");
    let lines = eventually("the request's log lines are written", || {
        let lines = json_logs(&node, "chatty");
        lines
            .iter()
            .any(|l| message(l).contains("dropped"))
            .then_some(lines)
    });
    let long = message(&lines[0]);
    assert!(long.starts_with("long:xxx"), "{}", &long[..20]);
    assert!(long.ends_with(" [truncated]"));
    assert!(
        long.len() <= 16 * 1024 + " [truncated]".len(),
        "{}",
        long.len()
    );
    let total: usize = lines.iter().map(|l| message(l).len()).sum();
    let marker = lines.last().unwrap();
    assert!(
        total <= 256 * 1024 + message(marker).len(),
        "{total} bytes kept"
    );
    assert_eq!(marker["level"], "warn");
    let kept = lines.len() - 1;
    let dropped = 1 + 1000 + 1 - kept;
    assert!(
        message(marker).starts_with(&format!(
            "[{dropped} console line(s) of this request dropped"
        )),
        "{}",
        message(marker)
    );
    // Lines are kept in order and the budget is per request: the next request logs again.
    assert!(message(&lines[1]).starts_with("line 0 "));
    assert_eq!(server.text("chatty.localhost", "/api"), "done");
    eventually("the second request's lines are written", || {
        let again = json_logs(&node, "chatty");
        (again.len() == 2 * lines.len()).then_some(())
    });
}

#[test]
fn control_characters_in_app_output_are_escaped_for_humans_and_exact_in_json() {
    let node = Node::new();
    let dir = node.site(
        "sneaky",
        &[(
            "api/main.js",
            r#"
console.log('before\r\u001b[2K\u001b[31mforged\u009b2J\nnext\tline \u202eevil');
return respond('done');
"#,
        )],
    );
    node.deploy(&dir, &["--name", "sneaky"]);
    let server = node.start(&[]);
    assert_eq!(server.text("sneaky.localhost", "/api"), "done");
    let raw = "before\r\u{1b}[2K\u{1b}[31mforged\u{9b}2J\nnext\tline \u{202e}evil";
    let json = eventually("the line is written", || {
        let lines = json_logs(&node, "sneaky");
        (!lines.is_empty()).then_some(lines)
    });
    assert_eq!(json.len(), 1);
    assert_eq!(message(&json[0]), raw);
    let human = node.ok(&["app", "logs", "sneaky"]);
    assert_eq!(human.lines().count(), 1, "{human:?}");
    assert!(
        human
            .trim_end()
            .ends_with(r"info  before\r\u{1b}[2K\u{1b}[31mforged\u{9b}2J\nnext\tline \u{202e}evil"),
        "{human:?}"
    );
    assert!(
        !human.trim_end().chars().any(|c| c.is_control()),
        "{human:?}"
    );
}
