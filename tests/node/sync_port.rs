//! The sync port before authentication: what an unknown key can make a node hold, and which
//! protocol (ALPN) it may use. Driven with a small hostile QUIC client (real TLS 1.3 with a raw
//! ed25519 key, as nodes speak it).

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use fazt_proto::alpn;
use fazt_proto::bundle::{WireChange, WireValue};
use fazt_proto::wire::{self, Changes, Heads, Hello, Join, Message, NetChange};

use crate::harness::{assert_same_state, Node, Server};
use crate::peers::eventually;

/// A guard against a test hanging forever, not a timing assertion.
const GUARD: Duration = Duration::from_secs(60);

/// Believes any server: this client attacks, it does not care whom it talks to.
#[derive(Debug)]
struct AnyServer;

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// A client config presenting a fresh random ed25519 key and asking for `protocol`.
fn stranger(protocol: &[u8]) -> quinn::ClientConfig {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    presenting(&ed25519_dalek::SigningKey::from_bytes(&secret), protocol)
}

/// A client config presenting `key` and asking for `protocol`, as nodes do: that token, then
/// the negotiation token.
fn presenting(key: &ed25519_dalek::SigningKey, protocol: &[u8]) -> quinn::ClientConfig {
    let spki = key.verifying_key().to_public_key_der().unwrap().into_vec();
    let pkcs8 = key.to_pkcs8_der().unwrap();
    let signer =
        rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8.as_bytes()))
            .unwrap();
    let certified = rustls::sign::CertifiedKey::new(vec![CertificateDer::from(spki)], signer);
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_client_cert_resolver(Arc::new(
        rustls::client::AlwaysResolvesClientRawPublicKeys::new(Arc::new(certified)),
    ));
    tls.alpn_protocols = vec![protocol.to_vec(), alpn::NEGOTIATE.to_vec()];
    tls.enable_sni = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    quinn::ClientConfig::new(Arc::new(quic))
}

/// The sync address in a ticket, as an IPv4 socket address.
fn sync_addr(ticket: &str) -> SocketAddr {
    let t: fazt_proto::ticket::Ticket = ticket.parse().unwrap();
    t.addr
        .to_socket_addrs()
        .unwrap()
        .find(SocketAddr::is_ipv4)
        .unwrap_or_else(|| panic!("no IPv4 address for {}", t.addr))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Connects with a fresh key on the join protocol, opens a stream, sends `bytes` and then
/// nothing more; returns how the node ended the connection (the reason it gave) and how long
/// it took.
async fn send_and_stall(addr: SocketAddr, bytes: Vec<u8>) -> (String, Duration) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(stranger(alpn::JOIN), addr, "fazt.invalid")
        .unwrap()
        .await
        .expect("handshake");
    let start = Instant::now();
    if !bytes.is_empty() {
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        // The node may already have closed the connection: that is an answer too.
        let _ = send.write_all(&bytes).await;
        let closed = tokio::time::timeout(GUARD, conn.closed()).await;
        return (
            reason(closed.expect("the node never closed the connection")),
            start.elapsed(),
        );
    }
    let closed = tokio::time::timeout(GUARD, conn.closed()).await;
    (
        reason(closed.expect("the node never closed the connection")),
        start.elapsed(),
    )
}

/// "closed by fazt: REASON" when the node closed the connection itself (so the handshake had
/// admitted this key); the transport's description otherwise (a refused handshake, ...).
fn reason(err: quinn::ConnectionError) -> String {
    match err {
        quinn::ConnectionError::ApplicationClosed(close) => {
            format!("closed by fazt: {}", String::from_utf8_lossy(&close.reason))
        }
        other => other.to_string(),
    }
}

/// A ticket from `node`, once its server admits strangers with it.
///
/// The server reads a new invitation into memory a few milliseconds after `peer invite`
/// commits it (the handshake never reads the database); a real joiner retries a refused
/// handshake, these hostile clients first wait until the invitation is there.
fn ticket(node: &Node, extra: &[&str]) -> String {
    let mut args = vec!["peer", "invite"];
    args.extend_from_slice(extra);
    let out = node.ok(&args);
    let ticket = out.lines().last().unwrap_or_default().trim().to_string();
    runtime().block_on(invitation_admits(sync_addr(&ticket)));
    ticket
}

