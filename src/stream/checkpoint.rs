//! A speech stream's resume token: everything a stream needs to go on from a chunk boundary
//! ([`Checkpoint`]: its progress through its stages (buffers and recurrent state), the voice
//! activity tracker's or keyword detector's progress, the audio and result counts, the stream's settings), signed with a key
//! the fleet shares, so that any instance can take the stream over and a client cannot forge
//! or alter its state (docs/streaming.md, "Resume on any instance").
//!
//! A token is `base64url(format (1) | key id (8) | postcard(checkpoint) | HMAC-SHA256 (32))`,
//! the MAC over everything before it. The format byte is 2, or 3 for the handover checkpoint
//! of a stream whose model version was taken out of service ([`Checkpoint::retired`]): the
//! same payload, so that tokens of format 2 read as before on every instance. The key id (the first 8 bytes of the key's SHA-256) picks the
//! key among those accepted, so keys can be rotated without dropping a stream, in three
//! phases (docs/streaming.md, "Keys"): the new key added second on every instance (it only
//! verifies); once it is everywhere, moved first (it signs); the old one removed once its
//! last tokens expired. Moving it first anywhere before it is everywhere would sign tokens
//! that the instances without it refuse.

use std::path::Path;

use base64::Engine;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::audio::SampleFormat;
use super::keyword::{KeywordDetector, KeywordOptions};
use super::pipeline::PipelineState;
use super::protocol::ResultsMode;
use super::vad::{TrackerState, VadOptions};

/// The state of a stream at a chunk boundary: results up to `next_seq - 1` were produced from
/// the audio up to sample `samples_done`; audio after it is the client's to send again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub stream_id: String,
    pub model: String,
    pub version: String,
    pub sample_rate: u32,
    pub format: SampleFormat,
    pub results: ResultsMode,
    pub vad: VadOptions,
    pub keyword: KeywordOptions,
    /// The stream runs its declaration's gate.
    pub gate: bool,
    /// Counts the stream's checkpoints, so that an older one can be told from a newer one.
    pub counter: u32,
    pub issued_at_ms: u64,
    pub samples_done: u64,
    pub next_seq: u64,
    /// Buffers and recurrent state of each stage, as of the last completed step.
    pub progress: PipelineState,
    pub keywords: KeywordDetector,
    /// The tracker's progress; its segments are the newest [`MAX_SEGMENTS`] at most...
    pub tracker: TrackerState,
    /// ...and this many older ones were left out.
    pub segments_omitted: u64,
    /// The stream's handover checkpoint after a model version it ran on (its own, a stage's
    /// or its gate's) was taken out of service: a resume goes on on the model's default
    /// version rather than load the checkpoint's again (`api/ws/open.rs`). Carried by the
    /// format byte ([`FORMAT_RETIRED`]), not the payload.
    #[serde(skip)]
    pub retired: bool,
}

/// Most speech segments a checkpoint carries (at most 20 KB, a token of about 29,000
/// characters): a token must fit in a `start` message (64 KiB). A stream with more (hours of
/// speech) keeps resuming; the summary of a stream taken over then lists the newest ones and
/// counts the others.
pub const MAX_SEGMENTS: usize = 2000;

/// The format byte that starts every token (2: a stream's progress through declared stages
/// replaced format 1's Silero-only state and context; a format 1 token reads as malformed).
const FORMAT: u8 = 2;
/// The format byte of a [`Checkpoint::retired`] one (an instance that knows only format 2
/// refuses it as malformed; it is resumed where it was issued).
const FORMAT_RETIRED: u8 = 3;
const KEY_ID_LEN: usize = 8;
const MAC_LEN: usize = 32;
/// Longest token accepted (a Silero checkpoint is about 1.9 KB, the keyword spotter's about
/// 18 KB; segments add 16 bytes each).
pub const MAX_TOKEN_CHARS: usize = 64 * 1024;
/// Shortest key in a keys file.
pub const MIN_KEY_CHARS: usize = 32;

