//! The door's admission limit: how many inference requests may be inside the server at once.
//!
//! A model's router sees only its own queue; when the CPU is short for the work around the
//! model (HTTP, JSON decoding and encoding), requests wait before they reach any queue and
//! `slo_ms` never engages. The door sees every request from the moment its handler starts, so
//! it bounds them all together and refuses the rest with an immediate 429, before a body is
//! decoded.
//!
//! `adaptive` (the default) moves the bound with what it measures, in the manner of Netflix's
//! concurrency-limits and Envoy's adaptive concurrency filter. Every admitted answer reports
//! how long it waited after its model answered (for the HTTP thread to take the answer up,
//! and to encode it): the HTTP thread's delay, which grows as soon as the CPU around the
//! models is short. A model's own queue is its router's to watch (`slo_ms` sends its
//! overflow to the fallback); the door watches what no router sees. Each window ([`WINDOW`])
//! where more than a tenth of the answers took longer than the target, as the third such
//! window in a row ([`LATE_WINDOWS`]), cuts the limit to four fifths of the most requests
//! that were inside during the window, unless no more were inside than the server answers in
//! twice the target plus their time from arrival to answer (their wait before the door
//! counted up to ten targets), and none was refused ([`Controller::fits`]: a pool of
//! connections, not an overload). A window that filled the limit within the target grows it
//! by its square root (fast from a small limit, gently near a large one), so the limit
//! settles where the measured time meets the target and recovers within a second once an
//! overload ends. It starts at its ceiling: a server that is not short of anything refuses
//! nothing. `static` keeps `max_inflight` fixed (0: no limit).
//!
//! A request's time starts when its bytes arrived in the kernel, not when the HTTP thread got
//! to them (`arrival.rs`, for REST over TCP on Linux; elsewhere, and for gRPC, when its
//! handler starts): a server short of CPU reads its sockets late. That wait counts in what
//! fits, not against the target (see [`AdmissionPermit::answered`] for why). The target
//! (`admission_target_ms`, 5 ms) stays well below the bundled models' `slo_ms` (50 ms).
//!
//! The first lane also watches the process's CPU ([`CPU_BUSY`]). A window where the process
//! used all its usable cores does not grow the limit, and while the requests past the limit
//! go to a fallback, a cut may go below the floor, to [`BUSY_MIN_LIMIT`]: a model answer
//! costs about three fallback answers' CPU, so fewer model answers leave room for more
//! answers in all; the first window where the CPU had room, or where nothing went to a
//! fallback, puts it back at the floor. A busy CPU whose answers come on time (a server at
//! its capacity and keeping up) is not cut.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::config::Admission;
use crate::machine::cpu_share::CpuShare;
use crate::model::InferResponse;
use crate::stream::pace::StreamPace;

