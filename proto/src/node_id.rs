use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;

/// A node's identity: its ed25519 public key (32 bytes).
///
/// Printed as lower-case unpadded base32 (52 characters), which survives copy and paste
/// through terminals, chat and DNS-like contexts without quoting.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId([u8; 32]);

/// Why a text is not a node id.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeIdError {
    /// It does not have 52 characters.
    #[error("a node id is 52 base32 characters, got {0}")]
    Length(usize),
    /// It has a character outside base32's alphabet.
    #[error("a node id uses only the letters a-z and digits 2-7")]
    Alphabet,
}

impl NodeId {
    /// The node id of an ed25519 public key.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        NodeId(bytes)
    }

    /// The ed25519 public key.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The first characters of the printable form: enough to tell nodes apart in listings.
    pub fn short(&self) -> String {
        self.to_string()[..10].to_string()
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&BASE32_NOPAD.encode(&self.0).to_ascii_lowercase())
    }
}

impl fmt::Debug for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NodeId({})", self.short())
    }
}

impl FromStr for NodeId {
    type Err = NodeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.len() != 52 {
            return Err(NodeIdError::Length(s.len()));
        }
        let upper = s.to_ascii_uppercase();
        let bytes = BASE32_NOPAD
            .decode(upper.as_bytes())
            .map_err(|_| NodeIdError::Alphabet)?;
        let bytes: [u8; 32] = bytes.try_into().map_err(|_| NodeIdError::Alphabet)?;
        Ok(NodeId(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_form_round_trips() {
        let id = NodeId::from_bytes([7u8; 32]);
        let text = id.to_string();
        assert_eq!(text.len(), 52);
        assert_eq!(text, text.to_ascii_lowercase());
        assert_eq!(text.parse::<NodeId>(), Ok(id));
        assert_eq!(text.to_ascii_uppercase().parse::<NodeId>(), Ok(id));
    }

    #[test]
    fn malformed_ids_are_refused() {
        assert_eq!("abc".parse::<NodeId>(), Err(NodeIdError::Length(3)));
        let bad = "1".repeat(52);
        assert_eq!(bad.parse::<NodeId>(), Err(NodeIdError::Alphabet));
    }
}
