//! What every request to a herd service passes before it is decoded: its `grpc-timeout` is read
//! (a zero or negative one is `DEADLINE_EXCEEDED` at once, a malformed one `INVALID_ARGUMENT`),
//! and its first message's frame is checked — an uncompressed gRPC frame of at most the service's
//! limit, whole — so that a body that is not a gRPC message, or one too large, is
//! `INVALID_ARGUMENT` naming the bound, and costs the instance no more than the limit to find out.
//! Health and reflection pass untouched.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body::{Body as _, Frame};
use tonic::Status;
use tonic::body::Body;
use tower::{Layer, Service};

/// The largest request message a service takes unless it says otherwise.
pub const DEFAULT_MAX_REQUEST: usize = 2 * 1024 * 1024;
/// Bytes in front of every gRPC message: a compression flag and a 4-byte length.
const FRAME_HEADER: usize = 5;

/// The door of every service with a request limit: gRPC service name → largest request message.
#[derive(Debug, Clone, Default)]
pub struct DoorLayer {
    limits: Arc<HashMap<&'static str, usize>>,
}

impl DoorLayer {
    /// A door for the services in `limits` (name → largest request message, in bytes).
    pub fn new(limits: HashMap<&'static str, usize>) -> Self {
        Self {
            limits: Arc::new(limits),
        }
    }
}

impl<S> Layer<S> for DoorLayer {
    type Service = Door<S>;

    fn layer(&self, inner: S) -> Door<S> {
        Door {
            inner,
            limits: self.limits.clone(),
        }
    }
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Door<S> {
    inner: S,
    limits: Arc<HashMap<&'static str, usize>>,
}

/// `path`'s gRPC service: `pkg.Service` of `/pkg.Service/Method`.
fn service_of(path: &str) -> &str {
    path.trim_start_matches('/')
        .split_once('/')
        .map_or("", |(service, _)| service)
}

impl<S> Service<http::Request<Body>> for Door<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let Some(&limit) = self.limits.get(service_of(request.uri().path())) else {
            return Box::pin(self.inner.call(request));
        };
        // Answered before anything is awaited, so before tonic's own timer can answer CANCELLED.
        if let Err(status) = check_timeout(request.headers()) {
            return Box::pin(std::future::ready(Ok(status.into_http())));
        }
        // The service that was polled ready serves this request; a clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            match first_message(body, limit).await {
                Ok(body) => inner.call(http::Request::from_parts(parts, body)).await,
                Err(status) => Ok(status.into_http()),
            }
        })
    }
}

/// A `grpc-timeout` the call can run under: none, or a well-formed positive one.
fn check_timeout(headers: &http::HeaderMap) -> Result<(), Status> {
    let Some(value) = headers.get("grpc-timeout") else {
        return Ok(());
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
        Some(_) => Ok(()),
        None => Err(Status::invalid_argument(format!(
            "grpc-timeout: not up to 8 digits and a unit (H, M, S, m, u, n), got {}",
            crate::error::quoted(value)
        ))),
    }
}

/// Reads `body` until its first gRPC message is whole, checking its frame; gives back a body
/// that replays what was read, then the rest.
async fn first_message(mut body: Body, limit: usize) -> Result<Body, Status> {
    let mut read = BytesMut::new();
    let mut first: Option<Bytes> = None;
    loop {
        let have = first.as_ref().map_or(read.len(), Bytes::len);
        if have >= FRAME_HEADER {
            let head = first.as_ref().map_or(&read[..], |f| &f[..]);
            let len = check_frame(head, limit)?;
            if have >= FRAME_HEADER + len {
                break;
            }
        }
        let frame = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        match frame {
            None => {
                return Err(Status::invalid_argument(if have == 0 {
                    "request: no message"
                } else {
                    "request: the message ends before its frame says"
                }));
            }
            Some(Err(status)) => return Err(status),
            Some(Ok(frame)) => match frame.into_data() {
                // Most requests arrive in one piece: keep it as it came, no copy.
                Ok(data) if first.is_none() && read.is_empty() => first = Some(data),
                Ok(data) => {
                    if let Some(piece) = first.take() {
                        read.extend_from_slice(&piece);
                    }
                    read.extend_from_slice(&data);
                }
                Err(_) => {
                    return Err(Status::invalid_argument(
                        "request: trailers before the whole message",
                    ));
                }
            },
        }
    }
    let head = first.unwrap_or_else(|| read.freeze());
    Ok(Body::new(Replay {
        head: Some(head),
        rest: body,
    }))
}

/// The length of the message whose frame begins `head`, if its flag and length are acceptable.
fn check_frame(head: &[u8], limit: usize) -> Result<usize, Status> {
    let mut header = &head[..FRAME_HEADER];
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

/// A request body: what the door read, then the rest as it arrives.
struct Replay {
    head: Option<Bytes>,
    rest: Body,
}

impl http_body::Body for Replay {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if let Some(head) = self.head.take() {
            return Poll::Ready(Some(Ok(Frame::data(head))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.head.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let head = self.head.as_ref().map_or(0, |h| h.len() as u64);
        let rest = self.rest.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(rest.lower() + head);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + head);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    async fn collect(body: Body) -> Vec<u8> {
        let mut body = body;
        let mut all = Vec::new();
        while let Some(Ok(frame)) =
            std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
        {
            if let Ok(data) = frame.into_data() {
                all.extend_from_slice(&data);
            }
        }
        all
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
            let passed = first_message(body(&[a, b, b"more"]), 16).await.unwrap();
            let mut expected = frame.clone();
            expected.extend_from_slice(b"more");
            assert_eq!(collect(passed).await, expected, "split at {split}");
        }
    }

    #[tokio::test]
    async fn what_is_not_a_bounded_grpc_message_is_invalid_argument() {
        let refused = |chunks: Vec<Vec<u8>>, limit| async move {
            let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
            let Err(status) = first_message(body(&chunks), limit).await else {
                panic!("accepted");
            };
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
        // The door reads no further than the header of a message over the limit.
        let huge = [0u8, 0xff, 0xff, 0xff, 0xff];
        assert!(refused(vec![huge.to_vec()], 16).await.contains("exceeds"));
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

    #[test]
    fn services_are_named_by_their_paths() {
        assert_eq!(
            service_of("/herd.tax.v1.TaxService/ComputeTax"),
            "herd.tax.v1.TaxService"
        );
        assert_eq!(service_of("/nonsense"), "");
    }
}
