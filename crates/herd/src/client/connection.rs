//! One HTTP/2 connection to one endpoint, written on `h2` directly over whatever byte stream a
//! [`Connector`] opens.
//!
//! A call goes from the caller's task straight into the connection's stream table: no queue and
//! no hand-off to another task (the connection's own task only moves frames). Keepalive pings run
//! beside the connection whenever it has answered nothing for a while: a peer that leaves one
//! unanswered for a second loses the connection, and every call still on it fails at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::uri::{Authority, Scheme};
use http_body::Frame;
use tonic::body::Body;
use tower::{BoxError, Service};

use super::connector::Connector;
use crate::woken::Woken;

/// A connection that has answered nothing for this long is pinged...
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// ...and closed when a ping is not answered within this: a peer that falls silent is noticed
/// within 1.5 s of its last answer, and its endpoint leaves the balancer with the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 settings as hyper's client sets them: receive windows (per stream, per connection),
/// the largest header block accepted, the most bytes buffered for sending per stream, and the
/// streams opened before the peer has said how many it takes.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// A request on its way to an endpoint: the head (path and metadata; the connection adds scheme
/// and authority) and its body.
pub(crate) struct Request {
    pub(crate) head: http::request::Parts,
    pub(crate) body: RequestBody,
}

/// What follows the head of a [`Request`].
pub(crate) enum RequestBody {
    /// One whole gRPC frame, sent with the end of the stream: herd's unary calls.
    Frame(Bytes),
    /// Any HTTP body (generated clients, client streams), forwarded frame by frame.
    Stream(Body),
}

impl From<http::Request<Body>> for Request {
    fn from(request: http::Request<Body>) -> Self {
        let (head, body) = request.into_parts();
        Self {
            head,
            body: RequestBody::Stream(body),
        }
    }
}

/// A response's head, with its body still arriving.
pub(crate) type Response = http::Response<RecvStream>;

/// One HTTP/2 connection to one endpoint; clones share it.
#[derive(Clone)]
pub(crate) struct Connection {
    send: SendRequest<Bytes>,
    authority: Authority,
    scheme: Scheme,
    /// Distinguishes this connection from an earlier one to the same endpoint.
    pub(crate) generation: u64,
    /// When the peer last answered: while answers keep coming, it needs no ping.
    heard: Arc<Heard>,
    /// Which of [`NAMED_ONCE`] have been sent indexed on this connection (one bit each).
    named: Arc<AtomicU8>,
}

/// Headers whose values herd sends never indexed — they differ on almost every call — but whose
/// names repeat on every call. Sent so, a name travels as a literal string that the peer decodes
/// and allocates again each time; so each one's first value on a connection is sent indexed,
/// which puts its name in the peer's table, and every later value refers to the name by index.
/// (The one value kept in the table displaces nothing: the headers that repeat are few.)
const NAMED_ONCE: [http::HeaderName; NAMED_COUNT] =
    [crate::context::GRPC_TIMEOUT, crate::telemetry::TRACEPARENT];

const NAMED_COUNT: usize = 2;
/// Every bit of [`Connection::named`] set.
const ALL_NAMED: u8 = (1 << NAMED_COUNT) - 1;

/// When a connection's peer last sent a response head.
pub(crate) struct Heard {
    opened: tokio::time::Instant,
    /// Milliseconds after `opened`.
    last: AtomicU64,
}

