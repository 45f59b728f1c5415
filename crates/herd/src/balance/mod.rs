//! A client-side balanced channel to one service: power of two choices over peak-EWMA latency
//! (tower's p2c with `PeakEwmaDiscover`), fed by herd's own [`discovery`](crate::discovery).
//!
//! Every discovered endpoint is probed with a `grpc.health.v1.Health/Watch` stream over the same
//! connection its calls use. Only endpoints whose watch says SERVING are offered to the balancer:
//! one that reports NOT_SERVING (draining), whose connection breaks (killed), or whose HTTP/2
//! keepalive goes unanswered (a silent peer) leaves the balancer at once, and is probed back in
//! with jittered backoff for as long as discovery lists it.
//!
//! A call never waits for an endpoint that cannot come (gRPC's wait-for-ready=false): while
//! discovery has not answered yet, or some endpoint is still making its first connection, it
//! waits (within its deadline); once no instance is registered, or every known one has failed
//! (NOT_SERVING or unreachable), it fails at once with `UNAVAILABLE` naming the service and why.
//!
//! Parts: `pool` (the probers and each endpoint's state), `discover` (endpoint states as the
//! balancer's changes), `trial` (a new endpoint takes one call until it is measured).

mod discover;
mod pool;
pub mod subset;
mod trial;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tonic::body::Body;
use tower::balance::p2c::Balance;
use tower::load::TrackCompletion;
use tower::{BoxError, Service};

use crate::client::connection::{Request, Response};
use crate::client::{Connector, DEFAULT_MAX_RESPONSE, RetryBudget, TcpConnector};
use crate::discovery::Discovered;
use crate::error::CallError;
use discover::EndpointDiscover;
use pool::{Pool, State, Subsetting, hopeless, track};

/// How fast peak-EWMA forgets a slow answer.
const EWMA_DECAY: Duration = Duration::from_secs(10);

/// tower's power-of-two-choices balancer over peak-EWMA-weighted endpoint connections.
type Balancer = Balance<EndpointDiscover, Request>;

/// A cloneable gRPC channel that balances each call over a service's live, serving instances.
///
/// The balancer is shared behind an async lock rather than a queue with a worker task: each
/// caller picks its endpoint itself (holding the lock only while an endpoint is chosen, never
/// while the call is in flight), and writes the call straight into that endpoint's HTTP/2
/// connection. No task hop between the caller and the connection.
///
/// Clones share everything (one reference count), so a clone per call costs next to nothing.
#[derive(Clone)]
pub struct MeshChannel {
    inner: Arc<Shared>,
}

struct Shared {
    service: Arc<str>,
    balancer: tokio::sync::Mutex<Balancer>,
    /// Set while a call (holding `balancer`) waits for an endpoint: the balancer's discovery
    /// then registers it for news of endpoints.
    waiting: Arc<AtomicBool>,
    discovered: watch::Receiver<Discovered>,
    pool: watch::Receiver<Pool>,
    budget: RetryBudget,
    max_response: usize,
    /// Sent with every call that carries none of its own.
    authorization: Option<Authorization>,
}

impl std::fmt::Debug for MeshChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshChannel")
            .field("service", &self.inner.service)
            .finish()
    }
}

impl MeshChannel {
    /// A channel to `service` over the endpoint sets published by `endpoints`, over plaintext TCP
    /// with the default limits (see [`MeshChannel::builder`] for others). Must be called from
    /// within a tokio runtime; the probing stops when every clone is dropped.
    pub fn new(service: &str, endpoints: watch::Receiver<Discovered>) -> Self {
        Self::builder(service).build(endpoints)
    }

    /// A channel to `service` with settings of its own: its transport, its response size limit.
    pub fn builder(service: &str) -> ChannelBuilder {
        ChannelBuilder {
            service: service.into(),
            connector: Arc::new(TcpConnector::default()),
            max_response: DEFAULT_MAX_RESPONSE,
            subsetting: None,
            authorization: None,
        }
    }

    /// The largest response message accepted, in bytes.
    pub fn max_response(&self) -> usize {
        self.inner.max_response
    }

    /// The number of instances discovered.
    pub fn endpoint_count(&self) -> usize {
        self.inner
            .discovered
            .borrow()
            .as_ref()
            .map_or(0, |e| e.len())
    }

    /// The instance ids this channel connects to (its subset, and any it refilled from), in any
    /// state.
    pub fn connected_instances(&self) -> Vec<String> {
        self.inner.pool.borrow().endpoints.keys().cloned().collect()
    }

    /// The instance ids currently offered to the balancer (discovered and SERVING).
    pub fn ready_instances(&self) -> Vec<String> {
        ready_of(&self.inner.pool.borrow())
    }

