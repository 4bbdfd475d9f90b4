//! The HTTP accept loop: HTTP/1.1 connections served by hyper with the limits that keep slow
//! or greedy clients from starving everyone else (see docs/cli.md, "HTTP limits").
//!
//! - A request head must arrive whole within `header` of the server starting to wait for it:
//!   on a new connection, and on a kept-alive one after the previous answer (so this is also
//!   the idle keep-alive timeout).
//! - A request body an app reads must arrive within `body` (answered 408 otherwise).
//! - A connection whose reads or writes make no progress for `stall` (a client that stops
//!   reading a large answer, or stops sending a body) is closed.
//! - At most `max_connections` connections at once, and `per_client` from one client address
//!   (an IPv6 client is counted by its /64). A connection beyond a cap is closed at once,
//!   before any byte is read or written: that costs nothing, cannot itself be held open, and a
//!   browser (which opens at most about six connections per host) retries; a 503 would mean
//!   writing to a socket the attacker controls the reading of.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, Sleep};

use super::serve::{handle, Hosting};

/// Time for a request head to arrive, and for the next one on a kept-alive connection.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Time for a request body an app reads to arrive (10 MB, the body limit, at 1.4 Mbit/s).
pub const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// A connection whose reads or writes make no progress for this long is closed.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Connections open at once (lowered to what the open-file limit allows).
pub const MAX_CONNECTIONS: usize = 10_000;
/// Connections open at once from one client address (one /64 for IPv6).
pub const MAX_PER_CLIENT: usize = 256;
/// Open files kept for everything but HTTP connections (database, peers, logs); a quarter
/// of the limit when that is less.
const RESERVED_FILES: u64 = 256;
/// How long a stopping server waits for requests in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// The HTTP edge's limits. Each can be changed by an environment variable, meant for tests and
/// tuning (docs/cli.md lists them).
#[derive(Debug, Clone)]
pub struct Limits {
    pub header: Duration,
    pub body: Duration,
    pub stall: Duration,
    pub max_connections: usize,
    pub per_client: usize,
}

impl Limits {
    /// The defaults, with any `FAZT_HTTP_*` override; `open_files` caps the connection count.
    pub fn from_env(open_files: Option<u64>) -> anyhow::Result<Limits> {
        let ms = |name: &str, default: Duration| -> anyhow::Result<Duration> {
            Ok(match env_number(name)? {
                Some(v) => Duration::from_millis(v),
                None => default,
            })
        };
        let count = |name: &str, default: usize| -> anyhow::Result<usize> {
            Ok(match env_number(name)? {
                Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
                None => default,
            })
        };
        let mut max_connections = count("FAZT_HTTP_MAX_CONNECTIONS", MAX_CONNECTIONS)?;
        if let Some(files) = open_files {
            let room = files.saturating_sub(RESERVED_FILES.min(files / 4)).max(16);
            max_connections = max_connections.min(usize::try_from(room).unwrap_or(usize::MAX));
        }
        Ok(Limits {
            header: ms("FAZT_HTTP_HEADER_TIMEOUT_MS", HEADER_TIMEOUT)?,
            body: ms("FAZT_HTTP_BODY_TIMEOUT_MS", BODY_TIMEOUT)?,
            stall: ms("FAZT_HTTP_STALL_TIMEOUT_MS", STALL_TIMEOUT)?,
            max_connections,
            per_client: count("FAZT_HTTP_MAX_PER_CLIENT", MAX_PER_CLIENT)?,
        })
    }
}

/// A positive whole number from the environment variable `name`, if set.
fn env_number(name: &str) -> anyhow::Result<Option<u64>> {
    match std::env::var(name) {
        Err(_) => Ok(None),
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if n > 0 => Ok(Some(n)),
            _ => anyhow::bail!("{name}={v:?} is not a positive whole number: fix or unset it"),
        },
    }
}

/// Raises this process's open-file soft limit to its hard limit (HTTP connections are files).
/// Returns the soft limit in force afterwards, if it could be read.
pub fn raise_open_files() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
            return None;
        }
        if lim.rlim_cur < lim.rlim_max {
            let before = lim.rlim_cur;
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
                tracing::debug!(
                    from = before as u64,
                    to = lim.rlim_max as u64,
                    "raised the open-file limit"
                );
                lim.rlim_cur = lim.rlim_max;
            } else {
                tracing::warn!(
                    limit = before as u64,
                    "cannot raise the open-file limit to its hard limit; HTTP connections are capped below it"
                );
            }
        }
        if lim.rlim_cur == libc::RLIM_INFINITY {
            return None;
        }
        Some(lim.rlim_cur as u64)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Open connections, in total and per client.
struct Counts {
    total: AtomicUsize,
    per_client: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection; gives its place back when dropped.
struct Slot {
    counts: Arc<Counts>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.counts.total.fetch_sub(1, Ordering::Relaxed);
        let mut map = self
            .counts
            .per_client
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.client);
            }
        }
    }
}

