//! The model monitor's series in Prometheus' text format, appended to `/metrics`. Written here
//! rather than through the `metrics` crate because each version's output histogram has buckets
//! of its own (its reference's quantiles), which the exporter, with one bucket list per
//! metric name, cannot express.

use std::fmt::Write;
use std::sync::Arc;

use super::stream::SEGMENT_BUCKETS;
use super::{ModelWatch, Reference};

/// A metric family: its name, type and help, and the sample lines written so far.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
    lines: String,
}

impl Family {
    fn new(name: &'static str, kind: &'static str, help: &'static str) -> Family {
        Family {
            name,
            kind,
            help,
            lines: String::new(),
        }
    }

    fn sample(&mut self, suffix: &str, labels: &str, value: f64) {
        let _ = writeln!(
            self.lines,
            "{}{suffix}{{{labels}}} {}",
            self.name,
            number(value)
        );
    }

    /// A histogram's series: `counts` per bucket (not cumulative; `+Inf` last, past the
    /// upper `edges`), then `_sum` and `_count`.
    fn histogram(&mut self, labels: &str, edges: &[f64], counts: &[u64], sum: f64) {
        let mut cumulative = 0u64;
        for (i, count) in counts.iter().enumerate() {
            cumulative += count;
            let le = edges.get(i).copied().unwrap_or(f64::INFINITY);
            let bucket = format!("{labels},le=\"{}\"", number(le));
            self.sample("_bucket", &bucket, cumulative as f64);
        }
        self.sample("_sum", labels, sum);
        self.sample("_count", labels, cumulative as f64);
    }
}

impl Family {
    /// Appends the family with its HELP and TYPE, unless it has no sample.
    fn write(&self, out: &mut String) {
        if self.lines.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        out.push_str(&self.lines);
    }
}

fn number(v: f64) -> String {
    if v == f64::INFINITY {
        "+Inf".into()
    } else if v == f64::NEG_INFINITY {
        "-Inf".into()
    } else if v.is_nan() {
        "NaN".into()
    } else {
        format!("{v}")
    }
}

/// A label value escaped as the text format wants (backslash, quote, newline).
fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Writes every watch's series to `out`, each family once with its HELP and TYPE.
pub fn render(watches: &[Arc<ModelWatch>], out: &mut String) {
    let mut reference = Family::new(
        "streamserve_model_reference_info",
        "gauge",
        "Where a version's drift reference comes from: profile (streamserve profile), first_answers (frozen after load), collecting, or off",
    );
    let mut rows = Family::new(
        "streamserve_model_rows_total",
        "counter",
        "Rows the model version answered, as its monitor counted them",
    );
    let mut output = Family::new(
        "streamserve_model_output",
        "histogram",
        "Output values on the buckets of the version's reference profile (large outputs are read at a stride)",
    );
    let mut output_nan = Family::new(
        "streamserve_model_output_nan_total",
        "counter",
        "NaN values in an output, every value counted (the histogram reads large outputs at a stride, this counter does not)",
    );
    let mut drift = Family::new(
        "streamserve_model_output_drift_psi",
        "gauge",
        "Population stability index of an output over the last window against the reference (0.1 moderate, 0.25 large shift)",
    );
    let mut input_min = Family::new(
        "streamserve_model_input_min",
        "gauge",
        "Smallest finite value an input had since load",
    );
    let mut input_max = Family::new(
        "streamserve_model_input_max",
        "gauge",
        "Largest finite value an input had since load",
    );
    let mut nonfinite = Family::new(
        "streamserve_model_input_nonfinite_total",
        "counter",
        "NaN and infinite values that reached the model in an input",
    );
    let mut probe_success = Family::new(
        "streamserve_probe_success",
        "gauge",
        "1 when the version's last golden-input probe passed (or none ran yet), 0 when it failed",
    );
    let mut probe_checks = Family::new(
        "streamserve_probe_checks_total",
        "counter",
        "Golden-input probes sent",
    );
    let mut probe_failures = Family::new(
        "streamserve_probe_failures_total",
        "counter",
        "Golden-input probes that failed",
    );
    let mut probe_last = Family::new(
        "streamserve_probe_last_check_timestamp_seconds",
        "gauge",
        "When the last probe check finished, in seconds since the Unix epoch",
    );
    let mut probe_interval = Family::new(
        "streamserve_probe_interval_seconds",
        "gauge",
        "How often the version's probe runs (its every_secs): a probe is stalled when its last check is several intervals old",
    );

    let mut audio = Family::new(
        "streamserve_stream_audio_seconds_total",
        "counter",
        "Seconds of stream audio the VAD model version went through",
    );
    let mut speech = Family::new(
        "streamserve_stream_speech_seconds_total",
        "counter",
        "Seconds of speech in the segments the VAD model version found",
    );
    let mut ratio = Family::new(
        "streamserve_stream_speech_ratio",
        "gauge",
        "Share of stream audio that was speech, since load",
    );
    let mut segments = Family::new(
        "streamserve_stream_segment_seconds",
        "histogram",
        "Length of the speech segments the VAD model version found",
    );

    for watch in watches {
        let version = format!(
            "model=\"{}\",version=\"{}\"",
            escape(&watch.model),
            escape(&watch.version)
        );
        if let Some(probe) = watch.probe() {
            probe_interval.sample("", &version, probe.every().as_secs_f64());
            let record = watch.probe_record().clone();
            let ok = if record.last_error.is_none() {
                1.0
            } else {
                0.0
            };
            probe_success.sample("", &version, ok);
            probe_checks.sample("", &version, record.checks as f64);
            probe_failures.sample("", &version, record.failures as f64);
            if record.checks > 0 {
                probe_last.sample("", &version, record.last_check_unix);
            }
        }
        if let Some(stats) = watch.stream_stats() {
            let (audio_s, speech_s) = stats.seconds();
            audio.sample("", &version, audio_s);
            speech.sample("", &version, speech_s);
            ratio.sample(
                "",
                &version,
                if audio_s > 0.0 {
                    speech_s / audio_s
                } else {
                    0.0
                },
            );
            segments.histogram(
                &version,
                &SEGMENT_BUCKETS,
                &stats.segment_counts(),
                speech_s,
            );
        }
        let state = watch.state();
        let source = state.reference.source().as_str();
        reference.sample("", &format!("{version},source=\"{source}\""), 1.0);
        if matches!(state.reference, Reference::Off) {
            continue;
        }
        rows.sample("", &version, state.rows as f64);
        // While the reference is collecting there are no buckets yet, but NaN answers are
        // counted all the same: a model that answers only NaN never gets a reference.
        if let Reference::Collecting(builder) = &state.reference {
            for (name, n) in builder.nan_counts() {
                let labels = format!("{version},output=\"{}\"", escape(name));
                output_nan.sample("", &labels, n as f64);
            }
        }
        for o in &state.outputs {
            let labels = format!("{version},output=\"{}\"", escape(&o.name));
            output.histogram(&labels, &o.edges.0, &o.counts, o.sum);
            output_nan.sample("", &labels, o.nan as f64);
            if let Some(score) = o.psi {
                drift.sample("", &labels, score);
            }
        }
        for i in &state.inputs {
            let labels = format!("{version},input=\"{}\"", escape(&i.name));
            if i.seen {
                input_min.sample("", &labels, i.min);
                input_max.sample("", &labels, i.max);
            }
            nonfinite.sample("", &format!("{labels},kind=\"nan\""), i.nan as f64);
            nonfinite.sample("", &format!("{labels},kind=\"inf\""), i.inf as f64);
        }
    }

    for family in [
        reference,
        rows,
        output,
        output_nan,
        drift,
        input_min,
        input_max,
        nonfinite,
        probe_success,
        probe_checks,
        probe_failures,
        probe_last,
        probe_interval,
        audio,
        speech,
        ratio,
        segments,
    ] {
        family.write(out);
    }
}

