//! The fleet drill's plot (`fleet.svg`), from a `loadgen fleet` results.json: one panel per
//! drill, the share of the answers each version gave per time bin (and the share that failed,
//! if any), over seconds since the drill's `registry deploy` returned; dashed lines mark the
//! deploy's return, the registry's outcome event and the moment the client saw every instance
//! on the target version.

use std::path::Path;

use plotters::prelude::*;
use serde_json::Value;

use super::{axes, canvas, chart_on, f, items, plot_err, Area, PALETTE};

/// A version's colour, the same in every panel.
fn version_color(version: &str) -> RGBColor {
    let n: usize = version.parse().unwrap_or(0);
    PALETTE[n.saturating_sub(1) % PALETTE.len()]
}

/// The share per version (and failed) per bin: (version, points in percent).
fn shares(step: &Value) -> Vec<(String, Vec<(f64, f64)>)> {
    let bins: Vec<&Value> = items(step, "bins").collect();
    let width = bins
        .get(1)
        .zip(bins.first())
        .map_or(0.25, |(b, a)| f(&b["t_s"]) - f(&a["t_s"]));
    let mut names: Vec<String> = bins
        .iter()
        .flat_map(|b| b["versions"].as_object().into_iter().flatten())
        .map(|(v, _)| v.clone())
        .collect();
    names.sort_by_key(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    names.dedup();
    let share = |b: &Value, n: f64| {
        let total = f(&b["total"]);
        if total > 0.0 {
            100.0 * n / total
        } else {
            0.0
        }
    };
    let mid = |b: &Value| f(&b["t_s"]) + width / 2.0;
    let mut out: Vec<(String, Vec<(f64, f64)>)> = names
        .into_iter()
        .map(|v| {
            let points = bins
                .iter()
                .filter(|b| f(&b["total"]) > 0.0)
                .map(|b| (mid(b), share(b, f(&b["versions"][&v]))))
                .collect();
            (v, points)
        })
        .collect();
    if bins.iter().any(|b| f(&b["failed"]) > 0.0) {
        let points = bins
            .iter()
            .filter(|b| f(&b["total"]) > 0.0)
            .map(|b| (mid(b), share(b, f(&b["failed"]))))
            .collect();
        out.push(("failed".into(), points));
    }
    out
}

/// A drill's panel title.
fn title(step: &Value) -> String {
    let client = &step["client"];
    let registry = &step["registry"];
    let seconds = |v: &Value| v.as_f64().map_or("never".into(), |s| format!("{s:.1} s"));
    format!(
        "{} {} → {}: {} at {}, client saw every instance on {} at {}; {} failed",
        step["drill"].as_str().unwrap_or("?"),
        step["from"].as_str().unwrap_or("?"),
        step["to"].as_str().unwrap_or("?"),
        registry["event"].as_str().unwrap_or("?"),
        seconds(&registry["event_s"]),
        client["target"].as_str().unwrap_or("?"),
        seconds(&client["fleet_on_target_s"]),
        f(&step["failed"]),
    )
}

/// The marks of a drill: deploy returned, the registry's event, the client's convergence.
const MARKS: [RGBColor; 3] = [
    RGBColor(127, 127, 127),
    RGBColor(0, 0, 0),
    RGBColor(227, 119, 194),
];

/// A legend beside a chart: one line per entry, a short stroke (dashed for marks) then text.
fn side_legend(area: &Area<'_>, entries: &[(RGBColor, bool, String)]) -> anyhow::Result<()> {
    for (i, (color, dashed, text)) in entries.iter().enumerate() {
        let y = 40 + 20 * i as i32;
        let stroke = color.stroke_width(2);
        if *dashed {
            for x in [4, 14, 24] {
                area.draw(&PathElement::new([(x, y), (x + 6, y)], stroke))
                    .map_err(plot_err)?;
            }
        } else {
            area.draw(&PathElement::new([(4, y), (30, y)], stroke))
                .map_err(plot_err)?;
        }
        area.draw(&Text::new(text.clone(), (36, y - 7), ("sans-serif", 13)))
            .map_err(plot_err)?;
    }
    Ok(())
}

/// One panel per drill on a common time axis: share of answers per version over time since
/// the deploy returned, with the drill's marks.
pub fn fleet(results: &Value, out: &Path) -> anyhow::Result<()> {
    let steps: Vec<&Value> = items(results, "steps").collect();
    if steps.is_empty() {
        anyhow::bail!("no drills in the results");
    }
    let bin_ms = 1000.0 * f(&results["settings"]["bin_s"]);
    let x0 = steps.iter().map(|s| f(&s["begin_s"])).fold(0.0, f64::min);
    let x1 = steps
        .iter()
        .map(|s| f(&s["end_s"]))
        .fold(x0 + 1.0, f64::max);
    let height = 60 + 250 * steps.len() as u32;
    let heading = format!("Fleet drill: share of answers per mlp version ({bin_ms:.0} ms bins, through haproxy) over seconds since `registry deploy` returned");
    let root = canvas(out, (1250, height), Some((&heading, 18)))?;
    let panels = root.split_evenly((steps.len(), 1));
    for (panel, step) in panels.iter().zip(&steps) {
        let (plot_area, legend_area) = panel.split_horizontally(960);
        let mut chart = chart_on(&plot_area, (8, 30, 55, false))
            .caption(title(step), ("sans-serif", 14))
            .build_cartesian_2d(x0..x1, 0.0..105.0)
            .map_err(plot_err)?;
        axes(&mut chart, (None, "% of answers"), (0, " s", 0), Some(6))?;
        let mut legend = Vec::new();
        for (version, points) in shares(step) {
            let (color, label) = if version == "failed" {
                (RGBColor(255, 0, 0), "failed".to_string())
            } else {
                (version_color(&version), format!("version {version}"))
            };
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(plot_err)?;
            legend.push((color, false, label));
        }
        let at = |v: &Value| v.as_f64();
        let marks = [
            (Some(0.0), "deploy returned".to_string()),
            (
                at(&step["registry"]["event_s"]),
                format!(
                    "registry: {}",
                    step["registry"]["event"].as_str().unwrap_or("?")
                ),
            ),
            (
                at(&step["client"]["fleet_on_target_s"]),
                format!(
                    "client: every instance on {}",
                    step["client"]["target"].as_str().unwrap_or("?")
                ),
            ),
        ];
        for ((at, label), color) in marks.into_iter().zip(MARKS) {
            let Some(at) = at.filter(|t| (x0..=x1).contains(t)) else {
                continue;
            };
            chart
                .draw_series(DashedLineSeries::new(
                    [(at, 0.0), (at, 105.0)],
                    6,
                    4,
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?;
            legend.push((color, true, label));
        }
        side_legend(&legend_area, &legend)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fleet_plot_writes_svg() {
        let bins = |a: &str, b: &str| {
            serde_json::json!([
                { "t_s": -1.0, "total": 10, "failed": 0, "versions": { a: 10 } },
                { "t_s": -0.75, "total": 10, "failed": 0, "versions": { a: 10 } },
                { "t_s": 0.5, "total": 10, "failed": 1, "versions": { a: 4, b: 5 } },
                { "t_s": 0.75, "total": 10, "failed": 0, "versions": { b: 10 } },
            ])
        };
        let results = serde_json::json!({
            "settings": { "bin_s": 0.25 },
            "steps": [
                { "drill": "blue_green", "from": "1", "to": "2", "begin_s": -1.0, "end_s": 1.0,
                  "failed": 1, "bins": bins("1", "2"),
                  "registry": { "event": "switched", "event_s": 0.4 },
                  "client": { "target": "2", "fleet_on_target_s": 0.8 } },
                { "drill": "failing_canary", "from": "4", "to": "5", "begin_s": -1.0, "end_s": 1.0,
                  "failed": 0, "bins": bins("4", "5"),
                  "registry": { "event": "rolled_back", "event_s": 0.6 },
                  "client": { "target": "4", "fleet_on_target_s": null } },
            ],
        });
        let svg = super::super::tests::render(fleet, &results);
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("version 5"));
        assert!(svg.contains("registry: rolled_back"));
        assert!(svg.contains("client: every instance on 2"));
        assert!(svg.contains("failed"));
        assert!(fleet(&serde_json::json!({}), Path::new("/nonexistent/x.svg")).is_err());
    }

    #[test]
    fn shares_are_percent_of_each_bins_answers() {
        let step = serde_json::json!({ "bins": [
            { "t_s": 0.0, "total": 4, "failed": 0, "versions": { "10": 1, "2": 3 } },
            { "t_s": 0.25, "total": 0, "failed": 0, "versions": {} },
        ]});
        let s = shares(&step);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, "2");
        assert_eq!(s[0].1, vec![(0.125, 75.0)]);
        assert_eq!(s[1].1, vec![(0.125, 25.0)]);
    }
}
