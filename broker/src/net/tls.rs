//! TLS over either network path: a sans-IO `rustls::ServerConnection`
//! driven through the seam's halves, so epoll and io_uring serve TLS with
//! the same code.
//!
//! [`accept`] runs the handshake over the whole socket, then the
//! connection is split like a plain one. Both halves share the
//! `ServerConnection` behind a mutex that is never held across an await:
//! the reader decrypts what it reads, the writer encrypts what it writes
//! and is the only one that sends ciphertext, so records leave in the
//! order the connection produced them (a record the reader's side causes,
//! such as a key update's answer, goes out with the writer's next write).

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};

use bytes::{BufMut, BytesMut};
use rustls::{ServerConfig, ServerConnection};

use super::seam::{NetRead, NetWrite, Transport, MIN_SPARE};

/// Ciphertext read per step: one TLS record and its overhead.
const CIPHER_READ: usize = 16 * 1024 + 256;

type Shared = Arc<Mutex<ServerConnection>>;

/// A socket after a completed TLS handshake, ready to split.
pub(crate) struct TlsStream<T: Transport> {
    rd: TlsRead<T::Rd>,
    wr: TlsWrite<T::Wr>,
}

pub(crate) struct TlsRead<R> {
    inner: R,
    conn: Shared,
    /// Ciphertext read and not yet handed to rustls (empty between reads).
    cipher: BytesMut,
    /// The peer closed the socket.
    eof: bool,
}

pub(crate) struct TlsWrite<W> {
    pub(crate) inner: W,
    conn: Shared,
}

impl<T: Transport> Transport for TlsStream<T> {
    type Rd = TlsRead<T::Rd>;
    type Wr = TlsWrite<T::Wr>;

    fn split(self) -> (Self::Rd, Self::Wr) {
        (self.rd, self.wr)
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

/// Everything rustls has to send, encrypted, in one buffer for one write.
fn pending_tls(conn: &mut ServerConnection, room: usize) -> io::Result<BytesMut> {
    let mut out = BytesMut::with_capacity(room).writer();
    while conn.wants_write() {
        conn.write_tls(&mut out)?;
    }
    Ok(out.into_inner())
}

/// Hands `cipher` to rustls and decrypts it (what does not fit in rustls's
/// buffer in one go is fed in further steps).
fn absorb(conn: &mut ServerConnection, cipher: &[u8]) -> Result<(), rustls::Error> {
    let mut rest = cipher;
    while !rest.is_empty() {
        // Reading from a slice cannot fail.
        let _ = conn.read_tls(&mut rest);
        conn.process_new_packets()?;
    }
    Ok(())
}

/// The TLS handshake over `stream`, as the server with `config`. Fails on a
/// peer that closes, speaks something else, or offers nothing `config`
/// accepts (its alert is sent first).
pub(crate) async fn accept<T: Transport>(
    stream: T,
    config: Arc<ServerConfig>,
) -> io::Result<TlsStream<T>> {
    let (mut rd, mut wr) = stream.split();
    let mut conn = ServerConnection::new(config).map_err(tls_error)?;
    // Frames are bounded by the session; rustls need not bound them again.
    conn.set_buffer_limit(None);
    let mut cipher = BytesMut::new();
    while conn.is_handshaking() {
        if conn.wants_write() {
            wr.write_all(pending_tls(&mut conn, 0)?).await?;
            continue;
        }
        if rd.read_some(&mut cipher, CIPHER_READ).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the TLS handshake",
            ));
        }
        let absorbed = absorb(&mut conn, &cipher);
        cipher = BytesMut::new();
        if let Err(e) = absorbed {
            let alert = pending_tls(&mut conn, 0)?;
            let _ = wr.write_all(alert).await;
            return Err(tls_error(e));
        }
    }
    // Session tickets and the like.
    if conn.wants_write() {
        wr.write_all(pending_tls(&mut conn, 0)?).await?;
    }
    let conn = Arc::new(Mutex::new(conn));
    Ok(TlsStream {
        rd: TlsRead {
            inner: rd,
            conn: conn.clone(),
            cipher,
            eof: false,
        },
        wr: TlsWrite { inner: wr, conn },
    })
}

impl<R: NetRead> TlsRead<R> {
    /// Decrypted bytes ready now, appended to `buf`: `Some(0)` once the
    /// peer said close_notify, `None` if there are none yet.
    fn plaintext(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<Option<usize>> {
        let mut conn = self.conn.lock().expect("tls lock");
        let state = conn.process_new_packets().map_err(tls_error)?;
        let ready = state.plaintext_bytes_to_read();
        if ready == 0 {
            return Ok(state.peer_has_closed().then_some(0));
        }
        if buf.capacity() - buf.len() < MIN_SPARE {
            buf.reserve(want.max(ready));
        }
        let start = buf.len();
        let room = (buf.capacity() - start).min(ready);
        buf.resize(start + room, 0);
        let n = conn.reader().read(&mut buf[start..])?;
        buf.truncate(start + n);
        Ok(Some(n))
    }
}

impl<R: NetRead> NetRead for TlsRead<R> {
    async fn read_some(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize> {
        loop {
            if let Some(n) = self.plaintext(buf, want)? {
                return Ok(n);
            }
            if self.eof {
                return Ok(0);
            }
            if self.inner.read_some(&mut self.cipher, CIPHER_READ).await? == 0 {
                self.eof = true;
                continue;
            }
            let absorbed = {
                let mut conn = self.conn.lock().expect("tls lock");
                absorb(&mut conn, &self.cipher)
            };
            // Not held while waiting: a quiet connection keeps no buffer.
            self.cipher = BytesMut::new();
            absorbed.map_err(tls_error)?;
        }
    }
}

impl<W: NetWrite> NetWrite for TlsWrite<W> {
    async fn write_all(&mut self, buf: BytesMut) -> io::Result<()> {
        let out = {
            let mut conn = self.conn.lock().expect("tls lock");
            conn.writer().write_all(&buf)?;
            // Room for the records' headers and tags (22 bytes per record
            // of at most 16 KiB).
            pending_tls(&mut conn, buf.len() + 64 + buf.len() / 512)?
        };
        drop(buf);
        self.inner.write_all(out).await
    }

    async fn shutdown(&mut self) {
        let out = {
            let mut conn = self.conn.lock().expect("tls lock");
            conn.send_close_notify();
            pending_tls(&mut conn, 64)
        };
        if let Ok(out) = out {
            let _ = self.inner.write_all(out).await;
        }
        self.inner.shutdown().await;
    }
}
