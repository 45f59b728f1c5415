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

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use futures::future::BoxFuture;
use http::uri::Authority;
use rand::Rng;
use tokio::sync::watch;
use tokio_stream::wrappers::WatchStream;
use tonic::body::Body;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwmaDiscover};
use tower::{BoxError, Service};

use crate::connection::{Answer, Connection, Outgoing, streamed};
use crate::discovery::Discovered;
use crate::error::{CallError, with_causes};

/// Latency assumed for an endpoint before it has answered anything.
const DEFAULT_RTT: Duration = Duration::from_millis(5);
/// How fast peak-EWMA forgets a slow answer.
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// Backoff between probes of an endpoint that is not serving: starts here, doubles, capped below.
const PROBE_BACKOFF_START: Duration = Duration::from_millis(50);
const PROBE_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How one discovered endpoint stands, as its prober last saw it.
#[derive(Clone)]
enum State {
    /// Its first connection and health answer are still to come.
    Connecting,
    /// SERVING: offered to the balancer over this connection.
    Serving(Connection),
    /// It answered NOT_SERVING (starting, or draining).
    NotServing,
    /// Its connection failed or broke, for this reason. Like gRPC's TRANSIENT_FAILURE it stays
    /// so while the endpoint is probed again, until it answers SERVING.
    Unreachable(String),
}

/// Every discovered endpoint's state, by instance id, once discovery has answered.
#[derive(Clone, Default)]
struct Pool {
    /// Whether discovery has answered at least once.
    resolved: bool,
    endpoints: BTreeMap<String, State>,
}

impl Pool {
    /// Why no call can be served now and none should wait: no instance registered, or every
    /// known one failed. `None` while something may still come (discovery or a first connection
    /// pending, or an endpoint serving).
    fn hopeless(&self, service: &Arc<str>) -> Option<CallError> {
        if !self.resolved {
            return None;
        }
        if self.endpoints.is_empty() {
            return Some(CallError::NoInstance {
                service: service.clone(),
            });
        }
        let (mut not_serving, mut unreachable, mut why) = (0, 0, None);
        for state in self.endpoints.values() {
            match state {
                State::Connecting | State::Serving(_) => return None,
                State::NotServing => not_serving += 1,
                State::Unreachable(reason) => {
                    unreachable += 1;
                    why.get_or_insert(reason.as_str());
                }
            }
        }
        let mut reasons = Vec::new();
        if not_serving > 0 {
            reasons.push(format!("{not_serving} not serving"));
        }
        if let Some(why) = why {
            reasons.push(format!("{unreachable} unreachable: {why}"));
        }
        Some(CallError::NoneServing {
            service: service.clone(),
            known: self.endpoints.len(),
            why: reasons.join("; "),
        })
    }
}

/// tower's power-of-two-choices balancer over peak-EWMA-weighted endpoint connections.
type Balancer = Balance<PeakEwmaDiscover<EndpointDiscover>, Outgoing>;

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
    discovered: watch::Receiver<Discovered>,
    pool: watch::Receiver<Pool>,
    budget: RetryBudget,
}

impl std::fmt::Debug for MeshChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshChannel")
            .field("service", &self.inner.service)
            .finish()
    }
}

impl MeshChannel {
    /// A channel to `service` over the endpoint sets published by `endpoints`. Must be called from
    /// within a tokio runtime; the probing stops when every clone is dropped.
    pub fn new(service: &str, endpoints: watch::Receiver<Discovered>) -> Self {
        let (pool_tx, pool) = watch::channel(Pool::default());
        tokio::spawn(track(service.to_string(), endpoints.clone(), pool_tx));
        let discover = EndpointDiscover {
            updates: WatchStream::new(pool.clone()),
            current: HashMap::new(),
            pending: VecDeque::new(),
        };
        let loaded = PeakEwmaDiscover::new::<Outgoing>(
            discover,
            DEFAULT_RTT,
            EWMA_DECAY,
            CompleteOnResponse::default(),
        );
        Self {
            inner: Arc::new(Shared {
                service: service.into(),
                balancer: tokio::sync::Mutex::new(Balance::new(loaded)),
                discovered: endpoints,
                pool,
                budget: RetryBudget::default(),
            }),
        }
    }

    /// The number of instances discovered.
    pub fn endpoint_count(&self) -> usize {
        self.inner
            .discovered
            .borrow()
            .as_ref()
            .map_or(0, |e| e.len())
    }

