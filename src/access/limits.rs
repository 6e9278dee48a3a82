//! A key's live limits: token buckets (`governor`) for requests, rows and audio, and counts of
//! its requests in flight and of its open streams (which a resumed stream may pass: it was let
//! in once). A reload keeps the state of every key whose declaration did not change, so editing
//! one key does not hand every other key a fresh burst; a key whose declaration changed starts
//! its buckets afresh but keeps its counts, which are of things still held (an edit must not let
//! a key at its limit open as many streams again).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::keys::KeySpec;
use crate::error::ServeError;

/// One key with its live limiters.
pub struct Key {
    pub spec: KeySpec,
    requests: Option<DefaultDirectRateLimiter>,
    rows: Option<DefaultDirectRateLimiter>,
    /// In milliseconds of audio.
    audio: Option<DefaultDirectRateLimiter>,
    /// Requests in flight, where the key limits them.
    concurrent: Option<Arc<AtomicU32>>,
    /// Open streams, where the key limits them. Not refused like requests in flight: a stream
    /// taken over from a checkpoint counts even when the key is at its limit (refusing it would
    /// drop a stream the key was let in with), and new streams wait until the count is under
    /// the limit again.
    streams: Option<Arc<AtomicU32>>,
}

/// One place among a key's requests in flight or open streams, given back when dropped (on
/// every path: an answer, an error, a client gone).
#[derive(Debug)]
pub struct Held(Arc<AtomicU32>);

impl Drop for Held {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A place in `count` if it is under `limit`.
fn take(count: &Arc<AtomicU32>, limit: u32) -> Option<Held> {
    count
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < limit).then_some(n + 1)
        })
        .ok()
        .map(|_| Held(count.clone()))
}

fn nonzero(n: Option<u32>) -> Option<NonZeroU32> {
    n.and_then(NonZeroU32::new)
}

/// Why `limiter` cannot take `n` cells now.
enum Short {
    /// It has them again after this long.
    For(Duration),
    /// It never holds `n` (more than its capacity): no wait lets them through.
    Never,
}

/// Takes `n` cells of `limiter`, or says how long until it has them.
fn wait(limiter: &DefaultDirectRateLimiter, n: NonZeroU32) -> Result<(), Short> {
    match limiter.check_n(n) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(not_until)) => Err(Short::For(
            not_until.wait_time_from(DefaultClock::default().now()),
        )),
        Err(_) => Err(Short::Never),
    }
}

impl Key {
    pub fn new(spec: KeySpec) -> Key {
        Key::carrying(spec, None)
    }

    /// A key, counting its requests in flight and open streams with `before`'s counts (the
    /// same key's, before a reload changed its declaration) where both limit them.
    fn carrying(spec: KeySpec, before: Option<&Key>) -> Key {
        let limits = spec.limits;
        let requests = nonzero(limits.requests_per_sec).map(|rate| {
            let burst = nonzero(limits.burst).unwrap_or(rate);
            RateLimiter::direct(Quota::per_second(rate).allow_burst(burst))
        });
        let rows =
            nonzero(limits.rows_per_sec).map(|rate| RateLimiter::direct(Quota::per_second(rate)));
        let audio = nonzero(limits.audio_secs_per_min.map(|s| s.saturating_mul(1000)))
            .map(|ms| RateLimiter::direct(Quota::per_minute(ms)));
        let count = |limit: Option<u32>, held: Option<&Arc<AtomicU32>>| {
            nonzero(limit).map(|_| held.cloned().unwrap_or_default())
        };
        Key {
            concurrent: count(
                limits.max_concurrent,
                before.and_then(|k| k.concurrent.as_ref()),
            ),
            streams: count(limits.max_streams, before.and_then(|k| k.streams.as_ref())),
            spec,
            requests,
            rows,
            audio,
        }
    }

    /// Rebuilds the table from `specs`, keeping the live key of every unchanged declaration,
    /// and the counts of a changed one (by its name).
    pub fn rebuild(specs: Vec<KeySpec>, old: &[Arc<Key>]) -> Vec<Arc<Key>> {
        specs
            .into_iter()
            .map(|spec| match old.iter().find(|k| k.spec == spec) {
                Some(same) => same.clone(),
                None => {
                    let before = old.iter().find(|k| k.spec.name == spec.name);
                    Arc::new(Key::carrying(spec, before.map(|k| &**k)))
                }
            })
            .collect()
    }

