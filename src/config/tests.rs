//! Tests of the configuration layers: precedence, defaults, errors, and that the flag list and
//! the key list stay one list.

use super::*;
use crate::cli::{Cli, Command};
use clap::CommandFactory;
use clap::Parser;

/// A fresh directory for one test's files.
fn test_dir(test: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("streamserve-config-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn resolve_file(path: &Path) -> anyhow::Result<Config> {
    Config::resolve(ServeArgs {
        config: Some(path.to_path_buf()),
        ..ServeArgs::default()
    })
}

#[test]
fn flags_win_over_file_and_file_over_defaults() {
    let dir = test_dir("layers");
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        "port = 9000\nhost = \"127.0.0.1\"\nlog_format = \"json\"\nkeep_alive_secs = 10\n",
    )
    .unwrap();
    let args = ServeArgs {
        config: Some(path.clone()),
        port: Some(9100),
        ..ServeArgs::default()
    };
    let config = Config::resolve(args).unwrap();
    assert_eq!(config.port, 9100);
    assert_eq!(config.host, "127.0.0.1");
    assert_eq!(config.log_format, LogFormat::Json);
    assert_eq!(config.models, PathBuf::from("models"));
    assert_eq!(config.keep_alive_secs, 10);
    assert_eq!(Config::default().keep_alive_secs, 75);
    // A flag set to what the file says differently, and an optional key only a flag sets.
    let config = Config::resolve(ServeArgs {
        config: Some(path.clone()),
        log_format: Some(LogFormat::Text),
        memory_budget_mb: Some(100),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(config.log_format, LogFormat::Text);
    assert_eq!(config.memory_budget_mb, Some(100));
    assert_eq!(config.port, 9000);

    std::fs::write(&path, "prot = 1\n").unwrap();
    let err = Config::resolve(ServeArgs {
        config: Some(path.clone()),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    assert!(err.to_string().contains("`prot`"), "{err}");
    assert!(
        err.to_string().contains(&path.display().to_string()),
        "{err}"
    );
}

#[test]
fn a_wrong_type_or_range_in_the_file_names_the_key_and_the_file() {
    let path = test_dir("types").join("config.toml");
    for (text, want) in [
        ("port = \"x\"\n", "invalid type"),
        ("port = 70000\n", "port = 70000"),
        ("log_format = \"xml\"\n", "unknown variant `xml`"),
        ("[host]\n", "invalid type"),
    ] {
        std::fs::write(&path, text).unwrap();
        let err = resolve_file(&path).unwrap_err().to_string();
        let key = text
            .trim_start_matches('[')
            .split([' ', ']'])
            .next()
            .unwrap();
        assert!(err.contains(want), "{text}: {err}");
        assert!(err.contains(key), "{text} names its key: {err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    let err = resolve_file(Path::new("/nonexistent/streamserve.toml")).unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot read config file /nonexistent/streamserve.toml"),
        "{err}"
    );
}

#[test]
fn defaults_are_unchanged() {
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let Config {
        host,
        port,
        models,
        log_format,
        log,
        max_body_bytes,
        http_workers,
        ort_dylib,
        stream_resume_secs,
        stream_checkpoint_ms,
        stream_token_keys,
        stream_token_key,
        stream_idle_secs,
        drain_secs,
        keep_alive_secs,
        admin_token,
        admin_token_file,
        cpu_budget,
        max_inflight,
        admission,
        admission_target_ms,
        memory_budget_mb,
        vram_budget_mb,
        body_timeout_secs,
        min_body_bytes_per_sec,
        max_connections,
        max_body_memory_mb,
        api_keys,
        api_key_secret_file,
        api_key_header,
        client_requests_per_sec,
        trusted_proxies,
        grpc_port,
        stream_port,
        stream_workers,
        grpc_max_message_bytes,
        grpc_tls_cert,
        grpc_tls_key,
        registry,
        registry_poll_secs,
        registry_cache,
        registry_wait_secs,
        instance_id,
        advertise_url,
        monitor_outputs,
        drift_reference_rows,
        drift_window_rows,
        probe_readiness,
        jobs_dir,
        jobs_retention_secs,
        jobs_keep_finished,
    } = Config::default();
    assert_eq!(jobs_dir, PathBuf::from(".streamserve-jobs"));
    assert_eq!(jobs_retention_secs, 604_800);
    assert_eq!(jobs_keep_finished, 1000);
    assert!(monitor_outputs);
    assert_eq!(drift_reference_rows, 1000);
    assert_eq!(drift_window_rows, 1000);
    assert!(!probe_readiness);
    assert_eq!(stream_checkpoint_ms, 1000);
    assert_eq!(stream_token_keys, None);
    assert_eq!(stream_token_key, None);
    assert_eq!(registry, None);
    assert_eq!(registry_poll_secs, 5.0);
    assert_eq!(registry_cache, PathBuf::from(".streamserve-cache"));
    assert_eq!(registry_wait_secs, 120);
    assert_eq!(instance_id, None);
    assert_eq!(advertise_url, None);
    assert_eq!(host, "0.0.0.0");
    assert_eq!(port, 8080);
    assert_eq!(models, PathBuf::from("models"));
    assert_eq!(log_format, LogFormat::Text);
    assert_eq!(log, "info");
    assert_eq!(max_body_bytes, 67_108_864);
    assert_eq!(http_workers, cpus);
    assert_eq!(ort_dylib, None);
    assert_eq!(stream_resume_secs, 30);
    assert_eq!(stream_idle_secs, 30);
    assert_eq!(drain_secs, 30);
    assert_eq!(keep_alive_secs, 75);
    assert_eq!(admin_token, None);
    assert_eq!(admin_token_file, None);
    assert_eq!(cpu_budget, cpus);
    assert_eq!(max_inflight, 0);
    assert_eq!(admission, Admission::Adaptive);
    assert_eq!(admission_target_ms, 5);
    assert_eq!(memory_budget_mb, None);
    assert_eq!(vram_budget_mb, 0);
    assert_eq!(body_timeout_secs, 60);
    assert_eq!(min_body_bytes_per_sec, 16_384);
    assert_eq!(max_connections, 0);
    assert_eq!(max_body_memory_mb, 512);
    assert_eq!(api_keys, None);
    assert_eq!(api_key_secret_file, None);
    assert_eq!(api_key_header, "authorization");
    assert_eq!(client_requests_per_sec, 0);
    assert_eq!(trusted_proxies, None);
    assert_eq!(grpc_port, None);
    assert_eq!((stream_port, stream_workers), (None, 1));
    assert_eq!(grpc_max_message_bytes, None);
    assert_eq!((grpc_tls_cert, grpc_tls_key), (None, None));
    assert_eq!(Config::default().grpc_listen_port(), Some(8081));
    assert_eq!(Config::default().grpc_max_message(), 67_108_864);

    // Resolving nothing gives the defaults, and an empty file too.
    let nothing = serde_json::to_value(Config::resolve(ServeArgs::default()).unwrap());
    let defaults = serde_json::to_value(Config::default());
    assert_eq!(nothing.unwrap(), *defaults.as_ref().unwrap());
    let path = test_dir("empty").join("config.toml");
    std::fs::write(&path, "").unwrap();
    let empty = serde_json::to_value(resolve_file(&path).unwrap()).unwrap();
    assert_eq!(empty, defaults.unwrap());
}

#[test]
fn lower_bounds_hold_whichever_layer_sets_the_key() {
    let path = test_dir("bounds").join("config.toml");
    std::fs::write(&path, "http_workers = 0\nbody_timeout_secs = 0\n").unwrap();
    let config = Config::resolve(ServeArgs {
        config: Some(path),
        stream_idle_secs: Some(0),
        max_body_memory_mb: Some(0),
        max_inflight: Some(0),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(config.http_workers, 1);
    assert_eq!(config.body_timeout_secs, 1);
    assert_eq!(config.stream_idle_secs, 1);
    assert_eq!(config.max_body_memory_mb, 1);
    assert_eq!(config.max_inflight, 0, "0 = no limit stays 0");
}

/// Flags and environment as the binary parses them. Setting environment variables in this
/// process would race with other tests' threads, so the test runs itself again as a child
/// process with the variables set there.
#[test]
fn environment_wins_over_file_and_flags_over_environment() {
    const CHILD: &str = "STREAMSERVE_CONFIG_TEST_FILE";
    const NAME: &str = "environment_wins_over_file_and_flags_over_environment";
    if let Some(path) = std::env::var_os(CHILD) {
        let cli = Cli::try_parse_from([
            "streamserve".as_ref(),
            "serve".as_ref(),
            "--config".as_ref(),
            path.as_os_str(),
            "--host".as_ref(),
            "10.0.0.1".as_ref(),
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        let config = Config::resolve(*args).unwrap();
        assert_eq!(config.host, "10.0.0.1", "flag over environment");
        assert_eq!(config.port, 9200, "environment over file");
        assert_eq!(config.log_format, LogFormat::Json, "environment alone");
        assert_eq!(config.keep_alive_secs, 10, "file over default");
        assert_eq!(config.drain_secs, 30, "default");
        return;
    }
    let dir = test_dir("env");
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        "port = 9000\nhost = \"127.0.0.1\"\nkeep_alive_secs = 10\n",
    )
    .unwrap();
    let module = module_path!().split_once("::").unwrap().1;
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.args([&format!("{module}::{NAME}"), "--exact", "--test-threads=1"]);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("STREAMSERVE_") {
            child.env_remove(key);
        }
    }
    let output = child
        .env(CHILD, &path)
        .env("STREAMSERVE_PORT", "9200")
        .env("STREAMSERVE_HOST", "10.9.9.9")
        .env("STREAMSERVE_LOG_FORMAT", "json")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Every flag of `serve` is a key of `Config` and the other way round, its environment
/// variable is `STREAMSERVE_<KEY>`, and the default its help names is `Config::default()`'s.
#[test]
fn flags_and_keys_are_one_list() {
    let command = Cli::command();
    let serve = command.find_subcommand("serve").unwrap();
    let serde_json::Value::Object(defaults) = serde_json::to_value(Config::default()).unwrap()
    else {
        panic!("not a map")
    };
    let mut keys: Vec<&str> = defaults.keys().map(String::as_str).collect();
    let mut flags = Vec::new();
    for arg in serve.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "help" || id == "config" {
            continue;
        }
        flags.push(id);
        assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()));
        let env = arg.get_env().unwrap().to_str().unwrap();
        if id == "ort_dylib" {
            assert_eq!(env, "ORT_DYLIB_PATH");
        } else {
            assert_eq!(env, format!("STREAMSERVE_{}", id.to_uppercase()));
        }
        let help = arg.get_long_help().or(arg.get_help()).unwrap().to_string();
        let default = &defaults[id];
        let named = help
            .split_once("[default: ")
            .map(|(_, rest)| rest.split_once(']').unwrap().0);
        match (named, default) {
            (Some(named), serde_json::Value::String(value)) => {
                assert_eq!(named, value, "{id}")
            }
            (Some(named), serde_json::Value::Number(value))
                if !matches!(id, "http_workers" | "cpu_budget") =>
            {
                assert_eq!(named, value.to_string(), "{id}")
            }
            (Some(_), _) => {}
            (None, value) => assert!(value.is_null(), "{id}'s help names no default"),
        }
    }
    keys.sort_unstable();
    flags.sort_unstable();
    assert_eq!(keys, flags);
}

#[test]
fn the_admin_token_comes_from_a_file_and_is_never_printed() {
    let dir = test_dir("token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "  s3cret-token\n").unwrap();
    let config = Config::resolve(ServeArgs {
        admin_token_file: Some(token_file.clone()),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(config.admin_token.as_deref(), Some("s3cret-token"));
    let printed = format!("{config:?} {:#?}", config.clone());
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("<redacted>"), "{printed}");
    assert!(printed.contains("port: 8080"), "{printed}");

    let args = ServeArgs {
        admin_token: Some("s3cret-flag".into()),
        config: Some(dir.join("x.toml")),
        ..ServeArgs::default()
    };
    let printed = format!("{args:?}");
    assert!(!printed.contains("s3cret"), "{printed}");
    assert!(printed.contains("x.toml"), "{printed}");

    // Both set is refused, as are a missing or an empty file.
    let err = Config::resolve(ServeArgs {
        admin_token: Some("s3cret-flag".into()),
        admin_token_file: Some(token_file.clone()),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("both"), "{err}");
    std::fs::write(&token_file, " \n").unwrap();
    let err = Config::resolve(ServeArgs {
        admin_token_file: Some(token_file),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("is empty"), "{err}");
    let err = Config::resolve(ServeArgs {
        admin_token_file: Some(dir.join("absent")),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("cannot read admin token file"),
        "{err}"
    );
}

#[test]
fn the_grpc_port_is_a_port_or_off_and_follows_a_free_http_port() {
    let parse = |args: &[&str]| {
        let cli = Cli::try_parse_from(["streamserve", "serve"].iter().chain(args))?;
        let Command::Serve(args) = cli.command else {
            panic!("not serve")
        };
        Ok::<_, clap::Error>(Config::resolve(*args).unwrap())
    };
    let config = parse(&[]).unwrap();
    assert_eq!(config.grpc_listen_port(), Some(8081));
    let config = parse(&["--grpc-port", "off"]).unwrap();
    assert_eq!(config.grpc_listen_port(), None);
    let config = parse(&["--grpc-port", "9001", "--port", "0"]).unwrap();
    assert_eq!(
        config.grpc_listen_port(),
        Some(9001),
        "set explicitly, kept"
    );
    let config = parse(&["--port", "0"]).unwrap();
    assert_eq!(
        config.grpc_listen_port(),
        Some(0),
        "a free one beside a free HTTP port"
    );
    let config = parse(&["--port", "9000"]).unwrap();
    assert_eq!(config.grpc_listen_port(), Some(8081));
    let err = parse(&["--grpc-port", "of"]).err().unwrap().to_string();
    assert!(err.contains("neither a port"), "{err}");
    assert!(parse(&["--grpc-port", "70000"]).is_err());

    let path = test_dir("grpc").join("config.toml");
    for (text, want) in [
        ("grpc_port = \"off\"\n", None),
        ("grpc_port = 9002\n", Some(9002)),
        ("grpc_port = 0\nport = 8080\n", Some(0)),
    ] {
        std::fs::write(&path, text).unwrap();
        assert_eq!(
            resolve_file(&path).unwrap().grpc_listen_port(),
            want,
            "{text}"
        );
    }
    for text in [
        "grpc_port = 70000\n",
        "grpc_port = \"on\"\n",
        "grpc_port = -1\n",
    ] {
        std::fs::write(&path, text).unwrap();
        let err = resolve_file(&path).unwrap_err().to_string();
        assert!(err.contains("grpc_port"), "{text}: {err}");
    }
    // The message limit follows the body limit unless set.
    std::fs::write(&path, "max_body_bytes = 1000\n").unwrap();
    assert_eq!(resolve_file(&path).unwrap().grpc_max_message(), 1000);
    std::fs::write(
        &path,
        "max_body_bytes = 1000\ngrpc_max_message_bytes = 50\n",
    )
    .unwrap();
    assert_eq!(resolve_file(&path).unwrap().grpc_max_message(), 50);
}

#[test]
fn the_stream_token_key_is_never_printed_and_not_set_twice() {
    let config = Config::resolve(ServeArgs {
        stream_token_key: Some("k3y-that-must-never-print-0123456789abcdef".into()),
        ..ServeArgs::default()
    })
    .unwrap();
    assert!(!format!("{config:?}").contains("k3y-that"), "{config:?}");
    let err = Config::resolve(ServeArgs {
        stream_token_key: Some("x".into()),
        stream_token_keys: Some(PathBuf::from("/keys")),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("set one of them"), "{err}");
}

#[test]
fn a_grpc_tls_certificate_needs_its_key() {
    let args = |cert: Option<&str>, key: Option<&str>| ServeArgs {
        grpc_tls_cert: cert.map(PathBuf::from),
        grpc_tls_key: key.map(PathBuf::from),
        ..ServeArgs::default()
    };
    let e = Config::resolve(args(Some("/cert.pem"), None)).unwrap_err();
    assert!(e.to_string().contains("go together"), "{e}");
    let e = Config::resolve(args(None, Some("/key.pem"))).unwrap_err();
    assert!(e.to_string().contains("go together"), "{e}");
    let both = Config::resolve(args(Some("/cert.pem"), Some("/key.pem"))).unwrap();
    assert_eq!(both.grpc_tls_key, Some(PathBuf::from("/key.pem")));
}

mod limits;
