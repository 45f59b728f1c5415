//! Serving a herd instance: health, reflection, registration and graceful drain around a set of
//! tonic services.
//!
//! Start-up: bind, serve with health NOT_SERVING, wait for a valid configuration, register in etcd
//! with the address actually bound, then report SERVING. Shutdown (SIGTERM, SIGINT or the given
//! signal): NOT_SERVING, deregister, keep serving for the drain delay so that watchers see the
//! instance leave, end health watches, stop accepting, and give in-flight calls a bounded time.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Mutex;
use std::time::Duration;

use etcd_client::Client;
use futures::future::BoxFuture;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::balance::MeshChannel;
use crate::config::ConfigStatus;
use crate::config::{ConfigModel, ConfigStore};
use crate::discovery::Resolver;
use crate::instance::{InstanceInfo, InstanceStatus};
use crate::layout::Layout;
use crate::registry::Registration;
use crate::settings::Settings;

/// TCP keepalive on accepted connections, so that connections from callers that vanished are
/// closed: first probe after this much silence, then every `TCP_KEEPALIVE_INTERVAL`, given up
/// after `TCP_KEEPALIVE_RETRIES` unanswered probes. The kernel does this, so unlike HTTP/2 pings
/// it costs the request path nothing (hyper's ping recorder takes a lock and reads the clock on
/// every frame). Callers that must notice a silent server fast ping it themselves.
const TCP_KEEPALIVE_TIME: Duration = Duration::from_secs(10);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const TCP_KEEPALIVE_RETRIES: u32 = 3;

/// The tonic services an instance serves, with their names for health reporting.
#[derive(Default)]
pub struct Services {
    routes: Routes,
    names: Vec<&'static str>,
}

impl Services {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a generated tonic server.
    pub fn with<S>(mut self, svc: S) -> Self
    where
        S: tower::Service<
                http::Request<tonic::body::Body>,
                Response = http::Response<tonic::body::Body>,
                Error = Infallible,
            > + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        self.names.push(S::NAME);
        self.routes = self.routes.add_service(svc);
        self
    }
}

/// One instance's link to the mesh: its identity, etcd, configuration and balanced channels.
pub struct Mesh {
    settings: Settings,
    service: String,
    instance_id: String,
    layout: Layout,
    etcd: Client,
    channels: Mutex<HashMap<String, (MeshChannel, Resolver)>>,
    ready: Vec<BoxFuture<'static, ()>>,
    config_status: Option<tokio::sync::watch::Receiver<crate::config::ConfigStatus>>,
    runtime: Option<tokio::sync::watch::Receiver<crate::config::RuntimeConfig>>,
}

impl Mesh {
    /// Connects to etcd for an instance of `service` (a name such as `pricing`).
    pub async fn connect(
        settings: Settings,
        service: &str,
        instance_id: String,
    ) -> anyhow::Result<Self> {
        let etcd = crate::etcd::connect(&settings.etcd_endpoints).await?;
        Ok(Self {
            layout: Layout::new(settings.prefix.clone()),
            settings,
            service: service.to_string(),
            instance_id,
            etcd,
            channels: Mutex::new(HashMap::new()),
            ready: Vec::new(),
            config_status: None,
            runtime: None,
        })
    }

    /// A new instance id for `service`: the service name and 12 random hex digits.
    pub fn new_instance_id(service: &str) -> String {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        format!("{service}-{}", &suffix[..12])
    }

    /// This instance's id, as registered in etcd.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The etcd client.
    pub fn etcd(&self) -> &Client {
        &self.etcd
    }

    /// Where herd's keys are in etcd.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The typed shared configuration: the runtime's sections and `M`'s. The instance reports
    /// SERVING only once it is loaded. Call it once per instance.
    pub fn config<M: ConfigModel>(&mut self) -> ConfigStore<M> {
        let store = ConfigStore::<M>::start(self.etcd.clone(), self.layout.clone());
        let waiter = store.clone();
        self.ready
            .push(Box::pin(async move { waiter.ready().await }));
        self.config_status = Some(store.subscribe_status());
        self.runtime = Some(store.subscribe_runtime());
        store
    }

    /// The runtime's own settings as configuration revisions are applied; an instance whose
    /// services read no configuration gets a store of the runtime's sections alone.
    pub fn runtime_config(&mut self) -> tokio::sync::watch::Receiver<crate::config::RuntimeConfig> {
        match &self.runtime {
            Some(runtime) => runtime.clone(),
            None => self.config::<()>().subscribe_runtime(),
        }
    }

