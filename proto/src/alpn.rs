//! Which protocol a connection speaks, chosen in the TLS handshake by ALPN, and how a node
//! tells a peer that offers none of its protocols which ones it does speak.
//!
//! Every protocol between nodes has its own token ([`JOIN`], [`SYNC`], and later more) whose
//! last part is its version. A server offers every token it speaks, then [`LEGACY`] and
//! [`NEGOTIATE`]; a client offers exactly the token it wants, then [`NEGOTIATE`]. The server
//! picks the first of its own tokens the client offers, so the negotiation token is chosen only
//! when the client wants nothing the server speaks. The server then closes the connection
//! before any data with [`close::VERSION_MISMATCH`](crate::close::VERSION_MISMATCH) and
//! [`mismatch_reason`], which lists what it speaks; the client reads the list back with
//! [`parse_mismatch`]. [`NEGOTIATE`], that close code and the reason's format never change, so
//! builds far apart still tell their users why they cannot talk.
//!
//! A client offering neither a token the server speaks nor [`NEGOTIATE`] fails the handshake
//! itself (TLS `no_application_protocol`): it learns that versions differ, not which.

/// Joining with an invitation ticket: a `Join`, answered by `Welcome` or `Refuse`. The only
/// protocol a key the node does not trust may use.
pub const JOIN: &[u8] = b"fazt/join/1";

/// Replication between trusted nodes: the session of docs/sync-protocol.md.
pub const SYNC: &[u8] = b"fazt/sync/1";

/// The protocols this build speaks, in the server's order of preference.
pub const SPOKEN: &[&[u8]] = &[JOIN, SYNC];

/// The version-negotiation token: offered last by every client and accepted by every server
/// of every build, so that a mismatch is told in words instead of a failed handshake.
pub const NEGOTIATE: &[u8] = b"fazt";

/// The single token of builds before protocols had their own (join and sync shared it). A
/// server accepts it only to give such a build the version-mismatch close.
pub const LEGACY: &[u8] = b"fazt/1";

/// How the reason of a version-mismatch close begins.
const MISMATCH_PREFIX: &str = "version mismatch: this node speaks ";

/// Most tokens [`parse_mismatch`] reads back.
const MAX_LISTED: usize = 32;

/// A token as text, for messages and logs.
pub fn name(token: &[u8]) -> String {
    String::from_utf8_lossy(token).into_owned()
}

/// `fazt/join/1, fazt/sync/1`: tokens as a list for people.
pub fn list(tokens: &[&[u8]]) -> String {
    tokens
        .iter()
        .map(|t| name(t))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The reason a node gives, with [`close::VERSION_MISMATCH`](crate::close::VERSION_MISMATCH),
/// to a peer that offered none of its protocols: "version mismatch: this node speaks
/// fazt/join/1, fazt/sync/1".
pub fn mismatch_reason(spoken: &[&[u8]]) -> String {
    format!("{MISMATCH_PREFIX}{}", list(spoken))
}

/// The protocols a [`mismatch_reason`] lists, or `None` if `reason` is not one. Only short
/// printable tokens are read (at most 32 of them), so whatever the other node sends prints
/// safely.
pub fn parse_mismatch(reason: &[u8]) -> Option<Vec<String>> {
    let text = std::str::from_utf8(reason).ok()?;
    let listed = text.strip_prefix(MISMATCH_PREFIX)?;
    let tokens: Vec<String> = listed.split(", ").map(str::to_string).collect();
    let printable = |t: &String| {
        !t.is_empty() && t.len() <= 255 && t.bytes().all(|b| b.is_ascii_graphic() && b != b',')
    };
    (tokens.len() <= MAX_LISTED && tokens.iter().all(printable)).then_some(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_message_lists_the_protocols_and_reads_back() {
        let reason = mismatch_reason(SPOKEN);
        assert_eq!(
            reason,
            "version mismatch: this node speaks fazt/join/1, fazt/sync/1"
        );
        assert_eq!(
            parse_mismatch(reason.as_bytes()),
            Some(vec!["fazt/join/1".to_string(), "fazt/sync/1".to_string()])
        );
    }

    #[test]
    fn only_a_version_message_of_printable_tokens_reads_back() {
        assert_eq!(parse_mismatch(b"no Join in time"), None);
        assert_eq!(parse_mismatch(b"version mismatch: this node speaks "), None);
        assert_eq!(
            parse_mismatch(b"version mismatch: this node speaks a, \x1b[2J"),
            None
        );
        assert_eq!(
            parse_mismatch(b"version mismatch: this node speaks a,b"),
            None
        );
        let many = mismatch_reason(&[b"x".as_slice(); 33]);
        assert_eq!(parse_mismatch(many.as_bytes()), None);
    }

    #[test]
    fn negotiation_tokens_are_not_protocols_of_their_own() {
        for token in SPOKEN {
            assert_ne!(*token, NEGOTIATE);
            assert_ne!(*token, LEGACY);
        }
    }
}