impl Heard {
    fn new() -> Self {
        Self {
            opened: tokio::time::Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    /// Takes note of an answer now.
    fn answer(&self) {
        let since = self.opened.elapsed().as_millis();
        self.last
            .fetch_max(u64::try_from(since).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// When the peer last answered (the handshake, if it never did).
    fn last(&self) -> tokio::time::Instant {
        self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }
}

impl Connection {
    /// Connects to `authority` (`host:port`) over a stream from `connector`, and speaks HTTP/2 on
    /// it. The connection runs on its own task until it breaks (an unanswered ping included) or
    /// every clone is dropped.
    pub(crate) async fn open(
        connector: &dyn Connector,
        authority: Authority,
    ) -> Result<Self, BoxError> {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let io = connector.connect(&authority).await?;
        let (send, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .handshake(io)
            .await?;
        let pings = connection.ping_pong();
        let heard = Arc::new(Heard::new());
        let watched = heard.clone();
        let peer = authority.to_string();
        tokio::spawn(async move {
            let outcome: Result<(), BoxError> = match pings {
                // The keepalive is polled only when its timer or ping has news (`Woken`), not
                // on every frame the connection wakes its task for.
                Some(pings) => tokio::select! {
                    biased;
                    closed = &mut connection => closed.map_err(Into::into),
                    silent = Woken::new(keepalive(pings, watched)) => Err(silent),
                },
                None => connection.await.map_err(Into::into),
            };
            // Returning drops the connection, which fails every call still on it.
            if let Err(e) = outcome {
                tracing::debug!(address = %peer, error = %e, "connection closed");
            }
        });
        Ok(Self {
            send,
            authority,
            scheme: connector.scheme(),
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            heard,
            named: Arc::new(AtomicU8::new(0)),
        })
    }

    /// Lets the first value of each of [`NAMED_ONCE`] that `headers` carry on this connection be
    /// indexed.
    fn name_once(&self, headers: &mut http::HeaderMap) {
        if self.named.load(Ordering::Relaxed) == ALL_NAMED {
            return;
        }
        for (bit, name) in NAMED_ONCE.iter().enumerate() {
            let bit = 1 << bit;
            if let Some(value) = headers.get_mut(name)
                && self.named.fetch_or(bit, Ordering::Relaxed) & bit == 0
            {
                value.set_sensitive(false);
            }
        }
    }

    /// Opens a stream for `request` and sends what of its body is at hand.
    fn start(&mut self, request: Request) -> Result<h2::client::ResponseFuture, BoxError> {
        let Request { mut head, body } = request;
        self.name_once(&mut head.headers);
        if let Some(span) = head.extensions.get::<crate::telemetry::PeerSpan>() {
            span.record(&self.authority);
        }
        // Callers give the path only; HTTP/2 needs the scheme and authority too.
        let mut uri = http::uri::Parts::from(std::mem::take(&mut head.uri));
        uri.scheme = Some(self.scheme.clone());
        uri.authority = Some(self.authority.clone());
        head.uri = http::Uri::from_parts(uri)?;
        let empty = matches!(&body, RequestBody::Stream(b) if http_body::Body::is_end_stream(b));
        let (response, mut stream) = self
            .send
            .send_request(http::Request::from_parts(head, ()), empty)?;
        match body {
            RequestBody::Frame(frame) => stream.send_data(frame, true)?,
            RequestBody::Stream(_) if empty => {}
            RequestBody::Stream(body) => {
                tokio::spawn(forward(body, stream));
            }
        }
        Ok(response)
    }
}

/// Pings the peer once a [`KEEPALIVE_INTERVAL`] has passed since its last answer (a busy peer
/// that keeps answering is never pinged); returns why once a ping goes unanswered, at most
/// [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] after the last answer.
async fn keepalive(mut pings: h2::PingPong, heard: Arc<Heard>) -> BoxError {
    let mut pong = heard.opened;
    loop {
        let due = heard.last().max(pong) + KEEPALIVE_INTERVAL;
        if tokio::time::Instant::now() < due {
            tokio::time::sleep_until(due).await;
            continue;
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => pong = tokio::time::Instant::now(),
            Ok(Err(e)) => return e.into(),
            Err(_) => {
                return format!("no answer to a keepalive ping within {KEEPALIVE_TIMEOUT:?}")
                    .into();
            }
        }
    }
}

/// Forwards a streamed request body to its HTTP/2 stream, to its end. (herd's own calls never
/// stream.)
async fn forward(mut body: Body, mut stream: SendStream<Bytes>) {
    let sent = async {
        loop {
            let frame =
                std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx));
            match frame.await {
                None => return stream.send_data(Bytes::new(), true),
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let end = http_body::Body::is_end_stream(&body);
                        send_within_window(&mut stream, data, end).await?;
                        if end {
                            return Ok(());
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            return stream.send_trailers(trailers);
                        }
                    }
                },
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "request body failed; stream reset");
                    stream.send_reset(Reason::CANCEL);
                    return Ok(());
                }
            }
        }
    };
    if let Err(e) = sent.await {
        tracing::debug!(error = %e, "request body not sent");
    }
}

