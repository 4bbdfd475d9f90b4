//! Links between peers that both know each other's address: one session per pair once the
//! dialers settle, nothing lost when a connection yields, and server logs that warn only
//! about real failures.
//!
//! Every wait is a poll with a deadline; nothing asserts on timing.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::{Node, Server};
use crate::peers::{eventually, ticket, wait_for_page};

/// Where `node`'s server writes its log.
fn log_path(node: &Node) -> std::path::PathBuf {
    node.path("server.log")
}

/// What `node`'s server logged so far.
fn log(node: &Node) -> String {
    std::fs::read_to_string(log_path(node)).unwrap_or_default()
}

/// The warnings in a server log.
fn warnings(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("WARN")).collect()
}

/// Starts `node`'s server on `port` (0: any; the sync port has the same number), logging to
/// [`log_path`] what `FAZT_LOG` lets through (warnings by default) and with `env` set.
fn start(node: &Node, port: u16, env: &[(&str, &str)]) -> Server {
    let mut cmd: Command = node.command();
    cmd.args(["server", "start", "--port", &port.to_string()]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let server = Server::spawn_logging(&mut cmd, &log_path(node));
    std::fs::write(node.path("port"), server.port.to_string()).unwrap();
    server
}

/// `joiner` joins `inviter` with a ticket, each giving the address where it is dialed: from
/// then on both servers dial each other.
fn join_both_ways(joiner: (&Node, &str, &Server), inviter: (&Node, &str, &Server)) {
    let (node, name, server) = joiner;
    let (other, other_name, other_server) = inviter;
    let t = ticket(
        other,
        &["--addr", &format!("127.0.0.1:{}", other_server.port)],
    );
    let out = node.ok(&[
        "peer",
        "join",
        &t,
        "--name",
        other_name,
        "--as",
        name,
        "--addr",
        &format!("127.0.0.1:{}", server.port),
    ]);
    assert!(out.contains(&format!("joined {other_name}")), "{out}");
}

/// Each peer of `node` with the number of live sessions its server reports (`peer status`).
fn sessions(node: &Node) -> Vec<(String, u64)> {
    node.json(&["peer", "status", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["sessions"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until every node has had exactly one live session with each of its `peers` peers
/// for two seconds on end (while both sides of a link dial at once, a second session may
/// show for a moment; it must go, and none may come back).
fn settled(nodes: &[&Node], peers: usize) {
    let mut since: Option<Instant> = None;
    eventually("every link has had exactly one session for 2 s", || {
        let one_each = nodes.iter().all(|n| {
            let s = sessions(n);
            s.len() == peers && s.iter().all(|(_, count)| *count == 1)
        });
        if !one_each {
            since = None;
            return None;
        }
        let start = *since.get_or_insert_with(Instant::now);
        (start.elapsed() >= Duration::from_secs(2)).then_some(())
    });
}

/// Deploys a one-file app named `app` on `node`.
fn deploy(node: &Node, app: &str, body: &str) {
    node.deploy(&node.site(app, &[("index.html", body)]), &["--name", app]);
}

#[test]
fn two_nodes_that_dial_each_other_keep_one_session_and_lose_nothing() {
    let (a, b) = (Node::new(), Node::new());
    let a_server = start(&a, 0, &[]);
    let b_server = start(&b, 0, &[]);
    join_both_ways((&a, "a", &a_server), (&b, "b", &b_server));
    settled(&[&a, &b], 1);
    deploy(&a, "first", "from a");
    wait_for_page(&b_server, "first", "from a");

    // Both restart at once and dial each other at the same moment; each wrote while stopped,
    // and writes again while the dialers race: whichever connection yields, nothing is lost.
    let mut servers = vec![a_server, b_server];
    for round in 0..3 {
        for mut server in servers.drain(..) {
            server.stop_with("-TERM");
        }
        deploy(
            &a,
            &format!("offline-a{round}"),
            "written on a while stopped",
        );
        deploy(
            &b,
            &format!("offline-b{round}"),
            "written on b while stopped",
        );
        servers = start_all(&[&a, &b], &[&[], &[]]);
        deploy(
            &a,
            &format!("racing-a{round}"),
            "written on a while dialing",
        );
        deploy(
            &b,
            &format!("racing-b{round}"),
            "written on b while dialing",
        );
        settled(&[&a, &b], 1);
        for (server, from) in servers.iter().zip(["b", "a"]) {
            wait_for_page(
                server,
                &format!("offline-{from}{round}"),
                &format!("written on {from} while stopped"),
            );
            wait_for_page(
                server,
                &format!("racing-{from}{round}"),
                &format!("written on {from} while dialing"),
            );
        }
    }
    // A change written on either side after the links settled arrives too.
    deploy(&b, "last", "from b");
    wait_for_page(&servers[0], "last", "from b");
    deploy(&a, "last", "from a again");
    wait_for_page(&servers[1], "last", "from a again");
}

#[test]
fn three_nodes_dialing_each_other_settle_on_one_session_per_link() {
    let nodes = [Node::new(), Node::new(), Node::new()];
    let [a, b, c] = &nodes;
    let servers: Vec<Server> = nodes.iter().map(|n| start(n, 0, &[])).collect();
    join_both_ways((a, "a", &servers[0]), (b, "b", &servers[1]));
    join_both_ways((b, "b", &servers[1]), (c, "c", &servers[2]));
    join_both_ways((c, "c", &servers[2]), (a, "a", &servers[0]));
    settled(&[a, b, c], 2);

    // All three restart at once: every node dials both its peers at the same moment.
    let mut servers = servers;
    for mut server in servers.drain(..) {
        server.stop_with("-TERM");
    }
    let servers = start_all(&[a, b, c], &[&[], &[], &[]]);
    settled(&[a, b, c], 2);
    deploy(c, "from-c", "written on c");
    wait_for_page(&servers[0], "from-c", "written on c");
    wait_for_page(&servers[1], "from-c", "written on c");
}

#[test]
fn a_join_leaves_no_warning_in_either_server_log() {
    let (inviter, joiner) = (Node::new(), Node::new());
    let inviter_server = start(&inviter, 0, &[]);
    let joiner_server = start(&joiner, 0, &[]);
    // The inviter dials the joiner back at once, before the joiner has stored its key.
    join_both_ways(
        (&joiner, "joiner", &joiner_server),
        (&inviter, "inviter", &inviter_server),
    );
    settled(&[&inviter, &joiner], 1);
    deploy(&joiner, "hello", "from the joiner");
    wait_for_page(&inviter_server, "hello", "from the joiner");
    deploy(&inviter, "back", "from the inviter");
    wait_for_page(&joiner_server, "back", "from the inviter");
    for node in [&inviter, &joiner] {
        let log = log(node);
        assert!(warnings(&log).is_empty(), "a warning after a join:\n{log}");
    }
}

#[test]
fn a_neighbour_stopped_cleanly_is_no_warning_and_one_killed_is_one() {
    let (zyt, local) = (Node::new(), Node::new());
    // zyt declares a silent connection dead after a second, and logs its redials.
    let zyt_env: &[(&str, &str)] = &[
        ("FAZT_PEER_IDLE_TIMEOUT_MS", "1000"),
        ("FAZT_LOG", "warn,fazt::peer::service=debug"),
    ];
    let zyt_server = start(&zyt, 0, zyt_env);
    let local_server = start(&local, 0, &[]);
    let port = local_server.port;
    join_both_ways((&local, "local", &local_server), (&zyt, "zyt", &zyt_server));
    settled(&[&zyt, &local], 1);
    // Failed redials, whether warned about or logged at debug ("retry failed").
    let redials = |log: &str| {
        log.lines()
            .filter(|l| l.contains("retry failed") || l.contains("replication with peer failed"))
            .count()
    };

    // Stopped with SIGTERM: zyt notices at once, and redials in vain for a while.
    let mut local_server = local_server;
    local_server.stop_with("-TERM");
    let before = redials(&log(&zyt));
    eventually("zyt redialed local twice after its clean shutdown", || {
        (redials(&log(&zyt)) >= before + 2).then_some(())
    });
    let text = log(&zyt);
    assert!(
        warnings(&text).is_empty(),
        "a warning for a clean shutdown:\n{text}"
    );

    // Back, then killed: a real failure, which zyt warns about once, however often it redials.
    let local_server = start(&local, port, &[]);
    settled(&[&zyt, &local], 1);
    drop(local_server);
    let seen = eventually("zyt warns that local is unreachable", || {
        let text = log(&zyt);
        (!warnings(&text).is_empty()).then_some(redials(&text))
    });
    eventually("zyt redialed local twice more", || {
        (redials(&log(&zyt)) >= seen + 2).then_some(())
    });
    let text = log(&zyt);
    let warned = warnings(&text);
    assert_eq!(
        warned.len(),
        1,
        "want one warning for the killed node:\n{text}"
    );
    assert!(
        warned[0].contains("replication with peer failed") && warned[0].contains("local"),
        "{}",
        warned[0]
    );
    drop(zyt_server);
}

#[test]
fn a_neighbour_only_this_node_dials_is_one_warning_per_outage() {
    let (zyt, local) = (Node::new(), Node::new());
    let zyt_env: &[(&str, &str)] = &[
        ("FAZT_PEER_IDLE_TIMEOUT_MS", "1000"),
        ("FAZT_LOG", "warn,fazt::peer::service=debug"),
    ];
    let zyt_server = start(&zyt, 0, zyt_env);
    let local_server = start(&local, 0, &[]);
    let port = local_server.port;
    // zyt joins without an address: only zyt dials, so every session is its own dialer's.
    let t = ticket(&local, &["--addr", &format!("127.0.0.1:{port}")]);
    zyt.ok(&["peer", "join", &t, "--name", "local", "--as", "zyt"]);
    settled(&[&zyt, &local], 1);
    let failed = |log: &str| {
        log.lines()
            .filter(|l| l.contains("retry failed") || l.contains("replication with peer failed"))
            .count()
    };

    // A clean shutdown, and redials in vain: no warning.
    let mut local_server = local_server;
    local_server.stop_with("-TERM");
    eventually("zyt redialed local after its clean shutdown", || {
        (failed(&log(&zyt)) >= 1).then_some(())
    });
    // Back, and killed twice: each outage after a session that got going is one warning.
    for outage in 1..=2 {
        let local_server = start(&local, port, &[]);
        settled(&[&zyt, &local], 1);
        drop(local_server);
        let seen = eventually("zyt warns that local is unreachable", || {
            let text = log(&zyt);
            (warnings(&text).len() == outage).then_some(failed(&text))
        });
        eventually("zyt redialed local twice more", || {
            (failed(&log(&zyt)) >= seen + 2).then_some(())
        });
        let text = log(&zyt);
        assert_eq!(
            warnings(&text).len(),
            outage,
            "one warning per outage:\n{text}"
        );
    }
    drop(zyt_server);
}

#[test]
fn a_removed_peer_is_no_warning_on_either_side() {
    let (zyt, local) = (Node::new(), Node::new());
    let debug: &[(&str, &str)] = &[("FAZT_LOG", "warn,fazt::peer::service=debug")];
    let zyt_server = start(&zyt, 0, debug);
    let local_server = start(&local, 0, debug);
    join_both_ways((&local, "local", &local_server), (&zyt, "zyt", &zyt_server));
    settled(&[&zyt, &local], 1);

    zyt.ok(&["peer", "remove", "local"]);
    // local's session ends, and its redials are refused: both expected after a removal.
    eventually("local's server is refused by zyt after the removal", || {
        let text = log(&local);
        (text.contains("retry failed") && text.contains("does not trust this node")).then_some(())
    });
    for node in [&zyt, &local] {
        let text = log(node);
        assert!(
            warnings(&text).is_empty(),
            "a warning for a removal:\n{text}"
        );
    }
}

/// Starts the servers of `nodes` at once, each on the port it had (the sync port its peers
/// stored), with the environment given per node.
fn start_all(nodes: &[&Node], env: &[&[(&str, &str)]]) -> Vec<Server> {
    let ports: Vec<u16> = nodes.iter().map(|n| port_of(n)).collect();
    std::thread::scope(|scope| {
        let started: Vec<_> = nodes
            .iter()
            .zip(&ports)
            .zip(env)
            .map(|((node, &port), env)| scope.spawn(move || start(node, port, env)))
            .collect();
        started.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The port `node`'s server last ran on: the sync port it gave its peers.
fn port_of(node: &Node) -> u16 {
    std::fs::read_to_string(node.path("port"))
        .expect("the node ran a server")
        .trim()
        .parse()
        .unwrap()
}
