//! What an instance tells its operators about itself: `herd.admin.v1.AdminService`, served by
//! every instance beside health and reflection, and the asking side that `herdctl config status`
//! uses.
//!
//! Operators ask the instances rather than read what each wrote to etcd: an instance writes
//! nothing to etcd when it applies a configuration revision, so a change costs etcd one write
//! however many instances there are (one each would be a thousand writes per change at a
//! thousand instances).

use std::time::Duration;

use herd_proto::admin::admin_service_client::AdminServiceClient;
use herd_proto::admin::admin_service_server::{AdminService, AdminServiceServer};
use herd_proto::admin::{GetStatusRequest, GetStatusResponse};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::client::Connector;
use crate::client::connection::Connection;
use crate::config::{ConfigError, ConfigStatus, Rejection};
use crate::instance::{InstanceInfo, InstanceStatus};

/// The admin service of one instance.
pub(crate) struct Admin {
    service: String,
    instance_id: String,
    /// The instance's configuration status; `None` when it reads no configuration.
    config: Option<watch::Receiver<ConfigStatus>>,
    /// Over TLS, only callers with a certificate from the mesh's CA may ask (the public gateway
    /// takes callers without one).
    require_identity: bool,
}

impl Admin {
    /// The admin service of the instance `instance_id` of `service`.
    pub(crate) fn server(
        service: &str,
        instance_id: &str,
        config: Option<watch::Receiver<ConfigStatus>>,
        require_identity: bool,
    ) -> AdminServiceServer<Self> {
        AdminServiceServer::new(Self {
            service: service.to_string(),
            instance_id: instance_id.to_string(),
            config,
            require_identity,
        })
    }
}

#[tonic::async_trait]
impl AdminService for Admin {
    async fn get_status(
        &self,
        request: Request<GetStatusRequest>,
    ) -> Result<Response<GetStatusResponse>, Status> {
        let identified = request
            .extensions()
            .get::<crate::tls::PeerInfo>()
            .is_some_and(|peer| peer.identity.is_some());
        if self.require_identity && !identified {
            return Err(Status::permission_denied(
                "herd.admin.v1.AdminService: only callers with a certificate from the mesh's CA may ask",
            ));
        }
        let config = self
            .config
            .as_ref()
            .map(|c| c.borrow().clone())
            .unwrap_or_default();
        Ok(Response::new(GetStatusResponse {
            service: self.service.clone(),
            instance_id: self.instance_id.clone(),
            applied_revision: config.applied,
            rejected: config.rejected.map(|r| herd_proto::admin::Rejection {
                revision: r.revision,
                section: r.error.section,
                message: r.error.message,
            }),
            ignored_keys: config.ignored,
        }))
    }
}

/// How an operator's tool reaches instances to ask them: plaintext, or mutual TLS with a
/// certificate from the mesh's CA.
#[derive(Clone, Default)]
pub struct Asker {
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Asker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Asker")
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// How many instances are asked at once.
const ASKED_AT_ONCE: usize = 64;

impl Asker {
    /// Asks over plaintext TCP.
    pub fn plaintext() -> Self {
        Self::default()
    }

    /// Asks over mutual TLS, presenting the certificate in `files`.
    pub fn with_tls(files: &crate::tls::TlsFiles) -> Result<Self, crate::tls::TlsError> {
        let credentials = crate::tls::Credentials::load(files)?;
        Ok(Self {
            tls: Some(crate::tls::client_config(&credentials)?),
        })
    }

    /// Every instance in `instances` asked for its status, at most 64 at a time, each within
    /// `timeout`; in the order given.
    pub async fn statuses(
        &self,
        instances: &[InstanceInfo],
        timeout: Duration,
    ) -> Vec<Result<InstanceStatus, String>> {
        use futures::StreamExt;
        futures::stream::iter(instances)
            .map(|info| self.status_of(info, timeout))
            .buffered(ASKED_AT_ONCE)
            .collect()
            .await
    }

    /// The instance `info`'s status, asked within `timeout`.
    pub async fn status_of(
        &self,
        info: &InstanceInfo,
        timeout: Duration,
    ) -> Result<InstanceStatus, String> {
        match &self.tls {
            None => status_of(info, &crate::client::TcpConnector::default(), timeout).await,
            Some(config) => {
                let connector = crate::tls::TlsConnector::new(config.clone(), &info.service)
                    .map_err(|e| e.to_string())?;
                status_of(info, &connector, timeout).await
            }
        }
    }
}

/// Asks the instance `info` for its status over a new connection from `connector`, within
/// `timeout`.
async fn status_of(
    info: &InstanceInfo,
    connector: &dyn Connector,
    timeout: Duration,
) -> Result<InstanceStatus, String> {
    let ask = async {
        let authority = info
            .address
            .parse()
            .map_err(|e| format!("unusable address {:?}: {e}", info.address))?;
        let connection = Connection::open(connector, authority)
            .await
            .map_err(|e| crate::error::with_causes(&*e))?;
        AdminServiceClient::new(connection)
            .get_status(GetStatusRequest {})
            .await
            .map_err(|status| format!("{:?}: {}", status.code(), status.message()))
    };
    let response = tokio::time::timeout(timeout, ask)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))??
        .into_inner();
    if response.instance_id != info.instance_id {
        // Its address now belongs to another instance: the registered one is gone.
        return Err(format!("{} answers there now", response.instance_id));
    }
    Ok(InstanceStatus {
        service: response.service,
        instance_id: response.instance_id,
        config: ConfigStatus {
            applied: response.applied_revision,
            rejected: response.rejected.map(|r| Rejection {
                revision: r.revision,
                error: ConfigError::new(r.section, r.message),
            }),
            ignored: response.ignored_keys,
        },
        unreachable: None,
    })
}
