//! What the fleet drill watches besides the answers: the registry's state as `registry status
//! --json` prints it (the model's history, the event that ended a rollout, whether every
//! instance settled on a version), and the CPU time of each process of the fleet; also the
//! server marks at a load's measured window ([`measured`], [`CpuWindow`]) that `efficiency`
//! and `keywords-bench` take.

use std::future::Future;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::MODEL;
use crate::prometheus;
use crate::sysinfo::CpuSnapshot;

/// The model's history from `registry status --json`.
pub fn model_history(status: &Value) -> Vec<Value> {
    status["models"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["model"] == MODEL)
        .and_then(|m| m["history"].as_array())
        .cloned()
        .unwrap_or_default()
}

/// The event that ended the last rollout of `version`, if it has ended.
pub fn outcome(history: &[Value], version: &str) -> Option<Value> {
    let deployed = history
        .iter()
        .rposition(|e| e["event"] == "deploy" && e["version"] == version)?;
    history[deployed + 1..]
        .iter()
        .find(|e| {
            e["version"] == version
                && ["switched", "promoted", "rolled_out", "rolled_back"]
                    .contains(&e["event"].as_str().unwrap_or(""))
        })
        .cloned()
}

/// Whether every instance that reported serves `default` alone: no canary, no other version
/// still loaded.
pub fn instances_settled(status: &Value, default: &str) -> bool {
    let Some(reports) = status["instances"].as_array().filter(|r| !r.is_empty()) else {
        return false;
    };
    reports.iter().all(|r| {
        let mlp = &r["models"][MODEL];
        mlp["default"] == default
            && mlp["canary"].is_null()
            && mlp["versions"].as_object().is_some_and(|versions| {
                versions
                    .iter()
                    .all(|(v, state)| v == default || state["state"] != "READY")
            })
    })
}

/// CPU ticks of each labelled process.
fn process_ticks(pids: &[(String, u32)]) -> Vec<(String, u64)> {
    pids.iter()
        .map(|(label, pid)| {
            (
                label.clone(),
                crate::sysinfo::process_ticks(*pid).unwrap_or(0),
            )
        })
        .collect()
}

/// A moment's CPU counters: when, the machine's and this process's, each labelled process's.
pub type CpuMark = (Instant, Option<CpuSnapshot>, Vec<(String, u64)>);

pub fn cpu_mark(pids: &[(String, u32)]) -> CpuMark {
    (Instant::now(), CpuSnapshot::take(), process_ticks(pids))
}

/// A mark of the server: CPU counters, its `/metrics` and its threads' CPU time
/// ([`crate::sysinfo::thread_cpu_ns`]).
pub type Mark = (CpuMark, Option<String>, Vec<crate::sysinfo::ThreadCpu>);

async fn mark(pid: u32, base: &str, client: &reqwest::Client) -> Mark {
    let pids = [("server".to_string(), pid)];
    let threads = crate::sysinfo::thread_cpu_ns(pid);
    (
        cpu_mark(&pids),
        prometheus::fetch(client, base).await,
        threads,
    )
}

/// Runs `load` while marking the server `skip` after its start and `skip + length` after.
pub async fn measured<T>(
    load: impl Future<Output = anyhow::Result<T>>,
    (skip, length): (Duration, Duration),
    (pid, base): (u32, &str),
    client: &reqwest::Client,
) -> anyhow::Result<(T, Mark, Mark)> {
    let t0 = tokio::time::Instant::now();
    let marks = async {
        tokio::time::sleep_until(t0 + skip).await;
        let first = mark(pid, base, client).await;
        tokio::time::sleep_until(t0 + skip + length).await;
        (first, mark(pid, base, client).await)
    };
    let (report, (first, last)) = tokio::join!(load, marks);
    Ok((report?, first, last))
}

/// The CPU side of a measured window: its seconds and the cores each side used.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct CpuWindow {
    pub seconds: f64,
    /// CPU cores: the server process, this process (the load generator), every other process.
    pub server_cores: f64,
    pub loadgen_cores: f64,
    pub other_cores: f64,
}

