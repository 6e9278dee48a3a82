//! SVG plots (plotters, SVG backend: text is written as SVG `<text>`, no system fonts
//! needed) drawn from a benchmark's `results.json`, so that they can be redrawn from any
//! saved run (`loadgen plot DIR`).
//!
//! - [`bench_latency_throughput`]: p50 and p99 latency against throughput per server, one
//!   point per concurrency level, the in-process ceiling as a vertical line;
//! - [`overload_levels`]: goodput and admitted latency per offered load, per admission variant;
//! - [`streams_latency`]: chunk latency against concurrent streams per setup;
//! - [`timeline()`]: latency, outcomes and server state over time across overload and faults;
//! - [`fleet()`]: traffic share per model version over time, one panel per fleet drill;
//! - [`streams_fleet()`]: chunk latency and streams per instance through a rolling restart;
//! - [`protocols()`]: throughput and latency per concurrency of REST JSON / binary and gRPC
//!   unary / stream against one server.

mod fleet;
mod overload;
mod protocols;
mod streams_fleet;
mod timeline;

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;
use serde_json::Value;

pub use fleet::fleet;
pub use overload::overload_levels;
pub use protocols::protocols;
pub use streams_fleet::streams_fleet;
pub use timeline::timeline;

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

/// Each server's label and curve: (throughput req/s, p50 ms, p99 ms) per level.
fn bench_curves(results: &Value) -> Vec<Setup<(f64, f64, f64)>> {
    items(results, "servers")
        .map(|s| {
            let points = items(s, "runs")
                .map(|r| (f(&r["requests_per_s"]), p50(r), f(&r["latency_ms"]["p99"])))
                .filter(|p| p.0 > 0.0 && p.1 > 0.0 && p.2 > 0.0);
            (label(s), points.collect())
        })
        .collect()
}

/// The entries of array `key` of `v` (none when it is missing).
fn items<'a>(v: &'a Value, key: &str) -> impl Iterator<Item = &'a Value> + Clone {
    v[key].as_array().into_iter().flatten()
}

/// A server's setup label.
fn label(server: &Value) -> String {
    server["setup"]["label"].as_str().unwrap_or("?").to_string()
}

fn p50(v: &Value) -> f64 {
    f(&v["latency_ms"]["p50"])
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plotting failed: {e:?}")
}

/// A white SVG canvas of `size` pixels written to `out`, under `title` (at `font` px) if any.
fn canvas<'a>(
    out: &'a Path,
    size: (u32, u32),
    title: Option<(&str, u32)>,
) -> anyhow::Result<Area<'a>> {
    let root = SVGBackend::new(out, size).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    match title {
        Some((title, font)) => root.titled(title, ("sans-serif", font)).map_err(plot_err),
        None => Ok(root),
    }
}

/// The legend entry of a line: a short stroke in its colour.
fn legend_line(color: RGBColor, width: u32) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(width))
}

/// Each setup's latency against x, in palette order: p50 as a thick line with circles of
/// `circle` px, p99 as a thin line, each with its legend entry (`{label} p50`, `{label}
/// {p99_legend}`), then `mark` (in the setup's colour) at each point: the p99 markers, which
/// say different things per plot. `xyy` gives a point's (x, p50, p99).
fn draw_p50_p99<'b, X, Y, P, E>(
    chart: &mut Chart<'_, 'b, X, Y>,
    setups: &[Setup<P>],
    (p99_legend, circle): (&str, u32),
    xyy: impl Fn(&P) -> (f64, f64, f64),
    mark: impl Fn(&P, RGBColor) -> E,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
    E: plotters::element::Drawable<SVGBackend<'b>>,
    for<'c> &'c E: plotters::element::PointCollection<'c, (f64, f64)>,
{
    for (i, (label, points)) in setups.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let p50 = points.iter().map(&xyy).map(|p| (p.0, p.1));
        line_with_dots(chart, p50, color, circle, format!("{label} p50"))?;
        let p99 = points.iter().map(&xyy).map(|p| (p.0, p.2));
        // The element type named: `E`'s bounds would otherwise be taken for the line's.
        chart
            .draw_series::<_, DynElement<'static, SVGBackend<'b>, (f64, f64)>, _, _>(
                LineSeries::new(p99, color.stroke_width(1)),
            )
            .map_err(plot_err)?
            .label(format!("{label} {p99_legend}"))
            .legend(move |(x, y)| TriangleMarker::new((x + 10, y), 4, color.filled()));
        let marks = points.iter().map(|p| mark(p, color));
        chart.draw_series(marks).map_err(plot_err)?;
    }
    Ok(())
}

