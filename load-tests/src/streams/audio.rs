//! The audio every stream sends: a mono PCM16 WAV file loaded once and looped, cut into
//! zero-copy frames.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::Bytes;

/// Mono PCM16 audio, kept twice in a row so that any window of up to its length is one
/// contiguous, zero-copy slice even where the loop wraps around.
#[derive(Clone, Debug, Default)]
pub struct Audio {
    pub sample_rate: u32,
    /// Samples in one pass of the file.
    pub samples: usize,
    doubled: Bytes,
}

impl Audio {
    /// Reads a mono 16-bit WAV at 16 or 8 kHz.
    pub fn load(path: &Path) -> anyhow::Result<Audio> {
        let mut reader = hound::WavReader::open(path)
            .with_context(|| format!("cannot read WAV file {}", path.display()))?;
        let spec = reader.spec();
        if spec.channels != 1
            || spec.bits_per_sample != 16
            || spec.sample_format != hound::SampleFormat::Int
        {
            bail!(
                "{}: need mono 16-bit PCM, got {} channel(s), {} bits {:?}",
                path.display(),
                spec.channels,
                spec.bits_per_sample,
                spec.sample_format
            );
        }
        if spec.sample_rate != 16000 && spec.sample_rate != 8000 {
            bail!(
                "{}: sample rate must be 16000 or 8000, got {}",
                path.display(),
                spec.sample_rate
            );
        }
        let samples = reader
            .samples::<i16>()
            .collect::<Result<Vec<i16>, _>>()
            .with_context(|| format!("cannot decode {}", path.display()))?;
        Audio::from_samples(&samples, spec.sample_rate)
    }

    pub fn from_samples(samples: &[i16], sample_rate: u32) -> anyhow::Result<Audio> {
        if samples.is_empty() {
            bail!("the audio has no samples");
        }
        let mut pcm = Vec::with_capacity(samples.len() * 4);
        for _ in 0..2 {
            for s in samples {
                pcm.extend_from_slice(&s.to_le_bytes());
            }
        }
        Ok(Audio {
            sample_rate,
            samples: samples.len(),
            doubled: pcm.into(),
        })
    }

    /// `n` samples (at most one pass) starting at sample `offset` of the loop, as PCM16 LE.
    pub fn frame(&self, offset: usize, n: usize) -> Bytes {
        let start = offset % self.samples;
        let n = n.min(self.samples);
        self.doubled.slice(start * 2..(start + n) * 2)
    }

    pub fn seconds(&self) -> f64 {
        self.samples as f64 / self.sample_rate as f64
    }
}

/// `tests/audio/two_phrases_16k.wav` of the checkout this crate was built from.
pub fn default_wav() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("tests")
        .join("audio")
        .join("two_phrases_16k.wav")
}

/// The audio file, loaded once per path.
pub fn load_audio(path: Option<&Path>) -> anyhow::Result<Arc<Audio>> {
    let path = path.map_or_else(default_wav, Path::to_path_buf);
    Ok(Arc::new(Audio::load(&path)?))
}
