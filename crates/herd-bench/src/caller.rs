//! The generator's side of a call: gRPC unary calls spoken straight on HTTP/2, the request
//! encoded once per run.
//!
//! An open loop must be able to offer more than its target can serve, on one core. tonic's client
//! (a buffer task, encoding and decoding each message) costs about 17 µs a call on this kind of
//! machine, more than a server spends refusing one, so at 8× a server's capacity the generator, not
//! the server, ran out of time. Here a call is a HEADERS and a DATA frame out, and the status read
//! from the answer's trailers; the answer's message is not decoded. A connection that fails is
//! dialled again by the next call that finds it broken. Over TLS ([`tls_connector`]) the same
//! calls go through rustls; a call marked [`Encoded::on_new_connection`] dials a connection of its
//! own, to measure what a connection costs.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use tonic::{Code, Status};

/// One call, encoded once: its path and its length-prefixed message.
#[derive(Debug, Clone)]
pub struct Encoded {
    path: &'static str,
    body: Bytes,
    authorization: Option<http::HeaderValue>,
    /// Each call dials, and closes, a connection of its own.
    fresh: bool,
}

impl Encoded {
    /// `message` framed as gRPC puts it on the wire (uncompressed, length-prefixed) for `path`.
    pub fn new(path: &'static str, message: &impl prost::Message) -> Self {
        Self {
            path,
            body: herd::client::frame(message),
            authorization: None,
            fresh: false,
        }
    }

    /// Each call made on a connection of its own, dialled for it (TCP, TLS when the caller
    /// speaks it, HTTP/2) and closed after it.
    pub fn on_new_connection(mut self) -> Self {
        self.fresh = true;
        self
    }

    /// The call sent with `authorization: <value>` (e.g. `Bearer <JWT>`).
    pub fn with_authorization(mut self, value: &str) -> anyhow::Result<Self> {
        // Indexed by HPACK like any repeated header, as gRPC clients send a token they reuse:
        // after the first call on a connection it costs a byte or two.
        self.authorization = Some(http::HeaderValue::from_str(value)?);
        Ok(self)
    }
}

/// One HTTP/2 connection to a target, shared by every call that goes round robin to it.
#[derive(Clone)]
pub struct Caller {
    target: Arc<str>,
    tls: Option<TlsConnector>,
    sender: Arc<std::sync::Mutex<Sender>>,
}

/// TLS to a target: rustls, the target's address as its server name.
#[derive(Clone)]
pub struct TlsConnector(tokio_rustls::TlsConnector);

impl std::fmt::Debug for TlsConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsConnector")
    }
}

/// A TLS 1.3 client (ALPN h2) trusting the CA certificates in `ca` (PEM), presenting the
/// certificate and key in `identity` when given.
pub fn tls_connector(
    ca: &std::path::Path,
    identity: Option<(&std::path::Path, &std::path::Path)>,
) -> anyhow::Result<TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_file_iter(cert)?.collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_file(key)?,
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsConnector(tokio_rustls::TlsConnector::from(Arc::new(
        config,
    ))))
}

#[derive(Clone)]
struct Sender {
    generation: u64,
    send: Option<h2::client::SendRequest<Bytes>>,
}

impl Caller {
    /// Connects to `target` (`host:port`), over TLS when `tls` is given.
    pub async fn connect(target: &str, tls: Option<TlsConnector>) -> anyhow::Result<Self> {
        let send = dial(target, tls.as_ref()).await?;
        Ok(Self {
            target: target.into(),
            tls,
            sender: Arc::new(std::sync::Mutex::new(Sender {
                generation: 0,
                send: Some(send),
            })),
        })
    }

    /// Makes `call` with a `timeout` deadline: `Ok` on `grpc-status: 0`, else the status the
    /// target answered, or the one a gRPC client reports for a transport failure.
    pub async fn call(&self, call: &Encoded, timeout: Duration) -> Result<(), Status> {
        let attempt = async {
            if !call.fresh {
                return self.attempt(call, timeout).await;
            }
            let send = dial(&self.target, self.tls.as_ref())
                .await
                .map_err(|e| Status::unavailable(format!("{}: {e}", self.target)))?;
            let send = send.ready().await.map_err(|e| from_h2(&e))?;
            self.exchange(send, call, timeout, || {}).await
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(result) => result,
            // Dropping the call's streams resets them (CANCEL), as a gRPC client does.
            Err(_) => Err(Status::cancelled("Timeout expired")),
        }
    }

    async fn attempt(&self, call: &Encoded, timeout: Duration) -> Result<(), Status> {
        let sender = self
            .sender
            .lock()
            .map(|s| s.clone())
            .map_err(|_| Status::internal("connection lock poisoned"))?;
        let Some(send) = sender.send else {
            self.redial(sender.generation);
            return Err(Status::unavailable(format!(
                "{}: reconnecting",
                self.target
            )));
        };
        let send = match send.ready().await {
            Ok(send) => send,
            Err(e) => {
                self.redial(sender.generation);
                return Err(from_h2(&e));
            }
        };
        self.exchange(send, call, timeout, || self.redial(sender.generation))
            .await
    }

