//! The `streamserve` command: `serve` (the server), `check-models` (verify a model directory),
//! `admin` (the admin API from the shell), `keys`, `registry` (the model registry), `profile`
//! (a version's drift reference and probe) and `jobs` (batch prediction jobs). Everything
//! else lives in the library.

use clap::Parser;

use streamserve::cli::{Cli, Command};
use streamserve::config::Config;
use streamserve::manifest::{verify_sha256, Manifest};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve(*args),
        Command::CheckModels(args) => check_models(&args.models),
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
    actix_web::rt::System::new().block_on(async move {
        let (running, server) = streamserve::server::start(&config).await?;
        let server = actix_web::rt::spawn(server);
        wait_for_signal().await?;
        running.shutdown().await;
        server.await??;
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

/// SIGTERM (what fly.io and container runtimes send) or SIGINT (Ctrl-C).
async fn wait_for_signal() -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}
