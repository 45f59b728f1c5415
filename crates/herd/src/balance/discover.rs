//! Published endpoint sets turned into the insert/remove changes tower's balancer consumes, each
//! endpoint weighed by peak-EWMA latency.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use std::time::Duration;

use futures::Stream;
use tokio_stream::wrappers::WatchStream;
use tower::discover::Change;
use tower::load::PeakEwma;

use super::pool::{Pool, State};
use super::trial::OnTrial;
use super::{EWMA_DECAY, PenalizeShed, shed_penalty};
use crate::client::connection::Connection;
use crate::client::connection::Response;

/// An endpoint as the balancer holds it: its connection, weighed by peak-EWMA latency, on trial
/// until its first answer is measured.
pub(super) type Weighed = OnTrial<PeakEwma<Connection, PenalizeShed>, Response>;

/// The estimate of an endpoint nobody has timed yet: as fast as can be (peak-EWMA needs more
/// than zero), so that p2c tries it the first time it draws it (see [`super::trial`]).
const UNTRIED_RTT: Duration = Duration::from_nanos(1);

/// Turns published ready sets into the insert/remove changes tower's balancer consumes. It only
/// holds the latest set, so it never blocks discovery while no calls flow.
///
/// The balancer asks it for changes on every call. Polling `updates` registers the calling
/// task's waker with the publisher (a lock, and a clone of the waker) each time, and a call only
/// needs that when no endpoint is ready and it must wait for news. So it is polled only when
/// there is news (`news`, a load) or a call is waiting (`waiting`).
pub(super) struct EndpointDiscover {
    updates: WatchStream<Pool>,
    /// Changed when `updates` has a set not yet taken.
    news: tokio::sync::watch::Receiver<Pool>,
    /// Set while a call waits for an endpoint (see [`super::MeshChannel::send`]).
    waiting: Arc<AtomicBool>,
    /// Instance id → generation of the connection the balancer holds.
    current: HashMap<String, u64>,
    pending: VecDeque<Change<String, Weighed>>,
}

impl EndpointDiscover {
    fn diff(&mut self, next: &Pool) {
        let serving = |id: &str| match next.endpoints.get(id) {
            Some(State::Serving(connection)) => Some(connection),
            _ => None,
        };
        let gone: Vec<String> = self
            .current
            .keys()
            .filter(|id| serving(id).is_none())
            .cloned()
            .collect();
        for id in gone {
            self.current.remove(&id);
            self.pending.push_back(Change::Remove(id));
        }
        for (id, state) in next.endpoints.iter() {
            let State::Serving(connection) = state else {
                continue;
            };
            if self.current.get(id) == Some(&connection.generation) {
                continue;
            }
            self.current.insert(id.clone(), connection.generation);
            let weighed = PeakEwma::new(
                connection.clone(),
                UNTRIED_RTT,
                EWMA_DECAY.as_nanos() as f64,
                PenalizeShed,
            );
            self.pending.push_back(Change::Insert(
                id.clone(),
                OnTrial::new(weighed, shed_penalty),
            ));
        }
    }
}

impl Stream for EndpointDiscover {
    type Item = Result<Change<String, Weighed>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            // A closed publisher has no news: the last known set stays.
            if !self.waiting.load(Ordering::Relaxed) && !self.news.has_changed().unwrap_or(false) {
                return Poll::Pending;
            }
            // Before `updates` takes the set: a set published after this is news again.
            self.news.mark_unchanged();
            match Pin::new(&mut self.updates).poll_next(cx) {
                Poll::Ready(Some(next)) => self.diff(&next),
                // The publisher is gone: keep serving the last known set.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl EndpointDiscover {
    /// Follows the endpoint states `pool` publishes; polls for them whenever `waiting` is set.
    pub(super) fn new(pool: tokio::sync::watch::Receiver<Pool>, waiting: Arc<AtomicBool>) -> Self {
        let mut news = pool.clone();
        // The set at hand is the first news.
        news.mark_changed();
        Self {
            updates: WatchStream::new(pool),
            news,
            waiting,
            current: HashMap::new(),
            pending: VecDeque::new(),
        }
    }
}