/// How often the adaptive limit is reconsidered (when answers come in).
pub const WINDOW: Duration = Duration::from_millis(50);
/// The adaptive limit never goes below this: below it the models' batches shrink and each
/// answer costs more compute (measured on `mlp`: goodput past capacity fell from 7.8k/s at a
/// limit of 32 to 1.4k/s at 8).
pub const MIN_LIMIT: usize = 16;
/// The adaptive limit's ceiling when `max_inflight` is 0.
pub const DEFAULT_MAX_LIMIT: usize = 4096;
/// Late windows in a row before the limit is cut: a burst that the server clears within one
/// window (160 requests at once on 2 cores take about 40 ms; a slower machine may take
/// twice that) is not an overload, and refusing
/// part of it would only send its clients away for a second.
pub const LATE_WINDOWS: u32 = 3;
/// How much of the best recent answer rate each window (busy or quiet) keeps: it halves in
/// about 3.5 s, so that [`Controller::fits`] follows a server that got slower (a heavier
/// model, a busier machine) within seconds.
pub const RATE_DECAY: f64 = 0.99;
/// [`Controller::fits`] counts `rate x (FIT_TARGETS x target + model time)`: at that many
/// inside, the mean wait outside the model is twice the target, where the tenth-late rule
/// (about p90) already holds. Measured pinned on one core (`mlp`, 1-row JSON, about 10k
/// answers/s): a closed loop of 64 connections, which the proxy's limit (`fly.toml`, 64 per
/// core) lets in, got 429s for 75% of its requests and half the static door's goodput
/// without it, as each refusal and its immediate retry took CPU from the answers; with it,
/// none.
pub const FIT_TARGETS: u32 = 2;
/// What [`Controller::fits`] counts of a request's wait before the door (in its socket and
/// for the HTTP thread to reach it), in targets: at most this many (50 ms at the default
/// 5 ms target). A pool of connections waits there for its turn, a few milliseconds; an
/// overload's backlog waits there hundreds, and counted whole it made as many places "fit"
/// as it held, so the door never cut while admitted answers took 300-374 ms (measured pinned,
/// `mlp` at 1-5x capacity with 2048 requests in flight: load-tests/results/2026-12-06-door-wait/).
/// The time after the door (the model's queue and compute) counts whole: a pool that waits
/// for a slow model still fits.
pub const FIT_DOOR_WAIT_TARGETS: u32 = 10;
/// Refusals are logged as one line per this long, with their count: a line per refused
/// request would cost the CPU that is already short (measured: goodput at 1.4x capacity,
/// pinned, 2.8k/s with the access log's line per refusal against 4.8k/s without).
const LOG_EVERY: Duration = Duration::from_secs(1);
/// For how long after a refusal [`AdmissionLimit::refusing`] says so (new streams wait that out).
const REFUSING_FOR: Duration = Duration::from_secs(1);
/// The share of its usable cores above which the process is short of CPU.
pub const CPU_BUSY: f64 = 0.9;
/// How low the limit may be cut, below [`MIN_LIMIT`], while the CPU is busy and the requests
/// past it go to their models' fallbacks: each answer the model does not give, its fallback
/// gives for a third of the CPU, so fewer model answers leave room for more answers in all.
/// Measured pinned on one core (`mlp`, fallback `mlp_small`, open loop at twice the
/// capacity; load-tests/results/2026-12-05-door-cpu/): in a first form of the rule, a floor
/// of 4 against 16 took admitted p99 from 32-48 ms to 19-20 ms and goodput from 0.32-0.47 to
/// 0.62-0.83 of capacity.
pub const BUSY_MIN_LIMIT: usize = 4;

/// What one window saw.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Window {
    /// Admitted answers that reported their wait.
    pub answers: u32,
    /// Of those, the ones that waited longer than the target.
    pub late: u32,
    /// Whether the limit was reached (a request overflowed it, or in flight met it).
    pub saturated: bool,
    /// Whether a request overflowed the limit: it was refused, or sent to its fallback.
    pub overflowed: bool,
    /// Seconds from the answers' arrival to the end of their compute, together: in their
    /// sockets (at most [`FIT_DOOR_WAIT_TARGETS`] each), being read and decoded, in their
    /// models' queues and compute.
    pub to_answer_secs: f64,
    /// The most requests inside at once.
    pub peak: usize,
    /// Admitted answers per second in this window.
    pub rate: f64,
    /// The share of its usable cores the process used during the window.
    pub busy: f64,
    /// Whether a request past the limit went to its model's fallback.
    pub to_fallback: bool,
}

/// The adaptive rule on its own, without clocks or locks.
#[derive(Clone, Copy, Debug)]
pub struct Controller {
    pub limit: f64,
    pub min: f64,
    pub max: f64,
    /// Late windows in a row, up to this one.
    pub late_windows: u32,
    /// The highest answer rate of the recent windows (answers per second, decaying by
    /// [`RATE_DECAY`] a window): what the server can answer.
    pub best_rate: f64,
    /// The last window's mean time from a request's arrival to the end of its compute
    /// (seconds).
    pub to_answer_time: f64,
    /// Seconds of that rate that may be inside at once however late the answers, while none
    /// is refused: see [`Controller::fits`].
    pub fit_time: f64,
}

