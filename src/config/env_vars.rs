//! Environment variables named like the server's (`STREAMSERVE_*`) that nothing reads. A
//! misspelt key in the config file stops start-up, but a misspelt variable would be ignored
//! without a word, and the setting silently left at its default; `serve` warns about each one
//! instead, with the name it probably meant. A warning, not an error: deployment platforms set
//! variables for several tools (and several versions of this one) in one environment.
//!
//! The known names are read from clap's own description of the command line, so a new flag's
//! variable is known without a list to keep up to date.

use std::collections::BTreeSet;
use std::ffi::OsString;

/// The prefix of the variables this program owns.
pub const ENV_PREFIX: &str = "STREAMSERVE_";

/// `STREAMSERVE_*` variables read through `std::env` rather than by a flag. None today; a
/// test scans `src/` for such reads and fails if one is missing here.
pub const READ_DIRECTLY: &[&str] = &[];

/// A `STREAMSERVE_*` variable that nothing reads, and the known one it is closest to.
#[derive(Debug, PartialEq, Eq)]
pub struct UnknownVar {
    pub name: String,
    pub suggestion: Option<String>,
}

/// Every environment variable that an argument of `command` or of any of its subcommands
/// reads, and those in [`READ_DIRECTLY`].
pub fn known_vars(command: &clap::Command) -> BTreeSet<String> {
    fn collect(command: &clap::Command, known: &mut BTreeSet<String>) {
        for arg in command.get_arguments() {
            if let Some(env) = arg.get_env() {
                known.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in command.get_subcommands() {
            collect(sub, known);
        }
    }
    let mut known: BTreeSet<String> = READ_DIRECTLY.iter().map(|v| v.to_string()).collect();
    collect(command, &mut known);
    known
}

/// The names among `names` that look like ours (the prefix in any case: `Streamserve_Port`
/// is as ignored as a misspelling) but are not `known`, in the order given.
pub fn unknown_vars(
    known: &BTreeSet<String>,
    names: impl IntoIterator<Item = OsString>,
) -> Vec<UnknownVar> {
    names
        .into_iter()
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| has_prefix(name) && !known.contains(name))
        .map(|name| UnknownVar {
            suggestion: closest(&name, known).map(str::to_string),
            name,
        })
        .collect()
}

/// Logs one warning per unknown `STREAMSERVE_*` variable of this process, naming it and what
/// it probably meant. Never its value: a misspelt `STREAMSERVE_ADMIN_TOKN` holds a secret.
pub fn warn_unknown_vars(command: &clap::Command) {
    let known = known_vars(command);
    let names = std::env::vars_os().map(|(name, _)| name);
    for var in unknown_vars(&known, names) {
        // Escaped: a name is whatever the environment holds, a newline included.
        let name = crate::untrusted::Untrusted(&var.name);
        match &var.suggestion {
            Some(meant) => tracing::warn!(
                variable = %name,
                did_you_mean = %meant,
                "environment variable {name} is not one of streamserve's and is ignored; did you mean {meant}?"
            ),
            None => tracing::warn!(
                variable = %name,
                "environment variable {name} is not one of streamserve's and is ignored"
            ),
        }
    }
}

fn has_prefix(name: &str) -> bool {
    name.get(..ENV_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
}

/// The known `STREAMSERVE_*` name nearest to `name` (after the prefix, ignoring case), if
/// at most a third of its letters differ: beyond that a "did you mean" misleads more than it
/// helps (`STREAMSERVE_PORT` is not what `STREAMSERVE_HOSTS` meant).
fn closest<'a>(name: &str, known: &'a BTreeSet<String>) -> Option<&'a str> {
    let key = name[ENV_PREFIX.len()..].to_ascii_uppercase();
    let letters = key.chars().count();
    known
        .iter()
        .filter_map(|candidate| {
            let other = candidate.strip_prefix(ENV_PREFIX)?;
            // Optimal string alignment: `INFLIHGT` is one edit (a swap) from `INFLIGHT`.
            Some((strsim::osa_distance(&key, other), candidate.as_str()))
        })
        .filter(|(distance, _)| distance * 3 <= letters.max(3))
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn known() -> BTreeSet<String> {
        known_vars(&crate::cli::Cli::command())
    }

    fn unknown(names: &[&str]) -> Vec<UnknownVar> {
        unknown_vars(&known(), names.iter().map(OsString::from))
    }

    #[test]
    fn every_subcommands_variables_are_known() {
        let known = known();
        for name in [
            "STREAMSERVE_MAX_INFLIGHT",
            "STREAMSERVE_CONFIG",
            "STREAMSERVE_MODELS",
            // `admin`'s and `keys new`'s, not `serve`'s: set beside it, they are no mistake.
            "STREAMSERVE_URL",
            "STREAMSERVE_API_KEY_SECRET_FILE",
            "STREAMSERVE_REGISTRY",
        ] {
            assert!(known.contains(name), "{name} in {known:?}");
        }
        assert!(unknown(&["STREAMSERVE_URL", "PATH", "ORT_DYLIB_PATH"]).is_empty());
    }

    #[test]
    fn a_misspelt_variable_is_named_with_the_one_it_meant() {
        let got = unknown(&[
            "STREAMSERVE_MAX_INFLIHGT",
            "STREAMSERVE_ADMIN_TOKN",
            "StreamServe_Port",
            "STREAMSERVE_TOTALLY_UNRELATED_THING",
            "STREAMSERVE_HOSTS",
        ]);
        let pairs: Vec<(&str, Option<&str>)> = got
            .iter()
            .map(|v| (v.name.as_str(), v.suggestion.as_deref()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("STREAMSERVE_MAX_INFLIHGT", Some("STREAMSERVE_MAX_INFLIGHT")),
                ("STREAMSERVE_ADMIN_TOKN", Some("STREAMSERVE_ADMIN_TOKEN")),
                ("StreamServe_Port", Some("STREAMSERVE_PORT")),
                ("STREAMSERVE_TOTALLY_UNRELATED_THING", None),
                ("STREAMSERVE_HOSTS", Some("STREAMSERVE_HOST")),
            ]
        );
    }

    /// Variables read through `std::env` instead of by a flag must be in [`READ_DIRECTLY`],
    /// or `serve` would call them unknown.
    #[test]
    fn variables_read_directly_are_known() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = vec![src];
        let mut found = Vec::new();
        while let Some(path) = files.pop() {
            if path.is_dir() {
                files.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for read in ["var(\"", "var_os(\""] {
                for (at, _) in text.match_indices(read) {
                    let rest = &text[at + read.len()..];
                    let name = &rest[..rest.find('"').unwrap_or(0)];
                    if name.starts_with(ENV_PREFIX) {
                        found.push((path.display().to_string(), name.to_string()));
                    }
                }
            }
        }
        let known = known();
        for (file, name) in found {
            assert!(
                known.contains(&name),
                "{file} reads {name}: add it to READ_DIRECTLY"
            );
        }
    }
}
