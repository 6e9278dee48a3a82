//! The timeline plot (`timeline.svg`): latency, outcomes and server state over time across an
//! overload step and injected faults, from a `loadgen timeline` results.json.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::{
    axes, bin_latencies, canvas, chart_on, f, items, legend_box, legend_line, line, plot_err,
    time_panel, vertical_marks, PALETTE,
};

/// Latency, outcomes and server state over time, from a `loadgen timeline` results.json:
/// three panels on one time axis (p50/p99/max latency per bin, log; requests/s per bin by
/// outcome; healthy replicas and queue depth from `/metrics`), the events as dashed lines.
pub fn timeline(results: &Value, out: &Path) -> anyhow::Result<()> {
    let bin_s = f(&results["bin_s"]).max(1e-3);
    let duration = f(&results["duration_s"]).max(bin_s);
    let bins: Vec<&Value> = items(results, "bins").collect();
    let events: Vec<(f64, String)> = items(results, "events")
        .map(|e| {
            (
                f(&e["at_s"]),
                e["label"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    let server: Vec<&Value> = items(results, "server").collect();
    let mid = |b: &Value| f(&b["t_s"]) + bin_s / 2.0;
    let ([p50, p99, max], (y_min, y_max)) = bin_latencies(&bins, bin_s, "max_ms");

    let title = "Timeline: mlp through an overload step and worker faults (open loop, bins by scheduled send)";
    let root = canvas(out, (1100, 980), Some((title, 20)))?;
    let panels = root.split_evenly((3, 1));
    let marks = || events.iter().map(|(t, _)| (*t, BLACK));

    // Latency.
    let lines = [
        ("p50", p50, PALETTE[0], 2),
        ("p99", p99, PALETTE[1], 2),
        ("max", max, PALETTE[2], 1),
    ];
    let mut chart = time_panel(
        &panels[0],
        (None, 30, true),
        (duration, (y_min..y_max).log_scale(), (y_min, y_max)),
        (None, "latency of 200s, ms (log)", 1),
        &lines,
        marks(),
    )?;
    for (i, (t, label)) in events.iter().enumerate() {
        let y = if i % 2 == 0 { y_max / 1.6 } else { y_max / 3.2 };
        chart
            .draw_series(std::iter::once(Text::new(
                format!(" {label}"),
                (*t, y),
                ("sans-serif", 12),
            )))
            .map_err(plot_err)?;
    }
    legend_box(&mut chart, SeriesLabelPosition::LowerRight)?;

    // Requests per second by outcome.
    let per_s = |key: &str| -> Vec<(f64, f64)> {
        bins.iter().map(|b| (mid(b), f(&b[key]) / bin_s)).collect()
    };
    let series = [
        ("offered (scheduled)", per_s("scheduled"), BLACK, 1),
        ("200 from mlp", per_s("ok_primary"), PALETTE[0], 2),
        (
            "200 from fallback (degraded)",
            per_s("ok_degraded"),
            PALETTE[3],
            2,
        ),
        ("shed 429/503", per_s("shed"), PALETTE[1], 2),
        (
            "failed (other status, transport)",
            per_s("failed"),
            PALETTE[4],
            2,
        ),
        (
            "not sent (load generator's in-flight bound)",
            per_s("not_sent"),
            PALETTE[5],
            2,
        ),
    ];
    let r_max = series
        .iter()
        .flat_map(|s| s.1.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let mut chart = time_panel(
        &panels[1],
        (None, 30, true),
        (duration, 0.0..r_max, (0.0, r_max)),
        (None, "requests/s (per bin)", 0),
        &series,
        marks(),
    )?;
    legend_box(&mut chart, SeriesLabelPosition::UpperRight)?;

    // The server's view.
    let healthy: Vec<(f64, f64)> = server
        .iter()
        .map(|s| (f(&s["t_s"]), f(&s["healthy_replicas"])))
        .collect();
    let queue: Vec<(f64, f64)> = server
        .iter()
        .map(|s| (f(&s["t_s"]), f(&s["queue_depth"])))
        .collect();
    let h_max = (healthy.iter().map(|p| p.1).fold(1.0, f64::max) + 1.0).round();
    let q_max = queue.iter().map(|p| p.1).fold(1.0, f64::max) * 1.2;
    let mut chart = chart_on(&panels[2], (10, 40, 70, true))
        .build_cartesian_2d(0.0..duration, 0.0..h_max)
        .map_err(plot_err)?
        .set_secondary_coord(0.0..duration, 0.0..q_max);
    let descs = (
        Some("seconds since the first scheduled request"),
        "healthy mlp replicas",
    );
    axes(&mut chart, descs, (0, " s", 0), Some(h_max as usize + 1))?;
    chart
        .configure_secondary_axes()
        .y_desc("mlp queue depth")
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(plot_err)?;
    let label = "healthy replicas (left; /metrics every 200 ms)";
    line(
        &mut chart,
        healthy.iter().copied(),
        (PALETTE[2], 2, 2),
        label,
    )?;
    let color = PALETTE[5];
    chart
        .draw_secondary_series(LineSeries::new(
            queue.iter().copied(),
            color.stroke_width(1),
        ))
        .map_err(plot_err)?
        .label("queue depth (right)")
        .legend(legend_line(color, 2));
    vertical_marks(&mut chart, marks(), (0.0, h_max))?;
    legend_box(&mut chart, SeriesLabelPosition::LowerLeft)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::render;
    use super::*;

    #[test]
    fn timeline_plot_writes_svg() {
        let results = serde_json::json!({
            "bin_s": 0.1, "duration_s": 0.3,
            "events": [ { "at_s": 0.1, "label": "every replica panics" } ],
            "bins": [
                { "t_s": 0.0, "scheduled": 10, "ok_primary": 10, "ok_degraded": 0, "shed": 0,
                  "failed": 0, "not_sent": 0, "p50_ms": 1.0, "p99_ms": 2.0, "max_ms": 3.0 },
                { "t_s": 0.1, "scheduled": 10, "ok_primary": 2, "ok_degraded": 6, "shed": 2,
                  "failed": 0, "not_sent": 0, "p50_ms": 10.0, "p99_ms": 90.0, "max_ms": 99.0 },
                { "t_s": 0.2, "scheduled": 10, "ok_primary": 0, "ok_degraded": 0, "shed": 0,
                  "failed": 10, "not_sent": 0, "p50_ms": null, "p99_ms": null, "max_ms": null } ],
            "server": [ { "t_s": 0.0, "healthy_replicas": 2.0, "queue_depth": 0.0 },
                        { "t_s": 0.2, "healthy_replicas": 0.0, "queue_depth": 40.0 } ],
        });
        let svg = render(timeline, &results);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("every replica panics"));
        assert!(svg.contains("degraded"));
        assert!(svg.contains("queue depth"));
    }
}
