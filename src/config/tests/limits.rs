//! Tests of what `config/validate.rs` refuses: values past their maximums, non-finite floats,
//! secrets that no request could match, bad log filters, and file errors that must not quote
//! a secret.

use super::*;

fn resolve_text(test: &str, text: &str) -> anyhow::Result<Config> {
    let path = test_dir(test).join("config.toml");
    std::fs::write(&path, text).unwrap();
    resolve_file(&path)
}

#[test]
fn a_bad_line_holding_a_secret_is_not_echoed() {
    let secret = "s3cr3t-ADMIN-token-value";
    for (text, want) in [
        (
            format!("port = 0\nadmin_token = \"{secret}\"  ,\n"),
            "line 2",
        ),
        (
            format!("port = 0\nadmin_tokn = \"{secret}\"\n"),
            "unknown field `admin_tokn`",
        ),
        (
            "port = 0\nstream_token_key = 1234567890123456789012345678901234567890\n".into(),
            "line 2",
        ),
        (format!("port = 0\nadmin_token = {secret}\n"), "line 2"),
        (format!("stream_token_key = [\"{secret}\"]\n"), "line 1"),
        (format!("port = 0\n\"{secret}\"\n"), "line 2"),
        (
            format!("host = {{ admin_token = \"{secret}\" }}\n"),
            "line 1",
        ),
    ] {
        let err = format!("{:#}", resolve_text("secret-line", &text).unwrap_err());
        assert!(!err.contains(secret), "{text}: {err}");
        assert!(!err.contains("1234567890123"), "{text}: {err}");
        assert!(err.contains(want), "{text}: {err}");
        assert!(err.contains("<redacted>"), "{text}: {err}");
    }
    // A table header is names, not values: a misplaced section is named (a quoted one, which
    // could be anything, is not).
    for (text, want) in [
        ("port = 0\n[serve]\nport = 1\n", "unknown field `serve`"),
        ("[[admin_token]]\n", "1 | [[admin_token]]"),
    ] {
        let err = format!("{:#}", resolve_text("header-line", text).unwrap_err());
        assert!(err.contains(want), "{text}: {err}");
        assert!(!err.contains("<redacted>"), "{text}: {err}");
    }
    let err = format!(
        "{:#}",
        resolve_text("header-line", &format!("[\"{secret}\"]\n")).unwrap_err()
    );
    assert!(!err.contains(secret), "{err}");
    // A known key that is no secret is still quoted whole, as a reader needs it.
    let err = resolve_text("secret-line", "port = 70000\n").unwrap_err();
    assert!(err.to_string().contains("1 | port = 70000"), "{err}");
}

