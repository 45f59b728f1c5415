//! Serving a herd instance: health, reflection, registration and graceful drain around a set of
//! tonic services, in four steps.
//!
//! 1. **Start**: serve on the bound listener with health NOT_SERVING.
//! 2. **Register**: once the configuration is loaded, register in etcd with the address actually
//!    bound, retrying with backoff.
//! 3. **Run**: report SERVING and mirror the registration's state into health, until the shutdown
//!    signal. Operators ask an instance what it applied ([`crate::admin`]); it writes nothing to
//!    etcd when its configuration changes.
//! 4. **Drain**: NOT_SERVING, deregister, keep serving for the drain delay so that watchers see
//!    the instance leave, end health watches, stop accepting, and give in-flight calls a bounded
//!    time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tower::Layer;

use crate::door::{DEFAULT_MAX_REQUEST, DoorLayer};
use crate::error::ServeError;
use crate::http2::Caller;
use crate::incoming::{Hygiene, guarded};
use crate::instance::InstanceInfo;
use crate::limit::{LimitSettings, Limiter};
use crate::mesh::Mesh;
use crate::registry::Registration;
use crate::settings::Settings;
use crate::tls::PeerInfo;

/// Set once the instance begins to shut down: from then on, the etcd client, watches and
/// connections it is letting go of end as expected, not as failures.
static STOPPING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether the instance has begun to shut down.
pub(crate) fn stopping() -> bool {
    STOPPING.load(std::sync::atomic::Ordering::Relaxed)
}

/// TCP keepalive on accepted connections, so that connections from callers that vanished are
/// closed: first probe after this much silence, then every `TCP_KEEPALIVE_INTERVAL`, given up
/// after `TCP_KEEPALIVE_RETRIES` unanswered probes. The kernel does this, so unlike HTTP/2 pings
/// it costs the request path nothing (hyper's ping recorder takes a lock and reads the clock on
/// every frame). Callers that must notice a silent server fast ping it themselves.
const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_RETRIES: u32 = 3;
/// The most calls one connection may have in flight at once (HTTP/2 `MAX_CONCURRENT_STREAMS`):
/// a caller with more waits for a stream, or uses another instance. It also bounds the streams a
/// caller may cancel before the server has taken them up (HTTP/2's rapid-reset defence, 20 by
/// default in hyper): a mesh caller whose deadlines expire by the hundred under overload can
/// never cross it, while a stranger resetting streams on purpose is still cut off. A stranger's
/// connection accepted while many others are open is offered fewer, down to 8: strangers'
/// connections share a pool of streams, 4 096 by default (sixteen connections' worth).
pub const MAX_CONCURRENT_STREAMS: u32 = 256;
/// Backoff between attempts to register at start: starts here, doubles, capped below.
const REGISTER_BACKOFF_START: Duration = Duration::from_millis(100);
const REGISTER_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The health "service" that says whether the instance is registered in etcd: SERVING while it
/// is, NOT_SERVING while it registers again. Operators and probes can watch it; callers use "".
pub const REGISTRATION_HEALTH: &str = "herd.registration";

/// A generated tonic server, as [`Services`] takes it.
pub trait GrpcServer:
    tower::Service<
        http::Request<tonic::body::Body>,
        Response = http::Response<tonic::body::Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S> GrpcServer for S where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = Infallible,
            Future: Send + 'static,
        > + NamedService
        + Clone
        + Send
        + Sync
        + 'static
{
}

/// The tonic services an instance serves, with their names for health reporting and the
/// descriptor sets reflection describes them with.
#[derive(Default)]
pub struct Services {
    routes: Routes,
    names: Vec<&'static str>,
    descriptors: Vec<&'static [u8]>,
    /// Each service's largest request message, checked at the door.
    limits: HashMap<&'static str, usize>,
    /// Whether callers from outside the mesh call it (over TLS: a client certificate is then
    /// optional, callers authenticating otherwise).
    public: bool,
}

impl Services {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks these services as called from outside the mesh: over mutual TLS, a caller's
    /// certificate is then optional (the gateway's callers authenticate with a bearer token).
    pub fn public(mut self) -> Self {
        self.public = true;
        self
    }

    /// Adds a generated tonic server, whose requests may be up to [`DEFAULT_MAX_REQUEST`].
    pub fn with<S: GrpcServer>(self, svc: S) -> Self {
        self.with_max_request(svc, DEFAULT_MAX_REQUEST)
    }

