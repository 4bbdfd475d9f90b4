//! fazt-proto: what crosses the wire between fazt nodes, and nothing that does I/O.
//!
//! - [`NodeId`]: a node's identity, printable for copying between machines.
//! - [`bundle`]: the change-bundle file format (`fazt sync export` / `import`).
//! - [`PROTOCOL_VERSION`] / [`ALPN`]: the peer protocol's version.

pub mod bundle;
mod node_id;

pub use node_id::{NodeId, NodeIdError};

/// Protocol version spoken by this build, carried in ALPN so that a mismatch is refused
/// during the handshake instead of hanging later.
pub const PROTOCOL_VERSION: u32 = 1;

/// The ALPN token for [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"fazt/1";
