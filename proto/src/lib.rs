//! fazt-proto: what crosses the wire between fazt nodes, and nothing that does I/O.
//!
//! Today it holds the node identifier (its printable form is what users copy between
//! machines) and the protocol version carried in ALPN. Wire messages, framing and the
//! change-bundle format join it as the peer protocol lands.

mod node_id;

pub use node_id::{NodeId, NodeIdError};

/// Protocol version spoken by this build, carried in ALPN so that a mismatch is refused
/// during the handshake instead of hanging later.
pub const PROTOCOL_VERSION: u32 = 1;

/// The ALPN token for [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"fazt/1";