    /// Adds a generated tonic server whose request messages may be at most `bytes` (a larger
    /// one is `INVALID_ARGUMENT` before it is read whole): a public API takes far less than an
    /// internal one.
    pub fn with_max_request<S: GrpcServer>(mut self, svc: S, bytes: usize) -> Self {
        self.names.push(S::NAME);
        self.limits.insert(S::NAME, bytes);
        self.routes = self.routes.add_service(svc);
        self
    }

    /// Adds an encoded `FileDescriptorSet` for reflection, so that `grpcurl` sees contracts
    /// compiled outside `herd-proto` (herd's own and health's are always there).
    pub fn with_descriptors(mut self, set: &'static [u8]) -> Self {
        self.descriptors.push(set);
        self
    }

    /// Serves these services on `listener` on their own, as an instance of `service` (the name
    /// callers' channels use) — health SERVING, reflection, no etcd, no registration — until the
    /// task is dropped: for tests and tools that need a real server on `127.0.0.1:0`.
    pub async fn serve_standalone(
        self,
        service: impl Into<String>,
        listener: TcpListener,
    ) -> Result<(), ServeError> {
        let service = service.into();
        let (reporter, health) = tonic_health::server::health_reporter();
        for name in self.names.iter().copied().chain([service.as_str()]) {
            reporter
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let routes = with_health_and_reflection(self.routes, health, &self.descriptors)?;
        let door = DoorLayer::new(
            self.limits,
            Arc::new(Limiter::new(LimitSettings::default())),
        );
        crate::http2::serve(
            guarded(
                TcpIncoming::from(listener).with_nodelay(Some(true)),
                Hygiene::default(),
            ),
            door.layer(routes.prepare()),
            // Plaintext: no caller has a certificate.
            move |_: &_| caller(false, !self.public),
            crate::backlog::bound_for(LimitSettings::default().max),
            std::future::pending(),
        )
        .await;
        Ok(())
    }
}

impl Mesh {
    /// Serves `services` on `listener` until `shutdown` completes, then drains. See the module docs.
    pub async fn serve(
        mut self,
        listener: TcpListener,
        mut services: Services,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        services.routes = services.routes.add_service(crate::admin::Admin::server(
            &self.service,
            &self.instance_id,
            self.config_status.clone(),
            self.caller.tls.is_some(),
        ));
        if let Some(status) = &self.config_status {
            crate::metrics::watch_config(status.clone());
        }
        let hygiene = self.settings.hygiene();
        let limits = self.settings.limit_settings();
        let health_listener = match self.settings.health_listen {
            None => None,
            Some(address) => {
                Some(
                    TcpListener::bind(address)
                        .await
                        .map_err(|source| ServeError::Bind {
                            address: address.to_string(),
                            source,
                        })?,
                )
            }
        };
        let credentials = self
            .caller
            .tls
            .as_ref()
            .and_then(|t| t.credentials.as_ref());
        let tls = match credentials {
            None => None,
            Some(credentials) => {
                let public = services.public;
                Some(ServerTls {
                    config: crate::tls::server_config(
                        credentials,
                        if public {
                            crate::tls::ClientAuth::Optional
                        } else {
                            crate::tls::ClientAuth::Required
                        },
                    )?,
                    // Over TLS callers have identities, and the policy says which may call what.
                    authz: crate::authz::follow(self.runtime_config(), &self.service, public),
                })
            }
        };
        let mut started = Started::start(
            listener,
            health_listener,
            services,
            &self.service,
            hygiene,
            tls,
            limits,
        )
        .await?;
        tracing::info!(service = %self.service, instance = %self.instance_id, address = %started.address, "listening");
        tokio::pin!(shutdown);
        let registration = tokio::select! {
            registration = self.register(started.address) => Some(registration),
            _ = &mut shutdown => None,
            error = started.failed() => return Err(error),
        };
        if let Some(registration) = &registration {
            tokio::select! {
                _ = self.run(started.address, started.health.clone(), registration) => {}
                _ = &mut shutdown => {}
                error = started.failed() => return Err(error),
            }
        }
        started.drain(registration, &self.settings).await
    }

