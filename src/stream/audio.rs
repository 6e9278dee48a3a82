//! Audio as clients send it: raw little-endian PCM16 or f32 frames on a stream, or a WAV file
//! for the one-shot endpoint. Everything becomes mono f32 samples in [-1, 1].

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SampleFormat {
    /// Signed 16-bit little-endian integers.
    #[default]
    Pcm16,
    /// 32-bit little-endian IEEE floats in [-1, 1].
    F32,
}

impl SampleFormat {
    pub fn bytes_per_sample(self) -> usize {
        match self {
            SampleFormat::Pcm16 => 2,
            SampleFormat::F32 => 4,
        }
    }

    /// Decodes one binary frame. Frames need not align to model windows, but each must hold
    /// whole samples, and float samples must be finite.
    pub fn decode(self, bytes: &[u8]) -> Result<Vec<f32>, String> {
        let size = self.bytes_per_sample();
        if !bytes.len().is_multiple_of(size) {
            return Err(format!(
                "audio frame of {} bytes is not a whole number of {} samples ({size} bytes each)",
                bytes.len(),
                self.name()
            ));
        }
        match self {
            SampleFormat::Pcm16 => Ok(bytes
                .chunks_exact(2)
                .map(|b| i16::from_le_bytes([b[0], b[1]]) as f32 / 32768.0)
                .collect()),
            SampleFormat::F32 => bytes
                .chunks_exact(4)
                .enumerate()
                .map(|(i, b)| {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    if is_audio(v) {
                        Ok(v)
                    } else {
                        Err(format!(
                            "f32 sample {i} of the frame is {v}, outside [-1, 1]"
                        ))
                    }
                })
                .collect(),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SampleFormat::Pcm16 => "pcm16",
            SampleFormat::F32 => "f32",
        }
    }
}

/// Float samples must be finite and in [-1, 1] (with a hair of headroom for rounding): anything
/// else is not audio in the format announced, most likely bytes in another format, and would
/// reach the model as NaN or garbage.
fn is_audio(v: f32) -> bool {
    v.is_finite() && v.abs() <= 1.001
}

/// A decoded WAV file, mixed down to mono.
pub struct Wav {
    pub sample_rate: u32,
    pub samples: Vec<f32>,
}

/// Reads a WAV file (PCM 8/16/24/32-bit or 32-bit float, any channel count).
pub fn read_wav(bytes: &[u8]) -> Result<Wav, String> {
    let mut reader = hound::WavReader::new(std::io::Cursor::new(bytes))
        .map_err(|e| format!("not a readable WAV file: {e}"))?;
    let spec = reader.spec();
    let channels = spec.channels.max(1) as usize;
    let interleaved: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .samples::<f32>()
            .enumerate()
            .map(|(i, s)| match s {
                Ok(v) if is_audio(v) => Ok(v),
                Ok(v) => Err(format!("WAV float sample {i} is {v}, outside [-1, 1]")),
                Err(e) => Err(format!("corrupt WAV data: {e}")),
            })
            .collect::<Result<_, _>>()?,
        hound::SampleFormat::Int => {
            let scale = (1i64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .samples::<i32>()
                .map(|s| s.map(|v| v as f32 / scale))
                .collect::<Result<_, _>>()
                .map_err(|e| format!("corrupt WAV data: {e}"))?
        }
    };
    let samples = interleaved
        .chunks(channels)
        .map(|frame| frame.iter().sum::<f32>() / frame.len() as f32)
        .collect();
    Ok(Wav {
        sample_rate: spec.sample_rate,
        samples,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pcm16_and_f32_frames() {
        assert_eq!(
            SampleFormat::Pcm16.decode(&[0, 0x80, 0xff, 0x7f]).unwrap(),
            vec![-1.0, 32767.0 / 32768.0]
        );
        assert!(SampleFormat::Pcm16
            .decode(&[0, 0, 0])
            .unwrap_err()
            .contains("3 bytes"));
        assert_eq!(
            SampleFormat::F32.decode(&0.5f32.to_le_bytes()).unwrap(),
            vec![0.5]
        );
        assert!(SampleFormat::F32.decode(&f32::NAN.to_le_bytes()).is_err());
        assert!(SampleFormat::F32
            .decode(&3.0f32.to_le_bytes())
            .unwrap_err()
            .contains("outside [-1, 1]"));
        assert!(SampleFormat::F32.decode(&[1, 2]).is_err());
    }

    #[test]
    fn wav_stereo_mixes_to_mono() {
        let mut bytes = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 8000,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let mut writer = hound::WavWriter::new(&mut bytes, spec).unwrap();
        for (l, r) in [(16384i16, 0i16), (-16384, -16384)] {
            writer.write_sample(l).unwrap();
            writer.write_sample(r).unwrap();
        }
        writer.finalize().unwrap();
        let wav = read_wav(bytes.get_ref()).unwrap();
        assert_eq!(wav.sample_rate, 8000);
        assert_eq!(wav.samples, vec![0.25, -0.5]);
        assert!(read_wav(b"RIFFnope").is_err());

        // A float WAV holding NaN is refused, like an f32 stream frame holding one.
        let mut bytes = std::io::Cursor::new(Vec::new());
        let spec = hound::WavSpec {
            channels: 1,
            sample_rate: 16000,
            bits_per_sample: 32,
            sample_format: hound::SampleFormat::Float,
        };
        let mut writer = hound::WavWriter::new(&mut bytes, spec).unwrap();
        for v in [0.5f32, f32::NAN] {
            writer.write_sample(v).unwrap();
        }
        writer.finalize().unwrap();
        assert!(read_wav(bytes.get_ref())
            .err()
            .unwrap()
            .contains("float sample 1 is NaN"));
    }
}
