//! fazt-proto: what crosses the wire between fazt nodes, and nothing that does I/O.
//!
//! - [`NodeId`]: a node's identity, printable for copying between machines.
//! - [`Digest`]: the SHA-256 hash that names content (large values) on the wire.
//! - [`change`]: a change row as bundles and the peer protocol carry it, and its encoding.
//! - [`bundle`]: the change-bundle file format (`fazt sync export` / `import`).
//! - [`wire`]: the peer protocol's messages and framing.
//! - [`ticket`]: invitation tickets (`fazt peer invite` / `join`).
//! - [`PROTOCOL_VERSION`] / [`ALPN`]: the peer protocol's version.

#![warn(missing_docs)]

pub mod bundle;
pub mod change;
mod codec;
mod digest;
mod node_id;
pub mod ticket;
pub mod wire;

pub use codec::DecodeError;
pub use digest::Digest;
pub use node_id::{NodeId, NodeIdError};

/// Protocol version spoken by this build, carried in ALPN so that a mismatch is refused
/// during the handshake instead of hanging later.
pub const PROTOCOL_VERSION: u32 = 1;

/// The ALPN token for [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"fazt/1";