    fn limited(&self, what: String, retry_after: Duration) -> ServeError {
        ServeError::RateLimited {
            what: format!("API key '{}' is over its limit of {what}", self.spec.name),
            retry_after: retry_after.max(Duration::from_millis(1)),
        }
    }

    /// `n` cells of `limiter`, if the key has that limit; `what` names it for the refusal, and
    /// `too_big` says what to do when `n` is more than the limit ever lets through at once.
    /// That is no 429: its Retry-After would be a promise no wait keeps, and a client that
    /// follows it would retry the same request for ever. It is 400, saying the most there is.
    fn bucket(
        &self,
        limiter: &Option<DefaultDirectRateLimiter>,
        n: usize,
        what: impl FnOnce() -> String,
        too_big: impl FnOnce() -> String,
    ) -> Result<(), ServeError> {
        let (Some(limiter), Some(n)) = (limiter, NonZeroU32::new(n.min(u32::MAX as usize) as u32))
        else {
            return Ok(());
        };
        wait(limiter, n).map_err(|short| match short {
            Short::For(after) => self.limited(what(), after),
            Short::Never => {
                ServeError::invalid(format!("API key '{}' {}", self.spec.name, too_big()))
            }
        })
    }

    /// One request: its rate, then a place among the key's requests in flight (held by the
    /// returned guard until the answer is sent).
    pub fn request(&self) -> Result<Option<Held>, ServeError> {
        let limits = self.spec.limits;
        // One request always fits: a bucket holds at least one.
        self.bucket(
            &self.requests,
            1,
            || format!("{} requests/s", limits.requests_per_sec.unwrap_or_default()),
            String::new,
        )?;
        let (Some(count), Some(limit)) = (&self.concurrent, limits.max_concurrent) else {
            return Ok(None);
        };
        take(count, limit).map(Some).ok_or_else(|| {
            self.limited(
                format!("{limit} requests in flight"),
                Duration::from_millis(100),
            )
        })
    }

    /// The rows of a decoded request.
    pub fn rows(&self, rows: usize) -> Result<(), ServeError> {
        let rate = self.spec.limits.rows_per_sec.unwrap_or_default();
        self.bucket(
            &self.rows,
            rows,
            || format!("{rate} rows/s"),
            || {
                format!(
                    "may send at most {rate} rows/s: a request of {rows} rows never fits; \
                     send at most {rate} rows per request"
                )
            },
        )
    }

    /// A new stream: a place among the key's open streams, held by the returned guard.
    pub fn stream(&self) -> Result<Option<Held>, ServeError> {
        let (Some(count), Some(limit)) = (&self.streams, self.spec.limits.max_streams) else {
            return Ok(None);
        };
        take(count, limit)
            .map(Some)
            .ok_or_else(|| self.limited(format!("{limit} open streams"), Duration::from_secs(1)))
    }

    /// A stream taken over from its checkpoint: counted among the key's open streams, never
    /// refused (the key was let in when the stream began, wherever that was).
    pub fn resumed_stream(&self) -> Option<Held> {
        let count = self.streams.as_ref()?;
        count.fetch_add(1, Ordering::AcqRel);
        Some(Held(count.clone()))
    }

