//! The QUIC endpoint and the TLS 1.3 that authenticates both ends of every peer connection.
//!
//! Nodes are identified by their ed25519 keys, not by names or certificate authorities, so
//! each side presents its key as an RFC 7250 raw public key (a SubjectPublicKeyInfo, no X.509
//! certificate) and proves possession with the TLS 1.3 CertificateVerify signature.
//!
//! - The server requires a client key and asks [`Admit`] about it during the handshake: a
//!   refused node gets a TLS `access_denied` alert, and its application data is never read.
//! - The client accepts the server only if it presents exactly the key pinned for that peer.
//! - ALPN chooses the protocol of the connection (`fazt_proto::alpn`): the server offers every
//!   token it serves, the client the one it wants plus the negotiation token. A client offering
//!   none of the server's tokens fails the handshake; what happens on a chosen token is
//!   `super::router`'s business.
//!
//! TLS session resumption is off on both sides: a resumed session skips the key checks, and
//! [`Admit`] must see every connection (a peer removed a second ago must not get back in on a
//! ticket).
//!
//! Failures are mapped back to what the user should hear by [`classify`]. Note that a client
//! the server refuses usually sees its connect *succeed* (in TLS 1.3 the client is done before
//! the server has checked the client's key) and learns of the refusal from its first stream
//! operation: a connection only counts as accepted once the remote has answered on it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use anyhow::{anyhow, Context as _};
use ed25519_dalek::pkcs8::spki::DecodePublicKey as _;
use ed25519_dalek::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _};
use ed25519_dalek::{SigningKey, VerifyingKey};
use fazt_proto::NodeId;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ConnectionError, IdleTimeout, TransportConfig, TransportErrorCode, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    verify_tls13_signature_with_raw_key, CryptoProvider, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::{
    CertificateDer, PrivatePkcs8KeyDer, ServerName, SubjectPublicKeyInfoDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    AlertDescription, CertificateError, DigitallySignedStruct, DistinguishedName, OtherError,
    PeerMisbehaved, SignatureScheme,
};

/// The server name to pass to `Endpoint::connect`/`connect_with`.
///
/// It is never checked: the server is authenticated by its pinned key, not by a name. It is a
/// fixed name under the reserved `.invalid` TLD only because QUIC's API requires one, and it is
/// not even sent (SNI is off).
pub const SERVER_NAME: &str = "fazt.invalid";

/// Decides, during the handshake, whether an incoming connection's key may connect.
///
/// Called once per incoming handshake with the client's ed25519 public key, on the endpoint's
/// driver, so it must answer quickly: it looks up an in-memory set, never the database. It does
/// not know which protocol the client asked for (`super::router` checks that afterwards).
pub type Admit = Arc<dyn Fn(&[u8; 32]) -> bool + Send + Sync>;

/// Why a connection attempt failed, classified for clear user-facing errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The remote refused our key during the handshake (it does not trust this node).
    #[error("the remote node does not trust this node's key")]
    NotTrusted,
    /// The remote presented a different key than the one pinned. `got` = the key it presented
    /// (if known).
    #[error("the remote node is not the one pinned: it presented {}", presented(.got))]
    WrongKey { got: Option<NodeId> },
    /// No common ALPN: the remote speaks another protocol version (and this side, or the
    /// remote, offered no negotiation token).
    #[error("the remote node speaks another fazt protocol version")]
    ProtocolMismatch,
    /// Anything else (timeout, unreachable, reset, ...), with a short description.
    #[error("{0}")]
    Other(String),
}

fn presented(got: &Option<NodeId>) -> String {
    match got {
        Some(key) => format!("key {key}"),
        None => "an unreadable key".to_string(),
    }
}

