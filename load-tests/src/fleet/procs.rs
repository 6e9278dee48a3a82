//! The processes of the fleet drill, each stopped when its guard drops (at the end, on every
//! error path, and — through `PR_SET_PDEATHSIG` — when `loadgen` itself is killed): moto's
//! S3-compatible server ([`S3`]), the `streamserve serve` instances, following the registry or
//! serving a model directory ([`Instance`]), and the bounded runs of `streamserve registry ...`
//! ([`Registry`]); haproxy in front of them is in `balancer`. Everything listens on 127.0.0.1
//! only. `loadgen streams-fleet` uses the instances and haproxy without a registry; the other
//! benches that start `streamserve serve` (efficiency, keywords-bench, pinned overload) use the
//! instances or the child helpers here (`die_with_parent`, `stop_child`, `log_tail`).

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// The checkout this crate was built from (the instances and the S3 server run there, so that
/// `.venv` is found as the tests find it).
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A fresh directory under the system temp dir, removed when dropped.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn create(tag: &str) -> anyhow::Result<TempDir> {
        let path = std::env::temp_dir().join(format!(
            "streamserve-load-{}-{tag}-{}",
            std::process::id(),
            crate::sysinfo::utc_now().1.replace(':', "")
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(TempDir { path })
    }

    /// A subdirectory, created.
    pub fn sub(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.path.join(name);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// The child dies with this thread's process (SIGKILL) even when `loadgen` is killed. Children
/// are spawned from the thread that runs the benchmark, which lives as long as they do.
pub(crate) fn die_with_parent(cmd: &mut Command) {
    // SAFETY: one system call between fork and exec, nothing allocated.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// SIGTERM to a child this process spawned, unless it has exited (and been reaped) already.
fn terminate_child(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        // SAFETY: kill(2) on a child this process spawned and has not reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    }
}

/// SIGTERM, then SIGKILL when it has not exited within `grace`; waits for it. True when it
/// had to be killed.
pub(crate) fn stop_child(child: &mut Child, grace: Duration) -> bool {
    terminate_child(child);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    true
}

/// The last `lines` lines of a child's output, written to `log`.
pub(crate) fn log_tail(log: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The environment that points the AWS client of `streamserve` at moto (it takes any keys).
pub fn s3_env(endpoint: &str) -> Vec<(String, String)> {
    vec![
        ("AWS_ENDPOINT_URL".into(), endpoint.into()),
        ("AWS_ACCESS_KEY_ID".into(), "streamserve-drill".into()),
        (
            "AWS_SECRET_ACCESS_KEY".into(),
            "streamserve-drill-secret".into(),
        ),
        ("AWS_REGION".into(), "us-east-1".into()),
    ]
}

/// `cmd` with the drill's environment: the S3 variables set, `STREAMSERVE_*` not passed on, no
/// proxy, run from the checkout.
fn prepared(mut cmd: Command, env: &[(String, String)]) -> Command {
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("STREAMSERVE_") || key_text.to_ascii_lowercase().ends_with("_proxy")
        {
            cmd.env_remove(key);
        }
    }
    cmd.current_dir(repo())
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("NO_PROXY", "*");
    cmd
}

/// moto's S3 server (`tests/support/s3_server.py` from the project's `.venv`), stopped when
/// dropped (its stdin closes, then it is killed).
pub struct S3 {
    child: Child,
    stdin: Option<ChildStdin>,
    pub endpoint: String,
}

impl S3 {
    pub fn python() -> PathBuf {
        repo().join(".venv/bin/python")
    }

    pub fn start() -> anyhow::Result<S3> {
        let python = S3::python();
        let mut cmd = Command::new(&python);
        cmd.arg(repo().join("tests/support/s3_server.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let mut child = prepared(cmd, &[])
            .spawn()
            .with_context(|| format!("cannot start {}", python.display()))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().context("no stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let mut s3 = S3 {
            child,
            stdin,
            endpoint: String::new(),
        };
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let Some(port) = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse::<u16>().ok())
        else {
            bail!(
                "moto's S3 server did not start (it said {line:?}); install it with \
                 `bash scripts/setup.sh --fleet`"
            );
        };
        s3.endpoint = format!("http://127.0.0.1:{port}");
        Ok(s3)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Creates `bucket` with an unsigned `PUT` (moto checks no signature).
    pub fn create_bucket(&self, bucket: &str) -> anyhow::Result<()> {
        let host = self.endpoint.trim_start_matches("http://");
        let mut stream = std::net::TcpStream::connect(host)
            .with_context(|| format!("cannot reach the S3 server at {host}"))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        write!(
            stream,
            "PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        let status: u16 = answer
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if !(200..300).contains(&status) {
            bail!(
                "creating bucket {bucket}: {}",
                answer.lines().next().unwrap_or("")
            );
        }
        Ok(())
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        drop(self.stdin.take());
        stop_child(&mut self.child, Duration::from_secs(3));
    }
}

/// What a bounded command printed, and how it ended.
pub struct Ran {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` to its end, at most `limit` (then it is killed and this is an error).
pub(super) fn run_bounded(mut cmd: Command, what: &str, limit: Duration) -> anyhow::Result<Ran> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    die_with_parent(&mut cmd);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let read = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let out = read(child.stdout.take().map(|p| Box::new(p) as _));
    let err = read(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(Ran {
        ok: status.success(),
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// How the drill runs `streamserve registry --registry URI ...`.
#[derive(Clone, Debug)]
pub struct Registry {
    pub bin: PathBuf,
    pub uri: String,
    pub env: Vec<(String, String)>,
}

impl Registry {
    /// `streamserve registry --registry URI ARGS...`, at most 60 s; its standard output, or an
    /// error with everything it printed.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("registry")
            .args(["--registry", &self.uri])
            .args(args);
        let what = format!("streamserve registry {}", args.join(" "));
        let ran = run_bounded(prepared(cmd, &self.env), &what, Duration::from_secs(60))?;
        if !ran.ok {
            bail!("{what} failed:\n{}{}", ran.stdout, ran.stderr);
        }
        Ok(ran.stdout)
    }

    /// `registry status --json` with the model's recent history.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        let text = self.run(&["status", "--json", "--history", "50"])?;
        serde_json::from_str(&text).context("registry status --json is not JSON")
    }
}

/// One `streamserve serve` process of the fleet; stopped when dropped. Its output goes to `log`.
pub struct Instance {
    child: Child,
    pub id: String,
    pub addr: String,
    pub log: PathBuf,
}

/// An instance that follows a registry: where, how often, and its cache directory.
pub struct Follow<'a> {
    pub registry: &'a Registry,
    pub poll_secs: f64,
    pub cache: &'a Path,
}

/// How the drill starts its instances.
pub struct InstanceSetup<'a> {
    pub bin: &'a Path,
    pub models: &'a Path,
    /// The registry to follow, if any.
    pub follow: Option<Follow<'a>>,
    /// The port to listen on (0: any free one).
    pub port: u16,
    /// More `serve` arguments.
    pub extra: &'a [String],
    /// The one CPU to run on (set between fork and exec), if any.
    pub cpu: Option<usize>,
}

impl Instance {
    /// The `serve` arguments of instance `id`.
    pub fn args(setup: &InstanceSetup<'_>, id: &str) -> Vec<String> {
        let mut args = vec!["serve".to_string()];
        // The drills' defaults, each left out where `extra` gives the flag itself.
        for (flag, value) in [
            ("--host", "127.0.0.1"),
            ("--grpc-port", "off"),
            ("--http-workers", "1"),
            ("--log-format", "json"),
            ("--log", "info,streamserve::access=warn"),
        ] {
            if !setup.extra.iter().any(|e| e == flag) {
                args.extend([flag.to_string(), value.to_string()]);
            }
        }
        args.extend(["--port".into(), setup.port.to_string()]);
        args.extend(["--models".into(), setup.models.display().to_string()]);
        if let Some(follow) = &setup.follow {
            args.extend(["--registry".into(), follow.registry.uri.clone()]);
            args.extend(["--registry-poll-secs".into(), follow.poll_secs.to_string()]);
            args.extend([
                "--registry-cache".into(),
                follow.cache.display().to_string(),
            ]);
        }
        args.extend(["--instance-id".into(), id.to_string()]);
        args.extend(setup.extra.iter().cloned());
        args
    }

    /// Instance `id`'s command line as a shell would give it (`taskset -c N` when pinned), for
    /// reports.
    pub fn command_line(setup: &InstanceSetup<'_>, id: &str) -> String {
        let taskset = setup.cpu.map(|cpu| format!("taskset -c {cpu} "));
        let args = Instance::args(setup, id).join(" ");
        format!(
            "{}{} {args}",
            taskset.unwrap_or_default(),
            setup.bin.display()
        )
    }

    /// Starts instance `id` and waits (at most 60 s) for its `streamserve listening` line.
    pub fn start(setup: &InstanceSetup<'_>, id: &str, log: PathBuf) -> anyhow::Result<Instance> {
        let mut cmd = Command::new(setup.bin);
        cmd.args(Instance::args(setup, id))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        if let Some(cpu) = setup.cpu {
            // SAFETY: the closure makes one system call and allocates nothing.
            unsafe { cmd.pre_exec(move || crate::pinning::set_affinity(0, &[cpu])) };
        }
        let env = setup
            .follow
            .as_ref()
            .map_or(&[][..], |f| &f.registry.env[..]);
        let mut child = prepared(cmd, env)
            .spawn()
            .with_context(|| format!("cannot start {}", setup.bin.display()))?;
        let file = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let (tx, rx) = mpsc::channel();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child.stderr.take().map(|p| Box::new(p) as _),
        ]
        .into_iter()
        .flatten()
        {
            let (tx, mut file) = (tx.clone(), file.try_clone()?);
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if line.contains("streamserve listening") {
                        let _ = tx.send(line.clone());
                    }
                    let _ = writeln!(file, "{line}");
                }
            });
        }
        let mut instance = Instance {
            child,
            id: id.to_string(),
            addr: String::new(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        let line = loop {
            if let Ok(line) = rx.recv_timeout(Duration::from_millis(100)) {
                break line;
            }
            if let Ok(Some(status)) = instance.child.try_wait() {
                bail!(
                    "instance {id} exited ({status}) before it listened:\n{}",
                    log_tail(&instance.log, 20)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "instance {id} did not listen within 60 s:\n{}",
                    log_tail(&instance.log, 20)
                );
            }
        };
        let json: serde_json::Value = serde_json::from_str(&line)
            .with_context(|| format!("instance {id}'s listening line is not JSON: {line}"))?;
        instance.addr = listening_addr(&json)
            .with_context(|| format!("instance {id}'s listening line has no addr: {line}"))?;
        Ok(instance)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until every one of `models` answers ready, for 30 s at most after this call.
    pub fn wait_ready(
        &self,
        models: &[&str],
        runtime: &tokio::runtime::Runtime,
    ) -> anyhow::Result<()> {
        let client = crate::sysinfo::metrics_client()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        for model in models {
            let url = format!("http://{}/v2/models/{model}/ready", self.addr);
            let ready = || {
                runtime
                    .block_on(async { client.get(&url).send().await })
                    .is_ok_and(|r| r.status().is_success())
            };
            while !ready() {
                if Instant::now() >= deadline {
                    bail!(
                        "{model} is not ready 30 s after the server started:\n{}",
                        log_tail(&self.log, 20)
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn stop(&mut self) {
        stop_child(&mut self.child, Duration::from_secs(10));
    }

    /// Sends SIGTERM (a graceful stop: drain, streams handed over) without waiting.
    pub fn terminate(&mut self) {
        terminate_child(&mut self.child);
    }

    /// Whether it has exited (then it is reaped).
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `addr` of a `streamserve listening` JSON log line (top level, or under `fields`), which
/// must be a loopback `IP:port`.
pub fn listening_addr(line: &serde_json::Value) -> Option<String> {
    let addr = line["addr"]
        .as_str()
        .or_else(|| line["fields"]["addr"].as_str())?;
    let parsed: std::net::SocketAddr = addr.parse().ok()?;
    parsed.ip().is_loopback().then(|| parsed.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listening_line_gives_a_loopback_address() {
        let line = serde_json::json!({"level": "INFO", "message": "streamserve listening", "addr": "127.0.0.1:4711"});
        assert_eq!(listening_addr(&line).as_deref(), Some("127.0.0.1:4711"));
        let nested = serde_json::json!({"fields": {"addr": "127.0.0.1:1"}});
        assert_eq!(listening_addr(&nested).as_deref(), Some("127.0.0.1:1"));
        let elsewhere = serde_json::json!({"addr": "10.0.0.1:80"});
        assert_eq!(listening_addr(&elsewhere), None);
        assert_eq!(listening_addr(&serde_json::json!({})), None);
    }

    #[test]
    fn a_bounded_command_is_killed_at_its_limit() {
        let mut cmd = Command::new("sleep");
        cmd.arg("5");
        let started = Instant::now();
        let e = run_bounded(cmd, "sleep 5", Duration::from_millis(200))
            .err()
            .expect("killed");
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        let mut echo = Command::new("echo");
        echo.arg("hi");
        let ran = run_bounded(echo, "echo", Duration::from_secs(5)).unwrap();
        assert!(ran.ok);
        assert_eq!(ran.stdout.trim(), "hi");
    }
}
