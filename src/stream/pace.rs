//! Whether the server's streams keep real time: the door's sign that new streams should go
//! elsewhere.
//!
//! A stream has at most one step in flight, so when the CPU cannot keep up with all its
//! streams, their audio waits in the sessions, not in a model's queue: the router's predicted
//! wait stays under `slo_ms`, neither its fallback nor the door's limit engages, and every
//! stream falls behind together. Each session knows how late its oldest waiting chunk, and
//! its last answered one, are against its real-time [`Schedule`]; it steps on its models'
//! fallbacks while the later of the two is past `slo_ms`, and reports every chunk it
//! completes here, saying whether it was behind then. While a share of them were, the door
//! turns new streams away (close 1013), so that the open ones keep their pace
//! (docs/overload.md, "Streams behind real time").

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the share of chunks behind is reconsidered.
pub const WINDOW: Duration = Duration::from_millis(100);
/// Windows in a row with more than [`BEHIND_SHARE`] of their chunks behind before new streams
/// are refused: a stall of a few hundred milliseconds (a busy neighbour, a model reload) that
/// the streams catch up from is not an overload.
pub const BEHIND_WINDOWS: u32 = 3;
/// The share of a window's chunks that may be behind without it counting.
pub const BEHIND_SHARE: f64 = 0.1;
/// For how long new streams are refused after a window that counted; each further one
/// extends it.
pub const REFUSE_FOR: Duration = Duration::from_secs(1);
/// How late a chunk may be when its stream's model has no `slo_ms`: the real-time bound the
/// load suite holds streams to.
pub const DEFAULT_BEHIND_AFTER: Duration = Duration::from_millis(100);

/// When a stream's chunks are due. A chunk is due when its audio arrived or, for a client
/// sending faster than real time (a file, the audio it kept while reconnecting), when a
/// real-time sender would have sent it: such a client's chunks queue behind its own audio,
/// which is not the server falling behind. The schedule starts at the stream's first answer
/// on a connection (its sample then, that instant), so that a model session's slow first
/// call does not count. Its limit: a client that sends a burst and then goes on in real time
/// (after a reconnect) has the burst's length as slack until it reconnects again; bounding
/// the lead instead judged clients sending whole files as behind on a busy server (measured:
/// twenty gated keyword streams sent at full speed in the test suite).
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    origin: Instant,
    origin_sample: u64,
    sample_rate: u32,
}

impl Schedule {
    pub fn new(origin: Instant, origin_sample: u64, sample_rate: u32) -> Schedule {
        Schedule {
            origin,
            origin_sample,
            sample_rate: sample_rate.max(1),
        }
    }

    /// How late at `now` the chunk is that ends at sample `end` and whose audio was all in
    /// at `ready` (zero when it is not late).
    pub fn late(&self, end: u64, ready: Instant, now: Instant) -> Duration {
        let audio = end.saturating_sub(self.origin_sample) as f64 / f64::from(self.sample_rate);
        let due = (self.origin + Duration::from_secs_f64(audio)).max(ready);
        now.saturating_duration_since(due)
    }
}

/// Whether a stream is behind, with hysteresis: behind past `after`, caught up again below
/// half of it, so that a stream near the bound does not flip on every chunk.
pub fn still_behind(behind: bool, late: Duration, after: Duration) -> bool {
    if behind {
        late >= after / 2
    } else {
        late > after
    }
}

/// Every stream's completed chunks, counted per window (shared by the sessions and the door).
pub struct StreamPace {
    windows: Mutex<Windows>,
}

impl StreamPace {
    pub fn new() -> StreamPace {
        StreamPace {
            windows: Mutex::new(Windows::new(Instant::now())),
        }
    }

    /// A stream completed a chunk; `behind`: it was behind real time then.
    pub fn record(&self, behind: bool) {
        self.lock().record(behind, Instant::now());
    }