/// Server side: presents `key` as a raw public key, requires the client to present an ed25519
/// raw public key, verifies its handshake signature, and refuses the handshake with a TLS
/// `access_denied` alert when `admit(key)` is false. `alpns` are the protocols it serves, in
/// its order of preference (the negotiation tokens last).
///
/// A refused client learns it was refused one flight after its own handshake completed (TLS
/// 1.3 client authentication), so on its side the refusal may surface from the first stream
/// operation rather than from the connect itself; [`classify`] reads it the same either way.
/// This side never sees application data from a refused client.
pub fn server_config(
    key: &SigningKey,
    admit: Admit,
    alpns: &[&[u8]],
) -> anyhow::Result<quinn::ServerConfig> {
    let provider = provider();
    let verifier = AdmittedClients {
        admit,
        algorithms: provider.signature_verification_algorithms,
    };
    let resolver = rustls::server::AlwaysResolvesServerRawPublicKeys::new(certified_key(key)?);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("configuring TLS 1.3")?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = QuicServerConfig::try_from(Arc::new(tls)).context("configuring QUIC TLS")?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// Client side: presents `key`, and accepts the server only if it presents exactly `expected`
/// (the pinned node key), offering the protocols `alpns`: normally the one it wants and then
/// `fazt_proto::alpn::NEGOTIATE`.
///
/// Connect with `endpoint.connect_with(config, addr, SERVER_NAME)`.
pub fn client_config(
    key: &SigningKey,
    expected: [u8; 32],
    alpns: &[&[u8]],
) -> anyhow::Result<quinn::ClientConfig> {
    let provider = provider();
    let verifier = PinnedServer {
        expected,
        algorithms: provider.signature_verification_algorithms,
    };
    let resolver = rustls::client::AlwaysResolvesClientRawPublicKeys::new(certified_key(key)?);
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("configuring TLS 1.3")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    tls.resumption = rustls::client::Resumption::disabled();
    tls.enable_sni = false;
    let quic = QuicClientConfig::try_from(Arc::new(tls)).context("configuring QUIC TLS")?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// One UDP socket serving both directions: binds `addr`, with `server` as the server config
/// when given (without one, the endpoint only connects out).
///
/// `[::]:port` is bound dual-stack (IPV6_V6ONLY off) so IPv4 peers reach it too; where the
/// machine has no IPv6 it falls back to `0.0.0.0:port`. Port 0 picks a free port: read it back
/// with `local_addr()`. Must be called inside a tokio runtime.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> anyhow::Result<quinn::Endpoint> {
    let socket = match bind_udp(addr) {
        Ok(socket) => socket,
        Err(e) if addr.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) && !port_problem(&e) => {
            let v4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, addr.port()));
            tracing::debug!(error = %e, "no IPv6 here; listening on IPv4 only");
            bind_udp(v4).with_context(|| format!("binding UDP {v4} (after {addr}: {e})"))?
        }
        Err(e) => return Err(e).with_context(|| format!("binding UDP {addr}")),
    };
    // Linux reports twice what it grants (the other half is its bookkeeping). A server says
    // so where it is seen by default; a one-shot command only in its debug log.
    if let Ok(granted) = socket2::SockRef::from(&socket).recv_buffer_size() {
        if granted < UDP_BUFFER_BYTES {
            let advice = format!(
                "the UDP receive buffer is {granted} bytes, so large transfers between peers may \
                 lose packets and slow down; raise the limit with `sysctl -w net.core.rmem_max={UDP_BUFFER_BYTES}`"
            );
            if server.is_some() {
                tracing::warn!("{advice}");
            } else {
                tracing::debug!("{advice}");
            }
        }
    }
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .context("starting the QUIC endpoint")
}

/// The ed25519 key the remote side presented on an established connection.
pub fn remote_key(conn: &quinn::Connection) -> Option<NodeId> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    ed25519_key(certs.first()?).ok().map(NodeId::from_bytes)
}

