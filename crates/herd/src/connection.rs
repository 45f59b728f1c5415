//! One HTTP/2 connection to one endpoint, written on `h2` directly, and the reading of a unary
//! gRPC answer from it.
//!
//! A call goes from the caller's task straight into the connection's stream table: no queue and
//! no hand-off to another task (the connection's own task only moves frames). Keepalive pings run
//! beside the connection whenever it has answered nothing for a while: a peer that leaves one
//! unanswered for a second loses the connection, and every call still on it fails at once.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use h2::client::{ResponseFuture, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::uri::{Authority, Scheme};
use http::{HeaderMap, StatusCode};
use http_body::Frame;
use tonic::body::Body;
use tonic::metadata::MetadataMap;
use tonic::{Code, Status};

use crate::error::CallError;
use tower::{BoxError, Service};

/// Bound on establishing a connection to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// A connection that has answered nothing for this long is pinged...
const KEEPALIVE_INTERVAL: Duration = Duration::from_millis(500);
/// ...and closed when a ping is not answered within this: a silent peer is noticed within
/// 1.5 s, and its endpoint leaves the balancer with the connection.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 settings as hyper's client sets them: receive windows (per stream, per connection),
/// the largest header block accepted, the most bytes buffered for sending per stream, and the
/// streams opened before the peer has said how many it takes.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// The largest answer accepted, as tonic's default.
const MAX_ANSWER: usize = 4 * 1024 * 1024;
/// Bytes in front of every gRPC message: a compression flag and a 4-byte length.
const FRAME_HEADER: usize = 5;

/// A request on its way to an endpoint: the head (path and metadata; the connection adds scheme
/// and authority) and its body.
pub(crate) struct Outgoing {
    pub(crate) head: http::request::Parts,
    pub(crate) body: OutgoingBody,
}

/// What follows the head of an [`Outgoing`] request.
pub(crate) enum OutgoingBody {
    /// One whole gRPC frame, sent with the end of the stream: herd's unary calls.
    Frame(Bytes),
    /// Any HTTP body (generated clients, client streams), forwarded frame by frame.
    Stream(Body),
}

impl From<http::Request<Body>> for Outgoing {
    fn from(request: http::Request<Body>) -> Self {
        let (head, body) = request.into_parts();
        Self {
            head,
            body: OutgoingBody::Stream(body),
        }
    }
}

/// An answer's head, with its body still arriving.
pub(crate) type Answer = http::Response<RecvStream>;

/// One HTTP/2 connection to one endpoint; clones share it.
#[derive(Clone)]
pub(crate) struct Connection {
    send: SendRequest<Bytes>,
    authority: Authority,
    /// Distinguishes this connection from an earlier one to the same endpoint.
    pub(crate) generation: u64,
    /// Answers received so far: while they keep coming, the peer needs no ping.
    answers: Arc<AtomicU64>,
}

impl Connection {
    /// Connects to `authority` (`host:port`) over plaintext HTTP/2. The connection runs on its
    /// own task until it breaks (an unanswered ping included) or every clone is dropped.
    pub(crate) async fn open(authority: Authority) -> Result<Self, BoxError> {
        static GENERATION: AtomicU64 = AtomicU64::new(0);
        let address = authority.as_str();
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(address))
            .await
            .map_err(|_| {
                format!("connecting to {address} took longer than {CONNECT_TIMEOUT:?}")
            })??;
        tcp.set_nodelay(true)?;
        let (send, mut connection) = h2::client::Builder::new()
            .enable_push(false)
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .handshake(tcp)
            .await?;
        let pings = connection.ping_pong();
        let answers = Arc::new(AtomicU64::new(0));
        let heard = answers.clone();
        let peer = address.to_string();
        tokio::spawn(async move {
            let outcome: Result<(), BoxError> = match pings {
                Some(pings) => tokio::select! {
                    closed = &mut connection => closed.map_err(Into::into),
                    silent = keepalive(pings, heard) => Err(silent),
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
            generation: GENERATION.fetch_add(1, Ordering::Relaxed),
            answers,
        })
    }

    /// Opens a stream for `request` and sends what of its body is at hand.
    fn start(&mut self, request: Outgoing) -> Result<ResponseFuture, BoxError> {
        let Outgoing { mut head, body } = request;
        if let Some(span) = head.extensions.get::<crate::telemetry::PeerSpan>() {
            span.record(&self.authority);
        }
        // Callers give the path only; HTTP/2 needs the scheme and authority too.
        let mut uri = http::uri::Parts::from(std::mem::take(&mut head.uri));
        uri.scheme = Some(Scheme::HTTP);
        uri.authority = Some(self.authority.clone());
        head.uri = http::Uri::from_parts(uri)?;
        let empty = matches!(&body, OutgoingBody::Stream(b) if http_body::Body::is_end_stream(b));
        let (response, mut stream) = self
            .send
            .send_request(http::Request::from_parts(head, ()), empty)?;
        match body {
            OutgoingBody::Frame(frame) => stream.send_data(frame, true)?,
            OutgoingBody::Stream(_) if empty => {}
            OutgoingBody::Stream(body) => {
                tokio::spawn(forward(body, stream));
            }
        }
        Ok(response)
    }
}

/// Pings the peer whenever a [`KEEPALIVE_INTERVAL`] passed without an answer (a busy peer that
/// keeps answering is never pinged); returns why once a ping goes unanswered.
async fn keepalive(mut pings: h2::PingPong, answers: Arc<AtomicU64>) -> BoxError {
    let mut seen = answers.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        let now = answers.load(Ordering::Relaxed);
        if now != seen {
            seen = now;
            continue;
        }
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
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

impl Service<Outgoing> for Connection {
    type Response = Answer;
    type Error = BoxError;
    type Future = Sending;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.send.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Outgoing) -> Sending {
        match self.start(request) {
            Ok(response) => Sending::Waiting(response, self.answers.clone()),
            Err(e) => Sending::Failed(Some(e)),
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
        let sending = Service::<Outgoing>::call(self, request.into());
        Box::pin(async move { Ok(streamed(sending.await?)) })
    }
}

/// The answer of one request, once its head has arrived.
pub(crate) enum Sending {
    Failed(Option<BoxError>),
    /// The answer's head, and the connection's count of answers.
    Waiting(ResponseFuture, Arc<AtomicU64>),
}

impl Future for Sending {
    type Output = Result<Answer, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Sending::Failed(e) => Poll::Ready(Err(e
                .take()
                .unwrap_or_else(|| "request polled after it failed".into()))),
            Sending::Waiting(response, answers) => {
                let answer = ready!(Pin::new(response).poll(cx))?;
                answers.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Ok(answer))
            }
        }
    }
}

