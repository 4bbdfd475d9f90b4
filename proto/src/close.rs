//! Application close codes: why a node ended a QUIC connection on purpose. The reason that
//! goes with a code is text for people, except after [`VERSION_MISMATCH`].

/// Work done (a join answered, a sync converged), or the node shutting down.
pub const DONE: u32 = 0;

/// Refused or broke off, with the reason in words (a `Refuse` frame said it first, where a
/// stream was open).
pub const REFUSED: u32 = 1;

/// The peer was removed while connected: this node no longer trusts its key.
pub const REMOVED: u32 = 2;

/// A key this node does not trust, admitted by the handshake only because an invitation is
/// open, asked for another protocol than joining. The dialer reports it as a refusal of its
/// key, as if the handshake had refused it.
pub const NOT_TRUSTED: u32 = 3;

/// The connection chose no protocol both speak (see [`crate::alpn`]); the reason is
/// [`crate::alpn::mismatch_reason`]. Never changes, like [`crate::alpn::NEGOTIATE`].
pub const VERSION_MISMATCH: u32 = 4;

/// A second connection between the same two nodes, closed by the node that dialed it because
/// a replication session between them is already live (or started at the same moment and
/// wins: when both dial, the connection dialed by the smaller key is kept). Expected: neither
/// side reports it as a failure, and the dialer waits while the kept session lives.
pub const DUPLICATE: u32 = 5;
