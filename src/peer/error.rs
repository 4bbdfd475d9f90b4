//! Why talking to a peer failed: one type for the causes that code branches on, and the one
//! place where each cause is put in words for the user ([`Error`]'s `Display`).
//!
//! The sentences say what to do, and the CLI prints them as they are (`error: {e:#}`), so
//! tests/node assert many of them word for word.

use std::fmt;
use std::time::Duration;

use fazt_proto::{alpn, close, NodeId};

use super::tls;

/// A failure at the peer boundary. `peer` is the name the user knows the other node by (or a
/// description such as "the inviting node"), `addr` the address dialed.
#[derive(Debug)]
pub enum Error {
    /// The other node answered with a refusal frame, giving its reason.
    Refused {
        peer: String,
        during: Stage,
        reason: String,
    },
    /// The other node refused this node's key in the handshake: it does not trust it.
    NotTrusted { peer: String },
    /// While joining, the inviting node refused this node's key: it has no open invitation.
    NoInvitation { peer: String },
    /// The node at `addr` presented another key than the one pinned for `peer` (`got`, when
    /// it could be read).
    WrongKey {
        peer: String,
        addr: String,
        got: Option<NodeId>,
    },
    /// The two nodes speak different fazt protocols: told by the handshake, by the other
    /// node's version-mismatch close, or by its Hello (see [`Theirs`]).
    VersionMismatch { peer: String, theirs: Theirs },
    /// The other node could not be reached at `addr`.
    Unreachable {
        peer: String,
        addr: String,
        cause: Unreachable,
    },
    /// The other node closed the connection (or the stream) before this side was done.
    Closed { peer: String, when: Closed },
    /// The other node did not do its part in time.
    Timeout { peer: String, wait: Wait },
    /// The other node sent something the protocol does not allow at that point.
    Protocol { peer: String, what: Violation },
    /// This side stopped a piece of work (export, serving or fetching content) because the
    /// session it served ended meanwhile. No user should see it: the session's own ending is
    /// what is reported.
    Cancelled,
    /// The replication engine failed.
    Engine(fazt_sync::Error),
    /// Anything else on this side (opening the database, configuring TLS, ...), as it came.
    Local(anyhow::Error),
}

/// What a refusal frame answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A Join with a ticket.
    Join,
    /// This side's Hello: the session never started.
    Hello,
    /// A running session, which the other node ended.
    Session,
}

/// What is known of the protocols the other node speaks, when they differ from this node's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Theirs {
    /// Nothing: the handshake found no protocol in common (neither side offered the
    /// negotiation token).
    Unknown,
    /// The protocols its version-mismatch close listed (`fazt_proto::alpn::parse_mismatch`).
    Protocols(Vec<String>),
    /// The replication protocol version its Hello carried.
    Hello(u32),
}

/// Why a node could not be reached.
#[derive(Debug)]
pub enum Unreachable {
    /// No handshake within `within`; `port` is the UDP port dialed, when known.
    Silent { within: Duration, port: Option<u16> },
    /// The address does not resolve.
    Resolve(std::io::Error),
    /// The address resolves to nothing.
    NoAddress,
    /// QUIC refused to start the connection (for example an address it cannot dial).
    Connect(quinn::ConnectError),
    /// The connection failed for another reason, in quinn's words.
    Failed(String),
}

/// When the other node closed the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// Before this side could send its Hello.
    BeforeSending,
    /// Before it sent its Hello.
    BeforeHello,
    /// Before a one-off sync converged.
    BeforeConverged,
    /// Before it answered a Join.
    WhileJoining,
    /// With an application close, giving this reason.
    Because(String),
}

/// What the other node did not do in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Answer a Join.
    JoinAnswer,
    /// Converge in a one-off sync, within the `--timeout` given.
    Converge(Duration),
}

/// A breach of the protocol by the other node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Violation {
    /// Its first message in a session was not Hello.
    FirstNotHello,
    /// A message (named) that has no place in a running session.
    Unexpected(&'static str),
    /// Its answer to a Join was neither Welcome nor Refuse.
    JoinAnswer,
    /// Its Hello named another node than the key it authenticated with.
    NotWhoItAuthenticatedAs,
}

impl Error {
    /// A connection failure reported by quinn, classified by what the handshake said, or by
    /// the code the other node closed the connection with.
    pub fn from_connection(peer: &str, addr: &str, err: &quinn::ConnectionError) -> Self {
        if let quinn::ConnectionError::ApplicationClosed(closed) = err {
            if let Some(e) = Error::from_close(peer, closed) {
                return e;
            }
        }
        let peer = peer.to_string();
        match tls::classify(err) {
            tls::Refusal::NotTrusted => Error::NotTrusted { peer },
            tls::Refusal::WrongKey { got } => Error::WrongKey {
                peer,
                addr: addr.to_string(),
                got,
            },
            tls::Refusal::ProtocolMismatch => Error::VersionMismatch {
                peer,
                theirs: Theirs::Unknown,
            },
            tls::Refusal::Other(text) => Error::Unreachable {
                peer,
                addr: addr.to_string(),
                cause: Unreachable::Failed(text),
            },
        }
    }

