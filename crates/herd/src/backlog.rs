//! What an instance has read and not yet answered, bounded for the whole instance.
//!
//! Each connection may have [`crate::server::MAX_CONCURRENT_STREAMS`] calls open, and a flood
//! opens hundreds of connections. While the instance is stopped for a moment (a throttled
//! container, a busy core), its callers go on sending; when it runs again, every connection reads
//! what waited for it, and every call read holds its stream, its task and its answer until the
//! answer is written — with 200 connections, 51 200 calls and about 100 MB after a one-second
//! pause. So the instance counts the calls it has read and not yet answered, and while they reach
//! a bound, its connections read nothing more: what callers send waits in their sockets, where it
//! costs the instance nothing, until answers make room.
//!
//! The count cannot bound one connection's own HTTP/2 tables: a connection given its turn reads
//! all its socket holds, and every stream read sits in its tables until answered. So strangers'
//! connections also share a pool of streams ([`Streams`]): each is offered, as it is accepted, at
//! most what the pool has left, so however many connections a flood opens, together they may
//! have the pool's size of calls open, plus a few each. A connection offered few streams while
//! the pool was spent is asked to open again once the pool has room ([`Share::outgrown`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::server::MAX_CONCURRENT_STREAMS;

/// The fewest calls an instance may hold read and not yet answered before its connections stop
/// reading: twice the default hard cap on calls in flight, so that refusals always have room
/// beside the calls let in.
pub const MIN_UNANSWERED: usize = 1024;

/// The bound for an instance that lets in at most `max_in_flight` calls at once: twice that, and
/// at least [`MIN_UNANSWERED`]. Calls let in never fill it alone, so it is never held by calls
/// that need to read more of their request before they can be answered.
pub(crate) fn bound_for(max_in_flight: u32) -> usize {
    (2 * max_in_flight as usize).max(MIN_UNANSWERED)
}

/// The fewest calls a stranger's connection may have open at once, however many connections
/// the instance holds: enough for a caller's calls to flow, few enough that a flood's hundreds of
/// connections hold little.
pub(crate) const MIN_STREAMS: u32 = 8;

/// The streams strangers' connections may have open at once, shared among them; the mesh's own
/// callers are not counted.
///
/// HTTP/2 sets a connection's stream limit once, when it is accepted (hyper offers no way to
/// change it later), so each new connection is offered what the pool has left: at most
/// [`MAX_CONCURRENT_STREAMS`], at least [`MIN_STREAMS`]. What it was offered returns to the pool
/// when it closes. A caller with more calls than its connection's limit keeps them in its own
/// queue (or opens another connection), not in the instance.
#[derive(Debug)]
pub(crate) struct Streams {
    size: usize,
    offered: AtomicUsize,
}

impl Streams {
    /// A pool of `size` streams.
    pub(crate) fn new(size: usize) -> Arc<Self> {
        Arc::new(Self {
            size,
            offered: AtomicUsize::new(0),
        })
    }

    /// A new connection's share of the pool, held until it is dropped.
    pub(crate) fn share(self: &Arc<Self>) -> Share {
        let mut streams = MIN_STREAMS;
        let _ = self
            .offered
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |offered| {
                streams = Self::offer(self.size.saturating_sub(offered));
                Some(offered + streams as usize)
            });
        Share {
            streams,
            from: self.clone(),
        }
    }

    /// Streams offered to the connections open now.
    pub(crate) fn offered(&self) -> usize {
        self.offered.load(Ordering::SeqCst)
    }

    /// What a new connection is offered while the pool has `left`.
    fn offer(left: usize) -> u32 {
        u32::try_from(left)
            .unwrap_or(u32::MAX)
            .clamp(MIN_STREAMS, MAX_CONCURRENT_STREAMS)
    }
}

/// One connection's share of [`Streams`]: the calls it may have open at once.
#[derive(Debug)]
pub(crate) struct Share {
    streams: u32,
    from: Arc<Streams>,
}

