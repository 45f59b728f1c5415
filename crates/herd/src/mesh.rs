//! One instance's link to the mesh: its identity, etcd, shared configuration and balanced
//! channels to the services it calls. [`Mesh::serve`](crate::server) serves it.

use std::collections::HashMap;
use std::sync::Mutex;

use etcd_client::Client;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::balance::MeshChannel;
use crate::config::{ConfigModel, ConfigStatus, ConfigStore, RuntimeConfig};
use crate::discovery::{Discovered, Resolver};
use crate::error::ServeError;
use crate::layout::Layout;
use crate::settings::Settings;

/// One instance's link to the mesh: its identity, etcd, configuration and balanced channels.
pub struct Mesh {
    pub(crate) settings: Settings,
    pub(crate) service: String,
    pub(crate) instance_id: String,
    pub(crate) layout: Layout,
    pub(crate) etcd: Client,
    /// Every watch this instance makes, on one etcd Watch stream.
    pub(crate) watches: crate::watch::Watches,
    channels: Mutex<HashMap<String, (MeshChannel, Resolver)>>,
    /// What must be true before the instance registers (its configuration loaded).
    pub(crate) ready: Vec<BoxFuture<'static, ()>>,
    pub(crate) config_status: Option<watch::Receiver<ConfigStatus>>,
    runtime: Option<watch::Receiver<RuntimeConfig>>,
    /// The instance's TLS material, when every hop is mutual TLS.
    pub(crate) tls: Option<Tls>,
}

/// An instance's TLS, ready: its credentials and the client side built from them.
pub(crate) struct Tls {
    pub(crate) credentials: crate::tls::Credentials,
    client: std::sync::Arc<rustls::ClientConfig>,
    /// Re-reads the certificate and key when they change.
    watch: tokio::task::JoinHandle<()>,
}

impl Drop for Tls {
    fn drop(&mut self) {
        self.watch.abort();
    }
}

impl Mesh {
    /// Connects to etcd for an instance of `service` (a name such as `pricing`).
    pub async fn connect(
        settings: Settings,
        service: &str,
        instance_id: String,
    ) -> Result<Self, ServeError> {
        let tls = match settings.tls_files() {
            None => None,
            Some(files) => {
                let credentials = crate::tls::Credentials::load(&files)?;
                // Rotated certificates are taken up within a second, without a restart; the
                // task lives as long as the mesh.
                let watch = credentials.watch(files, std::time::Duration::from_secs(1));
                let client = crate::tls::client_config(&credentials)?;
                tracing::info!(identity = credentials.identity(), "mutual TLS on every hop");
                Some(Tls {
                    credentials,
                    client,
                    watch,
                })
            }
        };
        let etcd = crate::etcd::connect_with(&settings.etcd).await?;
        Ok(Self {
            watches: crate::watch::Watches::new(etcd.clone()),
            tls,
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

    /// The folder of secret files given to this instance (`--secrets`), if any.
    pub fn secrets_dir(&self) -> Option<&std::path::Path> {
        self.settings.secrets.as_deref()
    }

    /// Where herd's keys are in etcd.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The typed shared configuration: the runtime's sections and `M`'s. The instance reports
    /// SERVING only once it is loaded. Call it once per instance.
    pub fn config<M: ConfigModel>(&mut self) -> ConfigStore<M> {
        let store = ConfigStore::<M>::start_on(&self.watches, self.layout.clone());
        let waiter = store.clone();
        self.ready
            .push(Box::pin(async move { waiter.ready().await }));
        self.config_status = Some(store.subscribe_status());
        self.runtime = Some(store.subscribe_runtime());
        store
    }

    /// The runtime's own settings as configuration revisions are applied; an instance whose
    /// services read no configuration gets a store of the runtime's sections alone.
    pub fn runtime_config(&mut self) -> watch::Receiver<RuntimeConfig> {
        match &self.runtime {
            Some(runtime) => runtime.clone(),
            None => self.config::<()>().subscribe_runtime(),
        }
    }

    /// A balanced channel to `service`, by name alone.
    pub fn channel(&self, service: &str) -> MeshChannel {
        self.with_service(service, |(channel, _)| channel.clone())
    }

    /// The instances of `service` registered now and every later set, from the same watch its
    /// channel balances over (this instance's own service included, when asked for).
    pub fn discover(&self, service: &str) -> watch::Receiver<Discovered> {
        self.with_service(service, |(_, resolver)| resolver.subscribe())
    }

    fn with_service<T>(&self, service: &str, f: impl FnOnce(&(MeshChannel, Resolver)) -> T) -> T {
        let mut channels = match self.channels.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(entry) = channels.get(service) {
            return f(entry);
        }
        // The instances of this instance's own service rank it among the callers of every other.
        let peers = match channels.get(&self.service) {
            Some((_, peers)) => peers.subscribe(),
            None => {
                let own = self.open(&self.service, None);
                let peers = own.1.subscribe();
                channels.insert(self.service.clone(), own);
                peers
            }
        };
        f(channels
            .entry(service.to_string())
            .or_insert_with(|| self.open(service, Some(peers))))
    }

    /// A resolver of `service` and a channel to it, subset among `peers` (the resolver's own set
    /// when `None`: the channel to this instance's own service).
    fn open(
        &self,
        service: &str,
        peers: Option<watch::Receiver<Discovered>>,
    ) -> (MeshChannel, Resolver) {
        let resolver = Resolver::start_on(&self.watches, &self.layout, service);
        let peers = peers.unwrap_or_else(|| resolver.subscribe());
        let mut channel = MeshChannel::builder(service).subset(
            &self.instance_id,
            peers,
            self.settings.subset_size,
        );
        if let Some(tls) = &self.tls {
            channel = match crate::tls::TlsConnector::new(tls.client.clone(), service) {
                Ok(connector) => channel.connector(connector),
                // Never plaintext instead: every call fails, saying why.
                Err(e) => channel.connector(crate::tls::Unusable(e.to_string())),
            };
        }
        (channel.build(resolver.subscribe()), resolver)
    }
}