    /// Follows the instance ids offered to the balancer as they change.
    pub fn subscribe_ready(&self) -> watch::Receiver<Vec<String>> {
        let (tx, rx) = watch::channel(self.ready_instances());
        let mut pool = self.inner.pool.clone();
        tokio::spawn(async move {
            while pool.changed().await.is_ok() {
                let ready = ready_of(&pool.borrow_and_update());
                tx.send_if_modified(|r| {
                    let changed = *r != ready;
                    *r = ready;
                    changed
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        rx
    }

    /// The retry budget shared by every call over this channel.
    pub fn budget(&self) -> &RetryBudget {
        &self.inner.budget
    }
}

impl MeshChannel {
    /// Sends `request` to an endpoint the balancer picks; resolves once the response's head
    /// arrives.
    /// Fails at once with `UNAVAILABLE` when no endpoint can serve (see the module docs).
    pub(crate) async fn send(&self, mut request: Request) -> Result<Response, CallError> {
        let shared = &self.inner;
        if let Some(authorization) = &shared.authorization {
            let headers = &mut request.head.headers;
            if !headers.contains_key(http::header::AUTHORIZATION) {
                headers.insert(http::header::AUTHORIZATION, authorization.get());
            }
        }
        let response = {
            let mut balancer = shared.balancer.lock().await;
            // The common case costs one poll: an endpoint is ready.
            let now = std::future::poll_fn(|cx| Poll::Ready(balancer.poll_ready(cx))).await;
            let ready = match now {
                Poll::Ready(ready) => ready,
                Poll::Pending => {
                    let mut pool = shared.pool.clone();
                    let _waiting = Waiting::new(&shared.waiting);
                    tokio::select! {
                        biased;
                        ready = std::future::poll_fn(|cx| balancer.poll_ready(cx)) => ready,
                        // Nothing is ready and nothing more may come: do not wait for the deadline.
                        error = hopeless(&mut pool, &shared.service) => return Err(error),
                    }
                }
            };
            ready.map_err(|e| CallError::not_sent(&shared.service, &*e))?;
            balancer.call(request)
        };
        response
            .await
            .map_err(|e| CallError::not_sent(&shared.service, &*e))
    }
}

/// Marks a call as waiting for an endpoint (see [`Shared::waiting`]) until dropped.
struct Waiting<'a>(&'a AtomicBool);

impl<'a> Waiting<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Relaxed);
        Self(flag)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Generated tonic clients over the balanced channel; their unary calls are retried as herd's own
/// are (see [`client::call`](crate::client::call)).
impl Service<http::Request<Body>> for MeshChannel {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    /// Always ready: each call waits for an endpoint itself, within its own deadline.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let channel = self.clone();
        Box::pin(async move {
            match crate::client::generated::send(&channel, request).await {
                Ok(response) => Ok(response),
                Err(e) => Err(Box::new(tonic::Status::from(e)) as BoxError),
            }
        })
    }
}

/// The least and most an instance that shed a call counts as busy for, in the balancer's eyes.
const SHED_PENALTY_MIN: Duration = Duration::from_millis(10);
const SHED_PENALTY_MAX: Duration = Duration::from_millis(250);

/// Completes a call's load measurement when its response's head arrives, as tower's
/// `CompleteOnResponse` does — except for a call the instance shed (`UNAVAILABLE` with a
/// pushback): a fast refusal would make it look like the least loaded instance and draw more
/// calls to it. Its measurement is held open for twice the pushback, so peak-EWMA counts it as a
/// call that long, and in flight meanwhile: p2c sends it less until it serves again.
#[derive(Debug, Clone, Copy, Default)]
struct PenalizeShed;

impl<H: Send + 'static> TrackCompletion<H, Response> for PenalizeShed {
    type Output = Response;

    fn track_completion(&self, handle: H, response: Response) -> Response {
        if let Some(hold) = shed_penalty(&response) {
            tokio::spawn(async move {
                tokio::time::sleep(hold).await;
                drop(handle);
            });
        }
        response
    }
}

/// How long the balancer counts `response` as a call still in flight: `None` for an answer, twice
/// the pushback (bounded) for a shed call.
fn shed_penalty(response: &Response) -> Option<Duration> {
    let pushback = shed_pushback(response.headers())?;
    Some((pushback * 2).clamp(SHED_PENALTY_MIN, SHED_PENALTY_MAX))
}

/// The pushback of a shed call's trailers-only response: `grpc-status` 14 and
/// `grpc-retry-pushback-ms`.
fn shed_pushback(headers: &http::HeaderMap) -> Option<Duration> {
    if headers.get(crate::client::unary::GRPC_STATUS)?.as_bytes() != b"14" {
        return None;
    }
    crate::door::pushback_of(headers.get(crate::door::PUSHBACK)?.to_str().ok()?)
}

/// How many endpoints in `pool` are SERVING.
fn ready_count(pool: &Pool) -> usize {
    pool.endpoints
        .values()
        .filter(|state| matches!(state, State::Serving(_)))
        .count()
}

/// The instance ids of the endpoints in `pool` that are SERVING.
fn ready_of(pool: &Pool) -> Vec<String> {
    pool.endpoints
        .iter()
        .filter(|(_, state)| matches!(state, State::Serving(_)))
        .map(|(id, _)| id.clone())
        .collect()
}

/// An `authorization` value (for example `Bearer <token>`) that channels send with their calls,
/// replaceable while they run (a token refreshed before it expires); reading it takes no lock.
#[derive(Clone)]
pub struct Authorization(Arc<arc_swap::ArcSwap<http::HeaderValue>>);

impl std::fmt::Debug for Authorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorization(..)")
    }
}

