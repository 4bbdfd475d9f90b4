//! Replication yields to serving: the threads where peer sessions export and apply run at a
//! lower scheduling priority than the HTTP workers (Linux, where a nice value is per thread).

#![cfg(target_os = "linux")]

use crate::peers::{joined_pair, wait_for_page};

/// The server's threads: (name, nice value), from /proc.
fn threads(pid: u32) -> Vec<(String, i32)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let Ok(stat) = std::fs::read_to_string(task.unwrap().path().join("stat")) else {
            continue; // the thread ended meanwhile
        };
        // "tid (name) state ppid ...": the name may hold spaces; fields after it are counted
        // from the state, the 3rd field, so the nice value (the 19th) is the 17th after ')'.
        let open = stat.find('(').unwrap();
        let close = stat.rfind(')').unwrap();
        let name = stat[open + 1..close].to_string();
        let nice = stat[close + 1..]
            .split_whitespace()
            .nth(16)
            .unwrap()
            .parse()
            .unwrap();
        out.push((name, nice));
    }
    out
}

#[test]
fn replication_threads_run_below_the_http_workers() {
    let pair = joined_pair();
    // Sessions have exported and applied, so the replication runtime's blocking threads exist.
    pair.local
        .deploy(&pair.local.site("prio", &[("index.html", "yields")]), &[]);
    wait_for_page(&pair.zyt_server, "prio", "yields");

    for server in [&pair.zyt_server, &pair.local_server] {
        let pid = server.pid();
        let all = threads(pid);
        let main = all
            .iter()
            .find(|(name, _)| name == "fazt")
            .map(|&(_, nice)| nice)
            .expect("the main thread");
        let lowered = (main + 10).min(19);
        let of = |prefix: &str| -> Vec<i32> {
            all.iter()
                .filter(|(name, _)| name.starts_with(prefix))
                .map(|&(_, nice)| nice)
                .collect()
        };
        let (peer, http) = (of("fazt-peer"), of("fazt-worker"));
        assert!(!peer.is_empty() && !http.is_empty(), "{all:?}");
        assert!(
            peer.iter().all(|&n| n == lowered),
            "replication threads: {all:?}"
        );
        assert!(http.iter().all(|&n| n == main), "HTTP workers: {all:?}");
        // The commit watcher wakes the route cache as well as the sessions: not lowered.
        assert!(of("fazt-db-watch").iter().all(|&n| n == main), "{all:?}");
    }
}