/// Writes `streamserve_model_version_up`: one sample per version the catalog lists, with
/// whether it can serve. Written from the catalog at each scrape rather than kept in a gauge,
/// so that a version that leaves the catalog leaves `/metrics` too instead of keeping its last
/// value.
pub fn render_version_up<'a>(
    versions: impl IntoIterator<Item = (&'a str, &'a str, bool)>,
    out: &mut String,
) {
    let mut up = Family::new(
        "streamserve_model_version_up",
        "gauge",
        "1 when a version the manifest lists can serve (serving, loading, or unloaded and loadable on demand), 0 when it was refused at load or its last load failed",
    );
    for (model, version, can_serve) in versions {
        let labels = format!(
            "model=\"{}\",version=\"{}\"",
            escape(model),
            escape(version)
        );
        up.sample("", &labels, if can_serve { 1.0 } else { 0.0 });
    }
    up.write(out);
}

#[cfg(test)]
mod tests {
    use super::super::profile::ProfileBuilder;
    use super::super::{ModelWatch, WatchSettings};
    use super::*;
    use crate::tensor::{NamedTensor, TensorData};

    /// A watch of one output `y`, with no profile and no probe.
    fn watch_of_y(reference_rows: u64, window_rows: u64) -> Arc<ModelWatch> {
        let settings = WatchSettings {
            enabled: true,
            reference_rows,
            window_rows,
            probe_gates_readiness: false,
        };
        Arc::new(ModelWatch::new(
            ("m", "1", "aa"),
            (&[], &["y".to_string()]),
            settings,
            None,
            None,
        ))
    }

    fn y(values: Vec<f32>) -> NamedTensor {
        NamedTensor {
            name: "y".into(),
            shape: vec![values.len() as i64],
            data: TensorData::Fp32(values),
        }
    }