    /// The instance ids currently offered to the balancer (discovered and SERVING).
    pub fn ready_instances(&self) -> Vec<String> {
        self.inner
            .pool
            .borrow()
            .endpoints
            .iter()
            .filter(|(_, state)| matches!(state, State::Serving(_)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// The retry budget shared by every call over this channel.
    pub fn budget(&self) -> &RetryBudget {
        &self.inner.budget
    }
}

impl MeshChannel {
    /// Sends `request` to an endpoint the balancer picks; resolves once the answer's head arrives.
    /// Fails at once with `UNAVAILABLE` when no endpoint can serve (see the module docs).
    pub(crate) async fn send(&self, request: Outgoing) -> Result<Answer, CallError> {
        let shared = &self.inner;
        let sending = {
            let mut balancer = shared.balancer.lock().await;
            // The common case costs one poll: an endpoint is ready.
            let now = std::future::poll_fn(|cx| Poll::Ready(balancer.poll_ready(cx))).await;
            let ready = match now {
                Poll::Ready(ready) => ready,
                Poll::Pending => {
                    let mut pool = shared.pool.clone();
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
        sending
            .await
            .map_err(|e| CallError::not_sent(&shared.service, &*e))
    }
}

/// Generated tonic clients over the balanced channel.
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
            match channel.send(request.into()).await {
                Ok(answer) => Ok(streamed(answer)),
                Err(e) => Err(Box::new(tonic::Status::from(e)) as BoxError),
            }
        })
    }
}

/// Completes once the pool says no call can be served (see [`Pool::hopeless`]).
async fn hopeless(pool: &mut watch::Receiver<Pool>, service: &Arc<str>) -> CallError {
    let mut why = None;
    // The sender lives as long as the channel's tracker; if it is gone, keep waiting (the
    // caller's deadline bounds the call).
    if pool
        .wait_for(|p| {
            why = p.hopeless(service);
            why.is_some()
        })
        .await
        .is_err()
    {
        std::future::pending::<()>().await;
    }
    why.unwrap_or_else(|| CallError::NoInstance {
        service: service.clone(),
    })
}

/// gRPC A6's retry throttle: every retryable failure costs a token, every success earns back a
/// tenth; retries stop while half or fewer of the tokens are left, so a struggling service is not
/// hit with three times its load.
#[derive(Debug, Clone)]
pub struct RetryBudget {
    /// Thousandths of a token.
    tokens: Arc<AtomicU32>,
}

/// Ten tokens, in thousandths.
const BUDGET_MAX: u32 = 10_000;
/// A tenth of a token per success.
const BUDGET_EARN: u32 = 100;
/// One token per failure.
const BUDGET_COST: u32 = 1_000;

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            tokens: Arc::new(AtomicU32::new(BUDGET_MAX)),
        }
    }
}

impl RetryBudget {
    /// Records a success.
    pub fn success(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some((t + BUDGET_EARN).min(BUDGET_MAX))
            });
    }

    /// Records a retryable failure.
    pub fn failure(&self) {
        let _ = self
            .tokens
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                Some(t.saturating_sub(BUDGET_COST))
            });
    }

    /// Whether a retry may be made now.
    pub fn can_retry(&self) -> bool {
        self.tokens.load(Ordering::Relaxed) > BUDGET_MAX / 2
    }
}

/// Keeps one prober per discovered endpoint, until the channel is dropped.
async fn track(
    service: String,
    mut discovered: watch::Receiver<Discovered>,
    pool: watch::Sender<Pool>,
) {
    let mut probers: HashMap<String, (String, tokio::task::JoinHandle<()>)> = HashMap::new();
    loop {
        let set = discovered.borrow_and_update().clone();
        if let Some(set) = set {
            let gone: Vec<String> = probers
                .iter()
                .filter(|(id, (address, _))| set.get(*id).map(|i| &i.address) != Some(address))
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                if let Some((address, task)) = probers.remove(&id) {
                    task.abort();
                    let was_serving = pool.send_if_modified(|p| {
                        matches!(p.endpoints.remove(&id), Some(State::Serving(_)))
                    });
                    if was_serving {
                        tracing::info!(%service, instance = %id, %address, "endpoint removed: deregistered");
                    }
                }
            }
            pool.send_modify(|p| {
                p.resolved = true;
                for id in set.keys() {
                    p.endpoints.entry(id.clone()).or_insert(State::Connecting);
                }
            });
            for (id, info) in set.iter() {
                if probers.contains_key(id) {
                    continue;
                }
                let task = tokio::spawn(probe(
                    service.clone(),
                    id.clone(),
                    info.address.clone(),
                    pool.clone(),
                ));
                probers.insert(id.clone(), (info.address.clone(), task));
            }
        }
        tokio::select! {
            changed = discovered.changed() => if changed.is_err() {
                // A fixed set: nothing more will change; probe until the channel is dropped.
                pool.closed().await;
                break;
            },
            _ = pool.closed() => break,
        }
    }
    for (_, (_, task)) in probers {
        task.abort();
    }
}

