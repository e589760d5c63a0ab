//! The two network paths: epoll (tokio's reactor) and io_uring
//! (tokio-uring, one ring per I/O thread). Both hand the same connection
//! code (`conn.rs`) a socket through the small traits below, so the
//! session, its writer and the shards are one implementation for both.
//!
//! Buffers are owned, as io_uring needs: the kernel writes into memory it
//! holds until the operation completes, so a read takes the buffer and
//! gives it back, and a write takes the encoded frames and drops them after.
//! One write carries everything the writer gathered (many frames).

use std::io;
use std::rc::Rc;

use bytes::BytesMut;
use serde::Deserialize;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::task::JoinHandle;
use tokio_uring::buf::BoundedBuf;

use crate::conn::Writer;

/// `io` setting: which network path to run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring if the kernel allows it, otherwise epoll.
    #[default]
    Auto,
    Uring,
    Epoll,
}

/// The path a node runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPath {
    Uring,
    Epoll,
}

impl IoPath {
    pub fn name(self) -> &'static str {
        match self {
            IoPath::Uring => "uring",
            IoPath::Epoll => "epoll",
        }
    }
}

/// Picks the path for `mode`: `auto` probes io_uring and falls back to
/// epoll (with the reason), `uring` fails with the reason if the probe does.
pub fn choose(mode: IoMode) -> anyhow::Result<(IoPath, Option<String>)> {
    match mode {
        IoMode::Epoll => Ok((IoPath::Epoll, None)),
        IoMode::Auto => match probe_uring() {
            Ok(()) => Ok((IoPath::Uring, None)),
            Err(why) => Ok((IoPath::Epoll, Some(why))),
        },
        IoMode::Uring => match probe_uring() {
            Ok(()) => Ok((IoPath::Uring, None)),
            Err(why) => anyhow::bail!(
                "io = \"uring\" but io_uring is unavailable: {why}; \
                 use io = \"auto\" or \"epoll\" (--io, COURIER_IO)"
            ),
        },
    }
}

/// Asks the kernel for a small ring and closes it. A kernel without
/// io_uring answers ENOSYS; a seccomp profile that blocks it (recent
/// container runtimes' defaults do) or `kernel.io_uring_disabled` answers
/// EPERM.
pub fn probe_uring() -> Result<(), String> {
    // SAFETY: io_uring_setup only writes the params struct we own; the fd
    // it returns is closed here and never used.
    let fd = unsafe {
        let mut params = [0u8; 120]; // struct io_uring_params
        libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr())
    };
    if fd >= 0 {
        // SAFETY: a descriptor we own.
        unsafe { libc::close(fd as i32) };
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::ENOSYS) => "this kernel has no io_uring (ENOSYS)".to_owned(),
        Some(libc::EPERM) => match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
            Ok(v) if v.trim() != "0" => {
                format!("disabled by sysctl kernel.io_uring_disabled = {}", v.trim())
            }
            _ => "blocked by a seccomp profile or policy (EPERM); \
                  containers need a profile that allows io_uring_setup"
                .to_owned(),
        },
        _ => format!("io_uring_setup failed: {err}"),
    })
}

/// A connected socket, split into the reader's and the writer's halves.
pub(crate) trait Transport: Sized + 'static {
    type Rd: NetRead;
    type Wr: NetWrite;
    fn split(self) -> (Self::Rd, Self::Wr);
    /// Runs the connection's writer as its own task on this path's runtime.
    fn spawn_writer(w: Writer<Self::Wr>) -> JoinHandle<()>;
}

pub(crate) trait NetRead: 'static {
    /// Waits for bytes and appends them to `buf`, growing it by `want` when
    /// its spare room is small. An empty `buf` is not held while waiting
    /// (a quiet connection should cost no read buffer). `Ok(0)`: the peer
    /// closed. Cancelling drops
    /// what the read had not yet handed back; every caller that cancels a
    /// read closes the connection.
    async fn read_some(&mut self, buf: &mut BytesMut, want: usize) -> io::Result<usize>;
}

pub(crate) trait NetWrite: 'static {
    /// Writes all of `buf`, then drops it.
    async fn write_all(&mut self, buf: BytesMut) -> io::Result<()>;
    /// Sends FIN: the peer reads end-of-stream after what was written.
    async fn shutdown(&mut self);
}

/// Below this much spare room a read grows the buffer first.
const MIN_SPARE: usize = 4096;

// ---- epoll ----

impl Transport for tokio::net::TcpStream {
    type Rd = OwnedReadHalf;
    type Wr = OwnedWriteHalf;

    fn split(self) -> (OwnedReadHalf, OwnedWriteHalf) {
        let _ = self.set_nodelay(true);
        self.into_split()
    }

    fn spawn_writer(w: Writer<OwnedWriteHalf>) -> JoinHandle<()> {
        tokio::spawn(w.run())
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

// ---- io_uring ----

/// A socket on an io_uring thread; both halves share it (tokio-uring's
/// operations take `&self`, and its tasks stay on their thread).
pub(crate) struct UringStream(pub tokio_uring::net::TcpStream);

/// What a read on an empty buffer reserves when the peer's last read was
/// short: an idle connection's pending read holds this much, not `want`.
const QUIET_READ: usize = 1024;

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

    fn spawn_writer(w: Writer<UringWrite>) -> JoinHandle<()> {
        tokio_uring::spawn(w.run())
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
            let quiet = buf.is_empty() && self.last < QUIET_READ;
            buf.reserve(if quiet { QUIET_READ } else { want });
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
    fn epoll_needs_no_probe() {
        assert_eq!(choose(IoMode::Epoll).unwrap(), (IoPath::Epoll, None));
    }

    #[test]
    fn auto_and_forced_uring_agree_with_the_probe() {
        match probe_uring() {
            Ok(()) => {
                assert_eq!(choose(IoMode::Auto).unwrap(), (IoPath::Uring, None));
                assert_eq!(choose(IoMode::Uring).unwrap(), (IoPath::Uring, None));
            }
            Err(why) => {
                assert_eq!(choose(IoMode::Auto).unwrap(), (IoPath::Epoll, Some(why)));
                let e = choose(IoMode::Uring).unwrap_err().to_string();
                assert!(e.contains("io_uring is unavailable"), "{e}");
            }
        }
    }
}