/// The protocol (ALPN token) the handshake of `conn` chose.
pub fn protocol(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

/// Why a connection attempt failed, for the user.
///
/// Reads the TLS alert that QUIC carries as a crypto error code (0x100 + alert):
/// - `access_denied` sent by the remote: its [`Admit`] refused our key → [`Refusal::NotTrusted`];
/// - our own pin check refusing the server's key → [`Refusal::WrongKey`], with the key it
///   presented;
/// - `no_application_protocol`, from either side → [`Refusal::ProtocolMismatch`];
/// - anything else → [`Refusal::Other`] with quinn's description.
pub fn classify(err: &ConnectionError) -> Refusal {
    match err {
        ConnectionError::ConnectionClosed(close)
            if close.error_code == alert_code(AlertDescription::AccessDenied) =>
        {
            Refusal::NotTrusted
        }
        ConnectionError::ConnectionClosed(close)
            if close.error_code == alert_code(AlertDescription::NoApplicationProtocol) =>
        {
            Refusal::ProtocolMismatch
        }
        ConnectionError::TransportError(local)
            if local.code == alert_code(AlertDescription::NoApplicationProtocol) =>
        {
            Refusal::ProtocolMismatch
        }
        ConnectionError::TransportError(local)
            if local.code == alert_code(AlertDescription::CertificateUnknown) =>
        {
            match PinMismatch::find_in(&local.reason) {
                Some(got) => Refusal::WrongKey { got },
                None => Refusal::Other(err.to_string()),
            }
        }
        other => Refusal::Other(other.to_string()),
    }
}

fn alert_code(alert: AlertDescription) -> TransportErrorCode {
    TransportErrorCode::crypto(alert.into())
}

/// The ring provider: pure Rust and C, no cmake (unlike aws-lc-rs).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Keep-alives and the idle timeout of [`super::Limits`].
fn transport() -> Arc<TransportConfig> {
    let limits = super::Limits::from_env();
    let mut transport = TransportConfig::default();
    transport.keep_alive_interval(Some(limits.keep_alive()));
    // Also bounds the handshake: quinn has no separate handshake timeout.
    transport.max_idle_timeout(Some(IdleTimeout::from(VarInt::from_u32(
        limits.idle_timeout_ms(),
    ))));
    Arc::new(transport)
}

/// `key` as rustls presents it: the SubjectPublicKeyInfo as the single "certificate", and a
/// signer loaded from the PKCS#8 form of the secret.
fn certified_key(key: &SigningKey) -> anyhow::Result<Arc<CertifiedKey>> {
    let spki = key
        .verifying_key()
        .to_public_key_der()
        .map_err(|e| anyhow!("encoding the node's public key: {e}"))?;
    let pkcs8 = key
        .to_pkcs8_der()
        .map_err(|e| anyhow!("encoding the node's secret key: {e}"))?;
    let signer =
        rustls::crypto::ring::sign::any_eddsa_type(&PrivatePkcs8KeyDer::from(pkcs8.as_bytes()))
            .context("loading the node key into TLS")?;
    let spki = spki.into_vec();
    anyhow::ensure!(
        signer.public_key().as_deref() == Some(spki.as_slice()),
        "the TLS signer's public key differs from the node's"
    );
    Ok(Arc::new(CertifiedKey::new(
        vec![CertificateDer::from(spki)],
        signer,
    )))
}

/// The 32-byte key inside a presented raw public key, which must be an ed25519
/// SubjectPublicKeyInfo (algorithm OID checked) and not a weak (small-order) point.
fn ed25519_key(spki: &CertificateDer<'_>) -> Result<[u8; 32], rustls::Error> {
    match VerifyingKey::from_public_key_der(spki.as_ref()) {
        Ok(key) if !key.is_weak() => Ok(key.to_bytes()),
        _ => Err(CertificateError::BadEncoding.into()),
    }
}

/// Checks the CertificateVerify signature against the presented raw public key, accepting
/// only ed25519.
fn verify_ed25519(
    message: &[u8],
    spki: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
    algorithms: &WebPkiSupportedAlgorithms,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    if dss.scheme != SignatureScheme::ED25519 {
        return Err(PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
    }
    verify_tls13_signature_with_raw_key(
        message,
        &SubjectPublicKeyInfoDer::from(spki.as_ref()),
        dss,
        algorithms,
    )
}

fn tls12_refused() -> rustls::Error {
    // Unreachable: both configs enable TLS 1.3 only.
    rustls::Error::General("fazt peers speak TLS 1.3 only".into())
}

/// The server's view of clients: any ed25519 key, if [`Admit`] says so.
struct AdmittedClients {
    admit: Admit,
    algorithms: WebPkiSupportedAlgorithms,
}

impl std::fmt::Debug for AdmittedClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdmittedClients")
    }
}

