//! The streams fleet drill's arithmetic and files: every stream's results against the solo
//! run ([`compare`]), resumes, audio sent again, gaps and chunk latency around the switches,
//! bytes on the wire, the time bins of the plot; the seal/open timing of a checkpoint; then
//! `results.json`, `report.md` (`templates/streams_fleet.md.j2`) and the plot.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use serde_json::{json, Value};

use super::client::{ChunkTiming, Connection};
use super::{Measured, StreamsFleetOptions, PLOT_FILE};

/// A stream's results against the solo run's.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Comparison {
    /// Results of the solo run missing from the stream.
    pub lost: u64,
    /// Results received more than once (the first one counts).
    pub duplicated: u64,
    /// Results with the solo run's `seq` but another message.
    pub different: u64,
    /// Results with a `seq` the solo run does not have.
    pub extra: u64,
    /// Results that came after a higher `seq`.
    pub out_of_order: u64,
    /// The first few problems, in words.
    pub problems: Vec<String>,
}

const PROBLEMS_KEPT: usize = 5;

impl Comparison {
    pub fn clean(&self) -> bool {
        self.lost + self.duplicated + self.different + self.extra + self.out_of_order == 0
    }

    fn add(&mut self, other: &Comparison) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.different += other.different;
        self.extra += other.extra;
        self.out_of_order += other.out_of_order;
        for p in &other.problems {
            if self.problems.len() < PROBLEMS_KEPT {
                self.problems.push(p.clone());
            }
        }
    }
}

/// Compares `got` (results as received: seq, text) with the `solo` run's.
pub fn compare(solo: &[(u64, String)], got: &[(u64, String)]) -> Comparison {
    let mut c = Comparison::default();
    let note = |c: &mut Comparison, p: String| {
        if c.problems.len() < PROBLEMS_KEPT {
            c.problems.push(p);
        }
    };
    let mut first: BTreeMap<u64, &str> = BTreeMap::new();
    let mut highest: Option<u64> = None;
    for (seq, text) in got {
        if highest.is_some_and(|h| *seq < h) {
            c.out_of_order += 1;
        }
        highest = highest.max(Some(*seq));
        if first.insert(*seq, text).is_some() {
            c.duplicated += 1;
            note(&mut c, format!("seq {seq} received twice"));
        }
    }
    let solo_seqs: BTreeSet<u64> = solo.iter().map(|(seq, _)| *seq).collect();
    for (seq, text) in solo {
        match first.get(seq) {
            None => {
                c.lost += 1;
                note(&mut c, format!("seq {seq} lost: {text}"));
            }
            Some(got) if got != text => {
                c.different += 1;
                note(&mut c, format!("seq {seq}: solo {text}, got {got}"));
            }
            Some(_) => {}
        }
    }
    for (seq, text) in &first {
        if !solo_seqs.contains(seq) {
            c.extra += 1;
            note(&mut c, format!("seq {seq} not in the solo run: {text}"));
        }
    }
    c
}

/// Count, mean, p50, p99 and max of `values` (nearest rank); zeros without values.
pub fn stats(values: &[f64]) -> Value {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let q = |q: f64| {
        if v.is_empty() {
            0.0
        } else {
            v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
        }
    };
    let mean = if v.is_empty() {
        0.0
    } else {
        v.iter().sum::<f64>() / v.len() as f64
    };
    json!({ "count": v.len(), "mean": mean, "p50": q(0.5), "p99": q(0.99), "max": q(1.0) })
}

/// The kind of a connection's end, without its details (`connect failed: ...` → `connect
/// failed`).
pub fn end_kind(end: &str) -> String {
    end.split(':').next().unwrap_or(end).trim().to_string()
}

/// A stream's resumes: (connection, whether the connection before it ended in a handover,
/// seconds from that connection's end to this one's `started`).
pub fn resumes(connections: &[Connection]) -> Vec<(&Connection, bool, f64)> {
    let mut out = Vec::new();
    let mut previous: Option<&Connection> = None;
    for conn in connections {
        let Some(started) = conn.started_s else {
            continue;
        };
        if let (Some(prev), Some(_)) = (previous, conn.resumed_from) {
            out.push((conn, prev.end == "handover", started - prev.closed_s));
        }
        previous = Some(conn);
    }
    out
}