    /// `ms` milliseconds of a stream's audio.
    pub fn audio(&self, ms: u32) -> Result<(), ServeError> {
        let secs = self.spec.limits.audio_secs_per_min.unwrap_or_default();
        self.bucket(
            &self.audio,
            ms as usize,
            || format!("{secs} s of audio per minute"),
            || {
                format!(
                    "may send at most {secs} s of audio per minute: {ms} ms of audio at once \
                     never fits; send at most {secs} s at once"
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::keys::parse;

    fn key(limits: &str) -> Key {
        let text = format!(
            "[[keys]]\nname = \"k\"\nsha256 = \"{}\"\nmodels = [\"*\"]\n{limits}\n",
            "ab".repeat(32)
        );
        Key::new(parse(&text, false).unwrap().remove(0))
    }

    #[test]
    fn a_burst_then_the_rate() {
        let k = key("requests_per_sec = 1\nburst = 3");
        for _ in 0..3 {
            assert!(k.request().is_ok());
        }
        match k.request() {
            Err(ServeError::RateLimited { what, retry_after }) => {
                assert!(
                    what.contains("'k'") && what.contains("1 requests/s"),
                    "{what}"
                );
                assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1));
            }
            other => panic!("expected 429, got {other:?}"),
        }
    }

    #[test]
    fn requests_in_flight_and_streams_are_held_by_their_permits() {
        let k = key("max_concurrent = 1\nmax_streams = 1");
        let held = k.request().unwrap();
        assert!(k.request().is_err());
        drop(held);
        assert!(k.request().is_ok());
        let stream = k.stream().unwrap();
        assert!(k.stream().is_err());
        drop(stream);
        assert!(k.stream().is_ok());
    }

    #[test]
    fn a_taken_over_stream_counts_even_past_the_limit() {
        let k = key("max_streams = 1");
        let new = k.stream().unwrap();
        let taken_over = k.resumed_stream();
        assert!(taken_over.is_some());
        assert!(k.stream().is_err());
        drop(new);
        assert!(k.stream().is_err(), "two were open: one still is");
        drop(taken_over);
        assert!(k.stream().unwrap().is_some());
        assert!(key("").resumed_stream().is_none());
    }

    #[test]
    fn rows_and_audio_are_counted_by_size() {
        let k = key("rows_per_sec = 10\naudio_secs_per_min = 1");
        assert!(k.rows(10).is_ok());
        assert!(matches!(k.rows(1), Err(ServeError::RateLimited { .. })));
        assert!(k.audio(600).is_ok());
        assert!(k.audio(400).is_ok());
        assert!(matches!(k.audio(100), Err(ServeError::RateLimited { .. })));
        let free = key("");
        assert!(free.request().unwrap().is_none());
        assert!(free.rows(1_000_000).is_ok());
    }

    /// More than a bucket ever holds is refused as a request that cannot pass (400, saying
    /// the most there is), not as one that may pass later (429 with a Retry-After that never
    /// comes true): whether or not the bucket is full.
    #[test]
    fn more_than_a_limit_ever_lets_through_is_no_rate_refusal() {
        let k = key("rows_per_sec = 10\naudio_secs_per_min = 1");
        for _ in 0..2 {
            match k.rows(11) {
                Err(ServeError::InvalidRequest(why)) => assert!(
                    why.contains("'k'") && why.contains("11 rows") && why.contains("at most 10"),
                    "{why}"
                ),
                other => panic!("expected 400, got {other:?}"),
            }
            match k.audio(1001) {
                Err(ServeError::InvalidRequest(why)) => {
                    assert!(why.contains("1001 ms") && why.contains("1 s"), "{why}")
                }
                other => panic!("expected 400, got {other:?}"),
            }
        }
        assert!(k.rows(10).is_ok(), "a refused request took nothing");
        assert!(k.audio(1000).is_ok());
    }

    #[test]
    fn a_reload_keeps_the_state_of_unchanged_keys() {
        let a = Arc::new(key("requests_per_sec = 1\nburst = 1"));
        assert!(a.request().is_ok());
        let table = Key::rebuild(vec![a.spec.clone()], std::slice::from_ref(&a));
        assert!(table[0].request().is_err(), "the spent burst stays spent");
        let mut changed = a.spec.clone();
        changed.limits.burst = Some(2);
        let table = Key::rebuild(vec![changed], &[a]);
        assert!(table[0].request().is_ok(), "a changed key starts afresh");
    }

    #[test]
    fn a_changed_key_keeps_what_it_holds() {
        let a = Arc::new(key("max_concurrent = 1\nmax_streams = 1"));
        let (request, stream) = (a.request().unwrap(), a.stream().unwrap());
        let mut changed = a.spec.clone();
        changed
            .scopes
            .push(crate::access::keys::Scope::Model("mlp".into()));
        changed.limits.max_streams = Some(2);
        let table = Key::rebuild(vec![changed], std::slice::from_ref(&a));
        assert!(
            table[0].request().is_err(),
            "its request is still in flight"
        );
        let second = table[0].stream().unwrap();
        assert!(table[0].stream().is_err(), "two open: the old one counts");
        drop((request, stream, second));
        assert!(table[0].request().unwrap().is_some());
        assert!(table[0].stream().unwrap().is_some());
        // A key renamed is another key.
        let mut renamed = a.spec.clone();
        renamed.name = "other".into();
        let _held = a.stream().unwrap();
        let table = Key::rebuild(vec![renamed], &[a]);
        assert!(table[0].stream().is_ok());
    }
}
