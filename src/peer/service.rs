//! Live replication, as `fazt server start` runs it: the QUIC listener, a dialer for every
//! peer with an address, a session per connection, and the peers table kept current
//! (connected, last seen, lag) for `fazt peer status`.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use ed25519_dalek::SigningKey;
use fazt_proto::wire::{Hello, Join, Message};
use fazt_proto::NodeId;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::frame;
use super::session::{Mode, Session, Stats};
use super::store::{self, Peer};
use super::tls;
use crate::db::Database;

/// First wait before redialing a peer; doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(250);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the backoff.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// How often a session's lag is written to the peers table.
const STATE_INTERVAL: Duration = Duration::from_secs(1);

/// The most an unknown key (admitted only to join) may send as its first message: a Join
/// holds a 32-byte secret, a name and an address, far below this.
const JOIN_FRAME: usize = 4 << 10;
/// How long an unknown key has, once its handshake is done, to open a stream and send Join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How many connections from unknown keys are served at once; more are closed at once.
const MAX_JOINERS: usize = 8;

/// Who may complete a handshake: pinned keys, and anyone while an invitation is open (such a
/// connection may only join). Kept in memory: the handshake must not wait on SQLite.
#[derive(Default)]
struct Trust {
    keys: RwLock<HashSet<[u8; 32]>>,
    /// Unix seconds until which an invitation is open (0: none). Compared with the clock at
    /// every handshake, so an invitation that expires on an idle node admits nobody after.
    invite_until: AtomicI64,
}

impl Trust {
    fn admits(&self, key: &[u8; 32]) -> bool {
        self.invite_open() || self.trusts(key)
    }

    fn invite_open(&self) -> bool {
        crate::db::now_secs() < self.invite_until.load(Ordering::Relaxed)
    }

    fn trusts(&self, key: &[u8; 32]) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }
}

struct Ctx {
    db: Database,
    key: SigningKey,
    own: NodeId,
    trust: Trust,
    changed: watch::Receiver<u64>,
    /// Connections with a running session, per peer key (either direction).
    active: Mutex<HashMap<[u8; 32], Vec<quinn::Connection>>>,
    /// Slots for connections from unknown keys (see [`MAX_JOINERS`]).
    joiners: Arc<tokio::sync::Semaphore>,
    endpoint: quinn::Endpoint,
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
    let trust = Trust::default();
    let trust = db
        .write(move |w| {
            store::reset_connections(w.conn())?;
            refresh_trust(&trust, w.conn())?;
            Ok(trust)
        })
        .await?;
    let changed = db.commits();

    // The admit check needs the trust set before the context exists; share it through an Arc.
    let ctx_slot: Arc<std::sync::OnceLock<Arc<Ctx>>> = Arc::new(std::sync::OnceLock::new());
    let slot = ctx_slot.clone();
    // Unknown keys are rare (a join, or a refused node), so they may pay for a fresh look at
    // the database: a ticket made a moment ago works at once.
    let admit: tls::Admit = Arc::new(move |k: &[u8; 32]| {
        slot.get().is_some_and(|c| {
            c.trust.admits(k)
                || (c.with_state(|conn| refresh_trust(&c.trust, conn)).is_ok() && c.trust.admits(k))
        })
    });
    let server = tls::server_config(&key, admit)?;
    let endpoint = tls::endpoint(SocketAddr::from((Ipv6Addr::UNSPECIFIED, port)), Some(server)).map_err(|e| {
        if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)) {
            anyhow!("sync port {port} (UDP) is already in use: stop the other server or choose another with --sync-port")
        } else {
            e.context(format!("cannot listen for peers on UDP port {port}"))
        }
    })?;
    let own = NodeId::from_bytes(key.verifying_key().to_bytes());
    let ctx = Arc::new(Ctx {
        db,
        key,
        own,
        trust,
        changed,
        active: Mutex::new(HashMap::new()),
        joiners: Arc::new(tokio::sync::Semaphore::new(MAX_JOINERS)),
        endpoint: endpoint.clone(),
    });
    let _ = ctx_slot.set(ctx.clone());

    let accept = tokio::spawn(accept_loop(ctx.clone()));
    let reconcile = tokio::spawn(reconcile_loop(ctx));
    Ok(Service {
        endpoint,
        tasks: vec![accept, reconcile],
    })
}

