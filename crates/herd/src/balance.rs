//! A client-side balanced channel to one service: power of two choices over peak-EWMA latency
//! (tower's p2c with `PeakEwmaDiscover`), fed by herd's own [`discovery`](crate::discovery).
//!
//! Every endpoint gets a connect timeout and HTTP/2 keepalive, so that a silent peer is noticed
//! instead of hanging its callers. With no endpoint known, calls fail at once with `UNAVAILABLE`.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::body::Body;
use tonic::transport::{Channel, Endpoint};
use tower::balance::p2c::Balance;
use tower::buffer::Buffer;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::util::BoxService;
use tower::{BoxError, Service};

use crate::discovery::Endpoints;

type Request = http::Request<Body>;
type Response = http::Response<Body>;

/// Latency assumed for an endpoint before it has answered anything.
const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// How fast peak-EWMA forgets a slow answer.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Calls queued in front of the balancer before callers wait for room.
const BUFFER: usize = 1024;
/// Bound on establishing a connection to one endpoint.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// HTTP/2 pings on idle connections notice a silent peer within interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A cloneable gRPC channel that balances each call over a service's live instances.
#[derive(Clone)]
pub struct MeshChannel {
    service: String,
    inner: Buffer<Request, BoxFuture<'static, Result<Response, BoxError>>>,
    endpoints: watch::Receiver<Endpoints>,
}

impl std::fmt::Debug for MeshChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshChannel")
            .field("service", &self.service)
            .finish()
    }
}

impl MeshChannel {
    /// A channel to `service` over the endpoint sets published by `endpoints`. Must be called from
    /// within a tokio runtime.
    pub fn new(service: &str, endpoints: watch::Receiver<Endpoints>) -> Self {
        let discover = EndpointDiscover {
            updates: WatchStream::new(endpoints.clone()),
            current: HashMap::new(),
            pending: VecDeque::new(),
        };
        let loaded = PeakEwmaDiscover::new(
            discover,
            DEFAULT_RTT,
            EWMA_DECAY,
            CompleteOnResponse::default(),
        );
        let balance: Balance<_, Request> = Balance::new(loaded);
        let inner = Buffer::new(BoxService::new(balance), BUFFER);
        Self {
            service: service.to_string(),
            inner,
            endpoints,
        }
    }

    /// The number of instances currently known.
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.borrow().len()
    }
}

impl Service<Request> for MeshChannel {
    type Response = Response;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        if self.endpoints.borrow().is_empty() {
            let status =
                tonic::Status::unavailable(format!("no live instance of {}", self.service));
            return Box::pin(async move { Err(Box::new(status) as BoxError) });
        }
        Box::pin(self.inner.call(req))
    }
}

/// Turns published endpoint sets into the insert/remove changes tower's balancer consumes. It only
/// holds the latest set, so it never blocks discovery while no calls flow.
struct EndpointDiscover {
    updates: WatchStream<Endpoints>,
    current: HashMap<String, String>,
    pending: VecDeque<Change<String, Channel>>,
}

impl EndpointDiscover {
    fn diff(&mut self, next: &Endpoints) {
        let gone: Vec<String> = self
            .current
            .keys()
            .filter(|id| !next.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.current.remove(&id);
            self.pending.push_back(Change::Remove(id));
        }
        for (id, info) in next.iter() {
            if self.current.get(id) == Some(&info.address) {
                continue;
            }
            match endpoint(&info.address) {
                Ok(ep) => {
                    self.current.insert(id.clone(), info.address.clone());
                    self.pending
                        .push_back(Change::Insert(id.clone(), ep.connect_lazy()));
                }
                Err(e) => {
                    tracing::warn!(instance = %id, address = %info.address, error = %e, "unusable endpoint address")
                }
            }
        }
    }
}

impl Stream for EndpointDiscover {
    type Item = Result<Change<String, Channel>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(change) = self.pending.pop_front() {
                return Poll::Ready(Some(Ok(change)));
            }
            match Pin::new(&mut self.updates).poll_next(cx) {
                Poll::Ready(Some(next)) => self.diff(&next),
                // The publisher is gone: keep serving the last known set.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The transport settings of every endpoint herd calls.
pub fn endpoint(address: &str) -> Result<Endpoint, tonic::transport::Error> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Resolver;
    use crate::keys::InstanceInfo;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    /// A real health server on a loopback port; returns its address.
    async fn health_server(name: &'static str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(name, tonic_health::ServingStatus::Serving)
            .await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        address
    }

    fn info(id: &str, address: &str) -> InstanceInfo {
        InstanceInfo {
            service: "probe".into(),
            instance_id: id.into(),
            address: address.into(),
            pid: 0,
            version: "test".into(),
        }
    }

    #[tokio::test]
    async fn spreads_calls_over_every_endpoint() {
        let a = health_server("a").await;
        let b = health_server("b").await;
        let resolver = Resolver::fixed([info("a", &a), info("b", &b)]);
        let mut client = HealthClient::new(MeshChannel::new("probe", resolver.subscribe()));
        let (mut on_a, mut on_b) = (0, 0);
        for _ in 0..200 {
            // Each server knows only its own name, so the answer tells which one served.
            if client
                .check(HealthCheckRequest {
                    service: "a".into(),
                })
                .await
                .is_ok()
            {
                on_a += 1;
            } else {
                on_b += 1;
            }
        }
        assert!(on_a > 20 && on_b > 20, "a={on_a} b={on_b}");
    }

    #[tokio::test]
    async fn no_endpoint_fails_fast_with_unavailable() {
        let resolver = Resolver::fixed([]);
        let mut client = HealthClient::new(MeshChannel::new("nothing", resolver.subscribe()));
        let started = std::time::Instant::now();
        let err = client
            .check(HealthCheckRequest::default())
            .await
            .expect_err("no endpoint");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(err.message().contains("nothing"), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