/// Watches one endpoint's health over the connection its calls use, and offers it to the balancer
/// only while it reports SERVING. A broken connection is replaced by a new one.
async fn probe(service: String, id: String, address: String, pool: watch::Sender<Pool>) {
    let set = |state: State| {
        let mut was_serving = false;
        let changed = pool.send_if_modified(|p| {
            // The tracker removes an endpoint that discovery dropped; never bring it back.
            let Some(current) = p.endpoints.get_mut(&id) else {
                return false;
            };
            was_serving = matches!(current, State::Serving(_));
            let same = match (&*current, &state) {
                (State::Serving(old), State::Serving(new)) => old.generation == new.generation,
                (State::NotServing, State::NotServing) => true,
                (State::Unreachable(_), State::Unreachable(_)) => true,
                _ => false,
            };
            *current = state.clone();
            !same
        });
        match (&state, changed) {
            (State::Serving(_), true) => {
                tracing::info!(%service, instance = %id, %address, "endpoint added: serving");
            }
            (State::NotServing, true) if was_serving => {
                tracing::info!(%service, instance = %id, %address, reason = "not serving", "endpoint removed");
            }
            (State::Unreachable(why), true) if was_serving => {
                tracing::info!(%service, instance = %id, %address, reason = %why, "endpoint removed");
            }
            _ => {}
        }
    };
    let authority: Authority = match address.parse() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(%service, instance = %id, %address, error = %e, "unusable endpoint address");
            set(State::Unreachable(format!("unusable address {address:?}")));
            return;
        }
    };
    let mut backoff = PROBE_BACKOFF_START;
    loop {
        match watch_health(authority.clone()).await {
            Ok((connection, mut stream)) => loop {
                match stream.message().await {
                    Ok(Some(r)) if r.status == ServingStatus::Serving as i32 => {
                        set(State::Serving(connection.clone()));
                        backoff = PROBE_BACKOFF_START;
                    }
                    Ok(Some(_)) => set(State::NotServing),
                    Ok(None) => {
                        set(State::Unreachable("health watch ended".into()));
                        break;
                    }
                    Err(e) => {
                        set(State::Unreachable(e.message().to_string()));
                        break;
                    }
                }
            },
            Err(e) => set(State::Unreachable(with_causes(&*e))),
        }
        let jitter = rand::rng().random_range(0.5..1.5);
        tokio::time::sleep(backoff.mul_f64(jitter)).await;
        backoff = (backoff * 2).min(PROBE_BACKOFF_MAX);
    }
}

/// A new connection to `authority` and the health Watch stream opened over it.
async fn watch_health(
    authority: Authority,
) -> Result<
    (
        Connection,
        tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
    ),
    BoxError,
> {
    let connection = Connection::open(authority).await?;
    let stream = HealthClient::new(connection.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner();
    Ok((connection, stream))
}

/// Turns published ready sets into the insert/remove changes tower's balancer consumes. It only
/// holds the latest set, so it never blocks discovery while no calls flow.
struct EndpointDiscover {
    updates: WatchStream<Pool>,
    /// Instance id → generation of the connection the balancer holds.
    current: HashMap<String, u64>,
    pending: VecDeque<Change<String, Connection>>,
}

impl EndpointDiscover {
    fn diff(&mut self, next: &Pool) {
        let serving = |id: &str| match next.endpoints.get(id) {
            Some(State::Serving(connection)) => Some(connection),
            _ => None,
        };
        let gone: Vec<String> = self
            .current
            .keys()
            .filter(|id| serving(id).is_none())
            .cloned()
            .collect();
        for id in gone {
            self.current.remove(&id);
            self.pending.push_back(Change::Remove(id));
        }
        for (id, state) in next.endpoints.iter() {
            let State::Serving(connection) = state else {
                continue;
            };
            if self.current.get(id) == Some(&connection.generation) {
                continue;
            }
            self.current.insert(id.clone(), connection.generation);
            self.pending
                .push_back(Change::Insert(id.clone(), connection.clone()));
        }
    }
}

impl Stream for EndpointDiscover {
    type Item = Result<Change<String, Connection>, Infallible>;

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

    /// A real health server whose "" and `name` report `status`; returns its address.
    async fn health_server_reporting(
        name: &'static str,
        status: tonic_health::ServingStatus,
    ) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter.set_service_status(name, status).await;
        reporter.set_service_status("", status).await;
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
}
