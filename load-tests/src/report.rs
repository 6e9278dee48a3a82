//! Reports from templates: every benchmark's `report.md` is `templates/<name>.md.j2`
//! (minijinja, built into the binary with `include_str!` so that `loadgen` works from any
//! directory) rendered over its `results.json` plus a few figures computed here. Also the one
//! place a run's files are written ([`save_run`]).

use anyhow::Context as _;
use minijinja::{Environment, Value};

const TEMPLATES: [(&str, &str); 14] = [
    ("summary", include_str!("../templates/summary.txt.j2")),
    ("header", include_str!("../templates/header.md.j2")),
    ("bench", include_str!("../templates/bench.md.j2")),
    ("capacity", include_str!("../templates/capacity.md.j2")),
    (
        "streams_bench",
        include_str!("../templates/streams_bench.md.j2"),
    ),
    (
        "keywords_bench",
        include_str!("../templates/keywords_bench.md.j2"),
    ),
    ("overload", include_str!("../templates/overload.md.j2")),
    ("timeline", include_str!("../templates/timeline.md.j2")),
    ("fleet", include_str!("../templates/fleet.md.j2")),
    (
        "streams_fleet",
        include_str!("../templates/streams_fleet.md.j2"),
    ),
    ("protocols", include_str!("../templates/protocols.md.j2")),
    ("monitoring", include_str!("../templates/monitoring.md.j2")),
    ("jobs", include_str!("../templates/jobs.md.j2")),
    ("efficiency", include_str!("../templates/efficiency.md.j2")),
];

fn number(v: &Value) -> Option<f64> {
    f64::try_from(v.clone()).ok()
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(true);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
    for (name, text) in TEMPLATES {
        env.add_template(name, text)
            .expect("the built-in templates parse");
    }
    // `x|f(2)`: Rust's `{:.2}`; `none|f(2, "n/a")`: the fallback.
    env.add_filter("f", |v: Value, digits: usize, none: Option<String>| {
        number(&v).map_or(none.unwrap_or_else(|| "n/a".into()), |x| {
            format!("{x:.digits$}")
        })
    });
    // `x|num`: Rust's `{}` of an f64 (2.0 as `2`, 0.25 as `0.25`).
    env.add_filter("num", |v: Value| {
        number(&v).map_or("n/a".into(), |x| x.to_string())
    });
    // `map|total`: the sum of a map's values (error counts by kind).
    env.add_filter("total", |v: Value| -> Result<i64, minijinja::Error> {
        let mut sum = 0;
        for k in v.try_iter()? {
            sum += i64::try_from(v.get_item(&k)?).unwrap_or(0);
        }
        Ok(sum)
    });
    // `map|dbg` / `map|dbg(false)`: a map as Rust's `{:?}` prints a BTreeMap (string keys
    // quoted unless told otherwise).
    env.add_filter(
        "dbg",
        |v: Value, quote: Option<bool>| -> Result<String, minijinja::Error> {
            let mut parts = Vec::new();
            for k in v.try_iter()? {
                let n = v.get_item(&k)?;
                let key = k.to_string();
                let key = if quote.unwrap_or(true) {
                    format!("{key:?}")
                } else {
                    key
                };
                parts.push(format!("{key}: {n}"));
            }
            Ok(format!("{{{}}}", parts.join(", ")))
        },
    );
    env
}

/// Renders template `name` over `context` (a JSON object).
pub fn render(name: &str, context: &serde_json::Value) -> anyhow::Result<String> {
    let env = environment();
    let template = env.get_template(name).expect("a built-in template");
    template
        .render(Value::from_serialize(context))
        .with_context(|| format!("cannot render the {name} report"))
}

/// A report's text summary: `templates/summary.txt.j2` over its JSON and `extra` (its
/// `kind` and what the JSON leaves out).
pub fn summary(json: &serde_json::Value, extra: serde_json::Value) -> String {
    render("summary", &context(json, &[extra])).expect("the summary template renders")
}

/// What every report's header says besides its results: the title, how long the run took,
/// more machine lines, the ONNX Runtime version and (`software`) the checkout's revision.
pub fn header(
    title: &str,
    elapsed: std::time::Duration,
    machine_extra: &[String],
    software: bool,
) -> serde_json::Value {
    serde_json::json!({
        "title": title,
        "elapsed_s": elapsed.as_secs_f64(),
        "machine_extra": machine_extra,
        "software": software,
        "ort_version": streamserve::runtime::ORT_VERSION,
        "source_revision": if software { crate::sysinfo::source_revision() } else { String::new() },
    })
}