    /// Step 2: waits until the instance is ready (its configuration loaded), then registers,
    /// retrying for as long as it takes.
    async fn register(&mut self, address: SocketAddr) -> Registration {
        for ready in std::mem::take(&mut self.ready) {
            ready.await;
        }
        tracing::info!("configuration loaded");
        let info = InstanceInfo {
            service: self.service.clone(),
            instance_id: self.instance_id.clone(),
            address: advertised(address, self.settings.advertise),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let key = self
            .caller
            .layout
            .instance(&self.service, &self.instance_id);
        let mut backoff = REGISTER_BACKOFF_START;
        loop {
            let ttl = self.settings.lease_ttl;
            match Registration::start_on(&self.caller.watches, key.clone(), &info, ttl).await {
                Ok(registration) => return registration,
                Err(e) => {
                    tracing::warn!(error = %e, "registering failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(REGISTER_BACKOFF_MAX);
                }
            }
        }
    }

    /// Step 3: SERVING, and the registration's state mirrored into health and etcd, until the
    /// caller stops it.
    async fn run(&self, address: SocketAddr, health: Health, registration: &Registration) {
        health.set_all(ServingStatus::Serving).await;
        tracing::info!(service = %self.service, instance = %self.instance_id, %address, "serving");
        crate::metrics::watch_registration(registration.subscribe());
        mirror_registration(health.reporter, registration.subscribe()).await;
    }
}

/// The instance's health statuses.
#[derive(Clone)]
struct Health {
    reporter: HealthReporter,
    /// Every name the instance reports: "", the registration, the service it is registered as
    /// (which callers' probes watch), and each gRPC service.
    names: Vec<String>,
}

impl Health {
    async fn set_all(&self, status: ServingStatus) {
        for name in &self.names {
            self.reporter.set_service_status(name, status).await;
        }
    }
}

/// What an instance serving over TLS needs beyond plaintext: its TLS configuration, and the
/// authorization policy in force for its service.
struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    authz: Arc<arc_swap::ArcSwap<crate::authz::Policy>>,
}

/// Step 1's result: a server running on its own task, its health, and how to stop it.
struct Started {
    address: SocketAddr,
    health: Health,
    server: JoinHandle<()>,
    /// Stops the server, and the health server if there is one.
    stop: Option<watch::Sender<bool>>,
}

impl Started {
    /// Step 1: serves `services` with health (NOT_SERVING) and reflection on `listener`, and
    /// health alone in plaintext on `health_listener` if given.
    async fn start(
        listener: TcpListener,
        health_listener: Option<TcpListener>,
        services: Services,
        service: &str,
        hygiene: Hygiene,
        tls: Option<ServerTls>,
        limits: LimitSettings,
    ) -> Result<Self, ServeError> {
        let limiter = Arc::new(Limiter::new(limits));
        crate::metrics::watch_limiter(&limiter);
        let address = listener.local_addr().map_err(|source| ServeError::Bind {
            address: "the listener".into(),
            source,
        })?;
        let (reporter, health_service) = tonic_health::server::health_reporter();
        let mut names = vec![
            String::new(),
            REGISTRATION_HEALTH.into(),
            service.to_string(),
        ];
        names.extend(services.names.iter().map(|n| n.to_string()));
        let health = Health { reporter, names };
        let (stop, _) = watch::channel(false);
        // Before the server answers anything: tonic-health reports "" SERVING by default.
        health.set_all(ServingStatus::NotServing).await;
        if let Some(health_listener) = health_listener {
            serve_health(
                health_listener,
                health_service.clone(),
                hygiene,
                stop.subscribe(),
            )?;
        }
        let routes =
            with_health_and_reflection(services.routes, health_service, &services.descriptors)?;
        let stopped = stop.subscribe();
        let internal_in_plaintext = tls.is_none() && !services.public;
        let door = DoorLayer::new(services.limits, limiter);
        let (door, tls) = match tls {
            Some(tls) => (door.with_authz(tls.authz), Some(tls.config)),
            None => (door, None),
        };
        let server = crate::http2::serve(
            // Nagle's algorithm would hold small responses back by tens of milliseconds.
            crate::tls::incoming(
                guarded(
                    TcpIncoming::from(listener)
                        .with_nodelay(Some(true))
                        .with_keepalive(Some(TCP_KEEPALIVE_TIME))
                        .with_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
                        .with_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES)),
                    hygiene,
                ),
                tls,
                hygiene.handshake_timeout,
            ),
            tower::ServiceBuilder::new()
                .map_request(access_log)
                .layer(door)
                .service(routes.prepare()),
            move |peer: &PeerInfo| caller(peer.identity.is_some(), internal_in_plaintext),
            crate::backlog::bound_for(limits.max),
            stopped_by(stopped),
        );
        let server = tokio::spawn(server);
        Ok(Self {
            address,
            health,
            server,
            stop: Some(stop),
        })
    }

