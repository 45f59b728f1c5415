//! How many calls an instance serves at once: an adaptive concurrency limit under a hard cap,
//! shared by every connection.
//!
//! The signal is latency, not CPU (a container's CPU figures lie). The controller is Envoy's
//! adaptive concurrency gradient, updated once per window of samples so that admission itself is
//! two atomic operations:
//!
//! - **the floor**: at start and every [`LimitSettings::measure_every`] (jittered), the limit is
//!   lowered until [`LimitSettings::measure_samples`] calls let in at no more than that have been
//!   answered; their median is the *floor*, what a call costs with nothing queued (in this
//!   instance or below it). A floor measured this way cannot drift upward the way an average of
//!   loaded latencies does. At start, and whenever calls were refused since the last window, it
//!   is lowered to the minimum, as Envoy does: an instance already refusing loses little more,
//!   and only at the minimum does a saturated instance show what a call costs unqueued.
//!   Otherwise it is halved, which sheds nothing while demand is below half the limit, and only
//!   the excess, for a few calls' time, when it is not;
//! - **each window** (at least [`LimitSettings::window`] and [`LimitSettings::min_samples`]
//!   calls) yields the median latency of its calls;
//! - `gradient = clamp(minimum × tolerance / median, 0.5, 2)`: above 1 while calls cost what
//!   they cost unloaded, below when they wait for something;
//! - `limit ← limit × gradient + √limit`, within `[min, max]`: with a queue, the limit settles
//!   just above the concurrency the instance can actually serve; the √limit headroom keeps it
//!   probing;
//! - a window in which fewer than half the limit were ever in flight does not grow the limit;
//! - a window in which more than [`OVERLOADED_SHARE`] of the answers said an instance *below*
//!   shed the call (an answer of `UNAVAILABLE`, relayed) shrinks the limit by a tenth at least:
//!   such answers are fast, so latency alone would keep sending calls that cannot be served, and
//!   the instance sheds them at its own door instead, before doing their work.
//!
//! A call that is not admitted is answered at once (see [`crate::door`]).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// The limiter's knobs, with the defaults README gives and why.
#[derive(Debug, Clone, Copy)]
pub struct LimitSettings {
    /// The limit once the first floor is measured: enough for a healthy instance's start.
    pub initial: u32,
    /// Never below this: so many calls at once are always let in (32, `--min-in-flight`). Calls
    /// keep being measured; an instance's answers leave in fewer writes the more calls finish
    /// together, so its capacity is reached only with a few dozen in flight; and a caller that
    /// keeps a bounded number of calls in flight is not a flood — refusing part of them only
    /// makes callers that retry at once spin.
    pub min: u32,
    /// Never above this: the hard cap, whatever latency says (`--max-in-flight`).
    pub max: u32,
    /// How much slower than the floor a call may be without counting as queued (1.25: a quarter,
    /// so that a noisy machine's jitter is not taken for a queue).
    pub tolerance: f64,
    /// How often the floor is measured again, so that it follows an instance that got slower
    /// or faster (jittered by ±10 % so that instances do not measure together).
    pub measure_every: Duration,
    /// Calls answered at the minimum limit per floor measurement.
    pub measure_samples: usize,
    /// The shortest window...
    pub window: Duration,
    /// ...and the fewest calls in one.
    pub min_samples: usize,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            initial: 64,
            min: 32,
            max: 512,
            tolerance: 1.25,
            measure_every: Duration::from_secs(5),
            measure_samples: 25,
            window: Duration::from_millis(100),
            min_samples: 16,
        }
    }
}

/// The most latencies kept per window: the median of the first ones is the window's.
const WINDOW_SAMPLES: usize = 512;
/// The share of a window's answers that may be overload from below before the limit shrinks.
pub const OVERLOADED_SHARE: f64 = 0.02;

/// What the limiter is doing.
#[derive(Debug)]
enum Phase {
    /// Holding the limit at `pinned` since `since` to measure the floor; `resume` is the limit
    /// after. (At start, `since` is the first call's arrival.)
    Measuring {
        resume: f64,
        pinned: u32,
        since: Option<Instant>,
        samples: Vec<f64>,
    },
    /// Moving the limit once per window.
    Sampling {
        start: Option<Instant>,
        samples: Vec<f64>,
        most_in_flight: u32,
        /// Answers that were overload from below.
        overloaded: u32,
        answers: u32,
    },
}

#[derive(Debug)]
struct State {
    limit: f64,
    /// The floor, in seconds (0 before the first measurement).
    floor: f64,
    phase: Phase,
    next_measurement: Option<Instant>,
}