impl Authorization {
    /// `value` in force until [`Authorization::set`] replaces it; marked sensitive (never
    /// indexed by HPACK, never printed).
    pub fn new(value: http::HeaderValue) -> Self {
        Self(Arc::new(arc_swap::ArcSwap::from_pointee(sensitive(value))))
    }

    /// The value in force.
    pub fn get(&self) -> http::HeaderValue {
        http::HeaderValue::clone(&self.0.load())
    }

    /// Replaces the value for every call sent from now on.
    pub fn set(&self, value: http::HeaderValue) {
        self.0.store(Arc::new(sensitive(value)));
    }
}

fn sensitive(mut value: http::HeaderValue) -> http::HeaderValue {
    value.set_sensitive(true);
    value
}

/// A [`MeshChannel`] with settings of its own.
#[derive(Clone)]
pub struct ChannelBuilder {
    service: String,
    connector: Arc<dyn Connector>,
    max_response: usize,
    subsetting: Option<Subsetting>,
    authorization: Option<Authorization>,
}

impl std::fmt::Debug for ChannelBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChannelBuilder")
            .field("service", &self.service)
            .field("max_response", &self.max_response)
            .finish()
    }
}

impl ChannelBuilder {
    /// Opens connections with `connector` (TLS, Unix sockets, in-memory streams for tests)
    /// instead of plaintext TCP.
    pub fn connector(mut self, connector: impl Connector) -> Self {
        self.connector = Arc::new(connector);
        self
    }

    /// Accepts responses of up to `bytes` (default [`DEFAULT_MAX_RESPONSE`], 4 MiB); a larger one
    /// fails its call with `RESOURCE_EXHAUSTED`.
    pub fn max_response_bytes(mut self, bytes: usize) -> Self {
        self.max_response = bytes;
        self
    }

    /// Connects to a subset of `size` of the service's instances (0: all), chosen for the caller
    /// `own` among the instances of its own service that `peers` publishes (see [`subset`]).
    /// Without it, the channel connects to every instance discovered.
    pub fn subset(mut self, own: &str, peers: watch::Receiver<Discovered>, size: usize) -> Self {
        self.subsetting = Some(Subsetting {
            own: own.to_string(),
            peers: Some(peers),
            size,
        });
        self
    }

    /// Connects to a subset of `size` of the service's instances (0: all): those that follow
    /// `own` round the ring of [`subset`], for a caller that has no peers to rank among (one
    /// outside the mesh). Many such callers, with random ids, spread over every instance.
    pub fn subset_alone(mut self, own: &str, size: usize) -> Self {
        self.subsetting = Some(Subsetting {
            own: own.to_string(),
            peers: None,
            size,
        });
        self
    }

    /// Sends `authorization`'s value (for example `Bearer <token>`) with every call that carries
    /// none of its own: the value in force when the call is sent.
    pub fn authorization(mut self, authorization: Authorization) -> Self {
        self.authorization = Some(authorization);
        self
    }