/// Chunk latency per time bin of `width` s (by when the result came): count, p50 and p99 from
/// the send, max from the due time.
pub fn latency_bins(chunks: &[ChunkTiming], width: f64, end_s: f64) -> Vec<Value> {
    let n = (end_s / width).ceil().max(1.0) as usize;
    let mut bins: Vec<(Vec<f64>, f64)> = vec![(Vec::new(), 0.0); n];
    for c in chunks {
        let i = ((c.received_s / width) as usize).min(n - 1);
        bins[i].0.push(c.from_send_ms);
        bins[i].1 = bins[i].1.max(c.from_due_ms);
    }
    bins.iter()
        .enumerate()
        .filter(|(_, (v, _))| !v.is_empty())
        .map(|(i, (v, max_due))| {
            let s = stats(v);
            json!({ "t_s": i as f64 * width, "chunks": v.len(), "p50_ms": s["p50"],
                    "p99_ms": s["p99"], "max_from_due_ms": max_due })
        })
        .collect()
}

/// Streams connected (after `started`, before the end) to each of `ids` every `width` s.
pub fn connected_bins(
    connections: &[&Connection],
    ids: &[String],
    width: f64,
    end_s: f64,
) -> Vec<Value> {
    let n = (end_s / width).floor() as usize;
    (0..=n)
        .map(|i| {
            let t = i as f64 * width;
            let counts: BTreeMap<&str, usize> = ids
                .iter()
                .map(|id| {
                    let open = connections
                        .iter()
                        .filter(|c| {
                            c.instance.as_deref() == Some(id.as_str())
                                && c.started_s.is_some_and(|s| s <= t)
                                && c.closed_s > t
                        })
                        .count();
                    (id.as_str(), open)
                })
                .collect();
            json!({ "t_s": t, "streams": counts })
        })
        .collect()
}

/// Seals and opens, `iterations` times each, the checkpoint of the run's newest token with
/// the fleet's keys, in this process: µs per seal and per open.
pub fn seal_open(
    keys: &streamserve::stream::checkpoint::TokenKeys,
    token: Option<&str>,
    iterations: usize,
) -> Value {
    let now = streamserve::registry::now_ms();
    let Some(checkpoint) = token.and_then(|t| keys.open(t, now, u64::MAX).ok()) else {
        return Value::Null;
    };
    let started = Instant::now();
    let mut sealed = String::new();
    for _ in 0..iterations {
        sealed = std::hint::black_box(keys.seal(std::hint::black_box(&checkpoint)));
    }
    let seal_us = started.elapsed().as_secs_f64() * 1e6 / iterations as f64;
    let started = Instant::now();
    let mut opened = 0usize;
    for _ in 0..iterations {
        opened += usize::from(std::hint::black_box(keys.open(&sealed, now, u64::MAX)).is_ok());
    }
    let open_us = started.elapsed().as_secs_f64() * 1e6 / iterations as f64;
    json!({
        "iterations": iterations, "opened": opened, "token_chars": sealed.len(),
        "progress_bytes": serde_json::to_vec(&checkpoint.progress).map_or(0, |b| b.len()),
        "segments": checkpoint.tracker.segments.len(),
        "seal_us": seal_us, "open_us": open_us,
    })
}

