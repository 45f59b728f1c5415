//! An instance's HTTP/2 connections: hyper's server, each call handed to the instance's services
//! the moment its stream arrives.
//!
//! tonic's server hands a stream to the service stack only when the task hyper spawns for it
//! first runs. Under a flood that is the wrong order: while the instance's core is saturated,
//! every connection goes on reading, each stream read becomes a task holding its request, and the
//! door that would refuse it in a few microseconds has not seen it yet — the backlog is the
//! flood's own size. Here hyper calls the stack (access log, door, routes) inside the
//! connection's read loop, as it accepts each stream: a refused call's request is dropped at once
//! and what waits for its turn is its finished answer; only admitted calls hold their requests.
//!
//! What the instance has read and not yet answered is bounded across all its connections
//! ([`crate::backlog`]): while it is full, connections read nothing more. Strangers' connections
//! also share a pool of streams, four times that bound: each is offered what the pool has left
//! when it is accepted, so a flood's hundreds of connections cannot each hold a full table.
//!
//! Everything else is what tonic's server does for herd: HTTP/2 only, at most
//! [`MAX_CONCURRENT_STREAMS`] calls in flight per connection, the caller's `grpc-timeout` honoured
//! ([`crate::door`]), and on shutdown no new connections, `GOAWAY` on every open one, and the
//! calls in flight answered before each connection closes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures::future::Either;
use futures::{Stream, StreamExt};
use hyper::body::Incoming;
use hyper::server::conn::http2::Builder;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tonic::body::Body;
use tonic::transport::server::Connected;
use tower::util::Oneshot;
use tower::{Service, ServiceExt};

use crate::backlog::{Backlog, Counted, Gated, Share, Streams};
use crate::server::MAX_CONCURRENT_STREAMS;
use crate::woken::Woken;

/// Who is on the other side of a connection, as HTTP/2's rapid-reset defence sees it.
///
/// A caller may cancel streams the server has read but not yet taken up; h2 closes the whole
/// connection (`GOAWAY` `too_many_resets`) once more than a bound of those wait at once. That is
/// a defence against a stranger who opens and cancels streams only to make the server work. The
/// mesh's own callers run into it innocently: when an instance pauses (a CPU quota throttled, a
/// stop, a busy core) for longer than its callers' deadlines, each caller cancels a call at every
/// deadline and opens the next one in its place, and the instance reads all of them at once when
/// it runs again — hundreds, on one connection that carries every other call of that caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Caller {
    /// The mesh's own: its cancellations are never held against its connection.
    Mesh,
    /// Anyone else: its connection may have its share of the strangers' pool of streams open at
    /// once ([`crate::backlog::Streams`]), and at most [`MAX_CONCURRENT_STREAMS`] cancelled
    /// streams waiting.
    Stranger,
}

