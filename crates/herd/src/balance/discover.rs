//! Published endpoint sets turned into the insert/remove changes tower's balancer consumes, each
//! endpoint weighed by peak-EWMA latency.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use tokio_stream::wrappers::WatchStream;
use tower::discover::Change;
use tower::load::PeakEwma;

use super::pool::{Pool, State};
use super::{DEFAULT_RTT, EWMA_DECAY, PenalizeShed};
use crate::client::connection::Connection;

/// An endpoint as the balancer holds it: its connection, weighed by peak-EWMA latency.
pub(super) type Weighed = PeakEwma<Connection, PenalizeShed>;

/// Turns published ready sets into the insert/remove changes tower's balancer consumes. It only
/// holds the latest set, so it never blocks discovery while no calls flow.
pub(super) struct EndpointDiscover {
    updates: WatchStream<Pool>,
    /// Instance id → generation of the connection the balancer holds.
    current: HashMap<String, u64>,
    pending: VecDeque<Change<String, Weighed>>,
    /// The channel's typical latency (nanoseconds, 0 before any answer; a low quantile of recent
    /// answers): a new endpoint is assumed that fast. Assumed slower, p2c would pass it over for
    /// as long as others answer faster than the assumption — until its estimate decayed, tens of
    /// seconds — and it would get no call; assumed faster than any, it would draw a burst before
    /// its first answer.
    typical: Arc<AtomicU64>,
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
            let typical = match self.typical.load(Ordering::Relaxed) {
                0 => DEFAULT_RTT,
                nanos => Duration::from_nanos(nanos),
            };
            let weighed = PeakEwma::new(
                connection.clone(),
                typical,
                EWMA_DECAY.as_nanos() as f64,
                PenalizeShed,
            );
            self.pending.push_back(Change::Insert(id.clone(), weighed));
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
            match Pin::new(&mut self.updates).poll_next(cx) {
                Poll::Ready(Some(next)) => self.diff(&next),
                // The publisher is gone: keep serving the last known set.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl EndpointDiscover {
    /// Follows the endpoint states `pool` publishes.
    pub(super) fn new(pool: tokio::sync::watch::Receiver<Pool>, typical: Arc<AtomicU64>) -> Self {
        Self {
            updates: WatchStream::new(pool),
            current: HashMap::new(),
            pending: VecDeque::new(),
            typical,
        }
    }
}
