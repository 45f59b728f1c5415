//! What every request to a herd service passes before it is decoded, cheapest first:
//!
//! 0. over TLS, the authorization policy ([`crate::authz`]): a caller whose identity may not call
//!    the method is `PERMISSION_DENIED`, before it learns anything else;
//! 1. its `grpc-timeout`: zero or negative is `DEADLINE_EXCEEDED` at once, malformed
//!    `INVALID_ARGUMENT`, and less time than a call takes here now is `DEADLINE_EXCEEDED` too —
//!    work that cannot finish in time is not started;
//! 2. admission: past the instance's concurrency limit ([`crate::limit`]) the call is answered at
//!    once with `UNAVAILABLE` and a `grpc-retry-pushback-ms` header (so the caller retries
//!    elsewhere, after about one call's time), costing the instance a few microseconds;
//! 3. its first message's frame, checked as the service reads it: an uncompressed gRPC frame of
//!    at most the service's limit, whole — a body that is not a gRPC message, or one too large, is
//!    `INVALID_ARGUMENT` naming the bound, and costs no more than the limit to find out.
//!
//! The door sees a call as its connection reads it (herd's HTTP/2 server calls it from the
//! connection's read loop); an admitted call's latency, from its task's first turn to its answer,
//! is what the limit learns from. A call whose caller goes away is dropped, its work with it. A
//! call still running at its deadline is answered `DEADLINE_EXCEEDED`, its work dropped. Health
//! and reflection pass untouched but for the deadline.

use std::cell::Cell;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use futures::future::{Either, Ready};
use http_body::Frame;
use pin_project_lite::pin_project;
use tokio::time::Instant;
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

use arc_swap::ArcSwap;

use crate::authz::Policy;
use crate::limit::{Limiter, Permit};
use crate::metrics::Refusal;

/// The largest request message a service takes unless it says otherwise.
pub const DEFAULT_MAX_REQUEST: usize = 2 * 1024 * 1024;
/// Bytes in front of every gRPC message: a compression flag and a 4-byte length.
const FRAME_HEADER: usize = 5;