impl ClientCertVerifier for AdmittedClients {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let key = ed25519_key(end_entity)?;
        if (self.admit)(&key) {
            Ok(ClientCertVerified::assertion())
        } else {
            tracing::debug!(peer = %NodeId::from_bytes(key), "refused a node that is not admitted");
            // rustls answers this one with the access_denied alert, which `classify` reads on
            // the other side as NotTrusted.
            Err(CertificateError::ApplicationVerificationFailure.into())
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The client's view of the server: exactly the pinned key.
#[derive(Debug)]
struct PinnedServer {
    expected: [u8; 32],
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = ed25519_key(end_entity)?;
        if key == self.expected {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = PinMismatch {
                presented: NodeId::from_bytes(key),
            };
            Err(CertificateError::Other(OtherError(Arc::new(mismatch))).into())
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(tls12_refused())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_ed25519(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }

    fn requires_raw_public_keys(&self) -> bool {
        true
    }
}

/// The client's refusal of a server that presented another key than the pinned one.
///
/// rustls sends `certificate_unknown` for it and quinn keeps only the error's text (the
/// `reason` of the local TransportError), where rustls prints this error with `Debug`. So the
/// `Debug` form is a wire format of sorts between [`PinnedServer`] and [`classify`]: the
/// marker followed by the presented key as a [`NodeId`].
struct PinMismatch {
    presented: NodeId,
}

impl PinMismatch {
    const MARKER: &'static str = "fazt pin mismatch, the remote presented ";

    /// `None` if `reason` is not a pin mismatch; `Some(None)` if it is but the key is unreadable.
    fn find_in(reason: &str) -> Option<Option<NodeId>> {
        let (_, rest) = reason.split_once(Self::MARKER)?;
        Some(rest.get(..52).and_then(|id| id.parse::<NodeId>().ok()))
    }
}

impl std::fmt::Debug for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", Self::MARKER, self.presented)
    }
}

impl std::fmt::Display for PinMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for PinMismatch {}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    socket.set_nonblocking(true)?;
    // A large transfer arrives in bursts faster than a busy receiver drains them; with the
    // usual 208 KiB default the kernel drops datagrams, and QUIC takes each loss as
    // congestion and slows down. Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(UDP_BUFFER_BYTES);
    let _ = socket.set_send_buffer_size(UDP_BUFFER_BYTES);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Socket buffers asked for the QUIC endpoint's UDP socket, each way.
const UDP_BUFFER_BYTES: usize = 4 << 20;

/// Errors that IPv4 would hit just the same, so falling back to it would only hide them.
fn port_problem(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
    )
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    const LOOPBACK: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
    /// What a server offers and a client asks for in these tests.
    const SERVED: &[&[u8]] = &[fazt_proto::alpn::SYNC, fazt_proto::alpn::NEGOTIATE];
    const ASKED: &[&[u8]] = &[fazt_proto::alpn::SYNC, fazt_proto::alpn::NEGOTIATE];

    fn random_key() -> SigningKey {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("randomness");
        SigningKey::from_bytes(&secret)
    }

    fn public(key: &SigningKey) -> [u8; 32] {
        key.verifying_key().to_bytes()
    }

    fn admit_only(allowed: [u8; 32]) -> Admit {
        Arc::new(move |key| *key == allowed)
    }

