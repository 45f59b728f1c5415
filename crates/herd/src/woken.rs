//! A future that is polled only when it has been woken, beside another in the same task.
//!
//! A connection's task waits on its connection and on something rarely ready beside it (the
//! instance's stop signal, a keepalive timer). `select!` polls both on every wake of the task,
//! and the connection wakes it for every frame: each such poll of the other future re-registers
//! the task's waker with it (a lock, or atomics, and a clone), every time for nothing.
//! [`Woken`] gives the future a waker of its own, so that it is polled again only once it has
//! used it (tokio's cooperative budget, when it makes a future wait, wakes it through that
//! waker too), or once it has been changed from outside ([`Woken::future`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// `F`, polled on the first poll and then only after `F` has woken its task.
pub(crate) struct Woken<F> {
    future: Pin<Box<F>>,
    signal: Arc<Signal>,
    /// The waker `F` is given: it raises the signal, then wakes the task.
    waker: Waker,
    /// The task's waker as last handed to the signal.
    task: Option<Waker>,
}

/// Whether the future has woken its task since it was last polled, and that task's waker.
struct Signal {
    woken: AtomicBool,
    task: Mutex<Option<Waker>>,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(task) = self.task().as_ref() {
            task.wake_by_ref();
        }
    }
}

impl Signal {
    /// The task's waker. The lock only guards a waker's clone or wake: a panic in one of those
    /// leaves nothing half-written, so a poisoned lock is used as it is (a wake is never lost).
    fn task(&self) -> std::sync::MutexGuard<'_, Option<Waker>> {
        self.task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<F: Future> Woken<F> {
    /// `future`, to be polled the first time and then only after it has woken its task.
    pub(crate) fn new(future: F) -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        Self {
            future: Box::pin(future),
            waker: Waker::from(signal.clone()),
            signal,
            task: None,
        }
    }
}

impl<F> Woken<F> {
    /// The future itself, to change it: it is polled at the next poll, woken or not.
    pub(crate) fn future(&mut self) -> Pin<&mut F> {
        self.signal.woken.store(true, Ordering::Relaxed);
        self.future.as_mut()
    }
}

impl<F: Future> Future for Woken<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        if !this.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            *this.signal.task() = Some(cx.waker().clone());
            this.task = Some(cx.waker().clone());
        }
        // Swapped before the poll: a wake during it is a wake for the next one.
        if !this.signal.woken.load(Ordering::Relaxed)
            || !this.signal.woken.swap(false, Ordering::Acquire)
        {
            return Poll::Pending;
        }
        this.future
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;

    /// Counts its polls; ready once `ready` is set.
    struct Counted {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Future for Counted {
        type Output = ();

        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::Relaxed);
            if self.ready.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// A [`Woken`] around a [`Counted`], with what it shares.
    struct Probe {
        woken: Pin<Box<Woken<Counted>>>,
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Probe {
        fn new() -> Self {
            let (polls, ready) = (
                Arc::new(AtomicUsize::new(0)),
                Arc::new(AtomicBool::new(false)),
            );
            let waker = Arc::new(Mutex::new(None));
            let woken = Box::pin(Woken::new(Counted {
                polls: polls.clone(),
                ready: ready.clone(),
                waker: waker.clone(),
            }));
            Self {
                woken,
                polls,
                ready,
                waker,
            }
        }

        fn poll(&mut self, task: &Waker) -> Poll<()> {
            self.woken.as_mut().poll(&mut Context::from_waker(task))
        }

        fn polls(&self) -> usize {
            self.polls.load(Ordering::Relaxed)
        }

        /// Wakes the task the way the inner future's event would.
        fn wake_inner(&self) {
            self.waker.lock().unwrap().take().unwrap().wake();
        }
    }

    /// A task's waker that counts its wakes.
    struct TaskWakes(AtomicUsize);

    impl Wake for TaskWakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn task() -> (Arc<TaskWakes>, Waker) {
        let task = Arc::new(TaskWakes(AtomicUsize::new(0)));
        let waker = Waker::from(task.clone());
        (task, waker)
    }

    #[test]
    fn is_polled_again_only_after_it_woke_its_task() {
        let mut probe = Probe::new();
        let (task, waker) = task();
        assert!(probe.poll(&waker).is_pending());
        assert_eq!(probe.polls(), 1, "the first poll polls it");
        for _ in 0..10 {
            assert!(probe.poll(&waker).is_pending());
        }
        assert_eq!(probe.polls(), 1, "wakes for others do not poll it");
        probe.ready.store(true, Ordering::Release);
        probe.wake_inner();
        assert_eq!(task.0.load(Ordering::Relaxed), 1, "its wake wakes the task");
        assert!(probe.poll(&waker).is_ready());
        assert_eq!(probe.polls(), 2);
    }

    #[test]
    fn a_new_task_waker_is_woken_instead_of_the_old_one() {
        let mut probe = Probe::new();
        let ((old, old_waker), (new, new_waker)) = (task(), task());
        assert!(probe.poll(&old_waker).is_pending());
        assert!(probe.poll(&new_waker).is_pending());
        assert_eq!(probe.polls(), 1);
        probe.wake_inner();
        assert_eq!(old.0.load(Ordering::Relaxed), 0);
        assert_eq!(new.0.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_timer_beside_a_busy_future_still_fires() {
        let mut timer = Woken::new(tokio::time::sleep(Duration::from_millis(20)));
        let mut busy = 0;
        let fired = std::future::poll_fn(|cx| {
            busy += 1;
            cx.waker().wake_by_ref();
            Pin::new(&mut timer).poll(cx)
        });
        tokio::time::timeout(Duration::from_secs(5), fired)
            .await
            .expect("the timer fired within its time");
        assert!(busy > 1);
    }
}
