//! When a request arrived: the kernel's record of its connection, so that the time a request
//! waited in its socket while the HTTP thread was busy counts as time inside the server.
//!
//! A server short of CPU reads its sockets late. Measured from the handler's start, its
//! answers look fast while its clients wait tens of milliseconds (docs/overload.md). Linux
//! keeps, per TCP
//! connection, when data last arrived (`tcpi_last_data_recv` of `TCP_INFO`, in milliseconds);
//! for a request on a connection that has one in flight, that is when its bytes arrived. A
//! request's clock ([`arrived`]) starts then: the answer's queue time, deadlines, the latency
//! series and the door's time from arrival to answer (what fits) count it.

use std::any::Any;
use std::time::{Duration, Instant};

use actix_web::dev::Extensions;
use actix_web::HttpRequest;

/// The kernel counts `tcpi_last_data_recv` in its clock ticks (4 ms at the usual 250 Hz), so
/// a reading is up to one tick more than the time that passed: that much is taken off, so the
/// wait counted is not more than the real one (a request read within the tick counts none).
/// On a kernel built for 100 Hz a reading can still be up to 6 ms over.
const TICK: Duration = Duration::from_millis(4);

/// A connection's socket, kept in the connection's data when it opens (TCP only).
#[derive(Clone, Copy, Debug)]
pub struct ConnectionSocket(#[cfg_attr(not(target_os = "linux"), allow(dead_code))] i32);

impl ConnectionSocket {
    /// The connection's socket descriptor (for socket options on it: `ws/stall.rs`).
    pub fn fd(&self) -> i32 {
        self.0
    }
}

/// For `HttpServer::on_connect`: remembers a TCP connection's socket.
pub fn on_connect(io: &dyn Any, data: &mut Extensions) {
    #[cfg(unix)]
    if let Some(stream) = io.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsRawFd;
        data.insert(ConnectionSocket(stream.as_raw_fd()));
    }
}

/// When `req` arrived: now, less the time its bytes waited in the socket where the kernel
/// says so. To be called when the handler starts, before it awaits anything: the
/// descriptor is the connection's own only while the connection is open.
///
/// A request that arrives in several segments counts from its last one; one pipelined behind
/// another on the same connection counts from when it arrived, which may be before its
/// predecessor was answered.
///
/// A thread whose last reading, less than [`ASK_AGAIN_AFTER`] ago, found no wait counts none
/// for the requests it takes meanwhile, without asking the kernel. The event loop takes
/// requests in the order their bytes came, to within one turn of it, so such a request could
/// have read at most about a tick more than that last reading: the reading's own resolution,
/// which counting from it less one tick already gives away. A request taken out of that
/// order (a long turn of the loop) counts no wait at all. Asking is a system call per
/// request: skipping it took server CPU per 1-row request at concurrency 32 from 83-84 µs to
/// 79-82 µs in three alternating pairs (`load-tests/results/2026-12-06-arrival-probe/`). Once
/// a reading finds a wait, the thread asks for every request until one finds none.
pub fn arrived(req: &HttpRequest) -> Instant {
    let now = Instant::now();
    if LAST_NO_WAIT.with(|last| kept_up(last.get(), now)) {
        return now;
    }
    let Some(since) = req
        .conn_data::<ConnectionSocket>()
        .and_then(|socket| since_last_data(socket.0))
    else {
        return now;
    };
    let waited = since.saturating_sub(TICK);
    LAST_NO_WAIT.with(|last| last.set(waited.is_zero().then_some(now)));
    now.checked_sub(waited).unwrap_or(now)
}

/// How long a reading of no wait stands for the requests that follow on its thread.
const ASK_AGAIN_AFTER: Duration = Duration::from_millis(1);

thread_local! {
    /// When this HTTP thread's last reading found no wait (`None`: it found one, or there
    /// was none yet).
    static LAST_NO_WAIT: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
}

/// Whether a request at `now` may count no wait unasked, after a no-wait reading at `last`.
fn kept_up(last: Option<Instant>, now: Instant) -> bool {
    last.is_some_and(|at| now.saturating_duration_since(at) < ASK_AGAIN_AFTER)
}

/// How long ago data last arrived on the socket, by the kernel's clock.
#[cfg(target_os = "linux")]
fn since_last_data(fd: i32) -> Option<Duration> {
    // SAFETY: `info` is a plain C struct that the kernel fills up to `len` bytes. A
    // descriptor that was closed fails the call (or, reused, reads another socket's figure:
    // a wrong wait, nothing unsound), which is why [`arrived`] is for a handler's start,
    // while its connection is certainly open.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    let status = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    (status == 0).then(|| Duration::from_millis(u64::from(info.tcpi_last_data_recv)))
}

#[cfg(not(target_os = "linux"))]
fn since_last_data(_fd: i32) -> Option<Duration> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_kernel_says_how_long_ago_a_request_arrived() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        std::thread::sleep(Duration::from_millis(30));
        let since = since_last_data(server.as_raw_fd()).expect("TCP_INFO on a TCP socket");
        // The kernel counts whole ticks of its clock (4 or 10 ms): some of the sleep.
        assert!(since >= Duration::from_millis(10), "{since:?}");
        assert_eq!(since_last_data(-1), None, "not a socket");
    }

    #[test]
    fn a_reading_of_no_wait_stands_for_a_millisecond() {
        let at = Instant::now();
        let soon = at + Duration::from_micros(500);
        assert!(kept_up(Some(at), soon));
        assert!(!kept_up(Some(at), at + ASK_AGAIN_AFTER));
        assert!(
            !kept_up(None, soon),
            "a thread whose last reading found a wait, or that has none yet, asks"
        );
    }

    #[test]
    fn a_request_on_a_tcp_connection_finds_its_socket() {
        use actix_web::{web, App, HttpResponse, HttpServer};
        use std::io::Read;
        actix_web::rt::System::new().block_on(async {
            let server = HttpServer::new(|| {
                App::new().route(
                    "/",
                    web::get().to(|req: HttpRequest| async move {
                        let found = req.conn_data::<ConnectionSocket>().is_some();
                        HttpResponse::Ok().body(format!("found {found}"))
                    }),
                )
            })
            .on_connect(on_connect)
            .workers(1)
            .bind("127.0.0.1:0")
            .unwrap();
            let address = server.addrs()[0];
            let server = server.run();
            let handle = server.handle();
            actix_web::rt::spawn(server);
            let body = web::block(move || {
                let mut client = std::net::TcpStream::connect(address).unwrap();
                client
                    .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut response = String::new();
                client.read_to_string(&mut response).unwrap();
                response
            })
            .await
            .unwrap();
            handle.stop(false).await;
            assert!(body.ends_with("found true"), "{body}");
        });
    }
}
