//! The listeners' ports, bound before the server loads anything (ONNX Runtime, the models,
//! the registry's versions): a port in use stops the start at once, naming the address and
//! the setting that chose it, instead of after minutes of loading with the models' memory
//! spent. `server.rs` builds the HTTP, stream and gRPC servers on these sockets.

use std::net::{SocketAddr, TcpListener, ToSocketAddrs};

use crate::config::Config;

/// The listeners' sockets, bound before anything slow starts. Nothing accepts on them until
/// the server is built on them: a connection made meanwhile waits in the listen backlog and
/// is answered once the models are in (so readiness is never true before).
pub(super) struct Sockets {
    pub http: Vec<TcpListener>,
    /// `--stream-port`'s; `None` without one.
    pub streams: Option<Vec<TcpListener>>,
    /// gRPC's; `None` when gRPC is off. Its one socket is the first address that bound.
    pub grpc: Option<TcpListener>,
}

/// A listener's port that cannot be bound, named with the setting that chose it.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {host}:{port} ({what}): {error}")]
pub struct BindError {
    host: String,
    port: u16,
    what: &'static str,
    error: std::io::Error,
}

/// The listen backlog actix's own `bind` gives a socket (std's is smaller): connections past
/// `--max-connections`, and those made while the models load, wait in it.
const BACKLOG: i32 = 1024;

impl Sockets {
    pub fn bind(config: &Config) -> Result<Sockets, BindError> {
        let host = config.host.as_str();
        let http = bind_all(host, config.port, "HTTP, --port")?;
        let streams = match config.stream_port {
            Some(port) => Some(bind_all(host, port, "speech streams, --stream-port")?),
            None => None,
        };
        let grpc = match config.grpc_listen_port() {
            Some(port) => Some(bind_all(host, port, "gRPC, --grpc-port")?.remove(0)),
            None => None,
        };
        let sockets = Sockets {
            http,
            streams,
            grpc,
        };
        let first = |s: &[TcpListener]| match s.first().map(TcpListener::local_addr) {
            Some(Ok(addr)) => addr.to_string(),
            _ => "off".to_string(),
        };
        let (addr, grpc_addr, stream_addr) = (
            first(&sockets.http),
            first(sockets.grpc.as_slice()),
            first(sockets.streams.as_deref().unwrap_or_default()),
        );
        tracing::info!(%addr, %grpc_addr, %stream_addr, "ports bound; loading the models before serving them");
        Ok(sockets)
    }
}

/// Binds every address `host` resolves to on `port`, as actix's `bind` does: one that binds
/// is enough (`localhost` may resolve to an IPv6 address the host lacks).
fn bind_all(host: &str, port: u16, what: &'static str) -> Result<Vec<TcpListener>, BindError> {
    let error = |error| BindError {
        host: host.to_string(),
        port,
        what,
        error,
    };
    let (mut bound, mut last) = (Vec::new(), None);
    for addr in (host, port).to_socket_addrs().map_err(error)? {
        match listen_on(addr) {
            Ok(socket) => bound.push(socket),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) if bound.is_empty() => Err(error(e)),
        _ if bound.is_empty() => Err(error(std::io::Error::other("no address to bind"))),
        _ => Ok(bound),
    }
}

/// A listening socket on `addr`, set up as actix-server sets up its own.
fn listen_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}