/// An adaptive concurrency limit (see the module docs). Cheap to consult from every call.
#[derive(Debug)]
pub struct Limiter {
    settings: LimitSettings,
    limit: AtomicU32,
    in_flight: AtomicU32,
    /// The latest window's median latency, in nanoseconds (0 before the first).
    typical: AtomicU64,
    /// Whether a call was refused since the last window ended.
    refused: AtomicBool,
    state: Mutex<State>,
}

/// A call let in: give it back with [`Permit::done`] when it is answered; dropping it (the caller
/// went away) lets the place go without a latency sample.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    started: Instant,
    in_flight: u32,
    done: bool,
}

fn median(samples: &mut [f64]) -> f64 {
    samples.sort_unstable_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(0.0)
}

impl Limiter {
    /// A limiter that starts by measuring its floor.
    pub fn new(settings: LimitSettings) -> Self {
        let initial = f64::from(settings.initial.clamp(settings.min, settings.max));
        let pinned = settings.min;
        Self {
            settings,
            limit: AtomicU32::new(pinned),
            in_flight: AtomicU32::new(0),
            typical: AtomicU64::new(0),
            refused: AtomicBool::new(false),
            state: Mutex::new(State {
                limit: initial,
                floor: 0.0,
                phase: Phase::Measuring {
                    resume: initial,
                    pinned,
                    since: None,
                    samples: Vec::new(),
                },
                next_measurement: None,
            }),
        }
    }

    /// Half of `limit`, never below the minimum: the limit while the floor is measured.
    fn halved(settings: &LimitSettings, limit: f64) -> u32 {
        ((limit / 2.0) as u32).max(settings.min)
    }

    /// The limit in force.
    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Relaxed)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// What a call takes now: the latest window's median latency, once measured.
    pub fn typical_latency(&self) -> Option<Duration> {
        let nanos = self.typical.load(Ordering::Relaxed);
        (nanos > 0).then(|| Duration::from_nanos(nanos))
    }

    /// What a call takes with nothing queued, once measured.
    pub fn floor(&self) -> Option<Duration> {
        let floor = self.lock().floor;
        (floor > 0.0).then(|| Duration::from_secs_f64(floor))
    }

    /// Lets a call in at `now` if fewer than the limit are in flight.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Option<Permit> {
        let limit = self.limit.load(Ordering::Relaxed);
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.refused.store(true, Ordering::Relaxed);
            return None;
        }
        Some(Permit {
            limiter: self.clone(),
            started: now,
            in_flight: before + 1,
            done: false,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, state: &mut State, limit: f64) {
        let s = &self.settings;
        state.limit = limit.clamp(f64::from(s.min), f64::from(s.max));
        self.limit.store(state.limit as u32, Ordering::Relaxed);
    }

    /// Folds in one call: let in at `started` with `in_flight` calls in flight, answered at
    /// `now`; its latency counts if it was `served`, and it counts as overload from below if not.
    fn sample(&self, started: Instant, in_flight: u32, now: Instant, served: bool) {
        let s = self.settings;
        let latency = now.saturating_duration_since(started).as_secs_f64();
        let mut guard = self.lock();
        let state = &mut *guard;
        match &mut state.phase {
            Phase::Measuring {
                resume,
                pinned,
                since,
                samples,
            } => {
                // Only calls let in under the pinned limit say what a call costs unloaded: not
                // those let in before it (they ran beside many more).
                let since = *since.get_or_insert(started);
                if !served || in_flight > *pinned || started < since {
                    return;
                }
                samples.push(latency);
                if samples.len() < s.measure_samples {
                    return;
                }
                state.floor = median(samples);
                let resume = *resume;
                state.phase = Phase::Sampling {
                    start: None,
                    samples: Vec::new(),
                    most_in_flight: 0,
                    overloaded: 0,
                    answers: 0,
                };
                // ±10 %, so that instances started together do not measure together.
                let jitter = rand::random_range(0.9..1.1);
                state.next_measurement = Some(now + s.measure_every.mul_f64(jitter));
                self.set(state, resume);
            }
            Phase::Sampling {
                start,
                samples,
                most_in_flight,
                overloaded: overloads,
                answers,
            } => {
                let start = *start.get_or_insert(now);
                if served && samples.len() < WINDOW_SAMPLES {
                    samples.push(latency);
                }
                *most_in_flight = (*most_in_flight).max(in_flight);
                *answers += 1;
                *overloads += u32::from(!served);
                if samples.len() < s.min_samples || now.saturating_duration_since(start) < s.window
                {
                    return;
                }
                let typical = median(samples);
                let asked = f64::from(*most_in_flight);
                let below = f64::from(*overloads) / f64::from((*answers).max(1));
                state.phase = Phase::Sampling {
                    start: Some(now),
                    samples: Vec::new(),
                    most_in_flight: 0,
                    overloaded: 0,
                    answers: 0,
                };
                self.typical
                    .store((typical * 1e9) as u64, Ordering::Relaxed);
                let limit = state.limit;
                if typical > 0.0 && state.floor > 0.0 {
                    let mut gradient = (state.floor * s.tolerance / typical).clamp(0.5, 2.0);
                    if below > OVERLOADED_SHARE {
                        gradient = gradient.min(0.9);
                    }
                    if gradient < 1.0 {
                        // Shrinking: no headroom.
                        self.set(state, limit * gradient);
                    } else if asked >= limit / 2.0 {
                        self.set(state, limit * gradient + limit.sqrt());
                    }
                }
                let refused = self.refused.swap(false, Ordering::Relaxed);
                tracing::debug!(
                    typical_ms = typical * 1e3,
                    floor_ms = state.floor * 1e3,
                    shed_below = below,
                    refused,
                    most_in_flight = asked,
                    limit = state.limit,
                    "window"
                );
                if state.next_measurement.is_some_and(|at| now >= at) {
                    let pinned = if refused {
                        s.min
                    } else {
                        Self::halved(&s, state.limit)
                    };
                    state.phase = Phase::Measuring {
                        resume: state.limit,
                        pinned,
                        since: Some(now),
                        samples: Vec::new(),
                    };
                    self.limit.store(pinned, Ordering::Relaxed);
                }
            }
        }
    }
}