    /// Fails the test instead of hanging it.
    async fn within<T>(secs: u64, work: impl Future<Output = T>) -> T {
        tokio::time::timeout(std::time::Duration::from_secs(secs), work)
            .await
            .expect("finished in time")
    }

    /// Connects as `client_key` pinning `pinned` and offering `alpn`, and returns how the
    /// connection ended: the connect error, or (when a refusal only arrives after the client's
    /// side of the handshake completed) the error of the first stream exchange.
    async fn failed_attempt(
        server: &quinn::Endpoint,
        client_key: &SigningKey,
        pinned: [u8; 32],
        alpns: &[&[u8]],
    ) -> ConnectionError {
        let client = endpoint(LOOPBACK, None).unwrap();
        let config = client_config(client_key, pinned, alpns).unwrap();
        let connecting = client
            .connect_with(config, server.local_addr().unwrap(), SERVER_NAME)
            .unwrap();
        let conn = match connecting.await {
            Err(e) => return e,
            Ok(conn) => conn,
        };
        let exchange = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            send.write_all(b"hello").await?;
            send.finish()?;
            recv.read_to_end(64).await?;
            anyhow::Ok(())
        };
        exchange
            .await
            .expect_err("a refused connection carries no stream");
        conn.close_reason().expect("the connection is closed")
    }

    /// What the server got from an attempt it should have refused.
    async fn server_side_refused(server: &quinn::Endpoint) {
        let incoming = server.accept().await.expect("a handshake attempt");
        assert!(
            incoming.await.is_err(),
            "the server must not accept a refused connection"
        );
    }

    #[tokio::test]
    async fn trusted_client_and_pinned_server_exchange_bytes_and_see_each_others_keys() {
        let (server_key, client_key) = (random_key(), random_key());
        let config = server_config(&server_key, admit_only(public(&client_key)), SERVED).unwrap();
        let server = endpoint(LOOPBACK, Some(config)).unwrap();
        let server_addr = server.local_addr().unwrap();

        let serving = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let request = recv.read_to_end(64).await.unwrap();
            send.write_all(b"pong").await.unwrap();
            send.finish().unwrap();
            let seen = remote_key(&conn);
            conn.closed().await;
            (request, seen)
        });

        within(10, async {
            let client = endpoint(LOOPBACK, None).unwrap();
            let config = client_config(&client_key, public(&server_key), ASKED).unwrap();
            let conn = client
                .connect_with(config, server_addr, SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            assert_eq!(
                remote_key(&conn),
                Some(NodeId::from_bytes(public(&server_key)))
            );
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"ping").await.unwrap();
            send.finish().unwrap();
            assert_eq!(recv.read_to_end(64).await.unwrap(), b"pong");
            conn.close(0u32.into(), b"done");

            let (request, seen) = serving.await.unwrap();
            assert_eq!(request, b"ping");
            assert_eq!(seen, Some(NodeId::from_bytes(public(&client_key))));
            client.wait_idle().await;
        })
        .await;
    }

    #[tokio::test]
    async fn a_client_the_server_does_not_admit_is_told_it_is_not_trusted() {
        let (server_key, client_key) = (random_key(), random_key());
        let config = server_config(&server_key, Arc::new(|_| false), SERVED).unwrap();
        let server = endpoint(LOOPBACK, Some(config)).unwrap();

        let (err, ()) = within(10, async {
            tokio::join!(
                failed_attempt(&server, &client_key, public(&server_key), ASKED),
                server_side_refused(&server),
            )
        })
        .await;
        assert_eq!(classify(&err), Refusal::NotTrusted, "{err}");
    }

    #[tokio::test]
    async fn a_server_presenting_another_key_than_the_pinned_one_is_refused_with_the_key_it_showed()
    {
        let (server_key, client_key, pinned) = (random_key(), random_key(), random_key());
        let config = server_config(&server_key, admit_only(public(&client_key)), SERVED).unwrap();
        let server = endpoint(LOOPBACK, Some(config)).unwrap();

        let (err, ()) = within(10, async {
            tokio::join!(
                failed_attempt(&server, &client_key, public(&pinned), ASKED),
                server_side_refused(&server),
            )
        })
        .await;
        assert_eq!(
            classify(&err),
            Refusal::WrongKey {
                got: Some(NodeId::from_bytes(public(&server_key)))
            },
            "{err}"
        );
    }

    #[tokio::test]
    async fn another_protocol_version_is_refused_promptly_as_a_mismatch() {
        let (server_key, client_key) = (random_key(), random_key());
        let config = server_config(&server_key, admit_only(public(&client_key)), SERVED).unwrap();
        let server = endpoint(LOOPBACK, Some(config)).unwrap();

        let (err, ()) = within(5, async {
            tokio::join!(
                // No negotiation token: nothing to tell it in words.
                failed_attempt(&server, &client_key, public(&server_key), &[b"fazt/999"]),
                server_side_refused(&server),
            )
        })
        .await;
        assert_eq!(classify(&err), Refusal::ProtocolMismatch, "{err}");
    }

    #[tokio::test]
    async fn an_ipv4_client_reaches_a_server_listening_on_the_ipv6_wildcard() {
        let (server_key, client_key) = (random_key(), random_key());
        let config = server_config(&server_key, admit_only(public(&client_key)), SERVED).unwrap();
        let wildcard = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 0);
        let server = endpoint(wildcard, Some(config)).unwrap();
        let bound = server.local_addr().unwrap();
        if !bound.is_ipv6() {
            eprintln!("no IPv6 on this machine (bound {bound}): dual-stack not tested");
            return;
        }

        let serving = tokio::spawn(async move {
            let conn = server.accept().await.unwrap().await.unwrap();
            let seen = remote_key(&conn);
            conn.closed().await;
            seen
        });
        within(10, async {
            let client = endpoint(LOOPBACK, None).unwrap();
            let config = client_config(&client_key, public(&server_key), ASKED).unwrap();
            let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), bound.port());
            let conn = client
                .connect_with(config, target, SERVER_NAME)
                .unwrap()
                .await
                .unwrap();
            assert_eq!(
                remote_key(&conn),
                Some(NodeId::from_bytes(public(&server_key)))
            );
            conn.close(0u32.into(), b"done");
            assert_eq!(
                serving.await.unwrap(),
                Some(NodeId::from_bytes(public(&client_key)))
            );
        })
        .await;
    }

    #[test]
    fn only_ed25519_raw_public_keys_are_read() {
        let key = public(&random_key());
        let spki = VerifyingKey::from_bytes(&key)
            .unwrap()
            .to_public_key_der()
            .unwrap()
            .into_vec();
        assert_eq!(ed25519_key(&CertificateDer::from(spki.clone())), Ok(key));

        // The same bytes under the X25519 algorithm OID (1.3.101.110) are not a signing key.
        let oid = [0x06, 0x03, 0x2b, 0x65, 0x70];
        let at = spki.windows(5).position(|w| w == oid).unwrap();
        let mut x25519 = spki.clone();
        x25519[at + 4] = 0x6e;
        assert!(ed25519_key(&CertificateDer::from(x25519)).is_err());
        // Trailing garbage is refused too.
        let mut longer = spki;
        longer.push(0);
        assert!(ed25519_key(&CertificateDer::from(longer)).is_err());
    }

    #[test]
    fn a_pin_mismatch_reads_back_from_its_error_text() {
        let key = public(&random_key());
        let rustls_error: rustls::Error =
            CertificateError::Other(OtherError(Arc::new(PinMismatch {
                presented: NodeId::from_bytes(key),
            })))
            .into();
        assert_eq!(
            PinMismatch::find_in(&rustls_error.to_string()),
            Some(Some(NodeId::from_bytes(key)))
        );
        assert_eq!(
            PinMismatch::find_in("invalid peer certificate: BadEncoding"),
            None
        );
    }
}