impl Controller {
    /// Requests that may be inside, however late their answers, while the door refuses
    /// none: as many as the server answers, at its best recent rate, in `fit_time` plus the
    /// time from a request's arrival to its answer (Little's law: a request is in its socket,
    /// being decoded, in its model, or waiting after it). A client that keeps that many
    /// inside (a pool of connections, each sending its next request when the last is
    /// answered) is not overloading the server, even when its requests wait in their sockets
    /// and for the HTTP thread longer than the target: refusing some would not make the
    /// others faster. The wait in the socket counts only up to [`FIT_DOOR_WAIT_TARGETS`]: an
    /// overload's backlog there is not a pool's turn.
    pub fn fits(&self) -> f64 {
        self.best_rate * (self.fit_time + self.to_answer_time)
    }

    /// The limit after a window that lasted `windows` [`WINDOW`]s (more than one after a
    /// quiet spell: a server that was idle is not short of anything, so its limit grows back
    /// for every further window it spent idle, whatever the answers before the spell said).
    pub fn after(&mut self, window: Window, windows: u32) -> f64 {
        let grow = |limit: f64| (limit + limit.sqrt()).min(self.max);
        let decay = RATE_DECAY.powi(windows.clamp(1, 10_000) as i32);
        self.best_rate = window.rate.max(self.best_rate * decay);
        if window.answers > 0 {
            self.to_answer_time = window.to_answer_secs / f64::from(window.answers);
        }
        // Late, but as many as fit were inside and none overflowed: cutting would refuse
        // requests the server answers well within `slo_ms`, and a pool of connections sends
        // each refused request again at once, so the refusals would only add to the CPU's
        // load, the rate would fall, and each cut would call for the next (measured: below).
        // Such a window counts as on time. Once requests overflow the door (an open-loop
        // overload, or a pool larger than fits), the rule is the plain one.
        let fitting = !window.overflowed && window.peak as f64 <= self.fits();
        let late = window.answers >= 4 && window.late * 10 > window.answers && !fitting;
        // A process that used all its cores has no room for more model answers, however
        // timely the last ones: the limit does not grow, and while the requests past it have
        // a cheaper fallback to go to, a cut may go below the floor. Whether it is behind is
        // for the answers' wait after their model to say: a server at its capacity and
        // keeping up keeps its limit.
        let busy = window.busy >= CPU_BUSY;
        let below_floor_allowed = busy && window.to_fallback;
        // Below the floor only while that lasts: a window where the CPU had room, or where
        // nothing went to a fallback (it went away, or the overload did), is back at it.
        if !below_floor_allowed && self.limit < self.min {
            self.limit = self.min;
        }
        self.late_windows = if late { self.late_windows + 1 } else { 0 };
        if late && self.late_windows >= LATE_WINDOWS {
            let floor = if below_floor_allowed {
                (BUSY_MIN_LIMIT as f64).min(self.min)
            } else {
                self.min
            };
            self.limit = (self.limit.min(window.peak as f64) * 0.8).max(floor.min(self.limit));
        } else if !late && !busy && window.saturated {
            self.limit = grow(self.limit);
        }
        // A window stays open until an answer comes after its end: the rest was quiet, unless
        // the CPU was busy all the same (a batch or a stalled thread taking it).
        if !busy {
            for _ in 1..windows.min(200) {
                self.limit = grow(self.limit);
            }
        }
        self.limit
    }
}

/// One count of places with its own limit: the requests the limit lets in, or those past it
/// that their models' fallbacks answer.
struct Lane {
    controller: Controller,
    in_flight: usize,
    window: Window,
    window_started: Instant,
    /// The process's CPU over the window, for a lane that watches it (the first: the
    /// fallbacks' lane answers for less CPU than a refusal saves, see [`BUSY_MIN_LIMIT`]).
    cpu: Option<CpuShare>,
    /// Whether a quiet spell grows the limit back (see [`Controller::after`]).
    grows_when_quiet: bool,
}

impl Lane {
    fn new(controller: Controller, grows_when_quiet: bool, watches_cpu: bool) -> Lane {
        Lane {
            controller,
            in_flight: 0,
            window: Window::default(),
            window_started: Instant::now(),
            cpu: watches_cpu.then(CpuShare::new),
            grows_when_quiet,
        }
    }

