//! Protocols by ALPN: every protocol a node serves is a [`Handler`], and the [`Router`] hands
//! each incoming connection to the handler of the protocol its handshake chose (the tokens are
//! `fazt_proto::alpn`'s). Adding a protocol is adding a route.
//!
//! Who gets in is decided from memory only, from a [`Trust`] the peer service keeps current;
//! the handshake never waits on the database.
//! - The handshake ([`Router::admit`]) completes with a pinned key, and with any key while an
//!   invitation is open; any other key gets the TLS `access_denied` alert.
//! - A key this node does not pin reaches only handlers that admit untrusted keys (joining).
//!   On any other protocol its connection is closed before any stream is accepted, with
//!   `close::NOT_TRUSTED`, which the dialer reports as a refusal of its key.
//! - A connection that chose the negotiation token, or the single token of builds from before
//!   protocols had their own, wants nothing this node speaks: it is closed before any data
//!   with `close::VERSION_MISMATCH` and a reason listing the routed protocols, and the node
//!   logs the same in one line.

use std::collections::HashSet;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{anyhow, Context as _, Result};
use fazt_proto::{alpn, close, NodeId};
use futures_util::future::BoxFuture;

use super::tls;

/// What the handshake and the router know of trust: the pinned keys, and until when an
/// invitation is open. Kept in memory and replaced whole by whoever reads the peers table.
#[derive(Default)]
pub(crate) struct Trust {
    keys: RwLock<HashSet<[u8; 32]>>,
    /// Unix seconds until which an invitation is open (0: none). Compared with the clock at
    /// every handshake, so an invitation that expires on an idle node admits nobody after.
    invite_until: AtomicI64,
}

impl Trust {
    /// Replaces what is known: the pinned keys, and the end of the latest open invitation
    /// (unix seconds; 0 when none is open).
    pub(crate) fn set(&self, keys: HashSet<[u8; 32]>, invite_until: i64) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        self.invite_until.store(invite_until, Ordering::Relaxed);
    }

    /// Whether `key` may complete a handshake.
    pub(crate) fn admits(&self, key: &[u8; 32]) -> bool {
        self.invite_open() || self.trusts(key)
    }

    /// Whether `key` is pinned.
    pub(crate) fn trusts(&self, key: &[u8; 32]) -> bool {
        self.keys
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(key)
    }

    fn invite_open(&self) -> bool {
        crate::clock::now_secs() < self.invite_until.load(Ordering::Relaxed)
    }
}

/// An incoming connection whose handshake is done, for the handler of its protocol.
pub(crate) struct Accepted {
    pub(crate) conn: quinn::Connection,
    /// The key the other node authenticated with.
    pub(crate) node: NodeId,
    /// Whether this node pins that key; if not, an open invitation admitted it.
    pub(crate) trusted: bool,
}

/// One protocol a node serves.
pub(crate) trait Handler: Send + Sync {
    /// Whether keys this node does not pin may use it (they get through the handshake only
    /// while an invitation is open). No, unless the protocol is made for them.
    fn admits_untrusted(&self) -> bool {
        false
    }

    /// Serves one connection. An error ends it and is logged; a handler closes the connection
    /// itself, with a reason, when the other node should hear one.
    fn serve(&self, accepted: Accepted) -> BoxFuture<'static, Result<()>>;
}

/// The protocols a node serves, by ALPN token.
#[derive(Clone)]
pub(crate) struct Router {
    trust: Arc<Trust>,
    routes: Vec<(&'static [u8], Arc<dyn Handler>)>,
}

/// What a key the node does not pin is told when it asks for a protocol it may not use. The
/// same words as a refused Hello before protocols were routed.
const NOT_TRUSTED: &str = "this node does not trust yours: run `fazt peer join` with a new ticket";

impl Router {
    pub(crate) fn new(trust: Arc<Trust>) -> Self {
        Router {
            trust,
            routes: Vec::new(),
        }
    }