/// results.json.
pub fn results_json(
    options: &StreamsFleetOptions,
    start: &crate::report::Start,
    m: &Measured,
    seal: &Value,
) -> Value {
    let rate = 16_000.0;
    let mut total = Comparison::default();
    let mut unfinished = Vec::new();
    let (mut received, mut checkpoints, mut ckpt_bytes, mut result_bytes, mut stream_secs) =
        (0u64, 0u64, 0u64, 0u64, 0.0);
    let (mut resent, mut held_at_resume, mut reconnect, mut gaps) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut handovers, mut broken, mut failed_attempts) = (0u64, 0u64, 0u64);
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    let mut held_max = 0u64;
    let (mut normal, mut after_send, mut after_due, mut normal_due) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, run) in m.runs.iter().enumerate() {
        let c = compare(&m.solo.results, &run.results);
        if !c.clean() {
            let mut c = c.clone();
            c.problems = c
                .problems
                .iter()
                .map(|p| format!("stream {i}: {p}"))
                .collect();
            total.add(&c);
        }
        match (run.finished_s, &run.error) {
            (Some(end), None) => stream_secs += end - run.started_s,
            (_, error) => unfinished.push(format!("stream {i}: {error:?}")),
        }
        received += run.results.len() as u64;
        checkpoints += run.checkpoints;
        ckpt_bytes += run.checkpoint_bytes;
        result_bytes += run.result_bytes;
        held_max = held_max.max(run.held_max_samples);
        gaps.extend(&run.gaps_s);
        for conn in &run.connections {
            *ends.entry(end_kind(&conn.end)).or_default() += 1;
            failed_attempts += u64::from(conn.started_s.is_none());
        }
        for (conn, handover, took) in resumes(&run.connections) {
            if handover {
                handovers += 1;
            } else {
                broken += 1;
            }
            resent.push(conn.resent_samples as f64 / rate);
            held_at_resume.push(conn.held_samples as f64 / rate);
            reconnect.push(took);
        }
        for chunk in &run.chunks {
            if chunk.after_resume {
                after_send.push(chunk.from_send_ms);
                after_due.push(chunk.from_due_ms);
            } else {
                normal.push(chunk.from_send_ms);
                normal_due.push(chunk.from_due_ms);
            }
        }
    }
    let finished = m.runs.len() - unfinished.len();
    let per_stream_s = |bytes: u64| bytes as f64 / stream_secs.max(1e-9);
    let resent_total: f64 = resent.iter().sum();
    let all_chunks: Vec<ChunkTiming> = m.runs.iter().flat_map(|r| r.chunks.clone()).collect();
    let connections: Vec<&Connection> = m.runs.iter().flat_map(|r| &r.connections).collect();
    let width = options.bin.as_secs_f64();
    let wall = m.end_s.max(1e-3);
    let body = json!({
        "settings": {
            "instances": options.instances, "streams": options.streams,
            "audio_loops": options.audio_loops, "audio_s": m.audio_secs,
            "ramp_s": options.ramp.as_secs_f64(), "checkpoint_ms": options.checkpoint_ms,
            "drain_secs": options.drain_secs, "restart_after_s": options.restart_after.as_secs_f64(),
            "restart_gap_s": options.restart_gap.as_secs_f64(), "check_ms": options.check_ms,
            "frame_ms": options.frame_ms, "bin_s": width,
        },
        "instances": m.instance_ids,
        "ports": m.ports,
        "haproxy": { "version": m.haproxy_version, "config": m.haproxy_config },
        "restarts": m.restarts.iter().map(|r| {
            let handed_over = connections.iter().filter(|c| {
                c.instance.as_deref() == Some(r.instance.as_str())
                    && c.end == "handover"
                    && (r.term_s..=r.exited_s + 1.0).contains(&c.closed_s)
            }).count();
            let mut v = json!(r);
            v["handed_over"] = json!(handed_over);
            v
        }).collect::<Vec<_>>(),
        "end_s": m.end_s,
        "streams": { "count": m.runs.len(), "finished": finished, "unfinished": unfinished },
        "results": {
            "solo": m.solo.results.len(),
            "expected": m.solo.results.len() * m.runs.len(),
            "received": received,
            "comparison": total,
            "passed": total.clean() && finished == m.runs.len(),
        },
        "resumes": {
            "total": handovers + broken, "handover": handovers, "broken": broken,
            "failed_attempts": failed_attempts, "connection_ends": ends,
        },
        "resent_s": {
            "per_resume": stats(&resent), "total": resent_total,
            "share_of_audio": resent_total / (m.audio_secs * m.runs.len() as f64).max(1e-9),
        },
        "held_s": {
            "max_behind_checkpoint": held_max as f64 / rate,
            "at_resume": stats(&held_at_resume),
        },
        "reconnect_s": stats(&reconnect),
        "gap_s": stats(&gaps),
        "latency_ms": {
            "normal": stats(&normal),
            "normal_from_due": stats(&normal_due),
            "after_resume": stats(&after_send),
            "after_resume_from_due": stats(&after_due),
            "after_resume_window_s": super::client::AFTER_RESUME.as_secs_f64(),
        },
        "bytes": {
            "checkpoints": checkpoints,
            "checkpoints_per_stream_s": checkpoints as f64 / stream_secs.max(1e-9),
            "checkpoint_message_mean": ckpt_bytes as f64 / (checkpoints.max(1) as f64),
            "checkpoint_per_stream_s": per_stream_s(ckpt_bytes),
            "results_per_stream_s": per_stream_s(result_bytes),
            "audio_per_stream_s": rate * 2.0,
        },
        "seal": seal,
        "cpu": m.cpu.iter().map(|(part, s)| json!({ "part": part, "seconds": s, "cores": s / wall })).collect::<Vec<_>>(),
        "timeline": latency_bins(&all_chunks, width, m.end_s),
        "connected": connected_bins(&connections, &m.instance_ids, width, m.end_s),
    });
    start.results_json(Some("streams_fleet"), &options.common.command, body)
}

