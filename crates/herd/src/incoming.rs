//! Connections as an instance accepts them: at most so many at once (one over the bound is closed
//! as soon as it is accepted), and each closed when its peer says nothing — no first bytes (the
//! HTTP/2 preface) within the handshake timeout, or no bytes at all for the idle timeout. herd's
//! own callers ping an idle connection every half second, so only connections nobody uses go.
//!
//! Writes are consolidated: a connection with something to write first lets every task that is
//! ready run (see [`Guarded`]), so that the answers of many calls — above all the quick refusals
//! of an instance under more load than it can serve — leave in one system call, not one each.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::woken::Woken;

/// What an instance tolerates of the connections it accepts.
#[derive(Debug, Clone, Copy)]
pub struct Hygiene {
    /// The most connections open at once.
    pub max_connections: usize,
    /// How long a new connection may take to send its first bytes.
    pub handshake_timeout: Duration,
    /// How long a connection may send nothing before it is closed.
    pub idle_timeout: Duration,
}

impl Default for Hygiene {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(120),
        }
    }
}

/// The connections of `incoming`, each [`Guarded`] by `hygiene`.
pub fn guarded(
    incoming: TcpIncoming,
    hygiene: Hygiene,
) -> impl Stream<Item = Result<Guarded, io::Error>> {
    let permits = Arc::new(Semaphore::new(hygiene.max_connections));
    let refused = Arc::new(AtomicU64::new(0));
    futures::stream::unfold(incoming, |mut incoming| async move {
        let next = incoming.next().await?;
        Some((next, incoming))
    })
    .filter_map(move |accepted| {
        let permits = permits.clone();
        let refused = refused.clone();
        async move {
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => return Some(Err(e)),
            };
            let Ok(permit) = permits.try_acquire_owned() else {
                // Over the bound: closed at once (dropped), counted, logged now and then.
                let n = refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(
                        refused = n,
                        max = hygiene.max_connections,
                        "connection refused: too many open"
                    );
                }
                return None;
            };
            Some(Ok(Guarded::new(stream, permit, hygiene)))
        }
    })
}

/// One accepted connection: its stream, its place among the instance's connections (given back
/// when it closes), and the deadline by which its peer must next say something.
pub struct Guarded {
    stream: TcpStream,
    _permit: OwnedSemaphorePermit,
    /// Fires when the peer has been silent too long; re-armed lazily from `last_read`.
    /// Polled only when it has fired or been moved, not on every wake of the connection.
    deadline: Woken<Sleep>,
    last_read: Option<Instant>,
    idle: Duration,
    /// The turn a write waits for before it is made, until the next flush (`None` when a layer
    /// above, TLS, takes it: see [`WriteTurn`]).
    turn: Option<WriteTurn>,
}

/// Consolidated writes: the first write after a flush waits until every other ready task has
/// run, so that each answer a call's task finishes in the meantime is written with the others.
/// (tokio wakes a task that yields only after the tasks that are ready and the I/O driver have
/// run.) An idle runtime gives the turn back at once.
///
/// It must be taken by the layer that HTTP/2 writes to: TLS accepts a write into its own buffer
/// even when the socket is not ready, so a turn taken beneath TLS would be given at the second
/// write of the same task, without waiting for anyone.
pub(crate) struct WriteTurn(Turn);

impl WriteTurn {
    pub(crate) fn new() -> Self {
        Self(Turn::Due)
    }

    /// Ready once the turn is taken; writes then go straight through until [`Self::flushed`].
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.0 {
                Turn::Taken => return Poll::Ready(()),
                Turn::Due => self.0 = Turn::Waiting(Box::pin(tokio::task::yield_now())),
                Turn::Waiting(turn) => {
                    ready!(turn.as_mut().poll(cx));
                    self.0 = Turn::Taken;
                }
            }
        }
    }

    /// After a flush, the next write waits for its turn again.
    pub(crate) fn flushed(&mut self) {
        self.0 = Turn::Due;
    }
}

/// Where a connection is in consolidating its writes.
enum Turn {
    /// The next write waits for other ready tasks first.
    Due,
    /// Waiting for them.
    Waiting(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// Waited: writes go straight through until the next flush.
    Taken,
}

impl Guarded {
    fn new(stream: TcpStream, permit: OwnedSemaphorePermit, hygiene: Hygiene) -> Self {
        Self {
            stream,
            _permit: permit,
            deadline: Woken::new(tokio::time::sleep(hygiene.handshake_timeout)),
            last_read: None,
            idle: hygiene.idle_timeout,
            turn: Some(WriteTurn::new()),
        }
    }

