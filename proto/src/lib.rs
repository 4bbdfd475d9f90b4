//! fazt-proto: what crosses the wire between fazt nodes, and nothing that does I/O.
//!
//! - [`NodeId`]: a node's identity, printable for copying between machines.
//! - [`Digest`]: the SHA-256 hash that names content (large values) on the wire.
//! - [`change`]: a change row as bundles and the peer protocol carry it, and its encoding.
//! - [`bundle`]: the change-bundle file format (`fazt sync export` / `import`).
//! - [`wire`]: the peer protocol's messages and framing.
//! - [`ticket`]: invitation tickets (`fazt peer invite` / `join`).
//! - [`alpn`]: the protocols between nodes, one ALPN token each, and version negotiation.
//! - [`close`]: why a node closed a connection, as codes the other side branches on.
//! - [`PROTOCOL_VERSION`]: the replication protocol's version, as its `Hello` carries it.

#![warn(missing_docs)]

pub mod alpn;
pub mod bundle;
pub mod change;
pub mod close;
mod codec;
mod digest;
mod node_id;
pub mod ticket;
pub mod wire;

pub use codec::DecodeError;
pub use digest::Digest;
pub use node_id::{NodeId, NodeIdError};

/// Version of the replication protocol spoken by this build, as `Hello` carries it; the
/// handshake already agreed on it through [`alpn::SYNC`].
pub const PROTOCOL_VERSION: u32 = 1;