fn refresh_trust(trust: &Trust, conn: &rusqlite::Connection) -> Result<()> {
    let keys: HashSet<[u8; 32]> = store::list(conn)?
        .iter()
        .map(|p| *p.node_id.as_bytes())
        .collect();
    *trust.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
    trust.invite_until.store(
        store::invite_open_until(conn)?.unwrap_or(0),
        Ordering::Relaxed,
    );
    Ok(())
}

impl Ctx {
    fn with_state<T>(&self, f: impl FnOnce(&rusqlite::Connection) -> Result<T>) -> Result<T> {
        self.db.write_blocking(|w| f(w.conn()))
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

/// Keeps the trust set and the dialers in line with the peers table, which other processes
/// (`fazt peer join/add/remove`) change.
async fn reconcile_loop(ctx: Arc<Ctx>) {
    let mut changed = ctx.changed.clone();
    let mut dialers: HashMap<String, (Peer, JoinHandle<()>)> = HashMap::new();
    loop {
        let peers = ctx.with_state(|conn| {
            refresh_trust(&ctx.trust, conn)?;
            store::list(conn)
        });
        // Trust is checked at every handshake; a peer removed meanwhile also loses the
        // connections it already has.
        for conn in ctx.untrusted_connections() {
            conn.close(
                quinn::VarInt::from_u32(2),
                b"this node no longer trusts yours (it was removed as a peer)",
            );
        }
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
                        let task = tokio::spawn(dial_loop(ctx.clone(), peer.clone()));
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

async fn dial_loop(ctx: Arc<Ctx>, peer: Peer) {
    let addr = peer.addr.clone().unwrap_or_default();
    let mut backoff = MIN_BACKOFF;
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
                &ctx.endpoint,
                &ctx.key,
                peer.name.as_str(),
                &addr,
                &peer.node_id,
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
        let (wait, next) = next_backoff(backoff, started.elapsed());
        tokio::time::sleep(wait).await;
        backoff = next;
    }
}

/// How long to wait before redialing after a connection that lasted `lasted`, having last
/// waited `backoff`; and the wait after that, should this attempt fail too. A session that
/// lasted [`HEALTHY_SESSION`] starts again from [`MIN_BACKOFF`]; otherwise the wait doubles
/// up to [`MAX_BACKOFF`].
fn next_backoff(backoff: Duration, lasted: Duration) -> (Duration, Duration) {
    let wait = if lasted > HEALTHY_SESSION {
        MIN_BACKOFF
    } else {
        backoff
    };
    (wait, (wait * 2).min(MAX_BACKOFF))
}

async fn accept_loop(ctx: Arc<Ctx>) {
    while let Some(incoming) = ctx.endpoint.accept().await {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            if let Err(e) = handle_incoming(ctx, incoming).await {
                tracing::info!(error = %format!("{e:#}"), "incoming peer connection ended");
            }
        });
    }
}

async fn handle_incoming(ctx: Arc<Ctx>, incoming: quinn::Incoming) -> Result<()> {
    let conn = incoming.await.context("handshake")?;
    let key = tls::remote_key(&conn).ok_or_else(|| anyhow!("the peer presented no usable key"))?;
    let (send, recv, first, _slot) = if ctx.trust.trusts(key.as_bytes()) {
        let (send, mut recv) = conn.accept_bi().await?;
        let first = frame::read_message(&mut recv).await?;
        (send, recv, first, None)
    } else {
        // Admitted only because an invitation is open: whoever this is has proved nothing
        // yet, so it gets a slot of a few, a few seconds and a few KiB to send its Join.
        let Ok(slot) = ctx.joiners.clone().try_acquire_owned() else {
            conn.close(
                quinn::VarInt::from_u32(1),
                b"too many nodes are joining at once: try again in a few seconds",
            );
            return Err(anyhow!(
                "refused an unknown node: {MAX_JOINERS} joins already in progress"
            ));
        };
        let first = tokio::time::timeout(JOIN_TIMEOUT, async {
            let (send, mut recv) = conn.accept_bi().await?;
            let first = frame::read_message_within(&mut recv, JOIN_FRAME).await?;
            anyhow::Ok((send, recv, first))
        })
        .await;
        match first {
            Ok(Ok((send, recv, first))) => (send, recv, first, Some(slot)),
            Ok(Err(e)) => {
                conn.close(
                    quinn::VarInt::from_u32(1),
                    b"expected a Join of at most 4 KiB",
                );
                return Err(e.context("an unknown node's first message"));
            }
            Err(_) => {
                conn.close(quinn::VarInt::from_u32(1), b"no Join in time");
                return Err(anyhow!(
                    "an unknown node sent no Join within {} seconds",
                    JOIN_TIMEOUT.as_secs()
                ));
            }
        }
    };
    match first {
        Some((Message::Join(join), _)) => handle_join(&ctx, &conn, key, join, send).await,
        Some((Message::Hello(hello), _)) => {
            let peer = ctx.with_state(|c| store::by_key(c, &key))?;
            let Some(peer) = peer else {
                refuse(
                    &conn,
                    send,
                    "this node does not trust yours: run `fazt peer join` with a new ticket",
                )
                .await;
                return Ok(());
            };
            Ok(run_session(&ctx, &peer, &conn, send, recv, Some(hello)).await?)
        }
        _ => {
            refuse(&conn, send, "expected Hello or Join").await;
            Ok(())
        }
    }
}

/// Sends a refusal the other side can show, and closes once it has been read.
async fn refuse(conn: &quinn::Connection, mut send: quinn::SendStream, reason: &str) {
    let _ = frame::write_message(&mut send, &Message::Refuse(reason.to_string())).await;
    let _ = send.finish();
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
    conn.close(quinn::VarInt::from_u32(1), reason.as_bytes());
}

async fn handle_join(
    ctx: &Arc<Ctx>,
    conn: &quinn::Connection,
    joiner: NodeId,
    join: Join,
    mut send: quinn::SendStream,
) -> Result<()> {
    // A ticket that does not redeem is the joiner's to hear about (InviteError), not a
    // failure of this node.
    let outcome = ctx.with_state(|c| {
        if let Err(e) = store::redeem_invite(c, &join.secret, &joiner)? {
            return Err(e.into());
        }
        let name = store::free_name(c, &join.name, &joiner)?;
        let addr = (!join.addr.is_empty() && store::check_addr(&join.addr).is_ok())
            .then_some(join.addr.as_str());
        if let Some(existing) = store::by_key(c, &joiner)? {
            // A node joining again keeps its name.
            store::add(c, &ctx.own, &existing.name, &joiner, addr)?;
            return Ok(existing.name);
        }
        store::add(c, &ctx.own, &name, &joiner, addr)?;
        Ok(name)
    });
    let name = match outcome {
        Ok(name) => name,
        Err(e) => match e.downcast::<store::InviteError>() {
            Ok(refused) => {
                refuse(conn, send, &refused.to_string()).await;
                return Ok(());
            }
            Err(e) => return Err(e),
        },
    };
    ctx.with_state(|c| refresh_trust(&ctx.trust, c))?;
    let own_name = ctx.with_state(super::own_name)?;
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
    let _ = ctx.with_state(|c| store::record_state(c, &peer.node_id, true, None));
    tracing::info!(peer = %peer.name, "replicating");
    let (progress_tx, mut progress_rx) = watch::channel(Stats::default());
    let reporter = {
        let ctx = ctx.clone();
        let node = peer.node_id;
        tokio::spawn(async move {
            while progress_rx.changed().await.is_ok() {
                let lag = progress_rx.borrow_and_update().lag as i64;
                let _ = ctx.with_state(|c| store::record_state(c, &node, true, Some(lag)));
                tokio::time::sleep(STATE_INTERVAL).await;
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
        limits: super::Limits::from_env(),
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
        let _ = ctx.with_state(|c| store::record_state(c, &peer.node_id, false, None));
    }
    result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redials_back_off_from_250_ms_doubling_to_10_s_and_a_long_session_resets_them() {
        let quick = Duration::from_millis(20);
        let mut backoff = MIN_BACKOFF;
        let mut waits = Vec::new();
        for _ in 0..9 {
            let (wait, next) = next_backoff(backoff, quick);
            waits.push(wait.as_millis());
            backoff = next;
        }
        assert_eq!(
            waits,
            [250, 500, 1000, 2000, 4000, 8000, 10_000, 10_000, 10_000]
        );
        // A session that lasted more than 10 s: the next redial is quick again.
        let (wait, next) = next_backoff(MAX_BACKOFF, Duration::from_secs(11));
        assert_eq!((wait, next), (MIN_BACKOFF, MIN_BACKOFF * 2));
        // One that lasted exactly 10 s is not healthy yet.
        assert_eq!(next_backoff(MAX_BACKOFF, HEALTHY_SESSION).0, MAX_BACKOFF);
    }
}
