//! The FastAPI + uvicorn + onnxruntime peer (`load-tests/peers/fastapi_peer.py`): a Python
//! server with streamserve's REST interface for `mlp`, as the point of comparison in
//! `loadgen bench`. [`ensure_venv`] creates `load-tests/.venv-peer/` (python3 -m venv) and
//! installs `peers/requirements.txt` there when missing; [`Peer::start`] runs uvicorn with
//! N worker processes on 127.0.0.1 and a free port, and stops it (its whole process group)
//! when dropped.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

use crate::fleet::balancer::free_port;

/// `load-tests/peers/` of the checkout this crate was built from.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// `load-tests/.venv-peer/` (git-ignored).
pub fn venv_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv-peer")
}

fn venv_python() -> PathBuf {
    venv_dir().join("bin").join("python")
}

/// Whether the peer's environment imports everything it needs.
fn venv_ready() -> bool {
    venv_python().exists()
        && Command::new(venv_python())
            .args([
                "-c",
                "import fastapi, uvicorn, onnxruntime, numpy, httptools, uvloop",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
}

/// Returns the venv's python, creating the venv and installing the requirements first when
/// they are missing (pip from the package index; bounded by pip's own timeouts).
pub fn ensure_venv() -> anyhow::Result<PathBuf> {
    if venv_ready() {
        return Ok(venv_python());
    }
    let venv = venv_dir();
    if !venv_python().exists() {
        eprintln!("[peer] creating {} (python3 -m venv)", venv.display());
        let status = Command::new("python3")
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .context("cannot run python3 -m venv")?;
        if !status.success() {
            bail!("python3 -m venv {} failed", venv.display());
        }
    }
    let requirements = peers_dir().join("requirements.txt");
    eprintln!("[peer] pip install -r {}", requirements.display());
    let status = Command::new(venv_python())
        .args(["-m", "pip", "install", "--quiet", "--timeout", "60", "-r"])
        .arg(&requirements)
        .status()
        .context("cannot run pip")?;
    if !status.success() || !venv_ready() {
        bail!(
            "installing {} into {} failed",
            requirements.display(),
            venv.display()
        );
    }
    Ok(venv_python())
}

/// `GET path` over HTTP/1.0; true on a 200.
fn http_get_ok(addr: SocketAddr, path: &str) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") && &head[9..12] == b"200"
}

/// A running peer; stopped (SIGTERM to its process group, then SIGKILL) when dropped.
pub struct Peer {
    pub addr: SocketAddr,
    pub workers: usize,
    child: Child,
}

impl Peer {
    /// Starts `uvicorn fastapi_peer:app --workers N` on 127.0.0.1 and a free port, serving
    /// `model_file`, and waits (at most 60 s) until it answers ready.
    pub fn start(model_file: &Path, workers: usize) -> anyhow::Result<Peer> {
        let python = ensure_venv()?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(python)
            .args(["-m", "uvicorn", "fastapi_peer:app", "--app-dir"])
            .arg(peers_dir())
            .args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--workers",
                &workers.to_string(),
                "--log-level",
                "warning",
                "--no-access-log",
            ])
            .env("PEER_MODEL", model_file)
            // One thread each for numpy/BLAS too, like the session.
            .env("OMP_NUM_THREADS", "1")
            .env("OPENBLAS_NUM_THREADS", "1")
            .stdin(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start uvicorn")?;
        let mut peer = Peer {
            addr,
            workers,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = peer.child.try_wait() {
                bail!("the peer exited at start-up ({status})");
            }
            if http_get_ok(addr, "/v2/health/ready") {
                break;
            }
            if Instant::now() >= deadline {
                bail!("the peer did not answer on {addr} within 60 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Every worker process loads its own session; give the others time to be ready too.
        std::thread::sleep(Duration::from_secs(2));
        Ok(peer)
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let group = -(self.child.id() as i32);
        // SAFETY: kill(2) on the process group this Peer started (process_group(0)).
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                // Workers may outlive the master briefly: make sure the group is gone.
                unsafe { libc::kill(group, libc::SIGKILL) };
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}