    /// Completes only if the server stops on its own: why.
    async fn failed(&mut self) -> ServeError {
        match (&mut self.server).await {
            Ok(()) => ServeError::Stopped,
            Err(e) => ServeError::Task(e),
        }
    }

    /// Step 4: NOT_SERVING, deregister, keep serving for the drain delay, end health watches, stop
    /// accepting, and wait for in-flight calls within the drain timeout.
    async fn drain(
        mut self,
        registration: Option<Registration>,
        settings: &Settings,
    ) -> Result<(), ServeError> {
        tracing::info!("shutting down: NOT_SERVING, deregistering, draining");
        STOPPING.store(true, std::sync::atomic::Ordering::Relaxed);
        self.health.set_all(ServingStatus::NotServing).await;
        if let Some(registration) = registration {
            registration.deregister().await;
            // Callers learn of the departure through their watches; keep serving meanwhile.
            tokio::time::sleep(settings.drain_delay()).await;
        }
        // Open health Watch streams would hold the server open: clearing the statuses ends them.
        for name in &self.health.names {
            self.health.reporter.clear_service_status(name).await;
        }
        if let Some(stop) = self.stop.take() {
            stop.send_replace(true);
        }
        match tokio::time::timeout(settings.drain_timeout(), &mut self.server).await {
            Ok(served) => served?,
            Err(_) => {
                tracing::warn!(
                    "in-flight calls did not finish within the drain bound; stopping anyway"
                );
                self.server.abort();
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// Serves `health` alone, in plaintext, on `listener` until `stop` turns true: the port
/// orchestrators probe. Its statuses are the instance's own (the same reporter), NOT_SERVING
/// through the drain included.
fn serve_health(
    listener: TcpListener,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    hygiene: Hygiene,
    stop: watch::Receiver<bool>,
) -> Result<(), ServeError> {
    let address = listener.local_addr().map_err(|source| ServeError::Bind {
        address: "the health listener".into(),
        source,
    })?;
    tracing::info!(%address, "health listening");
    tokio::spawn(crate::http2::serve(
        guarded(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            hygiene,
        ),
        Routes::new(health).prepare(),
        |_: &_| Caller::Stranger,
        crate::backlog::MIN_UNANSWERED,
        stopped_by(stop),
    ));
    Ok(())
}

/// Who a caller is to HTTP/2's rapid-reset defence ([`Caller`]): the mesh's own if it holds a
/// certificate of the mesh's CA (`certified`), or if it calls an internal service served in
/// plaintext (on a network where only the mesh calls it); a stranger otherwise — any caller of a
/// public service without a certificate, and over TLS any caller without one.
fn caller(certified: bool, internal_in_plaintext: bool) -> Caller {
    if certified || internal_in_plaintext {
        Caller::Mesh
    } else {
        Caller::Stranger
    }
}

/// Completes when `stop` turns true (or its sender is gone): a listener's shutdown signal.
async fn stopped_by(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// Reports registration changes through health until the registration ends.
async fn mirror_registration(health: HealthReporter, mut registered: watch::Receiver<bool>) {
    loop {
        let status = if *registered.borrow_and_update() {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        health.set_service_status(REGISTRATION_HEALTH, status).await;
        if registered.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// One debug line per call received (target `herd::access`), so that operators and tests can see
/// which instance serves what; free when debug logging is off.
fn access_log(req: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    // Fields are evaluated only when the line is logged: nothing is looked up otherwise.
    tracing::debug!(
        target: "herd::access",
        path = %req.uri().path(),
        caller = req
            .extensions()
            .get::<crate::tls::PeerInfo>()
            .and_then(|p| p.identity.as_deref()),
        "call received"
    );
    req
}

/// Adds health and reflection (v1 for new grpcurl, v1alpha for old) to `routes`; reflection knows
/// herd's contracts, health's, and `extra`.
fn with_health_and_reflection(
    routes: Routes,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    extra: &[&'static [u8]],
) -> Result<Routes, ServeError> {
    let reflection = || {
        extra.iter().fold(
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(herd_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET),
            |builder, set| builder.register_encoded_file_descriptor_set(set),
        )
    };
    Ok(routes
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?))
}

/// The address to register: `advertise` with the bound port when given, else the bound one with
/// an unspecified IP replaced by loopback's.
fn advertised(bound: SocketAddr, advertise: Option<std::net::IpAddr>) -> String {
    if let Some(ip) = advertise {
        return SocketAddr::new(ip, bound.port()).to_string();
    }
    let ip = if bound.ip().is_unspecified() {
        match bound {
            SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        bound.ip()
    };
    SocketAddr::new(ip, bound.port()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::transport::Server;

    #[test]
    fn the_registered_address_is_the_advertised_ip_with_the_bound_port() {
        let bound: SocketAddr = ([0, 0, 0, 0], 50051).into();
        assert_eq!(advertised(bound, None), "127.0.0.1:50051");
        let pod = std::net::IpAddr::from([10, 1, 2, 3]);
        assert_eq!(advertised(bound, Some(pod)), "10.1.2.3:50051");
        let loopback: SocketAddr = ([127, 0, 0, 2], 7).into();
        assert_eq!(advertised(loopback, None), "127.0.0.2:7");
    }

    #[test]
    fn the_mesh_is_who_holds_its_certificate_or_calls_an_internal_service_in_plaintext() {
        // Over TLS (or to a public service): by certificate.
        assert_eq!(caller(true, false), Caller::Mesh);
        assert_eq!(caller(false, false), Caller::Stranger);
        // An internal service in plaintext: every caller.
        assert_eq!(caller(false, true), Caller::Mesh);
    }

    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    #[tokio::test]
    async fn old_grpcurl_reflection_v1alpha_sees_herd_and_health() {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let routes = with_health_and_reflection(Routes::default(), health, &[]).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .add_routes(routes)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        let channel = crate::client::connection::Connection::open(
            &crate::client::TcpConnector::default(),
            address.to_string().parse().unwrap(),
        )
        .await
        .unwrap();
        let mut client = ServerReflectionClient::new(channel);
        let requests = [
            MessageRequest::ListServices(String::new()),
            MessageRequest::FileContainingSymbol("herd.quote.v1.QuoteService".into()),
            MessageRequest::FileContainingSymbol("grpc.health.v1.Health".into()),
        ]
        .map(|r| ServerReflectionRequest {
            host: String::new(),
            message_request: Some(r),
        });
        let mut answers = client
            .server_reflection_info(tokio_stream::iter(requests))
            .await
            .unwrap()
            .into_inner();
        let mut seen = Vec::new();
        while let Some(answer) = answers.message().await.unwrap() {
            seen.push(answer.message_response.unwrap());
        }
        assert_eq!(seen.len(), 3);
        let MessageResponse::ListServicesResponse(list) = &seen[0] else {
            panic!("{:?}", seen[0]);
        };
        let names: Vec<&str> = list.service.iter().map(|s| s.name.as_str()).collect();
        assert!(names.contains(&"herd.quote.v1.QuoteService"), "{names:?}");
        assert!(names.contains(&"grpc.health.v1.Health"), "{names:?}");
        for answer in &seen[1..] {
            let ok = matches!(answer, MessageResponse::FileDescriptorResponse(f) if !f.file_descriptor_proto.is_empty());
            assert!(ok, "{answer:?}");
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn calls_cancelled_by_the_hundred_do_not_cost_the_caller_its_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(Services::new().serve_standalone("probe", listener));
        let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
        let (send, connection) = h2::client::handshake(tcp).await.unwrap();
        let connection = tokio::spawn(connection);
        let request = || {
            http::Request::builder()
                .method("POST")
                .uri(format!("http://{address}/grpc.health.v1.Health/Check"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap()
        };
        // 200 calls begun and cancelled at once, as a caller whose deadlines all expire does:
        // the server reads each cancellation before it has taken the call up.
        let mut send = send.ready().await.unwrap();
        for _ in 0..200 {
            let (_response, mut stream) = send.send_request(request(), false).unwrap();
            stream.send_reset(h2::Reason::CANCEL);
            send = send.ready().await.unwrap();
        }
        // The same connection still carries calls.
        let (response, mut stream) = send.send_request(request(), false).unwrap();
        stream
            .send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
            .unwrap();
        let response = tokio::time::timeout(Duration::from_secs(5), response)
            .await
            .expect("answered")
            .expect("the connection survived");
        assert_eq!(response.status(), http::StatusCode::OK);
        assert!(!connection.is_finished());
    }
}