/// Sends `data` as the peer's flow-control window admits it, so that a body produced faster than
/// the peer reads waits here instead of piling up in h2's buffers.
async fn send_within_window(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return if end {
            stream.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match std::future::poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            // The stream is closed: the peer reset it or the connection is gone.
            None => return Err(Reason::CANCEL.into()),
        };
        let chunk = data.split_to(granted.min(data.len()));
        if !chunk.is_empty() {
            stream.send_data(chunk, end && data.is_empty())?;
        }
    }
    Ok(())
}

impl Service<Request> for Connection {
    type Response = Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Request) -> ResponseFuture {
        match self.start(request) {
            Ok(response) => ResponseFuture::Waiting(response, self.heard.clone()),
            Err(e) => ResponseFuture::Failed(Some(e)),
        }
    }
}

/// Generated tonic clients over one connection (the health probe, tests).
impl Service<http::Request<Body>> for Connection {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let response = Service::<Request>::call(self, request.into());
        Box::pin(async move { Ok(streamed(response.await?)) })
    }
}

/// The response to one request, once its head has arrived.
pub(crate) enum ResponseFuture {
    Failed(Option<BoxError>),
    /// The response's head, and when the connection's peer last answered.
    Waiting(h2::client::ResponseFuture, Arc<Heard>),
}

impl Future for ResponseFuture {
    type Output = Result<Response, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            ResponseFuture::Failed(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| "request polled after it failed".into()))),
            ResponseFuture::Waiting(response, heard) => {
                let response = ready!(Pin::new(response).poll(cx))?;
                heard.answer();
                Poll::Ready(Ok(response))
            }
        }
    }
}

/// A response as generated tonic clients read it: an HTTP body of data frames, then trailers.
pub(crate) fn streamed(response: Response) -> http::Response<Body> {
    response.map(|stream| {
        Body::new(ResponseBody {
            stream,
            data_done: false,
        })
    })
}

struct ResponseBody {
    stream: RecvStream,
    data_done: bool,
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        if !this.data_done {
            match ready!(this.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Errors only when the stream is already gone; the next poll says so.
                    let _ = this.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        Poll::Ready(
            ready!(this.stream.poll_trailers(cx))
                .transpose()
                .map(|t| t.map(Frame::trailers)),
        )
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::health_server;
    use crate::client::connector::TcpConnector;
    use crate::client::unary::{DEFAULT_MAX_RESPONSE, frame, read_unary, unary_head};
    use tonic::metadata::MetadataMap;
    use tonic::{Code, Status};
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    async fn open(address: &str) -> Connection {
        Connection::open(&TcpConnector::default(), address.parse().unwrap())
            .await
            .unwrap()
    }

    /// The header blocks of the first `count` requests a peer receives on one connection: a
    /// plain TCP peer that only reads (HTTP/2 lets a client send before the server's settings).
    async fn header_blocks(
        count: usize,
        send: impl FnOnce(&mut Connection) -> Vec<h2::client::ResponseFuture>,
    ) -> Vec<Vec<u8>> {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let peer = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut preface = [0; 24];
            socket.read_exact(&mut preface).await.unwrap();
            let mut blocks = Vec::new();
            while blocks.len() < count {
                let mut head = [0; 9];
                socket.read_exact(&mut head).await.unwrap();
                let length = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                let mut payload = vec![0; length];
                socket.read_exact(&mut payload).await.unwrap();
                // HEADERS, with END_HEADERS: no padding or priority from h2's client.
                if head[3] == 0x1 {
                    assert_eq!(head[4] & 0x28, 0, "no padding or priority");
                    blocks.push(payload);
                }
            }
            blocks
        });
        let mut connection = open(&address).await;
        // Kept until the peer has read them: a dropped call is cancelled.
        let _calls = send(&mut connection);
        tokio::time::timeout(Duration::from_secs(10), peer)
            .await
            .expect("the peer read every request")
            .unwrap()
    }

