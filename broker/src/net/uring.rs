//! The io_uring path: tokio-uring sockets on a ring thread.

use std::io;
use std::rc::Rc;

use bytes::BytesMut;
use tokio_uring::buf::BoundedBuf;

use super::seam::{NetRead, NetWrite, Transport, MIN_SPARE};

/// A socket on an io_uring thread; both halves share it (tokio-uring's
/// operations take `&self`, and its tasks stay on their thread).
pub(crate) struct UringStream(pub tokio_uring::net::TcpStream);

/// The least a read on an empty buffer reserves. Such a read is sized by
/// the one before it (see `read_some`): an idle connection, whose last read
/// was a ping, has this much waiting in the kernel, not `want`.
const MIN_READ: usize = 64;

/// What a read on an empty buffer reserves after a read of `last` bytes:
/// twice that (a power of two), so that a connection that fills its buffer
/// is soon back to full-sized reads, at least `MIN_READ`, at most `want`.
fn empty_read_size(last: usize, want: usize) -> usize {
    (last * 2).next_power_of_two().clamp(MIN_READ, want)
}

pub(crate) struct UringRead {
    stream: Rc<tokio_uring::net::TcpStream>,
    /// Bytes the last read returned.
    last: usize,
}

pub(crate) struct UringWrite(Rc<tokio_uring::net::TcpStream>);

impl Transport for UringStream {
    type Rd = UringRead;
    type Wr = UringWrite;

    fn split(self) -> (UringRead, UringWrite) {
        let _ = self.0.set_nodelay(true);
        let s = Rc::new(self.0);
        (
            UringRead {
                stream: s.clone(),
                last: 0,
            },
            UringWrite(s),
        )
    }
}

impl NetRead for UringRead {
    async fn read_some(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        // The buffer goes to the kernel with the read, so its size is what a
        // waiting connection costs: an empty one is replaced, by a small one
        // after a short read.
        if buf.is_empty() {
            *buf = BytesMut::new();
        }
        if buf.capacity() - buf.len() < MIN_SPARE {
            buf.reserve(if buf.is_empty() {
                empty_read_size(self.last, want)
            } else {
                want
            });
        }
        let owned = std::mem::take(buf);
        let (len, cap) = (owned.len(), owned.capacity());
        // Read into the spare room only: the slice starts after the bytes
        // already held, and completing it extends the buffer's length.
        let (r, slice) = self.stream.read(owned.slice(len..cap)).await;
        *buf = slice.into_inner();
        let n = r?;
        self.last = n;
        Ok(n)
    }
}

impl Drop for UringRead {
    fn drop(&mut self) {
        // tokio-uring does not cancel an operation whose future is dropped
        // (a timed-out read stays in the ring, holding the socket open):
        // shutting the socket down completes any such read, so the
        // descriptor is released when the last half goes.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

impl NetWrite for UringWrite {
    async fn write_all(&mut self, buf: BytesMut) -> io::Result<()> {
        self.0.write_all(buf).await.0
    }

    async fn shutdown(&mut self) {
        let _ = self.0.shutdown(std::net::Shutdown::Write);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_buffers_read_is_sized_by_the_last_read() {
        let want = 8192;
        assert_eq!(empty_read_size(0, want), 64, "the first read: a Hello");
        assert_eq!(empty_read_size(18, want), 64, "after a ping: idle");
        assert_eq!(empty_read_size(120, want), 256, "after one send");
        assert_eq!(empty_read_size(3000, want), want, "busy: full-sized");
        assert_eq!(empty_read_size(64 << 10, want), want);
    }
}