/// How a stranger asking for `protocol` ends: the close the node gave, or the handshake's
/// refusal.
async fn stranger_on(addr: SocketAddr, protocol: &[u8]) -> quinn::ConnectionError {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(stranger(protocol), addr, "fazt.invalid")
        .unwrap()
        .await
        .expect("the client's side of the handshake");
    tokio::time::timeout(GUARD, conn.closed())
        .await
        .expect("the node never closed the connection")
}

/// Whether a stranger was let through the handshake and then told it is not trusted (what
/// any protocol but joining tells a key admitted by an open invitation).
fn told_not_trusted(err: &quinn::ConnectionError) -> bool {
    matches!(err, quinn::ConnectionError::ApplicationClosed(close)
        if close.error_code == quinn::VarInt::from_u32(fazt_proto::close::NOT_TRUSTED))
}

/// Whether the handshake refused a stranger's key (TLS `access_denied`).
fn refused_in_handshake(err: &quinn::ConnectionError) -> bool {
    matches!(err, quinn::ConnectionError::ConnectionClosed(close)
        if close.error_code == quinn::TransportErrorCode::crypto(49))
}

/// Waits until the node at `addr` admits strangers through the handshake (an invitation is
/// open in its memory), probing with the sync protocol, which takes no joining slot.
async fn invitation_admits(addr: SocketAddr) {
    let start = Instant::now();
    loop {
        let outcome = stranger_on(addr, alpn::SYNC).await;
        if told_not_trusted(&outcome) {
            return;
        }
        assert!(refused_in_handshake(&outcome), "{outcome}");
        assert!(
            start.elapsed() < GUARD,
            "the invitation never admitted anyone"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn peers(node: &Node) -> serde_json::Value {
    node.json(&["peer", "list", "--json"])
}

fn vm_rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_stranger_on_the_sync_protocol_is_refused_in_the_handshake_or_closed_before_any_stream() {
    let zyt = Node::new();
    let server = zyt.start(&[]);
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let rt = runtime();
    // No invitation open: the handshake refuses the key.
    let outcome = rt.block_on(stranger_on(addr, alpn::SYNC));
    assert!(refused_in_handshake(&outcome), "{outcome}");
    // With one open the handshake lets it through, but only joining serves it: the sync
    // protocol closes the connection at once, saying why.
    let _t = ticket(&zyt, &[]);
    let outcome = rt.block_on(stranger_on(addr, alpn::SYNC));
    assert!(told_not_trusted(&outcome), "{outcome}");
    assert_eq!(
        reason(outcome),
        "closed by fazt: this node does not trust yours: run `fazt peer join` with a new ticket"
    );
    assert_eq!(peers(&zyt), serde_json::json!([]));
}

#[test]
fn a_node_asking_for_a_protocol_version_this_one_does_not_speak_is_told_which_it_speaks() {
    let zyt = Node::new();
    let mut server = zyt.start(&[]);
    let key = random_key();
    zyt.ok(&["peer", "trust", &id_of(&key), "--name", "newer"]);
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let rt = runtime();
    let outcome = rt.block_on(async {
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let start = Instant::now();
        loop {
            let conn = endpoint
                .connect_with(presenting(&key, b"fazt/sync/99"), addr, "fazt.invalid")
                .unwrap()
                .await
                .expect("the client's side of the handshake");
            let closed = tokio::time::timeout(GUARD, conn.closed()).await.unwrap();
            // The server reads a key it was just told to trust within milliseconds.
            if !refused_in_handshake(&closed) || start.elapsed() > GUARD {
                return closed;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    match &outcome {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            close.error_code,
            quinn::VarInt::from_u32(fazt_proto::close::VERSION_MISMATCH)
        ),
        other => panic!("want the version close, got {other}"),
    }
    assert_eq!(
        reason(outcome),
        "closed by fazt: version mismatch: this node speaks fazt/join/1, fazt/sync/1"
    );
    // The node says the same in its log.
    let stopped = server.stop_with("-TERM");
    assert!(
        stopped
            .stderr
            .contains("version mismatch: this node speaks fazt/join/1, fazt/sync/1"),
        "{}",
        stopped.stderr
    );
}

#[test]
fn a_stranger_claiming_a_frame_larger_than_a_join_is_dropped_at_its_header() {
    let zyt = Node::new();
    let server = zyt.start(&[]);
    let addr = sync_addr(&ticket(&zyt, &[]));
    let rt = runtime();
    let rss_before = vm_rss_kib(&server);
    let outcomes: Vec<(String, Duration)> = rt.block_on(async {
        let tasks: Vec<_> = (0..8)
            .map(|_| tokio::spawn(send_and_stall(addr, (16u32 << 20).to_le_bytes().to_vec())))
            .collect();
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    });
    eprintln!(
        "server VmRSS {rss_before} KiB before, {} KiB after eight 16 MiB claims",
        vm_rss_kib(&server)
    );
    for (why, _) in &outcomes {
        assert!(
            why.contains("closed by fazt: expected a Join of at most 4 KiB"),
            "{why}"
        );
    }
    let joiner = Node::new();
    joiner.ok(&[
        "peer",
        "join",
        &ticket(&zyt, &[]),
        "--name",
        "zyt",
        "--as",
        "real",
    ]);
}

#[test]
fn an_invitation_that_expired_on_an_idle_node_admits_no_unknown_key() {
    let zyt = Node::new();
    let _server = zyt.start(&[]);
    let issued = Instant::now();
    let t = ticket(&zyt, &["--ttl", "3s"]);
    let addr = sync_addr(&t);
    // While it is open, a stranger gets through the handshake (the node itself closes the
    // connection, after a frame that is no Join): the node has seen the invitation.
    let rt = runtime();
    let (why, _) = rt.block_on(send_and_stall(addr, vec![1, 0, 0, 0, 0xff]));
    assert!(why.starts_with("closed by fazt"), "{why}");

    // Nothing is written to the node's database after that: the node is idle.
    while issued.elapsed() < Duration::from_millis(3500) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let joiner = Node::new();
    let run = joiner.run(&["peer", "join", &t, "--name", "zyt", "--as", "late"]);
    assert!(!run.status.success(), "{}", run.stdout);
    assert!(
        run.stderr.contains("zyt refused this node"),
        "refused in the handshake, not after reading a message: {}",
        run.stderr
    );
    let (why, _) = rt.block_on(send_and_stall(addr, vec![1, 0, 0, 0, 0xff]));
    assert!(!why.starts_with("closed by fazt"), "{why}");
    assert_eq!(peers(&zyt), serde_json::json!([]));
    assert_eq!(peers(&joiner), serde_json::json!([]));
}

#[test]
fn strangers_that_stall_are_dropped_a_few_at_a_time_and_a_real_join_still_works() {
    let zyt = Node::new();
    let server = zyt.start(&[]);
    let t = ticket(&zyt, &[]);
    let addr = sync_addr(&t);
    let rss_before = vm_rss_kib(&server);
    let rt = runtime();
    // Nine strangers: each announces a 4000-byte Join, sends ten bytes of it and stalls; a
    // tenth never even opens a stream.
    let mut partial = 4000u32.to_le_bytes().to_vec();
    partial.extend_from_slice(&[7u8; 10]);
    let outcomes: Vec<(String, Duration)> = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..10 {
            let bytes = if i == 9 { Vec::new() } else { partial.clone() };
            tasks.push(tokio::spawn(send_and_stall(addr, bytes)));
        }
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await.unwrap());
        }
        out
    });
    let rss_after = vm_rss_kib(&server);
    eprintln!("server VmRSS {rss_before} KiB before, {rss_after} KiB after ten stalled strangers");
    let too_many = outcomes
        .iter()
        .filter(|(why, _)| why.contains("too many nodes are joining at once"))
        .count();
    let timed_out = outcomes
        .iter()
        .filter(|(why, _)| why.contains("no Join in time"))
        .count();
    assert_eq!((timed_out, too_many), (8, 2), "{outcomes:?}");

    let joiner = Node::new();
    joiner.ok(&["peer", "join", &t, "--name", "zyt", "--as", "real"]);
    assert_eq!(peers(&zyt).as_array().unwrap().len(), 1);
}

/// A connection to the node at `addr` presenting `key` and asking for `protocol`, and one
/// stream on it.
async fn open(
    addr: SocketAddr,
    key: &ed25519_dalek::SigningKey,
    protocol: &[u8],
) -> (
    quinn::Endpoint,
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(presenting(key, protocol), addr, "fazt.invalid")
        .unwrap()
        .await
        .expect("handshake");
    let (send, recv) = conn.open_bi().await.unwrap();
    (endpoint, conn, send, recv)
}

fn random_key() -> ed25519_dalek::SigningKey {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    ed25519_dalek::SigningKey::from_bytes(&secret)
}

fn id_of(key: &ed25519_dalek::SigningKey) -> String {
    fazt_proto::NodeId::from_bytes(key.verifying_key().to_bytes()).to_string()
}

/// One frame, as `fazt_proto::wire` reads it; None when the stream ended.
async fn read_frame(recv: &mut quinn::RecvStream) -> Option<Message> {
    let mut header = [0u8; 4];
    tokio::time::timeout(GUARD, recv.read_exact(&mut header))
        .await
        .expect("an answer in time")
        .ok()?;
    let len = wire::frame_len(header).unwrap();
    let mut payload = vec![0u8; len];
    recv.read_exact(&mut payload).await.ok()?;
    Some(Message::decode(&payload).unwrap())
}

/// A stranger (a key zyt does not trust, admitted by an open invitation) sends `msg` on the
/// join protocol: what zyt answers.
async fn stranger_sends(addr: SocketAddr, msg: Message) -> Option<Message> {
    let (_endpoint, conn, mut send, mut recv) = open(addr, &random_key(), alpn::JOIN).await;
    send.write_all(&msg.encode()).await.unwrap();
    let answer = read_frame(&mut recv).await;
    conn.close(quinn::VarInt::from_u32(0), b"done");
    answer
}

/// A stranger says Hello on the sync protocol: how zyt ended the connection, and whether it
/// sent anything on the stream first.
async fn stranger_says_hello(addr: SocketAddr, hello: &Message) -> (String, bool) {
    let (_endpoint, conn, mut send, mut recv) = open(addr, &random_key(), alpn::SYNC).await;
    // zyt may have closed the connection already: that is the answer.
    let _ = send.write_all(&hello.encode()).await;
    let answered = recv.read_exact(&mut [0u8; 1]).await.is_ok();
    let closed = tokio::time::timeout(GUARD, conn.closed()).await.unwrap();
    (reason(closed), answered)
}

#[test]
fn a_stranger_admitted_by_an_open_invitation_may_only_join() {
    let zyt = Node::new();
    let _server = zyt.start(&[]);
    zyt.deploy(&zyt.site("blog", &[("index.html", "zyt's")]), &[]);
    let addr = sync_addr(&ticket(&zyt, &[]));
    let before = zyt.state();
    let rt = runtime();
    let hello = Message::Hello(Hello {
        node: fazt_proto::NodeId::from_bytes([9; 32]),
        protocol: fazt_proto::PROTOCOL_VERSION,
        schema: 1,
        heads: Heads::default(),
    });
    // A change that would rename zyt's app, were it applied.
    let changes = Message::Changes(Changes {
        changes: vec![NetChange {
            change: WireChange {
                table: "settings".into(),
                pk: fazt_sync::pack::pack(&[fazt_sync::Value::Text("stolen".into())]),
                cid: "value".into(),
                val: WireValue::Text("yes".into()),
                col_version: 1,
                db_version: 1,
                site: [9; 16],
                cl: 1,
                seq: 0,
            },
            content: None,
        }],
        complete: Some(Heads(vec![([9; 16], vec![(1, 1)])])),
    });
    // On the sync protocol the stranger is not served at all: the connection is closed before
    // any stream is accepted, and the dialer hears that it is not trusted.
    let (why, answered) = rt.block_on(stranger_says_hello(addr, &hello));
    assert_eq!(
        why,
        "closed by fazt: this node does not trust yours: run `fazt peer join` with a new ticket"
    );
    assert!(!answered, "zyt sent nothing to the stranger");
    // On the join protocol anything but a Join is refused.
    let answers = rt.block_on(async {
        let mut out = Vec::new();
        for msg in [
            hello,
            changes,
            Message::Want(vec![fazt_proto::Digest::from_bytes([1; 32])]),
            Message::Applied {
                groups: 1,
                heads: Heads::default(),
            },
        ] {
            out.push(stranger_sends(addr, msg).await);
        }
        out
    });
    let refusals: Vec<String> = answers
        .into_iter()
        .map(|a| match a {
            Some(Message::Refuse(reason)) => reason,
            other => panic!("want a Refuse, got {other:?}"),
        })
        .collect();
    for r in &refusals {
        assert_eq!(r, "expected Join on the join protocol");
    }
    // Nothing a stranger sent was kept.
    assert_same_state(&before, &zyt.state());
    // The invitation still works for a real Join.
    let joiner = Node::new();
    joiner.ok(&["peer", "join", &ticket(&zyt, &[]), "--name", "zyt"]);
}

#[test]
fn two_joins_racing_with_one_ticket_get_exactly_one_welcome() {
    let zyt = Node::new();
    let _server = zyt.start(&[]);
    let text = ticket(&zyt, &[]);
    let t: fazt_proto::ticket::Ticket = text.parse().unwrap();
    let addr = sync_addr(&text);
    let keys = [random_key(), random_key()];
    let rt = runtime();
    let answers = rt.block_on(async {
        // Both handshakes are done (the invitation admits both keys) before either sends
        // its Join; then both Joins go out at once.
        let mut opened = Vec::new();
        for key in &keys {
            opened.push(open(addr, key, alpn::JOIN).await);
        }
        let joins = opened.iter_mut().enumerate().map(|(i, (_, _, send, _))| {
            let frame = Message::Join(Join {
                secret: t.secret,
                name: format!("racer{i}"),
                addr: String::new(),
            })
            .encode();
            async move { send.write_all(&frame).await.unwrap() }
        });
        futures_join_all(joins).await;
        let mut answers = Vec::new();
        for (_, conn, _, recv) in &mut opened {
            answers.push(read_frame(recv).await);
            conn.close(quinn::VarInt::from_u32(0), b"done");
        }
        answers
    });
    let welcomed: Vec<usize> = (0..2)
        .filter(|&i| matches!(answers[i], Some(Message::Welcome { .. })))
        .collect();
    assert_eq!(welcomed.len(), 1, "exactly one Welcome: {answers:?}");
    let other = 1 - welcomed[0];
    match &answers[other] {
        Some(Message::Refuse(reason)) => assert!(reason.contains("already used"), "{reason}"),
        a => panic!("the other join is refused, got {a:?}"),
    }
    let list = peers(&zyt);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0]["node_id"], id_of(&keys[welcomed[0]]));
    assert_eq!(list[0]["name"], format!("racer{}", welcomed[0]));
}