    /// A balanced channel to `service`, by name alone.
    pub fn channel(&self, service: &str) -> MeshChannel {
        let mut channels = match self.channels.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        channels
            .entry(service.to_string())
            .or_insert_with(|| {
                let resolver = Resolver::start(self.etcd.clone(), &self.layout, service);
                (MeshChannel::new(service, resolver.subscribe()), resolver)
            })
            .0
            .clone()
    }

    /// Serves `services` on `listener` until `shutdown` completes, then drains. See the module docs.
    pub async fn serve(
        self,
        listener: TcpListener,
        services: Services,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        let address = listener.local_addr()?;
        let (mut health, health_service) = tonic_health::server::health_reporter();
        let mut names: Vec<&str> = vec!["", REGISTRATION_HEALTH];
        names.extend(services.names.iter().copied());
        set_all(&health, &names, ServingStatus::NotServing).await;

        let routes = with_health_and_reflection(services.routes, health_service)?;

        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = Server::builder()
            .tcp_nodelay(true)
            .layer(tower::util::MapRequestLayer::new(access_log))
            .add_routes(routes)
            // The builder's TCP settings do not apply to an incoming stream: set them on it, or
            // Nagle's algorithm holds small responses back by tens of milliseconds.
            .serve_with_incoming_shutdown(
                TcpIncoming::from(listener)
                    .with_nodelay(Some(true))
                    .with_keepalive(Some(TCP_KEEPALIVE_TIME))
                    .with_keepalive_interval(Some(TCP_KEEPALIVE_INTERVAL))
                    .with_keepalive_retries(Some(TCP_KEEPALIVE_RETRIES)),
                async {
                    let _ = stop_rx.await;
                },
            );
        let mut server = tokio::spawn(server);
        tracing::info!(service = %self.service, instance = %self.instance_id, %address, "listening");

        tokio::pin!(shutdown);
        let startup = async {
            for ready in self.ready {
                ready.await;
            }
            tracing::info!("configuration loaded");
            let info = InstanceInfo {
                service: self.service.clone(),
                instance_id: self.instance_id.clone(),
                address: advertised(address),
                pid: std::process::id(),
                version: env!("CARGO_PKG_VERSION").to_string(),
            };
            let key = self.layout.instance(&self.service, &self.instance_id);
            let mut backoff = Duration::from_millis(100);
            loop {
                match Registration::start(
                    self.etcd.clone(),
                    key.clone(),
                    &info,
                    self.settings.lease_ttl,
                )
                .await
                {
                    Ok(r) => return r,
                    Err(e) => {
                        tracing::warn!(error = %e, "registering failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
        };
        let registration = tokio::select! {
            r = startup => Some(r),
            _ = &mut shutdown => None,
            r = &mut server => {
                r??;
                anyhow::bail!("server stopped unexpectedly");
            }
        };
        if let Some(registration) = &registration {
            set_all(&health, &names, ServingStatus::Serving).await;
            tracing::info!(service = %self.service, instance = %self.instance_id, %address, "serving");
            let mirror = mirror_registration(health.clone(), registration.subscribe());
            let status = publish_status(
                registration,
                self.layout.status(&self.service, &self.instance_id),
                InstanceStatus {
                    service: self.service.clone(),
                    instance_id: self.instance_id.clone(),
                    config: ConfigStatus::default(),
                },
                self.config_status.clone(),
            );
            tokio::select! {
                _ = &mut shutdown => {}
                _ = mirror => {}
                _ = status => {}
                r = &mut server => {
                    r??;
                    anyhow::bail!("server stopped unexpectedly");
                }
            }
        }

        tracing::info!("shutting down: NOT_SERVING, deregistering, draining");
        set_all(&health, &names, ServingStatus::NotServing).await;
        if let Some(registration) = registration {
            registration.deregister().await;
            // Callers learn of the departure through their watches; keep serving meanwhile.
            tokio::time::sleep(self.settings.drain_delay()).await;
        }
        // Open health Watch streams would hold the server open: clearing the statuses ends them.
        for name in &names {
            health.clear_service_status(name).await;
        }
        let _ = stop_tx.send(());
        match tokio::time::timeout(self.settings.drain_timeout(), &mut server).await {
            Ok(r) => r??,
            Err(_) => {
                tracing::warn!(
                    "in-flight calls did not finish within the drain bound; stopping anyway"
                );
                server.abort();
            }
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// The health "service" that says whether the instance is registered in etcd: SERVING while it
/// is, NOT_SERVING while it registers again. Operators and probes can watch it; callers use "".
pub const REGISTRATION_HEALTH: &str = "herd.registration";

/// Reports registration changes through health until the registration ends.
async fn mirror_registration(
    health: tonic_health::server::HealthReporter,
    mut registered: tokio::sync::watch::Receiver<bool>,
) {
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

/// Publishes the instance's configuration status under its lease on every change, so that
/// operators see what each instance applied and rejected (`herdctl config status`).
async fn publish_status(
    registration: &Registration,
    key: String,
    mut status: InstanceStatus,
    feed: Option<tokio::sync::watch::Receiver<ConfigStatus>>,
) {
    let Some(mut feed) = feed else {
        return std::future::pending().await;
    };
    loop {
        status.config = feed.borrow_and_update().clone();
        match serde_json::to_string(&status) {
            Ok(value) => {
                if let Err(e) = registration.publish(key.clone(), value).await {
                    tracing::warn!(%key, error = %e, "publishing status failed; it is put again on the next change or registration");
                }
            }
            Err(e) => tracing::warn!(error = %e, "encoding status failed"),
        }
        if feed.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// One debug line per call received (target `herd::access`), so that operators and tests can see
/// which instance serves what; free when debug logging is off.
fn access_log(req: http::Request<tonic::body::Body>) -> http::Request<tonic::body::Body> {
    tracing::debug!(target: "herd::access", path = %req.uri().path(), "call received");
    req
}

/// Adds health and reflection (v1 for new grpcurl, v1alpha for old) to `routes`; reflection knows
/// herd's contracts and health's.
fn with_health_and_reflection(
    routes: Routes,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
) -> anyhow::Result<Routes> {
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(herd_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    Ok(routes
        .add_service(health)
        .add_service(reflection().build_v1()?)
        .add_service(reflection().build_v1alpha()?))
}

async fn set_all(
    health: &tonic_health::server::HealthReporter,
    names: &[&str],
    status: ServingStatus,
) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// The address to register: the bound one, with an unspecified IP replaced by loopback's.
fn advertised(bound: SocketAddr) -> String {
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

/// Completes on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = term => tracing::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received"),
    }
}

/// Runs a command-line program's `main` on a multi-thread tokio runtime: an error is printed with
/// its causes and the process exits 1.
pub fn block_on_main<F: Future<Output = anyhow::Result<()>>>(main: F) -> ExitCode {
    match block_on(main) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(code) => code,
    }
}

/// Runs `main` to completion on a new multi-threaded runtime; a runtime that cannot start is
/// reported and gives the exit code.
fn block_on<F: Future>(main: F) -> Result<F::Output, ExitCode> {
    match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => Ok(runtime.block_on(main)),
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            Err(ExitCode::FAILURE)
        }
    }
}

/// The whole life of a service binary: parse settings (usage errors exit 64), set up logs, connect,
/// bind, build the services with `build`, serve until SIGTERM/SIGINT, drain, exit 0.
pub fn run_binary<F, Fut>(service: &'static str, default_listen: &'static str, build: F) -> ExitCode
where
    F: FnOnce(&mut Mesh) -> Fut,
    Fut: Future<Output = anyhow::Result<Services>>,
{
    let settings = Settings::for_service(service, default_listen);
    // A failure is logged once (in the log format chosen), not printed again.
    let served = block_on(async move {
        let instance_id = Mesh::new_instance_id(service);
        let telemetry = crate::telemetry::init(&settings.log_format, service, &instance_id);
        let served = async {
            let listener = TcpListener::bind(settings.listen)
                .await
                .map_err(|e| anyhow::anyhow!("binding {}: {e}", settings.listen))?;
            let mut mesh = Mesh::connect(settings, service, instance_id).await?;
            let services = build(&mut mesh).await?;
            let runtime = mesh.runtime_config();
            if telemetry.exporting() {
                tokio::spawn(crate::telemetry::follow_sampling(
                    runtime,
                    telemetry.ratio(),
                ));
            }
            mesh.serve(listener, services, shutdown_signal()).await
        }
        .await;
        if let Err(e) = &served {
            tracing::error!(error = %format!("{e:#}"), "exiting");
        }
        // Spans of every call served before exit are exported before the process ends.
        telemetry.shutdown().await;
        served.is_ok()
    });
    match served {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(code) => code,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;

    #[tokio::test]
    async fn old_grpcurl_reflection_v1alpha_sees_herd_and_health() {
        let (_reporter, health) = tonic_health::server::health_reporter();
        let routes = with_health_and_reflection(Routes::default(), health).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(
            Server::builder()
                .add_routes(routes)
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        let channel = crate::connection::Connection::open(address.to_string().parse().unwrap())
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
}