    /// The failure an application close stands for, when its code says one
    /// (`fazt_proto::close`): the other node does not trust this one, or speaks other
    /// protocols. `None` for the codes whose reason is only text for people.
    pub fn from_close(peer: &str, closed: &quinn::ApplicationClose) -> Option<Self> {
        let peer = peer.to_string();
        let code = closed.error_code.into_inner();
        if code == u64::from(close::NOT_TRUSTED) {
            return Some(Error::NotTrusted { peer });
        }
        if code == u64::from(close::VERSION_MISMATCH) {
            let theirs = match alpn::parse_mismatch(&closed.reason) {
                Some(listed) => Theirs::Protocols(listed),
                None => Theirs::Unknown,
            };
            return Some(Error::VersionMismatch { peer, theirs });
        }
        None
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Refused {
                peer,
                during,
                reason,
            } => {
                let what = match during {
                    Stage::Join => "refused the ticket",
                    Stage::Hello => "refused the session",
                    Stage::Session => "ended the session",
                };
                write!(f, "{peer} {what}: {reason}")
            }
            Error::NotTrusted { peer } => write!(
                f,
                "{peer} does not trust this node: run `fazt peer join` with a new ticket from `fazt peer invite` on {peer}"
            ),
            Error::NoInvitation { peer } => write!(
                f,
                "{peer} refused this node: the ticket was already used, has expired, or was not issued there (it has no open invitation); run `fazt peer invite` on it for a new ticket"
            ),
            Error::WrongKey { peer, addr, got } => write!(
                f,
                "the node at {addr} is not {peer}: it presented {}, not the pinned key; check the address, or re-pin with `fazt peer remove {peer}` and a new ticket",
                got.map(|k| k.to_string())
                    .unwrap_or_else(|| "another key".into())
            ),
            Error::VersionMismatch {
                peer,
                theirs: Theirs::Unknown,
            } => write!(
                f,
                "{peer} speaks another fazt protocol version than this node ({}): upgrade the older of the two",
                alpn::list(alpn::SPOKEN)
            ),
            Error::VersionMismatch {
                peer,
                theirs: Theirs::Protocols(listed),
            } => write!(
                f,
                "{peer} speaks another fazt protocol version than this node (it speaks {}; this node {}): upgrade the older of the two",
                listed.join(", "),
                alpn::list(alpn::SPOKEN)
            ),
            Error::VersionMismatch {
                peer,
                theirs: Theirs::Hello(theirs),
            } => write!(
                f,
                "{peer} speaks protocol version {theirs}, this node {}: upgrade the older one",
                fazt_proto::PROTOCOL_VERSION
            ),
            Error::Unreachable { peer, addr, cause } => match cause {
                Unreachable::Silent { within, port } => {
                    let port = match port {
                        Some(port) => format!("UDP port {port}"),
                        None => "its UDP port".into(),
                    };
                    write!(
                        f,
                        "could not reach {peer} at {addr} within {}s: is `fazt server start` running there, and is {port} open?",
                        within.as_secs()
                    )
                }
                Unreachable::Resolve(_) => write!(f, "cannot resolve {addr}"),
                Unreachable::NoAddress => write!(f, "{addr} resolves to no address"),
                Unreachable::Connect(_) => write!(f, "cannot connect to {peer} at {addr}"),
                Unreachable::Failed(text) => {
                    write!(f, "connection to {peer} at {addr} failed: {text}")
                }
            },
            Error::Closed { peer, when } => match when {
                Closed::BeforeSending => write!(f, "the connection to {peer} closed"),
                Closed::BeforeHello => {
                    write!(f, "{peer} closed the connection before saying hello")
                }
                Closed::BeforeConverged => {
                    write!(f, "{peer} closed the connection before the sync finished")
                }
                Closed::WhileJoining => {
                    write!(f, "{peer} closed the connection while joining")
                }
                Closed::Because(reason) => write!(f, "{peer} closed the connection: {reason}"),
            },
            Error::Timeout { peer, wait } => match wait {
                Wait::JoinAnswer => write!(f, "{peer} did not answer the join in time"),
                Wait::Converge(within) => write!(
                    f,
                    "{peer} and this node did not converge within {}s; run `fazt peer sync {peer}` again or give a longer --timeout",
                    within.as_secs()
                ),
            },
            Error::Protocol { peer, what } => match what {
                Violation::FirstNotHello => write!(
                    f,
                    "{peer} broke the protocol: its first message was not Hello"
                ),
                Violation::Unexpected(kind) => {
                    write!(f, "{peer} broke the protocol: unexpected {kind}")
                }
                Violation::JoinAnswer => write!(f, "{peer} broke the protocol while joining"),
                Violation::NotWhoItAuthenticatedAs => write!(
                    f,
                    "{peer} introduced itself as another node than the one it authenticated as"
                ),
            },
            Error::Cancelled => write!(f, "session ended"),
            Error::Engine(e) => e.fmt(f),
            // The whole chain: this error has no source of its own to show it.
            Error::Local(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Unreachable {
                cause: Unreachable::Resolve(e),
                ..
            } => Some(e),
            Error::Unreachable {
                cause: Unreachable::Connect(e),
                ..
            } => Some(e),
            Error::Engine(e) => e.source(),
            _ => None,
        }
    }
}