    /// Each header's representation in an HPACK block (RFC 7541 §6): its first byte's pattern
    /// and the index of its name (0 for a literal name; the entry's for an indexed header).
    fn representations(mut block: &[u8]) -> Vec<(&'static str, usize)> {
        fn integer(block: &mut &[u8], prefix: u8) -> usize {
            let max = (1usize << prefix) - 1;
            let mut value = usize::from(block[0]) & max;
            *block = &block[1..];
            if value == max {
                let mut shift = 0;
                loop {
                    let byte = block[0];
                    *block = &block[1..];
                    value += usize::from(byte & 0x7f) << shift;
                    shift += 7;
                    if byte & 0x80 == 0 {
                        break;
                    }
                }
            }
            value
        }
        fn string(block: &mut &[u8]) {
            let length = integer(block, 7);
            *block = &block[length..];
        }
        let mut out = Vec::new();
        while !block.is_empty() {
            let (kind, prefix) = match block[0] {
                b if b & 0x80 != 0 => ("indexed", 7),
                b if b & 0xc0 == 0x40 => ("incremental", 6),
                b if b & 0xe0 == 0x20 => ("size update", 5),
                b if b & 0xf0 == 0x10 => ("never indexed", 4),
                _ => ("not indexed", 4),
            };
            let index = integer(&mut block, prefix);
            if kind != "indexed" && kind != "size update" {
                if index == 0 {
                    string(&mut block);
                }
                string(&mut block);
            }
            out.push((kind, index));
        }
        out
    }