/// Every plot's legend: a framed, mostly opaque box at `position`.
fn legend_box<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)
}

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;
type Points = Vec<(f64, f64)>;
/// A setup's (server's, client's) label and its points.
type Setup<P> = (String, Vec<P>);
type Chart<'a, 'b, X, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<X, Y>>;

/// A chart on `area` with every plot's margins: (margin, x label area, y label areas, both
/// sides).
fn chart_on<'a, 'b>(
    area: &'a Area<'b>,
    (margin, x_area, y_area, both): (u32, u32, u32, bool),
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(area);
    builder
        .margin(margin)
        .x_label_area_size(x_area)
        .y_label_area_size(y_area);
    if both {
        builder.right_y_label_area_size(y_area);
    }
    builder
}

/// The axes of a chart: descriptions and label formats with `x_digits` / `y_digits`
/// decimals (`x_unit` after each x label).
fn axes<X, Y>(
    chart: &mut Chart<'_, '_, X, Y>,
    (x_desc, y_desc): (Option<&str>, &str),
    (x_digits, x_unit, y_digits): (usize, &str, usize),
    y_labels: Option<usize>,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let xf = move |v: &f64| format!("{v:.x_digits$}{x_unit}");
    let yf = move |v: &f64| format!("{v:.y_digits$}");
    let mut mesh = chart.configure_mesh();
    if let Some(d) = x_desc {
        mesh.x_desc(d);
    }
    if let Some(n) = y_labels {
        mesh.y_labels(n);
    }
    mesh.y_desc(y_desc)
        .x_label_formatter(&xf)
        .y_label_formatter(&yf)
        .draw()
        .map_err(plot_err)
}

/// A line through `points` with its legend entry `label` (a stroke `legend_width` wide).
fn line<X, Y>(
    chart: &mut Chart<'_, '_, X, Y>,
    points: impl IntoIterator<Item = (f64, f64)>,
    (color, width, legend_width): (RGBColor, u32, u32),
    label: impl Into<String>,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(width)))
        .map_err(plot_err)?
        .label(label)
        .legend(legend_line(color, legend_width));
    Ok(())
}

/// A 2 px line through `points` with a filled circle of `size` px on each, and its legend
/// entry `label`.
fn line_with_dots<X, Y>(
    chart: &mut Chart<'_, '_, X, Y>,
    points: impl IntoIterator<Item = (f64, f64)> + Clone,
    color: RGBColor,
    size: u32,
    label: impl Into<String>,
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    line(chart, points.clone(), (color, 2, 2), label)?;
    chart
        .draw_series(
            points
                .into_iter()
                .map(|p| Circle::new(p, size, color.filled())),
        )
        .map_err(plot_err)?;
    Ok(())
}

/// Dashed vertical lines from `y0` to `y1` at each `(x, colour)` of `marks`: the events on a
/// time axis.
fn vertical_marks<X, Y>(
    chart: &mut Chart<'_, '_, X, Y>,
    marks: impl IntoIterator<Item = (f64, RGBColor)>,
    (y0, y1): (f64, f64),
) -> anyhow::Result<()>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for (x, color) in marks {
        let dashed = DashedLineSeries::new([(x, y0), (x, y1)], 6, 4, color.stroke_width(1));
        chart.draw_series(dashed).map_err(plot_err)?;
    }
    Ok(())
}

/// One panel on a time axis from 0 to `end` s, under `caption` if any: `lines` (name, points,
/// colour, width) against `y`, and `marks` as dashed lines across `y_span`; the caller adds
/// what else it shows and its legend.
fn time_panel<'a, 'b, Y>(
    area: &'a Area<'b>,
    (caption, x_area, both): (Option<&str>, u32, bool),
    (end, y, y_span): (f64, Y, (f64, f64)),
    (x_desc, y_desc, y_digits): (Option<&str>, &str, usize),
    lines: &[(impl AsRef<str>, impl AsRef<[(f64, f64)]>, RGBColor, u32)],
    marks: impl IntoIterator<Item = (f64, RGBColor)>,
) -> anyhow::Result<Chart<'a, 'b, plotters::coord::types::RangedCoordf64, Y::CoordDescType>>
where
    Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
    Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let mut builder = chart_on(area, (10, x_area, 70, both));
    if let Some(caption) = caption {
        builder.caption(caption, ("sans-serif", 14));
    }
    let mut chart = builder.build_cartesian_2d(0.0..end, y).map_err(plot_err)?;
    axes(&mut chart, (x_desc, y_desc), (0, " s", y_digits), None)?;
    for (name, points, color, width) in lines {
        let points = points.as_ref().iter().copied();
        line(&mut chart, points, (*color, *width, 2), name.as_ref())?;
    }
    vertical_marks(&mut chart, marks, y_span)?;
    Ok(chart)
}