    /// The limit now (`usize::MAX`: none).
    fn limit(&self) -> usize {
        let limit = self.controller.limit;
        if limit.is_finite() {
            limit as usize
        } else {
            usize::MAX
        }
    }

    /// Takes a place if there is one; a lane that has none is marked overflowed.
    fn try_take(&mut self) -> bool {
        let limit = self.controller.limit.floor();
        if (self.in_flight as f64) >= limit {
            self.window.saturated = true;
            self.window.overflowed = true;
            return false;
        }
        self.in_flight += 1;
        self.window.peak = self.window.peak.max(self.in_flight);
        if self.in_flight as f64 >= limit {
            self.window.saturated = true;
        }
        true
    }

    /// Counts an answer; at the end of a window, moves the limit. Whether it moved.
    fn answered(&mut self, waited: Duration, to_answer: Duration, target: Duration) -> bool {
        self.window.answers += 1;
        self.window.to_answer_secs += to_answer.as_secs_f64();
        if waited > target {
            self.window.late += 1;
        }
        let lasted = self.window_started.elapsed();
        if lasted < WINDOW {
            return false;
        }
        let window = std::mem::take(&mut self.window);
        // The next window starts with what is inside now.
        self.window.peak = self.in_flight;
        let before = self.controller.limit;
        let windows = if self.grows_when_quiet {
            (lasted.as_millis() / WINDOW.as_millis()).min(u32::MAX as u128) as u32
        } else {
            1
        };
        let rate = f64::from(window.answers) / lasted.as_secs_f64();
        let busy = self.cpu.as_mut().map_or(0.0, CpuShare::take);
        let after = self.controller.after(
            Window {
                rate,
                busy,
                ..window
            },
            windows,
        );
        self.window_started = Instant::now();
        after != before
    }
}

struct State {
    /// The requests the limit lets in, to the models they asked for.
    primary: Lane,
    /// Past the limit, the requests whose models' fallbacks answer them: a lane of its own,
    /// moved by the same rule on its own answers, so that a server too short of CPU to
    /// answer even those in time refuses (cheaper still) instead of taking in more than it
    /// answers.
    fallback: Lane,
    /// The last request that overflowed the limit (refused, or sent to its fallback).
    last_overflow: Option<Instant>,
    /// Refusals since the last log line about them.
    refused_unlogged: u64,
    last_logged: Option<Instant>,
}

/// The limit's series, looked up once: every request moves two of them.
struct Series {
    limit: metrics::Gauge,
    in_flight: metrics::Gauge,
    fallback_limit: metrics::Gauge,
    fallback_in_flight: metrics::Gauge,
    wait: metrics::Histogram,
    refused: metrics::Counter,
    /// New streams refused because the open ones were behind real time.
    streams_behind: metrics::Counter,
    to_fallback: metrics::Counter,
}

/// Where the door puts a request.
pub enum Entry {
    /// A place within the limit: the request goes to the model it asked for.
    Admitted(AdmissionPermit),
    /// Past the limit, a place within the fallbacks' own limit: the request goes to its
    /// model's fallback (which may still shed it, when its own queue is full).
    Fallback(AdmissionPermit),
    /// Past both limits, or past the first without a fallback: 429.
    Refused,
}

/// Which lane a place belongs to.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LaneId {
    Primary,
    Fallback,
}

/// The limit, its count of requests inside, and its metrics; one per server.
pub struct AdmissionLimit {
    mode: Admission,
    target: Duration,
    state: Mutex<State>,
    series: Series,
    /// Whether the open streams keep real time (`streams.rs`).
    streams: Arc<StreamPace>,
}

