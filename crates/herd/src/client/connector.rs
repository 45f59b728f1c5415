//! The transport under herd's HTTP/2 client: how a byte stream to an endpoint is opened. The
//! balancer and the HTTP/2 connection never see more than this trait, so that TLS, Unix sockets
//! or in-memory streams for tests plug in without touching them (as tonic's
//! `Endpoint::connect_with_connector` and h2's examples take any IO).

use std::time::Duration;

use futures::future::BoxFuture;
use http::uri::{Authority, Scheme};
use tokio::io::{AsyncRead, AsyncWrite};
use tower::BoxError;

/// A byte stream HTTP/2 can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// Opens byte streams to endpoints named by `host:port`.
pub trait Connector: Send + Sync + 'static {
    /// A new stream to `authority`, or why not (a refusal, a timeout, a failed handshake).
    fn connect(&self, authority: &Authority) -> BoxFuture<'static, Result<Box<dyn Io>, BoxError>>;

    /// The scheme requests over these streams carry (`http` in plaintext, `https` over TLS).
    fn scheme(&self) -> Scheme {
        Scheme::HTTP
    }
}

/// Bound on establishing a TCP connection to one endpoint.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Plaintext TCP with `TCP_NODELAY` (small gRPC messages must not wait for Nagle's algorithm),
/// within a connect timeout.
#[derive(Debug, Clone)]
pub struct TcpConnector {
    timeout: Duration,
}

impl Default for TcpConnector {
    fn default() -> Self {
        Self {
            timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }
}

impl TcpConnector {
    /// A connector that gives up on a connection after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl Connector for TcpConnector {
    fn connect(&self, authority: &Authority) -> BoxFuture<'static, Result<Box<dyn Io>, BoxError>> {
        let address = authority.to_string();
        let timeout = self.timeout;
        Box::pin(async move {
            let tcp = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&address))
                .await
                .map_err(|_| format!("connecting to {address} took longer than {timeout:?}"))??;
            tcp.set_nodelay(true)?;
            Ok(Box::new(tcp) as Box<dyn Io>)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_connection_that_is_not_accepted_in_time_fails_after_the_connect_timeout() {
        // A listener that never accepts, its queue full: further handshakes go unanswered.
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = socket.listen(0).unwrap();
        let address = listener.local_addr().unwrap();
        let mut queued = Vec::new();
        for _ in 0..4 {
            let attempt = tokio::net::TcpStream::connect(address);
            if let Ok(Ok(stream)) = tokio::time::timeout(Duration::from_millis(200), attempt).await
            {
                queued.push(stream);
            }
        }
        let authority: Authority = address.to_string().parse().unwrap();
        let started = std::time::Instant::now();
        let failed = TcpConnector::default()
            .connect(&authority)
            .await
            .err()
            .expect("no connection");
        let waited = started.elapsed();
        assert!(
            failed.to_string().contains("took longer than 1s"),
            "{failed}"
        );
        assert!(
            waited >= DEFAULT_CONNECT_TIMEOUT && waited < DEFAULT_CONNECT_TIMEOUT * 2,
            "{waited:?}"
        );
        drop(listener);
    }
}
