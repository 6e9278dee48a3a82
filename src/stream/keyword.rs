//! Keyword spotting: the options a client may set for a keyword stream, and the detector that
//! turns the spotter's per-step scores into `keyword` events: an event when the score reaches
//! `threshold`, then none for `refractory_ms` of audio (one utterance of the phrase scores
//! high over several steps).

use serde::{Deserialize, Serialize};

/// Detection settings a client may set in its `start` message.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct KeywordOptions {
    #[serde(default = "default_threshold")]
    pub threshold: f32,
    #[serde(default = "default_refractory")]
    pub refractory_ms: u32,
}

fn default_threshold() -> f32 {
    0.5
}
fn default_refractory() -> u32 {
    1000
}

impl Default for KeywordOptions {
    fn default() -> Self {
        KeywordOptions {
            threshold: default_threshold(),
            refractory_ms: default_refractory(),
        }
    }
}

impl KeywordOptions {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(format!(
                "keyword.threshold must be in (0, 1], got {}",
                self.threshold
            ));
        }
        if self.refractory_ms > 60_000 {
            return Err(format!(
                "keyword.refractory_ms must be at most 60000, got {}",
                self.refractory_ms
            ));
        }
        Ok(())
    }
}

/// The detector's state: when the last event fired (audio samples).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KeywordDetector {
    pub last_event: Option<u64>,
    pub events: u64,
}

impl KeywordDetector {
    /// A score at audio time `time` (samples): true when it is an event.
    pub fn push(&mut self, options: &KeywordOptions, rate: u32, time: u64, score: f32) -> bool {
        let refractory = u64::from(options.refractory_ms) * u64::from(rate) / 1000;
        let rested = self
            .last_event
            .is_none_or(|last| time.saturating_sub(last) >= refractory);
        if score >= options.threshold && rested {
            self.last_event = Some(time);
            self.events += 1;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_once_per_refractory_period() {
        let options = KeywordOptions::default();
        let mut d = KeywordDetector::default();
        let fired: Vec<bool> = [
            (1000, 0.2),
            (2280, 0.7),
            (3560, 0.9),
            (18000, 0.1),
            (19000, 0.6),
        ]
        .iter()
        .map(|&(t, s)| d.push(&options, 16000, t, s))
        .collect();
        assert_eq!(fired, [false, true, false, false, true]);
        assert_eq!(d.events, 2);
    }

    #[test]
    fn options_are_checked() {
        let bad = KeywordOptions {
            threshold: 0.0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("threshold"));
        assert!(serde_json::from_str::<KeywordOptions>(r#"{"treshold":0.5}"#).is_err());
    }
}