/// Serves `service` on every connection `incoming` yields until `shutdown` completes; then stops
/// accepting (the listener is dropped, so new connections are refused by the kernel), sends every
/// open connection `GOAWAY`, and returns once all of them have answered their calls and closed.
/// `caller` says who each connection's caller is ([`Caller`]); at most `unanswered` calls may be
/// read and not yet answered across all connections, and strangers' connections share a pool of
/// four times that many streams ([`crate::backlog`]).
pub(crate) async fn serve<I, IO, S>(
    incoming: I,
    service: S,
    caller: impl Fn(&IO::ConnectInfo) -> Caller,
    unanswered: usize,
    shutdown: impl Future<Output = ()>,
) where
    I: Stream<Item = Result<IO, std::io::Error>>,
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let (mesh, stranger) = (builder(Caller::Mesh), builder(Caller::Stranger));
    let (stop, stopped) = watch::channel(false);
    let backlog = Backlog::new(unanswered);
    // Strangers' connections together may have four times as many calls open as the backlog
    // holds: sixteen connections at the full limit by default.
    let streams = Streams::new(4 * unanswered);
    {
        let mut incoming = pin!(incoming);
        let mut shutdown = pin!(shutdown);
        loop {
            let io = tokio::select! {
                () = &mut shutdown => break,
                io = incoming.next() => io,
            };
            match io {
                Some(Ok(io)) => {
                    let info = io.connect_info();
                    let (builder, share) = match caller(&info) {
                        Caller::Mesh => (mesh.clone(), None),
                        Caller::Stranger => {
                            let share = streams.share();
                            tracing::debug!(
                                streams = share.streams(),
                                offered = streams.offered(),
                                "a stranger's connection accepted"
                            );
                            let mut builder = stranger.clone();
                            builder.max_concurrent_streams(share.streams());
                            (builder, Some(share))
                        }
                    };
                    let served = builder.serve_connection(
                        TokioIo::new(Gated::new(io, backlog.clone())),
                        OnArrival {
                            service: service.clone(),
                            info,
                            backlog: backlog.clone(),
                        },
                    );
                    let mut stopping = stopped.clone();
                    // Until it closes; from the moment `stop` turns true (or its sender is
                    // gone), it takes no new calls and closes once those in flight are answered.
                    // The stop signal is polled only when it has news (`Woken`), not on every
                    // frame the connection wakes its task for.
                    tokio::spawn(async move {
                        let mut served = pin!(served);
                        // Borrowed, not moved: the receiver is held until the connection has
                        // closed, which is what `serve` waits for before it returns.
                        // A stranger's connection offered few streams is also closed this way
                        // once it has outgrown them; its caller opens a new one.
                        let stop = Woken::new(async {
                            tokio::select! {
                                stopped = stopping.wait_for(|stop| *stop) => drop(stopped),
                                () = outgrown(share.as_ref()) => tracing::debug!(
                                    "a stranger's connection offered few streams asked to open again"
                                ),
                            }
                        });
                        let served = tokio::select! {
                            biased;
                            served = served.as_mut() => served,
                            () = stop => {
                                served.as_mut().graceful_shutdown();
                                served.await
                            }
                        };
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
                        drop(share);
                    });
                }
                // Why a connection could not be taken up is logged where it is known (TLS, the
                // accept loop's hygiene); the listener goes on.
                Some(Err(e)) => tracing::trace!(error = %e, "connection not accepted"),
                None => break,
            }
        }
    }
    stop.send_replace(true);
    drop(stopped);
    // Each connection holds a receiver until it has closed.
    stop.closed().await;
}

/// How often a stranger's connection offered fewer streams than the most checks whether it has
/// outgrown them ([`Share::outgrown`]).
#[cfg(not(test))]
const REOFFER_EVERY: Duration = Duration::from_secs(30);
#[cfg(test)]
const REOFFER_EVERY: Duration = Duration::from_millis(100);

/// Completes once `share` has been outgrown, checked every [`REOFFER_EVERY`]; never for a
/// connection offered the most, or for the mesh's own (no share).
async fn outgrown(share: Option<&Share>) {
    let Some(share) = share.filter(|share| share.streams() < MAX_CONCURRENT_STREAMS) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(REOFFER_EVERY).await;
        if share.outgrown() {
            return;
        }
    }
}

/// HTTP/2 as herd serves it to `caller`: hyper's defaults but for the streams a connection may
/// have in flight and the resets it may cause, and no `date` header (gRPC does not use it, and it
/// would change the answer's headers every second).
///
/// A stranger may have as many cancelled streams waiting to be taken up as a connection may
/// have streams at once (hyper's default of 20 cut a caller whose deadlines expired together),
/// even when its connection was offered fewer streams (a caller whose calls wait in its own queue
/// for a stream may find their deadlines spent soon after each is sent); the mesh's own callers
/// any number ([`Caller`]).
///
/// hyper closes a connection once 1 024 of its streams have been reset by the server's HTTP/2
/// layer over its whole life (streams refused past the stream limit among them) and never
/// forgets one; a mesh connection lives for days, so that would end up cutting a caller's
/// connection with every call on it. tonic's server, which herd used before, set no such bound;
/// neither does herd. A connection's streams at once stay bounded by `MAX_CONCURRENT_STREAMS`.
fn builder(caller: Caller) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(match caller {
            Caller::Mesh => usize::MAX,
            Caller::Stranger => MAX_CONCURRENT_STREAMS as usize,
        })
        .max_local_error_reset_streams(None)
        .auto_date_header(false);
    builder
}

