//! A stream's idle timeout, for every transport that carries streams (the WebSocket reader,
//! gRPC sequences): one timer per stream, moved on only when it fires early.
//!
//! Why not a timeout around each wait for the next message: a tokio timer goes into the
//! runtime's timer wheel when first polled and comes out when dropped, so a timeout around
//! every read did that some 50 times a second for each real-time stream (docs/efficiency.md).

use std::pin::Pin;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// Fires once nothing has [`touched`](IdleTimer::touch) it for its idle time.
pub struct IdleTimer {
    idle: Duration,
    /// When the stream was last heard from (or began to wait again).
    since: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl IdleTimer {
    pub fn new(idle: Duration) -> IdleTimer {
        let since = Instant::now();
        IdleTimer {
            idle,
            since,
            sleep: Box::pin(tokio::time::sleep_until(idle_after(since, idle))),
        }
    }

    /// The stream was heard from now: its idle time starts again.
    pub fn touch(&mut self) {
        self.since = Instant::now();
    }

    /// Completes once the stream has been idle for the idle time. Safe to drop before it
    /// completes (a `select!` branch that lost): the timer and the time it counts from stay in
    /// `self`.
    pub async fn expired(&mut self) {
        loop {
            self.sleep.as_mut().await;
            let until = idle_after(self.since, self.idle);
            if Instant::now() >= until {
                return;
            }
            self.sleep.as_mut().reset(until);
        }
    }
}

/// `since + idle`, or, for an idle time past the clock's range (`--stream-idle-secs` has no
/// upper bound), a time that never comes, as a timeout of that length would have it.
fn idle_after(since: Instant, idle: Duration) -> Instant {
    const NEVER: Duration = Duration::from_secs(86_400 * 365 * 30);
    since.checked_add(idle).unwrap_or_else(|| since + NEVER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_time_past_the_clocks_range_never_comes() {
        let now = Instant::now();
        assert_eq!(
            idle_after(now, Duration::from_secs(30)),
            now + Duration::from_secs(30)
        );
        assert!(idle_after(now, Duration::MAX) > now + Duration::from_secs(86_400 * 365));
    }

    #[tokio::test(start_paused = true)]
    async fn a_touch_moves_the_idle_time_on() {
        let mut timer = IdleTimer::new(Duration::from_secs(1));
        let started = Instant::now();
        tokio::time::sleep(Duration::from_millis(600)).await;
        timer.touch();
        timer.expired().await;
        assert_eq!(started.elapsed(), Duration::from_millis(1600));
    }
}