/// p50, p99 and max (`max_key`) latency per time bin of `width` s, at the bin's middle where it
/// has one, and a log axis over them: from under the lowest p50 to 3× the highest.
fn bin_latencies(bins: &[&Value], width: f64, max_key: &str) -> ([Points; 3], (f64, f64)) {
    let [p50, p99, max] = ["p50_ms", "p99_ms", max_key].map(|key| {
        bins.iter()
            .filter_map(|b| {
                let v = b[key].as_f64().filter(|v| *v > 0.0)?;
                Some((f(&b["t_s"]) + width / 2.0, v))
            })
            .collect::<Vec<_>>()
    });
    let y_max = max.iter().chain(&p99).map(|p| p.1).fold(1.0, f64::max) * 3.0;
    let y_min = p50
        .iter()
        .map(|p| p.1)
        .fold(y_max / 10.0, f64::min)
        .max(0.01)
        / 1.5;
    ([p50, p99, max], (y_min, y_max))
}

/// Latency (p50 solid with circles, p99 thin with triangles) against throughput, log-log,
/// per server in `results` (a `loadgen bench` results.json); the ceiling as a vertical line.
pub fn bench_latency_throughput(results: &Value, out: &Path) -> anyhow::Result<()> {
    let curves = bench_curves(results);
    let ceiling = f(&results["in_process_ceiling"]["rows_per_sec"]);
    let all = curves.iter().flat_map(|c| c.1.iter());
    let x_max = all.clone().map(|p| p.0).fold(ceiling, f64::max).max(10.0) * 1.5;
    let x_min = all
        .clone()
        .map(|p| p.0)
        .fold(f64::MAX, f64::min)
        .min(x_max / 10.0)
        / 1.5;
    let y_max = all.clone().map(|p| p.2).fold(1.0, f64::max) * 1.5;
    let y_min = all.map(|p| p.1).fold(f64::MAX, f64::min).min(y_max / 10.0) / 1.5;

    let root = canvas(out, (960, 600), None)?;
    let mut chart = chart_on(&root, (15, 45, 60, false))
        .caption(
            "REST mlp: latency vs throughput (closed loop, 1 row/request)",
            ("sans-serif", 20),
        )
        .build_cartesian_2d((x_min..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(plot_err)?;
    let descs = (Some("throughput, requests/s (log)"), "latency, ms (log)");
    axes(&mut chart, descs, (0, "", 2), None)?;
    if ceiling > 0.0 {
        let label = format!("in-process ceiling, batch 64 ({ceiling:.0} rows/s)");
        line(
            &mut chart,
            [(ceiling, y_min), (ceiling, y_max)],
            (BLACK, 2, 2),
            label,
        )?;
    }
    let mark =
        |p: &(f64, f64, f64), color: RGBColor| TriangleMarker::new((p.0, p.2), 5, color.filled());
    draw_p50_p99(&mut chart, &curves, ("p99", 4), |p| *p, mark)?;
    legend_box(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One step of a streams benchmark: (streams, p50 ms, p99 ms, passed).
type StreamStep = (f64, f64, f64, bool);

/// Chunk-to-result latency (p50 solid, p99 thin) against the number of concurrent real-time
/// streams, per setup, from a `loadgen streams-bench` results.json; failed steps as crosses,
/// the p99 target as a horizontal line and the model's compute ceiling as a vertical one.
pub fn streams_latency(results: &Value, out: &Path) -> anyhow::Result<()> {
    let target = f(&results["target_p99_ms"]);
    let ceiling = items(results, "ceilings")
        .map(|c| f(&c["real_time_streams"]))
        .fold(0.0, f64::max);
    let setups: Vec<Setup<StreamStep>> = items(results, "servers")
        .map(|s| {
            let points = items(s, "steps")
                .map(|st| {
                    let pass = st["pass"].as_bool().unwrap_or(false);
                    (
                        f(&st["streams"]),
                        p50(st),
                        f(&st["latency_ms"]["p99"]),
                        pass,
                    )
                })
                .filter(|p| p.0 > 0.0 && p.1 > 0.0 && p.2 > 0.0)
                .collect();
            (label(s), points)
        })
        .collect();
    let all = setups.iter().flat_map(|s| s.1.iter());
    let x_max = all.clone().map(|p| p.0).fold(ceiling, f64::max).max(10.0) * 1.1;
    let y_max = all.clone().map(|p| p.2).fold(target, f64::max).max(1.0) * 2.0;
    let y_min = all.map(|p| p.1).fold(y_max / 10.0, f64::min).max(0.01) / 1.5;

    let root = canvas(out, (960, 600), None)?;
    let mut chart = chart_on(&root, (15, 45, 60, false))
        .caption(
            "Speech streams (silero_vad, real time): chunk latency vs concurrent streams",
            ("sans-serif", 20),
        )
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(plot_err)?;
    let descs = (
        Some("concurrent streams"),
        "chunk-to-result latency, ms (log)",
    );
    axes(&mut chart, descs, (0, "", 1), None)?;
    if target > 0.0 {
        chart
            .draw_series(DashedLineSeries::new(
                [(0.0, target), (x_max, target)],
                8,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(plot_err)?
            .label(format!("p99 target ({target:.0} ms)"))
            .legend(legend_line(BLACK, 1));
    }
    if ceiling > 0.0 {
        let label = format!("model compute ceiling ({ceiling:.0} streams)");
        line(
            &mut chart,
            [(ceiling, y_min), (ceiling, y_max)],
            (BLACK, 2, 2),
            label,
        )?;
    }
    let mark = |p: &StreamStep, color: RGBColor| {
        EmptyElement::at((p.0, p.2))
            + TriangleMarker::new((0, 0), if p.3 { 5 } else { 0 }, color.filled())
            + Cross::new((0, 0), if p.3 { 0 } else { 6 }, color.stroke_width(2))
    };
    let legend = ("p99 (× = step failed)", 3);
    draw_p50_p99(&mut chart, &setups, legend, |p| (p.0, p.1, p.2), mark)?;
    legend_box(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// Reads `dir/results.json`.
pub fn read_results(dir: &Path) -> anyhow::Result<Value> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Draws `results` with `draw` into a temporary file and returns the SVG text.
    pub(super) fn render(draw: fn(&Value, &Path) -> anyhow::Result<()>, results: &Value) -> String {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let out = std::env::temp_dir().join(format!("plot-test-{}-{n}.svg", std::process::id()));
        draw(results, &out).unwrap();
        let svg = std::fs::read_to_string(&out).unwrap();
        let _ = std::fs::remove_file(&out);
        svg
    }

    #[test]
    fn bench_plot_writes_svg() {
        let results = serde_json::json!({
            "in_process_ceiling": { "rows_per_sec": 60000.0 },
            "servers": [
                { "setup": { "label": "batching on" }, "runs": [
                    { "requests_per_s": 3000.0, "latency_ms": { "p50": 0.3, "p99": 0.5 } },
                    { "requests_per_s": 9000.0, "latency_ms": { "p50": 3.0, "p99": 9.0 } } ] },
                { "setup": { "label": "fastapi peer" }, "runs": [
                    { "requests_per_s": 1500.0, "latency_ms": { "p50": 0.6, "p99": 4.0 } } ] },
            ],
        });
        let svg = render(bench_latency_throughput, &results);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("fastapi peer p99"));
        assert!(svg.contains("ceiling"));
    }

    #[test]
    fn streams_plot_writes_svg() {
        let results = serde_json::json!({
            "target_p99_ms": 100.0,
            "ceilings": [ { "real_time_streams": 1100.0 } ],
            "servers": [
                { "setup": { "label": "batching on" }, "steps": [
                    { "streams": 50, "pass": true, "latency_ms": { "p50": 2.0, "p99": 5.0 } },
                    { "streams": 500, "pass": false, "latency_ms": { "p50": 90.0, "p99": 400.0 } } ] },
            ],
        });
        let svg = render(streams_latency, &results);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("batching on p99"));
        assert!(svg.contains("compute ceiling"));
    }
}