    #[test]
    fn a_version_with_a_profile_has_its_histogram_from_the_start_and_drift_after_a_window() {
        let mut builder = ProfileBuilder::new(&["y".to_string()]);
        builder.add_outputs(&[y((0..1000).map(|i| i as f32 / 1000.0).collect())], 1000);
        let settings = WatchSettings {
            enabled: true,
            reference_rows: 10,
            window_rows: 100,
            probe_gates_readiness: false,
        };
        let watch = Arc::new(ModelWatch::new(
            ("m", "1", "aa"),
            (&["x".to_string()], &["y".to_string()]),
            settings,
            Some(builder.finish("aa", None)),
            None,
        ));
        let mut text = String::new();
        render(std::slice::from_ref(&watch), &mut text);
        assert!(
            text.contains(
                "streamserve_model_output_count{model=\"m\",version=\"1\",output=\"y\"} 0"
            ),
            "{text}"
        );
        assert!(text.contains("source=\"profile\""));
        assert!(
            !text.contains("drift_psi{"),
            "no drift before a full window"
        );

        let x = TensorData::Fp32(vec![f32::NAN, 2.0, -3.0]);
        watch.observe(&[&x], &[y(vec![5.0; 100])], 100);
        let mut text = String::new();
        render(std::slice::from_ref(&watch), &mut text);
        let psi_line = text
            .lines()
            .find(|l| l.starts_with("streamserve_model_output_drift_psi{"))
            .expect("a drift score after a window");
        let score: f64 = psi_line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(score > 1.0, "{psi_line}");
        assert!(text.contains("le=\"+Inf\"} 100"), "{text}");
        assert!(
            text.contains("streamserve_model_input_min{model=\"m\",version=\"1\",input=\"x\"} -3")
        );
        assert!(text.contains("input=\"x\",kind=\"nan\"} 1"));
        assert_eq!(
            text.matches("# TYPE streamserve_model_output histogram")
                .count(),
            1
        );
    }

    #[test]
    fn without_a_profile_the_reference_is_frozen_from_the_first_answers() {
        let watch = watch_of_y(50, 50);
        watch.observe(&[], &[y((0..40).map(|i| i as f32).collect())], 40);
        assert_eq!(
            watch.summary().reference,
            super::super::ReferenceSource::Collecting
        );
        watch.observe(&[], &[y((40..60).map(|i| i as f32).collect())], 20);
        assert_eq!(
            watch.summary().reference,
            super::super::ReferenceSource::FirstAnswers
        );
        watch.observe(&[], &[y((0..60).map(|i| i as f32).collect())], 60);
        let psi = watch.summary().outputs[0].psi.expect("a window passed");
        assert!(psi < 0.1, "the same distribution scores low: {psi}");
        let mut text = String::new();
        render(&[watch], &mut text);
        assert!(text.contains("source=\"first_answers\""));
    }

    #[test]
    fn a_window_of_nan_only_clears_the_score_and_nan_counts_from_the_first_answer() {
        let watch = watch_of_y(10, 10);
        watch.observe(&[], &[y(vec![f32::NAN; 10])], 10);
        let mut text = String::new();
        render(std::slice::from_ref(&watch), &mut text);
        assert!(text.contains("source=\"collecting\""), "{text}");
        assert!(
            text.contains(
                "streamserve_model_output_nan_total{model=\"m\",version=\"1\",output=\"y\"} 10"
            ),
            "{text}"
        );
        watch.observe(&[], &[y((0..10).map(|i| i as f32).collect())], 10);
        watch.observe(&[], &[y((0..10).map(|i| i as f32).collect())], 10);
        assert!(watch.summary().outputs[0].psi.is_some());
        watch.observe(&[], &[y(vec![f32::NAN; 10])], 10);
        let drift = &watch.summary().outputs[0];
        assert!(drift.psi.is_none() && drift.nan_only_window, "{drift:?}");
        let mut text = String::new();
        render(&[watch], &mut text);
        assert!(!text.contains("drift_psi{"), "{text}");
        assert!(text.contains("output=\"y\"} 20"), "{text}");
    }

    #[test]
    fn a_single_nan_in_an_output_past_the_sampled_size_is_counted() {
        let watch = watch_of_y(4, 4);
        // 4 rows of 1,024: read at a stride of 4 that starts at 1 on the first call, so the
        // stride never reads position 0 of that call.
        let large = |nan_at: usize| {
            let mut values: Vec<f32> = (0..4096).map(|i| i as f32).collect();
            values[nan_at] = f32::NAN;
            y(values)
        };
        watch.observe(&[], &[large(0)], 4);
        assert_eq!(
            watch.summary().reference,
            super::super::ReferenceSource::FirstAnswers
        );
        watch.observe(&[], &[large(4092)], 4);
        let mut text = String::new();
        render(&[watch], &mut text);
        assert!(
            text.contains(
                "streamserve_model_output_nan_total{model=\"m\",version=\"1\",output=\"y\"} 2"
            ),
            "one while the reference collected, one after:\n{text}"
        );
    }

    #[test]
    fn version_up_is_one_sample_per_listed_version() {
        let mut text = String::new();
        render_version_up([("m", "1", true), ("m", "2", false)], &mut text);
        assert!(text.contains("# TYPE streamserve_model_version_up gauge"));
        assert!(text.contains("streamserve_model_version_up{model=\"m\",version=\"1\"} 1"));
        assert!(text.contains("streamserve_model_version_up{model=\"m\",version=\"2\"} 0"));
        let mut none = String::new();
        render_version_up([], &mut none);
        assert!(none.is_empty());
    }
}