impl Permit {
    /// The call was served, answered at `now`: its latency is a sample of the instance's.
    pub fn done(self, now: Instant) {
        self.finish(now, true);
    }

    /// The call was answered at `now` with overload from below (an instance this one called
    /// shed it): no latency sample, but a sign to admit less.
    pub fn overloaded(self, now: Instant) {
        self.finish(now, false);
    }

    /// The call was answered with an error of its own (bad input, say): it says nothing about
    /// the instance's load, and leaves no sample.
    pub fn ignore(self) {}

    /// Starts the call's clock again at `now`, when its work begins: a call is let in as its
    /// connection reads it, and may wait for the runtime before its task first runs. The limit
    /// counts it from admission; its latency is measured from here, as what serving it takes.
    pub fn begin(&mut self, now: Instant) {
        self.started = now;
    }

    fn finish(mut self, now: Instant, served: bool) {
        self.done = true;
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.limiter
            .sample(self.started, self.in_flight, now, served);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.done {
            self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `rounds` rounds of 20 steps of 6 ms on a clock that moves only when told: in each
    /// step, up to `demand` calls (never more than the limit lets in), each taking
    /// `latency(calls let in)`.
    fn steps(
        limiter: &Arc<Limiter>,
        clock: &mut Instant,
        rounds: u32,
        demand: u32,
        latency: impl Fn(u32) -> Duration,
    ) {
        for _ in 0..rounds * 20 {
            let permits: Vec<Permit> = (0..demand)
                .map_while(|_| limiter.try_acquire(*clock))
                .collect();
            let answered = *clock + latency(permits.len() as u32);
            *clock += Duration::from_millis(6);
            for permit in permits {
                permit.done(answered);
            }
        }
    }

    /// Calls that always take `latency`.
    fn run(
        limiter: &Arc<Limiter>,
        clock: &mut Instant,
        rounds: u32,
        latency: Duration,
        demand: u32,
    ) {
        steps(limiter, clock, rounds, demand, |_| latency);
    }

    /// An instance that serves `capacity` calls at once in 2 ms each and queues the rest (a
    /// call's latency grows with how far the calls let in exceed its capacity), under demand
    /// that never ends.
    fn overloaded(limiter: &Arc<Limiter>, clock: &mut Instant, rounds: u32, capacity: u32) {
        steps(limiter, clock, rounds, u32::MAX, |n| {
            Duration::from_micros(2000 * u64::from(n.max(capacity)) / u64::from(capacity))
        });
    }

    #[test]
    fn admission_stops_at_the_limit_and_places_come_back() {
        // Starts at half of 4, measuring its floor.
        let limiter = Arc::new(Limiter::new(LimitSettings {
            initial: 4,
            min: 2,
            ..LimitSettings::default()
        }));
        let now = Instant::now();
        let a = limiter.try_acquire(now).expect("first");
        let b = limiter.try_acquire(now).expect("second");
        assert!(
            limiter.try_acquire(now).is_none(),
            "a third over a limit of 2"
        );
        drop(a); // the caller went away
        let c = limiter.try_acquire(now).expect("a place came back");
        b.done(now);
        c.done(now);
        assert_eq!(limiter.in_flight(), 0);
    }

    #[test]
    fn a_call_is_timed_from_when_its_work_begins() {
        let limiter = Arc::new(Limiter::new(LimitSettings::default()));
        let mut clock = Instant::now();
        for _ in 0..LimitSettings::default().measure_samples {
            let mut permit = limiter.try_acquire(clock).expect("let in");
            // Let in, then 5 ms until its task first runs, then 2 ms of work.
            permit.begin(clock + Duration::from_millis(5));
            permit.done(clock + Duration::from_millis(7));
            clock += Duration::from_millis(8);
        }
        assert_eq!(limiter.floor(), Some(Duration::from_millis(2)));
    }

    #[test]
    fn the_floor_is_measured_first_then_the_limit_opens() {
        let limiter = Arc::new(Limiter::new(LimitSettings::default()));
        let mut clock = Instant::now();
        assert_eq!(
            limiter.limit(),
            LimitSettings::default().min,
            "the minimum until the floor is known"
        );
        run(&limiter, &mut clock, 1, Duration::from_millis(2), 1000);
        assert_eq!(limiter.floor(), Some(Duration::from_millis(2)));
        assert!(limiter.limit() >= 64, "{}", limiter.limit());
        // Latency at the floor under full demand: up to the hard cap, within seconds.
        run(&limiter, &mut clock, 30, Duration::from_millis(2), 1000);
        assert_eq!(limiter.limit(), 512);
    }

    #[test]
    fn under_endless_demand_the_limit_settles_near_capacity_and_follows_it() {
        let limiter = Arc::new(Limiter::new(LimitSettings::default()));
        let mut clock = Instant::now();
        // Capacity 50: latency climbs as the limit passes it, and the limit stops there, far
        // from the cap of 512 — however long it lasts (floor measurements included).
        overloaded(&limiter, &mut clock, 100, 50);
        let mut seen = Vec::new();
        for _ in 0..500 {
            overloaded(&limiter, &mut clock, 1, 50);
            seen.push(limiter.limit());
        }
        seen.sort_unstable();
        // Halved while the floor is measured again, now and then; otherwise just above the
        // capacity.
        assert!(
            seen[50] >= 50 && seen[499] <= 80,
            "{seen:?} for a capacity of 50"
        );
        assert!(limiter.limit() >= 4);
        // Capacity halves: so does the limit, within a second.
        overloaded(&limiter, &mut clock, 10, 25);
        assert!(
            limiter.limit() <= 50,
            "{} for a capacity of 25",
            limiter.limit()
        );
        // Capacity doubles: the limit follows upward.
        overloaded(&limiter, &mut clock, 50, 100);
        assert!(
            limiter.limit() >= 90,
            "{} for a capacity of 100",
            limiter.limit()
        );
    }

    #[test]
    fn an_instance_flooded_from_its_start_learns_its_unqueued_cost() {
        // Capacity 10, demand without end from the first call: the floor is measured at the
        // minimum (8 here, under the capacity), so it is the unqueued 2 ms, and the limit
        // settles just above the capacity within seconds. (Measured at half the initial limit,
        // 32, the floor would be a queued 6.4 ms and the limit would settle near 40, every call
        // waiting four times its cost.)
        let limiter = Arc::new(Limiter::new(LimitSettings {
            min: 8,
            ..LimitSettings::default()
        }));
        let mut clock = Instant::now();
        overloaded(&limiter, &mut clock, 25, 10);
        assert_eq!(limiter.floor(), Some(Duration::from_millis(2)));
        assert!(
            (10..=20).contains(&limiter.limit()),
            "{} for a capacity of 10",
            limiter.limit()
        );
    }

    #[test]
    fn overload_from_below_shrinks_the_limit_though_latency_holds() {
        let limiter = Arc::new(Limiter::new(LimitSettings::default()));
        let mut clock = Instant::now();
        run(&limiter, &mut clock, 10, Duration::from_millis(2), 1000);
        let before = limiter.limit();
        // A tenth of the answers are overload relayed from below, as fast as the rest.
        for i in 0..200u32 {
            let permits: Vec<Permit> = (0..u32::MAX)
                .map_while(|_| limiter.try_acquire(clock))
                .collect();
            let answered = clock + Duration::from_millis(2);
            clock += Duration::from_millis(6);
            for (j, permit) in permits.into_iter().enumerate() {
                if (i as usize + j).is_multiple_of(10) {
                    permit.overloaded(answered);
                } else {
                    permit.done(answered);
                }
            }
        }
        assert!(
            limiter.limit() < before / 2,
            "{before} -> {}",
            limiter.limit()
        );
    }

    #[test]
    fn an_instance_asked_for_little_does_not_grow_its_limit() {
        let limiter = Arc::new(Limiter::new(LimitSettings::default()));
        let mut clock = Instant::now();
        run(&limiter, &mut clock, 100, Duration::from_millis(2), 3);
        assert_eq!(limiter.limit(), 64);
        assert_eq!(limiter.typical_latency(), Some(Duration::from_millis(2)));
    }
}
