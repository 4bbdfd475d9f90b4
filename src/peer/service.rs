//! Live replication, as `fazt server start` runs it: the QUIC listener with its two protocols
//! (joining and replication, routed by ALPN), a dialer for every peer with an address, a
//! session per connection, the in-memory trust the handshake checks, and the peers table kept
//! current (connected, last seen, lag) for `fazt peer status`.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use ed25519_dalek::SigningKey;
use fazt_proto::wire::{Hello, Join, Message};
use fazt_proto::{alpn, close, NodeId};
use futures_util::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::frame;
use super::router::{Accepted, Handler, Router, Trust};
use super::session::{Mode, Session, Stats};
use super::store::{self, Peer};
use super::tls;
use crate::db::Database;

struct Ctx {
    db: Database,
    key: SigningKey,
    own: NodeId,
    /// What the handshake and the router check, refreshed from the peers table on every
    /// commit ([`trust_loop`]).
    trust: Arc<Trust>,
    changed: watch::Receiver<u64>,
    limits: super::Limits,
    /// Connections with a running session, per peer key (either direction).
    active: Mutex<HashMap<[u8; 32], Vec<quinn::Connection>>>,
    /// Slots for joins from unknown keys (see [`super::Limits::max_joiners`]).
    joiners: Arc<tokio::sync::Semaphore>,
}

/// The running peer service.
pub struct Service {
    pub endpoint: quinn::Endpoint,
    tasks: Vec<JoinHandle<()>>,
}

impl Service {
    pub fn local_port(&self) -> u16 {
        self.endpoint.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Closes every connection and stops the service.
    pub async fn shutdown(self) {
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node shutting down");
        for t in self.tasks {
            t.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

/// Starts listening on UDP `port` and replicating with every trusted peer.
pub async fn start(db: Database, key: SigningKey, port: u16) -> Result<Service> {
    let trust = Arc::new(Trust::default());
    {
        let trust = trust.clone();
        db.write(move |w| {
            store::reset_connections(w.conn())?;
            refresh_trust(&trust, w.conn())
        })
        .await?;
    }
    let changed = db.commits();
    let limits = super::Limits::from_env();

    let own = NodeId::from_bytes(key.verifying_key().to_bytes());
    let ctx = Arc::new(Ctx {
        db,
        key,
        own,
        trust: trust.clone(),
        changed,
        active: Mutex::new(HashMap::new()),
        joiners: Arc::new(tokio::sync::Semaphore::new(limits.max_joiners)),
        limits,
    });
    let router = Router::new(trust)
        .route(alpn::JOIN, Arc::new(Joining(ctx.clone())))
        .route(alpn::SYNC, Arc::new(Replicating(ctx.clone())));
    let server = tls::server_config(&ctx.key, router.admit(), &router.offered())?;
    let endpoint = tls::endpoint(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), Some(server)).map_err(|e| {
        if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)) {
            anyhow!("sync port {port} (UDP) is already in use: stop the other server or choose another with --sync-port")
        } else {
            e.context(format!("cannot listen for peers on UDP port {port}"))
        }
    })?;

    let accept = tokio::spawn(accept_loop(router, endpoint.clone()));
    let trust = tokio::spawn(trust_loop(ctx.clone()));
    let reconcile = tokio::spawn(reconcile_loop(ctx, endpoint.clone()));
    Ok(Service {
        endpoint,
        tasks: vec![accept, trust, reconcile],
    })
}

/// Reads the pinned keys and the open invitation into `trust`.
fn refresh_trust(trust: &Trust, conn: &rusqlite::Connection) -> Result<()> {
    let keys: HashSet<[u8; 32]> = store::list(conn)?
        .iter()
        .map(|p| *p.node_id.as_bytes())
        .collect();
    trust.set(keys, store::invite_open_until(conn)?.unwrap_or(0));
    Ok(())
}

impl Ctx {
    /// Runs `f` with the writer on the peers table, on a blocking thread.
    async fn with_state<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Ctx, &rusqlite::Connection) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let ctx = self.clone();
        self.db.write(move |w| f(&ctx, w.conn())).await
    }

    /// Reads the pinned keys and the open invitation again, on a blocking thread.
    async fn refresh_trust(&self) -> Result<()> {
        let trust = self.trust.clone();
        self.db.read(move |c| refresh_trust(&trust, c)).await
    }

    /// Takes the connections of peers no longer trusted out of the active set.
    fn untrusted_connections(&self) -> Vec<quinn::Connection> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<[u8; 32]> = active
            .keys()
            .filter(|key| !self.trust.trusts(key))
            .copied()
            .collect();
        gone.iter()
            .filter_map(|key| active.remove(key))
            .flatten()
            .collect()
    }

    fn session_count(&self, key: &[u8; 32]) -> usize {
        self.active
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .map_or(0, Vec::len)
    }
}