    /// The connection as TLS's transport: the layer above TLS consolidates writes instead.
    pub(crate) fn beneath_tls(mut self) -> Self {
        self.turn = None;
        self
    }

    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.turn {
            Some(turn) => turn.poll(cx),
            None => Poll::Ready(()),
        }
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.last_read = Some(Instant::now());
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        // Nothing to read: is the peer silent for too long? The timer is only moved when it
        // fires, not on every read.
        loop {
            ready!(Pin::new(&mut self.deadline).poll(cx));
            match self.last_read {
                Some(last) if last + self.idle > Instant::now() => {
                    let next = last + self.idle;
                    self.deadline.future().reset(next);
                }
                Some(_) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer was silent for the idle timeout",
                    )));
                }
                None => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer sent nothing within the handshake timeout",
                    )));
                }
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_turn(cx));
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_turn(cx));
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(Pin::new(&mut self.stream).poll_flush(cx))?;
        if let Some(turn) = &mut self.turn {
            turn.flushed();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn accepted(hygiene: Hygiene) -> (String, tokio::sync::mpsc::UnboundedReceiver<Guarded>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut connections = std::pin::pin!(guarded(TcpIncoming::from(listener), hygiene));
            while let Some(Ok(connection)) = connections.next().await {
                let _ = tx.send(connection);
            }
        });
        (address, rx)
    }

    fn hygiene(max: usize) -> Hygiene {
        Hygiene {
            max_connections: max,
            handshake_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_millis(400),
        }
    }

    #[tokio::test]
    async fn a_silent_peer_is_closed_after_the_handshake_or_idle_timeout() {
        let (address, mut accepted) = accepted(hygiene(4)).await;
        let _silent = TcpStream::connect(&address).await.unwrap();
        let mut server = accepted.recv().await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = [0u8; 16];
        let err = server.read(&mut buf).await.expect_err("timed out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(
            started.elapsed() >= Duration::from_millis(150),
            "{:?}",
            started.elapsed()
        );

        let mut talker = TcpStream::connect(&address).await.unwrap();
        let mut server = accepted.recv().await.unwrap();
        // Bytes every 100 ms keep it open well past the idle timeout...
        for _ in 0..8 {
            talker.write_all(b"x").await.unwrap();
            assert_eq!(server.read(&mut buf).await.unwrap(), 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // ...then silence closes it.
        let err = server.read(&mut buf).await.expect_err("idle");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_write_lets_the_tasks_that_are_ready_run_first_then_goes_at_once() {
        let (address, mut accepted) = accepted(hygiene(4)).await;
        let mut client = TcpStream::connect(&address).await.unwrap();
        let mut server = accepted.recv().await.unwrap();
        // A task made ready just before the write (as a call's task is when its answer is
        // being written): it runs before the bytes leave.
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ran.clone();
        let other = tokio::spawn(async move { flag.store(true, Ordering::SeqCst) });
        server.write_all(b"answer").await.unwrap();
        assert!(ran.load(Ordering::SeqCst), "the ready task ran first");
        other.await.unwrap();
        server.flush().await.unwrap();
        let mut buf = [0u8; 6];
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"answer");
        // With nothing else ready, the next write is not held back.
        let started = std::time::Instant::now();
        server.write_all(b"second").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"second");
        assert!(started.elapsed() < Duration::from_millis(100));
    }

    #[tokio::test]
    async fn connections_over_the_bound_are_closed_at_once_and_their_place_comes_back() {
        let (address, mut accepted) = accepted(hygiene(2)).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let client = TcpStream::connect(&address).await.unwrap();
            held.push((client, accepted.recv().await.unwrap()));
        }
        let mut third = TcpStream::connect(&address).await.unwrap();
        let mut buf = [0u8; 1];
        // Closed by the server: end of stream (or a reset).
        let closed = tokio::time::timeout(Duration::from_secs(2), third.read(&mut buf))
            .await
            .expect("closed at once");
        assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
        held.pop();
        // A place is free again.
        let _fourth = TcpStream::connect(&address).await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), accepted.recv())
            .await
            .expect("accepted")
            .expect("a connection");
    }
}
