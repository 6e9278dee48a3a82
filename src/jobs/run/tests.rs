//! Unit tests of a running job's pure rules: pacing, backoff, the window's bounds, errors
//! cut to size.

use super::*;

#[test]
fn the_window_is_bounded_by_bytes_as_by_rows_and_always_takes_one_row() {
    // Small rows: the row bound.
    assert!(has_room(WINDOW - 1, 1024 * (WINDOW - 1)));
    assert!(!has_room(WINDOW, 1024 * WINDOW));
    // Lines of the longest kind: one, then no more (it alone is past the bytes).
    assert!(has_room(0, 0));
    assert!(!has_room(1, MAX_LINE_BYTES));
    // At most the bytes plus one line, far below the rows' 32 x 64 MiB.
    let (mut rows, mut bytes) = (0, 0);
    while has_room(rows, bytes) {
        rows += 1;
        bytes += 20 * 1024 * 1024;
    }
    assert_eq!(rows, 2);
    assert!(bytes < WINDOW_BYTES + MAX_LINE_BYTES);
}

#[test]
fn any_rate_paces_without_a_zero_period() {
    for rate in [1, 150, 1_000_000_000, 2_000_000_000, u32::MAX] {
        assert!(pace_period(rate) > Duration::ZERO, "{rate}");
    }
    assert_eq!(pace_period(4), Duration::from_millis(250));
}

#[test]
fn a_long_row_error_is_cut_at_a_character() {
    assert_eq!(bounded("short".into()), "short");
    let long = format!("no input '{}'", "é".repeat(2000));
    let cut = bounded(long.clone());
    assert!(cut.len() < MAX_ERROR_BYTES + 32, "{}", cut.len());
    assert!(
        cut.ends_with(&format!("... ({} bytes)", long.len())),
        "{cut}"
    );
}

#[test]
fn blank_is_ascii_whitespace_as_the_submission_counts_it() {
    assert!(is_blank(b" \t\r\n"));
    assert!(is_blank(b""));
    // Unicode whitespace and a vertical tab are counted as rows at submission.
    assert!(!is_blank("\u{a0}\n".as_bytes()));
    assert!(!is_blank(b"\x0b\n"));
}
