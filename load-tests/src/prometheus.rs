//! Reading the server's own figures from its Prometheus `/metrics` text.

/// The `/metrics` text of the server at `base`, or `None` when it cannot be had.
pub async fn fetch(client: &reqwest::Client, base: &str) -> Option<String> {
    client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

/// Sum of the samples of `name` (exact metric name) whose labels include `label`
/// (e.g. `model="silero_vad"`), from Prometheus text.
pub fn sum(text: &str, name: &str, label: &str, extra: Option<&str>) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name
                && labels.split(',').any(|x| x == label)
                && extra.is_none_or(|e| labels.split(',').any(|x| x == e)))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_sums() {
        let text = "# HELP x\n\
            streamserve_batch_size_sum{model=\"silero_vad\",version=\"1\"} 12\n\
            streamserve_batch_size_sum{model=\"mlp\",version=\"1\"} 100\n\
            streamserve_batch_size_count{model=\"silero_vad\",version=\"1\"} 3\n\
            streamserve_stream_chunk_latency_seconds_bucket{model=\"silero_vad\",le=\"0.1\"} 7\n\
            streamserve_stream_chunk_latency_seconds_bucket{model=\"silero_vad\",le=\"0.25\"} 9\n";
        let m = "model=\"silero_vad\"";
        assert_eq!(sum(text, "streamserve_batch_size_sum", m, None), 12.0);
        assert_eq!(sum(text, "streamserve_batch_size_count", m, None), 3.0);
        assert_eq!(
            sum(
                text,
                "streamserve_stream_chunk_latency_seconds_bucket",
                m,
                Some("le=\"0.1\"")
            ),
            7.0
        );
        assert_eq!(sum(text, "nothing", m, None), 0.0);
    }
}