/// hyper's service for one connection: the instance's stack, called as each stream arrives, with
/// the connection's [`Connected::ConnectInfo`] in every request's extensions (the caller's
/// identity over TLS, its address otherwise). Each call counts in the instance's backlog until
/// its answer is ready.
#[derive(Clone)]
struct OnArrival<S, C> {
    service: S,
    info: C,
    backlog: Arc<Backlog>,
}

impl<S, C> hyper::service::Service<http::Request<Incoming>> for OnArrival<S, C>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone,
    C: Clone + Send + Sync + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Counted<Either<S::Future, Oneshot<S, http::Request<Body>>>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let unanswered = self.backlog.read();
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(self.info.clone());
        let mut service = self.service.clone();
        // herd's stack (access log, door, tonic's routes) is always ready, so the call is made
        // here, in the connection's read loop. A layer that is not ready would be waited for in
        // the call's own task, as tonic's server does for every call.
        let answer = match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(service.call(request)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Either::Right(service.oneshot(request)),
        };
        Counted::new(answer, unanswered)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tonic::transport::server::TcpIncoming;

    use super::*;
    use crate::backlog::MIN_STREAMS;

    /// An HTTP/2 frame's header: its payload's length, type, flags and stream.
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let length = u32::try_from(payload.len()).unwrap_or(0).to_be_bytes();
        let mut out = vec![length[1], length[2], length[3], kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;
    const ENHANCE_YOUR_CALM: u32 = 0xb;

    /// `resets` calls opened and cancelled by a caller of kind `caller`, all read by the server
    /// at once (written before it serves the connection, as a paused instance finds them when it
    /// runs again); then a ping. What the server answers: `Ok` with the ping's answer, or `Err`
    /// with the `GOAWAY` error code.
    async fn cancelled_at_once(caller: Caller, resets: u32) -> Result<(), u32> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(SETTINGS, 0, 0, &[]));
        for n in 0..resets {
            let stream = 2 * n + 1;
            // :method POST, :scheme http, :path / (HPACK's static table), END_HEADERS.
            out.extend(frame(HEADERS, 0x4, stream, &[0x83, 0x86, 0x84]));
            out.extend(frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
        }
        out.extend(frame(PING, 0, 0, b"herdping"));
        client.write_all(&out).await.unwrap();

        serve_empty(listener, caller, crate::backlog::MIN_UNANSWERED);
        let mut read = Vec::new();
        let answer = async {
            loop {
                while read.len() >= 9 {
                    let length = u32::from_be_bytes([0, read[0], read[1], read[2]]) as usize;
                    if read.len() < 9 + length {
                        break;
                    }
                    let (kind, flags) = (read[3], read[4]);
                    let payload: Vec<u8> = read.drain(..9 + length).skip(9).collect();
                    match kind {
                        GOAWAY => {
                            return Err(u32::from_be_bytes([
                                payload[4], payload[5], payload[6], payload[7],
                            ]));
                        }
                        PING if flags & 0x1 == 0x1 => return Ok(()),
                        _ => {}
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = client.read(&mut chunk).await.unwrap();
                assert!(n > 0, "the connection closed without GOAWAY");
                read.extend_from_slice(&chunk[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("an answer to the ping or a GOAWAY")
    }

    #[tokio::test]
    async fn a_stranger_cancelling_more_calls_than_it_may_have_at_once_loses_its_connection() {
        let at_once = MAX_CONCURRENT_STREAMS;
        assert_eq!(cancelled_at_once(Caller::Stranger, at_once).await, Ok(()));
        assert_eq!(
            cancelled_at_once(Caller::Stranger, 4 * at_once).await,
            Err(ENHANCE_YOUR_CALM)
        );
    }

    #[tokio::test]
    async fn on_shutdown_serving_ends_only_once_the_calls_in_flight_are_answered() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (arrived, mut reached) = tokio::sync::mpsc::channel(1);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let over = Arc::new(AtomicBool::new(false));
        let over_seen = over.clone();
        // Each call takes 300 ms of work, then says whether serving had already ended.
        let service = tower::service_fn(move |_: http::Request<Body>| {
            let (arrived, over) = (arrived.clone(), over_seen.clone());
            async move {
                let _ = arrived.send(()).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
                let ended = over.load(Ordering::SeqCst);
                Ok::<_, Infallible>(http::Response::new(Body::new(ended.to_string())))
            }
        });
        let serving = tokio::spawn(async move {
            serve(
                TcpIncoming::from(listener),
                service,
                |_: &_| Caller::Mesh,
                crate::backlog::MIN_UNANSWERED,
                async {
                    let _ = stopped.await;
                },
            )
            .await;
            over.store(true, Ordering::SeqCst);
        });
        let tcp = TcpStream::connect(address).await.unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let request = http::Request::post("http://herd/t.S/M").body(()).unwrap();
        let (response, _) = client.send_request(request, true).unwrap();
        reached.recv().await.expect("the call reached the service");
        stop.send(()).unwrap();
        let mut body = response.await.unwrap().into_body();
        let mut answer = Vec::new();
        while let Some(chunk) = body.data().await {
            answer.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(answer, b"false", "serving ended while a call was in flight");
        tokio::time::timeout(Duration::from_secs(10), serving)
            .await
            .expect("serving ended once the call was answered")
            .unwrap();
    }

    /// Opens `calls` calls to `path` on a new connection to `address`; their answers, which
    /// come only once the service lets them.
    async fn open_calls(
        address: std::net::SocketAddr,
        path: &str,
        calls: usize,
    ) -> Vec<h2::client::ResponseFuture> {
        let tcp = TcpStream::connect(address).await.unwrap();
        let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let mut answers = Vec::new();
        for _ in 0..calls {
            client = client.ready().await.unwrap();
            let request = http::Request::post(format!("http://herd{path}"))
                .body(())
                .unwrap();
            answers.push(client.send_request(request, true).unwrap().0);
        }
        answers
    }

    #[tokio::test]
    async fn connections_stop_reading_while_the_instance_holds_its_bound_of_unanswered_calls() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (arrived, mut arrivals) = tokio::sync::mpsc::unbounded_channel::<String>();
        let release = Arc::new(tokio::sync::Semaphore::new(0));
        let held = release.clone();
        // Every call is held until released.
        let service = tower::service_fn(move |request: http::Request<Body>| {
            let (arrived, held) = (arrived.clone(), held.clone());
            async move {
                let _ = arrived.send(request.uri().path().to_string());
                let _answer = held.acquire().await;
                Ok::<_, Infallible>(http::Response::new(Body::empty()))
            }
        });
        let bound = 8;
        tokio::spawn(serve(
            TcpIncoming::from(listener),
            service,
            |_: &_| Caller::Stranger,
            bound,
            std::future::pending(),
        ));
        let deadline = Duration::from_secs(10);
        let first = open_calls(address, "/first", bound).await;
        for _ in 0..bound {
            let path = tokio::time::timeout(deadline, arrivals.recv()).await;
            assert_eq!(path.unwrap().as_deref(), Some("/first"));
        }
        // The bound is held: a second connection's calls stay unread in its socket.
        let second = open_calls(address, "/second", 4).await;
        let early = tokio::time::timeout(Duration::from_millis(300), arrivals.recv()).await;
        assert!(early.is_err(), "read while the bound was held: {early:?}");

        release.add_permits(usize::MAX >> 4);
        for _ in 0..4 {
            let path = tokio::time::timeout(deadline, arrivals.recv()).await;
            assert_eq!(path.unwrap().as_deref(), Some("/second"));
        }
        for answer in first.into_iter().chain(second) {
            let answer = tokio::time::timeout(deadline, answer).await.unwrap();
            assert_eq!(answer.unwrap().status(), http::StatusCode::OK);
        }
    }

    /// What the server tells a new connection to `address` it may have open at once, and the
    /// task that keeps the connection open until it is aborted. The server's SETTINGS come first,
    /// so once a PING is answered they have been read.
    async fn offered(address: std::net::SocketAddr) -> (usize, tokio::task::JoinHandle<()>) {
        let tcp = TcpStream::connect(address).await.unwrap();
        let (send, mut connection) = h2::client::handshake(tcp).await.unwrap();
        let mut ping = connection.ping_pong().unwrap();
        let driving = tokio::spawn(async move {
            let _ = connection.await;
        });
        let pong = tokio::time::timeout(Duration::from_secs(10), ping.ping(h2::Ping::opaque()));
        pong.await.unwrap().unwrap();
        let streams = send.current_max_send_streams();
        // h2's client closes the connection once nothing can send on it any more.
        let open = tokio::spawn(async move {
            let _send = send;
            let _ = driving.await;
        });
        (streams, open)
    }

    /// Serves empty answers on `listener` to callers of kind `caller`, with a backlog of
    /// `bound` (and a pool of four times as many strangers' streams), until the test ends.
    fn serve_empty(listener: TcpListener, caller: Caller, bound: usize) {
        let service = tower::service_fn(|_: http::Request<Body>| async {
            Ok::<_, Infallible>(http::Response::new(Body::empty()))
        });
        tokio::spawn(serve(
            TcpIncoming::from(listener),
            service,
            move |_: &_| caller,
            bound,
            std::future::pending(),
        ));
    }

    /// [`serve_empty`] on a new listener; its address.
    async fn serving(caller: Caller, bound: usize) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        serve_empty(listener, caller, bound);
        address
    }

    #[tokio::test]
    async fn strangers_connections_share_a_pool_of_streams_and_give_theirs_back_on_closing() {
        // A pool of 600 streams: four times the backlog's bound.
        let address = serving(Caller::Stranger, 150).await;
        let (first, open) = offered(address).await;
        let (second, _second) = offered(address).await;
        let (third, _third) = offered(address).await;
        let (fourth, _fourth) = offered(address).await;
        let full = MAX_CONCURRENT_STREAMS as usize;
        assert_eq!(
            [first, second, third, fourth],
            [full, full, 88, MIN_STREAMS as usize]
        );
        open.abort();
        // Once the server has seen the first close, a new connection is offered what the
        // others left.
        let back = async {
            loop {
                let (now, probe) = offered(address).await;
                probe.abort();
                if now == 600 - full - 88 - MIN_STREAMS as usize {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), back)
            .await
            .expect("the first connection's streams back in the pool");
    }

    #[tokio::test]
    async fn a_connection_offered_few_streams_is_closed_once_a_new_one_would_get_more() {
        // A pool of 512: two connections at the full limit spend it.
        let address = serving(Caller::Stranger, 128).await;
        let full = MAX_CONCURRENT_STREAMS as usize;
        let (_, first) = offered(address).await;
        let (_, _second) = offered(address).await;
        let (few, third) = offered(address).await;
        assert_eq!(few, MIN_STREAMS as usize);
        // While the pool is spent, the third is left open (observed over a few checks).
        tokio::time::sleep(4 * REOFFER_EVERY).await;
        assert!(!third.is_finished(), "closed while the pool was spent");
        first.abort();
        tokio::time::timeout(Duration::from_secs(10), third)
            .await
            .expect("closed by the server once the first had gone")
            .unwrap();
        // Its caller's new connection is offered what the second left (less the third's 8 if
        // the server has not yet let go of it).
        let (again, _fourth) = offered(address).await;
        assert!(again >= full - MIN_STREAMS as usize, "offered {again}");
    }

    #[tokio::test]
    async fn the_mesh_connections_are_not_counted_in_the_strangers_pool() {
        let address = serving(Caller::Mesh, 8).await;
        let mut open = Vec::new();
        for _ in 0..3 {
            let (streams, connection) = offered(address).await;
            assert_eq!(streams, MAX_CONCURRENT_STREAMS as usize);
            open.push(connection);
        }
    }

    #[tokio::test]
    async fn the_mesh_cancelling_any_number_of_calls_at_once_keeps_its_connection() {
        let many = 16 * MAX_CONCURRENT_STREAMS;
        assert_eq!(cancelled_at_once(Caller::Mesh, many).await, Ok(()));
    }
}