impl AdmissionLimit {
    /// `max_inflight` 0 means no ceiling: none at all in `static` mode, [`DEFAULT_MAX_LIMIT`]
    /// for the adaptive limit. The fallbacks' lane has the same ceiling and rule, from the
    /// floor up.
    pub fn new(mode: Admission, max_inflight: usize, target: Duration) -> AdmissionLimit {
        let (limit, min, max) = match mode {
            Admission::Static if max_inflight == 0 => (f64::INFINITY, 0.0, f64::INFINITY),
            Admission::Static => {
                let n = max_inflight as f64;
                (n, n, n)
            }
            Admission::Adaptive => {
                let max = if max_inflight == 0 {
                    DEFAULT_MAX_LIMIT
                } else {
                    max_inflight
                } as f64;
                (max, (MIN_LIMIT as f64).min(max), max)
            }
        };
        let controller = Controller {
            limit,
            min,
            max,
            late_windows: 0,
            best_rate: 0.0,
            to_answer_time: 0.0,
            fit_time: (FIT_TARGETS * target).as_secs_f64(),
        };
        let limit = AdmissionLimit {
            mode,
            target,
            streams: Arc::new(StreamPace::new()),
            series: Series {
                limit: metrics::gauge!("streamserve_admission_limit"),
                in_flight: metrics::gauge!("streamserve_admission_in_flight"),
                fallback_limit: metrics::gauge!("streamserve_admission_fallback_limit"),
                fallback_in_flight: metrics::gauge!("streamserve_admission_fallback_in_flight"),
                wait: metrics::histogram!("streamserve_admission_wait_seconds"),
                refused: metrics::counter!("streamserve_admission_refused_total"),
                streams_behind: metrics::counter!("streamserve_streams_refused_behind_total"),
                to_fallback: metrics::counter!("streamserve_admission_fallback_total"),
            },
            state: Mutex::new(State {
                primary: Lane::new(controller, true, true),
                // The fallbacks' lane starts at the floor and grows only while it is full and
                // its answers come within the target: an overload's first second at its
                // ceiling would take in more than the CPU answers (measured with the lane
                // fixed at 4096: a mean of 50 ms inside the server, every answer's p99 about
                // 126 ms). Its windows close only on its own answers, so the time between
                // overloads is not a quiet spell that grows it back.
                fallback: Lane::new(
                    Controller {
                        limit: min,
                        ..controller
                    },
                    false,
                    false,
                ),
                last_overflow: None,
                refused_unlogged: 0,
                last_logged: None,
            }),
        };
        limit.publish(&limit.lock());
        limit
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is numbers only, consistent after every statement: a panic elsewhere
        // while it was held leaves nothing half-done.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A place within the limit, or `None` when the server is at it: [`enter`](Self::enter)
    /// for a model without a fallback, as the tests of the limit alone use it.
    #[cfg(test)]
    pub fn try_enter(self: &Arc<Self>) -> Option<AdmissionPermit> {
        match self.enter(|| false) {
            Entry::Admitted(permit) => Some(permit),
            Entry::Fallback(_) | Entry::Refused => None,
        }
    }

    /// A place for a request: within the limit; past it, when its model has a fallback
    /// ready to answer (`fallback_ready`, asked only then), within the fallbacks' limit; or
    /// none.
    pub fn enter(self: &Arc<Self>, fallback_ready: impl FnOnce() -> bool) -> Entry {
        let mut state = self.lock();
        if state.primary.try_take() {
            self.series.in_flight.set(state.primary.in_flight as f64);
            return Entry::Admitted(self.permit(LaneId::Primary));
        }
        let now = Instant::now();
        state.last_overflow = Some(now);
        if fallback_ready() && state.fallback.try_take() {
            state.primary.window.to_fallback = true;
            self.series
                .fallback_in_flight
                .set(state.fallback.in_flight as f64);
            self.series.to_fallback.increment(1);
            return Entry::Fallback(self.permit(LaneId::Fallback));
        }
        self.series.refused.increment(1);
        state.refused_unlogged += 1;
        let log_due = state
            .last_logged
            .is_none_or(|at| now.duration_since(at) >= LOG_EVERY);
        if log_due {
            let (refused, limit, in_flight) = (
                state.refused_unlogged,
                state.primary.limit(),
                state.primary.in_flight,
            );
            let (fallback_limit, fallback_in_flight) =
                (state.fallback.limit(), state.fallback.in_flight);
            state.refused_unlogged = 0;
            state.last_logged = Some(now);
            drop(state);
            tracing::warn!(
                refused, limit, in_flight, fallback_limit, fallback_in_flight,
                "at the admission limit: refusing inference requests (429) and new streams (1013); refused is the count since the last such line"
            );
        }
        Entry::Refused
    }

    fn permit(self: &Arc<Self>, lane: LaneId) -> AdmissionPermit {
        AdmissionPermit {
            limit: self.clone(),
            lane,
            entered: Instant::now(),
            answered: None,
        }
    }

    /// The limit now (`usize::MAX`: none).
    pub fn limit(&self) -> usize {
        self.lock().primary.limit()
    }

    /// Leaves; an answered request reports its wait outside its model and its time from
    /// arrival to answer.
    fn leave(&self, lane: LaneId, answered: Option<(Duration, Duration)>) {
        let mut guard = self.lock();
        let state = &mut *guard;
        let (lane, gauge) = match lane {
            LaneId::Primary => (&mut state.primary, &self.series.in_flight),
            LaneId::Fallback => (&mut state.fallback, &self.series.fallback_in_flight),
        };
        lane.in_flight -= 1;
        gauge.set(lane.in_flight as f64);
        let Some((waited, to_answer)) = answered else {
            return;
        };
        self.series.wait.record(waited.as_secs_f64());
        if self.mode == Admission::Static {
            return;
        }
        if lane.answered(waited, to_answer, self.target) {
            self.publish(state);
        }
    }

    fn publish(&self, state: &State) {
        // Static without a limit shows 0, as `max_inflight` spells it.
        let shown = |lane: &Lane| {
            let limit = lane.controller.limit;
            if limit.is_finite() {
                limit.floor()
            } else {
                0.0
            }
        };
        self.series.limit.set(shown(&state.primary));
        self.series.fallback_limit.set(shown(&state.fallback));
    }
}

/// A request's place inside; dropping it leaves without a measurement (a refusal after the
/// door, an error), [`AdmissionPermit::answered`] leaves with one.
pub struct AdmissionPermit {
    limit: Arc<AdmissionLimit>,
    lane: LaneId,
    /// When the door gave this place: the request's wait before it counts in what fits only
    /// up to a bound.
    entered: Instant,
    /// Set by [`answered`](Self::answered): what leaving reports, the wait outside the model
    /// and the time from arrival to the end of its compute.
    answered: Option<(Duration, Duration)>,
}

impl AdmissionPermit {
    /// Whether this is a place past the limit, whose request goes to its model's fallback.
    pub fn to_fallback(&self) -> bool {
        self.lane == LaneId::Fallback
    }