impl Share {
    /// The calls the connection may have open at once.
    pub(crate) fn streams(&self) -> u32 {
        self.streams
    }

    /// Whether the connection would be offered at least twice as many streams if it were opened
    /// again now (its own share given back first): a connection opened while the pool was spent,
    /// once the load that spent it has gone.
    pub(crate) fn outgrown(&self) -> bool {
        let left = self.from.size.saturating_sub(self.from.offered()) + self.streams as usize;
        Streams::offer(left) >= self.streams.saturating_mul(2)
    }
}

impl Drop for Share {
    fn drop(&mut self) {
        self.from
            .offered
            .fetch_sub(self.streams as usize, Ordering::SeqCst);
    }
}

/// The instance's count of calls read and not yet answered, and the connections waiting to read.
#[derive(Debug)]
pub(crate) struct Backlog {
    unanswered: AtomicUsize,
    bound: usize,
    /// Connections read again once the count is down to this (three quarters of the bound), so
    /// that each wake-up lets them read a good share, not one call each.
    resume: usize,
    waiting: Mutex<Vec<Waker>>,
    anyone_waiting: AtomicBool,
}

impl Backlog {
    /// A backlog of at most `bound` calls.
    pub(crate) fn new(bound: usize) -> Arc<Self> {
        let bound = bound.max(1);
        Arc::new(Self {
            unanswered: AtomicUsize::new(0),
            bound,
            resume: bound - bound / 4,
            waiting: Mutex::new(Vec::new()),
            anyone_waiting: AtomicBool::new(false),
        })
    }

    /// Counts a call just read until the returned guard is dropped (when it has been answered).
    pub(crate) fn read(self: &Arc<Self>) -> Unanswered {
        self.unanswered.fetch_add(1, Ordering::SeqCst);
        Unanswered {
            backlog: self.clone(),
        }
    }

    /// Calls read and not yet answered now.
    pub(crate) fn unanswered(&self) -> usize {
        self.unanswered.load(Ordering::SeqCst)
    }

    fn full(&self) -> bool {
        self.unanswered() >= self.bound
    }

    /// Ready when a connection may read; while the bound is reached, `cx` is woken once the
    /// count is down to the resume mark.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<()> {
        if !self.full() {
            return Poll::Ready(());
        }
        {
            let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            if !waiting.iter().any(|w| w.will_wake(cx.waker())) {
                waiting.push(cx.waker().clone());
            }
        }
        self.anyone_waiting.store(true, Ordering::SeqCst);
        // Again after registering: an answer may have made room meanwhile, and its wake-up may
        // have looked before the flag was set.
        if self.full() {
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    }

    fn answered(&self) {
        let before = self.unanswered.fetch_sub(1, Ordering::SeqCst);
        if before <= self.resume + 1 && self.anyone_waiting.load(Ordering::SeqCst) {
            self.anyone_waiting.store(false, Ordering::SeqCst);
            let waiting =
                std::mem::take(&mut *self.waiting.lock().unwrap_or_else(PoisonError::into_inner));
            for waker in waiting {
                waker.wake();
            }
        }
    }
}

/// One call read and not yet answered; dropping it counts the call answered.
#[derive(Debug)]
pub(crate) struct Unanswered {
    backlog: Arc<Backlog>,
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        self.backlog.answered();
    }
}

pin_project! {
    /// A call's answer, counted in the backlog until it is ready and dropped.
    pub(crate) struct Counted<F> {
        #[pin]
        inner: F,
        unanswered: Unanswered,
    }
}

impl<F> Counted<F> {
    pub(crate) fn new(inner: F, unanswered: Unanswered) -> Self {
        Self { inner, unanswered }
    }
}

impl<F: std::future::Future> std::future::Future for Counted<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.project().inner.poll(cx)
    }
}

