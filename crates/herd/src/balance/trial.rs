//! A new endpoint's trial: it takes one call, and no other until that call is measured.
//!
//! peak-EWMA needs a first estimate for an endpoint nobody has timed. Any fixed guess is wrong
//! somewhere: the others' estimates fall slowly from their own first guesses (EWMA forgets over
//! seconds), so a newcomer guessed slower than they currently look is passed over by p2c for as
//! long as that lasts (measured: 5–30 s at 1000 instances), and one guessed faster draws every
//! call p2c offers it before its first answer. Instead a new endpoint is assumed as fast as can
//! be, which makes p2c try it the first time it draws it, and is held out of the ready set while
//! that one call is out: its first answer then sets its estimate (peak-EWMA takes a slower answer
//! whole), and from there it competes like any other. A call that fails or is given up ends the
//! trial without a measurement: the next call tries again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures::task::AtomicWaker;
use tower::Service;

/// One endpoint's trial, shared by the endpoint as the balancer holds it ([`OnTrial`]) and the
/// completion of its calls' measurements (which ends it).
#[derive(Debug, Default)]
pub(super) struct Trial {
    /// A call's answer has been measured: the trial is over for good.
    measured: AtomicBool,
    /// The trial's call is out.
    in_flight: AtomicBool,
    /// The balancer, waiting for the endpoint to be ready again.
    waker: AtomicWaker,
}

impl Trial {
    /// Called when a call's measurement completes (every call's: after the first, one load).
    pub(super) fn measured(&self) {
        if !self.measured.load(Ordering::Relaxed) {
            self.measured.store(true, Ordering::Release);
            self.waker.wake();
        }
    }

    fn over(&self) -> bool {
        self.measured.load(Ordering::Acquire)
    }

    /// Whether the endpoint must wait: its trial call is out and not yet measured.
    fn waiting(&self) -> bool {
        !self.over() && self.in_flight.load(Ordering::Acquire)
    }

    /// The trial's call ended without a measurement.
    fn abandoned(&self) {
        self.in_flight.store(false, Ordering::Release);
        self.waker.wake();
    }
}

/// An endpoint on trial: not ready while its trial call is out.
pub(super) struct OnTrial<S> {
    inner: S,
    trial: Arc<Trial>,
}

impl<S> OnTrial<S> {
    /// `inner` on `trial` (whose end its measurements report).
    pub(super) fn new(inner: S, trial: Arc<Trial>) -> Self {
        Self { inner, trial }
    }
}

impl<S, Request> Service<Request> for OnTrial<S>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrialFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        if self.trial.waiting() {
            self.trial.waker.register(cx.waker());
            // Measured (or abandoned) between the check and the registration?
            if self.trial.waiting() {
                return Poll::Pending;
            }
        }
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        let trial = (!self.trial.over()).then(|| {
            self.trial.in_flight.store(true, Ordering::Release);
            TrialCall {
                trial: self.trial.clone(),
                answered: false,
            }
        });
        TrialFuture {
            inner: self.inner.call(request),
            trial,
        }
    }
}

impl<S: tower::load::Load> tower::load::Load for OnTrial<S> {
    type Metric = S::Metric;

    fn load(&self) -> S::Metric {
        self.inner.load()
    }
}

/// The trial call, while it is out: ends the trial unmeasured if dropped unanswered.
struct TrialCall {
    trial: Arc<Trial>,
    answered: bool,
}

impl Drop for TrialCall {
    fn drop(&mut self) {
        if !self.answered {
            self.trial.abandoned();
        }
    }
}

pin_project_lite::pin_project! {
    /// A call to an endpoint, ending its trial unmeasured if it fails or is given up.
    pub(super) struct TrialFuture<F> {
        #[pin]
        inner: F,
        trial: Option<TrialCall>,
    }
}

impl<F, T, E> Future for TrialFuture<F>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let (Ok(_), Some(call)) = (&output, this.trial.as_mut()) {
            // Its measurement ends the trial (at once, or after a shed call's penalty).
            call.answered = true;
        }
        *this.trial = None;
        Poll::Ready(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use std::future::{Ready, ready};
    use std::sync::atomic::AtomicUsize;

    /// Always ready; counts calls; each answers with `Ok` or `Err` as told.
    #[derive(Clone, Default)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        fail: bool,
    }

    impl Service<()> for Counting {
        type Response = ();
        type Error = ();
        type Future = Ready<Result<(), ()>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: ()) -> Self::Future {
            self.calls.fetch_add(1, Ordering::Relaxed);
            ready(if self.fail { Err(()) } else { Ok(()) })
        }
    }

    fn ready_now<S: Service<()>>(service: &mut S) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        service.poll_ready(&mut cx).is_ready()
    }

    #[test]
    fn a_new_endpoint_takes_one_call_until_it_is_measured() {
        let trial = Arc::new(Trial::default());
        let mut endpoint = OnTrial::new(Counting::default(), trial.clone());
        assert!(ready_now(&mut endpoint));
        let first = endpoint.call(());
        assert!(
            !ready_now(&mut endpoint),
            "ready again while its trial call is out"
        );
        // Answered, but its measurement (a shed call's penalty, say) still runs.
        assert_eq!(first.now_or_never(), Some(Ok(())));
        assert!(
            !ready_now(&mut endpoint),
            "ready before its answer was measured"
        );
        trial.measured();
        assert!(ready_now(&mut endpoint));
        // Measured: no more trial, any number of calls.
        let _second = endpoint.call(());
        let _third = endpoint.call(());
        assert!(ready_now(&mut endpoint));
        assert_eq!(endpoint.inner.calls.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_trial_call_that_fails_or_is_given_up_lets_the_next_call_try() {
        let trial = Arc::new(Trial::default());
        let failing = Counting {
            fail: true,
            ..Counting::default()
        };
        let mut endpoint = OnTrial::new(failing, trial.clone());
        let failed = endpoint.call(());
        assert!(!ready_now(&mut endpoint));
        assert_eq!(failed.now_or_never(), Some(Err(())));
        assert!(
            ready_now(&mut endpoint),
            "still held after its trial call failed"
        );

        let given_up = endpoint.call(());
        assert!(!ready_now(&mut endpoint));
        drop(given_up);
        assert!(
            ready_now(&mut endpoint),
            "still held after its trial call was dropped"
        );
        assert!(!trial.over());
    }

    #[test]
    fn the_end_of_a_trial_wakes_the_balancer_waiting_for_it() {
        let trial = Arc::new(Trial::default());
        let mut endpoint = OnTrial::new(Counting::default(), trial.clone());
        let _out = endpoint.call(());
        let woken = Arc::new(AtomicUsize::new(0));
        let waker = futures::task::waker(Arc::new(Wake(woken.clone())));
        let mut cx = Context::from_waker(&waker);
        assert!(endpoint.poll_ready(&mut cx).is_pending());
        trial.measured();
        assert_eq!(woken.load(Ordering::Relaxed), 1);
        assert!(endpoint.poll_ready(&mut cx).is_ready());
    }

    struct Wake(Arc<AtomicUsize>);

    impl futures::task::ArcWake for Wake {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}