impl CpuWindow {
    /// Between two marks of the server (labelled "server", as [`measured`] marks it); `None`
    /// without the machine's counters.
    pub fn between(first: CpuMark, last: CpuMark) -> Option<CpuWindow> {
        let seconds = last.0.duration_since(first.0).as_secs_f64();
        CpuWindow::from_cores(seconds, &cpu_share(first, last))
    }

    /// From [`cpu_share`]'s cores (this process first, others last) over `seconds`.
    pub fn from_cores(seconds: f64, cores: &[(String, f64)]) -> Option<CpuWindow> {
        let ((_, loadgen_cores), (_, other_cores)) = cores.first().zip(cores.last())?;
        let server = cores.iter().find(|c| c.0 == "server");
        Some(CpuWindow {
            seconds,
            server_cores: server.map_or(0.0, |c| c.1),
            loadgen_cores: *loadgen_cores,
            other_cores: *other_cores,
        })
    }
}

/// CPU cores used between two marks: loadgen, each labelled group of processes, and others.
pub fn cpu_share(before: CpuMark, after: CpuMark) -> Vec<(String, f64)> {
    let (Some(b), Some(a)) = (&before.1, &after.1) else {
        return Vec::new();
    };
    let share = a.since(b);
    let seconds = after.0.duration_since(before.0).as_secs_f64().max(1e-3);
    let tps = crate::sysinfo::ticks_per_second() as f64;
    let mut groups: Vec<(String, f64)> = Vec::new();
    for ((label, t1), (_, t0)) in after.2.iter().zip(&before.2) {
        let cores = t1.saturating_sub(*t0) as f64 / tps / seconds;
        match groups.iter_mut().find(|g| &g.0 == label) {
            Some(g) => g.1 += cores,
            None => groups.push((label.clone(), cores)),
        }
    }
    let children: f64 = groups.iter().map(|g| g.1).sum();
    let mut out = vec![("loadgen (client)".to_string(), share.own_cores)];
    out.extend(groups);
    out.push((
        "others (registry commands, the rest of the machine)".into(),
        (share.other_cores - children).max(0.0),
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn event(event: &str, version: &str, at_ms: u64) -> Value {
        json!({ "at_ms": at_ms, "event": event, "version": version, "by": "x" })
    }

    #[test]
    fn the_outcome_is_the_event_that_ended_the_last_rollout_of_the_version() {
        let history = vec![
            event("deploy", "2", 1),
            event("rolled_back", "2", 2),
            event("deploy", "3", 3),
            event("deploy", "2", 4),
        ];
        // 2 was deployed again and has not ended yet; its earlier rollback does not count.
        assert_eq!(outcome(&history, "2"), None);
        let mut ended = history.clone();
        ended.push(event("switched", "2", 5));
        assert_eq!(outcome(&ended, "2").unwrap()["at_ms"], 5);
        assert_eq!(outcome(&ended, "9"), None);
        let status = json!({ "models": [ { "model": "other", "history": [] },
                                         { "model": "mlp", "history": ended } ] });
        assert_eq!(model_history(&status).len(), 5);
        assert!(model_history(&json!({})).is_empty());
    }

    #[test]
    fn instances_settle_on_a_version_alone() {
        let report = |default: &str, canary: Value, states: Value| json!({ "id": "i", "models": { "mlp": { "default": default, "canary": canary, "versions": states } } });
        let settled = json!({ "instances": [
            report("2", Value::Null, json!({ "1": { "state": "UNLOADED" }, "2": { "state": "READY" } })),
            report("2", Value::Null, json!({ "2": { "state": "READY" } })),
        ]});
        assert!(instances_settled(&settled, "2"));
        assert!(!instances_settled(&settled, "1"));
        let old_loaded = json!({ "instances": [
            report("2", Value::Null, json!({ "1": { "state": "READY" }, "2": { "state": "READY" } })),
        ]});
        assert!(!instances_settled(&old_loaded, "2"));
        let canary = json!({ "instances": [
            report("2", json!({ "version": "3", "percent": 10 }), json!({ "2": { "state": "READY" } })),
        ]});
        assert!(!instances_settled(&canary, "2"));
        assert!(!instances_settled(&json!({ "instances": [] }), "2"));
    }
}