/// `results` with the keys of each of `extra` added: what a template renders over.
pub fn context(results: &serde_json::Value, extra: &[serde_json::Value]) -> serde_json::Value {
    let mut context = results.clone();
    for e in extra {
        if let (Some(c), Some(e)) = (context.as_object_mut(), e.as_object()) {
            c.extend(e.clone());
        }
    }
    context
}

/// `load-tests/results/` of the checkout this crate was built from.
pub fn results_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("results")
}

/// Where a benchmark run wrote its files, and its report.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub dir: std::path::PathBuf,
    pub report: String,
}

/// What every benchmark notes as it starts: when, on what machine, and where its files go
/// (`out`, or `load-tests/results/<UTC date>-<suffix>/`).
pub struct Start {
    pub at: std::time::Instant,
    pub machine: crate::sysinfo::MachineInfo,
    pub started_at: String,
    pub dir: std::path::PathBuf,
}

impl Start {
    pub fn now(out: Option<&std::path::Path>, suffix: &str) -> Start {
        let (date, started_at) = crate::sysinfo::utc_now();
        Start {
            at: std::time::Instant::now(),
            machine: crate::sysinfo::MachineInfo::collect(),
            started_at,
            dir: out.map_or_else(
                || results_dir().join(format!("{date}-{suffix}")),
                |o| o.to_path_buf(),
            ),
        }
    }

    /// [`results_json`] of the run that started at `self`.
    pub fn results_json(
        &self,
        kind: Option<&str>,
        command: &str,
        body: serde_json::Value,
    ) -> serde_json::Value {
        results_json(kind, (&self.machine, &self.started_at), command, body)
    }
}

/// What every results.json opens with: when the run started, its command line, the machine,
/// and its `kind` where it writes one (`bench` and `streams-bench` results have none: `loadgen
/// plot` tells them apart by their keys); then `body`'s keys.
pub fn results_json(
    kind: Option<&str>,
    (machine, started_at): (&crate::sysinfo::MachineInfo, &str),
    command: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    let mut head =
        serde_json::json!({ "started_at": started_at, "command": command, "machine": machine });
    if let Some(kind) = kind {
        head["kind"] = kind.into();
    }
    context(&head, &[body])
}

/// A plot drawn from a run's results into a file.
pub type Draw = fn(&serde_json::Value, &std::path::Path) -> anyhow::Result<()>;

/// Writes a benchmark run into `dir`: `report.md`, `results.json`, and (where the run has
/// one) the plot that `draw` makes from those results as `plot_file`. A plot that fails is
/// said on stderr (prefixed `[tag]`), not an error: the numbers are already written.
pub fn save_run(
    dir: std::path::PathBuf,
    tag: &str,
    report: String,
    results: &serde_json::Value,
    plot: Option<(&str, Draw)>,
) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    std::fs::write(dir.join("report.md"), &report)
        .with_context(|| format!("cannot write {}/report.md", dir.display()))?;
    std::fs::write(
        dir.join("results.json"),
        serde_json::to_vec_pretty(results)?,
    )
    .with_context(|| format!("cannot write {}/results.json", dir.display()))?;
    if let Some(Err(e)) = plot.map(|(plot_file, draw)| draw(results, &dir.join(plot_file))) {
        eprintln!("[{tag}] {e:#}");
    }
    Ok(Outcome { dir, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_format_as_rust_does() {
        let mut env = environment();
        env.add_template("t", "{{ a|f(2) }} {{ b|f(0) }} {{ none|f(1) }} {{ none|f(1, '–') }} {{ c|num }} {{ d|num }} {{ m|total }} {{ m|dbg }} {{ s|dbg(false) }}")
            .unwrap();
        let out = env
            .get_template("t")
            .unwrap()
            .render(minijinja::context! {
                a => 1.005f64, b => 3492.7f64, c => 2.0f64, d => 0.25f64,
                m => serde_json::json!({"http 503": 2, "transport": 1}),
                s => serde_json::json!({"429": 3}),
            })
            .unwrap();
        assert_eq!(
            out,
            format!(
                "{:.2} 3493 n/a – 2 0.25 3 {{\"http 503\": 2, \"transport\": 1}} {{429: 3}}",
                1.005f64
            )
        );
    }
}
