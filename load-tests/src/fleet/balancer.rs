//! haproxy in front of the drills' instances ([`Haproxy`], stopped when its guard drops) and
//! its configuration (round robin, no stickiness), and the loopback ports the instances and
//! haproxy listen on.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context as _};

use super::procs::{die_with_parent, run_bounded, stop_child};

/// haproxy's configuration for the drill: HTTP mode on 127.0.0.1:`port`, round robin over
/// `servers` (name, address) with no stickiness, a health check on `/v2/health/ready` every
/// `check_ms`, and each answer marked with the server that gave it (`X-Served-By`). With
/// `streams`, WebSocket tunnels may last 120 s, and a request that a stopping server refuses
/// or closes unanswered (its listener paused while it drains) is retried on another server
/// (`retry-on`, `option redispatch`).
pub fn haproxy_config(
    port: u16,
    servers: &[(String, String)],
    check_ms: u64,
    streams: bool,
) -> String {
    let (tunnel, redispatch) = if streams {
        (
            "    timeout tunnel 120s\n",
            "    option redispatch\n    retry-on conn-failure empty-response response-timeout\n",
        )
    } else {
        ("", "")
    };
    let mut cfg = format!(
        "# Written by `loadgen`: round robin over the fleet, no stickiness.\n\
         global\n    maxconn 1024\n\n\
         defaults\n    mode http\n    timeout connect 2s\n    timeout client 30s\n    timeout server 30s\n    \
         timeout http-keep-alive 10s\n{tunnel}    retries 2\n{redispatch}\n\
         frontend drill\n    bind 127.0.0.1:{port}\n    default_backend fleet\n\n\
         backend fleet\n    balance roundrobin\n    option httpchk GET /v2/health/ready\n    \
         http-check expect status 200\n    default-server check inter {check_ms}ms fall 2 rise 1\n    \
         http-response set-header X-Served-By %[srv_name]\n"
    );
    for (name, addr) in servers {
        cfg.push_str(&format!("    server {name} {addr}\n"));
    }
    cfg
}

/// haproxy in the foreground (`haproxy -f CFG -db`), killed when dropped.
pub struct Haproxy {
    child: Child,
    pub version: String,
    pub url: String,
    pub log: PathBuf,
}

impl Haproxy {
    /// haproxy's version line, or how to install it.
    pub fn version() -> anyhow::Result<String> {
        let mut cmd = Command::new("haproxy");
        cmd.arg("-v");
        match run_bounded(cmd, "haproxy -v", Duration::from_secs(10)) {
            Ok(ran) if ran.ok => Ok(ran.stdout.lines().next().unwrap_or("").trim().to_string()),
            _ => bail!(
                "haproxy is not installed (the drill puts Debian's haproxy in front of the fleet): \
                 run `bash scripts/setup.sh --fleet` (apt-get install haproxy, and moto into .venv)"
            ),
        }
    }

    /// Checks `config` (`haproxy -c`), then starts haproxy on it; its output goes to `log`.
    pub fn start(config: &Path, port: u16, log: PathBuf) -> anyhow::Result<Haproxy> {
        let version = Haproxy::version()?;
        let mut check = Command::new("haproxy");
        check.arg("-c").arg("-f").arg(config);
        let ran = run_bounded(check, "haproxy -c", Duration::from_secs(10))?;
        if !ran.ok {
            bail!(
                "haproxy refuses {}:\n{}{}",
                config.display(),
                ran.stdout,
                ran.stderr
            );
        }
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-f")
            .arg(config)
            .arg("-db")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        die_with_parent(&mut cmd);
        let child = cmd.spawn().context("cannot start haproxy")?;
        Ok(Haproxy {
            child,
            version,
            url: format!("http://127.0.0.1:{port}"),
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; its server binds it moments later).
pub fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `n` free TCP ports on 127.0.0.1 below the kernel's ephemeral range
/// (`ip_local_port_range`), so that no outgoing connection takes one while its server is
/// restarted: an instance comes back on the same address. Each was free when asked.
pub fn fixed_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = ephemeral.saturating_sub(8000).max(1024);
    let span = ephemeral.saturating_sub(low).max(1);
    let first = low + (std::process::id() % u32::from(span)) as u16;
    let mut ports = Vec::new();
    for i in 0..span {
        let port = low + (first - low + i) % span;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            ports.push(port);
            if ports.len() == n {
                return Ok(ports);
            }
        }
    }
    // No range below the ephemeral one: any free port.
    while ports.len() < n {
        ports.push(free_port()?);
    }
    Ok(ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_haproxy_config_balances_without_stickiness_and_marks_answers() {
        let servers = vec![
            ("fleet-0".to_string(), "127.0.0.1:1001".to_string()),
            ("fleet-1".to_string(), "127.0.0.1:1002".to_string()),
        ];
        let cfg = haproxy_config(8080, &servers, 500, false);
        assert!(cfg.contains("bind 127.0.0.1:8080"));
        assert!(cfg.contains("balance roundrobin"));
        assert!(cfg.contains("option httpchk GET /v2/health/ready"));
        assert!(cfg.contains("http-response set-header X-Served-By %[srv_name]"));
        assert!(cfg.contains("server fleet-1 127.0.0.1:1002"));
        assert!(!cfg.contains("tunnel"));
        let streams = haproxy_config(8080, &servers, 200, true);
        assert!(streams.contains("timeout tunnel 120s"));
        assert!(streams.contains("option redispatch"));
        assert!(streams.contains("retry-on conn-failure empty-response"));
        let settings: Vec<&str> = cfg.lines().filter(|l| !l.starts_with('#')).collect();
        assert!(
            settings.iter().all(|l| !l.contains("cookie")
                && !l.contains("stick")
                && !l.contains("balance source")),
            "{cfg}"
        );
    }

    #[test]
    fn fixed_ports_are_free_and_distinct() {
        let ports = fixed_ports(3).unwrap();
        assert_eq!(ports.len(), 3);
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "{ports:?}");
        for port in ports {
            std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        }
    }
}
