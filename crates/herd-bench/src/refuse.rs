//! The least a refusal can cost: an HTTP/2 server on `h2` alone (no hyper, no tonic, no task per
//! stream) that answers every call at once with a trailers-only `UNAVAILABLE`, in its
//! connection's own task, without reading the request's body.
//!
//! Its answers leave as herd's do: the first write after a flush waits one turn of the runtime,
//! so that the answers to every call read meanwhile leave in one write.
//!
//! Every Rust gRPC server — tonic's, herd's — sits on `h2`, so what this server spends per call
//! is the floor under what any of them can spend to say no: the kernel's loopback TCP, HTTP/2
//! framing, and HPACK (including the caller's `authorization` header, which HTTP/2 encoders send
//! as a literal on every call rather than index).

use std::io::IoSlice;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Answers every call on every connection `listener` accepts with `UNAVAILABLE`, until the
/// process ends.
pub async fn serve(listener: TcpListener) -> anyhow::Result<()> {
    let mut answer = http::HeaderMap::new();
    answer.insert(
        "content-type",
        http::HeaderValue::from_static("application/grpc"),
    );
    answer.insert("grpc-status", http::HeaderValue::from_static("14"));
    answer.insert("grpc-message", http::HeaderValue::from_static("overloaded"));
    loop {
        let (socket, _) = listener.accept().await?;
        socket.set_nodelay(true)?;
        let answer = answer.clone();
        tokio::spawn(async move {
            let handshake = h2::server::Builder::new()
                // As many streams at once as herd's servers allow.
                .max_concurrent_streams(herd::server::MAX_CONCURRENT_STREAMS)
                .handshake::<_, Bytes>(Batched {
                    socket,
                    waited: false,
                });
            let Ok(mut connection) = handshake.await else {
                return;
            };
            while let Some(Ok((request, mut respond))) = connection.accept().await {
                drop(request);
                let mut response = http::Response::new(());
                *response.headers_mut() = answer.clone();
                // The caller may have reset the stream already; nothing to answer then.
                let _ = respond.send_response(response, true);
            }
        });
    }
}

/// A connection whose first write after each flush waits one turn of the runtime.
struct Batched {
    socket: TcpStream,
    waited: bool,
}

impl Batched {
    fn poll_turn(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.waited {
            return Poll::Ready(());
        }
        self.waited = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl AsyncRead for Batched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_read(cx, buf)
    }
}

impl AsyncWrite for Batched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx));
        Pin::new(&mut self.socket).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_turn(cx));
        Pin::new(&mut self.socket).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.waited = false;
        Pin::new(&mut self.socket).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.socket).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;
    use tonic::Code;

    use crate::caller::{Caller, Encoded};

    #[tokio::test]
    async fn every_call_is_answered_unavailable() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(super::serve(listener));
        let caller = Caller::connect(&address, None).await.unwrap();
        let call = Encoded::new(
            "/grpc.health.v1.Health/Check",
            &tonic_health::pb::HealthCheckRequest::default(),
        );
        // Several on one connection: each answer leaves although the one before was batched.
        for _ in 0..3 {
            let status = caller
                .call(&call, Duration::from_secs(5))
                .await
                .unwrap_err();
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
            assert_eq!(status.message(), "overloaded");
        }
        server.abort();
    }
}
