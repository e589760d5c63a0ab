//! The socket seam: what the session code needs of a connected socket.

use std::io;

use bytes::BytesMut;

/// A connected socket, split into the reader's and the writer's halves.
pub(crate) trait Transport: Sized + 'static {
    type Rd: NetRead;
    type Wr: NetWrite;
    fn split(self) -> (Self::Rd, Self::Wr);
}

pub(crate) trait NetRead: 'static {
    /// Waits for bytes and appends them to `buf`, growing it by `want` when
    /// its spare room is small. An empty `buf` is not held while waiting
    /// (a quiet connection should cost no read buffer). `Ok(0)`: the peer
    /// closed. Cancelling drops what the read had not yet handed back;
    /// every caller that cancels a read closes the connection.
    async fn read_some(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize>;
}

pub(crate) trait NetWrite: 'static {
    /// Writes all of `buf`, then drops it.
    async fn write_all(&mut self, buf: BytesMut) -> io::Result<()>;
    /// Sends FIN: the peer reads end-of-stream after what was written.
    async fn shutdown(&mut self);
}

/// Below this much spare room a read grows the buffer first.
pub(crate) const MIN_SPARE: usize = 4096;