    /// Whether new streams should wait: enough recent windows had their streams behind.
    pub fn turning_away(&self) -> bool {
        self.lock().refusing(Instant::now())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        // Counters stay consistent whatever panicked while holding them.
        self.windows.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Default for StreamPace {
    fn default() -> Self {
        StreamPace::new()
    }
}

/// The rule on its own, with the clock passed in.
#[derive(Debug)]
struct Windows {
    started: Instant,
    chunks: u32,
    behind: u32,
    /// Windows in a row, up to the last closed one, with too many chunks behind.
    behind_windows: u32,
    refuse_until: Option<Instant>,
}

impl Windows {
    fn new(now: Instant) -> Windows {
        Windows {
            started: now,
            chunks: 0,
            behind: 0,
            behind_windows: 0,
            refuse_until: None,
        }
    }

    fn record(&mut self, behind: bool, now: Instant) {
        let open_for = now.saturating_duration_since(self.started);
        if open_for >= WINDOW {
            self.close(now);
        }
        if open_for >= 2 * WINDOW {
            // Windows with no chunk at all went by: the run of late ones has ended.
            self.behind_windows = 0;
        }
        self.chunks += 1;
        self.behind += u32::from(behind);
    }

    /// Closes the window: a late one counts towards refusing, any other ends the run.
    fn close(&mut self, now: Instant) {
        let late =
            self.chunks > 0 && f64::from(self.behind) > BEHIND_SHARE * f64::from(self.chunks);
        self.behind_windows = if late { self.behind_windows + 1 } else { 0 };
        if self.behind_windows >= BEHIND_WINDOWS {
            self.refuse_until = Some(now + REFUSE_FOR);
        }
        (self.started, self.chunks, self.behind) = (now, 0, 0);
    }

    fn refusing(&self, now: Instant) -> bool {
        self.refuse_until.is_some_and(|until| now < until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_chunk_is_late_from_its_arrival_or_its_real_time_schedule_whichever_is_later() {
        let t0 = Instant::now();
        let schedule = Schedule::new(t0, 16_000, 16_000);
        // Arrived on schedule (one second of audio in, one second on): late by the wait.
        assert_eq!(
            schedule.late(32_000, t0 + 1000 * MS, t0 + 1040 * MS),
            40 * MS
        );
        // Sent early (a file): due a second in, not when it arrived.
        assert_eq!(schedule.late(32_000, t0 + 10 * MS, t0 + 1040 * MS), 40 * MS);
        assert_eq!(
            schedule.late(32_000, t0 + 10 * MS, t0 + 500 * MS),
            Duration::ZERO
        );
        // Sent late (after a pause): due when it arrived.
        assert_eq!(
            schedule.late(32_000, t0 + 5000 * MS, t0 + 5010 * MS),
            10 * MS
        );
        // Far ahead (ten seconds of audio at once): due when a real-time sender sends it.
        let ahead = schedule.late(176_000, t0 + 10 * MS, t0 + 1030 * MS);
        assert_eq!(ahead, Duration::ZERO);
    }

    #[test]
    fn behind_past_the_bound_and_caught_up_below_half_of_it() {
        let after = 30 * MS;
        assert!(!still_behind(false, 30 * MS, after));
        assert!(still_behind(false, 31 * MS, after));
        assert!(still_behind(true, 15 * MS, after));
        assert!(!still_behind(true, 14 * MS, after));
    }

    fn window(w: &mut Windows, t: Instant, chunks: u32, behind: u32) {
        for i in 0..chunks {
            w.record(i < behind, t);
        }
    }

    #[test]
    fn new_streams_wait_after_three_windows_in_a_row_with_a_tenth_behind() {
        let t0 = Instant::now();
        let mut w = Windows::new(t0);
        window(&mut w, t0, 100, 11);
        window(&mut w, t0 + WINDOW, 100, 50);
        window(&mut w, t0 + 2 * WINDOW, 100, 100);
        assert!(!w.refusing(t0 + 3 * WINDOW), "two late windows are a stall");
        window(&mut w, t0 + 3 * WINDOW, 1, 0);
        assert!(w.refusing(t0 + 3 * WINDOW));
        assert!(w.refusing(t0 + 3 * WINDOW + REFUSE_FOR - MS));
        assert!(!w.refusing(t0 + 3 * WINDOW + REFUSE_FOR));
    }

    #[test]
    fn a_window_on_time_ends_the_run() {
        let t0 = Instant::now();
        let mut w = Windows::new(t0);
        window(&mut w, t0, 100, 50);
        window(&mut w, t0 + WINDOW, 100, 50);
        window(&mut w, t0 + 2 * WINDOW, 100, 10); // a tenth exactly: on time
        window(&mut w, t0 + 3 * WINDOW, 100, 50);
        window(&mut w, t0 + 4 * WINDOW, 100, 50);
        window(&mut w, t0 + 5 * WINDOW, 1, 0);
        assert!(!w.refusing(t0 + 5 * WINDOW));
        // Nothing completed in a window: nothing to judge, and the run ends.
        let mut idle = Windows::new(t0);
        idle.close(t0 + WINDOW);
        assert_eq!(idle.behind_windows, 0);
        // Two late windows, a quiet spell, one late window: no run of three.
        let mut w = Windows::new(t0);
        window(&mut w, t0, 100, 50);
        window(&mut w, t0 + WINDOW, 100, 50);
        window(&mut w, t0 + 10 * WINDOW, 100, 50);
        window(&mut w, t0 + 11 * WINDOW, 1, 0);
        assert!(!w.refusing(t0 + 11 * WINDOW));
    }
}