/// The door of an instance's services: each one's largest request message, and the instance's
/// concurrency limit, shared by all of them and every connection.
#[derive(Debug, Clone)]
pub struct DoorLayer {
    /// `/pkg.Service/`, `pkg.Service` → largest request message; a handful, so a scan beats a
    /// hash.
    limits: Arc<[(String, &'static str, usize)]>,
    limiter: Arc<Limiter>,
    authz: Option<Arc<ArcSwap<Policy>>>,
}

impl DoorLayer {
    /// A door for the services in `limits` (name → largest request message, in bytes), letting
    /// in what `limiter` admits.
    pub fn new(limits: HashMap<&'static str, usize>, limiter: Arc<Limiter>) -> Self {
        Self {
            limits: limits
                .into_iter()
                .map(|(name, limit)| (format!("/{name}/"), name, limit))
                .collect(),
            limiter,
            authz: None,
        }
    }

    /// Checks every call against the policy in `authz` first (kept current by whoever holds it).
    pub fn with_authz(mut self, authz: Arc<ArcSwap<Policy>>) -> Self {
        self.authz = Some(authz);
        self
    }
}

impl<S> Layer<S> for DoorLayer {
    type Service = Door<S>;

    fn layer(&self, inner: S) -> Door<S> {
        Door {
            inner,
            limits: self.limits.clone(),
            limiter: self.limiter.clone(),
            authz: self.authz.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Door<S> {
    inner: S,
    limits: Arc<[(String, &'static str, usize)]>,
    limiter: Arc<Limiter>,
    authz: Option<Arc<ArcSwap<Policy>>>,
}

impl<S> Service<http::Request<Body>> for Door<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<Ready<Result<http::Response<Body>, S::Error>>, Admitted<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let path = request.uri().path();
        let Some((service, limit)) = self
            .limits
            .iter()
            .find(|(prefix, _, _)| path.starts_with(prefix.as_str()))
            .map(|(_, service, limit)| (*service, *limit))
        else {
            // Health and reflection: no limit, but the caller's deadline still holds.
            let timeout = check_timeout(request.headers()).ok().flatten();
            return Either::Right(Admitted::new(self.inner.call(request), None, timeout));
        };
        let refuse = |status: Status, reason| {
            crate::metrics::refused(service, reason);
            Either::Left(futures::future::ready(Ok(status.into_http())))
        };
        if let Some(authz) = &self.authz {
            let identity = request
                .extensions()
                .get::<crate::tls::PeerInfo>()
                .and_then(|peer| peer.identity.as_deref());
            if let Err(status) = authz.load().check(path, identity) {
                return refuse(status, Refusal::Unauthorized);
            }
        }
        // Answered before anything is awaited, so before tonic's own timer can answer CANCELLED.
        let timeout = match check_timeout(request.headers()) {
            Ok(timeout) => timeout,
            Err(status) => return refuse(status, Refusal::Invalid),
        };
        let typical = self.limiter.typical_latency();
        if let (Some(left), Some(typical)) = (timeout, typical)
            && left < typical
        {
            return refuse(
                Status::deadline_exceeded(format!(
                    "grpc-timeout: {left:?} left, a call takes {typical:?} here now"
                )),
                Refusal::Deadline,
            );
        }
        let now = tokio::time::Instant::now();
        let Some(permit) = self.limiter.try_acquire(now) else {
            crate::metrics::refused(service, Refusal::Overloaded);
            return Either::Left(futures::future::ready(Ok(shed(&self.limiter, typical))));
        };
        // The first message is checked as the service reads it: a refusal is the status the
        // service answers with, and what is not a message is not read further.
        Either::Right(Admitted::new(
            self.inner
                .call(request.map(|body| Body::new(Checked::new(body, limit, service)))),
            Some(permit),
            timeout,
        ))
    }
}

/// The answer to a call over the limit: `UNAVAILABLE`, and when to try again (about one call's
/// time, at least a millisecond) in `grpc-retry-pushback-ms`.
///
/// Built header by header rather than through a `Status`: a refusal must cost less than the call
/// it refuses, and under a flood there are many. Its values change only when the limit or the
/// typical latency does, so HTTP/2's header compression sends most refusals as a few indexes.
fn shed(limiter: &Limiter, typical: Option<Duration>) -> http::Response<Body> {
    let mut response = http::Response::new(Body::default());
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    headers.insert(
        http::HeaderName::from_static("grpc-status"),
        http::HeaderValue::from_static("14"),
    );
    // Visible ASCII only, so no percent-encoding is needed.
    let message = format!(
        "overloaded: the limit of {} calls in flight is reached",
        limiter.limit()
    );
    if let Ok(value) = http::HeaderValue::from_str(&message) {
        headers.insert(http::HeaderName::from_static("grpc-message"), value);
    }
    let pushback = typical.map_or(1, |t| t.as_millis().max(1));
    headers.insert(PUSHBACK, http::HeaderValue::from(pushback as u64));
    response
}

/// gRFC A6's header: after how many milliseconds the caller may try again.
pub const PUSHBACK: &str = "grpc-retry-pushback-ms";

/// The wait a [`PUSHBACK`] value asks for; `None` when it is not a count of milliseconds.
pub(crate) fn pushback_of(value: &str) -> Option<Duration> {
    value.parse::<u64>().ok().map(Duration::from_millis)
}

pin_project! {
    /// An admitted call's answer: when it comes, the call's latency (from its first poll, when
    /// its work begins) goes to the limiter. If the caller's deadline passes first, the work is
    /// dropped and the answer is `DEADLINE_EXCEEDED` (the caller has stopped waiting; a call that
    /// overran says nothing about how long serving takes, so the limiter learns nothing from it).
    pub struct Admitted<F> {
        #[pin]
        inner: F,
        permit: Option<Permit>,
        #[pin]
        expires: Option<tokio::time::Sleep>,
        timeout: Duration,
        begun: bool,
    }
}

impl<F> Admitted<F> {
    fn new(inner: F, permit: Option<Permit>, timeout: Option<Duration>) -> Self {
        Self {
            inner,
            permit,
            expires: timeout.map(tokio::time::sleep),
            timeout: timeout.unwrap_or_default(),
            begun: false,
        }
    }
}

thread_local! {
    /// The deadline by which the door answers the call whose work is being polled on this thread
    /// (see [`answers_by`]).
    static ANSWERED_BY: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Whether the call whose work is being polled on this thread — a handler, in its own task — is
/// answered by its door no later than `deadline`: its work, the calls it makes among it, is
/// dropped then. A call it makes by that deadline needs no timer of its own.
pub(crate) fn answers_by(deadline: Instant) -> bool {
    ANSWERED_BY.get().is_some_and(|by| by <= deadline)
}

/// Sets [`ANSWERED_BY`] for one poll of a call's work; puts back what was there when dropped,
/// even by a panic.
struct Answering(Option<Instant>);

impl Answering {
    fn by(deadline: Option<Instant>) -> Self {
        Self(ANSWERED_BY.replace(deadline))
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        ANSWERED_BY.set(self.0);
    }
}

impl<F, E> std::future::Future for Admitted<F>
where
    F: std::future::Future<Output = Result<http::Response<Body>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if !*this.begun {
            *this.begun = true;
            if let Some(permit) = this.permit.as_mut() {
                permit.begin(Instant::now());
            }
        }
        let answering = Answering::by(this.expires.as_ref().as_pin_ref().map(|s| s.deadline()));
        let polled = this.inner.poll(cx);
        drop(answering);
        let output = match polled {
            Poll::Ready(output) => output,
            Poll::Pending => {
                if let Some(expires) = this.expires.as_pin_mut() {
                    std::task::ready!(expires.poll(cx));
                    this.permit.take();
                    return Poll::Ready(Ok(Status::deadline_exceeded(format!(
                        "grpc-timeout: {:?} passed before the call was answered",
                        this.timeout
                    ))
                    .into_http()));
                }
                return Poll::Pending;
            }
        };
        if let Some(permit) = this.permit.take() {
            // A unary error answer comes whole in the head, a success has its status in the
            // trailers. Only what was served says how long serving takes; UNAVAILABLE is overload
            // from below (this instance's own door never gets here with it); other errors (bad
            // input, say) are answered before the work and say nothing.
            let status = output
                .as_ref()
                .ok()
                .and_then(|response| response.headers().get(crate::client::unary::GRPC_STATUS))
                .map(|code| code.as_bytes());
            match status {
                None | Some(b"0") => permit.done(tokio::time::Instant::now()),
                Some(b"14") => permit.overloaded(tokio::time::Instant::now()),
                Some(_) => permit.ignore(),
            }
        }
        Poll::Ready(output)
    }
}

/// The time a call has (`None`: no deadline), or why it cannot run: a zero or negative
/// `grpc-timeout`, or one that is not well formed.
fn check_timeout(headers: &http::HeaderMap) -> Result<Option<Duration>, Status> {
    let Some(value) = headers.get(crate::context::GRPC_TIMEOUT) else {
        return Ok(None);
    };
    let value = value.to_str().unwrap_or_default();
    if value.starts_with('-') {
        return Err(Status::deadline_exceeded(
            "grpc-timeout: negative, the deadline has passed",
        ));
    }
    match crate::context::parse_grpc_timeout(value) {
        Some(timeout) if timeout.is_zero() => Err(Status::deadline_exceeded(
            "grpc-timeout: zero, the deadline has passed",
        )),
        Some(timeout) => Ok(Some(timeout)),
        None => Err(Status::invalid_argument(format!(
            "grpc-timeout: not up to 8 digits and a unit (H, M, S, m, u, n), got {}",
            crate::error::quoted(value)
        ))),
    }
}

/// A request body whose first gRPC message is checked as it passes: an uncompressed frame of at
/// most `limit` bytes, whole. Bytes pass through untouched; a violation ends the body with
/// `INVALID_ARGUMENT`.
struct Checked {
    body: Body,
    limit: usize,
    /// The service called, for the refusal's count.
    service: &'static str,
    /// The first frame's header as it arrives.
    header: [u8; FRAME_HEADER],
    seen: usize,
    /// Bytes of the first message still to come, once its header is known.
    remaining: Option<usize>,
}

impl Checked {
    fn new(body: Body, limit: usize, service: &'static str) -> Self {
        Self {
            body,
            limit,
            service,
            header: [0; FRAME_HEADER],
            seen: 0,
            remaining: None,
        }
    }

    /// Whether the first message has passed whole.
    fn done(&self) -> bool {
        self.remaining == Some(0)
    }

    /// Takes note of `data`, part of the body; fails on a frame that is not acceptable.
    fn observe(&mut self, mut data: &[u8]) -> Result<(), Status> {
        while !self.done() && !data.is_empty() {
            match self.remaining.as_mut() {
                None => {
                    let take = (FRAME_HEADER - self.seen).min(data.len());
                    self.header[self.seen..self.seen + take].copy_from_slice(&data[..take]);
                    self.seen += take;
                    data = &data[take..];
                    if self.seen == FRAME_HEADER {
                        self.remaining = Some(check_frame(&self.header, self.limit)?);
                    }
                }
                Some(remaining) => {
                    let take = (*remaining).min(data.len());
                    *remaining -= take;
                    data = &data[take..];
                }
            }
        }
        Ok(())
    }
}

/// The length of the message whose frame begins `head`, if its flag and length are acceptable.
fn check_frame(head: &[u8; FRAME_HEADER], limit: usize) -> Result<usize, Status> {
    let mut header = &head[..];
    let flag = header.get_u8();
    let len = header.get_u32() as usize;
    if flag != 0 {
        return Err(Status::invalid_argument(format!(
            "request: not an uncompressed gRPC message (flag {flag:#04x})"
        )));
    }
    if len > limit {
        return Err(Status::invalid_argument(format!(
            "request: a message of {len} bytes exceeds the limit of {limit}"
        )));
    }
    Ok(len)
}

impl http_body::Body for Checked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let frame = std::task::ready!(Pin::new(&mut self.body).poll_frame(cx));
        if self.done() {
            return Poll::Ready(frame);
        }
        let refused = match frame {
            Some(Ok(frame)) => match frame.data_ref().map(|data| self.observe(data)) {
                Some(Ok(())) => return Poll::Ready(Some(Ok(frame))),
                Some(Err(status)) => status,
                None => Status::invalid_argument("request: trailers before the whole message"),
            },
            Some(Err(status)) => return Poll::Ready(Some(Err(status))),
            None if self.seen == 0 => Status::invalid_argument("request: no message"),
            None => Status::invalid_argument("request: the message ends before its frame says"),
        };
        crate::metrics::refused(self.service, Refusal::Invalid);
        Poll::Ready(Some(Err(refused)))
    }

    fn is_end_stream(&self) -> bool {
        // Never report the end before the first message has been checked: an empty body must
        // be read, to be refused.
        self.done() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body::Body as _;
    use tonic::Code;

    /// A body of `chunks`, one frame each.
    fn body(chunks: &[&[u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, Status>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        Body::new(http_body_util::StreamBody::new(futures::stream::iter(
            frames,
        )))
    }

    /// Everything the checked body gives, or the status it ends with.
    async fn read(chunks: &[&[u8]], limit: usize) -> Result<Vec<u8>, Status> {
        let mut checked = Checked::new(body(chunks), limit, "t.S");
        let mut all = Vec::new();
        while let Some(frame) =
            std::future::poll_fn(|cx| Pin::new(&mut checked).poll_frame(cx)).await
        {
            if let Ok(data) = frame?.into_data() {
                all.extend_from_slice(&data);
            }
        }
        Ok(all)
    }

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut frame = vec![0];
        frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
        frame.extend_from_slice(message);
        frame
    }

    #[tokio::test]
    async fn a_whole_message_passes_unchanged_however_it_is_split() {
        let frame = framed(b"hello");
        for split in 0..=frame.len() {
            let (a, b) = frame.split_at(split);
            let passed = read(&[a, b, b"more"], 16).await.expect("accepted");
            let mut expected = frame.clone();
            expected.extend_from_slice(b"more");
            assert_eq!(passed, expected, "split at {split}");
        }
    }

    #[tokio::test]
    async fn what_is_not_a_bounded_grpc_message_is_invalid_argument() {
        let refused = |chunks: Vec<Vec<u8>>, limit| async move {
            let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let status = read(&chunks, limit).await.expect_err("refused");
            assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
            status.message().to_string()
        };
        assert_eq!(refused(vec![], 16).await, "request: no message");
        assert!(
            refused(vec![b"{\"json\":1}".to_vec()], 16)
                .await
                .contains("flag 0x7b")
        );
        assert!(
            refused(vec![framed(&[0; 17])], 16)
                .await
                .contains("17 bytes exceeds the limit of 16")
        );
        let mut short = framed(b"hello");
        short.pop();
        assert!(refused(vec![short], 16).await.contains("ends before"));
        // Refused at the header of a message over the limit, whatever follows.
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        assert!(
            refused(vec![huge.to_vec(), vec![0; 64]], 16)
                .await
                .contains("exceeds")
        );
    }

    #[test]
    fn zero_negative_and_malformed_timeouts_are_refused() {
        let mut headers = http::HeaderMap::new();
        assert!(check_timeout(&headers).is_ok());
        for (value, code) in [
            ("0n", Some(Code::DeadlineExceeded)),
            ("0S", Some(Code::DeadlineExceeded)),
            ("-1S", Some(Code::DeadlineExceeded)),
            ("soon", Some(Code::InvalidArgument)),
            ("123456789S", Some(Code::InvalidArgument)),
            ("100m", None),
        ] {
            headers.insert("grpc-timeout", value.parse().unwrap());
            assert_eq!(
                check_timeout(&headers).err().map(|s| s.code()),
                code,
                "{value}"
            );
        }
    }

    /// `bytes` cut at `cuts` (positions, any order, any number).
    fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
        cuts.sort_unstable();
        let mut pieces = Vec::new();
        let mut at = 0;
        for cut in cuts.into_iter().chain([bytes.len()]) {
            pieces.push(bytes[at..cut].to_vec());
            at = cut;
        }
        pieces
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Whatever arrives, however it is split: no panic, the same verdict, and what passes
        /// passes unchanged.
        #[test]
        fn any_body_however_split_gets_one_verdict(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            cuts in proptest::collection::vec(0usize..64, 0..6),
            limit in 0usize..32,
            framed_first in proptest::prelude::any::<bool>(),
        ) {
            // Half the time a real frame, so that bodies that pass are exercised too.
            let body = if framed_first { [framed(&body[..body.len().min(limit)]), body.clone()].concat() } else { body };
            let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
            let whole = runtime.block_on(read(&[&body], limit)).map_err(|s| s.message().to_string());
            let pieces = split(&body, &cuts);
            let pieces: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
            let parts = runtime.block_on(read(&pieces, limit)).map_err(|s| s.message().to_string());
            proptest::prop_assert_eq!(&whole, &parts);
            if let Ok(passed) = whole {
                proptest::prop_assert_eq!(passed, body);
            }
        }
    }

    /// A service whose calls never finish, and which notes when one is dropped.
    #[derive(Clone)]
    struct Forever(Arc<std::sync::atomic::AtomicU32>);

    struct Dropped(Arc<std::sync::atomic::AtomicU32>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    impl Service<http::Request<Body>> for Forever {
        type Response = http::Response<Body>;
        type Error = std::convert::Infallible;
        type Future =
            futures::future::BoxFuture<'static, Result<http::Response<Body>, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<Body>) -> Self::Future {
            let dropped = Dropped(self.0.clone());
            Box::pin(async move {
                let _dropped = dropped;
                std::future::pending().await
            })
        }
    }

    fn door(
        limit: u32,
    ) -> (
        Door<Forever>,
        Arc<Limiter>,
        Arc<std::sync::atomic::AtomicU32>,
    ) {
        let limiter = Arc::new(Limiter::new(crate::limit::LimitSettings {
            initial: limit * 2,
            min: limit,
            max: limit,
            ..Default::default()
        }));
        let dropped = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let layer = DoorLayer::new(HashMap::from([("t.S", 1024)]), limiter.clone());
        (layer.layer(Forever(dropped.clone())), limiter, dropped)
    }

    fn call() -> http::Request<Body> {
        http::Request::builder()
            .uri("/t.S/M")
            .body(Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn over_the_limit_a_call_is_shed_at_once_with_a_pushback() {
        let (mut door, limiter, _) = door(2);
        let _a = door.call(call());
        let _b = door.call(call());
        assert_eq!(limiter.in_flight(), 2);
        let shed = door.call(call()).await.unwrap();
        assert_eq!(shed.headers()["grpc-status"], "14");
        assert!(shed.headers().contains_key(PUSHBACK));
        assert_eq!(shed.headers()["content-type"], "application/grpc");
        let status = Status::from_header_map(shed.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(
            status.message(),
            "overloaded: the limit of 2 calls in flight is reached"
        );
    }

    #[tokio::test]
    async fn refusals_are_counted_by_service_and_reason() {
        let metrics = crate::metrics::for_tests();
        let limiter = Arc::new(Limiter::new(crate::limit::LimitSettings {
            initial: 2,
            min: 1,
            max: 1,
            ..Default::default()
        }));
        let layer = DoorLayer::new(HashMap::from([("t.Refusals", 1024)]), limiter);
        let mut door = layer.layer(Forever(Default::default()));
        let to = |timeout: Option<&str>| {
            let mut request = http::Request::builder().uri("/t.Refusals/M");
            if let Some(timeout) = timeout {
                request = request.header("grpc-timeout", timeout);
            }
            request.body(Body::empty()).unwrap()
        };
        let _admitted = door.call(to(None));
        for _ in 0..2 {
            let shed = door.call(to(None)).await.unwrap();
            assert_eq!(shed.headers()["grpc-status"], "14");
        }
        let invalid = door.call(to(Some("soon"))).await.unwrap();
        assert_eq!(invalid.headers()["grpc-status"], "3");
        let refused = |reason| {
            metrics.total(
                "herd.server.refused",
                &[("rpc.service", "t.Refusals"), ("reason", reason)],
            )
        };
        assert_eq!(refused("overloaded"), 2.0);
        assert_eq!(refused("invalid"), 1.0);
    }

    #[tokio::test]
    async fn a_call_whose_caller_went_away_stops_and_gives_its_place_back() {
        let (mut door, limiter, dropped) = door(2);
        let mut pending = Box::pin(door.call(call()));
        let polled = std::future::poll_fn(|cx| Poll::Ready(pending.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
        assert_eq!(limiter.in_flight(), 1);
        // The caller cancels: the server drops the call's future.
        drop(pending);
        assert_eq!(
            dropped.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the work stopped"
        );
        assert_eq!(limiter.in_flight(), 0, "its place came back");
    }

    #[tokio::test]
    async fn a_call_s_work_knows_by_when_its_door_answers_it() {
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let limiter = Arc::new(Limiter::new(crate::limit::LimitSettings::default()));
        let layer = DoorLayer::new(HashMap::from([("t.S", 1024)]), limiter);
        let asked = seen.clone();
        let mut door = layer.layer(tower::service_fn(move |_: http::Request<Body>| {
            let asked = asked.clone();
            async move {
                let now = Instant::now();
                let answers = (answers_by(now + Duration::from_secs(1)), answers_by(now));
                asked.lock().unwrap().push(answers);
                Ok::<_, std::convert::Infallible>(http::Response::new(Body::empty()))
            }
        }));
        let mut within = call();
        within
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("500m"));
        door.call(within).await.unwrap();
        door.call(call()).await.unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [(true, false), (false, false)],
            "answered within its 500 ms, not now; without a deadline, never"
        );
        assert!(
            !answers_by(Instant::now() + Duration::from_secs(3600)),
            "outside a call"
        );
    }

    #[tokio::test]
    async fn a_call_still_running_at_its_deadline_is_answered_deadline_exceeded() {
        let (mut door, limiter, dropped) = door(2);
        let mut request = call();
        request
            .headers_mut()
            .insert("grpc-timeout", http::HeaderValue::from_static("50m"));
        let started = tokio::time::Instant::now();
        let answer = door.call(request).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(50));
        let status = Status::from_header_map(answer.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(
            status.message(),
            "grpc-timeout: 50ms passed before the call was answered"
        );
        assert_eq!(
            dropped.load(std::sync::atomic::Ordering::Relaxed),
            1,
            "the work stopped"
        );
        assert_eq!(limiter.in_flight(), 0, "its place came back");
        // Health and reflection have no limit, and the same deadline.
        let other = http::Request::builder()
            .uri("/grpc.health.v1.Health/Check")
            .header("grpc-timeout", "20m")
            .body(Body::empty())
            .unwrap();
        let answer = door.call(other).await.unwrap();
        assert_eq!(answer.headers()["grpc-status"], "4");
    }
}
