//! What the fleet drill writes: `results.json` (every figure, per drill, with the traffic per
//! version in time bins), `report.md` from `templates/fleet.md.j2`, and the plot
//! ([`crate::plots::fleet`]). Times in a drill's figures are seconds relative to the moment
//! its `registry deploy` command returned (negative: before it).

use serde_json::{json, Value};

use super::analysis::{bins, convergence, span};
use super::load::Answer;
use super::{outcome, FleetOptions, Measured, StepRecord, PLOT_FILE};

/// Where the drill wrote its files, its report, and whether every drill ended as it should
/// with no failed request.
pub struct FleetOutcome {
    pub dir: std::path::PathBuf,
    pub report: String,
    pub passed: bool,
}

/// Failed requests listed per drill, at most.
const FAILURES_LISTED: usize = 20;

fn rel(t: Option<f64>, origin: f64) -> Value {
    t.map_or(Value::Null, |t| json!(t - origin))
}

/// The last `deploy` event of `version` in the history.
fn deploy_event<'a>(history: &'a [Value], version: &str) -> Option<&'a Value> {
    history
        .iter()
        .rev()
        .find(|e| e["event"] == "deploy" && e["version"] == version)
}

/// The answers `instance` gave.
fn mine(answers: &[Answer], instance: &str) -> Vec<Answer> {
    answers
        .iter()
        .filter(|a| a.served_by.as_deref() == Some(instance))
        .cloned()
        .collect()
}

/// One drill's figures.
fn step_json(options: &FleetOptions, m: &Measured, step: &StepRecord) -> Value {
    let end_s = step.end_s;
    let origin = step.deploy_returned_s;
    let answers: Vec<&Answer> = m
        .answers
        .iter()
        .filter(|a| a.t_s >= step.begin_s && a.t_s < end_s)
        .collect();
    let owned: Vec<Answer> = answers.iter().map(|a| (*a).clone()).collect();
    let ended = outcome(&m.history, &step.to);
    let event = ended
        .as_ref()
        .and_then(|e| e["event"].as_str())
        .unwrap_or("none")
        .to_string();
    let rolled_back = event == "rolled_back";
    let target = if rolled_back { &step.from } else { &step.to };
    let (views, fleet) = convergence(&owned, &m.instance_ids, origin, end_s, target);
    let (new_answers, first_new, last_new) = span(&owned, &step.to, origin, end_s);
    let deployed_at = deploy_event(&m.history, &step.to).and_then(|e| e["at_s"].as_f64());
    let ended_at = ended.as_ref().and_then(|e| e["at_s"].as_f64());
    let failures: Vec<&&Answer> = answers.iter().filter(|a| !a.ok()).collect();
    let mut versions = std::collections::BTreeMap::<String, u64>::new();
    for a in answers.iter().filter(|a| a.ok()) {
        *versions
            .entry(a.version.clone().unwrap_or_default())
            .or_default() += 1;
    }
    let per_instance: Vec<Value> = views
        .iter()
        .map(|v| {
            let (new_answers, _, _) = span(&mine(&owned, &v.instance), &step.to, origin, end_s);
            json!({
                "instance": v.instance, "answers": v.answers, "new_answers": new_answers,
                "first_target_s": rel(v.first_target_s, origin),
                "last_other_s": rel(v.last_other_s, origin),
                "settled_s": rel(v.settled_s, origin),
            })
        })
        .collect();
    let width = options.bin.as_secs_f64();
    json!({
        "drill": step.drill,
        "strategy": step.strategy,
        "from": step.from,
        "to": step.to,
        "expected_event": step.drill.expected_event(),
        "deploy_command": step.deploy_command,
        "deploy_output": step.deploy_output,
        "deploy_took_s": step.deploy_returned_s - step.deploy_started_s,
        "begin_s": step.begin_s - origin,
        "end_s": end_s - origin,
        "deploy_started_s": step.deploy_started_s - origin,
        "reports_settled_s": step.reports_settled_s - origin,
        "at_s": origin,
        "registry": {
            "deploy_event_s": rel(deployed_at, origin),
            "event": event,
            "event_s": rel(ended_at, origin),
            "deploy_to_event_s": match (deployed_at, ended_at) {
                (Some(d), Some(e)) => json!(e - d),
                _ => Value::Null,
            },
            "by": ended.as_ref().map_or(Value::Null, |e| e["by"].clone()),
            "reason": ended.as_ref().map_or(Value::Null, |e| e["reason"].clone()),
        },
        "client": {
            "target": target,
            "fleet_on_target_s": rel(fleet, origin),
            "new_answers": new_answers,
            "first_new_s": rel(first_new, origin),
            "last_new_s": rel(last_new, origin),
            "per_instance": per_instance,
        },
        "as_expected": event == step.drill.expected_event() && fleet.is_some(),
        "answers": answers.len(),
        "failed": failures.len(),
        "failures": failures.iter().take(FAILURES_LISTED).map(|a| json!({
            "t_s": a.t_s - origin, "status": a.status, "served_by": a.served_by,
            "error": a.error.as_deref().map(|e| e.chars().take(200).collect::<String>()),
        })).collect::<Vec<_>>(),
        "versions": versions,
        "bins": bins(&owned, step.begin_s, end_s, width, origin),
    })
}