/// Runs `futures` concurrently on the current task.
async fn futures_join_all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    let mut set = Vec::new();
    for f in futures {
        set.push(Box::pin(f));
    }
    // Poll all of them together until every one is done.
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for f in set.iter_mut() {
            if f.as_mut().poll(cx).is_pending() {
                pending = true;
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await
}

/// The versions `node` holds, from `sync status --json` (its coverage, all origins).
fn versions_held(node: &Node) -> i64 {
    node.json(&["sync", "status", "--json"])["coverage"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|o| o["ranges"].as_array().unwrap().clone())
        .map(|r| r[1].as_i64().unwrap() - r[0].as_i64().unwrap() + 1)
        .sum()
}

#[test]
fn a_silent_peer_stays_connected_a_dead_one_is_dropped_and_peer_list_shows_lag_and_last_seen() {
    let zyt = Node::new();
    // A connection silent for 1 s (not 10) is dead here; keep-alives go every 200 ms.
    let server = Server::spawn(
        zyt.command()
            .env("FAZT_PEER_IDLE_TIMEOUT_MS", "1000")
            .args(["server", "start", "--port", "0"]),
    );
    zyt.deploy(&zyt.site("blog", &[("index.html", "v1")]), &[]);
    zyt.deploy(&zyt.site("blog", &[("index.html", "v2")]), &[]);
    let key = random_key();
    zyt.ok(&["peer", "trust", &id_of(&key), "--name", "mute"]);
    let never = peers(&zyt);
    assert_eq!(never[0]["last_seen"], serde_json::Value::Null, "{never}");
    assert_eq!(never[0]["lag"], serde_json::Value::Null, "{never}");
    assert!(zyt.ok(&["peer", "list"]).contains("never"));
    let held = versions_held(&zyt);
    assert!(held > 0);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // A trusted peer that says Hello with nothing held, takes what zyt sends and never
    // acknowledges it: zyt is `held` versions ahead of it.
    let addr = SocketAddr::from(([127, 0, 0, 1], server.port));
    let rt = runtime();
    let (_endpoint, conn, _send, _drain) = rt.block_on(async {
        let (endpoint, conn, mut send, mut recv) = open(addr, &key, alpn::SYNC).await;
        let hello = Message::Hello(Hello {
            node: fazt_proto::NodeId::from_bytes(key.verifying_key().to_bytes()),
            protocol: fazt_proto::PROTOCOL_VERSION,
            schema: 1,
            heads: Heads::default(),
        });
        send.write_all(&hello.encode()).await.unwrap();
        assert!(matches!(
            read_frame(&mut recv).await,
            Some(Message::Hello(_))
        ));
        let drain = tokio::spawn(async move { while read_frame(&mut recv).await.is_some() {} });
        (endpoint, conn, send, drain)
    });
    let seen = eventually("zyt shows the peer connected, with its lag", || {
        let list = peers(&zyt);
        (list[0]["connected"] == true && list[0]["lag"] == held).then_some(list)
    });
    assert!(seen[0]["last_seen"].as_i64().unwrap() >= started, "{seen}");
    let text = zyt.ok(&["peer", "list"]);
    assert!(text.contains(&format!("{held} versions")), "{text}");

    // Three idle timeouts without a byte of data either way: keep-alives hold it open.
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(3)).await });
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    assert_eq!(peers(&zyt)[0]["connected"], true);

    // The peer goes silent for good (nothing drives its side of the connection any more):
    // zyt declares the connection dead and the peer disconnected.
    eventually("zyt drops the dead connection", || {
        (peers(&zyt)[0]["connected"] == false).then_some(())
    });
    drop(conn);
}

