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
use std::time::Duration;

use futures::task::AtomicWaker;
use tower::Service;

/// One endpoint's trial, shared by the endpoint as the balancer holds it ([`OnTrial`]) and its
/// trial call.
#[derive(Debug, Default)]
struct Trial {
    /// A call's answer has been measured: the trial is over for good.
    measured: AtomicBool,
    /// The trial's call is out.
    in_flight: AtomicBool,
    /// The balancer, waiting for the endpoint to be ready again.
    waker: AtomicWaker,
}

impl Trial {
    /// The trial call's answer has been measured.
    fn measured(&self) {
        self.measured.store(true, Ordering::Release);
        self.waker.wake();
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

/// How long after an answer its measurement completes (`None`: at once); a shed call's, say, is
/// held open as a penalty.
pub(super) type Penalty<T> = fn(&T) -> Option<Duration>;

/// An endpoint on trial: not ready while its trial call is out.
pub(super) struct OnTrial<S, T> {
    inner: S,
    trial: Arc<Trial>,
    penalty: Penalty<T>,
}

impl<S, T> OnTrial<S, T> {
    /// `inner`, new: on trial until the answer to one call is measured, `penalty` after it
    /// arrives.
    pub(super) fn new(inner: S, penalty: Penalty<T>) -> Self {
        Self {
            inner,
            trial: Arc::default(),
            penalty,
        }
    }
}

impl<S, Request> Service<Request> for OnTrial<S, S::Response>
where
    S: Service<Request>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TrialFuture<S::Future, S::Response>;

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
                penalty: self.penalty,
                answered: false,
            }
        });
        TrialFuture {
            inner: self.inner.call(request),
            trial,
        }
    }
}

impl<S: tower::load::Load, T> tower::load::Load for OnTrial<S, T> {
    type Metric = S::Metric;

    fn load(&self) -> S::Metric {
        self.inner.load()
    }
}

/// The trial call, while it is out: ends the trial unmeasured if dropped unanswered.
struct TrialCall<T> {
    trial: Arc<Trial>,
    penalty: Penalty<T>,
    answered: bool,
}

impl<T> TrialCall<T> {
    /// Ends the trial with `answer`'s measurement: at once, or when its penalty is over (a
    /// little after the balancer's own measurement ends).
    fn answered(&mut self, answer: &T) {
        self.answered = true;
        match (self.penalty)(answer) {
            None => self.trial.measured(),
            Some(penalty) => {
                let trial = self.trial.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(penalty + Duration::from_millis(1)).await;
                    trial.measured();
                });
            }
        }
    }
}

impl<T> Drop for TrialCall<T> {
    fn drop(&mut self) {
        if !self.answered {
            self.trial.abandoned();
        }
    }
}

pin_project_lite::pin_project! {
    /// A call to an endpoint, ending its trial unmeasured if it fails or is given up.
    pub(super) struct TrialFuture<F, T> {
        #[pin]
        inner: F,
        trial: Option<TrialCall<T>>,
    }
}

impl<F, T, E> Future for TrialFuture<F, T>
where
    F: Future<Output = Result<T, E>>,
{
    type Output = Result<T, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let output = std::task::ready!(this.inner.poll(cx));
        if let (Ok(answer), Some(call)) = (&output, this.trial.as_mut()) {
            call.answered(answer);
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

    /// Always ready; counts calls; answers each `Ok(penalty)`, or `Err` if told to fail.
    #[derive(Clone, Default)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        penalty: Option<Duration>,
        fail: bool,
    }

    type Answer = Option<Duration>;

    impl Service<()> for Counting {
        type Response = Answer;
        type Error = ();
        type Future = Ready<Result<Answer, ()>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ()>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _request: ()) -> Self::Future {
            self.calls.fetch_add(1, Ordering::Relaxed);
            ready(if self.fail { Err(()) } else { Ok(self.penalty) })
        }
    }

    fn on_trial(service: Counting) -> OnTrial<Counting, Answer> {
        OnTrial::new(service, |penalty: &Answer| *penalty)
    }

    fn ready_now<S: Service<()>>(service: &mut S) -> bool {
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        service.poll_ready(&mut cx).is_ready()
    }

    #[test]
    fn a_new_endpoint_takes_one_call_until_it_is_answered() {
        let mut endpoint = on_trial(Counting::default());
        assert!(ready_now(&mut endpoint));
        let first = endpoint.call(());
        assert!(
            !ready_now(&mut endpoint),
            "ready again while its trial call is out"
        );
        assert_eq!(first.now_or_never(), Some(Ok(None)));
        assert!(ready_now(&mut endpoint));
        // Measured: no more trial, any number of calls.
        let _second = endpoint.call(());
        let _third = endpoint.call(());
        assert!(ready_now(&mut endpoint));
        assert_eq!(endpoint.inner.calls.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_trial_answer_with_a_penalty_ends_the_trial_when_the_penalty_does() {
        let penalty = Duration::from_millis(50);
        let mut endpoint = on_trial(Counting {
            penalty: Some(penalty),
            ..Counting::default()
        });
        let answered = std::time::Instant::now();
        assert_eq!(endpoint.call(()).await, Ok(Some(penalty)));
        assert!(!ready_now(&mut endpoint), "ready while its penalty runs");
        tokio::time::timeout(
            Duration::from_secs(5),
            std::future::poll_fn(|cx| endpoint.poll_ready(cx)),
        )
        .await
        .expect("woken when the penalty is over")
        .expect("ready");
        assert!(answered.elapsed() >= penalty);
    }

    #[test]
    fn a_trial_call_that_fails_or_is_given_up_lets_the_next_call_try() {
        let mut endpoint = on_trial(Counting {
            fail: true,
            ..Counting::default()
        });
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
        assert!(!endpoint.trial.over());
    }
}
