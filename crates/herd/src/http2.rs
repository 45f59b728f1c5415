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
//! Everything else is what tonic's server does for herd: HTTP/2 only, at most
//! [`MAX_CONCURRENT_STREAMS`] calls in flight per connection, the caller's `grpc-timeout` honoured
//! ([`crate::door`]), and on shutdown no new connections, `GOAWAY` on every open one, and the
//! calls in flight answered before each connection closes.

use std::convert::Infallible;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

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

use crate::server::MAX_CONCURRENT_STREAMS;

/// Serves `service` on every connection `incoming` yields until `shutdown` completes; then stops
/// accepting (the listener is dropped, so new connections are refused by the kernel), sends every
/// open connection `GOAWAY`, and returns once all of them have answered their calls and closed.
pub(crate) async fn serve<I, IO, S>(incoming: I, service: S, shutdown: impl Future<Output = ()>)
where
    I: Stream<Item = Result<IO, std::io::Error>>,
    IO: Connected + AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let builder = builder();
    let (stop, stopped) = watch::channel(false);
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
                    let served = builder.serve_connection(
                        TokioIo::new(io),
                        OnArrival {
                            service: service.clone(),
                            info,
                        },
                    );
                    let mut stopping = stopped.clone();
                    // Until it closes; from the moment `stop` turns true (or its sender is
                    // gone), it takes no new calls and closes once those in flight are answered.
                    tokio::spawn(async move {
                        let mut served = pin!(served);
                        let served = tokio::select! {
                            served = served.as_mut() => served,
                            () = async { drop(stopping.wait_for(|stop| *stop).await) } => {
                                served.as_mut().graceful_shutdown();
                                served.await
                            }
                        };
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "connection ended with an error");
                        }
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

/// HTTP/2 as herd serves it: hyper's defaults but for the streams a connection may have in
/// flight and the resets it may cause, and no `date` header (gRPC does not use it, and it would
/// change the answer's headers every second).
///
/// hyper closes a connection once 1 024 of its streams have been reset by the server's HTTP/2
/// layer over its whole life (streams refused past the stream limit among them) and never
/// forgets one; a mesh connection lives for days, so that would end up cutting a caller's
/// connection with every call on it. tonic's server, which herd used before, set no such bound;
/// neither does herd. A connection's streams at once stay bounded by `MAX_CONCURRENT_STREAMS`.
fn builder() -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(MAX_CONCURRENT_STREAMS as usize)
        .max_local_error_reset_streams(None)
        .auto_date_header(false);
    builder
}

/// hyper's service for one connection: the instance's stack, called as each stream arrives, with
/// the connection's [`Connected::ConnectInfo`] in every request's extensions (the caller's
/// identity over TLS, its address otherwise).
#[derive(Clone)]
struct OnArrival<S, C> {
    service: S,
    info: C,
}

impl<S, C> hyper::service::Service<http::Request<Incoming>> for OnArrival<S, C>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone,
    C: Clone + Send + Sync + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Either<S::Future, Oneshot<S, http::Request<Body>>>;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let mut request = request.map(Body::new);
        request.extensions_mut().insert(self.info.clone());
        let mut service = self.service.clone();
        // herd's stack (access log, door, tonic's routes) is always ready, so the call is made
        // here, in the connection's read loop. A layer that is not ready would be waited for in
        // the call's own task, as tonic's server does for every call.
        match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(service.call(request)),
            Poll::Ready(Err(never)) => match never {},
            Poll::Pending => Either::Right(service.oneshot(request)),
        }
    }
}