    /// The channel, over the endpoint sets published by `endpoints`. Must be called from within
    /// a tokio runtime; the probing stops when every clone is dropped.
    pub fn build(self, endpoints: watch::Receiver<Discovered>) -> MeshChannel {
        let (pool_tx, pool) = watch::channel(Pool::default());
        tokio::spawn(track(
            self.service.clone(),
            self.connector,
            endpoints.clone(),
            self.subsetting,
            pool_tx,
        ));
        let waiting = Arc::new(AtomicBool::new(false));
        let loaded = EndpointDiscover::new(pool.clone(), waiting.clone());
        let channel = MeshChannel {
            inner: Arc::new(Shared {
                service: self.service.into(),
                balancer: tokio::sync::Mutex::new(Balance::new(loaded)),
                waiting,
                discovered: endpoints,
                pool,
                budget: RetryBudget::default(),
                max_response: self.max_response,
                authorization: self.authorization,
            }),
        };
        let observed = Arc::downgrade(&channel.inner);
        crate::metrics::watch_channel(move || {
            let shared = observed.upgrade()?;
            let channel = MeshChannel { inner: shared };
            Some(crate::metrics::ChannelState {
                service: channel.inner.service.clone(),
                endpoints: channel.endpoint_count(),
                ready: ready_count(&channel.inner.pool.borrow()),
                budget: channel.inner.budget.tokens(),
            })
        });
        channel
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::discovery::Resolver;
    use crate::instance::InstanceInfo;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    /// A real health server on a loopback port; returns its address.
    pub(crate) async fn health_server(name: &'static str) -> String {
        health_server_reporting(name, tonic_health::ServingStatus::Serving).await
    }

    /// A real health server whose "", `name` and "probe" (the service the tests' channels call)
    /// report `status`; returns its address.
    async fn health_server_reporting(
        name: &'static str,
        status: tonic_health::ServingStatus,
    ) -> String {
        health_server_reported(name, status).await.0
    }

    /// As [`health_server_reporting`], with the reporter, to change the status later.
    async fn health_server_reported(
        name: &'static str,
        status: tonic_health::ServingStatus,
    ) -> (String, tonic_health::server::HealthReporter) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, service) = tonic_health::server::health_reporter();
        for service in [name, "", "probe"] {
            reporter.set_service_status(service, status).await;
        }
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (address, reporter)
    }

    /// Makes `times` health Checks over `client`, each of which must be served.
    async fn check_times(client: &mut HealthClient<MeshChannel>, times: usize) {
        for _ in 0..times {
            client
                .check(HealthCheckRequest::default())
                .await
                .expect("served");
        }
    }

    /// Eight callers at once, each making 50 health Checks of `service` over `channel`: how many
    /// were answered and how many refused.
    async fn eight_callers(channel: &MeshChannel, service: &str) -> (usize, usize) {
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let mut client = HealthClient::new(channel.clone());
                let service = service.to_string();
                tokio::spawn(async move {
                    let mut answered = 0;
                    for _ in 0..50 {
                        let request = HealthCheckRequest {
                            service: service.clone(),
                        };
                        answered += usize::from(client.check(request).await.is_ok());
                    }
                    answered
                })
            })
            .collect();
        let mut answered = 0;
        for caller in callers {
            answered += caller.await.expect("caller");
        }
        (answered, 8 * 50 - answered)
    }

    /// Waits (5 s at most) until `ready` lists `count` endpoints.
    async fn until_ready(ready: &mut watch::Receiver<Vec<String>>, count: usize) {
        tokio::time::timeout(Duration::from_secs(5), ready.wait_for(|r| r.len() == count))
            .await
            .unwrap_or_else(|_| panic!("{count} endpoints ready in time"))
            .expect("the channel lives");
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

    #[tokio::test(flavor = "multi_thread")]
    async fn spreads_calls_over_every_endpoint() {
        let a = health_server("a").await;
        let b = health_server("b").await;
        let resolver = Resolver::fixed([info("a", &a), info("b", &b)]);
        let channel = MeshChannel::new("probe", resolver.subscribe());
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 2).await;
        // Eight callers at once: p2c weighs each endpoint's latency by the calls it has in
        // flight, so concurrent calls spread. (One caller at a time would try each endpoint
        // once, then stay mostly on whichever answered faster.) Each server knows only its own
        // name, so asking after "a" tells which one served.
        let (on_a, on_b) = eight_callers(&channel, "a").await;
        // Each endpoint serves a share; not an even one: one slow answer (this test shares two
        // cores with the rest of the suite) weighs on an endpoint's latency for the whole run,
        // and p2c rightly prefers the other — once seen at 391 to 9. Both must serve more than
        // their first (trial) call.
        assert!(on_a >= 5 && on_b >= 5, "a={on_a} b={on_b}");
    }

    /// Six instances of "probe" and three callers: the subsets of size two of caller `g1`.
    fn six_for_three() -> (Vec<String>, Resolver, subset::Subset) {
        let callees: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
        let peers = Resolver::fixed(["g0", "g1", "g2"].map(|g| info(g, "127.0.0.1:1")));
        let subset = subset::subset(
            "g1",
            ["g0", "g1", "g2"],
            callees.iter().map(String::as_str),
            2,
        );
        (callees, peers, subset)
    }

    #[tokio::test]
    async fn a_caller_connects_to_its_subset_and_no_more() {
        let (callees, peers, subset) = six_for_three();
        let mut endpoints = Vec::new();
        for id in &callees {
            endpoints.push(info(id, &health_server("probe").await));
        }
        let resolver = Resolver::fixed(endpoints);
        let channel = MeshChannel::builder("probe")
            .subset("g1", peers.subscribe(), 2)
            .build(resolver.subscribe());
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 2).await;
        let mut client = HealthClient::new(channel.clone());
        check_times(&mut client, 20).await;
        let mut members = subset.members().to_vec();
        members.sort();
        assert_eq!(channel.connected_instances(), members);
        assert_eq!(channel.ready_instances(), members);
        assert_eq!(channel.endpoint_count(), 6);
    }

    #[tokio::test]
    async fn a_subset_whose_members_died_refills_from_the_rest_at_once() {
        let (callees, peers, subset) = six_for_three();
        // The subset's two members are registered but dead; the others serve.
        let mut endpoints = Vec::new();
        for id in &callees {
            let address = if subset.members().contains(id) {
                closed_port().await
            } else {
                health_server("probe").await
            };
            endpoints.push(info(id, &address));
        }
        let resolver = Resolver::fixed(endpoints);
        let channel = MeshChannel::builder("probe")
            .subset("g1", peers.subscribe(), 2)
            .build(resolver.subscribe());
        let mut client = HealthClient::new(channel.clone());
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            client.check(HealthCheckRequest::default()),
        )
        .await
        .expect("answered in time");
        assert!(answer.is_ok(), "{answer:?}");
        // Refilled with the next two in the caller's order, which serve; the dead are still
        // probed, and nothing beyond.
        let mut expected = subset.order[..4].to_vec();
        expected.sort();
        assert_eq!(channel.connected_instances(), expected);
        let mut refill = subset.order[2..4].to_vec();
        refill.sort();
        assert_eq!(channel.ready_instances(), refill);
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
        assert_eq!(err.message(), "nothing: no instance registered");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// An address where nothing listens.
    async fn closed_port() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().to_string()
    }

    #[tokio::test]
    async fn known_endpoints_that_all_failed_fail_calls_at_once_saying_why() {
        let draining = health_server_reporting("a", tonic_health::ServingStatus::NotServing).await;
        let gone = closed_port().await;
        let resolver = Resolver::fixed([info("a", &draining), info("b", &gone)]);
        let channel = MeshChannel::new("probe", resolver.subscribe());
        let mut client = HealthClient::new(channel.clone());
        let started = std::time::Instant::now();
        let err = client
            .check(HealthCheckRequest::default())
            .await
            .expect_err("nothing serves");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message().starts_with(
                "probe: 2 instances known, none serving (1 not serving; 1 unreachable:"
            ),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(channel.ready_instances().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_endpoint_that_reports_not_serving_leaves_the_balancer_and_comes_back() {
        let (a, reporter) = health_server_reported("a", tonic_health::ServingStatus::Serving).await;
        let b = health_server("b").await;
        // Registered all along: only its health changes.
        let resolver = Resolver::fixed([info("a", &a), info("b", &b)]);
        let channel = MeshChannel::new("probe", resolver.subscribe());
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 2).await;
        reporter
            .set_service_status("probe", tonic_health::ServingStatus::NotServing)
            .await;
        until_ready(&mut ready, 1).await;
        assert_eq!(channel.ready_instances(), ["b"]);
        // Every call goes to the other endpoint.
        let (on_a, answered_by_b) = eight_callers(&channel, "a").await;
        assert_eq!((on_a, answered_by_b), (0, 400));
        reporter
            .set_service_status("probe", tonic_health::ServingStatus::Serving)
            .await;
        until_ready(&mut ready, 2).await;
    }

    /// A health server that answers every call after `delay`: a slow endpoint.
    async fn slow_health_server(name: &'static str, delay: Duration) -> String {
        #[derive(Clone)]
        struct Slow<S>(S, Duration);
        impl<S, B> tower::Service<http::Request<B>> for Slow<S>
        where
            S: tower::Service<http::Request<B>> + Clone + Send + 'static,
            S::Future: Send,
            B: Send + 'static,
        {
            type Response = S::Response;
            type Error = S::Error;
            type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;
            fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
                self.0.poll_ready(cx)
            }
            fn call(&mut self, request: http::Request<B>) -> Self::Future {
                let answer = self.0.call(request);
                let delay = self.1;
                Box::pin(async move {
                    tokio::time::sleep(delay).await;
                    answer.await
                })
            }
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, service) = tonic_health::server::health_reporter();
        for service in [name, "", "probe"] {
            reporter
                .set_service_status(service, tonic_health::ServingStatus::Serving)
                .await;
        }
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::layer::layer_fn(move |s| Slow(s, delay)))
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        std::mem::forget(reporter);
        address
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn peak_ewma_sends_most_calls_to_the_faster_endpoint() {
        let fast = health_server("fast").await;
        let slow = slow_health_server("slow", Duration::from_millis(40)).await;
        let resolver = Resolver::fixed([info("fast", &fast), info("slow", &slow)]);
        let channel = MeshChannel::new("probe", resolver.subscribe());
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 2).await;
        let (on_fast, on_slow) = eight_callers(&channel, "fast").await;
        // Power of two choices between the two, each weighed by its latency times the calls it
        // has in flight: the one 40 ms slower draws few (a trial call, and a few while the fast
        // one is busy with all eight callers).
        assert!(on_fast >= 8 * on_slow, "fast={on_fast} slow={on_slow}");
    }

    #[tokio::test]
    async fn a_call_waits_while_an_endpoint_is_still_connecting() {
        // Accepts connections and never says a word: the first connection is neither up nor
        // failed until keepalive gives up on it.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        let resolver = Resolver::fixed([info("s", &silent)]);
        let mut client = HealthClient::new(MeshChannel::new("probe", resolver.subscribe()));
        let waited = tokio::time::timeout(
            Duration::from_millis(300),
            client.check(HealthCheckRequest::default()),
        )
        .await;
        assert!(
            waited.is_err(),
            "a call did not wait for a connecting endpoint: {waited:?}"
        );
        let err = tokio::time::timeout(
            Duration::from_secs(5),
            client.check(HealthCheckRequest::default()),
        )
        .await
        .expect("fails once the endpoint is found silent")
        .expect_err("nothing serves");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message()
                .starts_with("probe: 1 instance known, none serving (1 unreachable"),
            "{err:?}"
        );
    }

    /// Endpoints in memory: each address names a health server fed by in-memory streams.
    #[derive(Clone, Default)]
    struct InMemory(
        Arc<
            std::sync::Mutex<
                std::collections::HashMap<
                    String,
                    tokio::sync::mpsc::UnboundedSender<tokio::io::DuplexStream>,
                >,
            >,
        >,
    );

    impl InMemory {
        /// A health server at `address` that knows the service `name` only.
        async fn serve(&self, address: &str, name: &'static str) {
            let (streams, incoming) = tokio::sync::mpsc::unbounded_channel();
            self.0.lock().unwrap().insert(address.into(), streams);
            let (reporter, service) = tonic_health::server::health_reporter();
            for service in [name, "probe"] {
                reporter
                    .set_service_status(service, tonic_health::ServingStatus::Serving)
                    .await;
            }
            let incoming = tokio_stream::StreamExt::map(
                tokio_stream::wrappers::UnboundedReceiverStream::new(incoming),
                Ok::<_, std::io::Error>,
            );
            tokio::spawn(
                tonic::transport::Server::builder()
                    .add_service(service)
                    .serve_with_incoming(incoming),
            );
        }
    }

    impl Connector for InMemory {
        fn connect(
            &self,
            authority: &http::uri::Authority,
        ) -> BoxFuture<'static, Result<Box<dyn crate::client::Io>, BoxError>> {
            let server = self.0.lock().unwrap().get(authority.as_str()).cloned();
            Box::pin(async move {
                let server = server.ok_or("nothing listens there")?;
                let (client, far_end) = tokio::io::duplex(64 * 1024);
                server.send(far_end).map_err(|_| "the server is gone")?;
                Ok(Box::new(client) as Box<dyn crate::client::Io>)
            })
        }
    }

    #[tokio::test]
    async fn any_transport_plugs_in_without_touching_the_balancer() {
        let memory = InMemory::default();
        memory.serve("a.memory:1", "a").await;
        memory.serve("b.memory:1", "b").await;
        let resolver = Resolver::fixed([info("a", "a.memory:1"), info("b", "b.memory:1")]);
        let channel = MeshChannel::builder("probe")
            .connector(memory)
            .build(resolver.subscribe());
        // Ready means each endpoint answered a health watch over a connection the connector made.
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 2).await;
        let mut ready = channel.ready_instances();
        ready.sort();
        assert_eq!(ready, ["a", "b"]);
        // And calls go the same way.
        let answer = HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await
            .expect("served in memory");
        assert_eq!(
            answer.into_inner().status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }

    /// A tax service that answers every call with the same ten taxes.
    struct FixedTax;

    #[tonic::async_trait]
    impl herd_proto::tax::tax_service_server::TaxService for FixedTax {
        async fn compute_tax(
            &self,
            _: tonic::Request<herd_proto::tax::ComputeTaxRequest>,
        ) -> Result<tonic::Response<herd_proto::tax::ComputeTaxResponse>, tonic::Status> {
            let tax = herd_proto::types::Money {
                currency_code: "USD".into(),
                minor_units: 1,
            };
            Ok(tonic::Response::new(herd_proto::tax::ComputeTaxResponse {
                taxes: vec![tax; 10],
                rate_bps: 725,
            }))
        }
    }

    #[tokio::test]
    async fn a_response_larger_than_the_channel_accepts_is_refused() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("tax", tonic_health::ServingStatus::Serving)
            .await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .add_service(herd_proto::tax::tax_service_server::TaxServiceServer::new(
                    FixedTax,
                ))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let resolver = Resolver::fixed([info("t", &address)]);
        let request = herd_proto::tax::ComputeTaxRequest::default();
        let deadline = crate::Deadline::after(Duration::from_secs(5));
        let small = MeshChannel::builder("tax")
            .max_response_bytes(16)
            .build(resolver.subscribe());
        let error =
            crate::client::call(deadline, &small, herd_proto::methods::COMPUTE_TAX, &request)
                .await
                .expect_err("ten taxes take more than 16 bytes");
        assert_eq!(error.code(), tonic::Code::ResourceExhausted, "{error}");
        assert_eq!(small.max_response(), 16);
        let roomy = MeshChannel::new("tax", resolver.subscribe());
        let answer =
            crate::client::call(deadline, &roomy, herd_proto::methods::COMPUTE_TAX, &request)
                .await
                .expect("the default limit is 4 MiB");
        assert_eq!(answer.taxes.len(), 10);
    }

    #[tokio::test]
    async fn an_endpoint_registered_as_another_service_is_never_offered() {
        // A live health server that knows "tax" only, listed as an instance of "pricing".
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("tax", tonic_health::ServingStatus::Serving)
            .await;
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let resolver = Resolver::fixed([info("wrong", &address)]);
        let channel = MeshChannel::new("pricing", resolver.subscribe());
        let err = HealthClient::new(channel.clone())
            .check(HealthCheckRequest::default())
            .await
            .expect_err("nothing serves pricing");
        assert_eq!(err.code(), tonic::Code::Unavailable);
        assert!(
            err.message()
                .starts_with("pricing: 1 instance known, none serving (1 unreachable"),
            "{err:?}"
        );
        assert!(channel.ready_instances().is_empty());
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn an_instance_that_sheds_is_sent_less_not_more() {
        let good = health_server("good").await;
        let (shedding, shed) = checked_server(Checks::Shed).await;
        let resolver = Resolver::fixed([info("good", &good), info("shedding", &shedding)]);
        let channel = MeshChannel::new("probe", resolver.subscribe());
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 2).await;
        let (_, refused) = eight_callers(&channel, "").await;
        // A refusal is fast: counted as a fast answer it would draw most calls. Counted as
        // load, it draws few (attempts, retries included).
        let shed = shed.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            shed < 60,
            "{shed} attempts of 400 calls went to the instance that sheds"
        );
        // (Each refused call is one the budget or the attempts left no retry for: how many
        // depends on how the first calls fall, so the count of retries is proved by the next
        // test, where it is exact.)
        assert!(refused <= shed, "{refused} refused, {shed} shed");
    }

    #[tokio::test]
    async fn a_generated_clients_calls_are_retried_as_herds_own_within_the_budget() {
        // Every attempt is shed: ten calls make 13 attempts, as gRPC A6's budget allows (the
        // same count as `client::tests::the_budget_stops_retry_storms`), each failing with the
        // instance's status.
        let (shedding, attempts) = checked_server(Checks::Shed).await;
        let resolver = Resolver::fixed([info("shedding", &shedding)]);
        let channel = MeshChannel::new("probe", resolver.subscribe());
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 1).await;
        let mut client = HealthClient::new(channel.clone());
        for _ in 0..10 {
            let err = client
                .check(HealthCheckRequest::default())
                .await
                .expect_err("shed");
            assert_eq!(
                (err.code(), err.message()),
                (tonic::Code::Unavailable, "overloaded")
            );
        }
        assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 13);
    }

    #[tokio::test]
    async fn a_channels_authorization_goes_with_every_call_that_has_none() {
        let (address, _) = checked_server(Checks::EchoAuthorization).await;
        let resolver = Resolver::fixed([info("a", &address)]);
        let authorization = Authorization::new(http::HeaderValue::from_static("Bearer channel"));
        let channel = MeshChannel::builder("probe")
            .authorization(authorization.clone())
            .build(resolver.subscribe());
        let mut client = HealthClient::new(channel.clone());
        let seen = client
            .check(HealthCheckRequest::default())
            .await
            .expect_err("refused");
        assert_eq!(seen.message(), "Bearer channel");
        let mut own = tonic::Request::new(HealthCheckRequest::default());
        own.metadata_mut()
            .insert("authorization", "Bearer own".parse().unwrap());
        let seen = client.check(own).await.expect_err("refused");
        assert_eq!(seen.message(), "Bearer own");
        // Replaced while the channel runs: the next call carries the new one.
        authorization.set(http::HeaderValue::from_static("Bearer refreshed"));
        let seen = client
            .check(HealthCheckRequest::default())
            .await
            .expect_err("refused");
        assert_eq!(seen.message(), "Bearer refreshed");
    }

    /// What a test server does with health Checks (Watch always goes through).
    #[derive(Clone, Copy)]
    enum Checks {
        /// Answers each as an instance over its limit does.
        Shed,
        /// Serves each, holding the first this long first.
        HoldFirst(Duration),
        /// Refuses each, `NOT_FOUND` naming the `authorization` it carried.
        EchoAuthorization,
    }

    /// Counts health Checks and treats them as `checks` says.
    #[derive(Clone)]
    struct OnChecks<S> {
        inner: S,
        checks: Checks,
        count: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl<S> tower::Service<http::Request<Body>> for OnChecks<S>
    where
        S: tower::Service<http::Request<Body>, Response = http::Response<Body>>,
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
            if !request.uri().path().ends_with("/Check") {
                return Box::pin(self.inner.call(request));
            }
            let before = self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let hold = match self.checks {
                Checks::Shed => {
                    let mut shed = tonic::Status::unavailable("overloaded").into_http::<Body>();
                    shed.headers_mut()
                        .insert(crate::door::PUSHBACK, "20".parse().unwrap());
                    return Box::pin(std::future::ready(Ok(shed)));
                }
                Checks::HoldFirst(hold) => (before == 0).then_some(hold),
                Checks::EchoAuthorization => {
                    let seen = request
                        .headers()
                        .get(http::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("none");
                    let refused = tonic::Status::not_found(seen).into_http::<Body>();
                    return Box::pin(std::future::ready(Ok(refused)));
                }
            };
            let answer = self.inner.call(request);
            Box::pin(async move {
                if let Some(hold) = hold {
                    tokio::time::sleep(hold).await;
                }
                answer.await
            })
        }
    }

    /// A health server for "probe" treating Checks as `checks` says; returns its address and
    /// its count of Checks.
    async fn checked_server(checks: Checks) -> (String, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("probe", tonic_health::ServingStatus::Serving)
            .await;
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(
            tonic::transport::Server::builder()
                .layer(tower::layer::layer_fn(move |inner| OnChecks {
                    inner,
                    checks,
                    count: counted.clone(),
                }))
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        (address, count)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_new_endpoint_is_tried_at_once_with_one_call_until_it_answers() {
        use std::sync::atomic::Ordering::SeqCst;
        let (a, a_checks) = checked_server(Checks::HoldFirst(Duration::ZERO)).await;
        let (b, b_checks) = checked_server(Checks::HoldFirst(Duration::ZERO)).await;
        let (endpoints, discovered) =
            watch::channel(Some([info("a", &a), info("b", &b)].into_iter().collect()));
        let channel = MeshChannel::new("probe", discovered);
        let mut ready = channel.subscribe_ready();
        until_ready(&mut ready, 2).await;
        // a and b answer fast and are measured: no guess about a newcomer could be lower.
        let mut client = HealthClient::new(channel.clone());
        check_times(&mut client, 200).await;
        assert!(a_checks.load(SeqCst) > 0 && b_checks.load(SeqCst) > 0);

        // c comes, and takes a second over its first answer.
        let (c, c_checks) = checked_server(Checks::HoldFirst(Duration::from_secs(1))).await;
        endpoints.send_replace(Some(
            [info("a", &a), info("b", &b), info("c", &c)]
                .into_iter()
                .collect(),
        ));
        until_ready(&mut ready, 3).await;
        // p2c tries it the first time it draws it: each call draws it with chance 2/3.
        let mut calls = 0;
        while c_checks.load(SeqCst) == 0 {
            calls += 1;
            assert!(calls <= 30, "c got no call of {calls}");
            let mut client = client.clone();
            tokio::spawn(async move { client.check(HealthCheckRequest::default()).await });
            tokio::task::yield_now().await;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // While that first call is out, c takes no other, however many come.
        let callers: Vec<_> = (0..8)
            .map(|_| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    for _ in 0..25 {
                        client
                            .check(HealthCheckRequest::default())
                            .await
                            .expect("served by a or b meanwhile");
                    }
                })
            })
            .collect();
        for caller in callers {
            caller.await.expect("caller");
        }
        assert_eq!(
            c_checks.load(SeqCst),
            1,
            "c took more than its trial call before answering it"
        );
    }
}
