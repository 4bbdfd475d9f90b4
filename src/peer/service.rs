//! Live replication, as `fazt server start` runs it: the QUIC listener with its two protocols
//! (joining and replication, routed by ALPN), a dialer for every peer with an address, a
//! session per connection and one live session per peer once the dialers settle (when both
//! dial, the node with the larger key yields: [`must_yield`]), the in-memory trust the
//! handshake checks, and the peers table kept current (live sessions, last seen, lag) for
//! `fazt peer status`. Expected ends (a peer's clean shutdown, its removal of this node, a
//! yield) are logged at info; a real failure is a warning, once per outage.

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
use super::session::{Holdings, Mode, Session, Stats};
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
    /// What this node holds, kept for all its sessions: read once per tick of the
    /// replicated-state watch, grown by every session's applier.
    holdings: Holdings,
    limits: super::Limits,
    /// How sessions open their connections (one for all: they share the applying one).
    connect: super::session::Connect,
    /// The live sessions per peer, and what the dialers need to know of how the last ended.
    links: Mutex<Links>,
    /// Ticks whenever a session is added to [`Ctx::links`] (a dialed session that must yield
    /// waits for it).
    linked: watch::Sender<u64>,
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
    let holdings = Holdings::follow(super::session_connect(&db), db.replicated()).await?;

    let own = NodeId::from_bytes(key.verifying_key().to_bytes());
    let connect = super::session_connect(&db);
    let ctx = Arc::new(Ctx {
        db,
        key,
        own,
        trust: trust.clone(),
        changed,
        connect,
        holdings,
        links: Mutex::new(Links::default()),
        linked: watch::Sender::new(0),
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

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The connections of peers no longer trusted.
    fn untrusted_connections(&self) -> Vec<quinn::Connection> {
        self.links()
            .live
            .iter()
            .filter(|(key, _)| !self.trust.trusts(key))
            .flat_map(|(_, links)| links.iter().map(|l| l.conn.clone()))
            .collect()
    }

    /// The live sessions with the peer `key` (both directions).
    fn session_count(&self, key: &[u8; 32]) -> usize {
        self.links().live.get(key).map_or(0, Vec::len)
    }

    /// Whether a session the peer `key` dialed is live.
    fn dialed_by_peer(&self, key: &[u8; 32]) -> bool {
        self.links()
            .live
            .get(key)
            .is_some_and(|links| links.iter().any(|l| !l.dialed))
    }

    /// Registers `conn` as a session with the peer `key`, unless this node dialed it and must
    /// yield it to a session the peer dialed ([`must_yield`]): then `None`, and the caller
    /// closes it with [`close::DUPLICATE`] before sending anything.
    fn claim(
        self: &Arc<Self>,
        key: [u8; 32],
        conn: &quinn::Connection,
        dialed: bool,
    ) -> Option<Claim> {
        {
            let mut links = self.links();
            let peer_dialed = links
                .live
                .get(&key)
                .is_some_and(|live| live.iter().any(|l| !l.dialed));
            if dialed && peer_dialed && must_yield(&self.own, &key) {
                return None;
            }
            links.live.entry(key).or_default().push(Link {
                conn: conn.clone(),
                dialed,
            });
        }
        self.linked.send_modify(|n| *n = n.wrapping_add(1));
        Some(Claim {
            ctx: self.clone(),
            key,
            conn: conn.clone(),
            peer_gone: false,
        })
    }

    /// Returns once a session the peer `key` dialed is live.
    async fn peer_dials(&self, key: &[u8; 32]) {
        let mut linked = self.linked.subscribe();
        loop {
            if self.dialed_by_peer(key) {
                return;
            }
            if linked.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Whether failing to reach the peer `key` is no news ([`Links::quiet`]).
    fn quiet(&self, key: &[u8; 32]) -> bool {
        self.links().quiet.contains(key)
    }

    /// Whether the peer `key` joined here with a ticket less than [`JOIN_GRACE`] ago.
    fn just_joined(&self, key: &[u8; 32]) -> bool {
        self.links()
            .joined
            .get(key)
            .is_some_and(|at| at.elapsed() < JOIN_GRACE)
    }
}

/// The live replication sessions, per peer key, and what is known of the peers' absences.
#[derive(Default)]
struct Links {
    /// Connections with a running session, per peer key (either direction). One per peer once
    /// the dialers settle; briefly two when both dial at once, or while a connection the peer
    /// lost is not yet declared dead.
    live: HashMap<[u8; 32], Vec<Link>>,
    /// Peers that failing to reach is no news, until a session with them gets going again:
    /// their last session ended because they shut down cleanly (close code [`close::DONE`])
    /// or removed this node ([`close::REMOVED`]), said at info then; or a dialer warned that
    /// they cannot be reached. So a warning comes once per outage, not at every retry.
    quiet: HashSet<[u8; 32]>,
    /// When each peer joined here with a ticket (see [`JOIN_GRACE`]).
    joined: HashMap<[u8; 32], Instant>,
}

struct Link {
    conn: quinn::Connection,
    /// This node dialed it.
    dialed: bool,
}

/// A session's place in [`Ctx::links`], given up when dropped (a dialer aborted mid-session
/// too), with the peers table told the new count.
struct Claim {
    ctx: Arc<Ctx>,
    key: [u8; 32],
    conn: quinn::Connection,
    /// The peer closed the connection because it is going away ([`PeerClosed::gone`]): once
    /// no other session with it is live, failing to reach it is expected.
    peer_gone: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        // A session whose task was aborted (its dialer stopped: the peer was removed, or its
        // address changed) leaves its connection open, and the peer's side of the session
        // running: close it, as the trust loop would for a removed peer.
        if self.conn.close_reason().is_none() {
            if self.ctx.trust.trusts(&self.key) {
                self.conn
                    .close(quinn::VarInt::from_u32(close::DONE), b"session ended");
            } else {
                self.conn
                    .close(quinn::VarInt::from_u32(close::REMOVED), REMOVED_REASON);
            }
        }
        {
            let id = self.conn.stable_id();
            let mut links = self.ctx.links();
            if let Some(live) = links.live.get_mut(&self.key) {
                live.retain(|l| l.conn.stable_id() != id);
                if live.is_empty() {
                    links.live.remove(&self.key);
                    if self.peer_gone {
                        links.quiet.insert(self.key);
                    }
                }
            }
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let ctx = self.ctx.clone();
            let node = NodeId::from_bytes(self.key);
            runtime.spawn(async move { ctx.record_sessions(node, None).await });
        }
    }
}

impl Ctx {
    /// Writes the number of live sessions with `node` (read when the write runs, so the last
    /// write has the last count) and, when given, its lag.
    async fn record_sessions(self: &Arc<Self>, node: NodeId, lag: Option<i64>) {
        // Node-local figures, rewritten as the session goes: not worth a sync to disk.
        let ctx = self.clone();
        let _ = self
            .db
            .write_local(move |w| {
                store::record_state(w.conn(), &node, ctx.session_count(node.as_bytes()), lag)
            })
            .await;
    }
}

/// When both nodes dial each other at once, the connection dialed by the smaller key is kept:
/// the node with the larger key yields the connection it dialed to one the peer dialed.
/// (Only that node ever yields, so the two never both give up.)
fn must_yield(own: &NodeId, peer: &[u8; 32]) -> bool {
    own.as_bytes() > peer
}

/// How long after a node joined here a dial to it that it refuses as "not trusted" is
/// expected: the joiner stores this node's key only once it has the Welcome, and its server
/// reads it a moment later.
const JOIN_GRACE: Duration = Duration::from_secs(10);

/// Why the other node closed a session's connection, when that is no failure: said at info,
/// not as a warning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerClosed {
    /// It shut down cleanly ([`close::DONE`]).
    ShutDown,
    /// It removed this node ([`close::REMOVED`]).
    Removed,
    /// It kept another session with this node ([`close::DUPLICATE`]).
    Duplicate,
}

impl PeerClosed {
    fn of(conn: &quinn::Connection) -> Option<PeerClosed> {
        let Some(quinn::ConnectionError::ApplicationClosed(closed)) = conn.close_reason() else {
            return None;
        };
        match u32::try_from(closed.error_code.into_inner()) {
            Ok(close::DONE) => Some(PeerClosed::ShutDown),
            Ok(close::REMOVED) => Some(PeerClosed::Removed),
            Ok(close::DUPLICATE) => Some(PeerClosed::Duplicate),
            _ => None,
        }
    }

    /// The peer is gone for now, and that is no news when a redial fails.
    fn gone(self) -> bool {
        self != PeerClosed::Duplicate
    }

    fn words(self) -> &'static str {
        match self {
            PeerClosed::ShutDown => "peer shut down",
            PeerClosed::Removed => "peer removed this node",
            PeerClosed::Duplicate => "peer kept another session with this node",
        }
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
            conn.close(quinn::VarInt::from_u32(close::REMOVED), REMOVED_REASON);
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

/// The reason given with [`close::REMOVED`].
const REMOVED_REASON: &[u8] = b"this node no longer trusts yours (it was removed as a peer)";

/// The duplicate close's reason.
const DUPLICATE_REASON: &[u8] = b"a session between these nodes is already live";

/// How a dialed connection ended, when it did not fail.
enum Dialed {
    /// A session the peer dialed is live: this connection yielded to it.
    Yielded,
    /// The session ran and ended; the peer's reason, when it closed the connection on purpose.
    Ended(Option<PeerClosed>),
}

async fn dial_loop(ctx: Arc<Ctx>, endpoint: quinn::Endpoint, peer: Peer) {
    let addr = peer.addr.clone().unwrap_or_default();
    let key = *peer.node_id.as_bytes();
    let limits = &ctx.limits;
    let mut backoff = limits.redial_min;
    loop {
        if ctx.session_count(&key) > 0 {
            // The peer dialed us (or this node's own connection yielded to its): that session
            // serves both directions. Whatever ends it is news again.
            ctx.links().quiet.remove(&key);
            backoff = limits.redial_min;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let started = Instant::now();
        let result = dial(&ctx, &endpoint, &peer, &addr).await;
        let mut quick = false;
        match result {
            Ok(Dialed::Yielded) => {
                tracing::info!(peer = %peer.name, "a session the peer dialed is live; this node's connection yielded to it");
                quick = true;
            }
            Ok(Dialed::Ended(None)) => {
                tracing::info!(peer = %peer.name, "session ended");
            }
            Ok(Dialed::Ended(Some(why))) => {
                tracing::info!(peer = %peer.name, "session ended: {}", why.words());
                quick = !why.gone();
            }
            // The node that joined here a moment ago has not stored this node's key yet.
            Err(e @ super::Error::NotTrusted { .. }) if ctx.just_joined(&key) => {
                tracing::debug!(peer = %peer.name, error = %format!("{e:#}"), "the node that just joined does not trust this one yet; retrying");
                quick = true;
            }
            // Said once when a peer becomes unreachable, not at every retry; nothing to say
            // when it shut down cleanly or removed this node (said at info then).
            Err(e) if !ctx.quiet(&key) => {
                tracing::warn!(peer = %peer.name, error = %format!("{e:#}"), "replication with peer failed; retrying with backoff");
                ctx.links().quiet.insert(key);
            }
            Err(e) => {
                tracing::debug!(peer = %peer.name, error = %format!("{e:#}"), "retry failed");
            }
        }
        if quick {
            // Nothing failed: no backoff. A live session keeps the loop waiting above.
            backoff = limits.redial_min;
            tokio::time::sleep(limits.redial_min).await;
            continue;
        }
        let (wait, next) = next_backoff(limits, backoff, started.elapsed());
        tokio::time::sleep(wait).await;
        backoff = next;
    }
}

/// Dials `peer` and runs a session over the connection, unless a session the peer dialed is
/// live: then this connection yields before sending anything.
async fn dial(
    ctx: &Arc<Ctx>,
    endpoint: &quinn::Endpoint,
    peer: &Peer,
    addr: &str,
) -> Result<Dialed, super::Error> {
    let name = peer.name.as_str();
    let conn = super::connect(endpoint, &ctx.key, name, addr, &peer.node_id, alpn::SYNC).await?;
    let Some(claim) = ctx.claim(*peer.node_id.as_bytes(), &conn, true) else {
        conn.close(quinn::VarInt::from_u32(close::DUPLICATE), DUPLICATE_REASON);
        return Ok(Dialed::Yielded);
    };
    let (send, recv) = conn
        .open_bi()
        .await
        .map_err(|e| super::Error::from_connection(name, addr, &e))?;
    let outcome = run_session(ctx, claim, peer, &conn, send, recv, None).await;
    match outcome {
        Ok(Ran::Yielded) => Ok(Dialed::Yielded),
        Ok(Ran::Ended) => Ok(Dialed::Ended(PeerClosed::of(&conn))),
        Err(e) => match (PeerClosed::of(&conn), conn.close_reason()) {
            (Some(why), _) => Ok(Dialed::Ended(Some(why))),
            // This node closed it (the peer was removed here, or the node is stopping).
            (None, Some(quinn::ConnectionError::LocallyClosed)) => Ok(Dialed::Ended(None)),
            _ => Err(super::refine(&conn, name, addr, e)),
        },
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
    // A session the peer dialed is never yielded here: the peer's dialer yields when it must.
    let claim = ctx.claim(*node.as_bytes(), &conn, false);
    let (send, mut recv) = conn.accept_bi().await?;
    match (claim, frame::read_message(&mut recv).await?) {
        (Some(claim), Some((Message::Hello(hello), _))) => {
            run_session(&ctx, claim, &peer, &conn, send, recv, Some(hello)).await?;
            Ok(())
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
    {
        let mut links = ctx.links();
        links.joined.retain(|_, at| at.elapsed() < JOIN_GRACE);
        links.joined.insert(*joiner.as_bytes(), Instant::now());
    }
    frame::write_message(&mut send, &Message::Welcome { name: own_name }).await?;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    Ok(())
}

/// How a session ended well.
enum Ran {
    /// The peer hung up.
    Ended,
    /// A session the peer dialed became live, and this one (dialed by this node) yielded to
    /// it ([`must_yield`]).
    Yielded,
}

/// Runs a live session on the connection `claim` registered, keeping the peers table current.
/// A session this node dialed to a peer with a smaller key yields as soon as one the peer
/// dialed is live: its connection is closed with [`close::DUPLICATE`], and what it had not
/// had acknowledged the kept session exports again (it starts from the peer's Hello).
async fn run_session(
    ctx: &Arc<Ctx>,
    mut claim: Claim,
    peer: &Peer,
    conn: &quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    first: Option<Hello>,
) -> Result<Ran, super::Error> {
    let key = claim.key;
    let dialed = first.is_none();
    let node = peer.node_id;
    ctx.record_sessions(node, None).await;
    tracing::info!(peer = %peer.name, "replicating");
    let (progress_tx, mut progress_rx) = watch::channel(Stats::default());
    let reporter = {
        let ctx = ctx.clone();
        let interval = ctx.limits.state_interval;
        tokio::spawn(async move {
            while progress_rx.changed().await.is_ok() {
                // The session got going: whatever ends it is news again.
                ctx.links().quiet.remove(&key);
                let lag = progress_rx.borrow_and_update().lag as i64;
                ctx.record_sessions(node, Some(lag)).await;
                tokio::time::sleep(interval).await;
            }
        })
    };
    let session = Session {
        connect: ctx.connect.clone(),
        own: ctx.own,
        peer: peer.node_id,
        peer_name: peer.name.to_string(),
        mode: Mode::Live,
        node: super::session_node(),
        limits: ctx.limits.clone(),
        holdings: ctx.holdings.clone(),
        progress: Some(progress_tx),
    };
    let run = session.run(recv, send, first);
    tokio::pin!(run);
    let yields = async {
        if dialed && must_yield(&ctx.own, &key) {
            ctx.peer_dials(&key).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        result = &mut run => result.map(|_| Ran::Ended),
        () = yields => {
            conn.close(quinn::VarInt::from_u32(close::DUPLICATE), DUPLICATE_REASON);
            let _ = run.await;
            Ok(Ran::Yielded)
        }
    };
    reporter.abort();
    claim.peer_gone = PeerClosed::of(conn).is_some_and(PeerClosed::gone);
    drop(claim);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_two_nodes_dialing_each_other_exactly_one_yields_the_larger_key() {
        let small = NodeId::from_bytes([1; 32]);
        let mut larger = [1; 32];
        larger[31] = 2;
        let large = NodeId::from_bytes(larger);
        assert!(must_yield(&large, small.as_bytes()));
        assert!(!must_yield(&small, large.as_bytes()));
        // Bytes compare in order: the first that differs decides.
        let mut first = [0; 32];
        first[0] = 2;
        assert!(must_yield(&NodeId::from_bytes(first), &larger));
    }

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