#[test]
fn secrets_are_trimmed_and_refused_when_nothing_usable_is_left() {
    let config = Config::resolve(ServeArgs {
        admin_token: Some("s3cret\n".into()),
        stream_token_key: Some("  k3y-0123456789abcdef0123456789abcdef\r\n".into()),
        ..ServeArgs::default()
    })
    .unwrap();
    assert_eq!(config.admin_token.as_deref(), Some("s3cret"));
    assert_eq!(
        config.stream_token_key.as_deref(),
        Some("k3y-0123456789abcdef0123456789abcdef")
    );
    for (admin, key, want) in [
        (Some("   "), None, "admin_token is empty"),
        (Some(""), None, "admin_token is empty"),
        (
            Some("s3c\nret"),
            None,
            "admin_token holds a control character",
        ),
        (None, Some("\t\n"), "stream_token_key is empty"),
        (None, Some("k3y\u{7}x"), "stream_token_key holds a control"),
    ] {
        let err = Config::resolve(ServeArgs {
            admin_token: admin.map(String::from),
            stream_token_key: key.map(String::from),
            ..ServeArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(want), "{admin:?} {key:?}: {err}");
        assert!(!err.contains("s3c") && !err.contains("k3y"), "{err}");
    }
    // The file form: a token with a newline inside it is as unusable.
    let path = test_dir("token-lines").join("token");
    std::fs::write(&path, "s3c\nret\n").unwrap();
    let err = Config::resolve(ServeArgs {
        admin_token_file: Some(path),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("control character"), "{err}");
}

#[test]
fn values_past_their_maximums_are_refused_naming_the_key() {
    let huge = u64::MAX;
    let day = MAX_DURATION_SECS;
    type Set = fn(&mut ServeArgs, u64);
    let cases: [(&str, Set); 8] = [
        ("keep_alive_secs", |a, v| a.keep_alive_secs = Some(v)),
        ("body_timeout_secs", |a, v| a.body_timeout_secs = Some(v)),
        ("drain_secs", |a, v| a.drain_secs = Some(v)),
        ("stream_resume_secs", |a, v| a.stream_resume_secs = Some(v)),
        ("stream_idle_secs", |a, v| a.stream_idle_secs = Some(v)),
        ("registry_wait_secs", |a, v| a.registry_wait_secs = Some(v)),
        ("stream_checkpoint_ms", |a, v| {
            a.stream_checkpoint_ms = Some(v * 1000)
        }),
        ("admission_target_ms", |a, v| {
            a.admission_target_ms = Some(v * 1000)
        }),
    ];
    for (key, set) in cases {
        let mut args = ServeArgs::default();
        set(&mut args, day);
        Config::resolve(args).unwrap_or_else(|e| panic!("{key} at 1 day: {e}"));
        let mut args = ServeArgs::default();
        set(&mut args, day + 1);
        let err = Config::resolve(args).unwrap_err().to_string();
        assert!(err.starts_with(key) && err.contains("maximum"), "{err}");
    }
    let err = Config::resolve(ServeArgs {
        drain_secs: Some(huge),
        ..ServeArgs::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("drain_secs"), "{err}");
    for (workers, stream_workers, key) in [
        (Some(MAX_WORKERS + 1), None, "http_workers"),
        (None, Some(20_000), "stream_workers"),
    ] {
        let err = Config::resolve(ServeArgs {
            http_workers: workers,
            stream_workers,
            ..ServeArgs::default()
        })
        .unwrap_err();
        assert!(err.to_string().starts_with(key), "{err}");
    }
    // In the file as from flags.
    let err = resolve_text("maximums", "keep_alive_secs = 18446744073709551615\n").unwrap_err();
    assert!(err.to_string().contains("keep_alive_secs"), "{err}");
    let config = resolve_text("maximums", "http_workers = 1024\n").unwrap();
    assert_eq!(config.http_workers, MAX_WORKERS);
}

#[test]
fn non_finite_or_huge_poll_intervals_are_refused_from_every_layer() {
    for secs in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e20, 0.05] {
        let err = Config::resolve(ServeArgs {
            registry_poll_secs: Some(secs),
            ..ServeArgs::default()
        })
        .unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("registry_poll_secs"), "{secs}: {err}");
        assert!(!err.contains("null"), "{secs}: {err}");
    }
    for text in ["nan", "inf", "-inf", "1e20"] {
        let err = resolve_text("poll", &format!("registry_poll_secs = {text}\n")).unwrap_err();
        let err = format!("{err:#}");
        assert!(err.contains("registry_poll_secs"), "{text}: {err}");
        assert!(err.contains("config.toml"), "{text}: {err}");
        assert!(!err.contains("null"), "{text}: {err}");
    }
    let config = resolve_text("poll", "registry_poll_secs = 0.1\n").unwrap();
    assert_eq!(config.registry_poll_secs, 0.1);
}

#[test]
fn a_bad_log_filter_is_refused_naming_the_directive() {
    for (filter, want) in [
        ("streamserve=debugg", "'streamserve=debugg'"),
        ("info,streamserve=verbose", "'streamserve=verbose'"),
        ("", "log is empty"),
        ("  ", "log is empty"),
        (",", "log is empty"),
    ] {
        let err = Config::resolve(ServeArgs {
            log: Some(filter.into()),
            ..ServeArgs::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains(want), "{filter:?}: {err}");
    }
    for filter in [
        "info",
        "warn,streamserve=debug",
        "streamserve::server=trace",
        "off",
    ] {
        Config::resolve(ServeArgs {
            log: Some(filter.into()),
            ..ServeArgs::default()
        })
        .unwrap_or_else(|e| panic!("{filter}: {e}"));
    }
}

#[test]
fn jobs_retention_reads_from_the_file_with_its_own_maximum_and_0_as_no_limit() {
    use std::time::Duration;
    let config = resolve_text(
        "jobs-retention",
        "jobs_retention_secs = 30\njobs_keep_finished = 5\n",
    )
    .unwrap();
    let retention = config.jobs_retention();
    assert_eq!(retention.max_age, Some(Duration::from_secs(30)));
    assert_eq!(retention.max_finished, Some(5));
    // Seven days by default: past the 1-day maximum of the other durations.
    let retention = Config::resolve(ServeArgs::default())
        .unwrap()
        .jobs_retention();
    assert_eq!(retention.max_age, Some(Duration::from_secs(7 * 86_400)));
    assert_eq!(retention.max_finished, Some(1000));
    let config = resolve_text(
        "jobs-retention",
        "jobs_retention_secs = 0\njobs_keep_finished = 0\n",
    )
    .unwrap();
    let retention = config.jobs_retention();
    assert_eq!((retention.max_age, retention.max_finished), (None, None));
    let err = Config::resolve(ServeArgs {
        jobs_retention_secs: Some(MAX_JOBS_RETENTION_SECS + 1),
        ..ServeArgs::default()
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.starts_with("jobs_retention_secs") && err.contains("maximum"),
        "{err}"
    );
    // A misspelt key is an error, naming it.
    let err = resolve_text("jobs-retention", "jobs_retention = 30\n").unwrap_err();
    assert!(format!("{err:#}").contains("jobs_retention"), "{err:#}");
}