impl From<fazt_sync::Error> for Error {
    fn from(e: fazt_sync::Error) -> Self {
        Error::Engine(e)
    }
}

/// An `anyhow` error that is a peer error keeps its variant; anything else is [`Error::Local`].
impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        e.downcast::<Error>().unwrap_or_else(Error::Local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable(cause: Unreachable) -> Error {
        Error::Unreachable {
            peer: "zyt".into(),
            addr: "zyt.example:7701".into(),
            cause,
        }
    }

    #[test]
    fn a_sync_that_runs_out_of_time_says_how_to_go_on() {
        let err = Error::Timeout {
            peer: "zyt".into(),
            wait: Wait::Converge(Duration::from_secs(3)),
        };
        assert_eq!(
            err.to_string(),
            "zyt and this node did not converge within 3s; run `fazt peer sync zyt` again or give a longer --timeout"
        );
    }

    #[test]
    fn an_unreachable_node_names_the_port_to_check_when_it_is_known() {
        let silent = |port| {
            unreachable(Unreachable::Silent {
                within: Duration::from_secs(10),
                port,
            })
        };
        assert_eq!(
            silent(Some(7701)).to_string(),
            "could not reach zyt at zyt.example:7701 within 10s: is `fazt server start` running there, and is UDP port 7701 open?"
        );
        assert_eq!(
            silent(None).to_string(),
            "could not reach zyt at zyt.example:7701 within 10s: is `fazt server start` running there, and is its UDP port open?"
        );
        assert_eq!(
            unreachable(Unreachable::Failed("timed out".into())).to_string(),
            "connection to zyt at zyt.example:7701 failed: timed out"
        );
    }

    #[test]
    fn a_resolver_failure_keeps_its_cause_in_the_chain() {
        let io = std::io::Error::other("no such host");
        let err = anyhow::Error::from(unreachable(Unreachable::Resolve(io)));
        assert_eq!(
            format!("{err:#}"),
            "cannot resolve zyt.example:7701: no such host"
        );
    }

    #[test]
    fn refusals_in_the_handshake_say_what_to_run() {
        assert_eq!(
            Error::NotTrusted { peer: "zyt".into() }.to_string(),
            "zyt does not trust this node: run `fazt peer join` with a new ticket from `fazt peer invite` on zyt"
        );
        let key = [3u8; 32];
        assert_eq!(
            Error::WrongKey {
                peer: "zyt".into(),
                addr: "10.0.0.2:7701".into(),
                got: Some(NodeId::from_bytes(key)),
            }
            .to_string(),
            format!(
                "the node at 10.0.0.2:7701 is not zyt: it presented {}, not the pinned key; check the address, or re-pin with `fazt peer remove zyt` and a new ticket",
                NodeId::from_bytes(key)
            )
        );
        assert_eq!(
            Error::VersionMismatch {
                peer: "zyt".into(),
                theirs: Theirs::Unknown
            }
            .to_string(),
            "zyt speaks another fazt protocol version than this node (fazt/join/1, fazt/sync/1): upgrade the older of the two"
        );
        assert_eq!(
            Error::VersionMismatch {
                peer: "zyt".into(),
                theirs: Theirs::Protocols(vec!["fazt/join/2".into(), "fazt/sync/2".into()])
            }
            .to_string(),
            "zyt speaks another fazt protocol version than this node (it speaks fazt/join/2, fazt/sync/2; this node fazt/join/1, fazt/sync/1): upgrade the older of the two"
        );
    }

    #[test]
    fn a_refusal_frame_is_told_by_what_it_answered() {
        let refused = |during| Error::Refused {
            peer: "zyt".into(),
            during,
            reason: "no".into(),
        };
        assert_eq!(
            refused(Stage::Join).to_string(),
            "zyt refused the ticket: no"
        );
        assert_eq!(
            refused(Stage::Hello).to_string(),
            "zyt refused the session: no"
        );
        assert_eq!(
            refused(Stage::Session).to_string(),
            "zyt ended the session: no"
        );
        assert_eq!(
            Error::Closed {
                peer: "zyt".into(),
                when: Closed::Because("this node no longer trusts yours".into())
            }
            .to_string(),
            "zyt closed the connection: this node no longer trusts yours"
        );
    }
}
