//! Invitation tickets: what `fazt peer invite` prints and `fazt peer join` takes.
//!
//! A ticket names the inviting node (its key, so the joiner pins it before sending anything),
//! where to reach it, and a one-time secret. Printed as `fazt1` followed by lower-case
//! unpadded base32 of: version byte 1, node key (32 bytes), secret (32 bytes), address (UTF-8).

use std::fmt;
use std::str::FromStr;

use data_encoding::BASE32_NOPAD;

use crate::NodeId;

const PREFIX: &str = "fazt1";
const VERSION: u8 = 1;

/// An invitation: who invites, the one-time secret that proves the holder was invited, and
/// where to reach the inviting node.
#[derive(Clone, PartialEq, Eq)]
pub struct Ticket {
    /// The inviting node.
    pub node: NodeId,
    /// The one-time secret; the inviting node keeps only its hash.
    pub secret: [u8; 32],
    /// HOST:PORT of the inviting node's sync listener.
    pub addr: String,
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The secret stays out of logs.
        f.debug_struct("Ticket")
            .field("node", &self.node)
            .field("addr", &self.addr)
            .finish()
    }
}

/// Why a text is not a ticket this build can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TicketError {
    /// It does not start with the ticket prefix.
    #[error("not a fazt ticket (it starts with `{PREFIX}`): copy the whole last line `fazt peer invite` printed")]
    Prefix,
    /// It is not base32.
    #[error("the ticket is damaged (not base32): copy the whole line again")]
    Encoding,
    /// It is too short.
    #[error("the ticket is damaged (too short): copy the whole line again")]
    Truncated,
    /// A newer format than this build reads.
    #[error("the ticket was made by a newer fazt (format {0}): upgrade fazt")]
    Version(u8),
    /// The address is not UTF-8.
    #[error("the ticket's address is not valid text")]
    Address,
}

impl fmt::Display for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut bytes = Vec::with_capacity(65 + self.addr.len());
        bytes.push(VERSION);
        bytes.extend_from_slice(self.node.as_bytes());
        bytes.extend_from_slice(&self.secret);
        bytes.extend_from_slice(self.addr.as_bytes());
        write!(
            f,
            "{PREFIX}{}",
            BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()
        )
    }
}

impl FromStr for Ticket {
    type Err = TicketError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(TicketError::Prefix)?;
        let bytes = BASE32_NOPAD
            .decode(body.to_ascii_uppercase().as_bytes())
            .map_err(|_| TicketError::Encoding)?;
        if bytes.is_empty() {
            return Err(TicketError::Truncated);
        }
        match bytes[0] {
            VERSION => {}
            0 => return Err(TicketError::Encoding),
            newer => return Err(TicketError::Version(newer)),
        }
        if bytes.len() < 66 {
            return Err(TicketError::Truncated);
        }
        let node: [u8; 32] = bytes[1..33]
            .try_into()
            .map_err(|_| TicketError::Truncated)?;
        let secret: [u8; 32] = bytes[33..65]
            .try_into()
            .map_err(|_| TicketError::Truncated)?;
        let addr = String::from_utf8(bytes[65..].to_vec()).map_err(|_| TicketError::Address)?;
        Ok(Ticket {
            node: NodeId::from_bytes(node),
            secret,
            addr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_round_trip_and_damage_is_named() {
        let t = Ticket {
            node: NodeId::from_bytes([3; 32]),
            secret: [9; 32],
            addr: "zyt.example:4698".into(),
        };
        let printed = t.to_string();
        assert!(printed.starts_with("fazt1"));
        assert_eq!(printed.parse::<Ticket>().unwrap(), t);
        assert_eq!("hello".parse::<Ticket>().unwrap_err(), TicketError::Prefix);
        assert_eq!(
            "fazt1!!!".parse::<Ticket>().unwrap_err(),
            TicketError::Encoding
        );
        assert_eq!(
            printed[..5 + 64].parse::<Ticket>().unwrap_err(),
            TicketError::Truncated
        );
        assert!(!format!("{t:?}").contains("secret"));
    }
}