/// Why a token cannot be used; each says so in words a client can act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TokenError {
    #[error("resume token is malformed")]
    Malformed,
    #[error("resume token is longer than {MAX_TOKEN_CHARS} characters")]
    TooLong,
    #[error("resume token is signed with a key this server does not accept (rotated out, or another fleet's)")]
    UnknownKey,
    #[error("resume token signature does not match: it was altered")]
    Tampered,
    #[error("resume token expired {0} s ago; start a new stream")]
    Expired(u64),
}

struct Key {
    id: [u8; KEY_ID_LEN],
    secret: Vec<u8>,
}

impl Key {
    fn new(secret: &[u8]) -> Key {
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&Sha256::digest(secret)[..KEY_ID_LEN]);
        Key {
            id,
            secret: secret.to_vec(),
        }
    }

    fn mac(&self) -> Hmac<Sha256> {
        Hmac::<Sha256>::new_from_slice(&self.secret).expect("HMAC takes keys of any length")
    }
}

/// The keys an instance signs and verifies tokens with: the first signs, all verify.
pub struct TokenKeys {
    keys: Vec<Key>,
    /// Whether they came from a file the fleet shares (else: this process's own random key).
    pub shared: bool,
}

/// Keys never print.
impl std::fmt::Debug for TokenKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TokenKeys({} keys, shared: {})",
            self.keys.len(),
            self.shared
        )
    }
}

impl TokenKeys {
    /// A random key for this process alone: its tokens resume only here.
    pub fn ephemeral() -> TokenKeys {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).expect("the operating system's random generator");
        TokenKeys {
            keys: vec![Key::new(&secret)],
            shared: false,
        }
    }

    /// Keys from a file: one per line (at least 32 characters each; blank lines and `#`
    /// comments skipped), the first one signing. `streamserve keys new-stream-key` makes one.
    pub fn from_file(path: &Path) -> Result<TokenKeys, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read stream token keys {}: {e}", path.display()))?;
        TokenKeys::parse(&text).map_err(|e| format!("stream token keys {}: {e}", path.display()))
    }

    /// Keys from a value: comma- or newline-separated, the first signing (an environment
    /// variable's form of a keys file). The value may have come from the flag, its
    /// environment variable or the config file: the error names all three, and a bad key by
    /// its place among the value's keys (never its text).
    pub fn from_value(value: &str) -> Result<TokenKeys, String> {
        let items = value.split([',', '\n']).map(str::trim);
        let items = items.filter(|item| !item.is_empty() && !item.starts_with('#'));
        TokenKeys::from_items(
            items
                .enumerate()
                .map(|(n, item)| (format!("key {}", n + 1), item)),
        )
        .map_err(|e| {
            format!(
                "the stream token key value (--stream-token-key, \
                     STREAMSERVE_STREAM_TOKEN_KEY or stream_token_key in the config file): {e}"
            )
        })
    }

    fn parse(text: &str) -> Result<TokenKeys, String> {
        let lines = text.lines().enumerate().map(|(n, line)| (n, line.trim()));
        let keys = lines.filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
        TokenKeys::from_items(keys.map(|(n, line)| (format!("line {}", n + 1), line)))
    }

    /// Keys from their items, each with where it is (for the error).
    fn from_items<'a>(items: impl Iterator<Item = (String, &'a str)>) -> Result<TokenKeys, String> {
        let mut keys = Vec::new();
        for (place, item) in items {
            if item.chars().count() < MIN_KEY_CHARS {
                return Err(format!(
                    "{place}: a key must be at least {MIN_KEY_CHARS} characters"
                ));
            }
            keys.push(Key::new(item.as_bytes()));
        }
        if keys.is_empty() {
            return Err("no key in it".into());
        }
        Ok(TokenKeys { keys, shared: true })
    }

    /// Signs a checkpoint into a token.
    pub fn seal(&self, checkpoint: &Checkpoint) -> String {
        let key = &self.keys[0];
        let payload = postcard::to_stdvec(checkpoint).expect("checkpoints serialize");
        let mut bytes = Vec::with_capacity(1 + KEY_ID_LEN + payload.len() + MAC_LEN);
        bytes.push(if checkpoint.retired {
            FORMAT_RETIRED
        } else {
            FORMAT
        });
        bytes.extend_from_slice(&key.id);
        bytes.extend_from_slice(&payload);
        let mut mac = key.mac();
        mac.update(&bytes);
        bytes.extend_from_slice(&mac.finalize().into_bytes());
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Verifies a token and reads its checkpoint; one issued more than `max_age_ms` before
    /// `now_ms` has expired.
    pub fn open(
        &self,
        token: &str,
        now_ms: u64,
        max_age_ms: u64,
    ) -> Result<Checkpoint, TokenError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(TokenError::TooLong);
        }
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| TokenError::Malformed)?;
        if bytes.len() < 1 + KEY_ID_LEN + MAC_LEN || ![FORMAT, FORMAT_RETIRED].contains(&bytes[0]) {
            return Err(TokenError::Malformed);
        }
        let (signed, mac) = bytes.split_at(bytes.len() - MAC_LEN);
        let key = self
            .keys
            .iter()
            .find(|k| k.id[..] == signed[1..1 + KEY_ID_LEN])
            .ok_or(TokenError::UnknownKey)?;
        let mut check = key.mac();
        check.update(signed);
        // Constant time: a forger learns nothing from how long a comparison took.
        check.verify_slice(mac).map_err(|_| TokenError::Tampered)?;
        let mut checkpoint: Checkpoint =
            postcard::from_bytes(&signed[1 + KEY_ID_LEN..]).map_err(|_| TokenError::Malformed)?;
        // Signed with the rest: a client cannot set or clear it.
        checkpoint.retired = signed[0] == FORMAT_RETIRED;
        let age = now_ms.saturating_sub(checkpoint.issued_at_ms);
        if age > max_age_ms {
            return Err(TokenError::Expired((age - max_age_ms) / 1000));
        }
        Ok(checkpoint)
    }
}