/// Writes `report.md`, `results.json` and the plot; also says whether every stream finished
/// with exactly the solo run's results.
pub fn write(
    options: &StreamsFleetOptions,
    start: &crate::report::Start,
    m: &Measured,
    seal: &Value,
) -> anyhow::Result<(crate::report::Outcome, bool)> {
    let results = results_json(options, start, m, seal);
    let header = crate::report::header(
        "streamserve streams fleet drill: real-time speech streams through a rolling restart",
        start.at.elapsed(),
        &[format!(
            "a {}-core VM shared by everything: {} `streamserve` instances, haproxy and the load generator (all {} streams) run on the same cores",
            start.machine.nproc, options.instances, options.streams
        )],
        true,
    );
    let extra = json!({ "plot": PLOT_FILE });
    let report = crate::report::render(
        "streams_fleet",
        &crate::report::context(&results, &[header, extra]),
    )?;
    let passed = results["results"]["passed"] == true;
    let outcome = crate::report::save_run(
        start.dir.clone(),
        "streams-fleet",
        report,
        &results,
        Some((PLOT_FILE, crate::plots::streams_fleet as _)),
    )?;
    Ok((outcome, passed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(seq: u64, text: &str) -> (u64, String) {
        (seq, text.to_string())
    }

    #[test]
    fn a_stream_is_compared_with_the_solo_run_result_by_result() {
        let solo = vec![r(0, "a"), r(1, "b"), r(2, "c"), r(3, "d")];
        assert!(compare(&solo, &solo).clean());
        let got = vec![
            r(0, "a"),
            r(1, "b"),
            r(1, "b"),
            r(3, "x"),
            r(2, "c"),
            r(7, "z"),
        ];
        let c = compare(&solo, &got);
        assert_eq!(
            (c.lost, c.duplicated, c.different, c.extra, c.out_of_order),
            (0, 1, 1, 1, 1)
        );
        let c = compare(&solo, &[r(0, "a"), r(3, "d")]);
        assert_eq!((c.lost, c.duplicated, c.different, c.extra), (2, 0, 0, 0));
        assert!(c.problems[0].contains("seq 1 lost"), "{:?}", c.problems);
    }

    #[test]
    fn stats_use_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let s = stats(&v);
        assert_eq!(
            (s["p50"].as_f64(), s["p99"].as_f64()),
            (Some(50.0), Some(99.0))
        );
        assert_eq!(
            (s["max"].as_f64(), s["mean"].as_f64()),
            (Some(100.0), Some(50.5))
        );
        assert_eq!(stats(&[])["count"], 0);
        assert_eq!(stats(&[3.0])["p99"], 3.0);
    }

    fn conn(
        instance: &str,
        started: Option<f64>,
        closed: f64,
        end: &str,
        resumed: bool,
    ) -> Connection {
        Connection {
            instance: Some(instance.into()),
            started_s: started,
            closed_s: closed,
            end: end.into(),
            resumed_from: (resumed && started.is_some()).then_some(16_000),
            resent_samples: 8_000,
            ..Connection::default()
        }
    }

    #[test]
    fn resumes_are_told_apart_by_how_the_connection_before_ended() {
        let conns = vec![
            conn("s0", Some(0.0), 10.0, "handover", false),
            conn("s0", None, 10.1, "close 502", true),
            conn("s1", Some(10.3), 20.0, "broken", true),
            conn("s2", Some(20.5), 30.0, "done", true),
        ];
        let r = resumes(&conns);
        assert_eq!(r.len(), 2);
        assert!(r[0].1 && !r[1].1);
        assert!((r[0].2 - 0.3).abs() < 1e-9 && (r[1].2 - 0.5).abs() < 1e-9);
        assert_eq!(end_kind("connect failed: refused"), "connect failed");
        let refs: Vec<&Connection> = conns.iter().collect();
        let ids = vec!["s0".to_string(), "s1".to_string()];
        let bins = connected_bins(&refs, &ids, 5.0, 20.0);
        assert_eq!(bins.len(), 5);
        assert_eq!(bins[1]["streams"]["s0"], 1);
        assert_eq!(bins[2]["streams"]["s0"], 0);
        assert_eq!(bins[3]["streams"]["s1"], 1);
    }

    #[test]
    fn latency_bins_split_by_arrival() {
        let c = |t: f64, ms: f64| ChunkTiming {
            received_s: t,
            from_send_ms: ms,
            from_due_ms: ms + 1.0,
            after_resume: false,
        };
        let bins = latency_bins(&[c(0.1, 2.0), c(0.2, 4.0), c(1.7, 30.0)], 0.5, 2.0);
        assert_eq!(bins.len(), 2);
        assert_eq!(bins[0]["chunks"], 2);
        assert_eq!(bins[0]["p99_ms"], 4.0);
        assert_eq!(bins[1]["t_s"], 1.5);
        assert_eq!(bins[1]["max_from_due_ms"], 31.0);
    }
}
