//! gRPC connections as `/metrics` sees them: each accepted socket is wrapped so that it counts
//! the bytes it reads and writes (`streamserve_received_bytes_total` and
//! `streamserve_sent_bytes_total`, `protocol="grpc"`: HTTP/2 frames, headers included, TLS
//! records when TLS is on) and holds an open-connection count until tonic drops it. A tower
//! layer sees calls, not connections, and tonic's bodies can only be wrapped through
//! `http-body`, which this crate does not depend on; the socket is where both are seen.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::machine::traffic::{self, ConnectionGuard, Protocol};

/// An accepted gRPC connection that counts its bytes, and itself while open.
pub struct Counted {
    inner: TcpStream,
    _open: ConnectionGuard,
}

impl Counted {
    pub fn new(inner: TcpStream) -> Counted {
        Counted {
            inner,
            _open: ConnectionGuard::new(Protocol::Grpc),
        }
    }
}

impl Connected for Counted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            traffic::received(Protocol::Grpc, buf.filled().len() - before);
        }
        polled
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            traffic::sent(Protocol::Grpc, n);
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            traffic::sent(Protocol::Grpc, n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
