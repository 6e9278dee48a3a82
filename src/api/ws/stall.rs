//! A stream connection whose client stops taking its bytes is dropped by the kernel.
//!
//! actix-http writes a response (here, the WebSocket's frames) as fast as the socket takes
//! it, and when the socket takes nothing more it waits, without a deadline. A client that
//! stops reading (its TCP window shut) leaves that wait pending for good: the connection's
//! writer gives up on it (write.rs) and lets go of the connection, but actix-http still holds
//! the socket, with frames to flush, and nothing above it can make it let go. So, at the
//! upgrade, the stream's socket gets `TCP_USER_TIMEOUT`: once the data it sent has gone
//! unacknowledged, or the client's window has stayed shut, for [`STALLED_FOR`], the kernel ends
//! the connection (Linux 5.11 and later count a shut window; older kernels only data lost on
//! the way). actix-http's wait then fails and the socket is closed. While the client's own
//! data still comes in, the kernel counts the window as alive; it stops coming once the
//! server stops reading (the session cut the client loose, or the writer gave up on it).

use std::time::Duration;

use actix_web::HttpRequest;

use crate::api::door::arrival::ConnectionSocket;

/// How long a stream's socket may go without its client taking any data before the kernel
/// ends the connection: past the writer's own timeout (10 s), so that the writer gives up
/// first (and counts a client not reading).
pub const STALLED_FOR: Duration = Duration::from_secs(15);

/// Gives the socket of `req`'s connection [`STALLED_FOR`] as its `TCP_USER_TIMEOUT`. For the
/// upgrade's handler: while it runs, its connection is open (actix-http drops a handler with
/// its connection), so the descriptor kept is the connection's own. Whether it could (no
/// socket, as over TLS or off Linux: `false`).
pub fn drop_when_stalled(req: &HttpRequest) -> bool {
    connection_fd(req).is_some_and(|fd| set_user_timeout(fd, STALLED_FOR))
}

/// The descriptor of `req`'s connection, as `on_connect` kept it.
fn connection_fd(req: &HttpRequest) -> Option<i32> {
    req.conn_data::<ConnectionSocket>()
        .map(ConnectionSocket::fd)
}

#[cfg(target_os = "linux")]
fn set_user_timeout(fd: i32, timeout: Duration) -> bool {
    let ms = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: a plain integer option on a descriptor the caller holds open; a descriptor
    // that is not a TCP socket fails the call, nothing more.
    let status = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    status == 0
}

#[cfg(not(target_os = "linux"))]
fn set_user_timeout(_fd: i32, _timeout: Duration) -> bool {
    false
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[tokio::test]
    async fn a_connections_socket_gets_the_user_timeout() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = actix_web::rt::net::TcpStream::from_std(server).unwrap();
        let mut data = actix_web::dev::Extensions::new();
        crate::api::door::arrival::on_connect(&server, &mut data);
        let fd = data.get::<ConnectionSocket>().map(ConnectionSocket::fd);
        assert_eq!(fd, Some(server.as_raw_fd()));

        assert!(set_user_timeout(server.as_raw_fd(), STALLED_FOR));
        let mut ms: libc::c_uint = 0;
        let mut len = std::mem::size_of::<libc::c_uint>() as libc::socklen_t;
        // SAFETY: reads an integer option into `ms`, `len` bytes at most.
        let status = unsafe {
            libc::getsockopt(
                server.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_USER_TIMEOUT,
                (&mut ms as *mut libc::c_uint).cast(),
                &mut len,
            )
        };
        assert_eq!((status, ms), (0, 15_000));
    }
}
