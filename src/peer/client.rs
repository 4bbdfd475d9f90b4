//! What the CLI does over the network: joining with a ticket and one-off syncs.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::SigningKey;
use fazt_proto::ticket::Ticket;
use fazt_proto::wire::{Join, Message};
use fazt_proto::NodeId;
use tokio::sync::watch;

use super::session::{self, Mode, Session, Stats};
use super::store::{self, PeerName};
use super::tls;

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn client_endpoint() -> Result<quinn::Endpoint> {
    tls::endpoint(
        std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)),
        None,
    )
}

fn node_key(db: &crate::db::Db) -> Result<SigningKey> {
    crate::identity::ensure(db.conn())?;
    crate::identity::load(db.conn())?.ok_or_else(|| anyhow!("this node has no key"))
}

/// What joining produced.
pub struct Joined {
    pub name: PeerName,
    pub node: NodeId,
    pub addr: String,
}

/// Redeems `ticket` at the inviting node; on success both nodes trust each other.
pub fn join(
    db: &mut crate::db::Db,
    ticket: &Ticket,
    name: Option<PeerName>,
    me: &str,
    advertise: &str,
) -> Result<Joined> {
    let key = node_key(db)?;
    let own = crate::identity::node_id(&key);
    if ticket.node == own {
        bail!("this ticket was made by this node: run `fazt peer join` on the other node");
    }
    let label = name
        .as_ref()
        .map(|n| n.to_string())
        .unwrap_or_else(|| "the inviting node".into());
    let welcome = runtime()?.block_on(async {
        let endpoint = client_endpoint()?;
        let conn = super::connect(&endpoint, &key, &label, &ticket.addr, &ticket.node).await?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            session::write_message(
                &mut send,
                &Message::Join(Join { secret: ticket.secret, name: me.to_string(), addr: advertise.to_string() }),
            )
            .await?;
            let reply = tokio::time::timeout(super::CONNECT_TIMEOUT, session::read_message(&mut recv))
                .await
                .map_err(|_| anyhow!("{label} did not answer the join in time"))??;
            match reply {
                Some((Message::Welcome { name }, _)) => Ok(name),
                Some((Message::Refuse(reason), _)) => Err(anyhow!("{label} refused the ticket: {reason}")),
                Some(_) => Err(anyhow!("{label} broke the protocol while joining")),
                None => Err(anyhow!("{label} closed the connection while joining")),
            }
        }
        .await;
        let welcome = exchange.map_err(|e: anyhow::Error| {
            let refused = conn.close_reason().is_some_and(|r| tls::classify(&r) == tls::Refusal::NotTrusted);
            if refused {
                // Unknown keys only get through the handshake while an invitation is open.
                anyhow!(
                    "{label} refused this node: the ticket was already used, has expired, or was not issued there (it has no open invitation); run `fazt peer invite` on it for a new ticket"
                )
            } else if e.to_string().contains("refused the ticket") {
                e
            } else {
                super::refine(&conn, &label, &ticket.addr, e)
            }
        });
        conn.close(quinn::VarInt::from_u32(0), b"joined");
        endpoint.wait_idle().await;
        welcome
    })?;
    let name = match name {
        Some(n) => n,
        None => store::free_name(db.conn(), &welcome, &ticket.node)?,
    };
    store::add(db.conn(), &own, &name, &ticket.node, Some(&ticket.addr))?;
    Ok(Joined {
        name,
        node: ticket.node,
        addr: ticket.addr.clone(),
    })
}

/// What a one-off sync did.
pub struct Synced {
    pub stats: Stats,
    pub elapsed: Duration,
}

/// Syncs both ways with the peer named `name` until both hold the same versions.
pub fn sync_once(db_path: &Path, name: &str, timeout: Duration, progress: bool) -> Result<Synced> {
    let db = crate::db::open_existing(db_path)?;
    let peer = store::ready_to_dial(db.conn(), name)?;
    let addr = peer.addr.clone().unwrap_or_default();
    let key = node_key(&db)?;
    let own = crate::identity::node_id(&key);
    drop(db);
    let started = Instant::now();
    let stats = runtime()?.block_on(async {
        let changed = super::watch_db(db_path)?;
        let endpoint = client_endpoint()?;
        let connected = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            let conn = super::connect(&endpoint, &key, name, &addr, &peer.node_id).await?;
            connected.store(true, std::sync::atomic::Ordering::Relaxed);
            let (send, recv) = conn.open_bi().await.map_err(|e| super::explain(name, &addr, &e))?;
            let (progress_tx, progress_rx) = watch::channel(Stats::default());
            let bar = (progress && std::io::stderr().is_terminal()).then(|| show_progress(name, progress_rx));
            let session = Session {
                db_path: db_path.to_path_buf(),
                own,
                peer: peer.node_id,
                peer_name: name.to_string(),
                mode: Mode::Once,
                changed,
                progress: Some(progress_tx),
            };
            let result = session.run(recv, send, None).await.map_err(|e| super::refine(&conn, name, &addr, e));
            if let Some(bar) = bar {
                bar.abort();
                eprintln!();
            }
            conn.close(quinn::VarInt::from_u32(0), b"synced");
            result
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) if !connected.load(std::sync::atomic::Ordering::Relaxed) => Err(anyhow!(
                "could not reach {name} at {addr} within {}s: is `fazt server start` running there, and is its UDP port open?",
                timeout.as_secs()
            )),
            Err(_) => Err(anyhow!(
                "{name} and this node did not converge within {}s; run `fazt peer sync {name}` again or give a longer --timeout",
                timeout.as_secs()
            )),
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
        result
    })?;
    Ok(Synced {
        stats,
        elapsed: started.elapsed(),
    })
}

/// A one-line progress display on stderr (for terminals).
fn show_progress(name: &str, mut rx: watch::Receiver<Stats>) -> tokio::task::JoinHandle<()> {
    let name = name.to_string();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            let s = rx.borrow_and_update().clone();
            eprint!(
                "\r{name}: sent {} changes ({}), received {} changes ({})   ",
                s.sent_changes,
                crate::units::size(s.sent_bytes),
                s.received_changes,
                crate::units::size(s.received_bytes),
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}
