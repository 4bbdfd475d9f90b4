//! The sync port before authentication: what an unknown key can make a node hold. Driven with
//! a small hostile QUIC client (real TLS 1.3 with a raw ed25519 key, as nodes speak it).

use std::net::{SocketAddr, ToSocketAddrs as _};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::harness::{Node, Server};

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

/// A client config presenting a fresh random ed25519 key.
fn stranger() -> quinn::ClientConfig {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).unwrap();
    let key = ed25519_dalek::SigningKey::from_bytes(&secret);
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
    tls.alpn_protocols = vec![fazt_proto::ALPN.to_vec()];
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

/// Connects with a fresh key, opens a stream, sends `bytes` and then nothing more; returns
/// how the node ended the connection (the reason it gave) and how long it took.
async fn send_and_stall(addr: SocketAddr, bytes: Vec<u8>) -> (String, Duration) {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(stranger(), addr, "fazt.invalid")
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

fn ticket(node: &Node, extra: &[&str]) -> String {
    let mut args = vec!["peer", "invite"];
    args.extend_from_slice(extra);
    let out = node.ok(&args);
    out.lines().last().unwrap_or_default().trim().to_string()
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
            tokio::time::sleep(Duration::from_millis(50)).await;
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
