//! Calls of generated tonic clients over a [`MeshChannel`]. A request whose body is whole as soon
//! as it is asked for — every unary call: tonic encodes its one message at once — is sent as one
//! frame, its answer read whole, and retried as [`call`](super::call) retries: only `UNAVAILABLE`
//! (shed, refused, or a connection lost before the answer was complete), at most three attempts,
//! after the instance's pushback or a short pause, within the call's `grpc-timeout` and the
//! channel's retry budget. Any other request (a client stream) is sent once, its answer streamed.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use tonic::body::Body;

use super::connection::{Request, RequestBody, Response, streamed};
use super::unary::{FRAME_HEADER, GRPC_STATUS};
use super::{NoRetry, retry_after};
use crate::balance::MeshChannel;
use crate::context::Deadline;
use crate::error::CallError;

/// Sends `request` over `channel`, retrying what may be retried (see the module docs). A retried
/// call's answer is read whole before it is handed on (a unary answer is one message, at most the
/// channel's limit), so that a connection lost while it arrives is retried too.
pub(crate) async fn send(
    channel: &MeshChannel,
    request: http::Request<Body>,
) -> Result<http::Response<Body>, CallError> {
    let (head, body) = request.into_parts();
    let frame = match whole_now(body) {
        Ok(frame) => frame,
        Err(body) => {
            let body = RequestBody::Stream(body);
            let response = channel.send(Request { head, body }).await?;
            return Ok(streamed(response));
        }
    };
    let deadline = Deadline::from_headers(&head.headers);
    let template = http::Request::from_parts(head, ());
    let budget = channel.budget();
    let mut number = 1;
    loop {
        let mut head = copy(&template);
        if let Some(deadline) = &deadline {
            let left = deadline.remaining()?;
            head.headers.insert(
                crate::context::GRPC_TIMEOUT,
                crate::context::grpc_timeout(left),
            );
        }
        let request = Request {
            head,
            body: RequestBody::Frame(frame.clone()),
        };
        let attempt = async {
            let response = channel.send(request).await?;
            read_whole(response, channel.max_response()).await
        };
        let outcome = match &deadline {
            Some(deadline) => tokio::time::timeout(deadline.remaining()?, attempt)
                .await
                .unwrap_or(Err(CallError::DeadlineExceeded)),
            None => attempt.await,
        };
        let pushback = match &outcome {
            Ok(answer) => match answer.unavailable() {
                None => {
                    budget.success();
                    return outcome.map(Whole::into_response);
                }
                Some(pushback) => pushback,
            },
            Err(error) if error.retryable() => error.pushback(),
            Err(_) => return outcome.map(Whole::into_response),
        };
        let pause = match retry_after(number, budget, pushback, deadline.as_ref()) {
            Ok(pause) => pause,
            Err(NoRetry::Expired(expired)) => return Err(expired.into()),
            Err(_) => return outcome.map(Whole::into_response),
        };
        tracing::debug!(attempt = number, path = %template.uri().path(), "retrying a call that was not processed");
        number += 1;
        tokio::time::sleep(pause).await;
    }
}

/// An answer read to its end: its head, its message bytes and its trailers.
struct Whole {
    head: http::response::Parts,
    data: Bytes,
    trailers: Option<http::HeaderMap>,
}

impl Whole {
    /// For an answer of `UNAVAILABLE` (in the head of a trailers-only answer, or in the
    /// trailers), the instance's pushback if it gave one; `None` for any other answer.
    fn unavailable(&self) -> Option<Option<Duration>> {
        let headers = match &self.trailers {
            Some(trailers) if !self.head.headers.contains_key(GRPC_STATUS) => trailers,
            _ => &self.head.headers,
        };
        if headers.get(GRPC_STATUS)?.as_bytes() != b"14" {
            return None;
        }
        Some(
            headers
                .get(crate::door::PUSHBACK)
                .and_then(|v| v.to_str().ok())
                .and_then(crate::door::pushback_of),
        )
    }

    fn into_response(self) -> http::Response<Body> {
        let body = Prefixed {
            read: Some(self.data).filter(|b| !b.is_empty()),
            next: self.trailers.map(Frame::trailers),
            failed: None,
            rest: None,
        };
        http::Response::from_parts(self.head, Body::new(body))
    }
}