/// results.json.
pub fn results_json(options: &FleetOptions, start: &crate::report::Start, m: &Measured) -> Value {
    let steps: Vec<Value> = m.steps.iter().map(|s| step_json(options, m, s)).collect();
    let failed = m.answers.iter().filter(|a| !a.ok()).count();
    let first_t = m.answers.first().map_or(0.0, |a| a.sent_s);
    let body = json!({
        "settings": {
            "instances": options.instances,
            "rate_per_s": options.rate,
            "concurrency": options.concurrency,
            "poll_secs": options.poll_secs,
            "canary_steps": options.canary_steps,
            "step_secs": options.step_secs,
            "hold_secs": options.hold_secs,
            "settle_s": options.settle.as_secs_f64(),
            "bin_s": options.bin.as_secs_f64(),
            "check_ms": options.check_ms,
        },
        "versions": m.pushed,
        "instances": m.instance_ids,
        "haproxy": { "version": m.haproxy_version, "config": m.haproxy_config },
        "load": {
            "answers": m.answers.len(),
            "ok": m.answers.len() - failed,
            "failed": failed,
            "seconds": m.load_end_s - first_t,
            "answered_per_s": m.answers.len() as f64 / (m.load_end_s - first_t).max(1e-3),
        },
        "cpu_cores": m.cpu.iter().map(|(part, cores)| json!({ "part": part, "cores": cores })).collect::<Vec<_>>(),
        "steps": steps,
        "history": m.history,
    });
    start.results_json(Some("fleet"), &options.common.command, body)
}

/// Writes `report.md`, `results.json` and the plot.
pub fn write(
    options: &FleetOptions,
    start: &crate::report::Start,
    m: &Measured,
) -> anyhow::Result<FleetOutcome> {
    let results = results_json(options, start, m);
    let header = crate::report::header(
        "streamserve fleet drill: deployments of `mlp` across instances behind haproxy",
        start.at.elapsed(),
        &[format!(
            "everything on this one machine: {} `streamserve` instances, haproxy, moto's S3 server and the load generator share its {} cores",
            options.instances, start.machine.nproc
        )],
        true,
    );
    let extra = json!({ "plot": PLOT_FILE });
    let report =
        crate::report::render("fleet", &crate::report::context(&results, &[header, extra]))?;
    let passed = results["load"]["failed"] == 0
        && results["steps"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["as_expected"] == true));
    let saved = crate::report::save_run(
        start.dir.clone(),
        "fleet",
        report,
        &results,
        Some((PLOT_FILE, crate::plots::fleet as _)),
    )?;
    Ok(FleetOutcome {
        dir: saved.dir,
        report: saved.report,
        passed,
    })
}
