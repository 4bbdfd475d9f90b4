//! `fazt server start`: the HTTP listener and its lifecycle.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use rusqlite::Connection;

use crate::config::NodeConfig;
use crate::db::Database;
use crate::hosting::serve::Hosting;
use crate::hosting::site::Site;

/// Serves until Ctrl-C or SIGTERM. `db` holds the command's connection, already migrated.
pub fn run(db: Database, config: NodeConfig) -> Result<()> {
    let (node_id, key) = db.write_blocking(|w| {
        let conn = w.conn();
        crate::db::check_integrity(conn, db.path())?;
        let node_id = crate::identity::ensure(conn)?;
        let key = crate::identity::load(conn)?.ok_or_else(|| anyhow!("this node has no key"))?;
        Ok((node_id, key))
    })?;
    cap_malloc_arenas();
    let open_files = crate::hosting::listener::raise_open_files();
    let limits = crate::hosting::listener::Limits::from_env(open_files)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fazt-worker")
        .build()
        .context("starting the async runtime")?;
    // The commit watcher's thread starts with the first subscription; started here, it runs
    // at the process's priority, not at that of the replication thread that would start it.
    drop(db.commits());
    let replication = replication_runtime()?;
    let on_replication = replication.handle().clone();
    let served = runtime.block_on(async move {
        let listener = bind(config.port.value).await?;
        let port = listener.local_addr()?.port();
        // By default peers connect to the same port number as HTTP, over UDP.
        let sync_port = match config.sync_port.source {
            crate::config::Source::Default => port,
            _ => config.sync_port.value,
        };
        let peers = on_replication
            .spawn(crate::peer::service::start(db.clone(), key, sync_port))
            .await??;
        let sync_port = peers.local_port();
        let domain = config.domain.value.as_str().to_string();
        db.write(move |w| {
            w.conn().execute(
                "INSERT OR REPLACE INTO node_runtime (id, pid, port, domain, started_at, sync_port) VALUES (1, ?1, ?2, ?3, ?4, ?5)",
                rusqlite::params![std::process::id(), port, domain, crate::clock::now_secs(), sync_port],
            )?;
            Ok(())
        })
        .await?;
        let hosting = Arc::new(Hosting {
            site: Arc::new(Site::new(db.clone())),
            domain: config.domain.value.as_str().to_string(),
            runtimes: crate::runtime::Runtimes::new(db.clone(), crate::runtime::Limits::default()),
            body_timeout: limits.body,
        });
        let collector = tokio::spawn(collect_blobs(db.clone()));
        println!(
            "fazt serving http://{}:{port}/ (domain {}, node {}, db {}, peers on udp {sync_port})",
            config.domain.value,
            config.domain.value,
            node_id,
            db.path().display()
        );
        crate::hosting::listener::serve(listener, hosting, limits, shutdown_signal()).await;
        collector.abort();
        peers.shutdown().await;
        db.write(|w| {
            let conn = w.conn();
            let _ = crate::peer::store::reset_connections(conn);
            conn.execute("DELETE FROM node_runtime WHERE id = 1 AND pid = ?1", [std::process::id()])?;
            Ok(())
        })
        .await?;
        eprintln!("fazt stopped");
        Ok(())
    });
    // Sessions' blocking work still running (an export pass) is not waited for: the
    // database is consistent after every transaction.
    replication.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// How much lower than the HTTP workers the replication threads are scheduled: a nice value
/// this much higher (capped at 19). The kernel then gives a runnable HTTP worker about nine
/// times the CPU share of a runnable replication thread.
pub const REPLICATION_NICE: i32 = 10;

/// The runtime of the peer service: sessions read, export and apply on its threads (its
/// workers and its blocking pool), which run at a lower scheduling priority than the HTTP
/// workers ([`REPLICATION_NICE`]), so that while a burst of changes replicates, requests are
/// still served first. Replication itself loses nothing by it: it gets all the CPU that
/// requests leave.
fn replication_runtime() -> Result<tokio::runtime::Runtime> {
    // Threads inherit the nice value of the thread that starts them, and the runtime starts
    // blocking threads from its own: each one is set from the process's priority, not raised
    // again from its parent's.
    let lower = nice_of_this_thread().map(|n| (n + REPLICATION_NICE).min(19));
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fazt-peer")
        .on_thread_start(move || {
            if let Some(nice) = lower {
                set_nice_of_this_thread(nice);
            }
        })
        .build()
        .context("starting the replication runtime")
}

/// Caps glibc's malloc arenas at one per core. By default glibc gives a thread that
/// allocates while others do an arena of its own, up to eight per core, and memory freed in
/// an arena stays with it: a server whose blocking threads come and go (sessions export and
/// apply on them) kept about 0.35 MB more per peer session after a run of deploys with the
/// default than with one arena (docs/performance.md, "Mesh replication").
fn cap_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let arenas = i32::try_from(cores).unwrap_or(i32::MAX);
        // SAFETY: mallopt only sets a parameter of the allocator; called before the
        // server's threads start.
        if unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) } != 1 {
            tracing::debug!("could not cap malloc arenas");
        }
    }
}

