//! The streams fleet drill's plot (`streams-fleet.svg`), from a `loadgen streams-fleet`
//! results.json: chunk latency per time bin (p50 and p99 from the send, max from the due time;
//! log scale) over the streams connected to each instance, on one time axis, with each
//! instance's SIGTERM (black) and its return to ready (grey) as dashed lines.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::{bin_latencies, canvas, f, items, legend_box, plot_err, time_panel, Points, PALETTE};

pub fn streams_fleet(results: &Value, out: &Path) -> anyhow::Result<()> {
    let bins: Vec<&Value> = items(results, "timeline").collect();
    if bins.is_empty() {
        anyhow::bail!("no latency bins in the results");
    }
    let width = f(&results["settings"]["bin_s"]).max(1e-3);
    let end = f(&results["end_s"]).max(width);
    let ([p50, p99, max], (y_min, y_max)) = bin_latencies(&bins, width, "max_from_due_ms");
    let marks: Vec<(f64, RGBColor)> = items(results, "restarts")
        .flat_map(|r| {
            [
                (f(&r["term_s"]), BLACK),
                (f(&r["ready_s"]), RGBColor(150, 150, 150)),
            ]
        })
        .collect();

    let title =
        "Streams fleet drill: real-time VAD streams through haproxy during a rolling restart";
    let root = canvas(out, (1100, 760), Some((title, 20)))?;
    let panels = root.split_evenly((2, 1));

    let lines = [
        ("p50 from send", p50, PALETTE[0], 2),
        ("p99 from send", p99, PALETTE[3], 2),
        ("max from due (real-time schedule)", max, PALETTE[4], 1),
    ];
    let caption = "chunk latency per bin, ms (log); dashed: SIGTERM (black), ready again (grey)";
    let mut chart = time_panel(
        &panels[0],
        (Some(caption), 30, false),
        (end, (y_min..y_max).log_scale(), (y_min, y_max)),
        (None, "ms (log)", 1),
        &lines,
        marks.iter().copied(),
    )?;
    legend_box(&mut chart, SeriesLabelPosition::UpperRight)?;

    let ids: Vec<String> = items(results, "instances")
        .filter_map(|i| i.as_str().map(str::to_string))
        .collect();
    let connected: Vec<&Value> = items(results, "connected").collect();
    let c_max = connected
        .iter()
        .flat_map(|c| ids.iter().map(|id| f(&c["streams"][id])))
        .fold(1.0, f64::max)
        * 1.15;
    let lines: Vec<_> = (ids.iter().enumerate())
        .map(|(i, id)| {
            let points: Points = (connected.iter())
                .map(|c| (f(&c["t_s"]), f(&c["streams"][id])))
                .collect();
            (id, points, PALETTE[i % PALETTE.len()], 2)
        })
        .collect();
    let mut chart = time_panel(
        &panels[1],
        (Some("streams connected per instance"), 40, false),
        (end, 0.0..c_max, (0.0, c_max)),
        (Some("seconds since the first stream opened"), "streams", 0),
        &lines,
        marks,
    )?;
    legend_box(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_fleet_plot_writes_svg() {
        let results = serde_json::json!({
            "settings": { "bin_s": 0.5 }, "end_s": 2.0, "instances": ["s0", "s1"],
            "timeline": [
                { "t_s": 0.0, "p50_ms": 2.0, "p99_ms": 5.0, "max_from_due_ms": 9.0 },
                { "t_s": 0.5, "p50_ms": 3.0, "p99_ms": 400.0, "max_from_due_ms": 900.0 },
            ],
            "connected": [
                { "t_s": 0.0, "streams": { "s0": 2, "s1": 2 } },
                { "t_s": 1.0, "streams": { "s0": 0, "s1": 4 } },
            ],
            "restarts": [ { "term_s": 0.6, "ready_s": 1.2 } ],
        });
        let svg = super::super::tests::render(streams_fleet, &results);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("p99 from send"));
        assert!(svg.contains("s1"));
        assert!(streams_fleet(&serde_json::json!({}), Path::new("/nonexistent/x.svg")).is_err());
    }
}
