//! The epoll path: tokio's reactor, a socket split into owned halves.

use std::io;

use bytes::BytesMut;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use super::seam::{NetRead, NetWrite, Transport, MIN_SPARE};

impl Transport for tokio::net::TcpStream {
    type Rd = OwnedReadHalf;
    type Wr = OwnedWriteHalf;

    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        let _ = self.set_nodelay(true);
        self.into_split()
    }
}

impl NetRead for OwnedReadHalf {
    async fn read_some(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        loop {
            // Readiness first, then the buffer. Readiness may be stale (the
            // last read took everything), so this is checked before every
            // wait, not only the first.
            if buf.is_empty() {
                *buf = BytesMut::new();
            }
            self.readable().await?;
            if buf.capacity() - buf.len() < MIN_SPARE {
                buf.reserve(want);
            }
            match self.try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => return r,
            }
        }
    }
}

impl NetWrite for OwnedWriteHalf {
    async fn write_all(&mut self, buf: BytesMut) -> io::Result<()> {
        tokio::io::AsyncWriteExt::write_all(self, &buf).await
    }

    async fn shutdown(&mut self) {
        let _ = tokio::io::AsyncWriteExt::shutdown(self).await;
    }
}
