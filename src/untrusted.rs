//! Text that came from a client (a model name from the URL, a request id header, an error
//! message quoting either), made safe to write into a log line: control characters are
//! escaped, so a `%0A` in a path cannot forge a second log line, and the length is capped,
//! so a 16 KB name costs a log line of a few hundred bytes.

use std::fmt;

/// Characters of client text a log line keeps; the rest is counted, not written.
pub const MAX_LOGGED_CHARS: usize = 200;

/// Displays client text escaped and capped (see the module header).
pub struct Untrusted<'a>(pub &'a str);

impl fmt::Display for Untrusted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut chars = self.0.char_indices();
        for (_, c) in chars.by_ref().take(MAX_LOGGED_CHARS) {
            if c.is_control() || c == '\u{2028}' || c == '\u{2029}' {
                write!(f, "{}", c.escape_default())?;
            } else {
                f.write_fmt(format_args!("{c}"))?;
            }
        }
        if let Some((at, _)) = chars.next() {
            write!(f, "…[+{} bytes]", self.0.len() - at)?;
        }
        Ok(())
    }
}

/// `text` cut to at most `max` bytes (`max` of 33 or more; on a character boundary), ending in
/// `…[+N bytes]` where it was cut: for a whole message that quotes client text, where
/// [`Untrusted`] caps one quoted piece.
pub fn capped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    // Room for the marker: "…[+" and " bytes]" are 12 bytes, the count at most 20 digits.
    let mut cut = max.saturating_sub(33);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}…[+{} bytes]", &text[..cut], text.len() - cut).into()
}

/// Longest `x-request-id` echoed back and logged; longer ones are cut to this.
pub const MAX_REQUEST_ID: usize = 128;

/// A new request id, for answers and logs where the client sent none: a random v4 UUID from
/// a thread-local generator. It is not a secret, and drawing from the operating system's
/// generator costs a system call per request.
pub fn new_request_id() -> String {
    uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes())
        .into_uuid()
        .simple()
        .to_string()
}

/// The request id a client sent, if usable: visible ASCII (what a header value can carry
/// safely back), cut to [`MAX_REQUEST_ID`].
pub fn request_id(given: &str) -> Option<String> {
    let given = given.trim();
    if given.is_empty() || !given.bytes().all(|b| b.is_ascii_graphic()) {
        return None;
    }
    Some(given[..given.len().min(MAX_REQUEST_ID)].to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_length_capped() {
        let forged = "x\nINFO streamserve: forged line\r\u{1b}[31m";
        let shown = Untrusted(forged).to_string();
        assert!(!shown.contains('\n') && !shown.contains('\r') && !shown.contains('\u{1b}'));
        assert!(shown.contains("\\n"), "{shown}");
        let long = "a".repeat(16_000);
        let shown = Untrusted(&long).to_string();
        assert!(shown.len() < MAX_LOGGED_CHARS + 32, "{}", shown.len());
        assert!(shown.ends_with("…[+15800 bytes]"), "{shown}");
        assert_eq!(Untrusted("mlp").to_string(), "mlp");
    }

    #[test]
    fn messages_are_capped_on_a_character_boundary() {
        assert_eq!(capped("short", 100), "short");
        let long = "é".repeat(5000); // 10,000 bytes of 2-byte characters
        for max in [100, 101, 2048] {
            let cut = capped(&long, max);
            assert!(cut.len() <= max, "{max}: {}", cut.len());
            assert!(cut.len() > max - 40, "{max}: {}", cut.len());
            let kept = cut.find('…').unwrap();
            assert!(
                cut.ends_with(&format!("…[+{} bytes]", long.len() - kept)),
                "{cut}"
            );
        }
        assert!(capped(&long, 10).len() <= 33);
    }

    #[test]
    fn request_ids_are_visible_ascii_and_short() {
        assert_eq!(request_id("abc-123").as_deref(), Some("abc-123"));
        assert_eq!(request_id("a b"), None);
        assert_eq!(request_id(""), None);
        assert_eq!(
            request_id(&"z".repeat(10_000)).unwrap().len(),
            MAX_REQUEST_ID
        );
    }
}