    #[tokio::test]
    async fn never_indexed_headers_send_their_names_by_index_after_the_first_call() {
        let blocks = header_blocks(3, |connection| {
            let mut calls = Vec::new();
            for millis in [900, 800, 700] {
                let mut head = unary_head(
                    &http::uri::PathAndQuery::from_static("/grpc.health.v1.Health/Check"),
                    MetadataMap::new(),
                );
                let headers = &mut head.headers;
                headers.insert(
                    crate::context::GRPC_TIMEOUT,
                    crate::context::grpc_timeout(Duration::from_millis(millis)),
                );
                let mut traceparent = http::HeaderValue::from_str(&format!(
                    "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba9{millis:04}-01"
                ))
                .unwrap();
                traceparent.set_sensitive(true);
                headers.insert(crate::telemetry::TRACEPARENT, traceparent);
                let mut secret = http::HeaderValue::from_static("Bearer secret");
                secret.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, secret);
                let body = RequestBody::Frame(Bytes::from_static(&[0, 0, 0, 0, 0]));
                calls.push(connection.start(Request { head, body }).unwrap());
            }
            calls
        })
        .await;
        // `authorization`'s name is the static table's 23rd entry; the secret is never indexed.
        let first = representations(&blocks[0]);
        let never: Vec<_> = first
            .iter()
            .filter(|(kind, _)| *kind == "never indexed")
            .collect();
        assert_eq!(
            never,
            [&("never indexed", 23)],
            "the first call's timeout and trace are indexed: {first:?}"
        );
        for later in &blocks[1..] {
            let later = representations(later);
            let never: Vec<_> = later
                .iter()
                .filter(|(kind, _)| *kind == "never indexed")
                .collect();
            assert_eq!(never.len(), 3, "timeout, trace and the secret: {later:?}");
            assert!(
                never.iter().all(|(_, index)| *index > 0),
                "names by index: {later:?}"
            );
            assert!(
                !later.iter().any(|(kind, _)| *kind == "incremental"),
                "{later:?}"
            );
        }
    }

    /// One unary call of a Health method over a fresh connection, read as herd's calls read
    /// answers.
    async fn health(address: &str, path: &'static str, service: &str) -> Result<i32, Status> {
        let mut connection = open(address).await;
        let request = Request {
            head: unary_head(
                &http::uri::PathAndQuery::from_static(path),
                MetadataMap::new(),
            ),
            body: RequestBody::Frame(frame(&HealthCheckRequest {
                service: service.into(),
            })),
        };
        let response = Service::<Request>::call(&mut connection, request)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let bytes = read_unary(response, DEFAULT_MAX_RESPONSE).await?;
        let answer: HealthCheckResponse = prost::Message::decode(bytes).unwrap();
        Ok(answer.status)
    }

    const CHECK: &str = "/grpc.health.v1.Health/Check";

    #[tokio::test]
    async fn unary_calls_read_answers_and_statuses_from_a_real_server() {
        let address = health_server("known").await;
        let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
        assert_eq!(health(&address, CHECK, "known").await.unwrap(), serving);
        // Error statuses arrive alone in the head ("trailers-only").
        let status = health(&address, CHECK, "unknown").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        let status = health(&address, "/grpc.health.v1.Health/Nope", "known")
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    }

    #[tokio::test]
    async fn a_closed_connection_fails_its_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // Accepts the connection and the HTTP/2 handshake, then closes it with a call open.
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut server = h2::server::handshake(tcp).await.unwrap();
            let _ = server.accept().await;
        });
        let status = health(&address, CHECK, "known").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }

    #[tokio::test]
    async fn a_silent_peer_loses_its_connection_and_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Completes the HTTP/2 handshake, then reads nothing more: no ping is answered.
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let server = h2::server::handshake(tcp).await.unwrap();
            let _ = stopped.await;
            drop(server);
        });
        let started = std::time::Instant::now();
        let outcome =
            tokio::time::timeout(Duration::from_secs(5), health(&address, CHECK, "known")).await;
        let _ = stop.send(());
        let status = outcome
            .expect("the keepalive closes the connection")
            .unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        // Never answered: pinged half a second after the handshake, closed a second later.
        let waited = started.elapsed();
        assert!(
            waited >= KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT - Duration::from_millis(100),
            "{waited:?}"
        );
        assert!(
            waited < KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + Duration::from_millis(300),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_that_falls_silent_is_noticed_within_one_and_a_half_seconds_of_its_last_answer()
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        // Answers the first call, then reads nothing more: no ping is answered.
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut server = h2::server::handshake(tcp).await.unwrap();
            let (_, mut respond) = server.accept().await.unwrap().unwrap();
            let response = http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "0")
                .body(())
                .unwrap();
            respond.send_response(response, true).unwrap();
            // Flushes the answer; returns once the client has sent its second call.
            let _second = server.accept().await;
            let _ = stopped.await;
            drop(server);
        });
        let mut connection = open(&address).await;
        let call = || Request {
            head: unary_head(
                &http::uri::PathAndQuery::from_static(CHECK),
                MetadataMap::new(),
            ),
            body: RequestBody::Frame(frame(&HealthCheckRequest::default())),
        };
        Service::<Request>::call(&mut connection, call())
            .await
            .expect("the first call is answered");
        let answered = std::time::Instant::now();
        let second = tokio::time::timeout(
            Duration::from_secs(5),
            Service::<Request>::call(&mut connection, call()),
        )
        .await;
        let _ = stop.send(());
        assert!(
            second
                .expect("the keepalive closes the connection")
                .is_err()
        );
        // Not "a ping interval after the check that last saw an answer": half a second after
        // the answer itself, then a second for the ping.
        let waited = answered.elapsed();
        assert!(
            waited < KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + Duration::from_millis(200),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn streamed_bodies_larger_than_the_window_arrive_whole() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        // A peer with a 1 KiB stream window, which reads the body, then answers its length.
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut connection = h2::server::Builder::new()
                .initial_window_size(1024)
                .handshake::<_, Bytes>(tcp)
                .await
                .unwrap();
            let (request, mut respond) = connection.accept().await.unwrap().unwrap();
            tokio::spawn(async move { while connection.accept().await.is_some() {} });
            let mut body = request.into_body();
            let mut received = Vec::new();
            while let Some(chunk) = body.data().await {
                let chunk = chunk.unwrap();
                body.flow_control().release_capacity(chunk.len()).unwrap();
                received.extend_from_slice(&chunk);
            }
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", "0".parse().unwrap());
            let mut stream = respond
                .send_response(http::Response::new(()), false)
                .unwrap();
            stream.send_trailers(trailers).unwrap();
            received
        });
        let sent: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let request = http::Request::builder()
            .method("POST")
            .uri("/any")
            .body(Body::new(http_body_util::Full::new(Bytes::from(
                sent.clone(),
            ))))
            .unwrap();
        let mut connection = open(&address).await;
        let response = Service::<http::Request<Body>>::call(&mut connection, request);
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(response.status(), http::StatusCode::OK);
        let received = tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the whole body arrived")
            .unwrap();
        assert!(
            received == sent,
            "{} of {} bytes",
            received.len(),
            sent.len()
        );
    }
}