/// An answer as generated tonic clients read it: an HTTP body of data frames, then trailers.
pub(crate) fn streamed(answer: Answer) -> http::Response<Body> {
    answer.map(|stream| {
        Body::new(AnswerBody {
            stream,
            data_done: false,
        })
    })
}

struct AnswerBody {
    stream: RecvStream,
    data_done: bool,
}

impl http_body::Body for AnswerBody {
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

/// Reads a unary call's answer to its end: the message's bytes (without the frame header), or
/// the status that ended the call.
pub(crate) async fn read_unary(answer: Answer) -> Result<Bytes, CallError> {
    let (head, mut body) = answer.into_parts();
    if head.status != StatusCode::OK {
        return Err(CallError::HttpStatus(head.status));
    }
    // A "trailers-only" answer: the status is in the head, and nothing follows.
    if let Some(end) = grpc_status(&head.headers) {
        return Err(end.err().map_or_else(
            || CallError::Malformed("the answer has no message".into()),
            CallError::Refused,
        ));
    }
    let mut received = Received::Nothing;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        received.push(chunk)?;
    }
    let trailers = body.trailers().await?;
    match trailers.as_ref().and_then(grpc_status) {
        Some(Ok(())) => unframe(received.into_bytes()),
        Some(Err(status)) => Err(CallError::Refused(status)),
        None => Err(CallError::NoStatus),
    }
}

/// The bytes of an answer as they arrive; copied only when they come in more than one piece.
enum Received {
    Nothing,
    One(Bytes),
    Many(BytesMut),
}

impl Received {
    fn push(&mut self, chunk: Bytes) -> Result<(), CallError> {
        let len = match self {
            Received::Nothing => 0,
            Received::One(b) => b.len(),
            Received::Many(b) => b.len(),
        };
        if len + chunk.len() > MAX_ANSWER + FRAME_HEADER {
            return Err(CallError::TooLarge { limit: MAX_ANSWER });
        }
        match self {
            Received::Nothing => *self = Received::One(chunk),
            Received::One(first) => {
                let mut joined = BytesMut::with_capacity(first.len() + chunk.len());
                joined.extend_from_slice(first);
                joined.extend_from_slice(&chunk);
                *self = Received::Many(joined);
            }
            Received::Many(joined) => joined.extend_from_slice(&chunk),
        }
        Ok(())
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Received::Nothing => Bytes::new(),
            Received::One(b) => b,
            Received::Many(b) => b.freeze(),
        }
    }
}