/// The address a client is counted by: IPv4 (also when mapped into IPv6), or an IPv6 /64
/// (one host usually holds a whole /64).
fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl Counts {
    fn admit(self: &Arc<Self>, peer: SocketAddr, limits: &Limits) -> Option<Slot> {
        let client = client_key(peer.ip());
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        if self.total.load(Ordering::Relaxed) >= limits.max_connections {
            return None;
        }
        let n = map.entry(client).or_insert(0);
        if *n >= limits.per_client {
            return None;
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::Relaxed);
        Some(Slot {
            counts: self.clone(),
            client,
        })
    }
}

/// Serves HTTP on `listener` until `shutdown` completes, then lets requests in flight finish
/// (for at most `SHUTDOWN_GRACE`).
pub async fn serve(
    listener: TcpListener,
    hosting: Arc<Hosting>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header)
        .keep_alive(true);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let counts = Arc::new(Counts {
        total: AtomicUsize::new(0),
        per_client: Mutex::new(HashMap::new()),
    });
    let mut refused_logged = Instant::now() - Duration::from_secs(60);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Some(slot) = counts.admit(peer, &limits) else {
            // Closed at once (see the module's notes); logged at most once a minute.
            if refused_logged.elapsed() >= Duration::from_secs(60) {
                refused_logged = Instant::now();
                tracing::warn!(client = %peer.ip(), open = counts.total.load(Ordering::Relaxed),
                    "HTTP connection refused: too many open (total or from this client)");
            }
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(Guarded::new(stream, limits.stall));
        let hosting = hosting.clone();
        let service =
            hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let hosting = hosting.clone();
                async move {
                    Ok::<_, std::convert::Infallible>(handle(hosting, req.map(Body::new)).await)
                }
            });
        let conn = graceful.watch(builder.serve_connection(io, service));
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP connection ended");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::warn!("requests still running after {SHUTDOWN_GRACE:?} were cut off");
        }
    }
}

/// After a failed accept: errors of one connection are skipped; others (out of open files)
/// pause accepting briefly instead of spinning.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | ConnectionRefused
    ) {
        return;
    }
    tracing::warn!(error = %e, "accepting an HTTP connection failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// A TCP stream that fails with `TimedOut` when a read or a write has waited `stall` without
/// progress. Each direction's timer is made once per connection and re-armed only when an
/// operation first waits, so a busy connection pays nothing for it and a request no
/// allocation.
struct Guarded {
    inner: TcpStream,
    stall: Duration,
    read_timer: Timer,
    write_timer: Timer,
}

#[derive(Default)]
struct Timer {
    sleep: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl Guarded {
    fn new(inner: TcpStream, stall: Duration) -> Guarded {
        Guarded {
            inner,
            stall,
            read_timer: Timer::default(),
            write_timer: Timer::default(),
        }
    }
}

/// What a pending operation does with its stall timer; `Ready` disarms it.
fn watch<T>(
    result: Poll<io::Result<T>>,
    timer: &mut Timer,
    stall: Duration,
    cx: &mut Context<'_>,
) -> Poll<io::Result<T>> {
    match result {
        Poll::Ready(r) => {
            timer.armed = false;
            Poll::Ready(r)
        }
        Poll::Pending => {
            let sleep = match &mut timer.sleep {
                Some(sleep) => {
                    if !timer.armed {
                        sleep.as_mut().reset(Instant::now() + stall);
                    }
                    sleep
                }
                None => timer.sleep.insert(Box::pin(tokio::time::sleep(stall))),
            };
            timer.armed = true;
            match sleep.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    timer.armed = false;
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client made no progress in time",
                    )))
                }
                Poll::Pending => Poll::Pending,
            }
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        watch(result, &mut this.read_timer, this.stall, cx)
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write(cx, buf);
        watch(result, &mut this.write_timer, this.stall, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        watch(result, &mut this.write_timer, this.stall, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_counted_by_address_and_ipv6_prefix() {
        let a: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_key(a), client_key(b));
        assert_ne!(client_key(a), client_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn caps_refuse_and_dropped_slots_give_room_back() {
        let limits = Limits {
            header: HEADER_TIMEOUT,
            body: BODY_TIMEOUT,
            stall: STALL_TIMEOUT,
            max_connections: 3,
            per_client: 2,
        };
        let counts = Arc::new(Counts {
            total: AtomicUsize::new(0),
            per_client: Mutex::new(HashMap::new()),
        });
        let one: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let two: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        let a = counts.admit(one, &limits).unwrap();
        let _b = counts.admit(one, &limits).unwrap();
        assert!(counts.admit(one, &limits).is_none());
        let _c = counts.admit(two, &limits).unwrap();
        assert!(counts.admit(two, &limits).is_none());
        drop(a);
        let _d = counts.admit(one, &limits).unwrap();
        assert_eq!(counts.total.load(Ordering::Relaxed), 3);
    }
}