/// Keeps the trust set in line with the peers table and the invitations, which other
/// processes change (`fazt peer invite/join/add/remove`): read again after every commit, at
/// once, so that a ticket made a moment ago admits its joiner (the joiner also retries a
/// refused handshake for about a second, for the commit it may have beaten).
async fn trust_loop(ctx: Arc<Ctx>) {
    let mut changed = ctx.changed.clone();
    while changed.changed().await.is_ok() {
        if let Err(e) = ctx.refresh_trust().await {
            tracing::warn!(error = %format!("{e:#}"), "reading the peers table");
            continue;
        }
        // Trust is checked at every handshake; a peer removed meanwhile also loses the
        // connections it already has.
        for conn in ctx.untrusted_connections() {
            conn.close(
                quinn::VarInt::from_u32(close::REMOVED),
                b"this node no longer trusts yours (it was removed as a peer)",
            );
        }
    }
}

/// Keeps the dialers in line with the peers table.
async fn reconcile_loop(ctx: Arc<Ctx>, endpoint: quinn::Endpoint) {
    let mut changed = ctx.changed.clone();
    let mut dialers: HashMap<String, (Peer, JoinHandle<()>)> = HashMap::new();
    loop {
        let peers = ctx.db.read(store::list).await;
        match peers {
            Ok(peers) => {
                let wanted: HashMap<String, Peer> = peers
                    .into_iter()
                    .filter(|p| p.addr.is_some())
                    .map(|p| (p.name.to_string(), p))
                    .collect();
                dialers.retain(|name, (peer, task)| {
                    let keep = wanted
                        .get(name)
                        .is_some_and(|w| w.node_id == peer.node_id && w.addr == peer.addr);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for (name, peer) in wanted {
                    dialers.entry(name).or_insert_with(|| {
                        let task =
                            tokio::spawn(dial_loop(ctx.clone(), endpoint.clone(), peer.clone()));
                        (peer, task)
                    });
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the peers table"),
        }
        // Commits come in bursts during a sync; look at the table at most a few times a second.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if changed.changed().await.is_err() {
            return;
        }
    }
}

async fn dial_loop(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, peer: Peer) {
    let addr = peer.addr.clone().unwrap_or_default();
    let limits = &ctx.limits;
    let mut backoff = limits.redial_min;
    let mut failing = false;
    loop {
        if ctx.session_count(peer.node_id.as_bytes()) > 0 {
            // The peer dialed us; that session serves both directions.
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let started = Instant::now();
        let result = async {
            let conn = super::connect(
                &endpoint,
                &ctx.key,
                peer.name.as_str(),
                &addr,
                &peer.node_id,
                alpn::SYNC,
            )
            .await?;
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| super::Error::from_connection(peer.name.as_str(), &addr, &e))?;
            let outcome = run_session(&ctx, &peer, &conn, send, recv, None).await;
            outcome.map_err(|e| super::refine(&conn, peer.name.as_str(), &addr, e))
        }
        .await;
        match result {
            Ok(()) => {
                tracing::info!(peer = %peer.name, "session ended");
                failing = false;
            }
            // Said once when a peer becomes unreachable, not at every retry.
            Err(e) if !failing => {
                tracing::warn!(peer = %peer.name, error = %format!("{e:#}"), "replication with peer failed; retrying with backoff");
                failing = true;
            }
            Err(e) => tracing::debug!(peer = %peer.name, error = %format!("{e:#}"), "retry failed"),
        }
        let (wait, next) = next_backoff(limits, backoff, started.elapsed());
        tokio::time::sleep(wait).await;
        backoff = next;
    }
}

/// How long to wait before redialing after a connection that lasted `lasted`, having last
/// waited `backoff`; and the wait after that, should this attempt fail too. A session that
/// lasted [`super::Limits::healthy_session`] starts again from `redial_min`; otherwise the
/// wait doubles up to `redial_max`.
fn next_backoff(
    limits: &super::Limits,
    backoff: Duration,
    lasted: Duration,
) -> (Duration, Duration) {
    let wait = if lasted > limits.healthy_session {
        limits.redial_min
    } else {
        backoff
    };
    (wait, (wait * 2).min(limits.redial_max))
}

async fn accept_loop(router: Router, endpoint: quinn::Endpoint) {
    while let Some(incoming) = endpoint.accept().await {
        let router = router.clone();
        tokio::spawn(async move {
            if let Err(e) = router.serve(incoming).await {
                tracing::info!(error = %format!("{e:#}"), "incoming peer connection ended");
            }
        });
    }
}

/// The join protocol: a Join with a ticket, answered by Welcome or a refusal. The one protocol
/// keys this node does not trust may use, so whoever it serves has proved nothing yet: an
/// unknown key gets one of a few slots, and every joiner a few seconds and a few KiB to send
/// its Join.
struct Joining(Arc<Ctx>);

impl Handler for Joining {
    fn admits_untrusted(&self) -> bool {
        true
    }

    fn serve(&self, accepted: Accepted) -> BoxFuture<'static, Result<()>> {
        Box::pin(serve_join(self.0.clone(), accepted))
    }
}

async fn serve_join(ctx: Arc<Ctx>, accepted: Accepted) -> Result<()> {
    let Accepted {
        conn,
        node,
        trusted,
    } = accepted;
    let _slot = if trusted {
        None
    } else {
        let Ok(slot) = ctx.joiners.clone().try_acquire_owned() else {
            conn.close(
                quinn::VarInt::from_u32(close::REFUSED),
                b"too many nodes are joining at once: try again in a few seconds",
            );
            return Err(anyhow!(
                "refused an unknown node: {} joins already in progress",
                ctx.limits.max_joiners
            ));
        };
        Some(slot)
    };
    let first = tokio::time::timeout(ctx.limits.join_timeout, async {
        let (send, mut recv) = conn.accept_bi().await?;
        let first = frame::read_message_within(&mut recv, ctx.limits.join_frame).await?;
        anyhow::Ok((send, first))
    })
    .await;
    match first {
        Ok(Ok((send, Some((Message::Join(join), _))))) => {
            handle_join(&ctx, &conn, node, join, send).await
        }
        Ok(Ok((send, _))) => {
            refuse(&conn, send, "expected Join on the join protocol").await;
            Ok(())
        }
        Ok(Err(e)) => {
            conn.close(
                quinn::VarInt::from_u32(close::REFUSED),
                b"expected a Join of at most 4 KiB",
            );
            Err(e.context("a joining node's first message"))
        }
        Err(_) => {
            conn.close(quinn::VarInt::from_u32(close::REFUSED), b"no Join in time");
            Err(anyhow!(
                "a joining node sent no Join within {} seconds",
                ctx.limits.join_timeout.as_secs()
            ))
        }
    }
}

/// The sync protocol: a replication session with a trusted peer, which opens the stream and
/// says Hello first.
struct Replicating(Arc<Ctx>);

impl Handler for Replicating {
    fn serve(&self, accepted: Accepted) -> BoxFuture<'static, Result<()>> {
        Box::pin(serve_sync(self.0.clone(), accepted))
    }
}

async fn serve_sync(ctx: Arc<Ctx>, accepted: Accepted) -> Result<()> {
    let Accepted { conn, node, .. } = accepted;
    let Some(peer) = ctx.db.read(move |c| store::by_key(c, &node)).await? else {
        // Removed since the trust set was read.
        conn.close(
            quinn::VarInt::from_u32(close::NOT_TRUSTED),
            b"this node does not trust yours: run `fazt peer join` with a new ticket",
        );
        return Ok(());
    };
    let (send, mut recv) = conn.accept_bi().await?;
    match frame::read_message(&mut recv).await? {
        Some((Message::Hello(hello), _)) => {
            Ok(run_session(&ctx, &peer, &conn, send, recv, Some(hello)).await?)
        }
        _ => {
            refuse(&conn, send, "expected Hello on the sync protocol").await;
            Ok(())
        }
    }
}

/// Sends a refusal the other side can show, and closes once it has been read.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, reason: &str) {
    let _ = frame::write_message(&mut send, &Message::Refuse(reason.to_string())).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(quinn::VarInt::from_u32(close::REFUSED), reason.as_bytes());
}