/// Reads `response` to its end: at most `limit` bytes of message (and its frame header).
async fn read_whole(response: Response, limit: usize) -> Result<Whole, CallError> {
    let (head, mut stream) = response.into_parts();
    let mut data = BytesMut::new();
    while let Some(chunk) = stream.data().await {
        let chunk = chunk?;
        let _ = stream.flow_control().release_capacity(chunk.len());
        if data.len() + chunk.len() > limit + FRAME_HEADER {
            return Err(CallError::TooLarge { limit });
        }
        data.extend_from_slice(&chunk);
    }
    let trailers = stream.trailers().await?;
    Ok(Whole {
        head,
        data: data.freeze(),
        trailers,
    })
}

/// The body's bytes when all of them, and its end, are ready now; otherwise the body, with what
/// was read of it put back in front.
fn whole_now(mut body: Body) -> Result<Bytes, Body> {
    let mut read = BytesMut::new();
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if body.is_end_stream() {
            return Ok(read.freeze());
        }
        match Pin::new(&mut body).poll_frame(&mut cx) {
            Poll::Ready(None) => return Ok(read.freeze()),
            Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => read.extend_from_slice(&data),
                Err(frame) => return Err(Body::new(Prefixed::new(read, Some(frame), body))),
            },
            Poll::Ready(Some(Err(status))) => {
                return Err(Body::new(Prefixed::failed(read, status)));
            }
            Poll::Pending => return Err(Body::new(Prefixed::new(read, None, body))),
        }
    }
}

/// A copy of `template`'s head: method, path, metadata and extensions.
fn copy(template: &http::Request<()>) -> http::request::Parts {
    let mut request = http::Request::new(());
    *request.method_mut() = template.method().clone();
    *request.uri_mut() = template.uri().clone();
    *request.version_mut() = template.version();
    *request.headers_mut() = template.headers().clone();
    *request.extensions_mut() = template.extensions().clone();
    request.into_parts().0
}

/// A body whose first bytes (and perhaps a frame after them) were read already.
struct Prefixed {
    read: Option<Bytes>,
    next: Option<Frame<Bytes>>,
    failed: Option<tonic::Status>,
    rest: Option<Body>,
}

impl Prefixed {
    fn new(read: BytesMut, next: Option<Frame<Bytes>>, rest: Body) -> Self {
        Self {
            read: Some(read.freeze()).filter(|b| !b.is_empty()),
            next,
            failed: None,
            rest: Some(rest),
        }
    }

    fn failed(read: BytesMut, status: tonic::Status) -> Self {
        Self {
            read: Some(read.freeze()).filter(|b| !b.is_empty()),
            next: None,
            failed: Some(status),
            rest: None,
        }
    }
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, tonic::Status>>> {
        if let Some(read) = self.read.take() {
            return Poll::Ready(Some(Ok(Frame::data(read))));
        }
        if let Some(next) = self.next.take() {
            return Poll::Ready(Some(Ok(next)));
        }
        if let Some(status) = self.failed.take() {
            return Poll::Ready(Some(Err(status)));
        }
        match self.rest.as_mut() {
            Some(rest) => Pin::new(rest).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_body_whole_at_once_is_one_frame_and_a_stream_keeps_every_byte_in_order() {
        let unary = Body::new(http_body_util::Full::new(Bytes::from_static(b"whole")));
        assert_eq!(whole_now(unary).ok(), Some(Bytes::from_static(b"whole")));
        assert_eq!(whole_now(Body::empty()).ok(), Some(Bytes::new()));

        // A client stream: one message now, the next later.
        let (tx, rx) =
            tokio::sync::mpsc::unbounded_channel::<Result<Frame<Bytes>, tonic::Status>>();
        tx.send(Ok(Frame::data(Bytes::from_static(b"first "))))
            .expect("open");
        let stream = Body::new(http_body_util::StreamBody::new(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        ));
        let Err(streaming) = whole_now(stream) else {
            panic!("a body still streaming was taken as whole");
        };
        tx.send(Ok(Frame::data(Bytes::from_static(b"then more"))))
            .expect("open");
        drop(tx);
        let all = streaming.collect().await.expect("read").to_bytes();
        assert_eq!(all, Bytes::from_static(b"first then more"));
    }
}