    /// The request that arrived at `received` was answered with `response` (whose queue
    /// time counts from `received`). What the limit measures: the time since its model
    /// answered (waiting for the HTTP thread to take the answer up, encoding it), and the
    /// time from its arrival to that answer, for [`Controller::fits`], its wait before the
    /// door counted up to [`FIT_DOOR_WAIT_TARGETS`].
    ///
    /// The wait before the model (in the socket, reading, decoding) counts in the second,
    /// not the first. Tried the other way (load-tests/results/2026-12-05-door-cpu/): a
    /// closed loop of 128 connections on one core was cut (its requests wait their turn in
    /// their sockets), and open-loop goodput at twice the capacity was 0.68-0.69 of it
    /// against 0.89-0.93, with admitted p99 no better.
    pub fn answered(mut self, received: Instant, response: &InferResponse) {
        let to_answer = response.queue_time + response.compute_time;
        let waited = received.elapsed().saturating_sub(to_answer);
        let before_door = self
            .entered
            .saturating_duration_since(received)
            .min(to_answer);
        let max_door_wait = FIT_DOOR_WAIT_TARGETS * self.limit.target;
        let counted = to_answer - before_door + before_door.min(max_door_wait);
        self.answered = Some((waited, counted));
    }

    /// Leaves reporting `waited` as the time measured outside the model, and none in it.
    #[cfg(test)]
    fn answered_after(mut self, waited: Duration) {
        self.answered = Some((waited, Duration::ZERO));
    }
}

impl Drop for AdmissionPermit {
    fn drop(&mut self) {
        self.limit.leave(self.lane, self.answered);
    }
}

mod streams;
#[cfg(test)]
mod tests;

pub use streams::StreamRefused;