/// A connection that reads only while its instance's backlog has room. Writes are never held:
/// they are how the backlog empties.
#[derive(Debug)]
pub(crate) struct Gated<IO> {
    io: IO,
    backlog: Arc<Backlog>,
}

impl<IO> Gated<IO> {
    pub(crate) fn new(io: IO, backlog: Arc<Backlog>) -> Self {
        Self { io, backlog }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Gated<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        std::task::ready!(self.backlog.poll_room(cx));
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Gated<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_full_backlog_stops_reads_until_answers_bring_it_down_to_three_quarters() {
        let backlog = Backlog::new(4);
        let (near, mut far) = tokio::io::duplex(64);
        let mut gated = Gated::new(near, backlog.clone());
        far.write_all(b"abcd").await.unwrap();
        let calls: Vec<_> = (0..4).map(|_| backlog.read()).collect();
        assert_eq!(backlog.unanswered(), 4);

        let woken = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(woken.clone());
        let mut cx = Context::from_waker(&waker);
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        assert!(
            Pin::new(&mut gated)
                .poll_read(&mut cx, &mut buf)
                .is_pending()
        );

        let mut calls = calls.into_iter();
        drop(calls.next());
        // 3 of 4: down to the resume mark (three quarters), so the reader is woken once.
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        drop(calls.next());
        assert_eq!(
            woken.0.load(Ordering::SeqCst),
            1,
            "woken once, not per answer"
        );

        let mut read = [0u8; 4];
        gated.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"abcd");
    }

    #[tokio::test]
    async fn writes_go_on_while_reads_wait() {
        let backlog = Backlog::new(1);
        let (near, mut far) = tokio::io::duplex(64);
        let mut gated = Gated::new(near, backlog.clone());
        let call = backlog.read();
        gated.write_all(b"answer").await.unwrap();
        let mut read = [0u8; 6];
        far.read_exact(&mut read).await.unwrap();
        assert_eq!(&read, b"answer");

        let mut byte = [0u8; 1];
        let pending = poll_fn(|cx| {
            let mut buf = ReadBuf::new(&mut byte);
            Poll::Ready(Pin::new(&mut gated).poll_read(cx, &mut buf).is_pending())
        })
        .await;
        assert!(pending);
        drop(call);
        far.write_all(b"x").await.unwrap();
        gated.read_exact(&mut byte).await.unwrap();
        assert_eq!(&byte, b"x");
    }

    #[test]
    fn each_connection_is_offered_what_the_pool_has_left_and_never_less_than_the_minimum() {
        let streams = Streams::new(600);
        let first = streams.share();
        let second = streams.share();
        let third = streams.share();
        let fourth = streams.share();
        let offered = [&first, &second, &third, &fourth].map(Share::streams);
        assert_eq!(
            offered,
            [
                MAX_CONCURRENT_STREAMS,
                MAX_CONCURRENT_STREAMS,
                88,
                MIN_STREAMS
            ]
        );
        assert_eq!(streams.offered(), 608);
        // A connection that closes gives its share back for the next one.
        drop(first);
        assert_eq!(streams.share().streams(), 600 - 256 - 88 - MIN_STREAMS);
        drop((second, third, fourth));
        assert_eq!(streams.offered(), 0);
    }

    #[test]
    fn a_share_is_outgrown_once_a_new_connection_would_get_twice_as_many_streams() {
        let streams = Streams::new(520);
        let (first, second) = (streams.share(), streams.share());
        let few = streams.share();
        assert_eq!(few.streams(), MIN_STREAMS);
        assert!(!few.outgrown(), "the pool is spent");
        assert!(!first.outgrown(), "a full share is never outgrown");
        drop(first);
        assert!(few.outgrown());
        assert!(!second.outgrown());
    }

    #[test]
    fn the_bound_is_twice_the_cap_and_never_below_the_minimum() {
        assert_eq!(bound_for(512), 1024);
        assert_eq!(bound_for(48), MIN_UNANSWERED);
        assert_eq!(bound_for(2000), 4000);
    }
}
