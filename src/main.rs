//! The `streamserve` command: `serve` (the server), `check-models` (verify a model directory),
//! `admin` (the admin API from the shell), `keys`, `registry` (the model registry), `profile`
//! (a version's drift reference and probe) and `jobs` (batch prediction jobs). Everything
//! else lives in the library.

use clap::{CommandFactory, Parser};

use streamserve::cli::{Cli, Command};
use streamserve::config::Config;
use streamserve::manifest::{verify_sha256, Manifest};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::CheckModels(args) => args.models_dir().and_then(|dir| check_models(&dir)),
        Command::Admin(args) => streamserve::cli::run(args),
        Command::Keys(command) => streamserve::cli::keys(command),
        Command::Registry(args) => streamserve::cli::registry::run(args),
        Command::Profile(args) => streamserve::cli::profile::run(args),
        Command::Jobs(args) => streamserve::cli::jobs::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("streamserve: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn serve(args: streamserve::config::ServeArgs) -> anyhow::Result<()> {
    let config = Config::resolve(args)?;
    streamserve::telemetry::init_logging(config.log_format, &config.log);
    streamserve::config::warn_unknown_vars(&Cli::command());
    actix_web::rt::System::new().block_on(async move {
        let mut signals = Signals::new()?;
        let (running, server) = streamserve::server::start(&config).await?;
        let server = actix_web::rt::spawn(server);
        signals.next().await;
        // The drain is counted from the signal: the orchestrator's kill timeout is.
        let deadline = tokio::time::Instant::now() + running.drain_time();
        let stopping = async {
            if !running.shutdown_by(deadline).await {
                // Connections are left open: the listener's future would wait for them.
                return Ok(());
            }
            let limit = deadline + streamserve::server::STOP_MARGIN;
            match tokio::time::timeout_at(limit, server).await {
                Ok(result) => result?.map_err(anyhow::Error::from),
                Err(_) => {
                    tracing::warn!("the listener had not stopped past the drain time; exiting");
                    Ok(())
                }
            }
        };
        tokio::select! {
            result = stopping => result?,
            _ = signals.next() => {
                tracing::warn!("second signal: stopping now, without finishing the drain");
                anyhow::bail!("stopped by a second signal before the drain was over");
            }
        }
        tracing::info!("streamserve stopped");
        Ok(())
    })
}

fn check_models(dir: &std::path::Path) -> anyhow::Result<()> {
    let manifest = Manifest::load(dir)?;
    let mut bad = 0;
    for entry in &manifest.models {
        match verify_sha256(entry) {
            Ok(()) => println!(
                "ok    {}:{}  {}",
                entry.name,
                entry.version,
                entry.file.display()
            ),
            Err(reason) => {
                bad += 1;
                println!("BAD   {}:{}  {reason}", entry.name, entry.version);
            }
        }
    }
    anyhow::ensure!(bad == 0, "{bad} model file(s) do not match the manifest");
    Ok(())
}

/// SIGTERM (what fly.io and container runtimes send) and SIGINT (Ctrl-C): the first starts
/// the drain, a second ends it at once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