/// A new random key for a keys file: 256 bits as 64 hex digits.
pub fn new_key() -> Result<String, String> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness: {e}"))?;
    Ok(hex::encode(secret))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::vad::Segment;

    fn checkpoint() -> Checkpoint {
        Checkpoint {
            stream_id: "s1".into(),
            model: "silero_vad".into(),
            version: "1".into(),
            sample_rate: 16000,
            format: SampleFormat::Pcm16,
            results: ResultsMode::All,
            vad: VadOptions::default(),
            keyword: KeywordOptions::default(),
            gate: true,
            counter: 3,
            issued_at_ms: 1_000_000,
            samples_done: 51_200,
            next_seq: 104,
            progress: PipelineState::example(),
            keywords: KeywordDetector::default(),
            tracker: TrackerState {
                triggered: true,
                confirmed: false,
                start: 40_000,
                temp_end: Some(50_000),
                segments: vec![Segment { start: 1, end: 2 }],
            },
            segments_omitted: 0,
            retired: false,
        }
    }

    fn keys(lines: &str) -> TokenKeys {
        TokenKeys::parse(lines).unwrap()
    }

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn a_token_carries_its_checkpoint_exactly() {
        let k = keys(A);
        let token = k.seal(&checkpoint());
        assert!(token.len() < 2200, "{} characters", token.len());
        assert_eq!(k.open(&token, 1_000_500, 30_000).unwrap(), checkpoint());
    }

    #[test]
    fn a_retired_handover_says_so_in_its_signed_format_byte() {
        let k = keys(A);
        let retired = Checkpoint {
            retired: true,
            ..checkpoint()
        };
        let token = k.seal(&retired);
        assert_eq!(k.open(&token, 1_000_500, 30_000).unwrap(), retired);
        // The same payload as a plain checkpoint's: only the format byte differs.
        let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(k.seal(&checkpoint()))
            .unwrap();
        let mut bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&token)
            .unwrap();
        assert_eq!((plain[0], bytes[0]), (FORMAT, FORMAT_RETIRED));
        assert_eq!(
            plain[1..plain.len() - MAC_LEN],
            bytes[1..bytes.len() - MAC_LEN]
        );
        // Flipping it back is an alteration.
        bytes[0] = FORMAT;
        let flipped = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        assert_eq!(
            k.open(&flipped, 1_000_500, 30_000),
            Err(TokenError::Tampered)
        );
    }

    #[test]
    fn a_day_of_speech_segments_still_fits_a_start_message() {
        // The worst a checkpoint carries: MAX_SEGMENTS segments a day into the stream
        // (offsets take their longest encoding), with the largest state a model has.
        let day = 16_000 * 86_400;
        let mut full = checkpoint();
        full.tracker.segments = (0..MAX_SEGMENTS as u64)
            .map(|i| Segment {
                start: day + i * 40_000,
                end: day + i * 40_000 + 20_000,
            })
            .collect();
        full.segments_omitted = 123_456;
        let k = keys(A);
        let token = k.seal(&full);
        // Room left for the rest of the `start` message around the token.
        assert!(
            token.len() + 1024 < MAX_TOKEN_CHARS,
            "{} characters",
            token.len()
        );
        assert_eq!(k.open(&token, 1_000_500, 30_000).unwrap(), full);
    }

    #[test]
    fn tampered_expired_foreign_and_garbage_tokens_are_refused() {
        let k = keys(A);
        let token = k.seal(&checkpoint());
        // One character changed anywhere in the signed part.
        let mut chars: Vec<char> = token.chars().collect();
        let at = chars.len() / 2;
        chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
        let altered: String = chars.into_iter().collect();
        assert_eq!(
            k.open(&altered, 1_000_500, 30_000),
            Err(TokenError::Tampered)
        );
        assert_eq!(
            k.open(&token, 1_031_000, 30_000),
            Err(TokenError::Expired(1))
        );
        assert_eq!(
            keys(B).open(&token, 1_000_500, 30_000),
            Err(TokenError::UnknownKey)
        );
        assert_eq!(k.open("not base64!", 0, 1), Err(TokenError::Malformed));
        assert_eq!(k.open("AAAA", 0, 1), Err(TokenError::Malformed));
        assert_eq!(
            k.open(&"A".repeat(MAX_TOKEN_CHARS + 1), 0, 1),
            Err(TokenError::TooLong)
        );
    }

    #[test]
    fn rotation_signs_with_the_first_key_and_verifies_with_all() {
        let old = keys(A).seal(&checkpoint());
        let rotated = keys(&format!("# new first\n{B}\n\n{A}\n"));
        assert_eq!(rotated.open(&old, 1_000_500, 30_000).unwrap().counter, 3);
        let new = rotated.seal(&checkpoint());
        assert_eq!(keys(B).open(&new, 1_000_500, 30_000).unwrap().counter, 3);
        assert_eq!(
            keys(A).open(&new, 1_000_500, 30_000),
            Err(TokenError::UnknownKey)
        );
    }

    #[test]
    fn keys_come_from_a_file_or_a_value() {
        let from_value = TokenKeys::from_value(&format!("{B},{A}")).unwrap();
        let token = keys(A).seal(&checkpoint());
        assert!(from_value.open(&token, 1_000_500, 30_000).is_ok());
        assert!(TokenKeys::from_value("short")
            .unwrap_err()
            .contains("STREAMSERVE_STREAM_TOKEN_KEY"));
        // The second of the value's keys is "key 2", wherever the value came from.
        let second = TokenKeys::from_value(&format!("{B}, short")).unwrap_err();
        assert!(
            second.contains("key 2: a key must be at least 32"),
            "{second}"
        );
        assert!(second.contains("--stream-token-key") && second.contains("stream_token_key in"));
        assert!(!second.contains("line"), "{second}");
        assert!(
            !second.contains("short"),
            "the key's text is never shown: {second}"
        );
        assert!(TokenKeys::from_value(" , ").unwrap_err().contains("no key"));
    }

    #[test]
    fn keys_files_are_checked() {
        assert!(TokenKeys::parse("short\n")
            .unwrap_err()
            .contains("at least 32"));
        assert!(TokenKeys::parse("# only a comment\n")
            .unwrap_err()
            .contains("no key"));
        assert_eq!(new_key().unwrap().len(), 64);
        assert!(format!("{:?}", keys(A)).contains("1 keys"));
        assert!(!format!("{:?}", keys(A)).contains('a'.to_string().repeat(8).as_str()));
    }
}
