//! What an instance says about itself: its registration record in etcd (under
//! `<prefix>services/<service>/<instance-id>`, bound to its lease), and its status when an operator
//! asks it ([`crate::admin`]).

use serde::{Deserialize, Serialize};

/// What an instance writes under its registration key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// Service name, for example `pricing`.
    pub service: String,
    /// Unique id of this instance.
    pub instance_id: String,
    /// The address the instance actually bound, `host:port`.
    pub address: String,
    /// Process id, to help operators.
    pub pid: u32,
    /// Version of the binary.
    pub version: String,
}

/// What an instance answers when an operator asks for its status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceStatus {
    /// Service name.
    pub service: String,
    /// Instance id.
    pub instance_id: String,
    /// The configuration revision applied and the latest one rejected.
    pub config: crate::config::ConfigStatus,
    /// Why the instance could not be asked, when it could not (its status is then unknown).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unreachable: Option<String>,
}
