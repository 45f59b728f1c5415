//! One instance's link to the mesh: its identity, etcd, shared configuration and balanced
//! channels to the services it calls. [`Mesh::serve`](crate::server) serves it.

use etcd_client::Client;
use futures::future::BoxFuture;
use tokio::sync::watch;

use crate::balance::MeshChannel;
use crate::caller::Caller;
use crate::config::{ConfigModel, ConfigStatus, ConfigStore, RuntimeConfig};
use crate::discovery::Discovered;
use crate::error::ServeError;
use crate::layout::Layout;
use crate::settings::Settings;

/// One instance's link to the mesh: its identity, etcd, configuration and balanced channels.
pub struct Mesh {
    pub(crate) settings: Settings,
    pub(crate) service: String,
    pub(crate) instance_id: String,
    /// Its channels to the services it calls, etcd, its watch stream and its TLS.
    pub(crate) caller: Caller,
    /// What must be true before the instance registers (its configuration loaded).
    pub(crate) ready: Vec<BoxFuture<'static, ()>>,
    pub(crate) config_status: Option<watch::Receiver<ConfigStatus>>,
    runtime: Option<watch::Receiver<RuntimeConfig>>,
}

impl Mesh {
    /// Connects to etcd for an instance of `service` (a name such as `pricing`).
    pub async fn connect(
        settings: Settings,
        service: &str,
        instance_id: String,
    ) -> Result<Self, ServeError> {
        let caller = Caller::open(
            &settings.connect,
            instance_id.clone(),
            Some(service.to_string()),
        )
        .await?;
        Ok(Self {
            caller,
            settings,
            service: service.to_string(),
            instance_id,
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
        self.caller.etcd()
    }

    /// The folder of secret files given to this instance (`--secrets`), if any.
    pub fn secrets_dir(&self) -> Option<&std::path::Path> {
        self.settings.secrets.as_deref()
    }

    /// Where herd's keys are in etcd.
    pub fn layout(&self) -> &Layout {
        self.caller.layout()
    }

    /// The typed shared configuration: the runtime's sections and `M`'s. The instance reports
    /// SERVING only once it is loaded. Call it once per instance.
    pub fn config<M: ConfigModel>(&mut self) -> ConfigStore<M> {
        let store = ConfigStore::<M>::start_on(&self.caller.watches, self.caller.layout.clone());
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
        self.caller.channel(service)
    }

    /// The instances of `service` registered now and every later set, from the same watch its
    /// channel balances over (this instance's own service included, when asked for).
    pub fn discover(&self, service: &str) -> watch::Receiver<Discovered> {
        self.caller.discover(service)
    }
}
