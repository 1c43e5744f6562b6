//! The byte stream under a connection: a TCP or Unix socket this crate opened, a
//! stream the caller supplied, or TLS over either.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};

/// A stream a caller can run a connection over ([`super::Connection::connect_over`]):
/// anything that reads and writes bytes asynchronously, such as a `TcpStream`, a
/// `UnixStream`, one end of `tokio::io::duplex`, or a tunnel.
///
/// It is implemented for every type that qualifies; there is nothing to implement.
///
/// ```
/// fn accepts(_: impl pgwire_repl::AsyncStream) {}
/// let (ours, _theirs) = tokio::io::duplex(64 * 1024);
/// accepts(ours);
/// ```
pub trait AsyncStream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncStream for T {}

/// A caller's stream, made `Sync` by never being shared.
///
/// [`super::Connection`] is `Sync` (it is held across `.await` in futures that must be
/// `Send`), but a caller's stream need only be `Send`. Nothing here hands out a shared
/// reference to the stream: it is only reached through `&mut self` or `Pin<&mut Self>`,
/// so two threads can never touch it at once (the reasoning of the `sync_wrapper`
/// crate and of `std::sync::Exclusive`).
pub(super) struct Exclusive(Box<dyn AsyncStream>);

// SAFETY: `Exclusive` gives no access to its content through `&Exclusive`: every
// method takes `&mut self` or `Pin<&mut Self>`. A shared reference is therefore useless
// to another thread, and exclusive access is already serialized by the borrow checker.
unsafe impl Sync for Exclusive {}

impl Exclusive {
    pub(super) fn new(stream: impl AsyncStream) -> Exclusive {
        Exclusive(Box::new(stream))
    }

    fn get_mut(&mut self) -> Pin<&mut (dyn AsyncStream + 'static)> {
        Pin::new(self.0.as_mut())
    }
}

/// The stream under a connection.
pub(super) enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
    /// A stream the caller opened.
    Custom(Exclusive),
    /// TLS over any of the above.
    Tls(Box<tokio_rustls::client::TlsStream<Stream>>),
}

impl Stream {
    /// The TCP socket at the bottom, if any (for socket options).
    pub(super) fn tcp_fd(&self) -> Option<RawFd> {
        match self {
            Stream::Tcp(socket) => Some(socket.as_raw_fd()),
            Stream::Tls(tls) => tls.get_ref().0.tcp_fd(),
            Stream::Unix(_) | Stream::Custom(_) => None,
        }
    }

    /// The TLS session, if TLS is in use.
    pub(super) fn tls_session(&self) -> Option<&rustls::ClientConnection> {
        match self {
            Stream::Tls(tls) => Some(tls.get_ref().1),
            _ => None,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Custom(s) => s.get_mut().poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Custom(s) => s.get_mut().poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
            Stream::Custom(s) => s.get_mut().poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Custom(s) => s.get_mut().poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Whether bytes are already waiting to be read, without waiting: one read attempt
/// with a waker that does nothing. A byte read this way is consumed, so this is only
/// for checks that fail the connection when something is there.
pub(super) fn has_unread_bytes(stream: &mut Stream) -> bool {
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(
        Pin::new(stream).poll_read(&mut cx, &mut buf),
        Poll::Ready(Ok(())) if !buf.filled().is_empty()
    )
}

/// Sets one integer socket option.
pub(super) fn set_int_option(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int through a valid pointer; a bad descriptor or
    // option is reported as an error, not undefined behaviour.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