/// Accepts any client key: the fake node below only wants to be dialed.
#[derive(Debug)]
struct AnyClient;

impl rustls::server::danger::ClientCertVerifier for AnyClient {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        Ok(rustls::server::danger::ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// A QUIC endpoint on loopback that presents `key` as a node does, completes handshakes,
/// accepts streams, reads what arrives, and never answers.
fn speechless_node(
    rt: &tokio::runtime::Runtime,
    key: &ed25519_dalek::SigningKey,
) -> quinn::Endpoint {
    let spki = key.verifying_key().to_public_key_der().unwrap().into_vec();
    let pkcs8 = key.to_pkcs8_der().unwrap();
    let signer =
        rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8.as_bytes()))
            .unwrap();
    let certified = rustls::sign::CertifiedKey::new(vec![CertificateDer::from(spki)], signer);
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_client_cert_verifier(Arc::new(AnyClient))
    .with_cert_resolver(Arc::new(
        rustls::server::AlwaysResolvesServerRawPublicKeys::new(Arc::new(certified)),
    ));
    tls.alpn_protocols = vec![alpn::SYNC.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
    let config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let _guard = rt.enter();
    let endpoint = quinn::Endpoint::server(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let accepting = endpoint.clone();
    rt.spawn(async move {
        while let Some(incoming) = accepting.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                while let Ok((_send, mut recv)) = conn.accept_bi().await {
                    tokio::spawn(async move {
                        let mut sink = [0u8; 4096];
                        while let Ok(Some(_)) = recv.read(&mut sink).await {}
                        // Keep the send half open: the other side waits for an answer.
                        std::future::pending::<()>().await;
                        drop(_send);
                    });
                }
            });
        }
    });
    endpoint
}

#[test]
fn peer_sync_with_a_peer_that_never_answers_times_out_with_the_reason() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let key = random_key();
    let endpoint = speechless_node(&rt, &key);
    let port = endpoint.local_addr().unwrap().port();
    let local = Node::new();
    local.deploy(&local.site("blog", &[("index.html", "mine")]), &[]);
    local.ok(&[
        "peer",
        "add",
        "zyt",
        &format!("127.0.0.1:{port}"),
        "--key",
        &id_of(&key),
    ]);
    let before = local.state();
    let run = local.run(&["peer", "sync", "zyt", "--timeout", "2"]);
    assert_eq!(run.status.code(), Some(1), "{}{}", run.stdout, run.stderr);
    let errors: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        errors,
        ["error: zyt and this node did not converge within 2s; run `fazt peer sync zyt` again or give a longer --timeout"],
        "{}",
        run.stderr
    );
    assert_same_state(&before, &local.state());
    drop(endpoint);
}