/// The calling thread's nice value (Linux only: elsewhere a nice value is the whole
/// process's, and replication is not lowered).
fn nice_of_this_thread() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: gettid and getpriority only read the calling thread's id and priority.
        // -1 is also a valid nice value, so errno tells an error apart.
        unsafe {
            *libc::__errno_location() = 0;
            let nice = libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t);
            (*libc::__errno_location() == 0).then_some(nice)
        }
    }
    #[cfg(not(target_os = "linux"))]
    None
}

fn set_nice_of_this_thread(nice: i32) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority with the calling thread's id only sets that thread's priority.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, nice) } != 0
        {
            tracing::debug!(nice, "could not lower a replication thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

/// How often the server runs the blob collector (the first run soon after start).
const GC_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);
const GC_FIRST_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Deletes unreferenced blobs once their grace period is over (hosting::gc), every hour.
async fn collect_blobs(db: Database) {
    let mut wait = GC_FIRST_AFTER;
    loop {
        tokio::time::sleep(wait).await;
        wait = GC_EVERY;
        let result = db
            .write(|w| {
                crate::hosting::gc::collect(
                    w,
                    i64::from(crate::hosting::gc::DEFAULT_GRACE_SECS),
                    crate::clock::now_secs(),
                )?;
                Ok(())
            })
            .await;
        if let Err(e) = result {
            tracing::warn!("collecting unreferenced blobs failed: {e:#}");
        }
    }
}

/// Listens on every address, IPv6 and IPv4, for `port`.
async fn bind(port: u16) -> Result<tokio::net::TcpListener> {
    let in_use = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow!("port {port} is already in use: stop the other server or choose another port with --port")
        } else {
            anyhow!("cannot listen on port {port}: {e}")
        }
    };
    // A dual-stack socket serves both families; fall back to IPv4 where IPv6 is off.
    match tokio::net::TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port))).await {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(in_use(e)),
        Err(_) => tokio::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))
            .await
            .map_err(in_use),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// A server running on a database file.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub pid: u32,
    pub port: u16,
    pub sync_port: u16,
    pub domain: String,
}

/// The server running on this database right now, if its process is alive.
pub fn running(conn: &Connection) -> Result<Option<Runtime>> {
    use rusqlite::OptionalExtension;
    let row: Option<Runtime> = conn
        .query_row(
            "SELECT pid, port, sync_port, domain FROM node_runtime WHERE id = 1",
            [],
            |r| {
                Ok(Runtime {
                    pid: r.get(0)?,
                    port: r.get(1)?,
                    sync_port: r.get(2)?,
                    domain: r.get(3)?,
                })
            },
        )
        .optional()?;
    Ok(row.filter(|r| Path::new(&format!("/proc/{}", r.pid)).exists()))
}
