//! The overload plot (`overload.svg`): goodput (left) and the latency of admitted requests
//! (right) against the offered load, one line per admission variant, from a `loadgen
//! overload` results.json; a results.json from before the variants (levels at the top)
//! draws as one unnamed variant.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::{
    axes, canvas, chart_on, f, items, legend_box, line, line_with_dots, plot_err, PALETTE,
};

/// One variant's levels: (multiplier, goodput/s, primary p50 ms, primary p99 ms).
struct Series {
    label: String,
    points: Vec<(f64, f64, f64, f64)>,
}

fn series(results: &Value) -> Vec<Series> {
    let points = |v: &Value| {
        items(v, "levels")
            .map(|l| {
                let lat = |q: &str| f(&l["latency_primary_ms"][q]);
                (
                    f(&l["multiplier"]),
                    f(&l["goodput_per_s"]),
                    lat("p50"),
                    lat("p99"),
                )
            })
            .collect()
    };
    if results.get("variants").is_some() {
        items(results, "variants")
            .map(|v| Series {
                label: v["label"].as_str().unwrap_or("?").to_string(),
                points: points(v),
            })
            .collect()
    } else {
        vec![Series {
            label: String::new(),
            points: points(results),
        }]
    }
}

/// `label` then `what`, or `what` alone for an unnamed variant.
fn named(label: &str, what: &str) -> String {
    if label.is_empty() {
        what.to_string()
    } else {
        format!("{label} {what}")
    }
}

/// Goodput (left) and p50/p99 latency of the requests `mlp` answered itself (right) per
/// offered load, one colour per admission variant; the offered rate and the measured
/// capacity (of the variant the rates come from) as references.
pub fn overload_levels(results: &Value, out: &Path) -> anyhow::Result<()> {
    let capacity = f(&results["capacity"]["requests_per_s"]);
    let all = series(results);
    let m_max = all
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0, f64::max)
        * 1.1;
    let title = if results["pinned"].is_object() {
        "Overload, mlp with slo_ms + fallback, pinned: per offered load (open loop)"
    } else {
        "Overload, mlp with slo_ms + fallback: per offered load (open loop)"
    };
    let root = canvas(out, (1100, 500), Some((title, 20)))?;
    let (left, right) = root.split_horizontally(550);

    let y_max = all
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(capacity * 1.5, f64::max)
        .max(1.0)
        * 1.1;
    let mut chart = chart_on(&left, (15, 45, 60, false))
        .build_cartesian_2d(0.0..m_max, 0.0..y_max)
        .map_err(plot_err)?;
    let descs = (Some("offered, × capacity"), "goodput, 200 answers/s");
    axes(&mut chart, descs, (1, "×", 0), None)?;
    let grey = RGBColor(150, 150, 150);
    let label = format!("capacity ({capacity:.0}/s)");
    line(
        &mut chart,
        [(0.0, capacity), (m_max, capacity)],
        (BLACK, 1, 1),
        label,
    )?;
    // Goodput = offered, up to the top of the chart.
    let top = if capacity > 0.0 {
        (y_max / capacity).min(m_max)
    } else {
        m_max
    };
    let offered = [(0.0, 0.0), (top, top * capacity)];
    line(&mut chart, offered, (grey, 1, 1), "offered")?;
    for (i, s) in all.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let points = s.points.iter().map(|p| (p.0, p.1));
        line_with_dots(&mut chart, points, color, 4, named(&s.label, "goodput"))?;
    }
    legend_box(&mut chart, SeriesLabelPosition::UpperLeft)?;

    let latencies = || all.iter().flat_map(|s| s.points.iter());
    let lat_max = latencies().map(|p| p.3).fold(1.0, f64::max) * 1.5;
    let lat_min = latencies()
        .map(|p| p.2)
        .filter(|v| *v > 0.0)
        .fold(lat_max / 10.0, f64::min)
        / 1.5;
    let mut chart = chart_on(&right, (15, 45, 60, false))
        .build_cartesian_2d(0.0..m_max, (lat_min..lat_max).log_scale())
        .map_err(plot_err)?;
    let descs = (
        Some("offered, × capacity"),
        "admitted (mlp 200) latency, ms (log)",
    );
    axes(&mut chart, descs, (1, "×", 1), None)?;
    for (i, s) in all.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let p99 = s.points.iter().filter(|p| p.3 > 0.0).map(|p| (p.0, p.3));
        line_with_dots(&mut chart, p99, color, 4, named(&s.label, "p99"))?;
        let p50: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.2 > 0.0)
            .map(|p| (p.0, p.2))
            .collect();
        line(&mut chart, p50, (color, 1, 1), named(&s.label, "p50"))?;
    }
    legend_box(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::render;
    use super::*;

    fn level(m: f64, goodput: f64, p50: f64, p99: f64) -> Value {
        serde_json::json!({ "multiplier": m, "offered_per_s": 5000.0 * m, "goodput_per_s": goodput,
            "latency_primary_ms": { "p50": p50, "p99": p99 } })
    }

    #[test]
    fn overload_plot_draws_a_line_per_variant() {
        let results = serde_json::json!({
            "capacity": { "requests_per_s": 5000.0 },
            "pinned": { "server_cpu": 0, "loadgen_cpu": 1 },
            "variants": [
                { "label": "static", "levels": [level(1.0, 4900.0, 2.0, 20.0), level(2.0, 5200.0, 30.0, 600.0)] },
                { "label": "adaptive", "levels": [level(1.0, 4900.0, 2.0, 15.0), level(2.0, 5100.0, 5.0, 30.0)] },
            ],
        });
        let svg = render(overload_levels, &results);
        assert!(svg.starts_with("<svg"));
        for text in [
            "static goodput",
            "adaptive goodput",
            "static p99",
            "adaptive p50",
            "pinned",
        ] {
            assert!(svg.contains(text), "{text}");
        }
    }

    #[test]
    fn an_overload_plot_from_before_the_variants_still_draws() {
        let results = serde_json::json!({
            "capacity": { "requests_per_s": 5000.0 },
            "levels": [ level(1.0, 4900.0, 2.0, 20.0), level(2.0, 5200.0, 30.0, 60.0) ],
        });
        let svg = render(overload_levels, &results);
        assert!(svg.contains(">goodput<") || svg.contains("goodput"));
        assert!(!svg.contains("static"));
    }
}