    /// Serves `protocol` (a token of `fazt_proto::alpn`) with `handler`.
    pub(crate) fn route(mut self, protocol: &'static [u8], handler: Arc<dyn Handler>) -> Self {
        debug_assert!(protocol != alpn::NEGOTIATE && protocol != alpn::LEGACY);
        self.routes.push((protocol, handler));
        self
    }

    /// The handshake's check of a client key, from memory: pinned, or an invitation is open.
    pub(crate) fn admit(&self) -> tls::Admit {
        let trust = self.trust.clone();
        Arc::new(move |key| trust.admits(key))
    }

    /// The tokens the server offers, in its order of preference: every routed protocol, then
    /// the negotiation tokens, so these are chosen only when nothing else matches.
    pub(crate) fn offered(&self) -> Vec<&'static [u8]> {
        let mut offered = self.spoken();
        offered.extend([alpn::LEGACY, alpn::NEGOTIATE]);
        offered
    }

    /// The routed protocols.
    fn spoken(&self) -> Vec<&'static [u8]> {
        self.routes.iter().map(|(protocol, _)| *protocol).collect()
    }

    /// Completes the handshake of `incoming` and serves the connection with the handler of
    /// the protocol it chose, if the key may use it.
    pub(crate) async fn serve(&self, incoming: quinn::Incoming) -> Result<()> {
        let conn = incoming.await.context("handshake")?;
        let node =
            tls::remote_key(&conn).ok_or_else(|| anyhow!("the peer presented no usable key"))?;
        let protocol = tls::protocol(&conn).unwrap_or_default();
        let handler = self
            .routes
            .iter()
            .find(|(routed, _)| *routed == protocol.as_slice())
            .map(|(_, handler)| handler.clone());
        let Some(handler) = handler else {
            let reason = alpn::mismatch_reason(&self.spoken());
            conn.close(
                quinn::VarInt::from_u32(close::VERSION_MISMATCH),
                reason.as_bytes(),
            );
            tracing::warn!(
                node = %node,
                asked = %alpn::name(&protocol),
                "a node asked for no protocol this one speaks ({reason}): upgrade the older of the two"
            );
            return Ok(());
        };
        let trusted = self.trust.trusts(node.as_bytes());
        if !trusted && !handler.admits_untrusted() {
            conn.close(
                quinn::VarInt::from_u32(close::NOT_TRUSTED),
                NOT_TRUSTED.as_bytes(),
            );
            return Err(anyhow!(
                "refused {node} on {}: this node does not trust it (an open invitation admits it only to join)",
                alpn::name(&protocol)
            ));
        }
        handler
            .serve(Accepted {
                conn,
                node,
                trusted,
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, SocketAddr};
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use ed25519_dalek::SigningKey;

    use super::*;
    use crate::peer::error::Theirs;
    use crate::peer::Error;

    const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

    fn random_key() -> SigningKey {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("randomness");
        SigningKey::from_bytes(&secret)
    }

    fn public(key: &SigningKey) -> [u8; 32] {
        key.verifying_key().to_bytes()
    }

    /// A protocol that counts the connections it serves and answers one stream with "ok".
    struct Probe {
        served: AtomicUsize,
        untrusted: bool,
    }

    impl Probe {
        fn new(untrusted: bool) -> Arc<Probe> {
            Arc::new(Probe {
                served: AtomicUsize::new(0),
                untrusted,
            })
        }

        fn served(&self) -> usize {
            self.served.load(Ordering::SeqCst)
        }
    }

    impl Handler for Arc<Probe> {
        fn admits_untrusted(&self) -> bool {
            self.untrusted
        }

        fn serve(&self, accepted: Accepted) -> BoxFuture<'static, Result<()>> {
            self.served.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let (mut send, mut recv) = accepted.conn.accept_bi().await?;
                recv.read_to_end(64).await?;
                send.write_all(b"ok").await?;
                send.finish()?;
                accepted.conn.closed().await;
                Ok(())
            })
        }
    }

    /// A node serving a join and a sync probe, with `trust` deciding who gets in.
    struct Node {
        key: SigningKey,
        addr: SocketAddr,
        join: Arc<Probe>,
        sync: Arc<Probe>,
        _endpoint: quinn::Endpoint,
    }

    fn node(trust: Trust) -> Node {
        let key = random_key();
        let (join, sync) = (Probe::new(true), Probe::new(false));
        let router = Router::new(Arc::new(trust))
            .route(alpn::JOIN, Arc::new(join.clone()))
            .route(alpn::SYNC, Arc::new(sync.clone()));
        let config = tls::server_config(&key, router.admit(), &router.offered()).unwrap();
        let endpoint = tls::endpoint(LOOPBACK, Some(config)).unwrap();
        let accepting = endpoint.clone();
        tokio::spawn(async move {
            while let Some(incoming) = accepting.accept().await {
                let router = router.clone();
                tokio::spawn(async move { router.serve(incoming).await });
            }
        });
        Node {
            addr: endpoint.local_addr().unwrap(),
            key,
            join,
            sync,
            _endpoint: endpoint,
        }
    }

    fn trusting(keys: &[[u8; 32]], invitation: bool) -> Trust {
        let trust = Trust::default();
        let until = if invitation {
            crate::clock::now_secs() + 3600
        } else {
            0
        };
        trust.set(keys.iter().copied().collect(), until);
        trust
    }

    /// Dials `node` as `key` asking for `protocol` as the CLI and the dialer do (plus the
    /// negotiation token), sends a few bytes on a stream and reads the answer; or the failure,
    /// as the dialer reports it.
    async fn ask(node: &Node, key: &SigningKey, protocol: &[u8]) -> Result<Vec<u8>, Error> {
        let endpoint = tls::endpoint(LOOPBACK, None).unwrap();
        let addr = node.addr.to_string();
        let pinned = NodeId::from_bytes(public(&node.key));
        let conn = crate::peer::connect(&endpoint, key, "zyt", &addr, &pinned, protocol).await?;
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"hi").await?;
            send.finish()?;
            anyhow::Ok(recv.read_to_end(64).await?)
        };
        let answer = exchange
            .await
            .map_err(|e| crate::peer::refine(&conn, "zyt", &addr, e.into()));
        conn.close(quinn::VarInt::from_u32(close::DONE), b"done");
        answer
    }

    /// Dials `node` as `key` offering `alpns` and waits for the connection to end: how it
    /// ended (the handshake's refusal, or the node's close).
    async fn ended(node: &Node, key: &SigningKey, alpns: &[&[u8]]) -> quinn::ConnectionError {
        let endpoint = tls::endpoint(LOOPBACK, None).unwrap();
        let config = tls::client_config(key, public(&node.key), alpns).unwrap();
        within(async {
            let conn = endpoint
                .connect_with(config, node.addr, tls::SERVER_NAME)
                .unwrap()
                .await
                .expect("the client's side of the handshake");
            conn.closed().await
        })
        .await
    }

    /// Fails the test instead of hanging it.
    async fn within<T>(work: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), work)
            .await
            .expect("finished in time")
    }

    #[tokio::test]
    async fn a_sync_connection_from_an_untrusted_key_is_refused_in_the_handshake() {
        let zyt = node(trusting(&[], false));
        let stranger = random_key();
        // The TLS alert, not the router's close.
        let closed = ended(&zyt, &stranger, &[alpn::SYNC, alpn::NEGOTIATE]).await;
        assert_eq!(tls::classify(&closed), tls::Refusal::NotTrusted, "{closed}");
        let err = within(ask(&zyt, &stranger, alpn::SYNC)).await.unwrap_err();
        assert!(matches!(err, Error::NotTrusted { .. }), "{err:?}");
        assert_eq!((zyt.join.served(), zyt.sync.served()), (0, 0));
    }

    #[tokio::test]
    async fn with_an_invitation_open_an_untrusted_key_gets_the_join_protocol_only() {
        let zyt = node(trusting(&[], true));
        let stranger = random_key();
        let err = within(ask(&zyt, &stranger, alpn::SYNC)).await.unwrap_err();
        assert!(matches!(err, Error::NotTrusted { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "zyt does not trust this node: run `fazt peer join` with a new ticket from `fazt peer invite` on zyt"
        );
        assert_eq!(
            zyt.sync.served(),
            0,
            "closed before the sync handler saw it"
        );

        let answer = within(ask(&zyt, &stranger, alpn::JOIN)).await.unwrap();
        assert_eq!(answer, b"ok");
        assert_eq!((zyt.join.served(), zyt.sync.served()), (1, 0));
    }

    #[tokio::test]
    async fn an_untrusted_key_on_sync_is_closed_with_the_not_trusted_code_before_any_stream() {
        let zyt = node(trusting(&[], true));
        let closed = ended(&zyt, &random_key(), &[alpn::SYNC, alpn::NEGOTIATE]).await;
        match closed {
            quinn::ConnectionError::ApplicationClosed(close) => {
                assert_eq!(
                    close.error_code,
                    quinn::VarInt::from_u32(close::NOT_TRUSTED)
                );
                assert_eq!(close.reason.as_ref(), NOT_TRUSTED.as_bytes());
            }
            other => panic!("want the router's close, got {other:?}"),
        }
        assert_eq!(zyt.sync.served(), 0);
    }

    #[tokio::test]
    async fn a_trusted_key_reaches_every_protocol() {
        let peer = random_key();
        let zyt = node(trusting(&[public(&peer)], false));
        assert_eq!(within(ask(&zyt, &peer, alpn::SYNC)).await.unwrap(), b"ok");
        assert_eq!(within(ask(&zyt, &peer, alpn::JOIN)).await.unwrap(), b"ok");
        assert_eq!((zyt.join.served(), zyt.sync.served()), (1, 1));
    }

    #[tokio::test]
    async fn an_unknown_protocol_is_told_which_protocols_the_node_speaks() {
        let peer = random_key();
        let zyt = node(trusting(&[public(&peer)], false));
        let err = within(ask(&zyt, &peer, b"fazt/sync/99")).await.unwrap_err();
        match &err {
            Error::VersionMismatch {
                theirs: Theirs::Protocols(listed),
                ..
            } => assert_eq!(listed, &["fazt/join/1", "fazt/sync/1"]),
            other => panic!("want a version mismatch with the list, got {other:?}"),
        }
        assert_eq!(
            err.to_string(),
            "zyt speaks another fazt protocol version than this node (it speaks fazt/join/1, fazt/sync/1; this node fazt/join/1, fazt/sync/1): upgrade the older of the two"
        );
        assert_eq!((zyt.join.served(), zyt.sync.served()), (0, 0));
    }

    #[tokio::test]
    async fn a_build_from_before_protocol_tokens_hears_the_version_message_as_the_close_reason() {
        let peer = random_key();
        let zyt = node(trusting(&[public(&peer)], false));
        match ended(&zyt, &peer, &[alpn::LEGACY]).await {
            quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
                String::from_utf8_lossy(&close.reason),
                "version mismatch: this node speaks fazt/join/1, fazt/sync/1"
            ),
            other => panic!("want the version close, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_client_without_the_negotiation_token_fails_the_handshake_as_a_mismatch() {
        let peer = random_key();
        let zyt = node(trusting(&[public(&peer)], false));
        let endpoint = tls::endpoint(LOOPBACK, None).unwrap();
        let config = tls::client_config(&peer, public(&zyt.key), &[b"fazt/sync/99"]).unwrap();
        let err = within(async {
            endpoint
                .connect_with(config, zyt.addr, tls::SERVER_NAME)
                .unwrap()
                .await
                .unwrap_err()
        })
        .await;
        let err = Error::from_connection("zyt", &zyt.addr.to_string(), &err);
        assert!(
            matches!(
                err,
                Error::VersionMismatch {
                    theirs: Theirs::Unknown,
                    ..
                }
            ),
            "{err:?}"
        );
    }
}