    /// One call on `send`, ready; `broken` is told when the connection cannot take it.
    async fn exchange(
        &self,
        mut send: h2::client::SendRequest<Bytes>,
        call: &Encoded,
        timeout: Duration,
        broken: impl FnOnce(),
    ) -> Result<(), Status> {
        let mut request = http::Request::post(format!("http://{}{}", self.target, call.path))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("grpc-timeout", format!("{}m", timeout.as_millis()));
        if let Some(authorization) = &call.authorization {
            request = request.header(http::header::AUTHORIZATION, authorization.clone());
        }
        let request = request
            .body(())
            .map_err(|e| Status::internal(format!("request: {e}")))?;
        let (response, mut stream) = send.send_request(request, false).map_err(|e| {
            broken();
            from_h2(&e)
        })?;
        stream
            .send_data(call.body.clone(), true)
            .map_err(|e| from_h2(&e))?;
        let (parts, mut body) = response.await.map_err(|e| from_h2(&e))?.into_parts();
        if parts.status != http::StatusCode::OK {
            return Err(Status::unknown(format!("HTTP status {}", parts.status)));
        }
        if let Some(status) = Status::from_header_map(&parts.headers) {
            return settled(status);
        }
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| from_h2(&e))?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        match body.trailers().await.map_err(|e| from_h2(&e))? {
            Some(trailers) => match Status::from_header_map(&trailers) {
                Some(status) => settled(status),
                None => Err(Status::internal("trailers without grpc-status")),
            },
            None => Err(Status::internal("no trailers")),
        }
    }

    /// Dials again once for the connection of `generation`, in the background; calls fail fast
    /// with UNAVAILABLE until it is back.
    fn redial(&self, generation: u64) {
        let Ok(mut sender) = self.sender.lock() else {
            return;
        };
        if sender.generation != generation {
            return;
        }
        sender.generation += 1;
        sender.send = None;
        let (target, tls, slot, generation) = (
            self.target.clone(),
            self.tls.clone(),
            self.sender.clone(),
            generation + 1,
        );
        tokio::spawn(async move {
            loop {
                if let Ok(send) = dial(&target, tls.as_ref()).await {
                    if let Ok(mut sender) = slot.lock()
                        && sender.generation == generation
                    {
                        sender.send = Some(send);
                    }
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
}

fn settled(status: Status) -> Result<(), Status> {
    if status.code() == Code::Ok {
        Ok(())
    } else {
        Err(status)
    }
}

async fn dial(
    target: &str,
    tls: Option<&TlsConnector>,
) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let io = tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(target))
        .await
        .map_err(|_| anyhow::anyhow!("{target}: connect timed out"))??;
    io.set_nodelay(true)?;
    match tls {
        None => handshake(io).await,
        Some(tls) => {
            let host = target.rsplit_once(':').map_or(target, |(host, _)| host);
            let name = rustls::pki_types::ServerName::try_from(host.to_string())?;
            handshake(tls.0.connect(name, io).await?).await
        }
    }
}

/// HTTP/2 on `io`, its connection driven by a task of its own.
async fn handshake<T>(io: T) -> anyhow::Result<h2::client::SendRequest<Bytes>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 22)
        .handshake(io)
        .await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// The status a gRPC client reports for an HTTP/2 failure (as tonic maps them, but a graceful
/// GOAWAY is `UNAVAILABLE`: the call was not processed, and may go elsewhere).
fn from_h2(e: &h2::Error) -> Status {
    let code = match e.reason() {
        // A server going away gracefully: the call was not processed.
        Some(h2::Reason::NO_ERROR) if e.is_go_away() => Code::Unavailable,
        Some(h2::Reason::REFUSED_STREAM) => Code::Unavailable,
        Some(h2::Reason::CANCEL) => Code::Cancelled,
        Some(h2::Reason::ENHANCE_YOUR_CALM) => Code::ResourceExhausted,
        Some(h2::Reason::INADEQUATE_SECURITY) => Code::PermissionDenied,
        Some(_) => Code::Internal,
        None if e.is_io() => Code::Unavailable,
        None => Code::Unknown,
    };
    Status::new(code, format!("h2: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A health server that knows "" (SERVING) and nothing else, until `stop` is sent (or
    /// dropped): then it closes its connections and stops listening.
    async fn health(
        listener: tokio::net::TcpListener,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(tonic_health::server::health_reporter().1)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async move {
                        let _ = stopped.await;
                    },
                )
                .await;
        });
        (stop, server)
    }

    fn check(service: &str) -> Encoded {
        Encoded::new(
            "/grpc.health.v1.Health/Check",
            &tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            },
        )
    }

    #[tokio::test]
    async fn a_call_reports_the_status_the_server_answered() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let _server = health(listener).await;
        let caller = Caller::connect(&address, None).await.unwrap();
        let second = Duration::from_secs(1);
        caller.call(&check(""), second).await.unwrap();
        // Answered trailers-only, as tonic answers an error.
        let status = caller.call(&check("nope"), second).await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound, "{status:?}");
        assert_eq!(status.message(), "service not registered");
        let wrong = Encoded::new(
            "/grpc.health.v1.Health/Nope",
            &tonic_health::pb::HealthCheckRequest::default(),
        );
        let status = caller.call(&wrong, second).await.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
    }

    #[tokio::test]
    async fn a_connection_that_broke_is_dialled_again() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let (stop, server) = health(listener).await;
        let caller = Caller::connect(&address.to_string(), None).await.unwrap();
        let second = Duration::from_secs(1);
        caller.call(&check(""), second).await.unwrap();
        let _ = stop.send(());
        server.await.unwrap();
        let status = caller.call(&check(""), second).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        let _server = health(tokio::net::TcpListener::bind(address).await.unwrap()).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while caller.call(&check(""), second).await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never reconnected");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
