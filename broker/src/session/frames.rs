//! Reading whole frames off a socket, and the ways a session says goodbye.

use std::time::Duration;

use bytes::{Buf, BytesMut};
use courier_protocol::codec::peek_len;
use courier_protocol::{decode, encode, Body, DecodeError, ErrorCode, Frame, Reason};

use crate::metrics::CloseReason;
use crate::net::seam::{NetRead, NetWrite, Transport};

/// How long a closing connection drains the peer's input.
const LINGER: Duration = Duration::from_secs(1);

pub(crate) enum ReadError {
    Closed,
    Io(std::io::Error),
    Decode(DecodeError),
}

/// The read half of a connection and the bytes read but not yet decoded.
pub(crate) struct FrameReader<R> {
    pub(crate) rd: R,
    pub(crate) buf: BytesMut,
    max_frame_len: u32,
}

impl<R: NetRead> FrameReader<R> {
    pub(crate) fn new(rd: R, max_frame_len: u32) -> FrameReader<R> {
        FrameReader {
            rd,
            buf: BytesMut::new(),
            max_frame_len,
        }
    }

    /// Next whole frame. Cancelling it may drop a partial frame (see
    /// `NetRead::read_some`); callers that cancel close the connection.
    pub(crate) async fn next_frame(&mut self) -> Result<Frame, ReadError> {
        loop {
            match decode(&self.buf, self.max_frame_len) {
                Ok(Some((frame, used))) => {
                    self.buf.advance(used);
                    return Ok(frame);
                }
                Ok(None) => {}
                Err(e) => return Err(ReadError::Decode(e)),
            }
            // Grow in steps, never by the peer's claimed length alone.
            let want = peek_len(&self.buf)
                .map(|l| (l as usize + 4).saturating_sub(self.buf.len()))
                .unwrap_or(0)
                .clamp(8192, 64 << 10);
            match self.rd.read_some(&mut self.buf, want).await {
                Ok(0) => return Err(ReadError::Closed),
                Ok(_) => {}
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Says goodbye, then reads and discards what the peer still sends until
    /// it closes (at most `LINGER`): closing a socket with unread input makes
    /// the kernel reset the connection, which can destroy the goodbye in
    /// flight. Returns the close reason the code stands for.
    pub(crate) async fn bye(
        &mut self,
        wr: &mut impl NetWrite,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> CloseReason {
        let reason = self.bye_at_once(wr, code, message).await;
        linger(&mut self.rd).await;
        reason
    }

    /// Says goodbye and closes without lingering: for a peer that has sent
    /// nothing (a waiting handshake closed to make room), whose slot must
    /// come free now rather than after `LINGER`.
    pub(crate) async fn bye_at_once(
        &mut self,
        wr: &mut impl NetWrite,
        code: ErrorCode,
        message: impl Into<String>,
    ) -> CloseReason {
        goodbye(wr, code, message).await;
        CloseReason::of_code(code)
    }
}

/// `frame` encoded into a buffer of its own, for a write that takes it.
pub(crate) fn encoded(frame: &Frame) -> BytesMut {
    let mut out = BytesMut::new();
    encode(frame, &mut out);
    out
}

async fn goodbye(wr: &mut impl NetWrite, code: ErrorCode, message: impl Into<String>) {
    let frame = Frame::new(0, Body::Goodbye(Reason::new(code, message)));
    let _ = wr.write_all(encoded(&frame)).await;
    wr.shutdown().await;
}

/// Reads and drops the peer's input until it closes, at most `LINGER`.
pub(crate) async fn linger(rd: &mut impl NetRead) {
    // On the heap, not in the future: every connection's task would carry
    // these bytes for its whole life otherwise.
    let mut scratch = BytesMut::new();
    let _ = tokio::time::timeout(LINGER, async {
        while let Ok(n) = rd.read_some(&mut scratch, 4096).await {
            if n == 0 {
                break;
            }
            scratch.clear();
        }
    })
    .await;
}

/// Refuses a connection the node has no room for.
pub(crate) async fn refuse(stream: impl Transport, code: ErrorCode, message: &str) {
    let (mut rd, mut wr) = stream.split();
    goodbye(&mut wr, code, message).await;
    linger(&mut rd).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use courier_protocol::encode_to_bytes;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn a_waiting_epoll_reader_holds_no_buffer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut peer = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (node, _) = listener.accept().await.unwrap();
        let (rd, _wr) = node.into_split();
        let mut reader = FrameReader::new(rd, 1 << 20);
        let ping = |nonce| encode_to_bytes(&Frame::new(1, Body::Ping { nonce }));
        peer.write_all(&ping(1)).await.unwrap();
        assert!(matches!(
            reader.next_frame().await.ok().map(|f| f.body),
            Some(Body::Ping { nonce: 1 })
        ));
        // Nothing more comes. The read that took the frame left the
        // socket's readiness set, so the next wait starts with a read that
        // finds nothing: the reader must give its buffer back before it
        // waits again, or every quiet connection keeps 8 KiB.
        let waited = tokio::time::timeout(Duration::from_millis(100), reader.next_frame()).await;
        assert!(waited.is_err(), "nothing was sent");
        assert_eq!(reader.buf.capacity(), 0, "a waiting reader holds a buffer");
        // And the next frame is read as usual.
        peer.write_all(&ping(2)).await.unwrap();
        assert!(matches!(
            reader.next_frame().await.ok().map(|f| f.body),
            Some(Body::Ping { nonce: 2 })
        ));
    }
}