async fn handle_join(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    joiner: NodeId,
    join: Join,
    mut send: quinn::SendStream,
) -> Result<()> {
    // A ticket that does not redeem is the joiner's to hear about (InviteError), not a
    // failure of this node. The joiner's key is trusted (in memory too) before Welcome goes
    // out, so its first dial on the sync protocol gets in.
    let outcome = ctx
        .with_state(move |ctx, c| {
            if let Err(e) = store::redeem_invite(c, &join.secret, &joiner)? {
                return Err(e.into());
            }
            let addr = (!join.addr.is_empty() && store::check_addr(&join.addr).is_ok())
                .then_some(join.addr.as_str());
            let name = match store::by_key(c, &joiner)? {
                // A node joining again keeps its name.
                Some(existing) => existing.name,
                None => store::free_name(c, &join.name, &joiner)?,
            };
            store::add(c, &ctx.own, &name, &joiner, addr)?;
            refresh_trust(&ctx.trust, c)?;
            Ok((name, super::own_name(c)?))
        })
        .await;
    let (name, own_name) = match outcome {
        Ok(names) => names,
        Err(e) => match e.downcast::<store::InviteError>() {
            Ok(refused) => {
                refuse(conn, send, &refused.to_string()).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        },
    };
    tracing::info!(peer = %name, node = %joiner, "a node joined with a ticket");
    frame::write_message(&mut send, &Message::Welcome { name: own_name }).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

/// Runs a live session, keeping the peers table and the active-session count current.
async fn run_session(
    ctx: &Arc<Ctx>,
    peer: &Peer,
    conn: &quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    first: Option<Hello>,
) -> Result<(), super::Error> {
    let key = *peer.node_id.as_bytes();
    ctx.active
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key)
        .or_default()
        .push(conn.clone());
    let node = peer.node_id;
    let _ = ctx
        .with_state(move |_, c| store::record_state(c, &node, true, None))
        .await;
    tracing::info!(peer = %peer.name, "replicating");
    let (progress_tx, mut progress_rx) = watch::channel(Stats::default());
    let reporter = {
        let ctx = ctx.clone();
        let node = peer.node_id;
        let interval = ctx.limits.state_interval;
        tokio::spawn(async move {
            while progress_rx.changed().await.is_ok() {
                let lag = progress_rx.borrow_and_update().lag as i64;
                let _ = ctx
                    .with_state(move |_, c| store::record_state(c, &node, true, Some(lag)))
                    .await;
                tokio::time::sleep(interval).await;
            }
        })
    };
    let session = Session {
        connect: super::session_connect(&ctx.db),
        own: ctx.own,
        peer: peer.node_id,
        peer_name: peer.name.to_string(),
        mode: Mode::Live,
        node: super::session_node(),
        limits: ctx.limits.clone(),
        changed: ctx.changed.clone(),
        progress: Some(progress_tx),
    };
    let result = session.run(recv, send, first).await;
    reporter.abort();
    {
        let mut active = ctx.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conns) = active.get_mut(&key) {
            conns.retain(|c| c.stable_id() != conn.stable_id());
            if conns.is_empty() {
                active.remove(&key);
            }
        }
    }
    if ctx.session_count(&key) == 0 {
        let _ = ctx
            .with_state(move |_, c| store::record_state(c, &node, false, None))
            .await;
    }
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redials_back_off_from_250_ms_doubling_to_10_s_and_a_long_session_resets_them() {
        let quick = Duration::from_millis(20);
        let limits = super::super::Limits::default();
        let mut backoff = limits.redial_min;
        let mut waits = Vec::new();
        for _ in 0..9 {
            let (wait, next) = next_backoff(&limits, backoff, quick);
            waits.push(wait.as_millis());
            backoff = next;
        }
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
        );
        // A session that lasted more than 10 s: the next redial is quick again.
        let max = limits.redial_max;
        let (wait, next) = next_backoff(&limits, max, Duration::from_secs(11));
        assert_eq!((wait, next), (limits.redial_min, limits.redial_min * 2));
        // One that lasted exactly 10 s is not healthy yet.
        assert_eq!(next_backoff(&limits, max, limits.healthy_session).0, max);
    }
}