/// The single message of a unary answer, without its frame header.
fn unframe(frame: Bytes) -> Result<Bytes, CallError> {
    let Some(header) = frame.get(..FRAME_HEADER) else {
        return Err(CallError::Malformed("the answer has no message".into()));
    };
    if header[0] != 0 {
        return Err(CallError::Malformed(
            "the answer is compressed, though no compression was offered".into(),
        ));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    let arrived = frame.len() - FRAME_HEADER;
    if arrived != len {
        return Err(CallError::Malformed(format!(
            "the answer's frame announces {len} bytes but {arrived} arrived"
        )));
    }
    Ok(frame.slice(FRAME_HEADER..))
}

/// A gRPC frame: the header, then `message` encoded.
pub(crate) fn frame(message: &impl prost::Message) -> Bytes {
    let len = message.encoded_len();
    let mut frame = Vec::with_capacity(FRAME_HEADER + len);
    frame.push(0);
    // Messages over 4 GiB cannot be framed; herd's are far from it, and servers refuse 4 MiB.
    frame.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    // Cannot fail: the buffer has room for the whole message.
    let _ = message.encode(&mut frame);
    Bytes::from(frame)
}

/// The head of a unary gRPC request to `path` carrying `metadata` (the deadline included).
pub(crate) fn unary_head(
    path: &http::uri::PathAndQuery,
    metadata: MetadataMap,
) -> http::request::Parts {
    let (mut head, ()) = http::Request::new(()).into_parts();
    head.method = http::Method::POST;
    head.uri = http::Uri::from(path.clone());
    head.headers = metadata.into_headers();
    head.headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    head.headers
        .insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    head.headers.insert(
        http::header::USER_AGENT,
        http::HeaderValue::from_static(concat!("herd/", env!("CARGO_PKG_VERSION"))),
    );
    head
}

/// `Ok` for `grpc-status: 0`, the status it names otherwise; `None` without one.
fn grpc_status(headers: &HeaderMap) -> Option<Result<(), Status>> {
    let code = headers.get("grpc-status")?;
    if code.as_bytes() == b"0" {
        return Some(Ok(()));
    }
    let message = headers
        .get("grpc-message")
        .map(|m| {
            percent_encoding::percent_decode(m.as_bytes())
                .decode_utf8_lossy()
                .into_owned()
        })
        .unwrap_or_default();
    let details = headers
        .get("grpc-status-details-bin")
        .and_then(|d| BASE64.decode(d.as_bytes()).ok())
        .map(Bytes::from)
        .unwrap_or_default();
    let mut metadata = headers.clone();
    for name in ["grpc-status", "grpc-message", "grpc-status-details-bin"] {
        metadata.remove(name);
    }
    Some(Err(Status::with_details_and_metadata(
        Code::from_bytes(code.as_bytes()),
        message,
        details,
        MetadataMap::from_headers(metadata),
    )))
}

/// Base64 as gRPC writes binary metadata: standard alphabet, padding optional.
const BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::tests::health_server;
    use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

    /// One unary call of a Health method over a fresh connection, read as herd's calls read
    /// answers.
    async fn health(address: &str, path: &'static str, service: &str) -> Result<i32, Status> {
        let mut connection = Connection::open(address.parse().unwrap()).await.unwrap();
        let request = Outgoing {
            head: unary_head(
                &http::uri::PathAndQuery::from_static(path),
                MetadataMap::new(),
            ),
            body: OutgoingBody::Frame(frame(&HealthCheckRequest {
                service: service.into(),
            })),
        };
        let answer = Service::<Outgoing>::call(&mut connection, request)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        let bytes = read_unary(answer).await?;
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
        let waited = started.elapsed();
        assert!(
            waited < KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT + Duration::from_secs(2),
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
            let mut trailers = HeaderMap::new();
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
        let mut connection = Connection::open(address.parse().unwrap()).await.unwrap();
        let answer = Service::<http::Request<Body>>::call(&mut connection, request);
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("answered")
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
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

    #[test]
    fn frames_round_trip() {
        let message = herd_proto::tax::ComputeTaxRequest {
            region: "DE".into(),
            ..Default::default()
        };
        let framed = frame(&message);
        assert_eq!(
            framed.len(),
            FRAME_HEADER + prost::Message::encoded_len(&message)
        );
        let back = unframe(framed).unwrap();
        let decoded: herd_proto::tax::ComputeTaxRequest = prost::Message::decode(back).unwrap();
        assert_eq!(decoded, message);
    }

    #[test]
    fn bad_frames_are_internal_errors() {
        for bad in [&b""[..], b"\0\0\0", b"\x01\0\0\0\0", b"\0\0\0\0\x05abc"] {
            let status = unframe(Bytes::copy_from_slice(bad)).unwrap_err();
            assert_eq!(status.code(), Code::Internal, "{bad:?}: {status:?}");
        }
    }

    #[test]
    fn statuses_come_from_headers() {
        let mut headers = HeaderMap::new();
        assert!(grpc_status(&headers).is_none());
        headers.insert("grpc-status", "0".parse().unwrap());
        assert!(matches!(grpc_status(&headers), Some(Ok(()))));
        headers.insert("grpc-status", "3".parse().unwrap());
        headers.insert("grpc-message", "items%5B0%5D.sku: unknown".parse().unwrap());
        headers.insert("grpc-status-details-bin", "not base64!".parse().unwrap());
        let status = grpc_status(&headers).unwrap().unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "items[0].sku: unknown");
        assert!(status.details().is_empty());
    }

    #[test]
    fn answers_are_bounded() {
        let mut received = Received::Nothing;
        received.push(Bytes::from(vec![0; MAX_ANSWER])).unwrap();
        received.push(Bytes::from(vec![0; 3])).unwrap();
        let status = received.push(Bytes::from(vec![0; 3])).unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted);
    }
}
