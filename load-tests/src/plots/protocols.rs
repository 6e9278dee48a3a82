//! The protocols plot (`protocols.svg`), from a `loadgen protocols` results.json: throughput
//! (left) and p50 / p99 latency (right) against the concurrency level, one colour per client
//! (REST JSON, REST binary, gRPC unary, gRPC stream), both axes of the right panel log.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::{
    axes, canvas, chart_on, draw_p50_p99, f, items, legend_box, line_with_dots, plot_err, Setup,
    PALETTE,
};

/// Each client's label and levels: (concurrency, req/s, p50 ms, p99 ms).
fn series(results: &Value) -> Vec<Setup<(f64, f64, f64, f64)>> {
    items(results, "protocols")
        .map(|p| {
            let key = &p["key"];
            let points = items(results, "levels")
                .filter_map(|level| {
                    let run = items(level, "runs").find(|r| &r["protocol"] == key)?;
                    let lat = |q: &str| f(&run["latency_ms"][q]);
                    Some((
                        f(&level["concurrency"]),
                        f(&run["requests_per_s"]),
                        lat("p50"),
                        lat("p99"),
                    ))
                })
                .filter(|p| p.0 > 0.0)
                .collect();
            (p["label"].as_str().unwrap_or("?").to_string(), points)
        })
        .collect()
}

/// Throughput and latency per concurrency level, one line per client.
pub fn protocols(results: &Value, out: &Path) -> anyhow::Result<()> {
    let all = series(results);
    let points = all.iter().flat_map(|s| s.1.iter());
    let c_max = points.clone().map(|p| p.0).fold(1.0, f64::max) * 1.5;
    let r_max = points.clone().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let y_max = points.clone().map(|p| p.3).fold(1.0, f64::max) * 2.0;
    let y_min = points
        .filter(|p| p.2 > 0.0)
        .map(|p| p.2)
        .fold(y_max / 10.0, f64::min)
        .max(0.001)
        / 1.5;

    let rows = results["rows_per_request"].as_u64().unwrap_or(1);
    // `loadgen monitoring` writes the same shape, its server variants as the clients.
    let title = match results["plot_title"].as_str() {
        Some(title) => title.to_string(),
        None => format!(
            "mlp, {rows} row/request, one server: REST JSON / binary vs gRPC unary / stream (closed loop)"
        ),
    };
    let root = canvas(out, (1100, 500), Some((&title, 20)))?;
    let (left, right) = root.split_horizontally(550);

    let mut chart = chart_on(&left, (10, 45, 70, false))
        .build_cartesian_2d((0.7..c_max).log_scale(), 0.0..r_max)
        .map_err(plot_err)?;
    let descs = (Some("requests in flight (log)"), "requests/s");
    axes(&mut chart, descs, (0, "", 0), None)?;
    for (i, (label, points)) in all.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let xy = points.iter().map(|p| (p.0, p.1));
        line_with_dots(&mut chart, xy, color, 4, label.as_str())?;
    }
    legend_box(&mut chart, SeriesLabelPosition::LowerRight)?;

    let mut chart = chart_on(&right, (10, 45, 70, false))
        .build_cartesian_2d((0.7..c_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(plot_err)?;
    let descs = (Some("requests in flight (log)"), "latency, ms (log)");
    axes(&mut chart, descs, (0, "", 2), None)?;
    let mark = |p: &(f64, f64, f64, f64), color: RGBColor| {
        TriangleMarker::new((p.0, p.3), 4, color.filled())
    };
    draw_p50_p99(&mut chart, &all, ("p99", 3), |p| (p.0, p.2, p.3), mark)?;
    legend_box(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::render;
    use super::*;

    #[test]
    fn protocols_plot_writes_svg() {
        let results = serde_json::json!({
            "rows_per_request": 1,
            "protocols": [ { "key": "rest-json", "label": "REST JSON" },
                           { "key": "grpc-stream", "label": "gRPC stream" } ],
            "levels": [
                { "concurrency": 1, "runs": [
                    { "protocol": "rest-json", "requests_per_s": 1500.0, "latency_ms": { "p50": 0.6, "p99": 1.2 } },
                    { "protocol": "grpc-stream", "requests_per_s": 2500.0, "latency_ms": { "p50": 0.4, "p99": 0.9 } } ] },
                { "concurrency": 32, "runs": [
                    { "protocol": "rest-json", "requests_per_s": 6000.0, "latency_ms": { "p50": 5.0, "p99": 9.0 } } ] },
            ],
        });
        let svg = render(protocols, &results);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("gRPC stream p99"));
        assert!(svg.contains("REST JSON"));
    }
}
