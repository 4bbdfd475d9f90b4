//! What the CLI does over the network: joining with a ticket and one-off syncs.

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ed25519_dalek::SigningKey;
use fazt_proto::ticket::Ticket;
use fazt_proto::wire::{Join, Message};
use fazt_proto::{alpn, close, NodeId};
use tokio::sync::watch;

use super::error::{Closed, Stage, Unreachable, Violation, Wait};
use super::frame;
use super::session::{Holdings, Mode, Session, Stats};
use super::store::{self, PeerName};
use super::{tls, Error};

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
        // The inviting node reads a new invitation into memory within a few dozen
        // milliseconds of its commit; a join started right after `fazt peer invite` (another
        // process) may beat that, and then a retry finds it.
        let limits = super::Limits::default();
        let mut attempt = 1;
        let welcome = loop {
            match join_once(&endpoint, &key, &label, ticket, me, advertise).await {
                Err(Error::NoInvitation { .. }) if attempt < limits.join_attempts => {
                    attempt += 1;
                    tokio::time::sleep(limits.join_retry).await;
                }
                outcome => break outcome,
            }
        };
        endpoint.wait_idle().await;
        anyhow::Ok(welcome?)
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

/// Dials the inviting node on the join protocol and redeems the ticket there.
async fn join_once(
    endpoint: &quinn::Endpoint,
    key: &SigningKey,
    label: &str,
    ticket: &Ticket,
    me: &str,
    advertise: &str,
) -> Result<String, Error> {
    let conn = super::connect(endpoint, key, label, &ticket.addr, &ticket.node, alpn::JOIN)
        .await
        .map_err(|e| join_failure(e, || None))?;
    let welcome = redeem(&conn, label, ticket, me, advertise)
        .await
        .map_err(|e| join_failure(e, || super::closed_by(&conn, label, &ticket.addr)));
    conn.close(quinn::VarInt::from_u32(close::DONE), b"joined");
    welcome
}

/// Sends the ticket's Join on `conn` and returns the name the inviting node gives itself. A
/// refusal in the handshake surfaces only on the first stream operation (TLS 1.3 client
/// authentication): the caller reads it from the connection.
async fn redeem(
    conn: &quinn::Connection,
    label: &str,
    ticket: &Ticket,
    me: &str,
    advertise: &str,
) -> Result<String, Error> {
    let peer = || label.to_string();
    // How the connection ended is read by the caller.
    let (mut send, mut recv) = conn.open_bi().await.map_err(anyhow::Error::from)?;
    let join = Message::Join(Join {
        secret: ticket.secret,
        name: me.to_string(),
        addr: advertise.to_string(),
    });
    frame::write_message(&mut send, &join).await?;
    let reply = tokio::time::timeout(
        super::Limits::default().connect_timeout,
        frame::read_message(&mut recv),
    )
    .await
    .map_err(|_| Error::Timeout {
        peer: peer(),
        wait: Wait::JoinAnswer,
    })?;
    match reply? {
        Some((Message::Welcome { name }, _)) => Ok(name),
        Some((Message::Refuse(reason), _)) => Err(Error::Refused {
            peer: peer(),
            during: Stage::Join,
            reason,
        }),
        Some(_) => Err(Error::Protocol {
            peer: peer(),
            what: Violation::JoinAnswer,
        }),
        None => Err(Error::Closed {
            peer: peer(),
            when: Closed::WhileJoining,
        }),
    }
}

/// Why joining failed, for the user: the inviting node's own refusal says it best; else how
/// it closed the connection (`closed`), if it did. A handshake refusal means it has no open
/// invitation, since unknown keys only get through the handshake while one is open.
fn join_failure(err: Error, closed: impl FnOnce() -> Option<Error>) -> Error {
    let err = match err {
        refused @ Error::Refused { .. } => refused,
        err => closed().unwrap_or(err),
    };
    match err {
        Error::NotTrusted { peer } => Error::NoInvitation { peer },
        err => err,
    }
}

