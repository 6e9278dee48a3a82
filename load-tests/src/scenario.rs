//! Scenario files (`load-tests/scenarios/*.toml`): a run described in a file, so that it is
//! reproducible from the file alone (`loadgen run scenarios/rest-mlp.toml [--out DIR]`).
//!
//! A scenario names the subcommand (`kind`) and gives its options as keys: `foo_bar = v`
//! becomes `--foo-bar v`, an array becomes a comma-separated list, `true` a bare flag (`false`
//! leaves the flag out), and `peer = false` becomes `--no-peer`. `description` is free text.
//! The result is parsed by the same command-line parser as a typed command, so a scenario
//! accepts exactly the options (and bounds) of its subcommand, and runs the same code.
//!
//! ```toml
//! kind = "bench"
//! description = "REST mlp: batching on/off, 2 ms delay and the FastAPI peer"
//! concurrency = [1, 8, 32, 128]
//! duration_secs = 10
//! warmup_secs = 2
//! ```

use anyhow::{bail, Context as _};

/// Subcommands a scenario may name.
pub const KINDS: [&str; 13] = [
    "bench",
    "efficiency",
    "protocols",
    "monitoring",
    "jobs",
    "streams-bench",
    "keywords-bench",
    "overload",
    "timeline",
    "fleet",
    "streams-fleet",
    "rest",
    "streams",
];

/// The scenario files (in `load-tests/scenarios/`) `loadgen suite` runs, in order: every
/// benchmark that starts its own server (in-process, or a child process, possibly pinned to a
/// CPU of its own), and the
/// fleet drills (their own instances, haproxy, and for `fleet` an S3 server).
pub const SUITE: [&str; 12] = [
    "rest-mlp.toml",
    "protocols-mlp.toml",
    "monitoring-mlp.toml",
    "jobs-mlp.toml",
    "streams-vad.toml",
    "streams-keyword.toml",
    "efficiency.toml",
    "overload-mlp.toml",
    "overload-mlp-pinned.toml",
    "timeline-mlp.toml",
    "fleet-mlp.toml",
    "streams-fleet.toml",
];

/// The `loadgen` arguments (without the program name) a scenario stands for; `out`, when
/// given, replaces any `out` in the file.
pub fn to_args(text: &str, out: Option<&std::path::Path>) -> anyhow::Result<Vec<String>> {
    let table: toml::Table = toml::from_str(text).context("scenario is not valid TOML")?;
    let kind = match table.get("kind") {
        Some(toml::Value::String(k)) => k.clone(),
        _ => bail!("scenario needs kind = one of {}", KINDS.join(", ")),
    };
    if !KINDS.contains(&kind.as_str()) {
        bail!("unknown kind {kind:?}; one of {}", KINDS.join(", "));
    }
    let mut args = vec![kind];
    for (key, value) in &table {
        if key == "kind" || key == "description" || (key == "out" && out.is_some()) {
            continue;
        }
        if key == "peer" {
            match value {
                toml::Value::Boolean(true) => {}
                toml::Value::Boolean(false) => args.push("--no-peer".into()),
                _ => bail!("peer must be true or false"),
            }
            continue;
        }
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| -> anyhow::Result<String> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                other => bail!("{key}: unsupported value {other}"),
            })
        };
        match value {
            toml::Value::Boolean(true) => args.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                if items.is_empty() {
                    bail!("{key}: empty list");
                }
                let items: Vec<String> = items.iter().map(scalar).collect::<Result<_, _>>()?;
                args.push(flag);
                args.push(items.join(","));
            }
            other => {
                args.push(flag);
                args.push(scalar(other)?);
            }
        }
    }
    if let Some(out) = out {
        args.push("--out".into());
        args.push(out.display().to_string());
    }
    Ok(args)
}

/// The options a bundled scenario file gives its subcommand `kind`, parsed as `loadgen run`
/// parses them (for the benchmarks' tests).
#[cfg(test)]
pub fn bundled_options<T: clap::Args + clap::FromArgMatches>(file: &str, kind: &'static str) -> T {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(file);
    let args = to_args(&std::fs::read_to_string(path).unwrap(), None).unwrap();
    assert_eq!(args[0], kind);
    let command = T::augment_args(clap::Command::new(kind));
    let matches = command
        .try_get_matches_from(std::iter::once(kind.to_string()).chain(args[1..].to_vec()))
        .unwrap();
    T::from_arg_matches(&matches).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_becomes_arguments() {
        let args = to_args(
            "kind = \"bench\"\ndescription = \"x\"\nconcurrency = [1, 8]\nduration_secs = 3\n\
             binary = true\npeer = false\n",
            Some(std::path::Path::new("/tmp/o")),
        )
        .unwrap();
        assert_eq!(args[0], "bench");
        let joined = args.join(" ");
        assert!(joined.contains("--concurrency 1,8"), "{joined}");
        assert!(joined.contains("--duration-secs 3"), "{joined}");
        assert!(joined.contains("--binary"), "{joined}");
        assert!(joined.contains("--no-peer"), "{joined}");
        assert!(joined.ends_with("--out /tmp/o"), "{joined}");
        assert!(!joined.contains("description"));
    }

    #[test]
    fn scenario_refuses_unknown_kinds() {
        assert!(to_args("kind = \"run\"\n", None).is_err());
        assert!(to_args("duration_secs = 3\n", None).is_err());
        assert!(to_args("kind = \"bench\"\nconcurrency = []\n", None).is_err());
    }

    #[test]
    fn bundled_scenarios_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut n = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                to_args(&std::fs::read_to_string(&path).unwrap(), None)
                    .unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                n += 1;
            }
        }
        assert!(n >= 3);
    }

    #[test]
    fn the_suite_runs_benchmarks_that_start_their_own_server() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        for name in SUITE {
            let text = std::fs::read_to_string(dir.join(name)).unwrap();
            let args = to_args(&text, None).unwrap();
            assert!(
                [
                    "bench",
                    "protocols",
                    "monitoring",
                    "jobs",
                    "streams-bench",
                    "keywords-bench",
                    "efficiency",
                    "overload",
                    "timeline",
                    "fleet",
                    "streams-fleet"
                ]
                .contains(&args[0].as_str()),
                "{name} needs a server of its own: {args:?}"
            );
        }
    }
}
