//! Frames on a peer stream: a `u32` little-endian length and a message (docs/sync-protocol.md,
//! "Messages"). Read and written here for the join protocol and replication sessions alike.

use anyhow::{Context, Result};
use fazt_proto::wire::{self, Message};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Reads one frame; None when the stream ends cleanly.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<(Message, usize)>> {
    read_message_within(r, wire::MAX_FRAME).await
}

/// Reads one frame whose header may claim at most `max` bytes. The buffer grows with the
/// bytes that actually arrive (never to the claimed length up front), so a header that
/// claims much and a sender that then stalls cost nothing.
pub async fn read_message_within<R: AsyncRead + Unpin>(
    r: &mut R,
    max: usize,
) -> Result<Option<(Message, usize)>> {
    let mut header = [0u8; 4];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e).context("reading from the peer"),
    }
    let len = wire::frame_len(header)?;
    if len > max {
        anyhow::bail!(
            "the peer announced a {len}-byte message where at most {max} bytes are accepted"
        );
    }
    let mut payload = Vec::new();
    let read = (&mut *r)
        .take(len as u64)
        .read_to_end(&mut payload)
        .await
        .context("reading from the peer")?;
    if read != len {
        anyhow::bail!(
            "the peer closed the stream in the middle of a message ({read} of {len} bytes)"
        );
    }
    Ok(Some((
        Message::decode(&payload).context("the peer sent a malformed message")?,
        len + 4,
    )))
}

/// Writes one frame.
pub async fn write_message<W: AsyncWrite + Unpin>(w: &mut W, msg: &Message) -> Result<()> {
    w.write_all(&msg.encode())
        .await
        .context("writing to the peer")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use fazt_proto::wire::Heads;
    use fazt_proto::Digest;

    #[tokio::test]
    async fn a_frame_is_bounded_by_its_limit_and_by_the_bytes_that_arrive() {
        let whole = Message::Refuse("no".into()).encode();
        let mut r = &whole[..];
        assert!(read_message_within(&mut r, 64).await.unwrap().is_some());
        let mut r = &whole[..];
        let err = read_message_within(&mut r, 2)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 2 bytes"), "{err}");
        // A header claiming the largest frame, then five bytes and the end of the stream.
        let mut claim = (wire::MAX_FRAME as u32).to_le_bytes().to_vec();
        claim.extend_from_slice(b"12345");
        let mut r = &claim[..];
        let err = read_message(&mut r).await.unwrap_err().to_string();
        assert!(
            err.contains(&format!("5 of {} bytes", wire::MAX_FRAME)),
            "{err}"
        );
    }

    #[tokio::test]
    async fn frames_read_back_in_order_and_a_clean_end_is_none() {
        let msgs = vec![
            Message::Want(vec![
                Digest::from_bytes([7; 32]),
                Digest::from_bytes([8; 32]),
            ]),
            Message::Refuse("bye".into()),
            Message::Applied {
                groups: 3,
                heads: Heads(vec![([1; 16], vec![(1, 2)])]),
            },
        ];
        let mut bytes = Vec::new();
        for m in &msgs {
            write_message(&mut bytes, m).await.unwrap();
        }
        let mut r = &bytes[..];
        for m in &msgs {
            let (got, size) = read_message(&mut r).await.unwrap().unwrap();
            assert_eq!(&got, m);
            assert_eq!(size, m.encode().len());
        }
        assert!(read_message(&mut r).await.unwrap().is_none());
        // A stream cut inside a header reads as the end of the stream (no frame was started).
        let mut r = &bytes[..2];
        assert!(read_message(&mut r).await.unwrap().is_none());
        // A zero length and an unknown tag are refused.
        let mut r = &[0u8, 0, 0, 0][..];
        assert!(read_message(&mut r).await.is_err());
        let mut r = &[1u8, 0, 0, 0, 0xee][..];
        let err = read_message(&mut r).await.unwrap_err();
        assert!(format!("{err:#}").contains("malformed message"), "{err:#}");
    }
}