/// What a one-off sync did.
pub struct Synced {
    pub stats: Stats,
    pub elapsed: Duration,
}

/// Syncs both ways with the peer named `name` until both hold the same versions.
pub fn sync_once(db_path: &Path, name: &str, timeout: Duration, progress: bool) -> Result<Synced> {
    let db = crate::db::Database::open(db_path)?;
    let (peer, key) =
        db.write_blocking(|w| Ok((store::ready_to_dial(w.conn(), name)?, node_key(w)?)))?;
    let addr = peer.addr.clone().unwrap_or_default();
    let own = crate::identity::node_id(&key);
    let started = Instant::now();
    let stats = runtime()?.block_on(async {
        let holdings = Holdings::follow(super::session_connect(&db), db.replicated()).await?;
        let endpoint = client_endpoint()?;
        let connected = std::sync::atomic::AtomicBool::new(false);
        let work = async {
            let conn =
                super::connect(&endpoint, &key, name, &addr, &peer.node_id, alpn::SYNC).await?;
            connected.store(true, std::sync::atomic::Ordering::Relaxed);
            let (send, recv) = conn
                .open_bi()
                .await
                .map_err(|e| Error::from_connection(name, &addr, &e))?;
            let (progress_tx, progress_rx) = watch::channel(Stats::default());
            let bar = (progress && std::io::stderr().is_terminal())
                .then(|| show_progress(name, progress_rx));
            let session = Session {
                connect: super::session_connect(&db),
                own,
                peer: peer.node_id,
                peer_name: name.to_string(),
                mode: Mode::Once,
                node: super::session_node(),
                limits: super::Limits::from_env(),
                holdings,
                progress: Some(progress_tx),
            };
            let result = session
                .run(recv, send, None)
                .await
                .map_err(|e| super::refine(&conn, name, &addr, e));
            if let Some(bar) = bar {
                bar.abort();
                eprintln!();
            }
            conn.close(quinn::VarInt::from_u32(close::DONE), b"synced");
            result
        };
        let result = match tokio::time::timeout(timeout, work).await {
            Ok(r) => r,
            Err(_) if !connected.load(std::sync::atomic::Ordering::Relaxed) => {
                Err(Error::Unreachable {
                    peer: name.to_string(),
                    addr: addr.clone(),
                    cause: Unreachable::Silent {
                        within: timeout,
                        port: None,
                    },
                })
            }
            Err(_) => Err(Error::Timeout {
                peer: name.to_string(),
                wait: Wait::Converge(timeout),
            }),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn refused_ticket() -> Error {
        Error::Refused {
            peer: "zyt".into(),
            during: Stage::Join,
            reason: "the ticket expired: run `fazt peer invite` for a new one".into(),
        }
    }

    #[test]
    fn a_refused_ticket_is_reported_as_the_inviting_node_put_it() {
        let not_trusted = || Some(Error::NotTrusted { peer: "zyt".into() });
        let err = join_failure(refused_ticket(), not_trusted);
        assert!(
            matches!(
                err,
                Error::Refused {
                    during: Stage::Join,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "zyt refused the ticket: the ticket expired: run `fazt peer invite` for a new one"
        );
    }

    #[test]
    fn a_handshake_refusal_while_joining_means_no_open_invitation() {
        let closed = Error::Closed {
            peer: "zyt".into(),
            when: Closed::WhileJoining,
        };
        let err = join_failure(closed, || Some(Error::NotTrusted { peer: "zyt".into() }));
        assert!(matches!(err, Error::NoInvitation { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "zyt refused this node: the ticket was already used, has expired, or was not issued there (it has no open invitation); run `fazt peer invite` on it for a new ticket"
        );
    }

    #[test]
    fn a_join_that_fails_otherwise_keeps_its_cause() {
        let timeout = Error::Timeout {
            peer: "the inviting node".into(),
            wait: Wait::JoinAnswer,
        };
        let err = join_failure(timeout, || None);
        assert_eq!(
            err.to_string(),
            "the inviting node did not answer the join in time"
        );
    }
}
